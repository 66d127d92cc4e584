"""Karhunen-Loeve diffusivity family (METHOD.md sec. 2).

1-D exponential covariance C(s, t) = exp(-|s - t| / eta) on [0, 1] has eigenpairs

    omega_i : i-th positive root of (eta^2 w^2 - 1) sin w = 2 eta w cos w
    lambda_i = 2 eta / (1 + eta^2 omega_i^2)
    phi_i(s) = eta omega_i cos(omega_i s) + sin(omega_i s)      (unnormalised, as published)

and a coefficient vector a in [-3, 3]^m gives

    nu(x) = exp( sum_t a_t sqrt(lambda_i lambda_j lambda_k) phi_i(x1) phi_j(x2) phi_k(x3) )

over m multi-indices (i, j, k): (i, i, i) for the "diagonal" family of the published work,
the m largest products lambda_i lambda_j lambda_k for the "tensor" family. nu is closed-form
in (a, x), so one sample can be evaluated at any resolution.
"""

from __future__ import annotations

import heapq
import math

import numpy as np
import torch
from scipy.optimize import brentq

from pdeds.errors import PdedsError

FAMILIES = ("diagonal", "tensor")
COEFF_RANGE = 3.0


def check_eta(eta: float) -> None:
    """Reject a correlation length that is not a positive finite number."""
    if not (isinstance(eta, (int, float)) and math.isfinite(eta) and eta > 0):
        raise PdedsError(f"eta must be a positive number (correlation length), got {eta!r}")


def check_modes(m: int) -> None:
    """Reject a mode count below 1."""
    if not isinstance(m, (int, np.integer)) or isinstance(m, bool) or m < 1:
        raise PdedsError(f"the number of KL modes must be an integer >= 1, got {m!r}")


def kl_roots(eta: float, m: int) -> np.ndarray:
    """First m positive roots omega_i of (eta^2 w^2 - 1) sin w - 2 eta w cos w = 0.

    The i-th root lies in ((i-1) pi, i pi): at w = k pi (k >= 1) the left side is
    -2 eta k pi (-1)^k, which alternates in sign, and near 0+ it is -(1 + 2 eta) w < 0.
    Each root is found by Brent's method to machine precision, then one Newton step.
    """
    check_eta(eta)
    check_modes(m)

    def g(w: float) -> float:
        return (eta * eta * w * w - 1.0) * math.sin(w) - 2.0 * eta * w * math.cos(w)

    def dg(w: float) -> float:
        return (
            2.0 * eta * eta * w * math.sin(w)
            + (eta * eta * w * w - 1.0) * math.cos(w)
            - 2.0 * eta * math.cos(w)
            + 2.0 * eta * w * math.sin(w)
        )

    roots = np.empty(m)
    for i in range(m):
        lo = i * math.pi if i > 0 else 1e-9
        hi = (i + 1) * math.pi
        w = brentq(g, lo, hi, xtol=1e-15, rtol=4 * np.finfo(float).eps, maxiter=200)
        d = dg(w)
        if d != 0.0:
            step = g(w) / d
            if abs(step) < 1e-12 * max(1.0, w):
                w -= step
        roots[i] = w
    return roots


def kl_eigenvalues(eta: float, omegas: np.ndarray) -> np.ndarray:
    """lambda_i = 2 eta / (1 + eta^2 omega_i^2) (sigma = 1)."""
    return 2.0 * eta / (1.0 + eta * eta * omegas * omegas)


def multi_indices(m: int, dim: int, family: str, eta: float) -> list[tuple[int, ...]]:
    """The m multi-indices of a family, in the order their coefficients are stored.

    "diagonal": (i, i[, i]) for i < m. "tensor": the m tuples with the largest product of
    1-D eigenvalues, found best-first from (0, ..., 0); ties break by the index tuple, and
    the product is formed from sorted factors so permutations tie exactly.
    """
    if family not in FAMILIES:
        raise PdedsError(f"unknown KL family {family!r}; choose one of {', '.join(FAMILIES)}")
    check_modes(m)
    if family == "diagonal":
        return [(i,) * dim for i in range(m)]
    lam = kl_eigenvalues(eta, kl_roots(eta, m))

    def weight(idx: tuple[int, ...]) -> float:
        return math.prod(sorted(lam[i] for i in idx))

    start = (0,) * dim
    heap = [(-weight(start), start)]
    seen = {start}
    out: list[tuple[int, ...]] = []
    while len(out) < m:
        _, idx = heapq.heappop(heap)
        out.append(idx)
        for a in range(dim):
            nxt = idx[:a] + (idx[a] + 1,) + idx[a + 1 :]
            if nxt[a] < m and nxt not in seen:
                seen.add(nxt)
                heapq.heappush(heap, (-weight(nxt), nxt))
    return out


def _as_coeffs(coeffs: torch.Tensor | np.ndarray) -> torch.Tensor:
    if isinstance(coeffs, np.ndarray):
        coeffs = torch.from_numpy(coeffs)
    if not isinstance(coeffs, torch.Tensor) or coeffs.ndim != 2:
        raise PdedsError(
            f"KL coefficients must be a (batch, modes) array, got shape {tuple(coeffs.shape)}"
        )
    if not torch.isfinite(coeffs).all():
        raise PdedsError("KL coefficients contain NaN or inf; regenerate or clean the input")
    return coeffs


def diffusivity(
    coeffs: torch.Tensor | np.ndarray,
    n: int,
    *,
    dim: int = 3,
    eta: float = 0.5,
    family: str = "diagonal",
) -> torch.Tensor:
    """nu(x) on the nodal grid linspace(0, 1, n)^dim for each coefficient row.

    Args:
        coeffs: (B, m) coefficients a; a numpy array is taken as float64.
        n: nodes per axis (>= 2).
        dim: 2 or 3.
        eta: correlation length of the covariance.
        family: "diagonal" or "tensor".

    Returns:
        nu of shape (B, 1, n, n[, n]) in coeffs' dtype and device. The sum is formed in
        float64 node by node with the same operations at every n, so grids that share
        nodes (n and 2n - 1) give the same values there.
    """
    coeffs = _as_coeffs(coeffs)
    check_eta(eta)
    if dim not in (2, 3):
        raise PdedsError(f"dim must be 2 or 3, got {dim!r}")
    if not isinstance(n, (int, np.integer)) or n < 2:
        raise PdedsError(f"resolution must be an integer >= 2 nodes per axis, got {n!r}")
    m = coeffs.shape[1]
    idx = multi_indices(m, dim, family, eta)
    n1d = max(max(t) for t in idx) + 1
    omega = kl_roots(eta, n1d)
    lam = kl_eigenvalues(eta, omega)
    dev = coeffs.device
    x = torch.arange(n, dtype=torch.float64, device=dev) / (n - 1)
    om = torch.as_tensor(omega, dtype=torch.float64, device=dev)[:, None]
    phi = eta * om * torch.cos(om * x) + torch.sin(om * x)  # (n1d, n)
    a = coeffs.to(torch.float64)
    log_nu = torch.zeros((a.shape[0],) + (n,) * dim, dtype=torch.float64, device=dev)
    for t, ijk in enumerate(idx):
        scale = math.sqrt(math.prod(lam[i] for i in ijk))
        if dim == 2:
            mode = phi[ijk[0]][:, None] * phi[ijk[1]][None, :]
        else:
            mode = (phi[ijk[0]][:, None, None] * phi[ijk[1]][None, :, None]) * phi[ijk[2]][
                None, None, :
            ]
        log_nu += (a[:, t] * scale).view((-1,) + (1,) * dim) * mode
    return torch.exp(log_nu).unsqueeze(1).to(coeffs.dtype)


def sample_coefficients(samples: int, modes: int, seed: int, *, sobol: bool = False) -> np.ndarray:
    """Draw coefficient vectors from U([-3, 3]^modes): (samples, modes) float64.

    ``sobol=True`` uses a scrambled Sobol sequence (torch's SobolEngine) seeded by ``seed``;
    otherwise numpy's PCG64 generator. The same (samples, modes, seed, sobol) always gives
    the same array, and a longer draw extends a shorter one.
    """
    check_modes(modes)
    if not isinstance(samples, (int, np.integer)) or samples < 1:
        raise PdedsError(f"the number of samples must be an integer >= 1, got {samples!r}")
    if sobol:
        engine = torch.quasirandom.SobolEngine(modes, scramble=True, seed=int(seed))
        unit = engine.draw(samples, dtype=torch.float64).numpy()
    else:
        unit = np.random.default_rng(int(seed)).random((samples, modes))
    return (2.0 * unit - 1.0) * COEFF_RANGE
