"""Exact Q1 finite-element energy and Dirichlet lifting (METHOD.md sec. 1 and 3).

On the nodal grid with spacing h_a = 1/(n_a - 1) and Q1 (multilinear) elements,

    J_h(U) = sum_e integral_e ( 1/2 nu |grad U|^2 - f U ) dx
           = 1/2 U^T K U - F^T U

with 2-point Gauss quadrature per axis and nu, f interpolated by the Q1 basis.

Why it is cheap. Inside an element, dU/dx_k is linear in every other coordinate and does
not depend on x_k, so at a Gauss point q = (s_1, .., s_d) only the positions s_j, j != k
matter, while the nu-sum over s_k collapses to nu_i + nu_{i+1} along axis k. Writing
T_t for the two-tap interpolation (1 - t) v_i + t v_{i+1} at Gauss position t, D_k for
(v_{i+1} - v_i) / h_k and S_k for v_i + v_{i+1} (all along the named axis), the gradient part is

    1/2 |J| sum_k sum_{s in {t-,t+}^(d-1)} < S_k T_s nu , (D_k T_s U)^2 >,   |J| = prod h_a / 2

i.e. d 2^(d-1) products of element-sized fields. Its gradient is K U, formed with the
adjoints of the same two-tap operators, so nothing is kept for backward but the inputs:
a handful of field-sized temporaries whatever the resolution. The load term is
F = M f with the Q1 mass matrix M = M_1 x .. x M_1, M_1 = h/6 tridiag(1, 4, 1) (exact
for Q1 f and U, hence equal to the Gauss rule).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

GAUSS = ((1.0 - 1.0 / math.sqrt(3.0)) / 2.0, (1.0 + 1.0 / math.sqrt(3.0)) / 2.0)
"""Positions of the two Gauss points in an element's local coordinate t in [0, 1]."""

Field = torch.Tensor
Load = float | torch.Tensor


def _spacing(x: Field) -> list[float]:
    return [1.0 / (n - 1) for n in x.shape[2:]]


def _tap(v: Field, axis: int, a: float, b: float) -> Field:
    """Two-tap operator along ``axis``: out_i = a v_i + b v_{i+1} (length n -> n - 1)."""
    n = v.shape[axis]
    return v.narrow(axis, 0, n - 1) * a + v.narrow(axis, 1, n - 1) * b


def _tap_adjoint(w: Field, axis: int, a: float, b: float) -> Field:
    """Adjoint of ``_tap``: out_i = a w_i + b w_{i-1} (length n - 1 -> n, zero outside)."""
    pad_lo = [0, 0] * (w.ndim - 1 - axis % w.ndim)
    return F.pad(w * a, pad_lo + [0, 1]) + F.pad(w * b, pad_lo + [1, 0])


def _check_fields(u: Field, nu: Field) -> None:
    if u.ndim not in (4, 5) or u.shape[1] != 1:
        raise ValueError(f"fields must be (batch, 1, n, n[, n]), got u of shape {tuple(u.shape)}")
    if nu.shape != u.shape:
        raise ValueError(f"nu shape {tuple(nu.shape)} differs from u shape {tuple(u.shape)}")
    if min(u.shape[2:]) < 2:
        raise ValueError(f"each axis needs at least 2 nodes, got {tuple(u.shape[2:])}")


def _gauss_sum(
    du: Field, snu: Field, axes: list[int], leaf: Callable[[Field, Field], Field]
) -> Field:
    """Sum of ``leaf`` over the Gauss positions along ``axes`` (recursion shares prefixes)."""
    if not axes:
        return leaf(du, snu)
    ax, rest = axes[0], axes[1:]
    return sum(
        _gauss_sum(_tap(du, ax, 1 - t, t), _tap(snu, ax, 1 - t, t), rest, leaf) for t in GAUSS
    )


def _gauss_adjoint(
    du: Field, snu: Field, axes: list[int], leaf: Callable[[Field, Field], tuple[Field, ...]]
) -> tuple[Field, ...]:
    """Like ``_gauss_sum`` for fields: leaf results are mapped back by the tap adjoints."""
    if not axes:
        return leaf(du, snu)
    ax, rest = axes[0], axes[1:]
    acc: list[Field] = []
    for t in GAUSS:
        parts = _gauss_adjoint(_tap(du, ax, 1 - t, t), _tap(snu, ax, 1 - t, t), rest, leaf)
        parts = [_tap_adjoint(p, ax, 1 - t, t) for p in parts]
        acc = parts if not acc else [a + p for a, p in zip(acc, parts, strict=True)]
    return tuple(acc)


def _jacobian(h: list[float]) -> float:
    return math.prod(x / 2.0 for x in h)


def _gradient_energy(u: Field, nu: Field) -> Field:
    """1/2 U^T K U per sample, shape (B,)."""
    h = _spacing(u)
    axes = list(range(2, u.ndim))
    red = tuple(range(1, u.ndim))
    total = 0.0
    for k in axes:
        du = _tap(u, k, -1.0 / h[k - 2], 1.0 / h[k - 2])
        snu = _tap(nu, k, 1.0, 1.0)
        others = [a for a in axes if a != k]
        total = total + _gauss_sum(du, snu, others, lambda g, w: (w * g * g).sum(red))
    return 0.5 * _jacobian(h) * total


def _gradient_energy_backward(u: Field, nu: Field, want_nu: bool) -> tuple[Field, Field | None]:
    """(K U, dJ/dnu) of the gradient part, formed with the adjoint two-tap operators."""
    h = _spacing(u)
    jac = _jacobian(h)
    axes = list(range(2, u.ndim))
    ku = torch.zeros_like(u)
    dnu = torch.zeros_like(nu) if want_nu else None

    def leaf(g: Field, w: Field) -> tuple[Field, ...]:
        return (w * g, 0.5 * g * g) if want_nu else (w * g,)

    for k in axes:
        a, b = -1.0 / h[k - 2], 1.0 / h[k - 2]
        parts = _gauss_adjoint(
            _tap(u, k, a, b), _tap(nu, k, 1.0, 1.0), [x for x in axes if x != k], leaf
        )
        ku += _tap_adjoint(parts[0], k, a, b)
        if dnu is not None:
            dnu += _tap_adjoint(parts[1], k, 1.0, 1.0)
    ku *= jac
    if dnu is not None:
        dnu *= jac
    return ku, dnu


def mass_apply(v: Field) -> Field:
    """M v with the Q1 mass matrix M = M_1 x .. x M_1, M_1 = h/6 tridiag(1, 4, 1) (ends 2, 1)."""
    for ax in range(2, v.ndim):
        h = 1.0 / (v.shape[ax] - 1)
        v = _tap_adjoint(_tap(v, ax, 2.0 * h / 6.0, h / 6.0), ax, 1.0, 0.0) + _tap_adjoint(
            _tap(v, ax, h / 6.0, 2.0 * h / 6.0), ax, 0.0, 1.0
        )
    return v


def load_vector(f: Load, like: Field) -> Field | None:
    """F = M f for a nodal field f, or f M 1 for a constant; None when f == 0."""
    if isinstance(f, torch.Tensor):
        if f.ndim == 0:
            f = float(f)
        else:
            return mass_apply(f.to(like.dtype).expand_as(like))
    if f == 0.0:
        return None
    return f * mass_apply(torch.ones_like(like))


class _Energy(torch.autograd.Function):
    """J_h with an explicit backward: dJ/dU = K U - F, dJ/dnu = 1/2 |J| sum adj(S T)(D T U)^2."""

    @staticmethod
    def forward(ctx, u: Field, nu: Field, load: Field | None) -> Field:  # type: ignore[override]
        ctx.save_for_backward(u, nu, load)
        j = _gradient_energy(u, nu)
        if load is not None:
            j = j - (load * u).flatten(1).sum(1)
        return j

    @staticmethod
    def backward(ctx, grad: Field):  # type: ignore[override]
        u, nu, load = ctx.saved_tensors
        ku, dnu = _gradient_energy_backward(u, nu, ctx.needs_input_grad[1])
        if load is not None:
            ku = ku - load
        scale = grad.view((-1,) + (1,) * (u.ndim - 1))
        gu = ku * scale if ctx.needs_input_grad[0] else None
        gnu = dnu * scale if dnu is not None else None
        gload = -u * scale if ctx.needs_input_grad[2] else None
        return gu, gnu, gload


def energy(u: Field, nu: Field, f: Load = 0.0) -> Field:
    """Per-sample discrete energy J_h(U) = 1/2 U^T K U - F^T U, shape (B,).

    Args:
        u: nodal values (B, 1, n1, n2[, n3]); axis 2 is x1.
        nu: diffusivity at the same nodes and shape.
        f: source, a float or a nodal field broadcastable to u.

    Exact (equal to the assembled quadratic form), differentiable in u and nu, computed in
    u's dtype with no loop over elements.
    """
    _check_fields(u, nu)
    nu = nu.to(u.dtype)
    return _Energy.apply(u, nu, load_vector(f, u))


def stiffness_apply(u: Field, nu: Field) -> Field:
    """K U (Dirichlet rows included), the gradient of the f = 0 energy."""
    _check_fields(u, nu)
    return _gradient_energy_backward(u, nu.to(u.dtype), False)[0]


def stiffness_root_apply(z: Callable[[Field], Field], nu: Field) -> Field:
    """v = R z with R R^T = K: the square root of the stiffness that the energy's form gives.

    The gradient part of J_h is 1/2 U^T K U = 1/2 sum_k sum_s |J| < S_k T_s nu, (T_s D_k U)^2 >
    (module docstring), so K = R R^T with R = [ (T_s D_k)^T diag(sqrt(|J| S_k T_s nu)) ]_{k,s}:
    one element-sized block per axis k and Gauss position s. ``z(like)`` returns block z_{k,s}
    (called in a fixed order, with a field shaped like the block); v = sum_{k,s} (T_s D_k)^T
    (sqrt(|J| S_k T_s nu) z_{k,s}). Drawing every z_{k,s} from N(0, I) gives v ~ N(0, K): the
    sampled curvature K-FAC's Gauss-Newton factors use.
    """
    _check_fields(nu, nu)
    h = _spacing(nu)
    jac = _jacobian(h)
    axes = list(range(2, nu.ndim))

    def blocks(w: Field, rest: list[int]) -> Field:
        if not rest:
            return (jac * w).clamp_min(0).sqrt() * z(w)
        ax, more = rest[0], rest[1:]
        return sum(_tap_adjoint(blocks(_tap(w, ax, 1 - t, t), more), ax, 1 - t, t) for t in GAUSS)

    v = torch.zeros_like(nu)
    for k in axes:
        inner = blocks(_tap(nu, k, 1.0, 1.0), [x for x in axes if x != k])
        v += _tap_adjoint(inner, k, -1.0 / h[k - 2], 1.0 / h[k - 2])
    return v


def stiffness_sample(nu: Field, generator: torch.Generator) -> Field:
    """v ~ N(0, K) for one nu (batch 1): ``stiffness_root_apply`` with z_{k,s} drawn from
    ``generator`` (a CPU generator: the draw is the same on every device)."""

    def draw(like: Field) -> Field:
        return torch.randn(like.shape, generator=generator, dtype=torch.float64).to(like)

    return stiffness_root_apply(draw, nu)


def stiffness_diagonal(nu: Field) -> Field:
    """diag(K) as a nodal field: the two-tap adjoints applied with squared coefficients."""
    h = _spacing(nu)
    axes = list(range(2, nu.ndim))
    diag = torch.zeros_like(nu)

    for k in axes:
        snu = _tap(nu, k, 1.0, 1.0)
        others = [x for x in axes if x != k]
        w = _diag_leaf_sum(snu, others)
        diag += _tap_adjoint(w, k, 1.0 / h[k - 2] ** 2, 1.0 / h[k - 2] ** 2)
    return diag * _jacobian(h)


def _diag_leaf_sum(w: Field, axes: list[int]) -> Field:
    """sum_s (T_s^2)^T T_s w over Gauss positions on ``axes`` (squared-coefficient adjoints)."""
    if not axes:
        return w
    ax, rest = axes[0], axes[1:]
    out = None
    for t in GAUSS:
        r = _diag_leaf_sum(_tap(w, ax, 1 - t, t), rest)
        r = _tap_adjoint(r, ax, (1 - t) ** 2, t**2)
        out = r if out is None else out + r
    return out


def lifting(shape: tuple[int, ...], *, dtype: torch.dtype, device: torch.device | str) -> Field:
    """g = 1 - x1 broadcastable to fields of spatial ``shape``: u = 1 at x1 = 0, 0 at x1 = 1."""
    n1 = shape[0]
    x1 = torch.arange(n1, dtype=torch.float64, device=device) / (n1 - 1)
    return (1.0 - x1).to(dtype).view((1, 1, n1) + (1,) * (len(shape) - 1))


def dirichlet_mask(shape: tuple[int, ...], *, dtype: torch.dtype, device: torch.device | str):
    """m = 0 on the faces x1 = 0 and x1 = 1, 1 elsewhere, broadcastable to fields."""
    n1 = shape[0]
    m = torch.ones(n1, dtype=dtype, device=device)
    m[0] = 0
    m[-1] = 0
    return m.view((1, 1, n1) + (1,) * (len(shape) - 1))


def apply_dirichlet(w: Field) -> Field:
    """U = g + m * w: exact Dirichlet values for any network output w of shape (B, 1, ...)."""
    shape = tuple(w.shape[2:])
    g = lifting(shape, dtype=w.dtype, device=w.device)
    m = dirichlet_mask(shape, dtype=w.dtype, device=w.device)
    return g + m * w
