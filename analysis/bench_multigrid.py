"""Multigrid training vs finest-level-only training: wall time to three targets, error at equal
wall time (issue 12's benchmark).

    python analysis/bench_multigrid.py --dim 2 --levels 32 64 128 --cap 300 --out runs/bench_mg2d
    python analysis/bench_multigrid.py --dim 3 --levels 16 32 64 --cap 1800 --out runs/bench_mg3d

Every contender is a real ``pdeds train`` run (one process, ``--threads`` threads; ``--jobs``
at a time) of launch/configs/quickstart.yaml with ``--set`` overrides, and all of them share:
the network (the default model unless ``--set model.*``), the weight seed, the held-out set
(``data.val_seed``, evaluated at the finest level), and the sample stream (fresh coefficient
vectors, ``data.train_samples: 0``, ``data.seed``).

How a fair comparison is made:
1. One wall-time cap for all. Every run has ``train.time_limit = cap`` (training time,
   evaluation excluded) and a cosine learning rate that decays over that budget, so each one
   trains until the cap and ends annealed; none is cut short by a step budget sized for another.
2. Cycles split the cap by level. Level l gets the fraction ``--time-share`` [l] of the cap,
   split evenly over its visits (``schedule.level[l].time``): the trainer ends each visit when
   its share of the training clock is spent, so the last (finest) visit always gets its share.
3. Targets: the finest-only run's best held-out mean rel-L2 at 1/4, 1/2 and all of the cap.
   For each contender: training wall time and samples to first reach each target, and its
   error at equal wall time (the last evaluation at or before the finest-only run's end).
4. About ``--evals`` evaluations per run (``train.eval_every`` in steps, from a short measurement
   of each level's step time and the run's time shares).

Outputs: a markdown table (printed and ``bench_multigrid.md``), ``bench_multigrid.json`` and
``bench_multigrid.png`` (error vs training wall time, every contender).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from pdeds.multigrid import visits  # noqa: E402

CYCLES = ("half-v", "v", "w", "f")
SINGLE = [  # the quickstart's own schedule replaced by one level
    "schedule.cycle=single",
    "schedule.levels=1",
    "schedule.resolutions=null",
    "schedule.level=[]",
]


def train(name: str, out: Path, overrides: list[str], threads: int) -> Path:
    """One ``pdeds train`` run (skipped if its summary exists); returns its run directory."""
    run_dir = out / name
    if (run_dir / "summary.json").is_file():
        return run_dir
    cmd = [sys.executable, "-m", "pdeds", "train", str(ROOT / "launch/configs/quickstart.yaml")]
    cmd += ["--run-dir", str(run_dir), "--force"]
    for o in overrides:
        cmd += ["--set", o]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    with open(out / f"{name}.log", "w") as log:
        subprocess.run(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, check=True)
    return run_dir


def rows(run_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def curve(run_dir: Path) -> list[dict]:
    """Eval rows (train_s, samples, val_rel_l2_mean) in step order."""
    return [r for r in rows(run_dir) if "val_rel_l2_mean" in r]


def level_overrides(args: argparse.Namespace, time: list[float]) -> list[str]:
    """``schedule.level`` with each level's batch, micro-batch, lr scale and time share."""
    entries = []
    for i, _ in enumerate(args.levels):
        e = {"batch": args.batch[i], "micro_batch": args.micro_batch[i]}
        e |= {"lr_scale": args.lr_scale[i], "time": round(time[i], 6)}
        entries.append("{" + ", ".join(f"{k}: {v}" for k, v in e.items()) + "}")
    return ["schedule.level=[" + ", ".join(entries) + "]"]


def step_times(args: argparse.Namespace, common: list[str]) -> list[float]:
    """Median step time of each level (a short run per level), to space the evaluations."""
    out = []
    for i, n in enumerate(args.levels):
        ov = (
            common
            + SINGLE
            + [
                f"problem.res={n}",
                "train.time_limit=null",
                "train.steps=12",
                "train.log_every=1",
                "train.eval_every=0",
                f"ds.train_batch_size={args.batch[i]}",
                f"ds.train_micro_batch_size_per_gpu={args.micro_batch[i]}",
            ]
        )
        run_dir = train(f"steptime_{n}", args.out, ov, args.threads)
        out.append(
            statistics.median([r["time_step_s"] for r in rows(run_dir) if "time_step_s" in r][2:])
        )
    return out


def eval_every(args: argparse.Namespace, t: list[float], share: list[float]) -> int:
    """Steps between evaluations for about ``--evals`` of them in a run that spends the
    fraction ``share[l]`` of the cap at level l: the run's steps are sum_l share_l cap / t_l."""
    steps = sum(f * args.cap / t_l for f, t_l in zip(share, t))
    return max(1, int(steps / args.evals))


def contenders(args: argparse.Namespace, t: list[float]) -> dict[str, list[str]]:
    """Overrides of every contender: finest only, then each distinct cycle."""
    top = len(args.levels) - 1
    only = [0.0] * top + [1.0]
    out = {
        "finest only": SINGLE
        + [
            "train.steps=1000000000",  # the cap ends it
            f"ds.train_batch_size={args.batch[top]}",
            f"ds.train_micro_batch_size_per_gpu={args.micro_batch[top]}",
            f"train.eval_every={eval_every(args, t, only)}",
        ]
    }
    seen = set()
    res = "[" + ", ".join(str(n) for n in args.levels) + "]"
    for cyc in args.cycles:
        seq = tuple(visits(cyc, len(args.levels)))
        if seq in seen:  # e.g. W(2) and F(2) are the same visit sequence
            continue
        seen.add(seq)
        total = [s / sum(args.time_share) for s in args.time_share]
        share = [f / seq.count(i) for i, f in enumerate(total)]
        out[cyc] = [
            f"schedule.cycle={cyc}",
            f"schedule.levels={len(args.levels)}",
            f"schedule.resolutions={res}",
            *level_overrides(args, share),
            f"train.eval_every={eval_every(args, t, total)}",
        ]
    return out


def first_reach(curve_: list[dict], target: float) -> dict | None:
    return next((r for r in curve_ if r["val_rel_l2_mean"] <= target), None)


def best_until(curve_: list[dict], t: float) -> float:
    """Best error evaluated by training time t (the first evaluation's if none was by then)."""
    early = [r["val_rel_l2_mean"] for r in curve_ if r["train_s"] <= t]
    return min(early) if early else curve_[0]["val_rel_l2_mean"]


def summarise(args: argparse.Namespace, curves: dict[str, list[dict]], t: list[float]) -> dict:
    base = curves["finest only"]
    end = base[-1]["train_s"]
    targets = [best_until(base, end * f) for f in (0.25, 0.5, 1.0)]
    out = {"levels": args.levels, "dim": args.dim, "cap_s": args.cap, "step_s": t}
    out["time_share"] = args.time_share
    out["targets"] = targets
    out["results"] = {}
    for name, c in curves.items():
        hits = [first_reach(c, x) for x in targets]
        at_end = [r for r in c if r["train_s"] <= end * 1.001]
        out["results"][name] = {
            "to_target_s": [h["train_s"] if h else None for h in hits],
            "to_target_samples": [h["samples"] if h else None for h in hits],
            "at_equal_time": at_end[-1]["val_rel_l2_mean"] if at_end else None,
            "final": c[-1]["val_rel_l2_mean"],
            "train_s": c[-1]["train_s"],
        }
    return out


def table(s: dict) -> str:
    n, d = s["levels"][-1], s["dim"]
    head = [
        f"finest level {n}^{d}, levels {s['levels']}, cap {s['cap_s']:.0f} s of training, "
        f"cycles' time shares {s['time_share']}; step times "
        f"{', '.join(f'{x * 1e3:.0f} ms' for x in s['step_s'])} (coarse to fine)",
        "targets = the finest-only run's best held-out mean rel-L2 after 1/4, 1/2, all of its "
        f"time: {', '.join(f'{x:.4g}' for x in s['targets'])}",
        "",
        "| schedule | s to T1 | s to T2 | s to T3 | speed-up to T3 | samples to T3 | "
        "rel-L2 at equal time | final rel-L2 | train s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    base = s["results"]["finest only"]["to_target_s"][2]
    lines = []
    for name, r in s["results"].items():
        secs = [f"{x:.0f}" if x is not None else "not reached" for x in r["to_target_s"]]
        t3 = r["to_target_s"][2]
        speed = f"{base / t3:.1f}x" if t3 else "-"
        samples = r["to_target_samples"][2] if t3 else "-"
        eq = f"{r['at_equal_time']:.4g}" if r["at_equal_time"] is not None else "-"
        lines.append(
            f"| {name} | {' | '.join(secs)} | {speed} | {samples} | {eq} | {r['final']:.4g} | "
            f"{r['train_s']:.0f} |"
        )
    return "\n".join(head + lines)


def plot(path: Path, curves: dict[str, list[dict]], s: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, c in curves.items():
        ax.plot(
            [r["train_s"] for r in c], [r["val_rel_l2_mean"] for r in c], "o-", ms=2, label=name
        )
    for x in s["targets"]:
        ax.axhline(x, color="gray", ls="--", lw=0.8)
    ax.set_xlabel("training wall time [s] (evaluation excluded)")
    ax.set_ylabel(f"held-out mean rel-L2 at {s['levels'][-1]}^{s['dim']}")
    ax.set_yscale("log")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def parse() -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--dim", type=int, default=3)
    ap.add_argument("--levels", type=int, nargs="+", default=[16, 32, 64])
    ap.add_argument("--cycles", nargs="+", default=list(CYCLES), choices=CYCLES)
    ap.add_argument("--cap", type=float, default=1800.0, help="training seconds per run")
    ap.add_argument(
        "--time-share",
        type=float,
        nargs="+",
        default=None,
        help="fraction of the cap per level, coarse to fine (default equal)",
    )
    ap.add_argument("--batch", type=int, nargs="+", default=None, help="global batch per level")
    ap.add_argument("--micro-batch", type=int, nargs="+", default=None)
    ap.add_argument("--lr-scale", type=float, nargs="+", default=None)
    ap.add_argument("--evals", type=int, default=40, help="evaluations per run (about)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--jobs", type=int, default=2, help="runs at a time")
    ap.add_argument("--set", dest="extra", action="append", default=[], help="more overrides")
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "bench_multigrid")
    args = ap.parse_args()
    k = len(args.levels)
    args.time_share = args.time_share or [1.0] * k
    args.batch = args.batch or [4] * k
    args.micro_batch = args.micro_batch or [min(4, b) for b in args.batch]
    args.lr_scale = args.lr_scale or [1.0] * k
    for key in ("time_share", "batch", "micro_batch", "lr_scale"):
        if len(getattr(args, key)) != k:
            ap.error(f"--{key.replace('_', '-')} needs one value per level ({k})")
    return args


def main() -> None:
    args = parse()
    args.out.mkdir(parents=True, exist_ok=True)
    common = [
        f"problem.dim={args.dim}",
        "data.train_samples=0",
        "train.checkpoint_every=0",
        "train.log_every=10",
        "train.lr_schedule=cosine",
        *args.extra,
    ]
    t = step_times(args, common)
    cfg = common + [f"problem.res={args.levels[-1]}", f"train.time_limit={args.cap}"]
    runs = contenders(args, t)

    def run(item: tuple[str, list[str]]) -> Path:
        name, ov = item
        return train(name.replace(" ", "_"), args.out, cfg + ov, args.threads)

    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        dirs = dict(zip(runs, pool.map(run, runs.items())))
    curves = {name: curve(d) for name, d in dirs.items()}
    s = summarise(args, curves, t)
    text = table(s)
    print(text)
    (args.out / "bench_multigrid.md").write_text(text + "\n")
    (args.out / "bench_multigrid.json").write_text(json.dumps(s, indent=2))
    plot(args.out / "bench_multigrid.png", curves, s)
    print(f"written: {args.out}/bench_multigrid.md, .json, .png")


if __name__ == "__main__":
    main()
