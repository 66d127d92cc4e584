"""``pdeds study``: expand a study YAML into runs; run those that fit here, script the others.

pdeds study analysis/studies/strong_scaling_cpu.yaml --dry-run     # the table and commands
pdeds study analysis/studies/strong_scaling_cpu.yaml               # run here / write scripts
pdeds study STUDY.yaml --out runs/studies/mine --only r1 r2        # a subset of the runs

Every run is checked first (config, batch sizes for its rank count, optimizer vs ZeRO stage,
multigrid plan) and its memory planned with ``pdeds plan`` where it goes: here, and on the
cluster when cluster.memory_gib (+ gpu_mem_gib) says its nodes (pdeds.study.memory; off with
machine.check_memory: false or --no-memory-check). Runs that fit this machine by ranks
and memory run one after another through ``launch/local`` into OUT/NAME (log OUT/NAME.log); a
completed one is skipped, a partial one resumed. The others are written as OUT/NAME.sbatch
(SLURM) or OUT/NAME.sh (hostfile). OUT/study.json records the study for ``pdeds report``. Exit
status 1 if an executed run failed (the others still run).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from pdeds.errors import PdedsError


def add_parser(subparsers: Any) -> None:
    """Register ``pdeds study``."""
    p = subparsers.add_parser(
        "study",
        help="run a scaling or comparison study from a study YAML",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("study", help="study YAML (e.g. analysis/studies/strong_scaling_cpu.yaml)")
    p.add_argument("--dry-run", action="store_true", help="print the runs and commands only")
    p.add_argument("--out", default=None, help="output folder (default runs/studies/<study>)")
    p.add_argument("--only", nargs="+", default=None, metavar="NAME", help="only these runs")
    p.add_argument(
        "--no-memory-check",
        action="store_true",
        help="do not plan each run's memory here (ranks and nodes alone decide what runs here)",
    )


def run(args: argparse.Namespace) -> int:
    import json

    from pdeds.study import (
        check_memory,
        execute,
        expand,
        load_study,
        manifest,
        table,
        validate,
        write_scripts,
    )

    study = load_study(args.study)
    runs = expand(study)
    validate(study, runs)
    if study.machine.check_memory and not args.no_memory_check:
        check_memory(study, runs, lambda s: print(s, flush=True))
    out = Path(args.out or Path("runs") / "studies" / study.name)
    chosen = runs
    if args.only:
        names = {r.name for r in runs}
        unknown = [n for n in args.only if n not in names]
        if unknown:
            raise PdedsError(
                f"--only: no run named {', '.join(unknown)} in {args.study}; runs are "
                f"{', '.join(r.name for r in runs)}"
            )
        chosen = [r for r in runs if r.name in args.only]
    print(table(study, chosen, out), flush=True)
    if args.dry_run:
        return 0
    if out.exists() and not out.is_dir():
        raise PdedsError(f"--out {out} is a file; pass a folder")
    out.mkdir(parents=True, exist_ok=True)
    (out / "study.json").write_text(json.dumps(manifest(study, runs, out), indent=2))
    print()
    write_scripts(study, chosen, out, lambda s: print(s, flush=True))
    failed = execute(study, chosen, out, lambda s: print(s, flush=True))
    n_local = sum(r.fits for r in chosen)
    print(
        f"\n{n_local - len(failed)} of {n_local} local run(s) complete, "
        f"{len(chosen) - n_local} written, not run; report: pdeds report {out} --out "
        f"{out / 'report'}"
    )
    if failed:
        print(f"failed: {', '.join(failed)} (see their .log files in {out})")
    return 1 if failed else 0
