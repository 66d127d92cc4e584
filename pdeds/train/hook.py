"""The engine hook that switches levels of the resolution schedule at step boundaries.

The loop calls ``before_step(step)`` before every optimizer step. When the step opens a new
visit the hook switches level: micro-batch and global batch through DeepSpeed's own
``set_train_micro_batch_size`` / ``set_train_batch_size`` (so the accumulation steps follow and
the loss stays the global-batch mean), optionally resets the optimizer state, and reports the
switch. The training coefficients are the same at every level; only the resolution at which nu
is evaluated changes, and the weights carry over unchanged. The level's ``lr_scale`` is part of
the LR scheduler's lambda (``pdeds.train.lr``), not of the hook.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from pdeds import optim
from pdeds.multigrid import Visit, close, visit_at


class LevelHook:
    """Puts the engine at the level of the visit that owns each step."""

    def __init__(
        self,
        visits: list[Visit],
        engine: Any,
        *,
        optimizer_state: str = "keep",
        on_switch: Callable[[Visit], None] | None = None,
    ) -> None:
        self.visits = visits
        self.engine = engine
        self.optimizer_state = optimizer_state
        self.on_switch = on_switch
        self.current: Visit | None = None
        self.closed: list[tuple[int, int]] = []
        """(visit index, step it ended after) of the time-budgeted visits ended so far."""

    def before_step(self, step: int) -> Visit:
        """The visit of ``step``; switches the engine's level when the visit changes."""
        v = visit_at(self.visits, step)
        if self.current is None or v.index != self.current.index:
            self.engine.set_train_micro_batch_size(v.micro_batch)
            self.engine.set_train_batch_size(v.batch)
            if self.current is not None and self.optimizer_state == "reset":
                reset_optimizer_state(self.engine)
            self.current = v
            if self.on_switch is not None:
                self.on_switch(v)
        return v

    def maybe_close(self, step: int, spent_s: float) -> bool:
        """End the current visit after ``step`` steps if it is time-budgeted and ``spent_s``
        (training seconds every rank agreed on) passed its end; the last visit runs until the
        run's own budget stops it. ``visits`` is updated in place (the LR schedule and the
        stream position read the same list). True if a visit ended."""
        v = self.current
        if v is None or v.until_s is None or spent_s < v.until_s or v.index == len(self.visits) - 1:
            return False
        self.visits[:] = close(self.visits, v.index, step)
        self.closed.append((v.index, step))
        return True

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Re-apply the visit ends of a checkpoint's time-budgeted schedule."""
        for index, step in state.get("closed", []):
            self.visits[:] = close(self.visits, int(index), int(step))
            self.closed.append((int(index), int(step)))

    def visit_ends_after(self, step: int) -> bool:
        """True if ``step`` (0-based) is the last step of its visit."""
        return self.current is not None and step + 1 == self.current.end

    def state_dict(self, step: int) -> dict[str, Any]:
        """Where in the schedule the run is (after ``step`` steps), and the ends of its
        time-budgeted visits."""
        v = visit_at(self.visits, step)
        state: dict[str, Any] = {"visit": v.index, "visit_steps_done": step - v.start}
        if self.closed:
            state["closed"] = [list(c) for c in self.closed]
        return state


def reset_optimizer_state(engine: Any) -> None:
    """Forget moments / curvature history of the client optimizer (``optimizer_state: reset``)."""
    optim.reset_state(engine)
