"""The run directory: what it holds and when a new run may use it.

A run directory holds ``config.yaml`` (resolved experiment), ``ds_config.json`` (as used),
``metrics.jsonl``, ``tb/``, ``checkpoints/``, ``cache/`` and ``summary.json``. Starting a run
in a directory that already holds a run is refused unless ``--resume`` (continue it; the config
must match apart from ``train`` lengths) or ``--force`` (the old run is moved aside, not deleted).
The lock file ``pdeds.lock`` (``pdeds.train.runlock``) is no part of a run: it stays when a run
is moved aside, so the lock is held throughout.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import yaml

from pdeds import distributed
from pdeds.errors import PdedsError
from pdeds.train import runlock

RESUMABLE_CHANGES = {"train"}
"""Sections that may differ between a run and its resumption (e.g. more steps)."""


def writable(run_dir: Path) -> str | None:
    """None when ``run_dir`` exists and is writable or can be created, else the error line."""
    if run_dir.is_dir():
        if not os.access(run_dir, os.W_OK | os.X_OK):
            return f"--run-dir {run_dir} is not writable; choose a writable --run-dir"
        return None
    parent = run_dir.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        what = "is not a directory" if not parent.is_dir() else "is not writable"
        return f"--run-dir {run_dir} cannot be created: {parent} {what}; choose another --run-dir"
    return None


def verdict(
    run_dir: Path, config_text: str, resume: str | None, force: bool, *, check_lock: bool = True
) -> str | None:
    """Rank 0's verdict: None when the directory may be used, else the error message. With
    ``check_lock`` (a check without the lock, e.g. ``--check-only``) a run directory locked by
    another process or that cannot be written is refused too."""
    if run_dir.exists() and not run_dir.is_dir():
        return f"--run-dir {run_dir} is a file; pass a directory"
    if check_lock:
        why = runlock.holder(run_dir) or writable(run_dir)
        if why is not None:
            return why
    if not run_dir.exists():
        return None
    if not any(p.is_file() and p.name != runlock.LOCK for p in run_dir.rglob("*")):
        return None  # empty, or only the folders a run that failed at start-up created
    old = run_dir / "config.yaml"
    if resume is not None:
        if not old.is_file():
            return f"--resume: {run_dir} holds no run (no config.yaml); drop --resume"
        a, b = yaml.safe_load(old.read_text()) or {}, yaml.safe_load(config_text) or {}
        differ = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
        bad = [k for k in differ if k not in RESUMABLE_CHANGES]
        if bad:
            return (
                f"--resume: the config differs from the run in {run_dir} in section(s) "
                f"{', '.join(bad)}; resume with the run's own config ({old}) or start a new "
                "--run-dir"
            )
        return None
    if force:
        return None
    what = "a run" if old.is_file() else "other files"
    return (
        f"--run-dir {run_dir} already holds {what}; pass --resume auto to continue it, --force "
        "to move it aside, or choose another --run-dir"
    )


def _move_aside(run_dir: Path) -> None:
    """Move everything but the lock file into ``RUN_DIR.replaced-<time>`` beside it."""
    old = [p for p in run_dir.iterdir() if p.name != runlock.LOCK]
    if not old:
        return
    aside = run_dir.with_name(f"{run_dir.name}.replaced-{time.strftime('%Y%m%d-%H%M%S')}")
    aside.mkdir()
    for p in old:
        p.rename(aside / p.name)
    print(f"pdeds: moved the previous run aside to {aside}", flush=True)


def prepare(run_dir: Path, config_text: str, resume: str | None, force: bool) -> None:
    """Check (on rank 0, verdict shared with every rank) and create the run directory; the
    caller holds its lock."""
    why = None
    if distributed.rank() == 0:
        why = verdict(run_dir, config_text, resume, force, check_lock=False)
        if why is None and force and resume is None and run_dir.is_dir():
            _move_aside(run_dir)
        if why is None:
            try:
                (run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
            except OSError as err:
                why = f"--run-dir {run_dir}: {err.strerror or err}; choose a writable --run-dir"
    why = distributed.broadcast_object(why)
    if why is not None:
        raise PdedsError(why)
    distributed.barrier()
