"""Strong-Wolfe line search by bracketing and cubic interpolation.

The step length t along a descent direction d satisfies

    f(x + t d) <= f(x) + c1 t g^T d,        |g(x + t d)^T d| <= c2 |g^T d|

(Nocedal & Wright, Alg. 3.5/3.6; the logic follows torch.optim.LBFGS's port of lswolfe.lua).
``evaluate(t)`` returns (loss, gradient, g^T d) at x + t d; the caller reduces g^T d across
ranks, so every decision here is the same on every rank.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

Evaluation = tuple[float, torch.Tensor, float]
"""(loss, local gradient, all-reduced g^T d) at a trial point."""


def cubic_minimizer(
    t1: float, f1: float, g1: float, t2: float, f2: float, g2: float, bounds: tuple[float, float]
) -> float:
    """Minimiser of the cubic through (t1, f1, f'=g1), (t2, f2, f'=g2), clamped to ``bounds``.

    d1 = g1 + g2 - 3 (f1 - f2) / (t1 - t2), d2 = sqrt(d1^2 - g1 g2) and, with t2 the far end,
    t* = t2 - (t2 - t1) (g2 + d2 - d1) / (g2 - g1 + 2 d2). Exact for a quadratic. Falls back to
    the midpoint of ``bounds`` when the cubic has no minimiser.
    """
    lo, hi = min(bounds), max(bounds)
    d1 = g1 + g2 - 3.0 * (f1 - f2) / (t1 - t2)
    disc = d1 * d1 - g1 * g2
    if disc < 0:
        return 0.5 * (lo + hi)
    d2 = math.sqrt(disc)
    if t1 <= t2:
        denom = g2 - g1 + 2.0 * d2
        t = t2 - (t2 - t1) * ((g2 + d2 - d1) / denom) if denom != 0 else 0.5 * (lo + hi)
    else:
        denom = g1 - g2 + 2.0 * d2
        t = t1 - (t1 - t2) * ((g1 + d2 - d1) / denom) if denom != 0 else 0.5 * (lo + hi)
    if not math.isfinite(t):
        return 0.5 * (lo + hi)
    return min(max(t, lo), hi)


@dataclass
class Point:
    """A trial step: length t, loss f, local gradient g and all-reduced g^T d."""

    t: float
    f: float
    g: torch.Tensor
    gtd: float


def strong_wolfe(
    evaluate: Callable[[float], Evaluation],
    start: Point,
    t: float,
    *,
    c1: float,
    c2: float,
    d_max: float,
    tolerance_change: float,
    max_evals: int,
) -> tuple[Point, int]:
    """Step length satisfying the strong Wolfe conditions along a descent direction d.

    Args:
        evaluate: t -> (f(x + t d), local gradient there, all-reduced g^T d).
        start: the point t = 0 (f, g, g^T d < 0).
        t: first trial step.
        c1, c2: Wolfe constants.
        d_max: max |d| over all ranks (the zoom stops when |bracket| d_max < tolerance_change).
        tolerance_change: see ``d_max``.
        max_evals: evaluations allowed.

    Returns:
        The accepted point (the best one seen if the budget ran out) and the evaluations used.
    """
    f0, gtd0 = start.f, start.gtd
    new = Point(t, *evaluate(t))
    evals = 1
    prev = start
    bracket: list[Point] | None = None
    while evals < max_evals:
        if new.f > f0 + c1 * new.t * gtd0 or (evals > 1 and new.f >= prev.f):
            bracket = [prev, new]
            break
        if abs(new.gtd) <= -c2 * gtd0:
            return new, evals
        if new.gtd >= 0:
            bracket = [prev, new]
            break
        lo, hi = new.t + 0.01 * (new.t - prev.t), new.t * 10.0
        t_next = cubic_minimizer(prev.t, prev.f, prev.gtd, new.t, new.f, new.gtd, (lo, hi))
        prev, new = new, Point(t_next, *evaluate(t_next))
        evals += 1
    if bracket is None:
        if new.f <= f0 + c1 * new.t * gtd0 and abs(new.gtd) <= -c2 * gtd0:
            return new, evals
        bracket = [start, new]
    return _zoom(evaluate, bracket, f0, gtd0, c1, c2, d_max, tolerance_change, max_evals, evals)


def _zoom(
    evaluate: Callable[[float], Evaluation],
    bracket: list[Point],
    f0: float,
    gtd0: float,
    c1: float,
    c2: float,
    d_max: float,
    tolerance_change: float,
    max_evals: int,
    evals: int,
) -> tuple[Point, int]:
    """Shrink a bracket that contains a strong-Wolfe point (Nocedal & Wright Alg. 3.6)."""
    low, high = (0, 1) if bracket[0].f <= bracket[1].f else (1, 0)
    insufficient = False
    while evals < max_evals:
        a, b = bracket
        if abs(b.t - a.t) * d_max < tolerance_change:
            break
        t = cubic_minimizer(a.t, a.f, a.gtd, b.t, b.f, b.gtd, (a.t, b.t))
        t_lo, t_hi = min(a.t, b.t), max(a.t, b.t)
        eps = 0.1 * (t_hi - t_lo)
        # Keep the trial away from the bracket ends, or the bracket may never shrink.
        if min(t_hi - t, t - t_lo) < eps:
            if insufficient or t >= t_hi or t <= t_lo:
                t = t_hi - eps if abs(t - t_hi) < abs(t - t_lo) else t_lo + eps
                insufficient = False
            else:
                insufficient = True
        else:
            insufficient = False
        new = Point(t, *evaluate(t))
        evals += 1
        if new.f > f0 + c1 * t * gtd0 or new.f >= bracket[low].f:
            bracket[high] = new
            low, high = (0, 1) if bracket[0].f <= bracket[1].f else (1, 0)
            continue
        if abs(new.gtd) <= -c2 * gtd0:
            return new, evals
        if new.gtd * (bracket[high].t - bracket[low].t) >= 0:
            bracket[high] = bracket[low]
        bracket[low] = new
    return bracket[low], evals
