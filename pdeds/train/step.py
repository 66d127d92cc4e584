"""One training step: the loss of a micro-batch and one optimizer step through the engine.

This is the single implementation that the trainer, ``analysis/bench_step.py``,
``launch/gpu_check.py`` and the planner's verifier call (METHOD.md sec. 3 and 6):

    loss_b = J_h(U_theta(nu_b))                  (train.loss_weighting: none)
    loss_b = J_h(U_theta(nu_b)) / |J_h(g_b)|     (train.loss_weighting: lifting)
    L      = mean of loss_b over the global batch

with g the lifting u = 1 - x1 (for f = 0, J_h(g_b) = 1/2 int nu_b): the weight is a constant per
sample, so each sample's minimiser is unchanged. Each micro-batch returns its mean; DeepSpeed
averages over accumulation steps and ranks, so the step's gradient is that of L.

``Phases`` times the parts of a step (data, forward, energy); a benchmark that wants the
engine's backward and optimizer calls apart wraps the engine in ``MarkedEngine``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from pdeds.optim import engine_step
from pdeds.optim.gauss_newton import OutputCurvature
from pdeds.physics import fem


class Phases:
    """Seconds per phase of a step, wall (``wall``) and process CPU (``cpu``): ``mark(name)``
    adds the time since the previous mark (or ``restart``) to ``name``, after ``sync`` (a device
    synchronisation, so that asynchronous kernels are charged to their phase)."""

    def __init__(self, sync: Callable[[], None] | None = None) -> None:
        self.sync = sync
        self.wall: dict[str, float] = {}
        self.cpu: dict[str, float] = {}
        self.restart()

    def _now(self) -> tuple[float, float]:
        if self.sync is not None:
            self.sync()
        return time.perf_counter(), time.process_time()

    def restart(self) -> None:
        """Start timing the next phase now."""
        self._last = self._now()

    def mark(self, name: str) -> None:
        """Charge the time since the last mark to ``name``."""
        now = self._now()
        self.wall[name] = self.wall.get(name, 0.0) + now[0] - self._last[0]
        self.cpu[name] = self.cpu.get(name, 0.0) + now[1] - self._last[1]
        self._last = now


def lifting_energy(nu: torch.Tensor, f: float) -> torch.Tensor:
    """|J_h(g_b)| per sample: the energy of the Dirichlet lifting, the scale of loss_weighting
    lifting (no gradient)."""
    with torch.no_grad():
        return fem.energy(fem.apply_dirichlet(torch.zeros_like(nu)), nu, f).abs()


def micro_batch_loss(u: torch.Tensor, nu: torch.Tensor, f: float, weighting: str) -> torch.Tensor:
    """Mean of loss_b over the micro-batch of predictions ``u`` for ``nu``, in float32."""
    j = fem.energy(u.float(), nu, f)
    if weighting == "lifting":
        j = j / lifting_energy(nu, f)
    return j.mean()


def output_curvature(nu: torch.Tensor, f: float, weighting: str) -> OutputCurvature:
    """The samples' d^2 loss_b / dU_b^2 = w_b K_b (METHOD.md sec. 7): w_b = 1, or 1 / |J_h(g_b)|
    for ``weighting`` lifting (the weight of ``micro_batch_loss``); the micro-batch mean's 1/B is
    left to the caller."""
    w = torch.ones(nu.shape[0], dtype=torch.float32, device=nu.device)
    if weighting == "lifting":
        w = 1.0 / lifting_energy(nu, f)
    w = w.view((-1,) + (1,) * (nu.ndim - 1))

    def hessian(z: torch.Tensor) -> torch.Tensor:
        return w.to(z.dtype) * fem.stiffness_apply(z, nu)

    def sample(keys: Sequence[int]) -> torch.Tensor:
        """v_b = sqrt(w_b) R_b z_b ~ N(0, w_b K_b), z_b drawn from the seed keys[b]."""
        v = [
            fem.stiffness_sample(nu[b : b + 1], torch.Generator().manual_seed(int(key)))
            for b, key in enumerate(keys)
        ]
        return w.sqrt().to(nu.dtype) * torch.cat(v)

    return OutputCurvature(nu, hessian, sample)


def make_loss_fn(
    engine: Any,
    data: Any,
    res: int,
    f: float,
    weighting: str,
    phases: Phases | None = None,
    on_output: Callable[[torch.Tensor], None] | None = None,
) -> Callable[[np.ndarray], torch.Tensor]:
    """``loss(idx)``: the micro-batch loss of the samples ``idx`` at resolution ``res``,
    through ``engine``; ``data.nu(idx, res)`` gives their fields. ``on_output(u)`` sees each
    network output (a benchmark hooks its gradient). ``loss.curvature(idx)`` is the samples'
    ``output_curvature`` (Gauss-Newton's)."""

    restart = phases.restart if phases is not None else lambda: None
    mark = phases.mark if phases is not None else lambda name: None

    def loss(idx: np.ndarray) -> torch.Tensor:
        restart()
        nu = data.nu(idx, res)
        mark("data")
        u = engine(nu)
        mark("forward")
        if on_output is not None:
            on_output(u)
        out = micro_batch_loss(u, nu, f, weighting)
        mark("energy")
        return out

    loss.curvature = lambda idx: output_curvature(data.nu(idx, res), f, weighting)  # type: ignore[attr-defined]
    return loss


def train_step(
    engine: Any,
    data: Any,
    micro_batches: Sequence[np.ndarray],
    *,
    res: int,
    f: float,
    weighting: str = "none",
    phases: Phases | None = None,
    on_output: Callable[[torch.Tensor], None] | None = None,
    batch_key: Any = None,
) -> float:
    """One optimizer step on this rank's micro-batches of a global batch
    (``pdeds.optim.engine_step``: the standard loop, or L-BFGS's line search); returns L at the
    step's start, the same on every rank.

    Args:
        engine: a DeepSpeed engine (or anything with its ``__call__`` / ``backward`` / ``step``).
        data: ``data.nu(idx, res)`` -> nu (micro-batch, 1, res..).
        micro_batches: this rank's sample ids, one array per accumulation step.
        res, f, weighting: resolution, source term and ``train.loss_weighting``.
        phases, on_output: optional timing and output hooks (see ``make_loss_fn``).
        batch_key: names the global batch and level (``loss.batch_key``): equal keys of
            consecutive steps mean the same loss, so L-BFGS reuses where the last step ended.
    """
    loss = make_loss_fn(engine, data, res, f, weighting, phases, on_output)
    loss.batch_key = batch_key  # type: ignore[attr-defined]
    return engine_step(engine, micro_batches, loss)


class MarkedEngine:
    """An engine whose ``backward`` and ``step`` calls end the phases "backward" and
    "optimizer" of ``phases``; everything else is the wrapped engine's."""

    def __init__(self, engine: Any, phases: Phases) -> None:
        self.engine = engine
        self.phases = phases

    def __call__(self, *args: Any) -> torch.Tensor:
        return self.engine(*args)

    def backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss)
        self.phases.mark("backward")

    def step(self) -> None:
        self.engine.step()
        self.phases.mark("optimizer")

    def __getattr__(self, name: str) -> Any:
        return getattr(self.engine, name)
