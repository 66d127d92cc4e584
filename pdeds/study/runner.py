"""Run the runs that fit here one after another through ``launch/local``; skip or resume them.

A run directory's state decides what happens to it: ``done`` (summary.json says completed) is
skipped, ``partial`` (it holds a run) resumes with ``--resume auto``, ``other`` (files but no
run) is moved aside with ``--force``, ``new`` starts.
"""

from __future__ import annotations

import json
import shlex
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

from pdeds.study.expansion import Run
from pdeds.study.launch import local_command
from pdeds.study.spec import Study
from pdeds.train.runlock import LOCK


def run_state(run_dir: Path) -> str:
    """new | done (summary.json completed) | partial (holds a run) | other (files, no run)."""
    if not run_dir.is_dir() or not any(p.name != LOCK for p in run_dir.iterdir()):
        return "new"  # empty, or only the lock file of a start that failed
    summary = run_dir / "summary.json"
    if summary.is_file():
        try:
            if json.loads(summary.read_text()).get("completed") is True:
                return "done"
        except (json.JSONDecodeError, AttributeError):
            pass
    return "partial" if (run_dir / "config.yaml").is_file() else "other"


RESUME_FLAGS = {"new": [], "partial": ["--resume", "auto"], "other": ["--force"]}
"""Flags per run-dir state: a partial run continues; a folder holding no run (a start that died
before writing config.yaml) is moved aside by --force."""


def execute(
    study: Study, runs: list[Run], out: Path, say: Callable[[str], None] = print
) -> list[str]:
    """Run the fitting runs one after another through launch/local; returns the failed names.

    Each run's output goes to OUT/NAME.log. A done run is skipped, a partial one resumed. On
    Ctrl-C the current run (which gets the same signal) checkpoints and exits; then it stops.
    """
    failed = []
    local = [r for r in runs if r.fits]
    for i, r in enumerate(local, 1):
        run_dir = out / r.name
        state = run_state(run_dir)
        if state == "done":
            say(f"[{i}/{len(local)}] {r.name}: done already, skipped")
            continue
        cmd = local_command(study, r, out) + RESUME_FLAGS[state]
        log = out / f"{r.name}.log"
        say(f"[{i}/{len(local)}] {r.name}: {state}, running (log {log})")
        t0 = time.perf_counter()
        with log.open("a") as fh:
            fh.write(f"$ {shlex.join(cmd)}\n")
            fh.flush()
            proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT)
            try:
                rc = proc.wait()
            except KeyboardInterrupt:
                proc.wait()
                raise
        dt = time.perf_counter() - t0
        if rc == 0 and run_state(run_dir) == "done":
            say(f"[{i}/{len(local)}] {r.name}: completed in {dt:.0f} s")
            continue
        failed.append(r.name)
        tail = log.read_text().splitlines()[-5:]
        say(f"[{i}/{len(local)}] {r.name}: FAILED (exit {rc}) after {dt:.0f} s; end of {log}:")
        for line in tail:
            say(f"    {line}")
    return failed
