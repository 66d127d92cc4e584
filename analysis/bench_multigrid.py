"""Multigrid training vs finest-level-only training: time and samples to a target error.

    python analysis/bench_multigrid.py --levels 16 32 64 --budget-steps 300 --out runs/bench_mg

Trains, with the same network, seed and held-out set, the finest-level-only baseline and
each cycle (half-v, v, w, f) on the resolutions ``--levels`` (coarsest first). The target is
the best held-out mean rel-L2 (at the finest level) that the baseline reaches within its
budget; for every run the script reports the training wall time (evaluation excluded) and
samples to first reach the target, its final error and the speed-up vs the baseline, as a
markdown table, a JSON file and a plot of error vs wall time (all cycles).

Each run is a real ``pdeds train`` subprocess (one process, ``--threads`` threads) on
launch/configs/quickstart.yaml with ``--set`` overrides; a multigrid run gets ``--mg-steps``
optimizer steps (default: the baseline's), shared over the visits with
``schedule.coarse_factor`` (coarser levels get k x more steps), the cycle repeated ``--repeat``
times. Steps at coarse levels are ~2^d x cheaper, so give cycles more steps than the baseline
to compare at similar wall time.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CYCLES = ("single", "half-v", "v", "w", "f")


def run(name: str, out: Path, overrides: list[str], threads: int) -> Path:
    """Train one configuration (skipped if its summary already exists); returns its run dir."""
    run_dir = out / name
    if (run_dir / "summary.json").is_file():
        return run_dir
    cmd = [sys.executable, "-m", "pdeds", "train", str(ROOT / "launch/configs/quickstart.yaml")]
    cmd += ["--run-dir", str(run_dir), "--force"]
    for o in overrides:
        cmd += ["--set", o]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    t0 = time.perf_counter()
    with open(out / f"{name}.log", "w") as log:
        subprocess.run(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, check=True)
    print(f"{name}: {time.perf_counter() - t0:.0f} s", flush=True)
    return run_dir


def curve(run_dir: Path) -> list[dict]:
    """Eval rows (train_s, samples, val_rel_l2_mean) of a run, in step order."""
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "val_rel_l2_mean" in r]


def first_reach(rows: list[dict], target: float) -> dict | None:
    for r in rows:
        if r["val_rel_l2_mean"] <= target:
            return r
    return None


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--levels", type=int, nargs="+", default=[16, 32, 64])
    ap.add_argument("--cycles", nargs="+", default=list(CYCLES[1:]), choices=CYCLES[1:])
    ap.add_argument("--budget-steps", type=int, default=300, help="optimizer steps of the baseline")
    ap.add_argument(
        "--mg-steps",
        type=int,
        default=None,
        help="optimizer steps of each cycle run (default: baseline's)",
    )
    ap.add_argument("--repeat", type=int, default=1, help="cycles back to back (schedule.cycles)")
    ap.add_argument("--coarse-factor", type=float, default=2.0)
    ap.add_argument("--eval-every", type=int, default=25)
    ap.add_argument("--width", type=int, default=16)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--set", dest="extra", action="append", default=[], help="more overrides")
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "bench_multigrid")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    common = [
        f"problem.res={args.levels[-1]}",
        f"model.width={args.width}",
        f"train.steps={args.budget_steps}",
        f"train.eval_every={args.eval_every}",
        "train.checkpoint_every=0",
        "train.log_every=25",
        *args.extra,
    ]
    runs = {"single": run("single", args.out, common, args.threads)}
    res = "[" + ", ".join(str(n) for n in args.levels) + "]"
    for cyc in args.cycles:
        ov = [o for o in common if not o.startswith("train.steps=")] + [
            f"train.steps={args.mg_steps or args.budget_steps}",
            f"schedule.cycle={cyc}",
            f"schedule.levels={len(args.levels)}",
            f"schedule.resolutions={res}",
            f"schedule.coarse_factor={args.coarse_factor}",
            f"schedule.cycles={args.repeat}",
        ]
        runs[cyc] = run(cyc, args.out, ov, args.threads)
    curves = {k: curve(v) for k, v in runs.items()}
    target = min(r["val_rel_l2_mean"] for r in curves["single"])
    base = first_reach(curves["single"], target)
    table = [
        f"target: baseline's best held-out mean rel-L2 at {args.levels[-1]}^3 = {target:.4g} "
        f"(budget {args.budget_steps} steps, levels {args.levels})",
        "",
        "| schedule | wall s to target | samples to target | final rel-L2 | best rel-L2 | "
        "total train s | speed-up |",
        "|---|---|---|---|---|---|---|",
    ]
    results = {}
    for name, rows in curves.items():
        hit = first_reach(rows, target)
        total = json.loads((runs[name] / "summary.json").read_text())["train_time_s"]
        speed = base["train_s"] / hit["train_s"] if hit else None
        results[name] = dict(
            wall_to_target=hit["train_s"] if hit else None,
            samples_to_target=hit["samples"] if hit else None,
            final=rows[-1]["val_rel_l2_mean"],
            best=min(r["val_rel_l2_mean"] for r in rows),
            train_s=total,
            speedup=speed,
        )
        r = results[name]
        table.append(
            f"| {name} | {r['wall_to_target']:.0f} | {r['samples_to_target']} | {r['final']:.4g} | "
            f"{r['best']:.4g} | {total:.0f} | {speed:.2f}x |"
            if hit
            else f"| {name} | not reached | - | {r['final']:.4g} | {r['best']:.4g} | "
            f"{total:.0f} | - |"
        )
    text = "\n".join(table)
    print(text)
    (args.out / "bench_multigrid.md").write_text(text + "\n")
    (args.out / "bench_multigrid.json").write_text(
        json.dumps({"target": target, "levels": args.levels, "results": results}, indent=2)
    )
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, rows in curves.items():
        ax.plot(
            [r["train_s"] for r in rows],
            [r["val_rel_l2_mean"] for r in rows],
            "o-",
            ms=3,
            label="finest only" if name == "single" else name,
        )
    ax.axhline(target, color="gray", ls="--", lw=1, label="target")
    ax.set_xlabel("training wall time [s] (evaluation excluded)")
    ax.set_ylabel(f"held-out mean rel-L2 at {args.levels[-1]}^3")
    ax.set_yscale("log")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(args.out / "bench_multigrid.png", dpi=120)
    print(f"written: {args.out}/bench_multigrid.md, .json, .png")


if __name__ == "__main__":
    main()
