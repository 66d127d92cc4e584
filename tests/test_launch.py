"""End to end through the real launch script, then eval and predict on the run."""

from __future__ import annotations

import json
import os
import subprocess
import xml.etree.ElementTree as ET

import h5py
from trainer_util import ROOT, losses, pdeds, write_tiny


def test_launch_local_two_ranks_then_eval_and_predict(tmp_path):
    cfg = write_tiny(tmp_path / "c.yaml", train={"steps": 3, "checkpoint_every": 2})
    run = tmp_path / "run"
    r = subprocess.run(
        [str(ROOT / "launch" / "local"), "2", str(cfg), "--run-dir", str(run)],
        cwd=tmp_path,
        env=dict(os.environ, DS_ACCELERATOR="cpu"),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "2 rank(s)" in r.stdout
    for name in ("config.yaml", "ds_config.json", "metrics.jsonl", "summary.json", "tb"):
        assert (run / name).exists(), name
    assert sorted(losses(run)) == [1, 2, 3]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["completed"]
    ds = json.loads((run / "ds_config.json").read_text())
    assert ds["zero_allow_untested_optimizer"] is True

    e = pdeds("eval", str(run), "--samples", "2")
    assert e.returncode == 0, e.stderr
    assert "lifting baseline" in e.stdout and "reference (AMG-CG)" in e.stdout
    scores = json.loads((run / "eval_res16.json").read_text())
    assert scores["samples"] == 2 and 0 < scores["val_rel_l2_mean"] < 1
    assert abs(scores["val_rel_l2_mean"] - summary["val_rel_l2_mean"]) < 1e-6

    out = tmp_path / "pred.h5"
    p = pdeds(
        "predict", str(run), "--seed", "5", "--samples", "2", "--res", "24", "--out", str(out)
    )
    assert p.returncode == 0, p.stderr
    with h5py.File(out) as f:
        u = f["res_24/u_pred"][...]
        assert u.shape == (2, 1, 24, 24, 24)
        assert (u[:, :, 0] == 1).all() and (u[:, :, -1] == 0).all()
    ET.parse(out.with_suffix(".xdmf"))
    again = pdeds("predict", str(run), "--seed", "5", "--res", "24", "--out", str(out))
    assert again.returncode == 2 and "--force" in again.stderr
    bad = pdeds("predict", str(run), "--seed", "5", "--res", "18", "--out", str(tmp_path / "x.h5"))
    assert bad.returncode == 2 and "resolution n=18" in bad.stderr


def test_cli_errors_are_one_line(tmp_path):
    cases = [
        (["train", str(tmp_path / "missing.yaml")], "not found"),
        (["train", str(write_tiny(tmp_path / "a.yaml")), "--set", "model.nrom=x"], "valid keys"),
        (["train", str(write_tiny(tmp_path / "b.yaml")), "--set", "problem.res=18"], "multiple of"),
        (["train", str(write_tiny(tmp_path / "c.yaml")), "--set", "ds.train_batch_size=3"], "ds."),
        (["eval", str(tmp_path)], "not a pdeds run directory"),
    ]
    for args, match in cases:
        if args[0] == "train":
            args = [*args, "--run-dir", str(tmp_path / "run")]
        r = pdeds(*args)
        assert r.returncode == 2, args
        lines = r.stderr.strip().splitlines()
        assert lines[-1].startswith("pdeds: error:") and match in lines[-1], r.stderr
        assert "Traceback" not in r.stderr


def test_torchrun_runs_the_same_module(tmp_path):
    cfg = write_tiny(tmp_path / "c.yaml", train={"steps": 2})
    run = tmp_path / "run"
    torchrun = ROOT / ".venv" / "bin" / "torchrun"
    exe = str(torchrun) if torchrun.exists() else "torchrun"
    r = subprocess.run(
        [exe, "--nproc_per_node", "2", "-m", "pdeds", "train", str(cfg), "--run-dir", str(run)],
        cwd=tmp_path,
        env=dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1"),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert json.loads((run / "summary.json").read_text())["world_size"] == 2
