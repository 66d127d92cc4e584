"""Reference solver and metrics (METHOD.md sec. 3-4) against independent truths.

Truths: the element-loop assembly of tests/test_fem.py; the exact minimiser of ``energy``
over the free nodes, found here by building the free-node Hessian column by column from the
affine autograd gradient (grad J(g + e_j) - grad J(g) = K e_j) and a dense direct solve; and
the quadratic identity J(U* + d) - J(U*) = 1/2 d^T K d for d vanishing on the Dirichlet faces.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_fem import assemble_q1

from pdeds.errors import PdedsError
from pdeds.physics import fem, kl, metrics, reference


def _kl_nu(shape_n: int, dim: int, batch: int, seed: int) -> torch.Tensor:
    coeffs = torch.from_numpy(kl.sample_coefficients(batch, 6, seed=seed))
    return kl.diffusivity(coeffs, shape_n, dim=dim)


def _random_nu(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.exp(torch.randn((1, 1) + shape, generator=gen, dtype=torch.float64))


def minimise_energy_directly(nu: torch.Tensor, f: float | torch.Tensor) -> torch.Tensor:
    """argmin of fem.energy over nodal U with U = 1 / 0 on the x1 faces, for one sample.

    J is quadratic, so its gradient is affine; the free-free Hessian has columns
    grad J(g + e_j) - grad J(g) (one batched backward), and the minimiser is
    U = g + x with H x = -grad J(g) restricted to the free nodes.
    """
    shape = tuple(nu.shape[2:])
    g = fem.lifting(shape, dtype=torch.float64, device="cpu").expand(nu.shape).contiguous()
    free = fem.dirichlet_mask(shape, dtype=torch.float64, device="cpu").expand(nu.shape)
    free_idx = torch.nonzero(free.flatten() > 0).flatten()
    nfree = free_idx.numel()
    probes = g.repeat((nfree + 1,) + (1,) * (nu.ndim - 1))
    probes.view(nfree + 1, -1)[torch.arange(1, nfree + 1), free_idx] += 1.0
    probes.requires_grad_(True)
    f_batch = f.expand_as(probes) if isinstance(f, torch.Tensor) else f
    (grads,) = torch.autograd.grad(fem.energy(probes, nu.expand_as(probes), f_batch).sum(), probes)
    grads = grads.view(nfree + 1, -1)[:, free_idx].numpy()
    hessian = grads[1:] - grads[0]  # row j = K e_j on the free nodes (K symmetric)
    x = np.linalg.solve(hessian, -grads[0])
    u = g.clone()
    u.view(-1)[free_idx] += torch.from_numpy(x)
    return u


# ---------------------------------------------------------------- assembly


@pytest.mark.parametrize("shape", [(5, 3), (4, 7), (3, 4, 5), (5, 3, 4)])
def test_assembled_matrix_matches_element_loop(shape: tuple[int, ...]) -> None:
    nu = _random_nu(shape, seed=0)[0, 0].numpy()
    f = np.random.default_rng(1).standard_normal(shape)
    K_test, F_test, _ = assemble_q1(nu, f)
    K, F = reference.assemble(nu, f)
    assert K.shape == K_test.shape
    np.testing.assert_allclose(K.toarray(), K_test, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(F, F_test, rtol=1e-12, atol=1e-14)
    _, F_const = reference.assemble(nu, 2.5)
    np.testing.assert_allclose(F_const, assemble_q1(nu, 2.5)[1], rtol=1e-12, atol=1e-15)
    assert np.all(reference.assemble(nu)[1] == 0.0)


# ---------------------------------------------------------------- solutions


@pytest.mark.parametrize("shape", [(7, 5), (6, 9), (5, 4, 6), (6, 5, 4), (24, 18), (12, 10, 11)])
@pytest.mark.parametrize("source", ["zero", "field"])
@pytest.mark.parametrize("method", reference.METHODS)
def test_solve_is_the_energy_minimiser(shape: tuple[int, ...], source: str, method: str) -> None:
    nu = _random_nu(shape, seed=2)
    f = 0.0 if source == "zero" else 3.0 * _random_nu(shape, seed=3) - 3.0
    want = minimise_energy_directly(nu, f)
    got = reference.solve(nu, f, method=method)
    assert got.shape == nu.shape and got.dtype == torch.float64
    torch.testing.assert_close(got, want, rtol=0, atol=1e-8 * want.abs().max().item())
    assert torch.all(got[:, :, 0] == 1.0) and torch.all(got[:, :, -1] == 0.0)


@pytest.mark.parametrize(("n", "dim"), [(17, 2), (33, 2), (9, 3), (13, 3)])
@pytest.mark.parametrize("f", [0.0, 1.5])
def test_amg_and_matrix_free_agree_on_kl_fields(n: int, dim: int, f: float) -> None:
    nu = _kl_nu(n, dim, batch=3, seed=7)
    amg, amg_stats = reference.solve_with_stats(nu, f, method="amg")
    mf, mf_stats = reference.solve_with_stats(nu, f, method="matrix_free")
    scale = amg.flatten(1).abs().max(dim=1).values.view(-1, *(1,) * (dim + 1))
    assert ((amg - mf).abs() / scale).max().item() < 1e-8
    for stats in (amg_stats, mf_stats):
        assert len(stats) == 3
        for s in stats:
            assert set(s) >= {"assembly_s", "setup_s", "solve_s", "iterations", "residual"}
            assert s["residual"] <= 1e-10 and s["iterations"] >= 1


def test_solution_is_stationary_and_discrete_maximum_principle() -> None:
    """K U = F on the free nodes; with f = 0 a Q1 solution on these grids stays in [0, 1]."""
    nu = _kl_nu(11, 3, batch=2, seed=3)
    u = reference.solve(nu)
    u_req = u.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(fem.energy(u_req, nu).sum(), u_req)
    scale = fem.stiffness_diagonal(nu).max().item()
    assert grad[:, :, 1:-1].abs().max().item() < 1e-8 * scale
    assert u.min().item() > -1e-12 and u.max().item() < 1 + 1e-12


def test_dtype_and_device_follow_nu() -> None:
    nu = _kl_nu(9, 2, batch=2, seed=1).float()
    for method in reference.METHODS:
        u = reference.solve(nu, method=method, rtol=1e-10)
        assert u.dtype == torch.float32 and u.shape == nu.shape


def test_bad_method_and_shape() -> None:
    nu = _kl_nu(5, 2, batch=1, seed=0)
    with pytest.raises((ValueError, PdedsError), match="method"):
        reference.solve(nu, method="direct")
    with pytest.raises((ValueError, PdedsError), match="batch, 1"):
        reference.solve(nu[:, 0])


# ---------------------------------------------------------------- metrics


def test_rel_l2_hand_computed() -> None:
    ref = torch.full((2, 1, 4, 4), 2.0, dtype=torch.float64)  # ||ref|| = sqrt(16 * 4) = 8
    u = ref.clone()
    u[0, 0, 1, 2] += 0.5
    u[1, 0, 1:3, 1:3] -= 3.0  # ||d|| = sqrt(4 * 9) = 6
    torch.testing.assert_close(
        metrics.rel_l2(u, ref), torch.tensor([0.0625, 0.75], dtype=torch.float64)
    )
    assert metrics.rel_l2(ref, ref).abs().max().item() == 0.0
    assert metrics.rel_l2(u.float(), ref).dtype == torch.float64


@pytest.mark.parametrize("shape", [(7, 6), (5, 4, 6)])
def test_energy_gap_hand_computed(shape: tuple[int, ...]) -> None:
    """gap = 1/2 d^T K d / |J(U*)| for a perturbation d that is zero on the Dirichlet faces."""
    nu = _random_nu(shape, seed=5)
    f = 0.7
    ref = reference.solve(nu, f)
    K, F, _ = assemble_q1(nu[0, 0].numpy(), f)
    U = ref[0, 0].numpy().ravel()
    j_ref = 0.5 * U @ K @ U - F @ U
    d = torch.zeros_like(ref)
    d[:, :, 1:-1] = torch.randn((1, 1, shape[0] - 2) + shape[1:], dtype=torch.float64)
    gap = metrics.energy_gap(ref + 0.1 * d, ref, nu, f)
    dn = 0.1 * d[0, 0].numpy().ravel()
    assert gap.shape == (1,)
    assert gap.item() == pytest.approx(0.5 * dn @ K @ dn / abs(j_ref), rel=1e-6)
    assert gap.item() > 0
    assert abs(metrics.energy_gap(ref, ref, nu, f).item()) == 0.0


def test_energy_gap_nonnegative_for_any_admissible_field() -> None:
    nu = _kl_nu(9, 2, batch=4, seed=2)
    ref = reference.solve(nu)
    gen = torch.Generator().manual_seed(0)
    for scale in (1e-6, 1e-2, 1.0):
        w = torch.randn(nu.shape, generator=gen, dtype=torch.float64) * scale
        mask = fem.dirichlet_mask(tuple(nu.shape[2:]), dtype=nu.dtype, device="cpu")
        u = ref + mask * w
        assert torch.all(metrics.energy_gap(u, ref, nu) >= -1e-12)
