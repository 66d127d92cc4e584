"""KL diffusivity family (METHOD.md sec. 2) against independent truths.

Truths used: the transcendental equation itself, the published roots for eta = 0.5, the
bracketing argument ((i-1) pi, i pi), the closed-form nu evaluated here with numpy, a brute
force over all index triples for the "tensor" family, and the stratification property of
scrambled Sobol points.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from pdeds.errors import PdedsError
from pdeds.physics import kl

PUBLISHED_ROOTS_ETA_HALF = (1.7207, 4.0575, 6.8512, 9.8264, 12.8746, 15.9573)


def _residual(eta: float, w: np.ndarray) -> np.ndarray:
    """|g(w)| / (size of g's terms) for g(w) = (eta^2 w^2 - 1) sin w - 2 eta w cos w."""
    g = (eta**2 * w**2 - 1.0) * np.sin(w) - 2.0 * eta * w * np.cos(w)
    scale = np.abs(eta**2 * w**2 - 1.0) + 2.0 * eta * w
    return np.abs(g) / scale


def _nu_numpy(coeffs: np.ndarray, n: int, dim: int, eta: float, idx: list) -> np.ndarray:
    """nu = exp(sum_t a_t sqrt(prod lambda) prod phi) straight from the formula, (B, n..)."""
    n1d = max(max(t) for t in idx) + 1
    w = kl.kl_roots(eta, n1d)
    lam = 2.0 * eta / (1.0 + eta**2 * w**2)
    x = np.linspace(0.0, 1.0, n)
    phi = eta * w[:, None] * np.cos(w[:, None] * x) + np.sin(w[:, None] * x)
    log_nu = np.zeros((coeffs.shape[0],) + (n,) * dim)
    for t, ijk in enumerate(idx):
        mode = phi[ijk[0]]
        for axis_mode in ijk[1:]:
            mode = np.multiply.outer(mode, phi[axis_mode])
        scale = math.sqrt(math.prod(lam[i] for i in ijk))
        log_nu += coeffs[:, t].reshape((-1,) + (1,) * dim) * scale * mode
    return np.exp(log_nu)


# ---------------------------------------------------------------- roots and eigenvalues


@pytest.mark.parametrize("eta", [0.1, 0.5, 1.0, 3.0])
def test_roots_solve_the_equation(eta: float) -> None:
    w = kl.kl_roots(eta, 50)
    assert w.shape == (50,) and w.dtype == np.float64
    assert np.max(_residual(eta, w)) < 1e-10


@pytest.mark.parametrize("eta", [0.1, 0.5, 1.0, 3.0])
def test_one_root_per_interval(eta: float) -> None:
    w = kl.kl_roots(eta, 50)
    i = np.arange(1, 51)
    assert np.all(w > (i - 1) * np.pi) and np.all(w < i * np.pi)
    assert np.all(np.diff(w) > 0)


def test_roots_for_a_shorter_request_are_a_prefix() -> None:
    np.testing.assert_array_equal(kl.kl_roots(0.7, 5), kl.kl_roots(0.7, 20)[:5])


def test_published_roots_eta_half() -> None:
    np.testing.assert_allclose(kl.kl_roots(0.5, 6), PUBLISHED_ROOTS_ETA_HALF, rtol=0, atol=1e-4)


def test_eigenvalues_formula_and_decay() -> None:
    w = kl.kl_roots(0.5, 10)
    lam = kl.kl_eigenvalues(0.5, w)
    np.testing.assert_allclose(lam, 1.0 / (1.0 + 0.25 * w**2), rtol=1e-15)
    assert np.all(np.diff(lam) < 0) and np.all(lam > 0)


def test_eigenpair_of_the_covariance_operator() -> None:
    """int_0^1 exp(-|s-t|/eta) phi(t) dt = lambda phi(s): the roots give true eigenpairs."""
    eta = 0.5
    w = kl.kl_roots(eta, 4)
    lam = kl.kl_eigenvalues(eta, w)
    t, wt = np.polynomial.legendre.leggauss(200)
    s_points = np.array([0.0, 0.3, 0.77, 1.0])
    for omega, lam_i in zip(w, lam, strict=True):

        def phi(x: np.ndarray, omega: float = omega) -> np.ndarray:
            return eta * omega * np.cos(omega * x) + np.sin(omega * x)

        for s in s_points:
            # split at s so each piece is smooth: Gauss-Legendre is then spectrally accurate
            total = 0.0
            for a, b in ((0.0, s), (s, 1.0)):
                if b > a:
                    x = 0.5 * (b - a) * t + 0.5 * (a + b)
                    total += 0.5 * (b - a) * np.sum(wt * np.exp(-np.abs(s - x) / eta) * phi(x))
            assert total == pytest.approx(lam_i * phi(np.array(s)), abs=1e-11)


# ---------------------------------------------------------------- the field


@pytest.mark.parametrize("family", ["diagonal", "tensor"])
@pytest.mark.parametrize("dim", [2, 3])
def test_diffusivity_matches_closed_form(family: str, dim: int) -> None:
    m, eta, n = 7, 0.6, 9
    coeffs = kl.sample_coefficients(3, m, seed=11)
    idx = kl.multi_indices(m, dim, family, eta)
    got = kl.diffusivity(torch.from_numpy(coeffs), n, dim=dim, eta=eta, family=family)
    want = _nu_numpy(coeffs, n, dim, eta, idx)
    np.testing.assert_allclose(got[:, 0].numpy(), want, rtol=1e-12)


@pytest.mark.parametrize("family", ["diagonal", "tensor"])
@pytest.mark.parametrize("dim", [2, 3])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_shared_nodes_agree_exactly(family: str, dim: int, dtype: torch.dtype) -> None:
    """Grids n and 2n-1 share every other node; nu must be bit-identical there."""
    sizes = [2, 3, 5, 8, 9, 17, 33] if dim == 2 else [2, 3, 5, 8, 9, 17]
    for m in (1, 6, 13):
        coeffs = torch.as_tensor(kl.sample_coefficients(2, m, seed=m), dtype=dtype)
        for n in sizes:
            coarse = kl.diffusivity(coeffs, n, dim=dim, family=family)
            fine = kl.diffusivity(coeffs, 2 * n - 1, dim=dim, family=family)
            every_other = (slice(None), slice(None)) + (slice(None, None, 2),) * dim
            assert torch.equal(coarse, fine[every_other]), (family, dim, m, n)


@pytest.mark.parametrize("dim", [2, 3])
def test_shape_dtype_device_contract(dim: int) -> None:
    for dtype in (torch.float64, torch.float32):
        c = torch.zeros(4, 6, dtype=dtype)
        nu = kl.diffusivity(c, 5, dim=dim)
        assert nu.shape == (4, 1) + (5,) * dim
        assert nu.dtype == dtype and nu.device == c.device
        assert torch.equal(nu, torch.ones_like(nu))  # a = 0 gives nu = exp(0) = 1
    from_numpy = kl.diffusivity(np.zeros((2, 3)), 4, dim=dim)
    assert from_numpy.dtype == torch.float64 and from_numpy.shape == (2, 1) + (4,) * dim


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_matches_cpu() -> None:
    coeffs = torch.from_numpy(kl.sample_coefficients(2, 6, seed=0))
    on_cpu = kl.diffusivity(coeffs, 9)
    on_gpu = kl.diffusivity(coeffs.cuda(), 9)
    assert on_gpu.device.type == "cuda" and on_gpu.dtype == torch.float64
    torch.testing.assert_close(on_gpu.cpu(), on_cpu, rtol=1e-13, atol=0)


def test_diffusivity_positive_and_batch_independent() -> None:
    coeffs = torch.from_numpy(kl.sample_coefficients(5, 6, seed=3))
    nu = kl.diffusivity(coeffs, 7)
    assert torch.all(nu > 0)
    for b in range(5):
        torch.testing.assert_close(
            kl.diffusivity(coeffs[b : b + 1], 7), nu[b : b + 1], rtol=0, atol=0
        )


@pytest.mark.parametrize("dim", [2, 3])
@pytest.mark.parametrize("eta", [0.5, 0.2])
def test_tensor_family_picks_largest_products(dim: int, eta: float) -> None:
    """Brute force: every multi-index with entries < m; any index >= m is dominated."""
    m = 40
    lam = kl.kl_eigenvalues(eta, kl.kl_roots(eta, m))
    chosen = kl.multi_indices(m, dim, "tensor", eta)
    assert len(chosen) == m == len(set(chosen))
    everything = {t: math.prod(lam[i] for i in t) for t in itertools.product(range(m), repeat=dim)}
    chosen_w = np.array([everything[t] for t in chosen])
    rest = np.array([w for t, w in everything.items() if t not in set(chosen)])
    assert chosen_w.min() >= rest.max() * (1 - 1e-12)
    want = np.sort(np.array(list(everything.values())))[::-1][:m]
    np.testing.assert_allclose(np.sort(chosen_w)[::-1], want, rtol=1e-12)
    assert np.all(np.diff(chosen_w) <= chosen_w[1:] * 1e-12)  # stored best-first
    assert chosen[0] == (0,) * dim


def test_diagonal_family_indices() -> None:
    assert kl.multi_indices(4, 3, "diagonal", 0.5) == [(i, i, i) for i in range(4)]
    assert kl.multi_indices(3, 2, "diagonal", 0.5) == [(i, i) for i in range(3)]


# ---------------------------------------------------------------- sampling


def test_sample_range_shape_reproducible() -> None:
    a = kl.sample_coefficients(500, 6, seed=4)
    assert a.shape == (500, 6) and a.dtype == np.float64
    assert a.min() >= -3.0 and a.max() <= 3.0
    assert a.min() < -2.9 and a.max() > 2.9  # covers the range
    np.testing.assert_array_equal(a, kl.sample_coefficients(500, 6, seed=4))
    np.testing.assert_array_equal(a[:100], kl.sample_coefficients(100, 6, seed=4))
    assert not np.array_equal(a, kl.sample_coefficients(500, 6, seed=5))
    assert abs(a.mean()) < 0.2 and a.std() == pytest.approx(math.sqrt(3.0), rel=0.05)


def test_sobol_is_stratified_and_reproducible() -> None:
    """First 2^k scrambled Sobol points put exactly one point in each 1-D cell of width 2^-k."""
    k, m = 7, 6
    a = kl.sample_coefficients(2**k, m, seed=2, sobol=True)
    assert a.shape == (2**k, m) and a.min() >= -3.0 and a.max() <= 3.0
    np.testing.assert_array_equal(a, kl.sample_coefficients(2**k, m, seed=2, sobol=True))
    np.testing.assert_array_equal(a[:32], kl.sample_coefficients(32, m, seed=2, sobol=True))
    assert not np.array_equal(a, kl.sample_coefficients(2**k, m, seed=3, sobol=True))
    assert not np.array_equal(a, kl.sample_coefficients(2**k, m, seed=2, sobol=False))
    cells = np.floor((a + 3.0) / 6.0 * 2**k).astype(int)
    for j in range(m):
        assert sorted(cells[:, j]) == list(range(2**k))
    # 2-D projections of the first 2^k points form a (t, m, 2)-net: every 2^-a x 2^-(k-a)
    # box of the first two coordinates holds the same count (t = 0 for dims 1, 2).
    unit = (a + 3.0) / 6.0
    for p in range(k + 1):
        box = np.floor(unit[:, 0] * 2**p).astype(int) * 2 ** (k - p) + np.floor(
            unit[:, 1] * 2 ** (k - p)
        ).astype(int)
        assert np.bincount(box, minlength=2**k).tolist() == [1] * 2**k


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize("eta", [0.0, -0.5, float("nan"), float("inf")])
def test_bad_eta(eta: float) -> None:
    with pytest.raises(PdedsError, match="eta"):
        kl.kl_roots(eta, 3)
    with pytest.raises(PdedsError, match="eta"):
        kl.diffusivity(torch.zeros(1, 3), 4, eta=eta)


@pytest.mark.parametrize("m", [0, -1])
def test_bad_modes(m: int) -> None:
    with pytest.raises(PdedsError, match="modes"):
        kl.kl_roots(0.5, m)
    with pytest.raises(PdedsError, match="modes"):
        kl.sample_coefficients(3, m, seed=0)
    with pytest.raises(PdedsError):
        kl.diffusivity(torch.zeros(1, 0), 4)


@pytest.mark.parametrize("n", [1, 0, -3])
def test_bad_resolution(n: int) -> None:
    with pytest.raises(PdedsError, match="resolution"):
        kl.diffusivity(torch.zeros(1, 3), n)


@pytest.mark.parametrize("dim", [1, 4])
def test_bad_dim(dim: int) -> None:
    with pytest.raises(PdedsError, match="dim"):
        kl.diffusivity(torch.zeros(1, 3), 4, dim=dim)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_coefficients(bad: float) -> None:
    c = torch.zeros(2, 3, dtype=torch.float64)
    c[1, 2] = bad
    with pytest.raises(PdedsError, match="NaN or inf"):
        kl.diffusivity(c, 4)


def test_bad_coefficient_shape_and_family() -> None:
    with pytest.raises(PdedsError, match="batch, modes"):
        kl.diffusivity(torch.zeros(3), 4)
    with pytest.raises(PdedsError, match="family"):
        kl.diffusivity(torch.zeros(1, 3), 4, family="full")


def test_bad_sample_count() -> None:
    with pytest.raises(PdedsError, match="samples"):
        kl.sample_coefficients(0, 3, seed=0)
