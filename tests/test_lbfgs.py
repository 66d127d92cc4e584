"""L-BFGS: finite termination on quadratics, the FEM solution, and DeepSpeed rank invariance."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pdeds.optim.lbfgs import LBFGS
from pdeds.optim.line_search import cubic_minimizer
from pdeds.physics import fem, kl, reference
from pdeds.testing.distributed import run_ranks


def test_cubic_minimizer_is_exact_on_a_quadratic():
    f = lambda t: 3.0 * (t - 0.7) ** 2 + 1.0  # noqa: E731
    df = lambda t: 6.0 * (t - 0.7)  # noqa: E731
    assert cubic_minimizer(0.0, f(0.0), df(0.0), 2.0, f(2.0), df(2.0), (0.0, 2.0)) == pytest.approx(
        0.7, abs=1e-14
    )


def test_quadratic_converges_in_n_plus_one_iterations():
    """With (near-)exact line searches L-BFGS is CG on a quadratic: <= n iterations in theory."""
    torch.manual_seed(0)
    n = 20
    q, _ = torch.linalg.qr(torch.randn(n, n, dtype=torch.float64))
    a = q @ torch.diag(torch.logspace(0, 3, n, dtype=torch.float64)) @ q.T
    b = torch.randn(n, dtype=torch.float64)
    x_star = torch.linalg.solve(a, b)
    x = torch.zeros(n, dtype=torch.float64, requires_grad=True)
    opt = LBFGS(
        [x], lr=1.0, history_size=n, max_iter=n + 1, wolfe_c2=1e-3,
        tolerance_grad=1e-14, tolerance_change=0.0,
    )  # fmt: skip

    def closure() -> torch.Tensor:
        opt.zero_grad()
        f = 0.5 * x @ a @ x - b @ x
        f.backward()
        return f

    opt.step(closure)
    iterations = opt.state[x]["n_iter"]
    err = float((x.detach() - x_star).norm() / x_star.norm())
    assert iterations <= n + 1
    assert err <= 1e-10, (iterations, err)


def test_fem_energy_reaches_reference_solution():
    """Minimise J_h over the free nodes directly; compare with the assembled AMG-CG solution."""
    n = 9
    coeffs = kl.sample_coefficients(1, 4, seed=3)
    nu = kl.diffusivity(coeffs, n, dim=2)
    u_ref = reference.solve(nu, 1.0, rtol=1e-12)
    w = torch.zeros_like(nu, requires_grad=True)
    opt = LBFGS(
        [w], lr=1.0, history_size=20, max_iter=300, tolerance_grad=1e-13, tolerance_change=0.0
    )

    def closure() -> torch.Tensor:
        opt.zero_grad()
        j = fem.energy(fem.apply_dirichlet(w), nu, 1.0).sum()
        j.backward()
        return j

    opt.step(closure)
    u = fem.apply_dirichlet(w.detach())
    rel = float((u - u_ref).norm() / u_ref.norm())
    # L-BFGS stops on the gradient (1e-13, max-norm), not on the error: the iterate it stops at
    # depends on the CPU's float64 reduction order (1.3e-8 on an AMX Xeon, < 1e-8 on Zen 4/5);
    # 1e-7 is still ~1e5 below the discretisation error of n = 9.
    assert rel < 1e-7, rel


# ---- through a real DeepSpeed engine -------------------------------------------------------

STEPS, BATCH, GAS = 3, 8, 2


def _problem() -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 6), torch.nn.Tanh(), torch.nn.Linear(6, 1))
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(BATCH, 3, generator=gen)
    return model, x, torch.sin(x.sum(1, keepdim=True))


def _flat(model: torch.nn.Module) -> list[float]:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()]).tolist()


def _engine_runs(setups: list[tuple[int, bool]]) -> dict:
    """Rank body: STEPS L-BFGS steps per (ZeRO stage, optimizer offload); iterates, losses and
    step counters."""
    import deepspeed

    from pdeds import distributed
    from pdeds.dsutil import skip_shm_comm_build
    from pdeds.optim import (
        LBFGSConfig,
        OptimConfig,
        build_optimizer,
        engine_step,
        needs_engine_step,
        prepare_ds_config,
    )

    skip_shm_comm_build()
    world, rank = distributed.world_size(), distributed.rank()
    out = {}
    for stage, offload in setups:
        model, x, y = _problem()
        ds = {
            "train_batch_size": BATCH,
            "gradient_accumulation_steps": GAS,
            "train_micro_batch_size_per_gpu": BATCH // (world * GAS),
            "zero_optimization": {"stage": stage},
        }
        if offload:
            ds["zero_optimization"]["offload_optimizer"] = {"device": "cpu"}
        cfg = OptimConfig(name="lbfgs", lr=1.0, lbfgs=LBFGSConfig(history_size=5, max_iter=2))
        ds = prepare_ds_config(cfg, ds)
        opt = build_optimizer(model, cfg, ds)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: 1.0)
        engine, *_ = deepspeed.initialize(model=model, optimizer=opt, lr_scheduler=sched, config=ds)
        assert needs_engine_step(engine)
        per = BATCH // world
        xs, ys = x[rank * per : (rank + 1) * per], y[rank * per : (rank + 1) * per]
        m = per // GAS
        mbs = [(xs[i * m : (i + 1) * m], ys[i * m : (i + 1) * m]) for i in range(GAS)]

        def loss_fn(mb, engine=engine):
            return ((engine(mb[0]) - mb[1]) ** 2).mean()

        runs = [(engine_step(engine, mbs, loss_fn), _flat(engine.module)) for _ in range(STEPS)]
        out[(stage, offload)] = {
            "runs": runs,
            "global_steps": engine.global_steps,
            "scheduler_steps": sched.last_epoch,
        }
    return out


def _standalone() -> list[tuple[float, list[float]]]:
    model, x, y = _problem()
    opt = LBFGS(model.parameters(), lr=1.0, history_size=5, max_iter=2)

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = ((model(x) - y) ** 2).mean()
        loss.backward()
        return loss

    return [(float(opt.step(closure)), _flat(model)) for _ in range(STEPS)]


def test_engine_iterates_match_one_rank_under_zero_0_1_2():
    """1 and 2 gloo ranks, 2 accumulation steps: the same iterates as full-batch L-BFGS."""
    setups = [(0, False), (1, False), (2, False), (2, True)]
    truth = _standalone()
    one = run_ranks(_engine_runs, 1, setups, timeout=120)[0]
    two = run_ranks(_engine_runs, 2, setups, timeout=120)
    for setup in setups:
        for res in (one[setup], two[0][setup]):
            assert res["global_steps"] == STEPS and res["scheduler_steps"] == STEPS
            for (loss, theta), (loss_t, theta_t) in zip(res["runs"], truth, strict=True):
                assert loss == pytest.approx(loss_t, rel=1e-5)
                np.testing.assert_allclose(theta, theta_t, rtol=1e-5, atol=1e-6)
        # The two ranks hold bitwise the same iterates: every decision used reduced scalars.
        assert two[0][setup]["runs"] == two[1][setup]["runs"]
