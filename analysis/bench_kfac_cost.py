"""Per-step cost of K-FAC over its inner optimizer: mean wall time per step, K-FAC / Adam.

    .venv/bin/python analysis/bench_kfac_cost.py                      # 2-D 64^2, 3-D 16^3 and 32^3
    .venv/bin/python analysis/bench_kfac_cost.py --case 3:16 --steps 50 --skip 10

Each (dim, res) case builds the quickstart experiment (``launch/configs/quickstart.yaml`` with
``problem.dim/res``, one level, constant LR) on 1 rank with ``--threads`` threads, and times
``pdeds.train.step.train_step`` over ``--steps`` steps after ``--skip`` untimed ones, for

- adam: the inner optimizer alone;
- kfac: K-FAC with its defaults (sampled factor locations, factors every 10 steps, eigenbases
  every 50, preconditioning in backward);
- kfac_before_13: K-FAC as it was before issue 13 (factors from every location every step,
  eigenbases every 10, preconditioning in step(), inner SGD): the settings
  ``tests/test_golden.py`` pins it with.

Times are process CPU time (one thread: the work itself; wall time on a shared machine measures
the neighbours). The mean (not the median) is the cost that counts: factor and eigen steps are
rare and dear. The time inside K-FAC's factor collection, factor reduction and
eigendecomposition is reported apart (summed over the timed steps, in ms per step); the eigen
refreshes are charged at their measured time / ``inv_update_steps`` per step, wherever they fell
(mean ms includes that).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
QUICKSTART = ROOT / "launch" / "configs" / "quickstart.yaml"
BEFORE_13 = [
    "optim.kfac.inner=sgd",
    "optim.kfac.precondition=step",
    "optim.kfac.factor_update_steps=1",
    "optim.kfac.inv_update_steps=10",
    "optim.kfac.factor_locations=0",
    "optim.kfac.warmup_steps=0",
    "optim.kfac.max_factor_dim=0",
]
VARIANTS = {
    "adam": ["optim.name=adam"],
    "kfac": ["optim.name=kfac"],
    "kfac_before_13": ["optim.name=kfac", *BEFORE_13],
}
TIMED = ("_collect", "_update_factors", "_update_eigen")
CLOCK = time.process_time
"""Process CPU time: on one thread it is the work done, whatever else holds the cores (wall
time on a shared 2-core machine measured the neighbours)."""


def _instrument(totals: dict[str, list[float]]) -> None:
    """Wrap K-FAC's factor / eigen methods so their wall time lands in ``totals``."""
    from pdeds.optim import kfac

    for name in TIMED:
        orig = getattr(kfac.KFACPreconditioner, name)

        def timed(self: Any, *args: Any, _orig: Any = orig, _name: str = name) -> Any:
            t0 = CLOCK()
            out = _orig(self, *args)
            totals[_name].append(CLOCK() - t0)
            return out

        setattr(kfac.KFACPreconditioner, name, timed)


def run(dim: int, res: int, variant: str, args: argparse.Namespace) -> dict:
    """Mean and median ms per step of one variant at one size, and K-FAC's own ms per step."""
    import torch

    from pdeds.config import resolve
    from pdeds.models.unet import build_model
    from pdeds.train.data import split_global_batch, training_coeffs, training_samples
    from pdeds.train.engine import build_engine, init_distributed
    from pdeds.train.step import train_step

    torch.set_num_threads(args.threads)
    overrides = [f"problem.dim={dim}", f"problem.res={res}", "schedule.cycle=single"]
    overrides += ["schedule.levels=1", "schedule.level=[]", f"schedule.resolutions=[{res}]"]
    overrides += ["train.lr_schedule=constant", "train.time_limit=null", *VARIANTS[variant]]
    resolved = resolve(str(QUICKSTART), overrides + args.set)
    cfg = resolved.cfg
    init_distributed()
    batch, micro_batch, _ = resolved.view.batch_sizes(1)
    torch.manual_seed(0)
    model = build_model(dim, cfg.model)
    engine, _ = build_engine(model, cfg, resolved.ds)
    stream, data = training_samples(cfg, training_coeffs(cfg), torch.device("cpu"))
    totals: dict[str, list[float]] = {name: [] for name in TIMED}
    _instrument(totals)
    wall, eigen_before = [], 0
    for step in range(args.skip + args.steps):
        if step == args.skip:
            eigen_before = len(totals["_update_eigen"])
            for name in ("_collect", "_update_factors"):
                totals[name].clear()
        micro = split_global_batch(stream.indices(step * batch, batch), micro_batch, 1, 0)
        t0 = CLOCK()
        train_step(engine, data, micro, res=res, f=cfg.problem.f, weighting="lifting")
        wall.append(CLOCK() - t0)
    timed = wall[args.skip :]
    eigen_all = totals.pop("_update_eigen")
    row = {"mean_ms": 1e3 * statistics.fmean(timed), "median_ms": 1e3 * statistics.median(timed)}
    for name, v in totals.items():
        row[name] = 1e3 * sum(v) / args.steps
    # One eigen refresh per inv_update_steps, at its measured cost, whether or not it fell inside
    # the timed window.
    inside = 1e3 * sum(eigen_all[eigen_before:]) / args.steps
    per_call = 1e3 * statistics.fmean(eigen_all) if eigen_all else 0.0
    row["_update_eigen"] = per_call / cfg.optim.kfac.inv_update_steps if eigen_all else 0.0
    row["mean_ms"] += row["_update_eigen"] - inside
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--case", nargs="+", default=["2:64", "3:16", "3:32"], help="DIM:RES")
    p.add_argument("--variant", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--steps", type=int, default=30, help="timed steps")
    p.add_argument("--skip", type=int, default=10, help="untimed steps first (K-FAC warm-up)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--set", action="append", default=[], help="extra --set override (repeat)")
    args = p.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    from pdeds.testing.distributed import run_ranks

    print("CPU ms per step (1 rank)")
    print("case   variant          mean ms  median ms  collect  reduce  eigen  ratio vs adam")
    for case in args.case:
        dim, res = (int(x) for x in case.split(":"))
        base = None
        for variant in args.variant:
            row = run_ranks(run, 1, dim, res, variant, args, timeout=3600)[0]
            base = row["mean_ms"] if variant == "adam" else base
            ratio = f"{row['mean_ms'] / base:.2f}" if base else "-"
            print(
                f"{dim}-D {res:<3} {variant:<15} {row['mean_ms']:8.1f} {row['median_ms']:9.1f} "
                f"{row['_collect']:8.1f} {row['_update_factors']:7.1f} "
                f"{row['_update_eigen']:6.1f}  {ratio}",
                flush=True,
            )


if __name__ == "__main__":
    main()
