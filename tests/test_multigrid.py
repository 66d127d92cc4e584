"""Multigrid visit sequences (METHOD.md sec. 5) and the visit plan."""

from __future__ import annotations

import pytest

from pdeds.config import build
from pdeds.errors import PdedsError
from pdeds.multigrid import ScheduleConfig, plan, visit_at, visits

EXPECTED = {
    "half-v": {1: [0], 2: [0, 1], 3: [0, 1, 2], 4: [0, 1, 2, 3]},
    "v": {1: [0], 2: [1, 0, 1], 3: [2, 1, 0, 1, 2], 4: [3, 2, 1, 0, 1, 2, 3]},
    "w": {
        1: [0],
        2: [1, 0, 1],
        3: [2, 1, 0, 1, 0, 1, 2],
        4: [3, 2, 1, 0, 1, 0, 1, 2, 1, 0, 1, 0, 1, 2, 3],
    },
    "f": {
        1: [0],
        2: [1, 0, 1],
        3: [2, 1, 0, 1, 0, 1, 2],
        4: [3, 2, 1, 0, 1, 0, 1, 2, 1, 0, 1, 2, 3],
    },
}


@pytest.mark.parametrize("cycle", sorted(EXPECTED))
@pytest.mark.parametrize("levels", [1, 2, 3, 4])
def test_visit_sequences(cycle, levels):
    assert visits(cycle, levels) == EXPECTED[cycle][levels]


def test_custom_merges_repeats_and_errors():
    assert visits("custom", [2, 2, 0, 1, 1, 2]) == [2, 0, 1, 2]
    with pytest.raises(PdedsError, match="unknown cycle"):
        visits("zigzag", 3)
    with pytest.raises(PdedsError, match="integer >= 1"):
        visits("v", 0)
    with pytest.raises(PdedsError, match="custom cycle"):
        visits("custom", [])


def _schedule(**kw) -> ScheduleConfig:
    s = build(ScheduleConfig, kw, "schedule")
    s.validate()
    return s


def test_plan_shares_steps_by_coarse_factor():
    s = _schedule(cycle="v", levels=3, coarse_factor=2.0)
    v = plan(s, finest_res=64, total_steps=40, samples=16, batch=4, micro_batch=2, world=1)
    assert [x.level for x in v] == [2, 1, 0, 1, 2]
    assert [x.res for x in v] == [64, 32, 16, 32, 64]
    assert [x.steps for x in v] == [4, 8, 16, 8, 4]  # weights 1 2 4 2 1
    assert [x.start for x in v] == [0, 4, 12, 28, 36]
    assert visit_at(v, 11).level == 1 and visit_at(v, 12).level == 0 and visit_at(v, 99) is v[-1]
    assert v[2].sample_offset == 12 * 4


def test_plan_absolute_budgets_and_level_batches():
    s = _schedule(
        cycle="half-v",
        levels=2,
        level=[
            {"micro_batch": 4, "batch": 8, "lr_scale": 2.0, "epochs": 1.0},
            {"steps": 5},
        ],
    )
    v = plan(s, finest_res=32, total_steps=999, samples=20, batch=4, micro_batch=2, world=2)
    assert [(x.res, x.steps, x.batch, x.micro_batch, x.lr_scale) for x in v] == [
        (16, 3, 8, 4, 2.0),
        (32, 5, 4, 2, 1.0),
    ]


def test_schedule_validation_errors():
    with pytest.raises(PdedsError, match="2 entries for 3 levels"):
        _schedule(cycle="v", levels=3, level=[{}, {}])
    with pytest.raises(PdedsError, match="every level a steps, epochs or time budget"):
        _schedule(cycle="v", levels=2, level=[{"steps": 3}, {}])
    with pytest.raises(PdedsError, match="must increase"):
        _schedule(cycle="v", levels=2, resolutions=[32, 16])
    with pytest.raises(PdedsError, match="keep, reset"):
        _schedule(optimizer_state="forget")
    s = _schedule(cycle="w", levels=3)
    with pytest.raises(PdedsError, match="fewer than the 7 visits"):
        plan(s, finest_res=64, total_steps=5, samples=8, batch=4, micro_batch=2, world=1)
    s = _schedule(cycle="half-v", levels=2, level=[{"batch": 6, "micro_batch": 4}, {}])
    with pytest.raises(PdedsError, match="not divisible by micro-batch 4"):
        plan(s, finest_res=32, total_steps=4, samples=8, batch=4, micro_batch=2, world=1)
