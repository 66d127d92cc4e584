"""The full-multigrid network: exact Dirichlet values, the lifting at init, and outputs that
converge as the grid is refined (the property the U-Net lacks)."""

from __future__ import annotations

import pytest
import torch

from pdeds.errors import PdedsError
from pdeds.models import FMGNet, ModelConfig, build_model, resolution_problem
from pdeds.models.fmg import resample, stage_nodes
from pdeds.physics import fem, kl

SMALL = {"width": 4, "groups": 2, "blocks": 1}


def _randomise(model: torch.nn.Module, scale: float = 0.2) -> torch.nn.Module:
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn_like(p))
    return model


def _nu(dim: int, n: int, k: int = 2) -> torch.Tensor:
    c = torch.from_numpy(kl.sample_coefficients(k, 6, 5))
    return kl.diffusivity(c, n, dim=dim).float()


def test_stage_grids_double_up_to_n():
    assert stage_nodes(8, 8) == [8]
    assert stage_nodes(8, 32) == [8, 16, 32]
    assert stage_nodes(8, 48) == [8, 16, 32, 48]
    assert stage_nodes(8, 12) == [8, 12]


def test_resample_is_exact_on_multilinear_fields():
    def field(nodes: int, dim: int) -> torch.Tensor:
        g = torch.meshgrid(*[torch.linspace(0, 1, nodes)] * dim, indexing="ij")
        return (1 + 2 * g[0] - 3 * g[-1] + g[0] * g[-1])[None, None]

    for dim in (2, 3):
        torch.testing.assert_close(resample(field(5, dim), 9), field(9, dim))


@pytest.mark.parametrize("dim", [2, 3])
def test_untrained_network_is_the_lifting_and_random_ones_keep_dirichlet_values(dim):
    model = build_model(dim, ModelConfig(**SMALL))
    assert isinstance(model, FMGNet)
    for n in (8, 16, 24):
        nu = _nu(dim, n)
        u = model(nu)
        torch.testing.assert_close(u, fem.apply_dirichlet(torch.zeros_like(nu)))
    model = _randomise(model)
    u = model(_nu(dim, 16))
    assert u.dtype == torch.float32
    assert torch.equal(u[:, :, 0], torch.ones_like(u[:, :, 0]))
    assert torch.equal(u[:, :, -1], torch.zeros_like(u[:, :, -1]))
    assert u[:, :, 1:-1].std() > 1e-3  # the interior moved: the weights reach the output


@pytest.mark.parametrize("dim, sizes", [(2, (16, 32, 64)), (3, (16, 32, 64))])
def test_outputs_converge_as_the_grid_is_refined(dim, sizes):
    """Same weights, same nu at n, 2n, 4n: the gap between successive outputs shrinks. With the
    (h / h_1)^2 stage scaling it more than halves per doubling here; without it (p = 0, an
    index-space correction at every level) it shrinks far less (seeds 0-3 here: ratios of
    successive gaps 0.37-0.65 against 0.65-0.98)."""

    def gaps(power: float) -> list[float]:
        torch.manual_seed(0)
        model = _randomise(build_model(dim, ModelConfig(width=8, refine_power=power)))
        with torch.no_grad():
            out = {n: model(_nu(dim, n)) for n in sizes}
        return [
            float((resample(out[a], b) - out[b]).norm() / out[b].norm())
            for a, b in zip(sizes, sizes[1:])
        ]

    converging, index_space = gaps(2.0), gaps(0.0)
    ratio, index_ratio = converging[1] / converging[0], index_space[1] / index_space[0]
    assert ratio < 0.55, converging
    assert ratio < 0.75 * index_ratio, (converging, index_space)


def test_checkpointing_changes_nothing_but_memory():
    torch.manual_seed(0)
    plain = _randomise(build_model(3, ModelConfig(**SMALL)))
    ckpt = build_model(3, ModelConfig(checkpoint=True, **SMALL))
    ckpt.load_state_dict(plain.state_dict())
    nu = _nu(3, 16)
    a, b = plain(nu), ckpt(nu)
    torch.testing.assert_close(a, b)
    a.square().sum().backward()
    b.square().sum().backward()
    for (name, p), q in zip(plain.named_parameters(), ckpt.parameters()):
        torch.testing.assert_close(p.grad, q.grad, msg=name)


def test_bf16_weights_give_a_float32_output():
    model = _randomise(build_model(2, ModelConfig(**SMALL))).to(torch.bfloat16)
    u = model(_nu(2, 16))
    assert u.dtype == torch.float32
    assert torch.equal(u[:, :, 0], torch.ones_like(u[:, :, 0]))


def test_resolutions_below_the_core_grid_are_refused():
    cfg = ModelConfig()
    assert resolution_problem(cfg, 8) is None and resolution_problem(cfg, 100) is None
    with pytest.raises(PdedsError, match="n=4 is coarser than the network's core grid of 8"):
        build_model(2, cfg)(torch.ones(1, 1, 4, 4))
    with pytest.raises(PdedsError, match="model.core_res: 10 nodes cannot pass"):
        ModelConfig(core_res=10).validate()


def test_bf16_gradients_on_the_coarsest_core_grid_are_finite():
    """oneDNN's native bf16 backward of a 3^3 conv on a 2^3 grid returned non-finite gradients in
    ~1/3 of calls on AVX-512-BF16 CPUs; pdeds' conv runs such grids in float32 (on CPUs without
    native bf16 this passes either way)."""
    from pdeds.models.unet import Conv3d

    torch.manual_seed(0)
    conv = Conv3d(16, 16, 3, padding=1).to(torch.bfloat16)
    for _ in range(60):
        conv.zero_grad()
        x = torch.randn(2, 16, 2, 2, 2, dtype=torch.bfloat16, requires_grad=True)
        y = conv(x)
        y.float().square().sum().backward()
        assert y.dtype == torch.bfloat16
        assert torch.isfinite(conv.weight.grad).all() and torch.isfinite(x.grad).all()
