"""``pdeds report``: run directories -> runs.csv, report.md and plots.

pdeds report runs/qs runs/qs2 --out reports/qs
pdeds report runs/studies/strong_scaling_cpu --out reports/strong   # a study's folder: its runs
pdeds report runs/studies/compare_cycles --out reports/cycles --target 0.05

Reads each run's summary.json, metrics.jsonl, config.yaml, ds_config.json and TensorBoard
events (tensorboard's reader). Writes DIR/runs.csv, DIR/report.md and the plots the data
allows: throughput and parallel efficiency vs ranks (strong, weak), time to target per cycle
and per optimizer, held-out error vs training time, peak memory vs resolution. A run directory
missing files is reported as such, not fatal.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any


def add_parser(subparsers: Any) -> None:
    """Register ``pdeds report``."""
    p = subparsers.add_parser(
        "report",
        help="tables and plots from run directories",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run directories or study folders")
    p.add_argument("--out", required=True, help="folder for runs.csv, report.md and the plots")
    p.add_argument(
        "--target",
        type=float,
        default=None,
        help="held-out mean rel-L2 target for time to target (default: the study's target)",
    )
    p.add_argument("--force", action="store_true", help="replace a report already in --out")


def run(args: argparse.Namespace) -> int:
    from pdeds.errors import PdedsError
    from pdeds.report import report

    if args.target is not None and not args.target > 0:
        raise PdedsError(f"--target: must be > 0, got {args.target}")
    out = Path(args.out)
    result = report([Path(p) for p in args.runs], out, args.target, force=args.force)
    rows = result["rows"]
    broken = [r["run"] for r in rows if r["missing"]]
    print(f"{len(rows)} run(s) -> {out / 'runs.csv'}, {out / 'report.md'}")
    for name in result["plots"]:
        print(f"  plot {out / name}")
    for why in result["skipped"] + result["notes"]:
        print(f"  not shown: {why}")
    if broken:
        print(f"  runs with missing files (see report.md): {', '.join(broken)}")
    return 0
