"""The U-Net: exact Dirichlet values, zero-init lifting, resolutions, checkpointing, norms."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from pdeds.errors import PdedsError
from pdeds.models import (
    ACTIVATIONS,
    NORM_KINDS,
    UNet,
    UNetConfig,
    allowed_resolutions,
    build_model,
    count_parameters,
)

SMALL = dict(width=4, depth=3, groups=2)


def _nu(batch: int, n: int, dim: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.exp(torch.randn((batch, 1) + (n,) * dim, generator=g))


def _randomise(model: nn.Module, seed: int = 1) -> nn.Module:
    """Random values for every parameter, the zero head included."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(0.3 * torch.randn(p.shape, generator=g))
    return model


def _lifting_truth(n: int, dim: int) -> torch.Tensor:
    """1 - x1 on the nodal grid, from the formula in float64."""
    x1 = torch.arange(n, dtype=torch.float64) / (n - 1)
    return (1.0 - x1).view((1, 1, n) + (1,) * (dim - 1)).expand((1, 1) + (n,) * dim)


@pytest.mark.parametrize("dim", [2, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dirichlet_values_exact_for_random_weights(dim, dtype):
    model = _randomise(build_model(dim, UNetConfig(**SMALL))).to(dtype)
    u = model(_nu(2, 16, dim))
    assert u.dtype == torch.float32
    assert u.shape == (2, 1) + (16,) * dim
    assert torch.equal(u[:, :, 0], torch.ones_like(u[:, :, 0]))
    assert torch.equal(u[:, :, -1], torch.zeros_like(u[:, :, -1]))
    interior = u[:, :, 1:-1].float()
    assert torch.isfinite(interior).all()
    # random weights really do move the interior away from the lifting
    assert (interior - _lifting_truth(16, dim)[:, :, 1:-1].float()).abs().max() > 1e-3


@pytest.mark.parametrize("dim", [2, 3])
def test_untrained_network_returns_the_lifting(dim):
    model = build_model(dim, UNetConfig(**SMALL))
    u = model(_nu(3, 16, dim))
    truth = _lifting_truth(16, dim).expand_as(u).to(torch.float32)
    torch.testing.assert_close(u, truth, rtol=0, atol=0)


def test_features_are_log_nu_and_coordinates():
    model = build_model(3, UNetConfig(**SMALL))
    nu = _nu(2, 16, 3)
    f = model.features(nu)
    assert f.shape == (2, 4, 16, 16, 16)
    torch.testing.assert_close(f[:, :1], torch.log(nu))
    x = torch.arange(16, dtype=torch.float64) / 15
    for a in range(3):
        shape = [1, 1, 1]
        shape[a] = 16
        expected = x.view(shape).expand(16, 16, 16).float()
        torch.testing.assert_close(f[1, 1 + a], expected, rtol=0, atol=1e-7)


@pytest.mark.parametrize("dim", [2, 3])
def test_same_weights_run_at_several_resolutions(dim):
    model = _randomise(build_model(dim, UNetConfig(**SMALL)))
    for n in (16, 32):
        u = model(_nu(1, n, dim))
        assert u.shape == (1, 1) + (n,) * dim
        assert torch.isfinite(u).all()
    # non-cubic grids are fine as long as every axis passes the halvings
    if dim == 3:
        assert model(_nu(1, 16, 3)[..., :8].repeat(1, 1, 1, 1, 3)).shape == (1, 1, 16, 16, 24)


def test_allowed_resolutions_rule():
    assert allowed_resolutions(3, 64) == [16, 24, 32, 40, 48, 56, 64]
    assert allowed_resolutions(2, 20) == [8, 12, 16, 20]
    model = build_model(2, UNetConfig(**SMALL))
    for n in allowed_resolutions(3, 64):
        model.check_resolution(n)


@pytest.mark.parametrize("n", [8, 12, 20, 33])
def test_bad_resolution_is_a_helpful_error(n):
    model = build_model(3, UNetConfig(**SMALL))
    expected = (
        f"resolution n={n} cannot pass 3 2x downsamplings; "
        "use a multiple of 8 that is >= 16 (e.g. 16, 32, 64)"
    )
    with pytest.raises(PdedsError) as err:
        model.check_resolution(n)
    assert str(err.value) == expected
    with pytest.raises(PdedsError, match="cannot pass 3 2x downsamplings"):
        model(_nu(1, n, 3) if n <= 20 else _nu(1, 16, 3)[..., :1].expand(1, 1, 16, 16, n))


def test_bad_input_shape_is_an_error():
    model = build_model(3, UNetConfig(**SMALL))
    with pytest.raises(PdedsError, match=r"pass \(B, 1, n, n, n\)"):
        model(_nu(1, 16, 2))


def _grads(model: UNet, nu: torch.Tensor) -> dict[str, torch.Tensor]:
    model.zero_grad()
    u = model(nu)
    (u.square().sum() + u.sum()).backward()
    return {k: p.grad.clone() for k, p in model.named_parameters()}


@pytest.mark.parametrize("norm", ["group", "batch"])
def test_checkpointing_gives_the_same_gradients(norm):
    plain = _randomise(build_model(3, UNetConfig(norm=norm, **SMALL)))
    ckpt = build_model(3, UNetConfig(norm=norm, checkpoint=True, **SMALL))
    ckpt.load_state_dict(plain.state_dict())
    nu = _nu(2, 16, 3)
    g_plain, g_ckpt = _grads(plain, nu), _grads(ckpt, nu)
    for k in g_plain:
        torch.testing.assert_close(
            g_ckpt[k], g_plain[k], rtol=1e-6, atol=1e-7 * g_plain[k].abs().max()
        )
    # the recomputation in backward must not update batch-norm running statistics twice
    for (k, b_plain), b_ckpt in zip(plain.named_buffers(), ckpt.buffers()):
        torch.testing.assert_close(b_ckpt, b_plain, rtol=0, atol=0, msg=k)
    with torch.no_grad():
        torch.testing.assert_close(ckpt(nu), plain(nu))


@pytest.mark.parametrize("norm", NORM_KINDS)
@pytest.mark.parametrize("dim", [2, 3])
def test_every_norm_kind_trains_and_evaluates(norm, dim):
    model = _randomise(build_model(dim, UNetConfig(norm=norm, width=6, groups=4, depth=2)))
    nu = _nu(2, 8, dim)
    model(nu).square().sum().backward()
    first = model.encoder[0][0].weight.grad
    assert torch.isfinite(first).all() and first.abs().max() > 0
    model.eval()
    with torch.no_grad():
        u = model(nu)
    assert torch.isfinite(u).all() and torch.equal(u[:, :, 0], torch.ones_like(u[:, :, 0]))


@pytest.mark.parametrize("activation", sorted(ACTIVATIONS))
def test_every_activation(activation):
    model = _randomise(build_model(2, UNetConfig(activation=activation, depth=1, width=4)))
    assert torch.isfinite(model(_nu(1, 4, 2))).all()


def test_layers_are_plain_convs_for_kfac():
    model = build_model(3, UNetConfig(**SMALL))
    kinds = {type(m) for m in model.modules() if any(True for _ in m.parameters(recurse=False))}
    plain = (nn.Conv3d, nn.ConvTranspose3d, nn.GroupNorm)
    assert all(issubclass(k, plain) for k in kinds) and len(kinds) == 3


def test_channels_and_parameter_count():
    cfg = UNetConfig(depth=1, width=2, growth=1.5, norm="none", blocks=1)
    assert cfg.channels() == [2, 3]
    model = build_model(2, cfg)
    # enc0: conv3 3->2; enc1: down 2->3 (k2), conv3 3->3; dec0: up 3->2 (k2), conv3 4->2; head 2->1
    expected = (3 * 2 * 9 + 2) + (2 * 3 * 4 + 3) + (3 * 3 * 9 + 3) + (3 * 2 * 4 + 2)
    expected += (4 * 2 * 9 + 2) + (2 + 1)
    assert count_parameters(model) == expected


def test_group_count_is_clamped_to_a_divisor():
    model = build_model(2, UNetConfig(width=6, groups=4, depth=1, growth=1.0))
    norms = [m for m in model.modules() if isinstance(m, nn.GroupNorm)]
    assert norms and all(m.num_groups == 3 for m in norms)


@pytest.mark.parametrize(
    ("field", "value", "key"),
    [
        ("depth", 0, "model.depth"),
        ("depth", 2.0, "model.depth"),
        ("width", 0, "model.width"),
        ("growth", 0.0, "model.growth"),
        ("growth", "2", "model.growth"),
        ("norm", "foo", "model.norm: 'foo' is not one of batch, sync_batch, instance, group, none"),
        ("groups", 0, "model.groups"),
        ("activation", "swish", "model.activation: 'swish' is not one of gelu"),
        ("checkpoint", "yes", "model.checkpoint"),
        ("blocks", True, "model.blocks"),
    ],
)
def test_config_validation_names_the_key(field, value, key):
    cfg = UNetConfig(**{field: value})
    with pytest.raises(PdedsError) as err:
        cfg.validate()
    assert str(err.value).startswith(key)
    assert ";" in str(err.value)
    with pytest.raises(PdedsError):
        build_model(3, cfg)


def test_default_config_is_valid_and_dim_is_checked():
    UNetConfig().validate()
    with pytest.raises(PdedsError, match="use 2 or 3"):
        build_model(1, UNetConfig())
