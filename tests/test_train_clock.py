"""The training clock: evaluation excluded, the budget, the ETA, carried across a resume."""

from __future__ import annotations

import signal

import pytest

from pdeds.train.clock import StopRequest, TrainClock, fmt_duration


class FakeTime:
    """A time source the test moves by hand."""

    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def test_clock_excludes_evaluation_and_stops_on_budget():
    t = FakeTime()
    clock = TrainClock(10.0, now=t, window=2)
    t.t += 50.0  # start-up before the loop is not training time
    clock.start()
    for _ in range(2):
        t.t += 3.0
        clock.step_done(evaluated=4)
    assert clock.train_s == 6.0 and clock.evaluated == 8 and not clock.time_up
    assert clock.eta(100) == pytest.approx(4.0)  # 300 s at 3 s/step, capped by the budget
    with clock.paused():
        t.t += 1000.0  # a held-out evaluation
    t.t += 1.0
    clock.step_done(evaluated=4)
    assert clock.train_s == 7.0 and not clock.time_up
    assert clock.eta(1) == pytest.approx((7.0 - 3.0) / 2)  # rate of the last 2 steps
    t.t += 3.0
    clock.step_done(evaluated=4)
    assert clock.train_s == 10.0 and clock.time_up and clock.eta(5) == 0.0
    resumed = TrainClock(20.0, now=t)
    resumed.load_state_dict(clock.state_dict())
    assert resumed.train_s == 10.0 and resumed.evaluated == 16 and not resumed.time_up
    assert resumed.eta(3) is None  # no rate before a step of this run
    assert TrainClock(None, now=t).time_up is False


def test_stop_request_agrees_on_signal_then_time():
    t = FakeTime()
    clock = TrainClock(1.0, now=t)
    stop = StopRequest()
    try:
        assert stop.agreed(clock) is None
        clock.start()
        t.t += 2.0
        clock.step_done(1)
        assert stop.agreed(clock) == "time_limit"
        signal.raise_signal(signal.SIGTERM)
        assert stop.flag and stop.agreed(clock) == "signal"
    finally:
        stop.restore()


def test_fmt_duration():
    assert [fmt_duration(s) for s in (0.2, 42, 250, 3600 + 5 * 60 + 9)] == [
        "0s",
        "42s",
        "4m10s",
        "1h05m",
    ]
