"""The run directory: what it holds and when a new run may use it.

A run directory holds ``config.yaml`` (resolved experiment), ``ds_config.json`` (as used),
``metrics.jsonl``, ``tb/``, ``checkpoints/``, ``cache/`` and ``summary.json``. Starting a run
in a directory that already holds a run is refused unless ``--resume`` (continue it; the config
must match apart from ``train`` lengths) or ``--force`` (the old run is moved aside, not deleted).
"""

from __future__ import annotations

import time
from pathlib import Path

import yaml

from pdeds import distributed
from pdeds.errors import PdedsError

RESUMABLE_CHANGES = {"train"}
"""Sections that may differ between a run and its resumption (e.g. more steps)."""


def verdict(run_dir: Path, config_text: str, resume: str | None, force: bool) -> str | None:
    """Rank 0's verdict: None when the directory may be used, else the error message."""
    if not run_dir.exists():
        return None
    if not run_dir.is_dir():
        return f"--run-dir {run_dir} is a file; pass a directory"
    if not any(p.is_file() for p in run_dir.rglob("*")):
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


def prepare(run_dir: Path, config_text: str, resume: str | None, force: bool) -> None:
    """Check (on rank 0, verdict shared with every rank) and create the run directory."""
    why = None
    if distributed.rank() == 0:
        why = verdict(run_dir, config_text, resume, force)
        if why is None and force and resume is None and run_dir.is_dir():
            if any(run_dir.iterdir()):
                aside = run_dir.with_name(
                    f"{run_dir.name}.replaced-{time.strftime('%Y%m%d-%H%M%S')}"
                )
                run_dir.rename(aside)
                print(f"pdeds: moved the previous run aside to {aside}", flush=True)
        if why is None:
            (run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
    why = distributed.broadcast_object(why)
    if why is not None:
        raise PdedsError(why)
    distributed.barrier()
