"""Inputs that used to pass silently or fail late: each is one ``PdedsError`` up front."""

from __future__ import annotations

import time

import pytest
from trainer_util import TINY

from pdeds.config import resolve
from pdeds.errors import PdedsError
from pdeds.plan.planner import schedule_levels
from pdeds.train.trainer import preflight


def _refused(overrides: list[str], tmp_path, world: int = 1, **kw) -> str:
    with pytest.raises(PdedsError) as err:
        preflight(resolve(TINY, overrides), tmp_path / "run", world, **kw)
    assert "\n" not in str(err.value)
    return str(err.value)


def test_global_batch_larger_than_training_set_plan_and_check_agree(tmp_path):
    msg = _refused(["data.train_samples=3"], tmp_path, memory=False)
    assert "global batch of 4 is larger than the 3 training samples" in msg
    with pytest.raises(PdedsError) as plan_err:
        schedule_levels(resolve(TINY, ["data.train_samples=3"]), 1)
    assert str(plan_err.value) == msg
    preflight(resolve(TINY, ["data.train_samples=4"]), tmp_path / "ok", 1, memory=False)


def test_plan_and_check_agree_on_three_ranks(tmp_path):
    msg = _refused([], tmp_path, world=3, memory=False)
    assert "not divisible" in msg
    with pytest.raises(PdedsError, match="not divisible") as plan_err:
        schedule_levels(resolve(TINY), 3)
    assert str(plan_err.value) == msg


def test_empty_yaml_is_refused(tmp_path):
    empty = tmp_path / "empty.yaml"
    empty.write_text("# nothing yet\n")
    with pytest.raises(PdedsError, match=r"empty\.yaml is empty; .*quickstart\.yaml"):
        resolve(empty)
    (tmp_path / "defaults.yaml").write_text("{}\n")
    assert resolve(tmp_path / "defaults.yaml").cfg.problem.dim == 3  # `{}`: every default


def test_huge_held_out_and_training_sets_name_their_memory(tmp_path):
    t0 = time.perf_counter()
    msg = _refused(["data.val_samples=100000000"], tmp_path)
    assert "data.val_samples 100,000,000" in msg and "8.95 TiB" in msg and "available" in msg
    msg = _refused(["data.train_samples=1000000000000"], tmp_path, memory=False)
    assert "data.train_samples 1,000,000,000,000" in msg and "58.2 TiB" in msg
    assert "set it to 0" in msg
    assert time.perf_counter() - t0 < 10  # refused, not allocated or solved
