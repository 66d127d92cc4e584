"""Exact Q1 energy (METHOD.md sec. 3) against a stiffness matrix assembled in this file.

The truth is a plain element loop: Q1 basis functions on the reference element [-1, 1]^d,
N_a(xi) = prod_k (1 + xi_a,k xi_k) / 2, evaluated at the 2^d Gauss points xi_k = +-1/sqrt(3)
(weights 1), mapped to an element of size h_1 x .. x h_d by x = x_e + (xi + 1) h / 2, so
dN/dx_k = (2 / h_k) dN/dxi_k and |det J| = prod_k h_k / 2. nu and f are interpolated to the
Gauss points by the same basis. Nothing here calls the code under test.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from pdeds.errors import PdedsError
from pdeds.physics import fem

GAUSS_REF = (-1.0 / math.sqrt(3.0), 1.0 / math.sqrt(3.0))


def q1_reference_element(h: tuple[float, ...]) -> tuple[np.ndarray, np.ndarray, float]:
    """Basis values and physical gradients at the Gauss points of one element.

    Returns:
        N (Q, A): N_a at Gauss point q; G (Q, A, d): dN_a/dx_k at q; |det J|.
        Local node a is the corner offset tuple itertools.product((0, 1), repeat=d).
    """
    d = len(h)
    corners = np.array(list(itertools.product((0, 1), repeat=d)), dtype=float)
    xi_a = 2.0 * corners - 1.0  # (A, d) corner coordinates on [-1, 1]^d
    points = np.array(list(itertools.product(GAUSS_REF, repeat=d)))  # (Q, d)
    lin = (1.0 + xi_a[None, :, :] * points[:, None, :]) / 2.0  # (Q, A, d) 1-D factors
    N = lin.prod(axis=2)
    G = np.empty(points.shape[:1] + xi_a.shape)
    for k in range(d):
        others = np.prod(np.delete(lin, k, axis=2), axis=2)
        G[:, :, k] = (xi_a[None, :, k] / 2.0) * others * (2.0 / h[k])
    return N, G, math.prod(hk / 2.0 for hk in h)


def _elements(shape: tuple[int, ...]):
    """Yield the global flat indices of each element's 2^d nodes (local order as above)."""
    d = len(shape)
    corners = list(itertools.product((0, 1), repeat=d))
    for e in itertools.product(*(range(n - 1) for n in shape)):
        yield [np.ravel_multi_index(tuple(ei + ci for ei, ci in zip(e, c)), shape) for c in corners]


def assemble_q1(
    nu: np.ndarray, f: float | np.ndarray = 0.0
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Dense K, F and the mass matrix M for nodal nu (and f) of spatial shape (n_1, .., n_d).

    K_ab = sum_e sum_q |J| nu(q) grad N_a(q) . grad N_b(q),  F_a = sum_e sum_q |J| f(q) N_a(q),
    M_ab = sum_e sum_q |J| N_a(q) N_b(q). Dirichlet rows are kept (the full matrices).
    """
    shape = nu.shape
    h = tuple(1.0 / (n - 1) for n in shape)
    N, G, detj = q1_reference_element(h)
    size = nu.size
    K = np.zeros((size, size))
    M = np.zeros((size, size))
    F = np.zeros(size)
    nu_flat = nu.ravel()
    f_flat = np.broadcast_to(np.asarray(f, dtype=float), shape).ravel()
    for nodes in _elements(shape):
        for q in range(N.shape[0]):
            nu_q = N[q] @ nu_flat[nodes]
            f_q = N[q] @ f_flat[nodes]
            K[np.ix_(nodes, nodes)] += detj * nu_q * G[q] @ G[q].T
            M[np.ix_(nodes, nodes)] += detj * np.outer(N[q], N[q])
            F[nodes] += detj * f_q * N[q]
    return K, F, M


def _fields(shape: tuple[int, ...], batch: int = 2, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """Random U and a strongly varying positive nu, float64, (B, 1, *shape)."""
    gen = torch.Generator().manual_seed(seed)
    u = torch.randn((batch, 1) + shape, generator=gen, dtype=torch.float64)
    nu = torch.exp(1.5 * torch.randn((batch, 1) + shape, generator=gen, dtype=torch.float64))
    f = torch.randn((batch, 1) + shape, generator=gen, dtype=torch.float64)
    return u, nu, f


SHAPES = [(5, 3), (4, 7), (3, 4, 5), (4, 3, 3)]
LOADS = ["zero", "constant", "field"]


def _load(kind: str, f_field: torch.Tensor) -> float | torch.Tensor:
    return {"zero": 0.0, "constant": -1.7, "field": f_field}[kind]


def _load_np(kind: str, f_field: torch.Tensor, b: int) -> float | np.ndarray:
    return {"zero": 0.0, "constant": -1.7}[kind] if kind != "field" else f_field[b, 0].numpy()


# ---------------------------------------------------------------- the truth itself


def test_assembly_truth_sanity() -> None:
    """The test's own assembly: K 1 = 0, M sums to the volume, K(1 - x1) gives the flux nu."""
    shape = (4, 3, 5)
    K, F, M = assemble_q1(np.full(shape, 2.5), 1.0)
    assert np.allclose(K, K.T) and np.allclose(K @ np.ones(K.shape[0]), 0.0, atol=1e-12)
    assert M.sum() == pytest.approx(1.0) and F.sum() == pytest.approx(1.0)
    x1 = np.broadcast_to(np.linspace(0, 1, shape[0]).reshape(-1, 1, 1), shape).ravel()
    g = 1.0 - x1
    assert 0.5 * g @ K @ g == pytest.approx(0.5 * 2.5)  # 1/2 int nu |grad g|^2
    assert np.linalg.eigvalsh(K)[1] > 1e-8  # only constants in the kernel


# ---------------------------------------------------------------- energy and its gradient


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("load", LOADS)
def test_energy_equals_assembled_quadratic_form(shape: tuple[int, ...], load: str) -> None:
    u, nu, f_field = _fields(shape)
    got = fem.energy(u, nu, _load(load, f_field))
    assert got.shape == (2,) and got.dtype == torch.float64
    for b in range(2):
        K, F, _ = assemble_q1(nu[b, 0].numpy(), _load_np(load, f_field, b))
        U = u[b, 0].numpy().ravel()
        want = 0.5 * U @ K @ U - F @ U
        assert got[b].item() == pytest.approx(want, rel=1e-12, abs=1e-12)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("load", LOADS)
def test_gradients_are_KU_minus_F_and_half_UdKU(shape: tuple[int, ...], load: str) -> None:
    """dJ/dU = K U - F; dJ/dnu_c = 1/2 U^T (dK/dnu_c) U with K linear in nu."""
    u, nu, f_field = _fields(shape, seed=1)
    u.requires_grad_(True)
    nu.requires_grad_(True)
    weights = torch.tensor([0.7, -1.3], dtype=torch.float64)
    (fem.energy(u, nu, _load(load, f_field)) * weights).sum().backward()
    for b in range(2):
        nu_b = nu[b, 0].detach().numpy()
        K, F, _ = assemble_q1(nu_b, _load_np(load, f_field, b))
        U = u[b, 0].detach().numpy().ravel()
        np.testing.assert_allclose(
            u.grad[b, 0].numpy().ravel(), weights[b].item() * (K @ U - F), rtol=1e-11, atol=1e-11
        )
        dnu = np.empty(nu_b.size)
        for c in range(nu_b.size):
            unit = np.zeros(nu_b.size)
            unit[c] = 1.0
            Kc, _, _ = assemble_q1(unit.reshape(nu_b.shape))
            dnu[c] = 0.5 * U @ Kc @ U
        np.testing.assert_allclose(
            nu.grad[b, 0].numpy().ravel(), weights[b].item() * dnu, rtol=1e-11, atol=1e-11
        )


@pytest.mark.parametrize("shape", [(3, 4), (4, 3, 3)])
def test_gradcheck_u_nu_f(shape: tuple[int, ...]) -> None:
    u, nu, f = _fields(shape, seed=2)
    for t in (u, nu, f):
        t.requires_grad_(True)
    assert torch.autograd.gradcheck(fem.energy, (u, nu, f), eps=1e-6, atol=1e-7)
    assert torch.autograd.gradcheck(lambda a, b: fem.energy(a, b, 0.3), (u, nu))


def _root_matrix(nu: torch.Tensor) -> torch.Tensor:
    """R of ``fem.stiffness_root_apply`` column by column (unit blocks z)."""
    sizes: list[int] = []
    fem.stiffness_root_apply(lambda like: sizes.append(like.numel()) or torch.zeros_like(like), nu)
    cols = []
    for j in range(sum(sizes)):
        seen = [0]

        def unit(like: torch.Tensor, j: int = j, seen: list[int] = seen) -> torch.Tensor:
            z = torch.zeros(like.numel(), dtype=like.dtype)
            if seen[0] <= j < seen[0] + like.numel():
                z[j - seen[0]] = 1.0
            seen[0] += like.numel()
            return z.view(like.shape)

        cols.append(fem.stiffness_root_apply(unit, nu).reshape(-1))
    return torch.stack(cols, dim=1)


@pytest.mark.parametrize("shape", [(4, 5), (3, 4, 3)])
def test_stiffness_root_times_its_transpose_is_the_assembled_stiffness(shape) -> None:
    """R R^T = K (independent assembly), and a sample v = R z is drawn reproducibly: the
    curvature K-FAC's Gauss-Newton factors sample."""
    _, nu, _ = _fields(shape, seed=5)
    nu = nu[:1]
    R = _root_matrix(nu)
    K, _, _ = assemble_q1(nu[0, 0].numpy())
    np.testing.assert_allclose((R @ R.T).numpy(), K, rtol=1e-12, atol=1e-12)
    v1 = fem.stiffness_sample(nu, torch.Generator().manual_seed(7))
    v2 = fem.stiffness_sample(nu, torch.Generator().manual_seed(7))
    assert v1.shape == nu.shape and torch.equal(v1, v2)
    assert not torch.equal(v1, fem.stiffness_sample(nu, torch.Generator().manual_seed(8)))


@pytest.mark.parametrize("shape", SHAPES)
def test_stiffness_apply_and_diagonal(shape: tuple[int, ...]) -> None:
    u, nu, _ = _fields(shape, seed=3)
    ku = fem.stiffness_apply(u, nu)
    diag = fem.stiffness_diagonal(nu)
    assert ku.shape == u.shape and diag.shape == nu.shape
    for b in range(2):
        K, _, _ = assemble_q1(nu[b, 0].numpy())
        np.testing.assert_allclose(
            ku[b, 0].numpy().ravel(), K @ u[b, 0].numpy().ravel(), rtol=1e-12, atol=1e-12
        )
        np.testing.assert_allclose(diag[b, 0].numpy().ravel(), np.diag(K), rtol=1e-13)


@pytest.mark.parametrize("shape", SHAPES)
def test_mass_and_load_vector(shape: tuple[int, ...]) -> None:
    u, nu, f = _fields(shape, seed=4)
    _, _, M = assemble_q1(np.ones(shape))
    mv = fem.mass_apply(f)
    for b in range(2):
        np.testing.assert_allclose(
            mv[b, 0].numpy().ravel(), M @ f[b, 0].numpy().ravel(), rtol=1e-12, atol=1e-14
        )
    const = fem.load_vector(2.0, u)
    np.testing.assert_allclose(
        const[0, 0].numpy().ravel(), 2.0 * M.sum(axis=1), rtol=1e-12, atol=1e-15
    )
    assert fem.load_vector(0.0, u) is None


def test_energy_of_the_lifting_is_half_nu() -> None:
    """U = 1 - x1, constant nu = c, f = 0: J = 1/2 int c |grad U|^2 = c / 2 exactly."""
    for shape in [(6, 5), (5, 4, 3)]:
        g = fem.lifting(shape, dtype=torch.float64, device="cpu").expand((1, 1) + shape)
        nu = torch.full_like(g, 3.25)
        assert fem.energy(g.contiguous(), nu).item() == pytest.approx(3.25 / 2, rel=1e-14)
        ku = fem.stiffness_apply(g.contiguous(), nu)
        assert ku[:, :, 1:-1].abs().max().item() < 1e-12  # discrete harmonic inside


def test_batch_entries_are_independent() -> None:
    u, nu, f = _fields((4, 3, 5), batch=3, seed=5)
    whole = fem.energy(u, nu, f)
    for b in range(3):
        part = fem.energy(u[b : b + 1], nu[b : b + 1], f[b : b + 1])
        assert part.item() == pytest.approx(whole[b].item(), rel=1e-14)


def test_float32_in_float32_out() -> None:
    u, nu, f = _fields((5, 4, 6), seed=6)
    u32 = u.float().requires_grad_(True)
    j32 = fem.energy(u32, nu.float(), f.float())
    assert j32.dtype == torch.float32
    j32.sum().backward()
    assert u32.grad.dtype == torch.float32
    assert fem.stiffness_apply(u.float(), nu.float()).dtype == torch.float32
    assert fem.stiffness_diagonal(nu.float()).dtype == torch.float32
    assert fem.apply_dirichlet(u.float()).dtype == torch.float32
    torch.testing.assert_close(j32.double(), fem.energy(u, nu, f), rtol=1e-5, atol=1e-4)


# ---------------------------------------------------------------- Dirichlet lifting


@pytest.mark.parametrize("shape", [(5, 4), (4, 3, 6)])
def test_apply_dirichlet_exact(shape: tuple[int, ...]) -> None:
    w = torch.randn((3, 1) + shape, dtype=torch.float64) * 100.0
    u = fem.apply_dirichlet(w)
    assert u.shape == w.shape
    assert torch.all(u[:, :, 0] == 1.0) and torch.all(u[:, :, -1] == 0.0)
    x1 = torch.linspace(0, 1, shape[0], dtype=torch.float64)
    g = (1.0 - x1).view((1, 1, shape[0]) + (1,) * (len(shape) - 1))
    torch.testing.assert_close(u[:, :, 1:-1], (g + w)[:, :, 1:-1], rtol=0, atol=1e-13)
    mask = fem.dirichlet_mask(shape, dtype=torch.float64, device="cpu")
    assert mask.flatten().tolist() == [0.0] + [1.0] * (shape[0] - 2) + [0.0]


# ---------------------------------------------------------------- bad input


BAD_SHAPES = [
    ((2, 4, 4), (2, 4, 4)),  # no channel axis
    ((2, 2, 4, 4), (2, 2, 4, 4)),  # two channels
    ((2, 1, 4, 4), (2, 1, 4, 5)),  # nu differs from u
    ((2, 1, 4, 1), (2, 1, 4, 1)),  # a one-node axis
    ((1, 1, 3, 3, 3, 3), (1, 1, 3, 3, 3, 3)),  # 4-D
]


@pytest.mark.parametrize(("u_shape", "nu_shape"), BAD_SHAPES)
def test_bad_shapes_raise(u_shape: tuple[int, ...], nu_shape: tuple[int, ...]) -> None:
    u, nu = torch.zeros(u_shape), torch.ones(nu_shape)
    with pytest.raises((PdedsError, ValueError)):
        fem.energy(u, nu)
    with pytest.raises((PdedsError, ValueError)):
        fem.stiffness_apply(u, nu)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_matches_cpu() -> None:
    u, nu, f = _fields((9, 8, 7), seed=7)
    u.requires_grad_(True)
    j = fem.energy(u, nu, f)
    j.sum().backward()
    uc = u.detach().cuda().requires_grad_(True)
    jc = fem.energy(uc, nu.cuda(), f.cuda())
    jc.sum().backward()
    assert jc.device.type == "cuda"
    torch.testing.assert_close(jc.cpu(), j, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(uc.grad.cpu(), u.grad, rtol=1e-12, atol=1e-12)
