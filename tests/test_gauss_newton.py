"""Gauss-Newton: the matrix-free G v against J^T K J assembled, CG, and runs through the trainer."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from trainer_util import TINY, train_cases

from pdeds.errors import PdedsError
from pdeds.models import ModelConfig, build_model
from pdeds.optim import OptimConfig
from pdeds.optim.gauss_newton import (
    GaussNewtonConfig,
    GaussNewtonProduct,
    conjugate_gradient,
    curvature_slices,
)
from pdeds.physics import kl, reference
from pdeds.testing.distributed import run_ranks
from pdeds.train.step import output_curvature


def _tiny_problem(weighting: str):
    torch.manual_seed(0)
    cfg = ModelConfig(arch="unet", depth=1, width=2, norm="group", groups=1)
    model = build_model(2, cfg).double()
    nu = kl.diffusivity(kl.sample_coefficients(2, 4, seed=5), 8, dim=2).double()
    return model, nu, output_curvature(nu, 0.0, weighting)


def _assembled_g(model: torch.nn.Module, nu: torch.Tensor, weighting: str) -> torch.Tensor:
    """1/B sum_b w_b J_b^T K_b J_b with J_b column by column (one JVP per parameter, autograd's
    ``jacobian``) and K_b from the sparse FEM assembly."""
    params = [p for p in model.parameters() if p.requires_grad]
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    b = nu.shape[0]

    def out(*flat: torch.Tensor) -> torch.Tensor:
        return torch.func.functional_call(model, dict(zip(names, flat, strict=True)), (nu,))

    jac = torch.autograd.functional.jacobian(out, tuple(p.detach() for p in params))
    jac = torch.cat([j.reshape(b, nu[0].numel(), -1) for j in jac], dim=2)
    g = torch.zeros(jac.shape[2], jac.shape[2], dtype=torch.float64)
    for i in range(b):
        k, _ = reference.assemble(nu[i, 0].numpy())
        w = 1.0
        if weighting == "lifting":
            lift = 1.0 - np.linspace(0.0, 1.0, nu.shape[2])[:, None] * np.ones(nu.shape[3])
            w = 1.0 / abs(0.5 * lift.ravel() @ (k @ lift.ravel()))
        g += w * jac[i].T @ torch.from_numpy(k.toarray()) @ jac[i]
    return g / b


@pytest.mark.parametrize("weighting", ["none", "lifting"])
def test_matrix_free_product_equals_assembled_jt_k_j(weighting):
    model, nu, curv = _tiny_problem(weighting)
    truth = _assembled_g(model, nu, weighting)
    product = GaussNewtonProduct(model, [curv], total=nu.shape[0], reduce=False)
    gen = torch.Generator().manual_seed(3)
    for _ in range(2):
        v = torch.randn(truth.shape[0], dtype=torch.float64, generator=gen)
        gv, want = product(v), truth @ v
        # float64 throughout; measured 3e-8 (forward- vs reverse-mode round-off at the head)
        assert float((gv - want).norm() / want.norm()) < 1e-6


def test_conjugate_gradient_solves_the_damped_system():
    torch.manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(12, 12, dtype=torch.float64))
    a = q @ torch.diag(torch.logspace(-2, 1, 12, dtype=torch.float64)) @ q.T
    g = torch.randn(12, dtype=torch.float64)
    d, gd = conjugate_gradient(lambda v: a @ v, g, lambda p, gp: 0.5, iters=12, tol=0.0)
    torch.testing.assert_close(d, -torch.linalg.solve(a + 0.5 * torch.eye(12), g))
    torch.testing.assert_close(gd, a @ d)


def test_conjugate_gradient_from_a_warm_start():
    """From x0 the products include G x0; from the solution itself CG stays there, and from a
    nearby start 4 products get closer than 4 from 0."""
    torch.manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(12, 12, dtype=torch.float64))
    a = q @ torch.diag(torch.logspace(-2, 1, 12, dtype=torch.float64)) @ q.T
    g = torch.randn(12, dtype=torch.float64)
    want = -torch.linalg.solve(a + 0.5 * torch.eye(12, dtype=torch.float64), g)
    calls = []

    def apply(v):
        calls.append(1)
        return a @ v

    d, gd = conjugate_gradient(apply, g, lambda p, gp: 0.5, iters=3, tol=1e-12, x0=want)
    torch.testing.assert_close(d, want)
    torch.testing.assert_close(gd, a @ d)
    assert len(calls) == 1  # G x0, then the residual is ~0
    near = want + 0.01 * torch.randn(12, dtype=torch.float64)
    warm = conjugate_gradient(lambda v: a @ v, g, lambda p, gp: 0.5, 4, 0.0, x0=near)[0]
    cold = conjugate_gradient(lambda v: a @ v, g, lambda p, gp: 0.5, 4, 0.0)[0]
    assert (warm - want).norm() < 0.1 * (cold - want).norm()


def test_curvature_sub_batch_is_the_same_set_for_any_split():
    """The first S global positions: 1 rank x 2 micro-batches of 4 vs 2 ranks x 2 of 2."""
    assert curvature_slices([4, 4], 5, 1, 0) == [4, 1]
    assert curvature_slices([2, 2], 5, 2, 0) == [2, 1]  # positions 0-1 and 4
    assert curvature_slices([2, 2], 5, 2, 1) == [2, 0]  # positions 2-3 (6-7 beyond S)


def test_config_refusals():
    with pytest.raises(PdedsError, match="cg_iters"):
        OptimConfig(name="gauss_newton", gauss_newton=GaussNewtonConfig(cg_iters=0)).validate()
    with pytest.raises(PdedsError, match=r"warm_start: 1.0 must lie in \[0, 1\)"):
        OptimConfig(name="gauss_newton", gauss_newton=GaussNewtonConfig(warm_start=1.0)).validate()
    from pdeds.optim import prepare_ds_config

    with pytest.raises(PdedsError, match="ZeRO stage 1"):
        prepare_ds_config(OptimConfig(name="gauss_newton"), {"zero_optimization": {"stage": 1}})
    with pytest.raises(PdedsError, match="gradient_clipping"):
        prepare_ds_config(OptimConfig(name="gauss_newton"), {"gradient_clipping": 1.0})
    from pdeds.config import resolve

    with pytest.raises(PdedsError, match="model.norm: batch"):
        resolve(TINY, ["optim.name=gauss_newton", "model.norm=batch"])
    with pytest.raises(PdedsError, match="model.norm: batch .*curvature: ggn needs"):
        resolve(TINY, ["optim.name=kfac", "optim.kfac.curvature=ggn", "model.norm=batch"])


# ---- through the trainer -----------------------------------------------------------------

GN = [
    "optim.name=gauss_newton",
    "optim.lr=1.0",
    "train.steps=4",
    "ds.train_batch_size=4",
    "ds.train_micro_batch_size_per_gpu=1",
]


def test_trainer_one_vs_two_ranks_and_first_steps_lower_the_loss(tmp_path: Path):
    """Defaults of optim.gauss_newton: the loss falls from the first step, and 2 gloo ranks
    (2 accumulation steps each) give the 1-rank losses (4 accumulation steps)."""
    cases = [("gn", GN)]
    one = run_ranks(train_cases, 1, str(tmp_path / "one"), cases, timeout=240)[0]
    two = run_ranks(train_cases, 2, str(tmp_path / "two"), cases, timeout=240)[0]
    a, b = one["gn"]["losses"], two["gn"]["losses"]
    steps = sorted(a)
    assert all(a[s] < a[steps[0]] for s in steps[1:]), a
    for s in steps:
        assert b[s] == pytest.approx(a[s], rel=1e-6, abs=0), (s, a[s], b[s])
    for k, w in one["gn"]["weights"].items():
        torch.testing.assert_close(two["gn"]["weights"][k], w, rtol=1e-5, atol=1e-6)
    assert TINY["model"]["norm"] == "group"
