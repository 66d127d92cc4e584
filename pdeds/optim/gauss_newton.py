"""Gauss-Newton (energy natural gradient) with Levenberg-Marquardt damping (issue 13).

The training loss is L(theta) = 1/B sum_b w_b J_h(U_b(theta)), and J_h(U) = 1/2 U^T K U - F^T U
is quadratic in the network output U with Hessian K (METHOD.md sec. 7). Its Gauss-Newton matrix
on a curvature sub-batch S of the global batch is

    G v = 1/|S| sum_{b in S} J_b^T (w_b K_b) (J_b v),        J_b = dU_b / dtheta,

the exact output-space curvature: one Jacobian-vector product (forward mode, ``torch.func.jvp``
of the module, about the cost of a forward; the double-VJP trick measured ~2x slower on the
default network), one stiffness apply and one vector-Jacobian product (autograd through a
forward kept for the whole step). A step solves

    (G + lambda I) d = -g

by ``cg_iters`` conjugate-gradient iterations from d = 0 (g = the global-batch gradient that
DeepSpeed reduced), and tries theta + lr d. Because L is quadratic in U, the model
m(d) = g^T d + 1/2 d^T G d is the exact change of L along the linearisation U + J d (for the
sub-batch's G). Levenberg-Marquardt: rho = (L(theta + d) - L(theta)) / m(d); lambda grows by
``damping_factor`` when rho < 1/4 and shrinks by it when rho > 3/4; the step is taken if the
loss fell, else halved up to ``backtrack`` times (forward evaluations only), else not taken.
The first lambda is ``damping`` times the Rayleigh quotient g^T G g / g^T g of the first CG
product, so its scale follows the problem's.

Distributed form (ZeRO 0: parameters and reduced gradient replicated). Rank r evaluates the
curvature samples among its micro-batches (global batch positions < |S|, so S is the same set
for any rank count and micro-batch split), and G v is summed over ranks in float64 by one
all-reduce per CG iteration. The CG vectors, dot products, rho and every decision are then
computed from identical values on every rank, and equal the 1-rank run up to round-off in the
order of summation. ZeRO 1/2 hand the client optimizer a flat partition of the parameters,
while the Jacobian-vector product needs every parameter's direction: refused.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch.func import functional_call, jvp

from pdeds import distributed
from pdeds.errors import PdedsError

ZERO_STAGES = (0,)
"""ZeRO stages Gauss-Newton runs under (see the module docstring)."""


@dataclass
class GaussNewtonConfig:
    """The ``optim.gauss_newton`` section (``optim.lr`` scales the step; use 1)."""

    cg_iters: int = 10
    """Conjugate-gradient iterations per step (each: one G v on the curvature sub-batch)."""
    cg_tol: float = 1e-3
    """Stop CG early once |r| <= cg_tol |g| (r the residual of the damped system)."""
    curvature_samples: int = 4
    """|S|: the first samples of each global batch whose G is used (at most the batch)."""
    damping: float = 1.0
    """First lambda, relative to the Rayleigh quotient g^T G g / g^T g of the first step."""
    damping_factor: float = 2.0
    """Levenberg-Marquardt factor (> 1): lambda x it when rho < 1/4, / it when rho > 3/4."""
    min_damping: float = 1e-8
    """Lower bound of lambda relative to that first Rayleigh quotient."""
    backtrack: int = 2
    """Halvings of a step that did not lower the loss before it is dropped."""
    warm_start: float = 0.0
    """CG starts from warm_start x the previous step's CG solution (Martens' Hessian-free
    "momentum", e.g. 0.95; it costs one product, counted in cg_iters, so it needs cg_iters >= 2
    and is not used with 1); 0 = from d = 0."""


@dataclass
class OutputCurvature:
    """A curvature sample set: the network's ``inputs`` and ``hessian(z)``, the per-sample
    Hessian of the sample loss in the network output applied to z (w_b K_b z_b); ``sample(keys)``
    draws v_b ~ N(0, w_b K_b) for each sample from the integer ``keys[b]`` (its seed; K-FAC's
    Gauss-Newton factors)."""

    inputs: torch.Tensor
    hessian: Callable[[torch.Tensor], torch.Tensor]
    sample: Callable[[Sequence[int]], torch.Tensor] | None = None


CurvatureFn = Callable[[Any], OutputCurvature]
"""``loss_fn.curvature(idx)``: the OutputCurvature of the samples ``idx`` of a micro-batch."""


def build_gauss_newton(model: torch.nn.Module, cfg: Any) -> GaussNewton:
    """The Gauss-Newton client optimizer for ``cfg`` (an ``OptimConfig``)."""
    c: GaussNewtonConfig = cfg.gauss_newton
    return GaussNewton(model, lr=cfg.lr, config=c)


def validate(c: GaussNewtonConfig) -> None:
    """Raise PdedsError naming the first bad ``optim.gauss_newton`` key."""
    for key in ("cg_iters", "curvature_samples"):
        v = getattr(c, key)
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise PdedsError(f"optim.gauss_newton.{key}: {v!r} must be an integer >= 1")
    if not isinstance(c.backtrack, int) or isinstance(c.backtrack, bool) or c.backtrack < 0:
        raise PdedsError(f"optim.gauss_newton.backtrack: {c.backtrack!r} must be an integer >= 0")
    if not 0.0 <= c.warm_start < 1.0:
        raise PdedsError(f"optim.gauss_newton.warm_start: {c.warm_start} must lie in [0, 1)")
    for key in ("cg_tol", "min_damping"):
        if not getattr(c, key) >= 0:
            raise PdedsError(f"optim.gauss_newton.{key}: {getattr(c, key)} must be >= 0")
    if not c.damping > 0:
        raise PdedsError(f"optim.gauss_newton.damping: {c.damping} must be > 0")
    if not c.damping_factor > 1:
        raise PdedsError(f"optim.gauss_newton.damping_factor: {c.damping_factor} must be > 1")


# ---- the matrix-free Gauss-Newton product -------------------------------------------------


class GaussNewtonProduct:
    """v -> G v = 1/total sum_b J_b^T (w_b K_b) J_b v over this rank's ``pieces``, summed over
    ranks when ``reduce`` (float64 flat vectors over ``module``'s trainable parameters).

    The forward of each piece is kept (one per step) for the VJPs; the JVP recomputes it in
    forward mode under no_grad.
    """

    def __init__(
        self,
        module: torch.nn.Module,
        pieces: Sequence[OutputCurvature],
        total: int,
        *,
        reduce: bool = True,
    ) -> None:
        self.module = module
        self.named = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
        self.pieces = list(pieces)
        self.total = total
        self.reduce = reduce
        self.numel = sum(p.numel() for _, p in self.named)
        self.products = 0
        with torch.enable_grad():
            self.outputs = [module(c.inputs) for c in self.pieces]

    def _unflatten(self, v: torch.Tensor) -> dict[str, torch.Tensor]:
        out, offset = {}, 0
        for n, p in self.named:
            out[n] = v[offset : offset + p.numel()].view_as(p).to(p.dtype)
            offset += p.numel()
        return out

    def jvp(self, c: OutputCurvature, tangents: dict[str, torch.Tensor]) -> torch.Tensor:
        """J v for the samples of ``c`` (forward mode)."""
        primals = {n: p.detach() for n, p in self.named}

        def output(params: dict[str, torch.Tensor]) -> torch.Tensor:
            return functional_call(self.module, params, (c.inputs,))

        with torch.no_grad():
            return jvp(output, (primals,), (tangents,))[1]

    def __call__(self, v: torch.Tensor) -> torch.Tensor:
        tangents = self._unflatten(v)
        acc = torch.zeros(self.numel, dtype=torch.float64, device=v.device)
        params = [p for _, p in self.named]
        for c, u in zip(self.pieces, self.outputs, strict=True):
            z = c.hessian(self.jvp(c, tangents)) / self.total
            with torch.enable_grad():
                grads = torch.autograd.grad(u, params, z.to(u.dtype), retain_graph=True)
            acc += torch.cat([g.reshape(-1) for g in grads]).double()
        self.products += 1
        return distributed.all_reduce_sum(acc) if self.reduce else acc


def conjugate_gradient(
    apply: Callable[[torch.Tensor], torch.Tensor],
    g: torch.Tensor,
    damping: Callable[[torch.Tensor, torch.Tensor], float],
    iters: int,
    tol: float,
    x0: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Approximate d = -(G + lambda I)^{-1} g by ``iters`` products of CG from d = x0 (or 0);
    returns (d, G d).

    ``damping(p, Gp)`` gives lambda after the first product (so it may depend on the first
    Rayleigh quotient); the iteration keeps G d alongside d so the caller's model
    m(d) = g^T d + 1/2 d^T G d needs no further product. A start x0 costs one of the products
    (G x0, for the residual r = -g - (G + lambda I) x0).
    """
    d, gd = torch.zeros_like(g), torch.zeros_like(g)
    r = -g
    lam = None
    if x0 is not None and iters > 1:
        gd = apply(x0)
        lam = damping(x0, gd)
        d = x0.clone()
        r = -g - gd - lam * x0
        iters -= 1
    p = r.clone()
    rr = float(r @ r)
    stop = (tol * math.sqrt(float(g @ g))) ** 2
    if x0 is not None and rr <= stop:  # the start already solves the system
        return d, gd
    for _ in range(iters):
        gp = apply(p)
        if lam is None:
            lam = damping(p, gp)
        ap = gp + lam * p
        pap = float(p @ ap)
        if not pap > 0:
            break
        alpha = rr / pap
        d += alpha * p
        gd += alpha * gp
        r -= alpha * ap
        rr_new = float(r @ r)
        if rr_new <= stop:
            break
        p = r + (rr_new / rr) * p
        rr = rr_new
    return d, gd


# ---- the optimizer -------------------------------------------------------------------------


class GaussNewton(torch.optim.Optimizer):
    """Gauss-Newton + Levenberg-Marquardt as a DeepSpeed client optimizer driven by
    ``pdeds.optim.engine_step`` (ZeRO 0).

    Args:
        model: the network whose parameters it updates (the engine's module).
        lr: step multiplier (1 = the damped Gauss-Newton step).
        config: the ``optim.gauss_newton`` settings.
    """

    needs_closure = True

    def __init__(self, model: torch.nn.Module, *, lr: float = 1.0, config: GaussNewtonConfig):
        params: Iterable[torch.Tensor] = [p for p in model.parameters() if p.requires_grad]
        super().__init__(params, dict(lr=lr))
        self.model = model
        self.config = config
        self._context: tuple[Any, Sequence[Any], Callable] | None = None
        self._start_loss: float | None = None
        self.evaluations_last_step = 0
        """Global-batch evaluations the last step used: its gradient + trial forwards."""
        self.products_last_step = 0
        """Gauss-Newton products (CG iterations) of the last step, on the curvature sub-batch."""
        self.last_rho: float | None = None

    def reset_state(self) -> None:
        """Forget lambda (it is set again from the next step's Rayleigh quotient)."""
        self.state.clear()

    def _params(self) -> list[torch.Tensor]:
        return [p for p in self.param_groups[0]["params"] if p.requires_grad]

    def _damping_state(self) -> dict:
        return self.state[self._params()[0]]

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> float | None:  # type: ignore[override]
        """The damped Gauss-Newton step; only inside ``engine_step`` (it needs the batch)."""
        if closure is not None or self._context is None or self._start_loss is None:
            raise RuntimeError("GaussNewton.step runs inside pdeds.optim.engine_step only")
        engine, micro_batches, loss_fn = self._context
        c = self.config
        params = self._params()
        g = torch.cat(
            [(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in params]
        ).double()
        pieces = curvature_pieces(micro_batches, loss_fn, c)
        product = GaussNewtonProduct(self.model, pieces, curvature_total(micro_batches, c))
        state = self._damping_state()

        def damping(p: torch.Tensor, gp: torch.Tensor) -> float:
            if "damping" not in state:
                rq = max(float(p @ gp) / max(float(p @ p), 1e-300), 1e-300)
                state["damping"] = c.damping * rq
                state["min_damping"] = c.min_damping * rq
            return float(state["damping"])

        warm = state.get("previous") if c.warm_start > 0 else None
        x0 = None if warm is None else c.warm_start * warm
        d, gd = conjugate_gradient(product, g, damping, c.cg_iters, c.cg_tol, x0)
        if c.warm_start > 0:
            state["previous"] = d.clone()
        self.products_last_step = product.products
        lr = float(self.param_groups[0]["lr"])
        x0 = [p.detach().clone() for p in params]
        f0 = self._start_loss
        evals, rho, t = 0, None, lr
        for _ in range(c.backtrack + 1):
            predicted = t * float(g @ d) + 0.5 * t * t * float(d @ gd)
            _set(params, x0, d, t)
            f = _global_loss(micro_batches, loss_fn)
            evals += 1
            if rho is None:
                rho = (f - f0) / predicted if predicted < 0 else -math.inf
            if f < f0:
                break
            t *= 0.5
        else:
            _set(params, x0, d, 0.0)
        self._update_damping(state, rho)
        self.last_rho = rho
        self.evaluations_last_step = 1 + evals
        return f0

    def _update_damping(self, state: dict, rho: float | None) -> None:
        """Levenberg-Marquardt: lambda x factor if rho < 1/4, / factor if rho > 3/4."""
        if rho is None or "damping" not in state:
            return
        k = self.config.damping_factor
        if rho < 0.25:
            state["damping"] = float(state["damping"]) * k
        elif rho > 0.75:
            state["damping"] = max(float(state["damping"]) / k, float(state["min_damping"]))

    def engine_step(self, engine: Any, micro_batches: Sequence[Any], loss_fn: Callable) -> float:
        """One Gauss-Newton step through ``engine``; returns the global-batch loss at its start."""
        from pdeds.optim import global_mean

        check_engine(engine, len(micro_batches), loss_fn)
        total = torch.zeros((), dtype=torch.float64)
        try:
            for j, mb in enumerate(micro_batches):
                loss = loss_fn(mb)
                engine.backward(loss)
                total += loss.detach().double().cpu()
                if j == len(micro_batches) - 1:
                    self._start_loss = global_mean(total, len(micro_batches))
                    self._context = (engine, micro_batches, loss_fn)
                engine.step()
        finally:
            self._context = None
        start, self._start_loss = self._start_loss, None
        assert start is not None
        return start


def _set(params: list[torch.Tensor], x0: list[torch.Tensor], d: torch.Tensor, t: float) -> None:
    """theta = x0 + t d (d flat, float64)."""
    offset = 0
    for p, x in zip(params, x0, strict=True):
        n = p.numel()
        p.copy_(x + t * d[offset : offset + n].view_as(p).to(p.dtype))
        offset += n


def _global_loss(micro_batches: Sequence[Any], loss_fn: Callable) -> float:
    """L at the current parameters: forwards of every micro-batch, mean over ranks."""
    from pdeds.optim import global_mean

    total = torch.zeros((), dtype=torch.float64)
    with torch.no_grad():
        for mb in micro_batches:
            total += loss_fn(mb).detach().double().cpu()
    return global_mean(total, len(micro_batches))


def curvature_slices(sizes: Sequence[int], samples: int, world: int, rank: int) -> list[int]:
    """How many leading samples of each of this rank's micro-batches (``sizes``) lie among the
    first ``samples`` of the global batch: micro-batch j of rank r starts at global position
    (j W + r) m (``pdeds.train.data.split_global_batch``)."""
    out = []
    for j, m in enumerate(sizes):
        start = (j * world + rank) * m
        out.append(max(0, min(m, samples - start)))
    return out


def curvature_total(micro_batches: Sequence[Any], c: GaussNewtonConfig) -> int:
    """|S| = min(curvature_samples, global batch)."""
    batch = len(micro_batches[0]) * len(micro_batches) * distributed.world_size()
    return min(c.curvature_samples, batch)


def curvature_pieces(
    micro_batches: Sequence[Any], loss_fn: Callable, c: GaussNewtonConfig
) -> list[OutputCurvature]:
    """This rank's share of the curvature sub-batch, one OutputCurvature per micro-batch."""
    curvature: CurvatureFn = loss_fn.curvature  # type: ignore[attr-defined]
    sizes = [len(mb) for mb in micro_batches]
    counts = curvature_slices(
        sizes, curvature_total(micro_batches, c), distributed.world_size(), distributed.rank()
    )
    return [curvature(mb[:k]) for mb, k in zip(micro_batches, counts, strict=True) if k > 0]


def check_engine(engine: Any, n_micro: int, loss_fn: Callable) -> None:
    """Refuse engine set-ups and loss functions Gauss-Newton cannot work with."""
    stage = engine.zero_optimization_stage()
    if stage not in ZERO_STAGES:
        raise PdedsError(
            f"Gauss-Newton runs under ZeRO stage 0 only, not {stage} (the Jacobian-vector "
            "product needs every parameter's direction); set zero_optimization.stage 0"
        )
    if engine.fp16_enabled() or engine.bfloat16_enabled():
        raise PdedsError(
            "Gauss-Newton needs fp32 evaluations; disable fp16/bf16 in the DeepSpeed config"
        )
    if n_micro != engine.gradient_accumulation_steps():
        raise PdedsError(
            f"engine_step got {n_micro} micro-batches but gradient_accumulation_steps is "
            f"{engine.gradient_accumulation_steps()}; pass one global batch"
        )
    if not callable(getattr(loss_fn, "curvature", None)):
        raise PdedsError(
            "Gauss-Newton needs the loss's output curvature (loss_fn.curvature); build the loss "
            "with pdeds.train.step.make_loss_fn"
        )
