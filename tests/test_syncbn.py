"""SyncBatchNorm on split batches equals torch BatchNorm on the full batch in one process."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from pdeds import distributed
from pdeds.models import SyncBatchNorm, UNetConfig, build_model, make_norm
from pdeds.testing.distributed import run_ranks

C = 3
SPATIAL = (5, 6, 7)
FULL_BATCH = 4
STEPS = 2


def _data(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Input x (offset, scaled per channel) and loss weights G of the full batch at ``step``."""
    g = torch.Generator().manual_seed(100 + step)
    shape = (FULL_BATCH, C, *SPATIAL)
    offset = torch.tensor([0.5, -2.0, 3.0]).view(1, C, 1, 1, 1)
    scale = torch.tensor([1.0, 0.2, 4.0]).view(1, C, 1, 1, 1)
    x = offset + scale * torch.randn(shape, generator=g)
    return x, torch.randn(shape, generator=g)


def _affine(norm: nn.Module) -> nn.Module:
    with torch.no_grad():
        norm.weight.copy_(torch.tensor([1.5, 0.7, -1.1]))
        norm.bias.copy_(torch.tensor([0.1, -0.3, 0.2]))
    return norm


def _train(norm: nn.Module, rows: slice) -> dict[str, list[torch.Tensor] | torch.Tensor]:
    """STEPS training steps on ``rows`` of each batch (loss = sum G * y), then one eval forward."""
    out: dict = {"y": [], "x_grad": [], "w_grad": [], "b_grad": []}
    for step in range(STEPS):
        x, g = _data(step)
        x = x[rows].clone().requires_grad_(True)
        norm.zero_grad()
        y = norm(x)
        (g[rows] * y).sum().backward()
        out["y"].append(y.detach())
        out["x_grad"].append(x.grad)
        out["w_grad"].append(norm.weight.grad.clone())
        out["b_grad"].append(norm.bias.grad.clone())
    norm.eval()
    with torch.no_grad():
        out["eval"] = norm(_data(STEPS)[0][rows])
    out["running_mean"] = norm.running_mean.clone()
    out["running_var"] = norm.running_var.clone()
    out["tracked"] = norm.num_batches_tracked.clone()
    return out


def _reference() -> dict:
    return _train(_affine(nn.BatchNorm3d(C)), slice(None))


def _split_body(splits: list[tuple[int, int]]) -> list[dict]:
    """Each split (start, stop) of the full batch: this rank's slice through SyncBatchNorm."""
    start, stop = splits[distributed.rank()]
    return _train(_affine(SyncBatchNorm(C)), slice(start, stop))


def _unet_cfg(norm: str) -> UNetConfig:
    return UNetConfig(depth=2, width=4, norm=norm, checkpoint=True, blocks=1)


def _unet_params(model: nn.Module) -> nn.Module:
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(0.3 * torch.randn(p.shape, generator=g))
    return model


def _unet_batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    nu = torch.exp(torch.randn(FULL_BATCH, 1, 8, 8, 8, generator=g))
    return nu, torch.randn(FULL_BATCH, 1, 8, 8, 8, generator=g)


def _unet_train(norm: str, rows: slice) -> dict[str, torch.Tensor]:
    model = _unet_params(build_model(3, _unet_cfg(norm)))
    nu, g = _unet_batch()
    u = model(nu[rows])
    (g[rows] * u).sum().backward()
    out = {"u": u.detach()}
    out.update({f"grad.{k}": p.grad for k, p in model.named_parameters()})
    out.update({f"buf.{k}": b for k, b in model.named_buffers()})
    return out


def _ranks_body() -> dict:
    """All 2-rank scenarios in one spawn: even, uneven and empty splits, and a U-Net."""
    r = distributed.rank()
    results = {
        name: _split_body(splits)
        for name, splits in {
            "even": [(0, 2), (2, 4)],
            "uneven": [(0, 3), (3, 4)],
            "empty": [(0, 4), (4, 4)],
        }.items()
    }
    results["unet"] = _unet_train("sync_batch", slice(2 * r, 2 * r + 2))
    return results


@pytest.fixture(scope="module")
def two_ranks() -> list[dict]:
    return run_ranks(_ranks_body, 2, timeout=60)


def _close(a: torch.Tensor, b: torch.Tensor, msg: str = "") -> None:
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=msg)


@pytest.mark.parametrize("split", ["even", "uneven", "empty"])
def test_two_ranks_equal_full_batch(two_ranks, split):
    ref = _reference()
    ranks = [res[split] for res in two_ranks]
    for step in range(STEPS):
        for key in ("y", "x_grad"):
            joined = torch.cat([ranks[0][key][step], ranks[1][key][step]])
            _close(joined, ref[key][step], f"{key} step {step}")
        for key in ("w_grad", "b_grad"):
            _close(ranks[0][key][step] + ranks[1][key][step], ref[key][step], key)
    _close(torch.cat([ranks[0]["eval"], ranks[1]["eval"]]), ref["eval"], "eval")
    for key in ("running_mean", "running_var", "tracked"):
        assert torch.equal(ranks[0][key], ranks[1][key]), key
        _close(ranks[0][key], ref[key], key)


def test_unet_with_sync_batch_on_two_ranks_equals_batch_norm_on_full_batch(two_ranks):
    ref = _unet_train("batch", slice(None))
    r0, r1 = two_ranks[0]["unet"], two_ranks[1]["unet"]
    _close(torch.cat([r0["u"], r1["u"]]), ref["u"])
    # A conv bias right before batch norm has gradient 0 up to round-off: compare every
    # gradient against the largest one, not against itself.
    scale = max(v.abs().max() for k, v in ref.items() if k.startswith("grad."))
    for key in ref:
        if key.startswith("grad."):
            torch.testing.assert_close(
                r0[key] + r1[key], ref[key], rtol=1e-4, atol=1e-6 * scale, msg=key
            )
        elif key.startswith("buf."):
            assert torch.equal(r0[key], r1[key]), key
            _close(r0[key], ref[key], key)


@pytest.mark.parametrize("dim", [2, 3])
def test_one_process_without_group_equals_batch_norm(dim):
    torch.manual_seed(0)
    x = 2.0 + 3.0 * torch.randn((4, C) + (6,) * dim)
    g = torch.randn_like(x)
    ref_norm = _affine(nn.BatchNorm2d(C) if dim == 2 else nn.BatchNorm3d(C))
    sync = _affine(SyncBatchNorm(C))
    outs = []
    for norm in (ref_norm, sync):
        xi = x.clone().requires_grad_(True)
        for _ in range(3):
            norm.zero_grad()
            xi.grad = None
            y = norm(xi)
            (g * y).sum().backward()
        norm.eval()
        with torch.no_grad():
            y_eval = norm(x)
        outs.append((y, xi.grad, norm.weight.grad, norm.bias.grad, y_eval, *norm.buffers()))
    for a, b in zip(*outs):
        _close(b.detach(), a.detach())
    # identical buffer names: state dicts are interchangeable
    assert sync.state_dict().keys() == ref_norm.state_dict().keys()


def test_bfloat16_input_keeps_float32_statistics():
    torch.manual_seed(0)
    x = 1.0 + torch.randn(2, C, 8, 8, 8)
    exact = _affine(SyncBatchNorm(C))
    half = _affine(SyncBatchNorm(C))
    y32 = exact(x)
    y16 = half(x.to(torch.bfloat16))
    assert y16.dtype == torch.bfloat16 and half.running_mean.dtype == torch.float32
    torch.testing.assert_close(y16.float(), y32, rtol=2e-2, atol=3e-2)
    torch.testing.assert_close(half.running_mean, exact.running_mean, rtol=1e-2, atol=1e-2)
    whole = _affine(SyncBatchNorm(C)).to(torch.bfloat16)
    assert whole(x.to(torch.bfloat16)).dtype == torch.bfloat16


def test_make_norm_kinds():
    assert isinstance(make_norm("batch", 4, 3, 2), nn.BatchNorm3d)
    assert isinstance(make_norm("batch", 4, 2, 2), nn.BatchNorm2d)
    assert isinstance(make_norm("sync_batch", 4, 3, 2), SyncBatchNorm)
    inst = make_norm("instance", 4, 3, 2)
    assert isinstance(inst, nn.InstanceNorm3d) and inst.affine
    assert make_norm("group", 12, 3, 8).num_groups == 6
    assert isinstance(make_norm("none", 4, 3, 2), nn.Identity)
