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
    # The same run scored at 24^3 against the multigrid-CG reference, then (fresh cache) AMG.
    g = pdeds("eval", str(run), "--samples", "2", "--res", "24", "--reference", "gmg")
    assert g.returncode == 0 and "reference (multigrid-CG)" in g.stdout, g.stderr
    by_gmg = json.loads((run / "eval_res24.json").read_text())
    assert by_gmg["reference"] == "gmg"
    for cached in (run / "cache").glob("*res24*"):
        cached.unlink()
    a = pdeds("eval", str(run), "--samples", "2", "--res", "24")
    assert a.returncode == 0, a.stderr
    by_amg = json.loads((run / "eval_res24.json").read_text())
    assert abs(by_gmg["val_rel_l2_mean"] - by_amg["val_rel_l2_mean"]) < 1e-7

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
    bad = pdeds("predict", str(run), "--seed", "5", "--res", "6", "--out", str(tmp_path / "x.h5"))
    assert bad.returncode == 2 and "resolution n=6" in bad.stderr


def test_cli_errors_are_one_line(tmp_path):
    cases = [
        (["train", str(tmp_path / "missing.yaml")], "not found"),
        (["train", str(write_tiny(tmp_path / "a.yaml")), "--set", "model.nrom=x"], "valid keys"),
        (["train", str(write_tiny(tmp_path / "b.yaml")), "--set", "problem.res=6"], "core grid"),
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


def test_launchers_check_once_before_starting_ranks(tmp_path):
    """``pdeds train --check-only --ranks N`` runs the start-up checks for N ranks and writes
    nothing; launch/local and launch/multinode run it once, so a bad input is one error line
    and no rank (nor DeepSpeed's launcher) starts."""
    cfg = write_tiny(tmp_path / "c.yaml")  # global batch 4, micro-batch 2
    run = tmp_path / "run"
    ok = pdeds("train", str(cfg), "--run-dir", str(run), "--check-only", "--ranks", "2")
    assert ok.returncode == 0, ok.stderr
    assert "check ok: 2 rank(s), global batch 4 = 2 x 1 x 2" in ok.stdout
    assert "starts at step 0" in ok.stdout and not run.exists()
    bad = pdeds("train", str(cfg), "--run-dir", str(run), "--check-only", "--ranks", "3")
    assert bad.returncode == 2 and "not divisible by micro-batch 2 x 3 rank(s)" in bad.stderr
    lone = pdeds("train", str(cfg), "--run-dir", str(run), "--ranks", "3")
    assert lone.returncode == 2 and "--ranks goes with --check-only" in lone.stderr
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.yaml").write_text("problem: {}\n")
    held = pdeds("train", str(cfg), "--run-dir", str(run), "--check-only")
    assert held.returncode == 2 and "already holds a run" in held.stderr
    assert sorted(p.name for p in run.iterdir()) == ["checkpoints", "config.yaml"]

    hosts = tmp_path / "hosts"
    hosts.write_text("# two nodes\nnode-a slots=2\nnode-b slots=1\n")
    env = dict(os.environ, DS_ACCELERATOR="cpu")
    for argv in (
        [str(ROOT / "launch" / "local"), "3", str(cfg), "--run-dir", str(tmp_path / "r3")],
        [
            str(ROOT / "launch" / "multinode"),
            str(hosts),
            str(cfg),
            "--run-dir",
            str(tmp_path / "r3"),
        ],
    ):
        r = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
        assert r.returncode == 2, r.stdout[-2000:] + r.stderr[-2000:]
        errors = [x for x in (r.stdout + r.stderr).splitlines() if "error" in x.lower()]
        assert len(errors) == 1 and errors[0].startswith("pdeds: error:"), errors
        assert "micro-batch 2 x 3 rank(s)" in errors[0], errors  # multinode: 2 + 1 slots
        assert "deepspeed" not in r.stdout.lower() and not (tmp_path / "r3").exists()


def test_slurm_script_checks_then_starts_one_launcher_per_node(tmp_path):
    """launch/slurm/cpu_cluster.sh under a fake SLURM (srun and scontrol on PATH): the check
    runs once for nodes x ranks per node; only when it passes is srun called, with a hostfile
    of the job's nodes and one deepspeed launcher per node."""
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "scontrol").write_text("#!/bin/sh\nprintf 'n1\\nn2\\n'\n")
    (fake / "srun").write_text(f"#!/bin/sh\nprintf '%s\\n' \"$@\" > {tmp_path / 'srun.txt'}\n")
    for f in fake.iterdir():
        f.chmod(0o755)
    cfg = write_tiny(tmp_path / "c.yaml")  # global batch 4, micro-batch 2
    job = f"test{os.getpid()}"
    env = dict(
        os.environ,
        PATH=f"{fake}:{os.environ['PATH']}",
        SLURM_SUBMIT_DIR=str(ROOT),
        SLURM_NNODES="2",
        SLURM_JOB_NODELIST="n[1-2]",
        SLURM_JOB_ID=job,
        THREADS="1",
    )
    argv = ["bash", str(ROOT / "launch/slurm/cpu_cluster.sh"), str(cfg), "--run-dir", "r"]
    hostfile = ROOT / "runs" / f"hostfile-{job}"
    try:
        r = subprocess.run(
            argv, env=dict(env, RANKS_PER_NODE="3"), capture_output=True, text=True, timeout=120
        )
        assert r.returncode == 2 and "micro-batch 2 x 6 rank(s)" in r.stderr, r.stderr
        assert not (tmp_path / "srun.txt").exists()
        r = subprocess.run(
            argv, env=dict(env, RANKS_PER_NODE="1"), capture_output=True, text=True, timeout=120
        )
        assert r.returncode == 0, r.stdout + r.stderr
        assert "check ok: 2 rank(s), global batch 4 = 2 x 1 x 2" in r.stdout
        call = (tmp_path / "srun.txt").read_text()
        assert call.startswith("--kill-on-bad-exit=1\nbash\n-c\ndeepspeed --hostfile ")
        assert "--no_ssh" in call and "--node_rank $SLURM_NODEID" in call
        assert "--master_addr n1" in call and "--module pdeds train" in call
        assert hostfile.read_text() == "n1 slots=1\nn2 slots=1\n"
    finally:
        hostfile.unlink(missing_ok=True)


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
