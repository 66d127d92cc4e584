"""``pdeds train``: one experiment from a YAML, under no launcher, deepspeed or torchrun.

pdeds train launch/configs/quickstart.yaml --run-dir runs/qs
pdeds train CONFIG --set optim.lr=3e-4 --set ds.zero_optimization.stage=2 --resume auto
pdeds train CONFIG --time-limit 4m        # stops on time; --resume auto --time-limit 10m goes on
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any


def add_common(p: argparse.ArgumentParser) -> None:
    """CONFIG and --set, shared by commands that resolve an experiment."""
    p.add_argument("config", help="experiment YAML (e.g. launch/configs/quickstart.yaml)")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config key (optim.lr=1e-3) or a DeepSpeed key "
        "(ds.zero_optimization.stage=2)",
    )


def add_parser(subparsers: Any) -> None:
    """Register ``pdeds train``."""
    p = subparsers.add_parser(
        "train",
        help="train a neural solver from an experiment YAML",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_common(p)
    p.add_argument("--run-dir", default=None, help="run directory (default runs/<config name>)")
    p.add_argument(
        "--resume",
        default=None,
        metavar="auto|PATH",
        help="continue from the newest complete checkpoint (auto) or a checkpoint folder",
    )
    p.add_argument(
        "--force",
        action="store_true",
        help="move an existing run in --run-dir aside and start anew",
    )
    p.add_argument(
        "--time-limit",
        default=None,
        metavar="DURATION",
        help="training wall-time budget (4m, 90s, 1h30m, or seconds): the run then checkpoints, "
        "evaluates and stops; same as --set train.time_limit=DURATION",
    )
    p.add_argument(
        "--check-only",
        action="store_true",
        help="check the config, data, batch sizes for --ranks and the run directory; start "
        "nothing (the launchers run this once before starting ranks)",
    )
    p.add_argument(
        "--ranks",
        type=int,
        default=None,
        help="world size for --check-only (default $WORLD_SIZE, else 1)",
    )


def run(args: argparse.Namespace) -> int:
    import os

    from pdeds.config import resolve
    from pdeds.errors import PdedsError
    from pdeds.train.trainer import preflight, train

    limit = [f"train.time_limit={args.time_limit}"] if args.time_limit is not None else []
    resolved = resolve(args.config, [*args.overrides, *limit])
    run_dir = Path(args.run_dir or Path("runs") / Path(args.config).stem)
    if args.ranks is not None and not args.check_only:
        raise PdedsError("--ranks goes with --check-only; the launcher sets the world size")
    if args.check_only:
        ranks = args.ranks if args.ranks is not None else int(os.environ.get("WORLD_SIZE", "1"))
        if ranks < 1:
            raise PdedsError(f"--ranks: must be >= 1, got {ranks}")
        setup = preflight(resolved, run_dir, ranks, resume=args.resume, force=args.force)
        print(f"pdeds: check ok: {setup.describe()}", flush=True)
        return 0
    summary = train(resolved, run_dir, resume=args.resume, force=args.force)
    return 0 if summary["completed"] or summary["steps"] > 0 else 1
