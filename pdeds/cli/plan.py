"""``pdeds plan``: will this run fit, what is the largest micro-batch, what to change if not.

    pdeds plan launch/configs/quickstart.yaml
    pdeds plan launch/configs/poisson3d_512.yaml --gpus 8 --gpu-mem 80 --host-mem 1800
    pdeds plan CONFIG --set model.checkpoint=true --set ds.zero_optimization.stage=3 --json
    pdeds plan CONFIG --check 24,32        # + real training steps at n = 24, 32 vs. the plan

Memory per rank = model states (ZeRO stage / offload, DeepSpeed's estimator formulas) +
DeepSpeed's gradient bucket + (c mb + e) n^d + o, with c, e, o measured on this machine's device
at two small resolutions (cached under ~/.cache/pdeds/plan; --recalibrate measures again).
"""

from __future__ import annotations

import argparse
from typing import Any

from pdeds.errors import PdedsError


def add_parser(subparsers: Any) -> None:
    """Register ``pdeds plan``."""
    from pdeds.cli.train import add_common

    p = subparsers.add_parser(
        "plan",
        help="memory per rank of a run: fits?, largest micro-batch, what to change",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_common(p)
    p.add_argument("--gpus", type=int, default=1, help="devices (ranks) per node (default 1)")
    p.add_argument("--nodes", type=int, default=1, help="nodes (default 1)")
    p.add_argument(
        "--gpu-mem", type=float, default=80.0, help="GiB of one device (default 80, an H100)"
    )
    p.add_argument("--host-mem", type=float, default=None, help="GiB of host memory per node")
    p.add_argument(
        "--reserve",
        type=float,
        default=0.1,
        help="fraction of device memory kept free (CUDA context, fragmentation; default 0.1)",
    )
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.add_argument(
        "--calibrate-res",
        default=None,
        metavar="N1,N2",
        help="the two calibration resolutions (default: the smallest with >= 12k nodes, "
        "then >= 2.3x that)",
    )
    p.add_argument("--calibration", default=None, metavar="FILE", help="use this calibration JSON")
    p.add_argument("--recalibrate", action="store_true", help="ignore the cached calibration")
    p.add_argument("--cache-dir", default=None, help="calibration cache folder")
    p.add_argument(
        "--check",
        default=None,
        metavar="N1,N2,..",
        help="also run real training steps at these resolutions and compare with the plan",
    )


def _resolutions(text: str | None, flag: str) -> list[int] | None:
    if text is None:
        return None
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        values = []
    if not values or any(v < 2 for v in values):
        raise PdedsError(f"{flag}: expected comma-separated node counts >= 2, got {text!r}")
    return values


def run(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    from pdeds import plan
    from pdeds.config import resolve

    hw = plan.Hardware(
        gpus_per_node=args.gpus,
        nodes=args.nodes,
        gpu_mem_gib=args.gpu_mem,
        host_mem_gib=args.host_mem,
        reserve=args.reserve,
    )
    hw.validate()
    cal_res = _resolutions(args.calibrate_res, "--calibrate-res")
    if cal_res is not None and len(cal_res) != 2:
        raise PdedsError(f"--calibrate-res: give two resolutions, got {args.calibrate_res!r}")
    check_res = _resolutions(args.check, "--check")
    resolved = resolve(args.config, args.overrides)
    cfg = resolved.cfg
    if args.calibration:
        path = Path(args.calibration)
        if not path.is_file():
            raise PdedsError(f"--calibration: no file at {path}; omit it to calibrate now")
        calibration = plan.Calibration.from_dict(json.loads(path.read_text()))
    else:
        calibration = plan.calibrate(
            cfg.problem.dim,
            cfg.model,
            resolutions=tuple(cal_res) if cal_res else None,
            cache_dir=Path(args.cache_dir) if args.cache_dir else None,
            refresh=args.recalibrate,
        )
    result = plan.make_plan(resolved, hw, calibration, config_name=args.config)
    rows = None
    if check_res:
        rows = plan.check(args.config, args.overrides, check_res, calibration)
    if args.json:
        out = result.to_dict()
        if rows is not None:
            out["check"] = rows
        print(json.dumps(out, indent=2))
    else:
        print(result.table())
        if rows is not None:
            print("\n  check against real training steps (1 rank):")
            print(plan.check_table(rows))
    return 0
