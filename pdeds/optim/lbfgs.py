"""L-BFGS with a strong-Wolfe line search, run through a DeepSpeed engine (issue 5).

The quasi-Newton direction d = -H g comes from the history of curvature pairs
s_i = x_{i+1} - x_i, y_i = g_{i+1} - g_i (+ damping * s_i), i = k-m .. k-1, via the two-loop
recursion with H_0 = gamma I, gamma = s^T y / y^T y of the newest pair (Nocedal & Wright,
Alg. 7.4). The step length t satisfies the strong Wolfe conditions

    f(x + t d) <= f(x) + c1 t g^T d,        |g(x + t d)^T d| <= c2 |g^T d|,

found by bracketing and cubic interpolation (Nocedal & Wright, Alg. 3.5/3.6; the logic follows
torch.optim.LBFGS's port of lswolfe.lua).

Distributed form. Under ZeRO 1/2 each rank holds only its partition of the flat fp32
parameters and of the gradient, so every inner product is a sum of partition inner products
over ranks. The two-loop recursion is done in coefficient space (the "vector-free" L-BFGS of
Chen et al., NeurIPS 2014): all inner products among the 2m + 1 basis vectors
{s_i, y_i, g} are kept in a small Gram matrix, updated with ONE all-reduce per iteration,
and the direction is a local linear combination of the basis. Every decision (Wolfe tests,
pair acceptance, stopping) is made on all-reduced scalars, so it is the same on every rank,
and the iterates equal the 1-rank ones up to round-off in the order of summation. Under ZeRO 0
the parameters are replicated and nothing is reduced.

Engine protocol (see ``pdeds.optim``). ``LBFGS.engine_step`` runs the first evaluation with the
standard DeepSpeed loop; the engine's ``step()`` then calls ``LBFGS.step()``, which evaluates
trial points through ``EngineEvaluator``: copy the fp32 partition into the model (ZeRO's own
``update_lp_params``: copy + all-gather), forward/backward of every micro-batch through the
engine with the accumulation boundary on the last one, and (ZeRO 1/2) the ZeRO optimizer's
own ``step()`` to form the reduced partition gradient, with this optimizer only capturing it.
DeepSpeed therefore counts one global step per L-BFGS step, whatever the evaluations.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from pdeds import distributed
from pdeds.errors import PdedsError
from pdeds.optim.lbfgs_engine import EngineEvaluator, check_engine, null_loss
from pdeds.optim.line_search import Evaluation, Point, strong_wolfe

LINE_SEARCHES = ("strong_wolfe",)
"""ZeRO stages L-BFGS runs under (with or without ``offload_optimizer``). Stage 3 partitions
the model parameters themselves and gathers them per layer inside forward; re-materialising a
trial point would need its own machinery, so ``pdeds.optim.prepare_ds_config`` refuses it."""


@dataclass
class LBFGSConfig:
    """The ``optim.lbfgs`` section (``optim.lr`` scales the first trial step; use 1)."""

    history_size: int = 10
    """Number m of curvature pairs (s, y) kept for the two-loop recursion."""
    max_iter: int = 1
    """L-BFGS iterations per optimizer (DeepSpeed) step; 1 = one iteration per global step."""
    line_search: str = "strong_wolfe"
    """Line search; only "strong_wolfe"."""
    wolfe_c1: float = 1e-4
    """Sufficient-decrease constant c1 of the strong Wolfe conditions."""
    wolfe_c2: float = 0.9
    """Curvature constant c2 (c1 < c2 < 1); small values make the line search nearly exact."""
    max_evals: int = 25
    """Function evaluations (engine forward+backward of the global batch) allowed per iteration's
    line search."""
    damping: float = 0.0
    """delta >= 0: pairs store y + delta s (the curvature of f + delta/2 |x|^2), which keeps
    s^T y > 0 on non-convex losses; 0 = exact pairs. Pairs with s^T y <= 1e-10 |s||y| are
    skipped either way."""
    tolerance_grad: float = 1e-10
    """Take no step once max |g| over all parameters is at most this."""
    tolerance_change: float = 1e-12
    """Stop iterating within a step once the loss change or max |t d| is at most this."""
    hold_steps: int = 0
    """Optimizer steps that see the same global batch before the trainer draws a new one;
    0 = hold forever (full-batch L-BFGS on one fixed batch)."""


def build_lbfgs(model: torch.nn.Module, cfg: Any) -> LBFGS:
    """The L-BFGS client optimizer for ``cfg`` (an ``OptimConfig`` with name "lbfgs")."""
    c: LBFGSConfig = cfg.lbfgs
    return LBFGS(
        [p for p in model.parameters() if p.requires_grad],
        lr=cfg.lr,
        history_size=c.history_size,
        max_iter=c.max_iter,
        wolfe_c1=c.wolfe_c1,
        wolfe_c2=c.wolfe_c2,
        max_evals=c.max_evals,
        damping=c.damping,
        tolerance_grad=c.tolerance_grad,
        tolerance_change=c.tolerance_change,
    )


class LBFGS(torch.optim.Optimizer):
    """L-BFGS + strong-Wolfe line search, usable standalone (``step(closure)``) or as a DeepSpeed
    client optimizer driven by ``pdeds.optim.engine_step``.

    Args:
        params: the parameters (one group).
        lr: first trial step of every line search (1 = the quasi-Newton step); the very first
            iteration tries lr * min(1, 1 / |g|_1) since it has no curvature yet.
        history_size, max_iter, wolfe_c1, wolfe_c2, max_evals, damping, tolerance_grad,
        tolerance_change: see ``LBFGSConfig``.
        partitioned: True when each rank holds a disjoint slice of the parameter vector
            (ZeRO 1/2), so inner products are summed over ranks; ``engine_step`` sets it.
    """

    needs_closure = True

    def __init__(
        self,
        params: Iterable[torch.Tensor],
        *,
        lr: float = 1.0,
        history_size: int = 10,
        max_iter: int = 1,
        wolfe_c1: float = 1e-4,
        wolfe_c2: float = 0.9,
        max_evals: int = 25,
        damping: float = 0.0,
        tolerance_grad: float = 1e-10,
        tolerance_change: float = 1e-12,
        partitioned: bool = False,
    ) -> None:
        if not 0.0 < wolfe_c1 < wolfe_c2 < 1.0:
            raise PdedsError(
                f"optim.lbfgs.wolfe_c1 / wolfe_c2: need 0 < c1 < c2 < 1, got {wolfe_c1}, {wolfe_c2}"
            )
        defaults = dict(
            lr=lr,
            history_size=history_size,
            max_iter=max_iter,
            wolfe_c1=wolfe_c1,
            wolfe_c2=wolfe_c2,
            max_evals=max_evals,
            damping=damping,
            tolerance_grad=tolerance_grad,
            tolerance_change=tolerance_change,
        )
        super().__init__(params, defaults)
        if len(self.param_groups) != 1:
            raise ValueError("LBFGS takes one parameter group")
        self.partitioned = partitioned
        self._capturing = False
        self._captured: list[torch.Tensor] | None = None
        self._evaluator: EngineEvaluator | None = None
        self._start_loss: float | None = None
        self._start_grad: torch.Tensor | None = None
        self._end: tuple[Any, float, torch.Tensor, torch.Tensor] | None = None
        """(batch key, loss, local gradient, local parameters) where the last step ended."""
        self.evaluations_last_step = 0
        """Loss + gradient evaluations of the global batch the last step used (incl. its first,
        unless it was the previous step's end on a held batch)."""

    def reset_state(self) -> None:
        """Forget the curvature history (e.g. when the loss changes at a multigrid level switch)."""
        self.state.clear()
        self._end = None

    # ---- the flat local vector ---------------------------------------------------------

    def _params(self) -> list[torch.Tensor]:
        return [p for p in self.param_groups[0]["params"] if p.requires_grad]

    def _flat_grad(self) -> torch.Tensor:
        return torch.cat(
            [
                (p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1)
                for p in self._params()
            ]
        )

    def _flat_params(self) -> torch.Tensor:
        return torch.cat([p.detach().reshape(-1) for p in self._params()])

    @torch.no_grad()
    def _set_params(self, x: torch.Tensor) -> None:
        offset = 0
        for p in self._params():
            n = p.numel()
            p.copy_(x[offset : offset + n].view_as(p))
            offset += n

    def _sum(self, t: torch.Tensor) -> torch.Tensor:
        """Sum of partition-local values over ranks (identity when replicated)."""
        return distributed.all_reduce_sum(t) if self.partitioned else t

    def _max(self, t: torch.Tensor) -> torch.Tensor:
        return distributed.all_reduce_max(t) if self.partitioned else t

    # ---- the step ----------------------------------------------------------------------

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> float | None:  # type: ignore[override]
        """One optimizer step of ``max_iter`` L-BFGS iterations.

        Args:
            closure: re-evaluates the loss: zeroes the gradients, runs forward and backward,
                returns the loss (the torch convention). Left out when called by DeepSpeed
                inside ``engine_step``, which installs its own evaluator.

        Returns:
            The loss at the start of the step.
        """
        if self._capturing:
            self._captured = [
                (p.grad if p.grad is not None else torch.zeros_like(p)).detach().clone()
                for p in self._params()
            ]
            return None
        if closure is not None:
            evaluate = self._closure_evaluator(closure)
            loss, g = evaluate()
        elif self._evaluator is not None and self._start_loss is not None:
            evaluate = self._evaluator
            loss = self._start_loss
            g = self._start_grad if self._start_grad is not None else self._flat_grad()
        else:
            raise RuntimeError(
                "LBFGS.step needs a closure; under DeepSpeed call pdeds.optim.engine_step"
            )
        used, f, g = self._iterate(evaluate, loss, g)
        first = 0 if self._start_grad is not None else 1
        self.evaluations_last_step = first + used
        key = self._evaluator.batch_key if self._evaluator is not None else None
        self._end = None if key is None else (key, f, g.clone(), self._flat_params().clone())
        return loss

    def _closure_evaluator(self, closure: Callable[[], Any]) -> Callable[[], tuple[float, Any]]:
        def evaluate() -> tuple[float, torch.Tensor]:
            with torch.enable_grad():
                loss = closure()
            return float(loss), self._flat_grad()

        return evaluate

    def _iterate(
        self, evaluate: Callable[[], tuple[float, torch.Tensor]], f: float, g: torch.Tensor
    ) -> tuple[int, float, torch.Tensor]:
        """Up to max_iter iterations from loss f, local gradient g; returns the evaluations used
        and the loss and local gradient where they ended."""
        used = 0
        group = self.param_groups[0]
        state = self.state[self._params()[0]]
        state.setdefault("n_iter", 0)
        state.setdefault("func_evals", 0)
        x = self._flat_params()
        for _ in range(group["max_iter"]):
            if self._max(g.abs().max().reshape(1))[0].item() <= group["tolerance_grad"]:
                break
            d, g_dots = self._direction(g, state)
            gtd = float(self._sum(torch.dot(g, d).reshape(1).double())[0])
            if gtd > -group["tolerance_change"]:
                break
            if state["n_iter"] == 0:
                t = min(1.0, 1.0 / float(g_dots["l1"])) * group["lr"]
            else:
                t = group["lr"]
            d_max = float(self._max(d.abs().max().reshape(1))[0])

            def at(t_: float, x=x, d=d) -> Evaluation:
                self._set_params(x + t_ * d)
                f_, g_ = evaluate()
                return f_, g_, float(self._sum(torch.dot(g_, d).reshape(1).double())[0])

            new, evals = strong_wolfe(
                at,
                Point(0.0, f, g, gtd),
                t,
                c1=group["wolfe_c1"],
                c2=group["wolfe_c2"],
                d_max=d_max,
                tolerance_change=group["tolerance_change"],
                max_evals=group["max_evals"],
            )
            state["func_evals"] += evals
            used += evals
            state["n_iter"] += 1
            s = new.t * d
            x = x + s
            self._set_params(x)
            self._add_pair(s, new.g - g, state)
            change = abs(new.f - f)
            f, g = new.f, new.g
            if (
                change <= group["tolerance_change"]
                or abs(new.t) * d_max <= group["tolerance_change"]
            ):
                break
        return used, f, g

    # ---- history and the two-loop recursion in coefficient space -------------------------

    def _add_pair(self, s: torch.Tensor, y: torch.Tensor, state: dict) -> None:
        """Store (s, y + damping s) unless its curvature s^T y is not safely positive."""
        group = self.param_groups[0]
        m = group["history_size"]
        if group["damping"] > 0:
            y = y + group["damping"] * s
        if "basis" not in state:
            state["basis"] = s.new_zeros((2 * m, s.numel()))
            # A list, not a tensor: Optimizer.load_state_dict casts tensors to the param dtype.
            state["gram"] = [[0.0] * (2 * m) for _ in range(2 * m)]
            state["slots"] = []
        basis, slots = state["basis"], state["slots"]
        gram = torch.tensor(state["gram"], dtype=torch.float64)
        free = next(i for i in range(m) if i not in slots) if len(slots) < m else slots[0]
        local = torch.cat(
            [
                torch.stack([torch.dot(s, y), torch.dot(s, s), torch.dot(y, y)]),
                basis @ s,
                basis @ y,
            ]
        ).double()
        dots = self._sum(local.to(s.device)).cpu()
        sy, ss, yy = (float(v) for v in dots[:3])
        if not sy > 1e-10 * math.sqrt(ss * yy):
            return
        if free in slots:
            slots.remove(free)
        slots.append(free)
        basis[free].copy_(s)
        basis[m + free].copy_(y)
        s_dots, y_dots = dots[3 : 3 + 2 * m].clone(), dots[3 + 2 * m :].clone()
        s_dots[free], s_dots[m + free] = ss, sy
        y_dots[free], y_dots[m + free] = sy, yy
        gram[free, :], gram[:, free] = s_dots, s_dots
        gram[m + free, :], gram[:, m + free] = y_dots, y_dots
        state["gram"] = gram.tolist()

    def _direction(self, g: torch.Tensor, state: dict) -> tuple[torch.Tensor, dict]:
        """d = -H g by the two-loop recursion on coefficients over the basis {s_i, y_i, g}.

        With q = sum_j c_j b_j, every inner product q . b_i is c^T Gram[:, i], so the recursion
        needs the Gram matrix only; g's row of it is the one all-reduce of this call.
        """
        slots = state.get("slots", [])
        local = torch.cat(
            [
                torch.stack([torch.dot(g, g), g.abs().sum()]),
                state["basis"] @ g if slots else g.new_zeros(0),
            ]
        ).double()
        dots = self._sum(local.to(g.device)).cpu()
        info = {"gg": float(dots[0]), "l1": float(dots[1])}
        if not slots:
            return -g, info
        m = self.param_groups[0]["history_size"]
        gram = torch.zeros((2 * m + 1, 2 * m + 1), dtype=torch.float64)
        gram[: 2 * m, : 2 * m] = torch.tensor(state["gram"], dtype=torch.float64)
        gram[2 * m, : 2 * m], gram[: 2 * m, 2 * m] = dots[2:], dots[2:]
        gram[2 * m, 2 * m] = dots[0]
        coef = torch.zeros(2 * m + 1, dtype=torch.float64)
        coef[2 * m] = 1.0
        alpha = {}
        for i in reversed(slots):
            rho = 1.0 / float(gram[i, m + i])
            alpha[i] = rho * float(coef @ gram[:, i])
            coef[m + i] -= alpha[i]
        newest = slots[-1]
        coef *= float(gram[newest, m + newest]) / float(gram[m + newest, m + newest])
        for i in slots:
            rho = 1.0 / float(gram[i, m + i])
            beta = rho * float(coef @ gram[:, m + i])
            coef[i] += alpha[i] - beta
        c = coef.to(dtype=g.dtype, device=g.device)
        d = -(c[: 2 * m] @ state["basis"] + c[2 * m] * g)
        return d, info

    # ---- DeepSpeed ----------------------------------------------------------------------

    def engine_step(self, engine: Any, micro_batches: Sequence[Any], loss_fn: Callable) -> float:
        """One L-BFGS step through ``engine``; returns the global-batch loss at its start."""
        from pdeds.optim import global_mean

        check_engine(engine, len(micro_batches))
        self.partitioned = engine.zero_optimization_stage() in (1, 2)
        key = getattr(loss_fn, "batch_key", None)
        held = self._held_start(key)
        total = torch.zeros((), dtype=torch.float64)
        try:
            for j, mb in enumerate(micro_batches):
                # On a held batch the start is the last step's end: a null backward keeps
                # DeepSpeed's micro-step and reduction bookkeeping without a network pass.
                loss = null_loss(engine) if held is not None else loss_fn(mb)
                engine.backward(loss)
                total += loss.detach().double().cpu()
                if j == len(micro_batches) - 1:
                    self._start_loss = global_mean(total, len(micro_batches))
                    if held is not None:
                        self._start_loss, self._start_grad = held
                    self._evaluator = EngineEvaluator(self, engine, micro_batches, loss_fn, key)
                    if not engine.is_gradient_accumulation_boundary():
                        raise PdedsError(
                            "engine_step got micro-batches that do not end on a gradient-"
                            "accumulation boundary; pass gradient_accumulation_steps of them"
                        )
                engine.step()
        finally:
            self._evaluator = None
            self._start_grad = None
        start, self._start_loss = self._start_loss, None
        assert start is not None
        return start

    def _held_start(self, key: Any) -> tuple[float, torch.Tensor] | None:
        """(loss, local gradient) of the last step's end if this step's batch key is the same
        and the parameters have not moved since (a checkpoint load, another optimizer), agreed
        by every rank; else None."""
        end = self._end
        ok = end is not None and key is not None and end[0] == key
        ok = ok and torch.equal(self._flat_params(), end[3])
        flag = torch.tensor([0.0 if ok else 1.0], dtype=torch.float64)
        if distributed.is_distributed():
            flag = distributed.all_reduce_max(flag)
        if flag[0] > 0 or end is None:
            self._end = None
            return None
        return end[1], end[2]
