"""Time-budgeted multigrid schedules: each level's visits get their share of train.time_limit,
whatever the machine's speed; the ends are decided on the agreed clock and survive a resume."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
from test_train_step import TINY2, FakeEngine

from pdeds.config import resolve, visits_for
from pdeds.multigrid import OPEN, close
from pdeds.train.hook import LevelHook

TIMED = [
    "schedule.cycle=half-v",
    "schedule.levels=2",
    "schedule.resolutions=[8, 16]",
    "schedule.level=[{time: 3, batch: 4}, {time: 1, batch: 2}]",
    "train.time_limit=40",
    "ds.train_batch_size=4",
    "ds.train_micro_batch_size_per_gpu=2",
]


def test_levels_share_the_budget_and_a_visit_ends_where_it_is_closed():
    visits = visits_for(resolve(TINY2, TIMED), 1)
    assert [(v.res, v.steps, v.until_s) for v in visits] == [(8, OPEN, 30.0), (16, OPEN, 40.0)]
    ended = close(visits, 0, 7)
    assert (ended[0].start, ended[0].end, ended[0].steps) == (0, 7, 7)
    assert (ended[1].start, ended[1].sample_offset, ended[1].steps) == (7, 7 * 4, OPEN)
    assert ended[1].batch == 2 and ended[1].until_s == 40.0


def test_time_shares_need_a_budget_and_are_not_mixed_with_steps():
    from pdeds.errors import PdedsError

    no_budget = [o for o in TIMED if not o.startswith("train.time_limit")]
    with pytest.raises(PdedsError, match="need train.time_limit"):
        visits_for(resolve(TINY2, no_budget), 1)
    mixed = TIMED + ["schedule.level=[{time: 3}, {steps: 5}]"]
    with pytest.raises(PdedsError, match="steps, epochs or time budget"):
        resolve(TINY2, mixed)


class Engine(FakeEngine):
    """FakeEngine that also saves (an empty checkpoint folder, as DeepSpeed would fill)."""

    def save_checkpoint(self, root: str, tag: str, client_state: dict) -> None:
        (Path(root) / tag).mkdir(parents=True, exist_ok=True)


def test_hook_closes_on_the_agreed_clock_and_its_state_reapplies_the_ends():
    visits = visits_for(resolve(TINY2, TIMED), 1)
    hook = LevelHook(visits, FakeEngine(__import__("torch").nn.Linear(1, 1), 0.1))
    hook.before_step(0)
    assert not hook.maybe_close(1, 29.9)
    assert hook.maybe_close(5, 30.0) and visits[0].end == 5 and visits[1].start == 5
    hook.before_step(5)
    assert not hook.maybe_close(9, 1e9)  # the last visit ends with the run's own budget
    state = hook.state_dict(9)
    fresh = visits_for(resolve(TINY2, TIMED), 1)
    LevelHook(fresh, None).load_state_dict(state)
    assert fresh == visits


def test_a_timed_run_spends_each_share_and_anneals_by_the_budget(tmp_path):
    import torch

    from pdeds.models import build_model
    from pdeds.train.lr import build_scheduler
    from pdeds.train.trainer import Trainer, preflight

    extra = ["train.lr_schedule=cosine", "train.warmup_steps=0", "train.loss_weighting=lifting"]
    res = resolve(TINY2, TIMED + extra + ["optim.lr=1e-3"])
    setup = preflight(res, tmp_path / "run", 1)
    (tmp_path / "run").mkdir()
    torch.manual_seed(0)
    engine = Engine(build_model(2, res.cfg.model), lr=res.cfg.optim.lr)
    ticks = iter(float(t) for t in range(0, 100_000))  # 1 s per clock reading
    trainer = Trainer(setup, engine=engine, now=lambda: next(ticks))
    engine.lr_scheduler = build_scheduler(
        res.cfg.train, setup.visits, res.ds, engine.optimizer, clock=trainer.clock
    )
    visits_before = copy.deepcopy(setup.visits)
    summary = trainer.train()
    assert summary["stopped"] == "time_limit"
    first, second = setup.visits
    assert first.end < OPEN and second.steps == OPEN and visits_before[0].steps == OPEN
    rows = [__import__("json").loads(x) for x in (tmp_path / "run/metrics.jsonl").open()]
    steps = [r for r in rows if "loss" in r]
    # the switch came at the first step whose agreed training time reached 3/4 of the budget
    switch = next(r for r in steps if r["res"] == 16)
    last8 = [r for r in steps if r["res"] == 8][-1]
    assert last8["train_s"] >= 30.0 > [r for r in steps if r["res"] == 8][-2]["train_s"] - 1.0
    assert switch["step"] == first.end + 1
    # an evaluation at the visit's end and at the stop; the cosine ran out with the budget
    evals = [r["step"] for r in rows if "val_rel_l2_mean" in r]
    assert first.end in evals and summary["steps"] in evals
    rates = [r["lr"] for r in steps]
    assert rates == sorted(rates, reverse=True) and rates[-1] < 0.1 * res.cfg.optim.lr
