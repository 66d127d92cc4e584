"""The geometric multigrid preconditioner of the reference solve (pdeds.physics.gmg).

Truths: the transpose identity <P x, y> = <x, R y> computed directly; linear fields, which
linear interpolation reproduces exactly; the symmetry and positivity a CG preconditioner needs;
the AMG reference solve (METHOD.md sec. 4: agreement to 1e-8); and Jacobi-CG's iteration count,
which grows like n while the V-cycle's stays flat.
"""

from __future__ import annotations

import pytest
import torch

from pdeds.physics import fem, gmg, kl, reference


def _kl_nu(n: int | tuple[int, ...], dim: int, batch: int = 2, seed: int = 0) -> torch.Tensor:
    coeffs = torch.from_numpy(kl.sample_coefficients(batch, 6, seed=seed))
    if isinstance(n, int):
        return kl.diffusivity(coeffs, n, dim=dim)
    cube = kl.diffusivity(coeffs, max(n), dim=dim)
    return gmg.prolong_to(cube, n)


@pytest.mark.parametrize(
    ("fine", "coarse"), [((16, 12), (9, 7)), ((17, 9), (9, 5)), ((8, 10, 12), (5, 6, 7))]
)
def test_restriction_is_the_transpose_of_prolongation(fine, coarse):
    axes = [gmg._Axis.build(n, m, torch.float64, torch.device("cpu")) for n, m in zip(fine, coarse)]
    g = torch.Generator().manual_seed(0)
    x = torch.randn((2, 1, *coarse), generator=g, dtype=torch.float64)
    y = torch.randn((2, 1, *fine), generator=g, dtype=torch.float64)
    px, ry = gmg.prolong(x, axes), gmg.restrict(y, axes)
    assert px.shape == y.shape and ry.shape == x.shape
    torch.testing.assert_close((px * y).sum(), (x * ry).sum(), rtol=1e-13, atol=0)


def test_prolongation_reproduces_linear_fields_and_nested_nodes():
    coarse, fine = (9, 5, 7), (16, 9, 13)  # axis 0 does not nest (15 intervals), 1 and 2 do

    def linear(shape):
        axes = [torch.linspace(0, 1, n, dtype=torch.float64) for n in shape]
        x = torch.meshgrid(*axes, indexing="ij")
        return (0.3 + 2 * x[0] - x[1] + 0.5 * x[2])[None, None]

    out = gmg.prolong_to(linear(coarse), fine)
    torch.testing.assert_close(out, linear(fine), rtol=0, atol=1e-14)
    v = torch.randn((1, 1, 17, 9), dtype=torch.float64)
    torch.testing.assert_close(gmg.prolong_to(v, (9, 5)), v[..., ::2, ::2], rtol=0, atol=0)
    assert [gmg.coarse_size(n) for n in (64, 33, 17, 9, 16)] == [33, 17, 9, 5, 9]


@pytest.mark.parametrize(("shape", "dim"), [((40,), 2), ((20, 12, 16), 3)])
def test_vcycle_is_symmetric_positive_definite(shape, dim):
    shape = shape * dim if len(shape) == 1 else shape
    nu = _kl_nu(shape, dim)
    m = gmg.VCycle(nu, dtype=torch.float64)
    assert len(m.levels) >= 3 and max(m.levels[-1].nu.shape[2:]) <= gmg.COARSEST
    mask = fem.dirichlet_mask(shape, dtype=torch.float64, device="cpu")
    g = torch.Generator().manual_seed(1)
    r1, r2 = (torch.randn((2, 1, *shape), generator=g, dtype=torch.float64) * mask for _ in "ab")
    red = tuple(range(1, nu.ndim))
    torch.testing.assert_close((m(r1) * r2).sum(red), (r1 * m(r2)).sum(red), rtol=1e-11, atol=0)
    assert bool(((m(r1) * r1).sum(red) > 0).all())
    assert bool((m(r1) * (1 - mask) == 0).all())  # Dirichlet nodes stay untouched
    # The default float32 V-cycle (what CG uses) is the same operator to float32 round-off.
    m32 = gmg.VCycle(nu)
    assert m32(r1).dtype == torch.float64
    torch.testing.assert_close(m32(r1), m(r1), rtol=1e-4, atol=1e-5 * m(r1).abs().max().item())


def test_gmg_iterations_stay_flat_where_jacobi_grows():
    its = {}
    for n in (32, 64, 128, 256):
        _, stats = reference.solve_with_stats(_kl_nu(n, 2), method="gmg")
        its[n] = max(s["iterations"] for s in stats)
    assert max(its.values()) <= 20 and max(its.values()) - min(its.values()) <= 4, its
    _, jac = reference.solve_with_stats(_kl_nu(128, 2), method="matrix_free")
    assert min(s["iterations"] for s in jac) > 8 * its[128]


@pytest.mark.parametrize(("n", "dim"), [(64, 2), ((40, 24), 2), (24, 3), ((16, 24, 20), 3)])
@pytest.mark.parametrize("f", [0.0, 1.5])
def test_gmg_agrees_with_amg(n, dim, f):
    nu = _kl_nu(n, dim)
    u_amg, _ = reference.solve_with_stats(nu, f, method="amg")
    u_gmg, stats = reference.solve_with_stats(nu, f, method="gmg")
    assert all(s["residual"] <= 1e-10 for s in stats)
    assert float((u_gmg - u_amg).abs().max()) < 1e-8


def test_every_layer_offers_the_same_methods_and_eval_can_use_gmg():
    from pdeds.cli import data
    from pdeds.config import REFERENCE_METHODS, resolve
    from pdeds.errors import PdedsError
    from pdeds.study import memory

    assert data.METHODS == REFERENCE_METHODS == reference.METHODS
    assert set(reference.BYTES_PER_UNKNOWN) == set(reference.METHODS)
    cfg = resolve("launch/configs/quickstart.yaml", ["train.reference=gmg"]).cfg
    assert memory.reference_bytes(cfg) == 384.0 * 30 * 32**2
    with pytest.raises(PdedsError, match="train.reference: 'pyamg' is not one of amg, gmg"):
        resolve("launch/configs/quickstart.yaml", ["train.reference=pyamg"])


def test_held_out_references_by_gmg_equal_amg(tmp_path):
    from pdeds.config import resolve
    from pdeds.train.evaluate import load_held_out

    sets = {
        m: load_held_out(
            resolve(
                "launch/configs/quickstart.yaml",
                ["problem.res=16", "data.val_samples=2", f"train.reference={m}"],
            ).cfg,
            16,
            tmp_path / m,
        )
        for m in ("amg", "gmg")
    }
    assert float((sets["amg"].u_ref - sets["gmg"].u_ref).abs().max()) < 1e-8


def test_solves_that_cannot_fit_are_refused_before_anything_is_written(tmp_path, monkeypatch):
    """pdeds solve / data and the trainer's start-up check compare the reference solve's memory
    (reference.solve_memory) with what the machine has, and name the way out."""
    from pdeds import machine as hardware
    from pdeds.cli import main

    monkeypatch.setattr(hardware, "available_memory_gib", lambda: 0.03)  # 27.6 MiB usable
    out = tmp_path / "ref.h5"
    args = ["solve", "--seed", "0", "--samples", "1", "--dim", "3", "--out", str(out)]
    # amg at 33^3: 2 KiB x 31 x 33^2 = 66 MiB; gmg: 12.4 MiB.
    assert main([*args, "--res", "33"]) == 2
    assert not out.exists() and not list(tmp_path.iterdir())
    assert main([*args, "--res", "33", "--method", "gmg"]) == 0 and out.is_file()
    assert reference.memory_problem((33, 33, 33), "gmg", 0.03 * 2**30) is None
    why = reference.memory_problem((33, 33, 33), "amg", 0.03 * 2**30)
    assert "amg reference solve at 33x33x33 needs ~0.1 GiB" in why and "gmg needs" in why

    run = tmp_path / "run"
    check = ["train", "launch/configs/quickstart.yaml", "--run-dir", str(run), "--check-only"]
    assert main(check) == 2  # eval at 32^3 with amg: 60 MiB
    assert not run.exists()
    assert main([*check, "--set", "train.reference=gmg"]) == 0
