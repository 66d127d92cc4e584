"""The one-step protocol the trainer follows (``pdeds.train.step.train_step`` calls
``engine_step``).

One optimizer step consumes this rank's micro-batches of one global batch and a
``loss_fn(micro_batch) -> Tensor``: the scalar loss of that micro-batch (its mean energy),
computed through ``engine(...)``. DeepSpeed divides by the gradient-accumulation steps and
averages over ranks, so the accumulated gradient is that of the global-batch mean loss

    L(theta) = 1 / (W * M) * sum_{ranks r} sum_{micro-batches m} loss_fn(mb_{r,m}).

- First-order optimizers and K-FAC (``needs_engine_step(opt)`` is False): the standard
  DeepSpeed loop, ``for mb in micro_batches: engine.backward(loss_fn(mb)); engine.step()``
  (K-FAC with ``curvature: ggn`` first runs its factor pass on factor steps,
  ``KFACPreconditioner.collect_curvature``).
- L-BFGS (and any optimizer with ``needs_closure = True``) evaluates L and its gradient several
  times per step (line search). ``engine_step(engine, micro_batches, loss_fn)`` performs one
  whole optimizer step: every evaluation is a forward+backward of all micro-batches through the
  engine, and DeepSpeed counts exactly one global step (LR scheduler and monitor advance once).

``engine_step`` works for every optimizer (for first-order ones it is the standard loop), and
returns L at the start of the step, all-reduced, hence identical on every rank. It needs exactly
``gradient_accumulation_steps`` micro-batches (one global batch).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from pdeds import distributed

LossFn = Callable[[Any], torch.Tensor]


def client_optimizer(optimizer: Any) -> Any:
    """The client optimizer behind an engine, a ZeRO wrapper, or the optimizer itself."""
    for attr in ("basic_optimizer", "optimizer"):
        inner = getattr(optimizer, attr, None)
        if isinstance(inner, torch.optim.Optimizer) and inner is not optimizer:
            return client_optimizer(inner)
    return optimizer


def needs_engine_step(optimizer: Any) -> bool:
    """True if ``optimizer`` (client, ZeRO wrapper or engine) must be stepped by ``engine_step``."""
    return bool(getattr(client_optimizer(optimizer), "needs_closure", False))


def reset_state(optimizer: Any) -> None:
    """Forget moments / curvature history of the client optimizer behind ``optimizer``: its own
    ``reset_state`` (L-BFGS, K-FAC's preconditioner) or a cleared ``state``."""
    opt = client_optimizer(optimizer)
    if hasattr(opt, "reset_state"):
        opt.reset_state()
    else:
        opt.state.clear()
    pre = getattr(opt, "kfac", None)
    if pre is not None:
        pre.reset_state()


def engine_step(engine: Any, micro_batches: Sequence[Any], loss_fn: LossFn) -> float:
    """One optimizer step through ``engine``; returns the global-batch mean loss at its start.

    Args:
        engine: the ``deepspeed.DeepSpeedEngine``.
        micro_batches: this rank's micro-batches of the global batch (gradient-accumulation
            steps of them).
        loss_fn: scalar loss of one micro-batch, computed through ``engine(...)``.
    """
    opt = client_optimizer(engine)
    pre = getattr(opt, "kfac", None)
    if pre is not None:
        pre.collect_curvature(engine, micro_batches, loss_fn)
    if needs_engine_step(opt):
        return float(opt.engine_step(engine, micro_batches, loss_fn))
    return standard_step(engine, micro_batches, loss_fn)


def standard_step(engine: Any, micro_batches: Sequence[Any], loss_fn: LossFn) -> float:
    """The plain DeepSpeed loop: backward per micro-batch, then one ``engine.step()``."""
    total = torch.zeros((), dtype=torch.float64)
    for mb in micro_batches:
        loss = loss_fn(mb)
        engine.backward(loss)
        engine.step()
        total += loss.detach().double().cpu()
    return global_mean(total, len(micro_batches))


def global_mean(local_sum: torch.Tensor, local_count: int) -> float:
    """Mean over ranks and micro-batches of per-micro-batch losses, given this rank's sum."""
    both = torch.stack([local_sum.double(), torch.tensor(float(local_count), dtype=torch.float64)])
    both = distributed.all_reduce_sum(both)
    return float(both[0] / both[1])
