"""Reference FEM solutions of the discrete problem (METHOD.md sec. 4).

Three paths to the minimiser of J_h over nodal vectors with the Dirichlet values:

- ``"amg"``: assemble K and F (scipy.sparse, same 2-point Gauss rule as ``fem.energy``),
  eliminate the Dirichlet rows and solve K_ff U_f = F_f - K_fd U_d by conjugate gradients
  preconditioned with smoothed-aggregation algebraic multigrid (pyamg).
- ``"matrix_free"``: batched CG on the free nodes whose matrix-vector product is the autograd
  gradient of ``fem.energy`` at f = 0 (K x), Jacobi-preconditioned with ``stiffness_diagonal``.
  Nothing is assembled, so it runs on GPU and on grids too big to assemble.
- ``"gmg"``: the same CG preconditioned by a geometric multigrid V-cycle (``pdeds.physics.gmg``):
  matrix-free too, with an iteration count that stays nearly flat as the grid grows.

All stop at a relative residual ||r|| / ||b|| <= rtol and agree to ~rtol * cond(K).
"""

from __future__ import annotations

import itertools
import math
import time

import numpy as np
import scipy.sparse as sp
import torch

from pdeds.physics import fem, gmg

METHODS = ("amg", "gmg", "matrix_free")
BYTES_PER_UNKNOWN = {"amg": 2048.0, "gmg": 384.0, "matrix_free": 384.0}
"""Peak memory of one sample's solve per unknown, beyond the idle process (max RSS on CPU).
amg (assembled K, pyamg hierarchy): 64^3 (0.75 - 0.30) GB / 254k unknowns = 1.8 KB, 128^3
(4.2 - 0.3) GB / 2.06M = 1.9 KB. gmg (float64 CG around a float32 V-cycle): 128^3 (969 - ~300)
MiB / 2.06M = 0.34 KB, 256^3 (3.46 - 0.63) GiB / 16.6M = 0.18 KB. Jacobi-CG holds no more."""


def solve_memory(shape: tuple[int, ...], method: str) -> float:
    """Bytes one sample's solve needs on the grid ``shape`` (its free nodes x BYTES_PER_UNKNOWN)."""
    free = (shape[0] - 2) * math.prod(shape[1:])
    return BYTES_PER_UNKNOWN[method] * free


def memory_problem(
    shape: tuple[int, ...], method: str, available: float | None = None
) -> str | None:
    """Why one sample's solve would not fit in ``available`` bytes (90% of them), or None.

    ``available`` defaults to what is free where the method runs here: host memory for amg, the
    GPU for the matrix-free methods when there is one. The message names the need, what is
    available, and the way out."""
    if available is None:
        from pdeds.machine import available_bytes

        available = available_bytes(method != "amg" and torch.cuda.is_available())
    need = solve_memory(shape, method)
    if need <= 0.9 * available:
        return None
    grid = "x".join(map(str, shape))
    other = (
        ""
        if method != "amg"
        else (f"; the matrix-free gmg needs ~{solve_memory(shape, 'gmg') / 2**30:.1f} GiB")
    )
    return (
        f"the {method} reference solve at {grid} needs ~{need / 2**30:.1f} GiB per sample, "
        f"{available / 2**30:.1f} GiB is available{other}"
    )


def _corner_weights(h: np.ndarray) -> tuple[list[tuple[int, ...]], np.ndarray]:
    """W[c, a, b] = sum_q |J| phi_c(q) grad phi_a(q) . grad phi_b(q) on one element.

    With nu interpolated by the Q1 basis, the element matrix is K_e[a, b] = sum_c W[c, a, b]
    nu_{e + c}: linear in the 2^d corner values of nu. Corners are offsets in {0, 1}^d in
    itertools.product order; |J| = prod h / 2 with Gauss weights 1 on [-1, 1]^d.
    """
    d = len(h)
    corners = list(itertools.product((0, 1), repeat=d))
    w = np.zeros((len(corners),) * 3)
    jac = np.prod(h / 2.0)
    for q in itertools.product(fem.GAUSS, repeat=d):
        phi = np.array([np.prod([q[a] if c[a] else 1 - q[a] for a in range(d)]) for c in corners])
        grad = np.array(
            [
                [
                    np.prod(
                        [
                            ((1.0 if c[b] else -1.0) / h[b])
                            if b == a
                            else (q[b] if c[b] else 1 - q[b])
                            for b in range(d)
                        ]
                    )
                    for a in range(d)
                ]
                for c in corners
            ]
        )  # (2^d, d)
        w += jac * phi[:, None, None] * (grad @ grad.T)[None]
    return corners, w


def stencil(nu: np.ndarray) -> dict[tuple[int, ...], np.ndarray]:
    """The rows of K as a stencil: S[o][i] = K[i, i + o] for the 3^d offsets o in {-1, 0, 1}^d.

    K[i, i + o] = sum over elements e holding both nodes, i = e + a and i + o = e + b, of
    K_e[a, b]; each K_e[a, b] is a combination of shifted copies of nu, so no per-element
    matrix is ever stored (memory ~ 3^d fields instead of 4^d per element).
    """
    shape = nu.shape
    d = nu.ndim
    corners, w = _corner_weights(np.array([1.0 / (n - 1) for n in shape]))
    elems = tuple(n - 1 for n in shape)

    def at(c: tuple[int, ...]) -> tuple[slice, ...]:
        return tuple(slice(c[k], c[k] + elems[k]) for k in range(d))

    nu_c = [nu[at(c)] for c in corners]
    out = {o: np.zeros(shape) for o in itertools.product((-1, 0, 1), repeat=d)}
    for ia, a in enumerate(corners):
        for ib, b in enumerate(corners):
            v = sum(w[ic, ia, ib] * nu_c[ic] for ic in range(len(corners)) if w[ic, ia, ib])
            out[tuple(bk - ak for ak, bk in zip(a, b))][at(a)] += v
    return out


def assemble(nu: np.ndarray, f: float | np.ndarray = 0.0) -> tuple[sp.csr_matrix, np.ndarray]:
    """Full stiffness matrix K (all nodes, C order) and load vector F for one sample.

    Args:
        nu: nodal diffusivity, shape (n1, .., nd), float64.
        f: constant source or nodal field of nu's shape.
    """
    nu = np.asarray(nu, dtype=np.float64)
    shape = nu.shape
    size = nu.size
    strides = np.array([int(np.prod(shape[k + 1 :])) for k in range(nu.ndim)])
    grid = np.indices(shape).reshape(nu.ndim, -1)
    rows, cols, vals = [], [], []
    for o, s in stencil(nu).items():
        ok = np.ones(size, dtype=bool)
        for k, ok_k in enumerate(o):
            if ok_k:
                ok &= (grid[k] + ok_k >= 0) & (grid[k] + ok_k < shape[k])
        i = np.flatnonzero(ok)
        rows.append(i)
        cols.append(i + int(np.dot(o, strides)))
        vals.append(s.ravel()[i])
    k = sp.csr_matrix(
        (np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))), shape=(size, size)
    )
    like = torch.from_numpy(nu)[None, None]
    if isinstance(f, np.ndarray):
        load = fem.load_vector(torch.from_numpy(np.array(f, np.float64))[None, None], like)
    else:
        load = fem.load_vector(float(f), like)
    F = np.zeros(size) if load is None else load.numpy().ravel()
    return k, F


def _free_range(shape: tuple[int, ...]) -> tuple[int, int]:
    """Free nodes are the contiguous C-order range between the x1 = 0 and x1 = 1 faces."""
    face = int(np.prod(shape[1:]))
    return face, int(np.prod(shape)) - face


def _solve_amg(nu: np.ndarray, f, rtol: float, maxiter: int) -> tuple[np.ndarray, dict]:
    import pyamg

    t0 = time.perf_counter()
    k, F = assemble(nu, f)
    lo, hi = _free_range(nu.shape)
    kff = k[lo:hi, lo:hi].tocsr()
    b = F[lo:hi] - k[lo:hi, :lo] @ np.ones(lo)
    t1 = time.perf_counter()
    ml = pyamg.smoothed_aggregation_solver(kff, symmetry="hermitian", max_coarse=500)
    t2 = time.perf_counter()
    residuals: list[float] = []
    x = ml.solve(b, tol=rtol, accel="cg", maxiter=maxiter, residuals=residuals)
    t3 = time.perf_counter()
    u = np.zeros(nu.size)
    u[:lo] = 1.0
    u[lo:hi] = x
    res = float(np.linalg.norm(b - kff @ x) / max(np.linalg.norm(b), 1e-300))
    stats = dict(
        assembly_s=t1 - t0,
        setup_s=t2 - t1,
        solve_s=t3 - t2,
        iterations=len(residuals) - 1,
        residual=res,
    )
    return u.reshape(nu.shape), stats


def _solve_matrix_free(
    nu: torch.Tensor, f: fem.Load, rtol: float, maxiter: int, precond: str = "jacobi"
) -> tuple[torch.Tensor, list[dict]]:
    """Batched preconditioned CG (Jacobi, or the ``gmg`` V-cycle); every sample has its own
    step sizes."""
    t0 = time.perf_counter()
    shape = tuple(nu.shape[2:])
    mask = fem.dirichlet_mask(shape, dtype=nu.dtype, device=nu.device)
    g = fem.lifting(shape, dtype=nu.dtype, device=nu.device).expand_as(nu).contiguous()

    def matvec(x: torch.Tensor) -> torch.Tensor:
        with torch.enable_grad():
            x = x.detach().requires_grad_(True)
            (kx,) = torch.autograd.grad(fem.energy(x, nu, 0.0).sum(), x)
        return kx * mask

    with torch.enable_grad():
        g_req = g.clone().requires_grad_(True)
        (grad0,) = torch.autograd.grad(fem.energy(g_req, nu, f).sum(), g_req)
    b = -grad0 * mask
    if precond == "gmg":
        minv = gmg.VCycle(nu)
    else:
        diag = fem.stiffness_diagonal(nu)
        jacobi = mask / torch.where(mask > 0, diag, torch.ones_like(diag))

        def minv(r: torch.Tensor) -> torch.Tensor:
            return jacobi * r

    red = tuple(range(1, nu.ndim))
    bnorm = b.flatten(1).norm(dim=1).clamp_min(1e-300)
    x = torch.zeros_like(b)
    r = b.clone()
    z = minv(r)
    p = z.clone()
    rz = (r * z).sum(red)
    it = 0
    done = torch.zeros(nu.shape[0], dtype=torch.bool, device=nu.device)
    iters = torch.zeros(nu.shape[0], dtype=torch.long)
    t1 = time.perf_counter()
    while it < maxiter:
        rel = r.flatten(1).norm(dim=1) / bnorm
        done = rel <= rtol
        if bool(done.all()):
            break
        it += 1
        iters += (~done).long().cpu()
        kp = matvec(p)
        pkp = (p * kp).sum(red)
        alpha = torch.where(
            done, torch.zeros_like(rz), rz / pkp.where(pkp != 0, torch.ones_like(pkp))
        )
        view = (-1,) + (1,) * (nu.ndim - 1)
        x = x + alpha.view(view) * p
        r = r - alpha.view(view) * kp
        z = minv(r)
        rz_new = (r * z).sum(red)
        beta = torch.where(
            done, torch.zeros_like(rz), rz_new / rz.where(rz != 0, torch.ones_like(rz))
        )
        p = z + beta.view(view) * p
        rz = rz_new
    t2 = time.perf_counter()
    rel = (r.flatten(1).norm(dim=1) / bnorm).cpu()
    u = g + x
    stats = [
        dict(
            assembly_s=0.0,
            setup_s=t1 - t0,
            solve_s=(t2 - t1) / nu.shape[0],
            iterations=int(iters[i]),
            residual=float(rel[i]),
        )
        for i in range(nu.shape[0])
    ]
    return u, stats


def solve_with_stats(
    nu: torch.Tensor,
    f: fem.Load = 0.0,
    *,
    rtol: float = 1e-10,
    method: str = "amg",
    maxiter: int = 20000,
) -> tuple[torch.Tensor, list[dict]]:
    """FEM solutions (B, 1, n..) and per-sample timings {assembly_s, setup_s, solve_s,
    iterations, residual}. Computed in float64; returned in nu's dtype and device.

    Raises:
        RuntimeError: a sample did not reach ``rtol`` within ``maxiter`` iterations.
    """
    if method not in METHODS:
        raise ValueError(f"unknown reference method {method!r}; choose one of {METHODS}")
    if nu.ndim not in (4, 5) or nu.shape[1] != 1:
        raise ValueError(f"nu must be (batch, 1, n, n[, n]), got {tuple(nu.shape)}")
    nu64 = nu.detach().to(torch.float64)
    f64: fem.Load = f.detach().to(torch.float64) if isinstance(f, torch.Tensor) else float(f)
    if method in ("matrix_free", "gmg"):
        precond = "gmg" if method == "gmg" else "jacobi"
        u, stats = _solve_matrix_free(nu64, f64, rtol, maxiter, precond)
    else:
        nun = nu64.cpu().numpy()
        fb = (
            np.broadcast_to(f64.cpu().numpy(), nun.shape) if isinstance(f64, torch.Tensor) else None
        )
        outs, stats = [], []
        for i in range(nun.shape[0]):
            fi = fb[i, 0] if fb is not None else f64
            ui, si = _solve_amg(nun[i, 0], fi, rtol, maxiter)
            outs.append(ui)
            stats.append(si)
        u = torch.from_numpy(np.stack(outs)[:, None])
    bad = [i for i, s in enumerate(stats) if not s["residual"] <= rtol * 1.0001]
    if bad:
        raise RuntimeError(
            f"reference solve ({method}) did not reach rtol={rtol:g} for samples {bad}: "
            f"residuals {[stats[i]['residual'] for i in bad]}; raise maxiter or loosen rtol"
        )
    return u.to(dtype=nu.dtype, device=nu.device), stats


def solve(
    nu: torch.Tensor, f: fem.Load = 0.0, *, rtol: float = 1e-10, method: str = "amg"
) -> torch.Tensor:
    """FEM solution of -div(nu grad u) = f with the METHOD.md boundary conditions, (B, 1, n..)."""
    return solve_with_stats(nu, f, rtol=rtol, method=method)[0]
