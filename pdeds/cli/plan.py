"""``pdeds plan``: will this run fit, what is the largest micro-batch, what to change if not.

    pdeds plan launch/configs/quickstart.yaml
    pdeds plan launch/configs/poisson3d_512.yaml --gpus 8 --gpu-mem 80 --host-mem 1800
    pdeds plan CONFIG --set model.checkpoint=true --set ds.zero_optimization.stage=3 --json
    pdeds plan CONFIG --check 24,32        # + real DeepSpeed training steps at n = 24, 32

Memory per rank = model states (ZeRO stage / offload, as DeepSpeed's estimators count them) +
DeepSpeed's gradient bucket + the activations of one training step, found by executing the
step symbolically (meta tensors) at each level's resolution and micro-batch; one real step at
a small resolution checks that figure on this machine. Batch sizes per level are the trainer's
for --gpus x --nodes ranks. Progress goes to stderr, the plan to stdout.
"""

from __future__ import annotations

import argparse
import sys
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
        help="fraction of device memory kept free (CUDA context, kernel workspaces, "
        "fragmentation; default 0.1)",
    )
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.add_argument(
        "--check",
        default=None,
        metavar="N1,N2,..",
        help="also run real DeepSpeed training steps at these resolutions; compare with the plan",
    )


def _resolutions(text: str | None) -> list[int] | None:
    if text is None:
        return None
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        values = []
    if not values or any(not 2 <= v <= 4096 for v in values):
        raise PdedsError(f"--check: expected comma-separated node counts in 2..4096, got {text!r}")
    return values


class Progress:
    """Progress lines on stderr; the last one names what failed if something does."""

    def __init__(self) -> None:
        self.doing = "planning"

    def __call__(self, line: str) -> None:
        self.doing = line
        print(f"pdeds plan: {line}", file=sys.stderr, flush=True)


def run(args: argparse.Namespace) -> int:
    import json
    import os

    import torch

    if not torch.cuda.is_available():  # else DeepSpeed says on stdout that it picked the CPU
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
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
    check_res = _resolutions(args.check)
    resolved = resolve(args.config, args.overrides)
    say = Progress()
    try:
        acts = plan.Activations.of(resolved.cfg)
        result = plan.make_plan(resolved, hw, config_name=args.config, say=say)
        coarsest = result.levels[0].res
        result.check = plan.step_check(acts, result.variant, coarsest, result.largest_layer, say)
        rows = None
        if check_res:
            rows = plan.check_steps(args.config, args.overrides, check_res, say=say)
    except PdedsError:
        raise
    except Exception as err:  # one line, not a traceback, whatever broke
        what = str(err).strip().splitlines()[0] if str(err).strip() else ""
        raise PdedsError(
            f"{say.doing}: {type(err).__name__}: {what}; check the model section and the free "
            "memory, then run it again"
        ) from err
    if args.json:
        out = plan.plan_dict(result)
        if rows is not None:
            out["check_steps"] = rows
        print(json.dumps(out, indent=2))
    else:
        print(plan.plan_table(result))
        if rows is not None:
            print("\n  check against real DeepSpeed training steps (1 rank):")
            print(plan.check_table(rows))
    return 0
