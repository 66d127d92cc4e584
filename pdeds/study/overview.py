"""What a study will do: the plan table (``--dry-run``) and OUT/study.json for ``pdeds report``."""

from __future__ import annotations

import shlex
from dataclasses import asdict
from pathlib import Path
from typing import Any

from pdeds.config import PROJECT_ROOT
from pdeds.study.expansion import BATCH_KEYS, Run
from pdeds.study.launch import local_command, script_path, show_path
from pdeds.study.runner import run_state
from pdeds.study.spec import Study

MANIFEST = "study.json"


def manifest(study: Study, runs: list[Run], out: Path) -> dict[str, Any]:
    """What ``pdeds report`` reads from OUT/study.json: kind, target and every run's layout."""
    return {
        "study": study.name,
        "file": str(study.path),
        "kind": study.kind,
        "base": str(study.base),
        "target": study.target,
        "set": study.fixed,
        "machine": asdict(study.machine),
        "cluster": asdict(study.cluster),
        "runs": [
            {
                "name": r.name,
                "ranks": r.ranks,
                "nodes": r.nodes,
                "values": r.values,
                "batch": {"global": r.batch[0], "micro": r.batch[1], "accumulation": r.batch[2]},
                "overrides": r.all_overrides(study),
                "where": "here" if r.fits else study.cluster.launcher,
                "memory": r.memory.to_dict() if r.memory is not None else None,
                "run_dir": r.name,
                "script": None if r.fits else script_path(study, r, out).name,
            }
            for r in runs
        ],
    }


def table(study: Study, runs: list[Run], out: Path) -> str:
    """The plan as text: a header, one row per run, then every run's command."""
    rows = [("name", "ranks", "nodes", "G = m x a x W", "memory", "where", "state", "overrides")]
    for r in runs:
        g, m, a = r.batch
        shown = [o for o in r.overrides + r.extra if o.split("=")[0] not in BATCH_KEYS]
        where = "here" if r.fits else study.cluster.launcher
        state = run_state(out / r.name) if r.fits else "script"
        rows.append(
            (
                r.name,
                str(r.ranks),
                str(r.nodes),
                f"{g} = {m} x {a} x {r.ranks}",
                r.memory.cell() if r.memory is not None else "-",
                where,
                state,
                " ".join(shown) or "-",
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    lines = [
        f"study {study.name}: {study.kind}, base {show_path(study.base, Path.cwd())}, "
        f"{len(runs)} run(s), out {show_path(out, Path.cwd())}",
        f"fixed: {' '.join(study.fixed) or '-'}",
        f"machine: {study.machine.describe()}; runs that do not fit: {study.cluster.launcher}",
    ]
    if any(r.memory is not None for r in runs):
        lines.append(
            "memory: planned need / usable where the run goes (per GPU; per node on CPU: its "
            "ranks, or the reference solve); ! = will not fit"
        )
    lines.append("")
    for row in rows:
        lines.append("  ".join(c.ljust(w) for c, w in zip(row, widths)) + "  " + row[-1])
    notes = [f"  {r.name}: not run here: it {r.not_here}" for r in runs if r.not_here]
    notes += [
        f"  {r.name}: WILL NOT FIT on the {r.memory.where} nodes: it {r.memory.reason()}"
        for r in runs
        if r.memory is not None and not r.memory.fits and not r.fits
    ]
    if notes:
        lines += ["", "memory:", *notes]
    lines += ["", "commands:"]
    for r in runs:
        if r.fits:
            cmd = shlex.join(local_command(study, r, out))
        else:
            verb = "bash" if study.cluster.launcher == "hostfile" else "sbatch"
            script = show_path(script_path(study, r, out), PROJECT_ROOT)
            cmd = f"{verb} {script}  (from the project root)"
        lines.append(f"  {r.name}: {cmd}")
    return "\n".join(lines)
