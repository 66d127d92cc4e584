"""Multigrid training through the engine: level switches, resume mid-cycle, 1 vs 2 ranks."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from trainer_util import TINY, losses, train_cases

from pdeds.testing.distributed import run_ranks
from pdeds.train import checkpoint

TWO_LEVELS = [
    "schedule.cycle=half-v",
    "schedule.levels=2",
    "train.steps=4",
    "schedule.level=[{micro_batch: 4, batch: 8, lr_scale: 2.0}, {micro_batch: 1}]",
]


def _switch_body() -> dict:
    """The hook at a level switch (weights untouched, batch sizes as configured) and the LR
    scheduler stepped as DeepSpeed steps it (the level's lr_scale)."""
    from functools import partial

    import torch

    from pdeds.config import resolve, visits_for
    from pdeds.models.unet import build_model
    from pdeds.train.engine import build_engine, init_distributed
    from pdeds.train.hook import LevelHook
    from pdeds.train.lr import build_scheduler

    init_distributed()
    r = resolve(TINY, TWO_LEVELS)
    visits = visits_for(r, 1)
    sched = partial(build_scheduler, r.cfg.train, visits, r.ds)
    engine, _ = build_engine(build_model(3, r.cfg.model), r.cfg, r.ds, lr_scheduler=sched)
    hook = LevelHook(visits, engine)
    out = []
    for step in range(4):
        before = {k: v.clone() for k, v in engine.module.state_dict().items()}
        v = hook.before_step(step)
        same = all(torch.equal(before[k], t) for k, t in engine.module.state_dict().items())
        out.append(
            dict(
                res=v.res,
                same=same,
                micro=engine.train_micro_batch_size_per_gpu(),
                gas=engine.gradient_accumulation_steps(),
                batch=engine.train_batch_size(),
                lr=engine.optimizer.param_groups[0]["lr"],
            )
        )
        engine.lr_scheduler.step()  # what engine.step() does after an optimizer step
    return {"visits": [(v.level, v.res, v.steps) for v in visits], "steps": out}


def test_level_switch_keeps_weights_and_sets_batches():
    out = run_ranks(_switch_body, 1, timeout=120)[0]
    assert out["visits"] == [(0, 8, 2), (1, 16, 2)]
    rows = out["steps"]
    assert all(r["same"] for r in rows)
    assert [(r["res"], r["micro"], r["gas"], r["batch"]) for r in rows] == [
        (8, 4, 2, 8),
        (8, 4, 2, 8),
        (16, 1, 4, 4),
        (16, 1, 4, 4),
    ]
    lr = TINY["optim"]["lr"]
    assert [r["lr"] for r in rows] == pytest.approx([2.0 * lr, 2.0 * lr, lr, lr])


WARMUP = {"warmup_min_lr": 1e-5, "warmup_max_lr": 1e-4, "warmup_num_steps": 3}
DS_SCHEDULER = f"ds.scheduler={{type: WarmupLR, params: {WARMUP}}}".replace("'", "")


def test_two_level_run_logs_levels_and_matches_two_ranks(tmp_path):
    cases = [("mg", TWO_LEVELS), ("mg_ds", [*TWO_LEVELS, DS_SCHEDULER])]
    one = run_ranks(train_cases, 1, str(tmp_path / "one"), cases, timeout=240)[0]
    two = run_ranks(train_cases, 2, str(tmp_path / "two"), [("mg", TWO_LEVELS)], timeout=240)[0]
    rows = [
        json.loads(x) for x in (tmp_path / "one" / "mg" / "metrics.jsonl").read_text().splitlines()
    ]
    steps = [r for r in rows if "loss" in r]
    assert [(r["level"], r["res"], r["micro_batch"], r["batch"]) for r in steps] == [
        (0, 8, 4, 8),
        (0, 8, 4, 8),
        (1, 16, 1, 4),
        (1, 16, 1, 4),
    ]
    evals = [r for r in rows if "val_rel_l2_mean" in r]
    assert [r["step"] for r in evals] == [2, 4]  # end of every visit, at the finest level
    ref = one["mg"]["losses"]
    for step, loss in two["mg"]["losses"].items():
        assert loss == pytest.approx(ref[step], rel=1e-5), step
    # DeepSpeed's scheduler from the JSON drives the lr, the level's lr_scale multiplies it
    from deepspeed.runtime.lr_schedules import WarmupLR

    bare = WarmupLR(torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0), **WARMUP)
    want = []
    for scale in (2.0, 2.0, 1.0, 1.0):
        want.append(bare.get_last_lr()[0] * scale)
        bare.step()
    rows = (tmp_path / "one" / "mg_ds" / "metrics.jsonl").read_text().splitlines()
    got = [json.loads(x)["lr"] for x in rows if '"loss"' in x]
    assert got == pytest.approx(want) and got[0] == pytest.approx(2 * WARMUP["warmup_min_lr"])


def _resume_body(root: str) -> dict:
    from pdeds.config import resolve
    from pdeds.train.trainer import train

    run = Path(root) / "run"
    ov = [
        "schedule.cycle=v",
        "schedule.levels=2",
        "train.steps=9",
        "train.checkpoint_every=2",
        "train.keep_checkpoints=0",
        "optim.name=adam",
    ]
    train(resolve(TINY, ov), run)
    first = losses(run)
    for step in (6, 8, 9):  # the newest complete one is now step 4, in the middle visit
        (run / "checkpoints" / checkpoint.tag_for(step) / checkpoint.MARKER).unlink()
    marker = json.loads((run / "checkpoints" / "step00000004" / checkpoint.MARKER).read_text())
    train(resolve(TINY, ov), run, resume="auto")
    return {"first": first, "second": losses(run), "marker": marker}


def test_resume_mid_cycle_reproduces_the_curve(tmp_path):
    out = run_ranks(_resume_body, 1, str(tmp_path), timeout=240)[0]
    assert out["marker"]["schedule"] == {"visit": 1, "visit_steps_done": 1}
    assert sorted(out["first"]) == list(range(1, 10))
    for step, loss in out["first"].items():
        assert out["second"][step] == pytest.approx(loss, rel=1e-6, abs=1e-9), step
