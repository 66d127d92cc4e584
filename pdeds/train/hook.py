"""The engine hook that applies the resolution schedule at step boundaries.

The loop calls ``before_step(step)`` before every optimizer step. When the step opens a new
visit the hook switches level: micro-batch and global batch through DeepSpeed's own
``set_train_micro_batch_size`` / ``set_train_batch_size`` (so the accumulation steps follow and
the loss stays the global-batch mean), optionally resets the optimizer state, and logs the
switch. The training coefficients are the same at every level; only the resolution at which nu
is evaluated changes, and the weights carry over unchanged. ``apply_lr`` scales the learning
rate of the step by the level's ``lr_scale`` on top of any DeepSpeed LR scheduler.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from pdeds.multigrid import Visit, visit_at
from pdeds.optim import client_optimizer


class LevelHook:
    """Puts the engine at the level of the visit that owns each step."""

    def __init__(
        self,
        visits: list[Visit],
        engine: Any,
        *,
        optimizer_state: str = "keep",
        on_switch: Callable[[Visit], None] | None = None,
        base_lr: float,
        lr_factor: Callable[[int], float] | None = None,
    ) -> None:
        self.visits = visits
        self.engine = engine
        self.optimizer_state = optimizer_state
        self.on_switch = on_switch
        self.lr_factor = lr_factor
        self.current: Visit | None = None
        self.base_lr = base_lr

    @property
    def total_steps(self) -> int:
        return self.visits[-1].end

    def before_step(self, step: int) -> Visit:
        """The visit of ``step``; switches the engine's level when the visit changes."""
        v = visit_at(self.visits, step)
        if self.current is None or v.index != self.current.index:
            first = self.current is None
            self.engine.set_train_micro_batch_size(v.micro_batch)
            self.engine.set_train_batch_size(v.batch)
            if not first and self.optimizer_state == "reset":
                reset_optimizer_state(self.engine)
            self.current = v
            if self.on_switch is not None:
                self.on_switch(v)
        self.apply_lr(step)
        return v

    def apply_lr(self, step: int) -> None:
        """group lr = (DeepSpeed scheduler's lr, else configured lr x lr_factor(step)) x the
        level's lr_scale."""
        sched = getattr(self.engine, "lr_scheduler", None)
        base = sched.get_last_lr() if sched is not None and hasattr(sched, "get_last_lr") else None
        if not base:
            factor = self.lr_factor(step) if self.lr_factor is not None else 1.0
            base = [self.base_lr * factor for _ in self.engine.optimizer.param_groups]
        scale = self.current.lr_scale if self.current is not None else 1.0
        for g, lr in zip(self.engine.optimizer.param_groups, base):
            g["lr"] = lr * scale

    def visit_ends_after(self, step: int) -> bool:
        """True if ``step`` is the last step of its visit."""
        return self.current is not None and step + 1 == self.current.end

    def state_dict(self, step: int) -> dict[str, int]:
        """Where in the schedule the run is (after ``step`` steps)."""
        v = visit_at(self.visits, step)
        return {"visit": v.index, "visit_steps_done": step - v.start}


def reset_optimizer_state(engine: Any) -> None:
    """Forget moments / curvature history of the client optimizer (``optimizer_state: reset``)."""
    opt = client_optimizer(engine)
    if hasattr(opt, "reset_state"):
        opt.reset_state()
    else:
        opt.state.clear()
