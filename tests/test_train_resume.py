"""Reliability: exact resume, half-written checkpoints, SIGTERM, non-finite loss."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import pytest
from trainer_util import ROOT, TINY, losses, pdeds, train_cases, write_tiny

from pdeds.testing.distributed import run_ranks
from pdeds.train import checkpoint


def _resume_body(root: str) -> dict:
    """Run 6 steps; drop the newest checkpoint's marker (a crash mid-save); resume."""
    from pathlib import Path

    from pdeds.config import resolve
    from pdeds.train.trainer import train

    run = Path(root) / "run"
    overrides = [
        "optim.name=adam",
        "optim.lr=1e-3",
        "train.steps=6",
        "train.checkpoint_every=2",
        "train.keep_checkpoints=0",
    ]
    train(resolve(TINY, overrides), run)
    first = losses(run)
    (run / "checkpoints" / "step00000006" / checkpoint.MARKER).unlink()
    (run / "checkpoints" / "step00000004" / checkpoint.MARKER).unlink()
    summary = train(resolve(TINY, overrides), run, resume="auto")
    out = {"first": first, "second": losses(run), "summary": summary}
    # A fresh-sample stream, uninterrupted and stopped on time: a budget of 1 us ends after the
    # first step; resumed with it again nothing is left (the clock is in the checkpoint); then
    # with an hour the run goes on to the end.
    fresh = [*overrides, "data.train_samples=0"]
    train(resolve(TINY, fresh), Path(root) / "fresh")
    out["fresh"] = losses(Path(root) / "fresh")
    timed = Path(root) / "timed"
    out["timed"] = [
        train(resolve(TINY, [*fresh, f"train.time_limit={b}"]), timed, resume="auto" if i else None)
        for i, b in enumerate(("1e-6", "1e-6", "1h"))
    ]
    out["timed_losses"] = losses(timed)
    out["timed_marker"] = json.loads((timed / "checkpoints/step00000001/pdeds.json").read_text())
    return out


def test_resume_reproduces_the_loss_curve(tmp_path):
    out = run_ranks(_resume_body, 1, str(tmp_path), timeout=300)[0]
    first, second = out["first"], out["second"]
    assert sorted(first) == sorted(second) == [1, 2, 3, 4, 5, 6]
    for step in first:
        assert second[step] == pytest.approx(first[step], rel=1e-6, abs=1e-9), step
    assert out["summary"]["completed"]
    # on time: stop after step 1, nothing more on the same budget, then continue exactly
    stop, again, rest = out["timed"]
    assert (stop["steps"], stop["stopped"], stop["completed"]) == (1, "time_limit", False)
    assert "val_rel_l2_mean" in stop  # it evaluated before stopping
    assert (again["steps"], again["stopped"]) == (1, "time_limit")
    carried = out["timed_marker"]["train_s"]
    assert 0 < carried <= again["train_time_s"] < carried + 0.5  # no step, no new time
    assert rest["completed"] and rest["stopped"] is None
    assert rest["train_time_s"] > stop["train_time_s"]
    fresh, timed = out["fresh"], out["timed_losses"]
    assert sorted(fresh) == sorted(timed) == list(first)
    for step in fresh:
        assert timed[step] == pytest.approx(fresh[step], rel=1e-6, abs=1e-9), step
    assert fresh[1] != pytest.approx(first[1], rel=1e-3)  # other samples than the fixed set


def test_sigterm_saves_and_exits_zero_then_resumes(tmp_path):
    cfg = write_tiny(tmp_path / "c.yaml", train={"steps": 100000, "log_every": 1})
    run = tmp_path / "run"
    proc = subprocess.Popen(
        [sys.executable, "-m", "pdeds", "train", str(cfg), "--run-dir", str(run)],
        cwd=ROOT,
        env={**__import__("os").environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    deadline = time.monotonic() + 120
    metrics = run / "metrics.jsonl"
    while time.monotonic() < deadline and not (metrics.is_file() and metrics.read_text()):
        time.sleep(0.2)
    assert metrics.is_file(), "training never logged a step"
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out
    ck = checkpoint.latest(run / "checkpoints")
    assert ck is not None, out
    step = json.loads((ck / checkpoint.MARKER).read_text())["step"]
    assert 1 <= step < 100000
    assert "stop requested" in out
    r = pdeds(
        "train", str(cfg), "--run-dir", str(run), "--resume", "auto",
        "--set", f"train.steps={step + 2}", "--time-limit", "1h",
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert max(losses(run)) == step + 2
    assert "time limit 1h00m" in r.stdout and "eta " in r.stdout  # the plain progress line


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
    cfg = write_tiny(
        tmp_path / "c.yaml",
        optim={"name": "sgd", "lr": 1.0e12, "momentum": 0.0},
        train={"steps": 50, "checkpoint_every": 1},
    )
    run = tmp_path / "run"
    r = pdeds("train", str(cfg), "--run-dir", str(run))
    assert r.returncode == 2
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("pdeds: error: non-finite loss") and "at step" in last
    assert "Traceback" not in r.stderr
    good = checkpoint.latest(run / "checkpoints")
    assert good is not None and good.name in last


def test_run_dir_guard_resume_and_force(tmp_path):
    out = run_ranks(train_cases, 1, str(tmp_path), [("run", [])], timeout=240)[0]
    assert out["run"]["summary"]["completed"]
    cfg = write_tiny(tmp_path / "c.yaml")
    run = tmp_path / "run"
    r = pdeds("train", str(cfg), "--run-dir", str(run))
    assert r.returncode == 2 and "already holds a run" in r.stderr and "--force" in r.stderr
    other = write_tiny(tmp_path / "o.yaml", model={"width": 8})
    r = pdeds("train", str(other), "--run-dir", str(run), "--resume", "auto")
    assert r.returncode == 2 and "differs from the run" in r.stderr and "model" in r.stderr
    before = sorted(p.name for p in run.iterdir() if p.name != "pdeds.lock")  # the lock stays
    r = pdeds("train", str(cfg), "--run-dir", str(run), "--force", "--set", "train.steps=1")
    assert r.returncode == 0, r.stderr
    aside = [p for p in tmp_path.iterdir() if p.name.startswith("run.replaced-")]
    assert len(aside) == 1 and sorted(p.name for p in aside[0].iterdir()) == before


def test_held_out_set_from_a_data_file(tmp_path):
    from pdeds.cli import main

    held = tmp_path / "held.h5"
    seed = 1_000_003  # data.val_seed: the same vectors the trainer would draw
    args = ["data", "--out", str(held), "--samples", "2", "--seed", str(seed), "--res", "16"]
    assert main([*args, "--reference"]) == 0
    cases = [("drawn", []), ("file", [f"data.val_path={held}"])]
    out = run_ranks(train_cases, 1, str(tmp_path), cases, timeout=240)[0]
    a, b = out["drawn"]["summary"], out["file"]["summary"]
    assert b["val_rel_l2_mean"] == pytest.approx(a["val_rel_l2_mean"], rel=1e-9)
    assert not (tmp_path / "file" / "cache").exists()
    r = pdeds(
        "train", str(write_tiny(tmp_path / "c.yaml")), "--run-dir", str(tmp_path / "bad"),
        "--set", f"data.val_path={held}", "--set", "train.eval_res=24",
    )  # fmt: skip
    assert r.returncode == 2 and "resolution" in r.stderr and "16" in r.stderr
