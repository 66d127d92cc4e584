"""The learning-rate schedule as an LR scheduler that the engine steps after every optimizer step.

    lr(s)     = optim.lr x warmup(s) x decay(s) x lr_scale(level of step s)
    warmup(s) = min(1, (s + 1) / warmup_steps)                          (1 without warm-up)
    decay(s)  = 1 (constant) | r + (1 - r) (1 + cos(pi min(1, t))) / 2 (cosine)
    t         = s / S,   or max(s / S, train_s / T) with a time budget T (train.time_limit)

for step s = 0, 1, ... of S = total steps, r = train.min_lr_ratio: with a budget the cosine
ends with whichever runs out first, steps or time, so a run stopped by its budget has annealed
(train_s is the clock every rank agreed on, so the ranks' rates stay equal).

With a "scheduler" block in the DeepSpeed JSON, DeepSpeed's scheduler (built from the block as
DeepSpeed builds it) gives lr_DS(s) and the level's scale multiplies it:
lr(s) = lr_DS(s) x lr_scale(level of s).

Both are handed to ``deepspeed.initialize``, which steps them once per optimizer step and saves
their state in checkpoints. A checkpoint's optimizer state also restores the learning rate it
was saved with; ``seek(s)`` after loading writes this run's lr(s) instead (a resumed run may have
a longer ``train`` section, hence another cosine or other visits).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

from pdeds.config.schema import TrainConfig
from pdeds.errors import PdedsError
from pdeds.multigrid import Visit, visit_at


def lr_factor(train: TrainConfig, step: int, total: int, spent_s: float = 0.0) -> float:
    """warmup(step) x decay(step) of ``train`` for a run of ``total`` steps, ``spent_s`` seconds
    of its time budget gone."""
    warm = min(1.0, (step + 1) / train.warmup_steps) if train.warmup_steps else 1.0
    if train.lr_schedule == "constant":
        return warm
    t = step / max(1, total)
    if train.time_limit_s:
        t = max(t, spent_s / train.time_limit_s)
    t = min(1.0, t)
    r = train.min_lr_ratio
    return warm * (r + (1.0 - r) * 0.5 * (1.0 + math.cos(math.pi * t)))


def schedule_lambda(
    train: TrainConfig, visits: list[Visit], clock: Any = None
) -> Callable[[int], float]:
    """lr(s) / optim.lr: warmup x decay x the lr_scale of the visit that owns step s
    (``clock.agreed_s`` is the budget spent, if a clock is given)."""
    total = visits[-1].end

    def factor(step: int) -> float:
        spent = clock.agreed_s if clock is not None else 0.0
        return lr_factor(train, step, total, spent) * visit_at(visits, step).lr_scale

    return factor


class ScheduledLR(torch.optim.lr_scheduler.LambdaLR):
    """``LambdaLR`` that can ``seek`` to a step: lr is a function of the step alone."""

    def seek(self, step: int) -> None:
        """Continue at ``step``: every group's lr = base x lambda(step)."""
        self.last_epoch = step
        for group, base in zip(self.optimizer.param_groups, self.base_lrs):
            group["lr"] = base * self.lr_lambdas[0](step)
        self._last_lr = [g["lr"] for g in self.optimizer.param_groups]

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        if state is not None:  # checkpoints of pdeds 0.1 hold none; ``seek`` sets the step
            super().load_state_dict(state)


class LevelScaled:
    """DeepSpeed's own scheduler times the level scale: lr(s) = lr_DS(s) x scale(s).

    ``step`` hands the inner scheduler the unscaled rates (schedulers that update the group's lr
    multiplicatively read them), records what it sets, then scales.
    """

    def __init__(self, inner: Any, scale: Callable[[int], float]) -> None:
        self.inner = inner
        self.scale = scale
        self.optimizer = inner.optimizer
        self.last_step = 0
        self.unscaled = [g["lr"] for g in self.optimizer.param_groups]
        self._apply()

    def step(self, *args: Any, **kwargs: Any) -> None:
        for group, lr in zip(self.optimizer.param_groups, self.unscaled):
            group["lr"] = lr
        self.inner.step(*args, **kwargs)
        self.unscaled = [g["lr"] for g in self.optimizer.param_groups]
        self.last_step += 1
        self._apply()

    def seek(self, step: int) -> None:
        """Continue at ``step`` with the inner scheduler's restored rates."""
        self.last_step = step
        self._apply()

    def _apply(self) -> None:
        for group, lr in zip(self.optimizer.param_groups, self.unscaled):
            group["lr"] = lr * self.scale(self.last_step)

    def get_last_lr(self) -> list[float]:
        return [g["lr"] for g in self.optimizer.param_groups]

    def state_dict(self) -> dict[str, Any]:
        return {"inner": self.inner.state_dict(), "unscaled": self.unscaled, "step": self.last_step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "inner" not in state:  # pdeds 0.1 saved DeepSpeed's own scheduler, unwrapped
            self.inner.load_state_dict(state)
            self.unscaled = list(self.inner.get_lr())
            return
        self.inner.load_state_dict(state["inner"])
        self.unscaled, self.last_step = list(state["unscaled"]), int(state["step"])


def scheduler_class(name: str) -> type:
    """The class of a DeepSpeed "scheduler" block's type, found as ``DeepSpeedEngine`` finds it:
    in ``deepspeed.runtime.lr_schedules``, else in ``torch.optim.lr_scheduler``."""
    from deepspeed.runtime import lr_schedules

    cls = getattr(lr_schedules, name, None) or getattr(torch.optim.lr_scheduler, name, None)
    if not isinstance(cls, type):
        raise PdedsError(
            f"ds.scheduler.type: DeepSpeed knows no LR scheduler {name!r}; use one of "
            "WarmupLR, WarmupDecayLR, WarmupCosineLR, OneCycle, LRRangeTest, or drop the block "
            "(train.lr_schedule then sets the schedule)"
        )
    return cls


def build_scheduler(
    train: TrainConfig,
    visits: list[Visit],
    ds: dict[str, Any],
    optimizer: torch.optim.Optimizer,
    clock: Any = None,
) -> ScheduledLR | LevelScaled:
    """The run's LR scheduler on the client ``optimizer`` (before ``deepspeed.initialize``);
    ``clock`` (a ``TrainClock`` or None) times the budget of a cosine schedule."""
    if ds.get("scheduler"):
        block = ds["scheduler"]
        inner = scheduler_class(block["type"])(optimizer, **(block.get("params") or {}))
        return LevelScaled(inner, _scale(visits))
    return ScheduledLR(optimizer, schedule_lambda(train, visits, clock))


def _scale(visits: list[Visit]) -> Callable[[int], float]:
    return lambda step: visit_at(visits, step).lr_scale
