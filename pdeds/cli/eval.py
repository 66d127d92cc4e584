"""``pdeds eval``: held-out error of a trained run against the reference solver.

    pdeds eval runs/qs                      # at the training resolution
    pdeds eval runs/qs --res 64 --samples 16
    pdeds eval runs/big --res 256 --reference gmg   # matrix-free multigrid reference (GPU)

Prints a table (network, lifting baseline u = 1 - x1, reference solver) with mean/max relative
L2 error, energy gap and time per sample, and writes it as JSON to RUN_DIR/eval_res<N>.json.
The resolution must suit the U-Net, a ``data.val_path`` file must match the run's problem, and
the held-out set, its reference solve and the forward must fit in memory: all checked before
anything is allocated.
"""

from __future__ import annotations

import argparse
import copy
from pathlib import Path
from typing import Any

REFERENCE_LABELS = {"amg": "AMG-CG", "gmg": "multigrid-CG", "matrix_free": "Jacobi-CG"}
"""Each ``train.reference`` method and its name in the table."""


def add_parser(subparsers: Any) -> None:
    """Register ``pdeds eval``."""
    p = subparsers.add_parser(
        "eval",
        help="held-out error of a trained run vs the reference solver",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("run_dir", help="run directory written by pdeds train")
    p.add_argument(
        "--res",
        type=int,
        default=None,
        help="resolution (default train.eval_res, else problem.res)",
    )
    p.add_argument(
        "--samples", type=int, default=None, help="held-out samples (default data.val_samples)"
    )
    p.add_argument("--batch", type=int, default=2, help="inference batch size")
    p.add_argument(
        "--reference",
        choices=REFERENCE_LABELS,
        default=None,
        help="reference solver (default the run's train.reference): amg | gmg (matrix-free "
        "multigrid CG, on the GPU; for large --res) | matrix_free (Jacobi-CG)",
    )


def table(scores: dict[str, float], res: int, samples: int, method: str = "amg") -> str:
    """Markdown table of an evaluate() result."""
    rows = [
        ("network", "val", f"{scores['inference_s_per_sample']:.4f}"),
        ("lifting baseline", "baseline", "-"),
    ]
    out = [
        f"held-out evaluation: {samples} samples at {res} nodes per axis",
        "| solution | rel-L2 mean | rel-L2 max | energy gap mean | energy gap max | s/sample |",
        "|---|---|---|---|---|---|",
    ]
    for name, key, t in rows:
        out.append(
            f"| {name} | {scores[key + '_rel_l2_mean']:.4g} | {scores[key + '_rel_l2_max']:.4g} | "
            f"{scores[key + '_energy_gap']:.4g} | {scores[key + '_energy_gap_max']:.4g} | {t} |"
        )
    name = f"reference ({REFERENCE_LABELS[method]})"
    out.append(f"| {name} | 0 | 0 | 0 | 0 | {scores['reference_s_per_sample']:.4f} |")
    ratio = scores["baseline_rel_l2_mean"] / max(scores["val_rel_l2_mean"], 1e-300)
    out.append(f"network beats the lifting baseline by {ratio:.1f}x (mean rel-L2)")
    return "\n".join(out)


HELD_OUT_BYTES = 128
"""Host bytes per node and held-out sample during an evaluation (pdeds.train.evaluate): nu, the
reference, the prediction and the lifting in float64 (32), and the temporaries of the relative
L2 error and the energy gap, measured at 71 (3-D) and 88 (2-D)."""


def _check_held_out(cfg: Any, run_dir: Path, res: int, samples: int, batch: int, dev: Any) -> None:
    """Refuse, before anything is allocated, an evaluation whose held-out file does not match the
    run or whose held-out set, reference solve or forward would not fit in memory."""
    from pdeds.cli.predict import check_memory, forward_bytes
    from pdeds.data.problem import check_problem
    from pdeds.errors import PdedsError
    from pdeds.physics.reference import memory_problem
    from pdeds.train.evaluate import held_out_memory_problem

    p = cfg.problem
    if cfg.data.val_path is not None:
        check_problem(
            cfg.data.val_path, p, key="data.val_path", res=res, fields=("u_ref",), settable=False
        )
    else:
        at_res = copy.deepcopy(cfg)
        at_res.train.eval_res = res
        at_res.data.val_samples = samples
        if held_out_memory_problem(at_res, run_dir / "cache") is not None:
            why = memory_problem((res,) * p.dim, cfg.train.reference)
            other = "--reference gmg or " if cfg.train.reference == "amg" else ""
            raise PdedsError(f"--res {res}: {why}; use {other}a smaller --res")
    check_memory(
        f"evaluating {samples} held-out samples at {res}^{p.dim} nodes",
        HELD_OUT_BYTES * samples * res**p.dim,
        forward_bytes(cfg.model, p.dim, res, min(batch, samples)),
        dev,
        "use a smaller --res, --samples or --batch",
    )


def run(args: argparse.Namespace) -> int:
    import json

    from pdeds.cli.predict import check_resolution
    from pdeds.data.integrity import reason, write_error
    from pdeds.errors import PdedsError
    from pdeds.train.evaluate import evaluate, load_held_out
    from pdeds.train.inference import load_run

    if args.samples is not None and args.samples < 1:
        raise PdedsError(f"--samples must be >= 1, got {args.samples}")
    if args.batch < 1:
        raise PdedsError(f"--batch must be >= 1, got {args.batch}")
    run_dir = Path(args.run_dir)
    trained = load_run(run_dir)
    cfg = trained.cfg
    if args.reference is not None:
        cfg.train.reference = args.reference
    res = args.res if args.res is not None else cfg.train.eval_res or cfg.problem.res
    flag = "--res" if args.res is not None else "train.eval_res"
    check_resolution(trained, res, flag)
    samples = args.samples or cfg.data.val_samples
    _check_held_out(cfg, run_dir, res, samples, args.batch, trained.device)
    try:
        ho = load_held_out(cfg, res, run_dir / "cache", args.samples)
    except OSError as err:  # the reference cache: a read-only run, a full disk, a damaged file
        raise PdedsError(
            f"the held-out reference cache {err.filename or run_dir / 'cache'} failed: "
            f"{reason(err)}; make {run_dir} writable, or delete the damaged cache file"
        ) from None
    scores = evaluate(trained.predict, ho, cfg.problem.f, args.batch, trained.device)
    scores.update(
        res=res,
        samples=len(ho.coeffs),
        checkpoint=str(trained.checkpoint),
        reference=cfg.train.reference,
    )
    print(table(scores, res, len(ho.coeffs), cfg.train.reference))
    out = run_dir / f"eval_res{res}.json"
    try:
        out.write_text(json.dumps(scores, indent=2))
    except OSError as err:
        raise write_error(out, err) from None
    print(f"written: {out}")
    return 0
