"""When a run stops: the training clock and its budget, stop signals, and the ETA.

``train_s`` is the wall time of the training loop with held-out evaluation excluded (steps,
logging and checkpoints count), carried across resumes in the checkpoint. With
``train.time_limit`` T the run stops after the first step that ends with train_s >= T. Every
rank stops at the same step: ``StopRequest.agreed`` all-reduces (signalled, time up, train_s)
once per step, so ranks whose clocks differ slightly still agree, on stopping and on the
training time the LR schedule follows (``agreed_s``). The ETA is

    eta = min(steps left x recent seconds per step,  T - train_s)

with the rate taken over the last ``window`` steps of train_s.
"""

from __future__ import annotations

import signal
import time
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch

from pdeds import distributed


class TrainClock:
    """Training wall time (evaluation excluded), samples evaluated, and the time budget.

    Args:
        limit_s: the budget T in seconds, or None.
        now: the time source (seconds; a test passes a fake one).
        window: steps over which the recent rate is taken.
    """

    def __init__(
        self, limit_s: float | None, *, now: Callable[[], float] = time.perf_counter, window=20
    ) -> None:
        self.limit_s = limit_s
        self.now = now
        self.train_s = 0.0
        self.agreed_s = 0.0
        """train_s as every rank agreed on it at the last ``StopRequest.agreed`` (their max)."""
        self.evaluated = 0
        self._mark = now()
        self._recent: deque[float] = deque(maxlen=window + 1)

    def start(self) -> None:
        """Count from now (the loop begins)."""
        self._mark = self.now()
        self._recent.clear()
        self._recent.append(self.train_s)

    def _charge(self) -> None:
        t = self.now()
        self.train_s += t - self._mark
        self._mark = t

    def step_done(self, evaluated: int) -> None:
        """A step ended; it evaluated ``evaluated`` samples (L-BFGS: every line-search pass)."""
        self._charge()
        self.evaluated += evaluated
        self._recent.append(self.train_s)

    @contextmanager
    def paused(self) -> Iterator[None]:
        """Time spent inside (evaluation) is not training time."""
        self._charge()
        try:
            yield
        finally:
            self._mark = self.now()

    @property
    def time_up(self) -> bool:
        return self.limit_s is not None and self.train_s >= self.limit_s

    def eta(self, steps_left: int) -> float | None:
        """Seconds to the end of the run (or of the budget, if sooner); None before a rate."""
        if len(self._recent) < 2:
            return None
        rate = (self._recent[-1] - self._recent[0]) / (len(self._recent) - 1)
        eta = steps_left * rate
        return eta if self.limit_s is None else max(0.0, min(eta, self.limit_s - self.train_s))

    def state_dict(self) -> dict[str, Any]:
        """The clock up to now (what a checkpoint carries to the resumed run)."""
        self._charge()
        return {"train_s": self.train_s, "evaluated": self.evaluated}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.train_s = self.agreed_s = float(state.get("train_s", 0.0))
        self.evaluated = int(state.get("evaluated", 0))


def fmt_duration(seconds: float) -> str:
    """1h05m, 4m10s, 42s."""
    s = round(seconds)
    if s >= 3600:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


class StopRequest:
    """SIGTERM/SIGINT set a flag; the loop finishes the step, checkpoints and exits 0."""

    def __init__(self) -> None:
        self.flag = False
        sigs = (signal.SIGTERM, signal.SIGINT)
        self._old = {sig: signal.signal(sig, self._handle) for sig in sigs}

    def _handle(self, signum: int, frame: Any) -> None:
        self.flag = True

    def agreed(self, clock: TrainClock) -> str | None:
        """ "signal" or "time_limit" on every rank if any rank was signalled or out of time,
        else None; also sets ``clock.agreed_s`` (one all-reduce of three scalars)."""
        flags = torch.tensor([float(self.flag), float(clock.time_up), clock.train_s])
        signalled, out_of_time, clock.agreed_s = distributed.all_reduce_max(flags).tolist()
        return "signal" if signalled else "time_limit" if out_of_time else None

    def restore(self) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)
