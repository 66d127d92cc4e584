"""The LR schedule: lr(s) = optim.lr x warmup x decay x level scale, through a torch scheduler."""

from __future__ import annotations

import math

import pytest
import torch

from pdeds.config import resolve, visits_for
from pdeds.config.schema import TrainConfig
from pdeds.train.lr import LevelScaled, build_scheduler, lr_factor, schedule_lambda

V2 = ["schedule.cycle=half-v", "schedule.levels=2", "train.steps=10"]
SCALED = "schedule.level=[{lr_scale: 4.0}, {lr_scale: 1.0}]"


def _optimizer(lr: float = 0.5) -> torch.optim.Optimizer:
    return torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=lr)


def _rates(sched, steps: int) -> list[float]:
    """The lr of steps 0 .. steps-1 when the scheduler is stepped after each (as DeepSpeed)."""
    out = []
    for _ in range(steps):
        out.append(sched.optimizer.param_groups[0]["lr"])
        sched.optimizer.step()
        sched.step()
    return out


def test_warmup_and_cosine_factor():
    c = resolve(None, ["train.lr_schedule=cosine", "train.min_lr_ratio=0.1"]).cfg.train
    assert lr_factor(c, 0, 100) == pytest.approx(1.0)
    assert lr_factor(c, 50, 100) == pytest.approx(0.55)  # 0.1 + 0.9 (1 + cos(pi/2)) / 2
    assert lr_factor(c, 100, 100) == pytest.approx(0.1)
    w = resolve(None, ["train.warmup_steps=4"]).cfg.train
    assert [lr_factor(w, s, 10) for s in range(5)] == [0.25, 0.5, 0.75, 1.0, 1.0]


def test_scheduler_lambda_includes_the_level_scale():
    r = resolve(None, [*V2, SCALED, "train.lr_schedule=cosine", "train.warmup_steps=2"])
    visits = visits_for(r, 1)
    assert [(v.start, v.end) for v in visits] == [(0, 5), (5, 10)]
    lam = schedule_lambda(r.cfg.train, visits)
    for s in range(10):
        cosine = 0.5 * (1 + math.cos(math.pi * s / 10))
        want = min(1.0, (s + 1) / 2) * cosine * (4.0 if s < 5 else 1.0)
        assert lam(s) == pytest.approx(want), s
    sched = build_scheduler(r.cfg.train, visits, r.ds, _optimizer(0.5))
    assert _rates(sched, 10) == pytest.approx([0.5 * lam(s) for s in range(10)])


def test_apply_after_resume_uses_this_runs_schedule():
    """A resumed run with more steps: the checkpoint's lr is replaced by this run's lr(s)."""
    short = resolve(None, ["train.lr_schedule=cosine", "train.steps=10"])
    long = resolve(None, ["train.lr_schedule=cosine", "train.steps=40"])
    a = build_scheduler(short.cfg.train, visits_for(short, 1), short.ds, _optimizer())
    _rates(a, 6)
    want = 0.5 * 0.5 * (1 + math.cos(math.pi * 6 / 40))
    for state in (a.state_dict(), None):  # None: a checkpoint of pdeds 0.1
        b = build_scheduler(long.cfg.train, visits_for(long, 1), long.ds, _optimizer())
        b.load_state_dict(state)
        b.optimizer.param_groups[0]["lr"] = a.optimizer.param_groups[0]["lr"]  # optimizer state
        b.seek(6)
        assert _rates(b, 2) == pytest.approx([want, 0.25 * (1 + math.cos(math.pi * 7 / 40))])


def test_deepspeed_scheduler_block_times_the_level_scale():
    from deepspeed.runtime.lr_schedules import WarmupLR

    params = {"warmup_min_lr": 0.0, "warmup_max_lr": 0.2, "warmup_num_steps": 4}
    block = f"ds.scheduler={{type: WarmupLR, params: {params}}}".replace("'", "")
    r = resolve(None, [*V2, SCALED, block])
    sched = build_scheduler(r.cfg.train, visits_for(r, 1), r.ds, _optimizer())
    assert isinstance(sched, LevelScaled)
    got = _rates(sched, 10)
    bare = WarmupLR(_optimizer(), **params)  # DeepSpeed's own, on its own optimizer
    want = [s * (4.0 if i < 5 else 1.0) for i, s in enumerate(_rates(bare, 10))]
    assert got == pytest.approx(want) and max(want) > 0.2  # the scale did multiply
    for state in (sched.state_dict(), bare.state_dict()):  # bare: a checkpoint of pdeds 0.1
        again = build_scheduler(r.cfg.train, visits_for(r, 1), r.ds, _optimizer())
        again.load_state_dict(state)
        again.seek(10)
        assert again.optimizer.param_groups[0]["lr"] == pytest.approx(bare.get_last_lr()[0])


def test_unknown_deepspeed_scheduler_is_refused():
    from pdeds.errors import PdedsError
    from pdeds.train.lr import scheduler_class

    with pytest.raises(PdedsError, match="ds.scheduler.type: DeepSpeed knows no LR scheduler"):
        scheduler_class("WarmupLRR")


def test_with_a_time_budget_the_cosine_ends_with_the_budget():
    """t = max(s / S, train_s / T): the decay follows whichever runs out first."""
    c = TrainConfig(lr_schedule="cosine", time_limit="100s")
    assert lr_factor(c, 10, 1000, spent_s=50.0) == pytest.approx(0.5)  # half the budget
    assert lr_factor(c, 900, 1000, spent_s=10.0) == pytest.approx(lr_factor(c, 900, 1000))
    assert lr_factor(c, 10, 1000, spent_s=150.0) == pytest.approx(0.0)
    assert lr_factor(TrainConfig(lr_schedule="cosine"), 10, 1000, spent_s=1e9) > 0.99

    class Clock:
        agreed_s = 25.0

    r = resolve(None, ["train.lr_schedule=cosine", "train.time_limit=100", "train.steps=1000"])
    lam = schedule_lambda(r.cfg.train, visits_for(r, 1), Clock())
    assert lam(0) == pytest.approx(0.5 * (1 + math.cos(math.pi / 4)))
