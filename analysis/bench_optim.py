"""Adam vs K-FAC vs L-BFGS vs Gauss-Newton (and Adam-then-Gauss-Newton): wall time to three
targets and error at equal wall time, at one or more batch sizes.

    python analysis/bench_optim.py --dim 2 --res 128 --cap 300 --out runs/bench_optim2d
    python analysis/bench_optim.py --dim 3 --res 32 --cap 300 --out runs/bench_optim3d

Every contender is a real ``pdeds train`` run (one process, ``--threads`` threads; ``--jobs``
at a time) of launch/configs/quickstart.yaml at one level (``--res``) with ``--set`` overrides;
all share the network (``--width``), the weight seed, the held-out set and the sample stream
(fresh coefficient vectors, or ``--train-samples`` of them). Each optimizer of ``--methods``
runs at the first global batch of ``--batches``, those of ``--drift-methods`` also at the
others (micro-batch ``--micro``; a larger batch is gradient accumulation). Adam always runs: it
sets the targets.

How a fair comparison is made:
1. One wall-time cap for all. Every run has ``train.time_limit = --cap`` (training time,
   evaluation excluded) and ``train.steps`` = 1e9, so each one trains until the cap; none is
   cut short by a step budget sized for another. Adam and K-FAC decay their rate by a cosine
   over the cap (the trainer's schedule follows max(step / steps, train_s / time_limit)); L-BFGS
   and Gauss-Newton keep a constant rate (their lr is the first trial step of L-BFGS's line
   search, Gauss-Newton's backtracking). Rates are METHODS' at batch ``--lr-batch`` (8) and
   follow one rule for every method at other batches (``--lr-scaling``, default sqrt: lr x
   sqrt(B / 8), the square-root rule of adaptive methods): at batch 64 Adam and K-FAC both run
   at 8.5e-3 (measured, 2-D 64^2 batch 64, 150 s: Adam 0.112 at 3e-3, 0.105 at 1e-2, 0.209 at
   3e-2; K-FAC 0.105, 0.053, 0.124). A fixed rate at every batch would compare the large batch
   at a rate tuned for the small one.
2. Targets, per batch: Adam's best held-out mean rel-L2 after 1/4, 1/2 and all of its training
   time (T1, T2, T3). For each run: training seconds (``train_s``) and evaluated samples to
   first reach each target, its final error, its time to T3 over Adam's (goal <= 0.5) and
   Adam's final error over its own, "x lower at equal time" (goal >= 3).
3. Drift (more than one batch): the target is Adam's final error at the largest batch; for each
   method run at the smallest and the largest batch, the samples and seconds to it at both and
   their ratio largest / smallest (1 = no drift; lower than Adam's = less drift than Adam).
4. About ``--evals`` evaluations per run: ``train.eval_every`` from the median step time of a
   10-step probe of each (method, batch) (probes run one at a time; a switch method's probe is
   its second phase). The switch method runs Adam for ``--switch-fraction`` of the cap (its
   ``optim.switch_after`` from Adam's probe at that batch).

Evaluated samples are batch x global-batch evaluations: one per step for Adam and K-FAC; L-BFGS
evaluates at each line-search trial point, Gauss-Newton its gradient and trial forwards (its CG
products on the curvature sub-batch show in the wall time only), counted by the trainer
(``samples_evaluated`` of its metrics rows).

Runs whose summary.json exists are reused (delete a run directory to redo it). Outputs in
``--out``: ``bench_optim.md`` (also printed), ``bench_optim.json`` and ``bench_optim.png``
(error vs training seconds, one panel per batch).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "analysis"))

from bench_multigrid import best_until, first_reach  # noqa: E402 - the same target rules

METHODS: dict[str, list[str]] = {
    "adam": ["optim.name=adam", "optim.lr=3e-3", "train.lr_schedule=cosine"],
    "kfac": ["optim.name=kfac", "optim.lr=3e-3", "train.lr_schedule=cosine"],
    "kfac_lr1e-2": ["optim.name=kfac", "optim.lr=1e-2", "train.lr_schedule=cosine"],
    "kfac_absolute": [
        "optim.name=kfac",
        "optim.lr=3e-3",
        "optim.kfac.damping_mode=absolute",
        "optim.kfac.damping=1e-3",
        "optim.kfac.factor_decay=0.95",
        "train.lr_schedule=cosine",
    ],
    "kfac_mean": [
        "optim.name=kfac",
        "optim.lr=3e-3",
        "optim.kfac.factor_average=mean",
        "train.lr_schedule=cosine",
    ],
    "kfac_mean_often": [
        "optim.name=kfac",
        "optim.lr=3e-3",
        "optim.kfac.factor_average=mean",
        "optim.kfac.factor_update_steps=5",
        "optim.kfac.inv_update_steps=10",
        "train.lr_schedule=cosine",
    ],
    "kfac_ggn": [
        "optim.name=kfac",
        "optim.lr=3e-3",
        "optim.kfac.curvature=ggn",
        "train.lr_schedule=cosine",
    ],
    "lbfgs": [
        "optim.name=lbfgs",
        "optim.lr=1.0",
        "optim.lbfgs.history_size=20",
        "optim.lbfgs.max_iter=4",
        "train.lr_schedule=constant",
    ],
    "gauss_newton": ["optim.name=gauss_newton", "optim.lr=1.0", "train.lr_schedule=constant"],
    "adam_gauss_newton": [
        "optim.name=gauss_newton",
        "optim.lr=1.0",
        "optim.first=adam",
        "optim.first_lr=3e-3",
        "train.lr_schedule=constant",
    ],
}
"""``--set`` overrides of each contender (edit here; ``--method-set`` adds to one):

- adam: lr 3e-3 (best of 1e-3, 3e-3, 1e-2 in short constant-rate runs), cosine over the cap.
- kfac: K-FAC's defaults (``pdeds.optim.config.KFACConfig``: inner Adam, relative damping 3e-2,
  factor decay 0.99, factors every 10 steps, eigenbases every 50, 5 warm-up steps) at Adam's lr,
  cosine over the cap.
- kfac_lr1e-2: kfac at its own rate (1e-2 at batch 8).
- kfac_absolute: the defaults before relative damping (absolute damping 1e-3, factor decay
  0.95), at Adam's lr.
- kfac_mean: kfac whose factor average starts as the plain mean of the updates
  (``optim.kfac.factor_average: mean``).
- kfac_mean_often: kfac_mean with factors every 5 steps and eigenbases every 10 (for runs of
  few steps, e.g. batch 64).
- kfac_ggn: kfac with the factors' output curvature from the Gauss-Newton (GGN) matrix
  (``optim.kfac.curvature: ggn``).
- lbfgs: lr 1 (the quasi-Newton step), history 20, max_iter 4, constant rate; ``hold_steps``
  is set per run (``LBFGS_HOLD_STEPS``).
- gauss_newton: its defaults (lr 1, CG on a curvature sub-batch, Levenberg-Marquardt damping),
  constant rate.
- adam_gauss_newton: Adam at 3e-3 (constant), then Gauss-Newton; ``optim.switch_after`` is set
  per batch from ``--switch-fraction`` (``SWITCHES``).
"""

SWITCHES = {"adam_gauss_newton": "adam"}
"""Switch methods and the method whose probed step time sets their ``optim.switch_after``."""

LBFGS_HOLD_STEPS = 3
"""L-BFGS steps on one batch (3 of max_iter 4 = 12 iterations) when the batch is not the whole
training set; 0 (full batch) when it is."""

PINNED = [
    "train.steps=1000000000",  # the cap ends every run
    "train.loss_weighting=none",
    "train.seed=0",
    "data.seed=0",
    "schedule.cycle=single",
    "schedule.levels=1",
    "schedule.resolutions=null",
    "schedule.level=[]",
    "train.checkpoint_every=0",
]
"""Settings of every run, whatever quickstart.yaml says (``--set`` overrides them)."""


def train(name: str, out: Path, overrides: list[str], threads: int) -> Path | None:
    """One ``pdeds train`` run (skipped if its summary exists and it ran with the same
    overrides, ``NAME.overrides.json``); returns its run directory, or None (and says so) if it
    failed."""
    run_dir, record = out / name, out / f"{name}.overrides.json"
    if (run_dir / "summary.json").is_file():
        if not record.is_file() or json.loads(record.read_text()) == overrides:
            return run_dir
        print(f"{name}: its overrides changed, run again", flush=True)
    record.write_text(json.dumps(overrides))
    cmd = [
        sys.executable,
        "-m",
        "pdeds",
        "train",
        str(ROOT / "launch/configs/quickstart.yaml"),
        "--run-dir",
        str(run_dir),
    ]
    cmd += ["--force", *(x for o in overrides for x in ("--set", o))]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), DS_ACCELERATOR="cpu")
    with open(out / f"{name}.log", "w") as log:
        rc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    if rc.returncode:
        print(f"{name}: failed (exit {rc.returncode}), see {out / name}.log", flush=True)
        return None
    print(f"{name}: done", flush=True)
    return run_dir


def rows(run_dir: Path) -> list[dict]:
    """All metrics.jsonl rows of a run."""
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def curve(run_dir: Path) -> list[dict]:
    """Eval rows in step order, each with ``evaluated``: the trainer's ``samples_evaluated``
    (batch x evaluations of the global batch so far)."""
    evals = [r for r in rows(run_dir) if "val_rel_l2_mean" in r]
    return [{**r, "evaluated": int(r["samples_evaluated"])} for r in evals]


LR_SCALING = {"none": 0.0, "sqrt": 0.5, "linear": 1.0}
"""``--lr-scaling``: exponent p of the batch rule lr(B) = lr (B / ``--lr-batch``)^p."""


def scaled(method: str, batch: int, args: argparse.Namespace) -> list[str]:
    """The method's overrides with its rates at ``batch``: ``optim.lr`` of a method with a
    cosine schedule (Adam, K-FAC: a rate; L-BFGS' and Gauss-Newton's lr is a step multiplier
    under a line search) and every ``optim.first_lr`` times (B / lr_batch)^p."""
    factor = (batch / args.lr_batch) ** LR_SCALING[args.lr_scaling]
    cosine = "train.lr_schedule=cosine" in METHODS[method]
    out = []
    for o in METHODS[method]:
        key, _, value = o.partition("=")
        if key == "optim.first_lr" or (key == "optim.lr" and cosine):
            o = f"{key}={float(value) * factor:.4g}"
        out.append(o)
    return out


def overrides(method: str, batch: int, args: argparse.Namespace, own: list[str]) -> list[str]:
    """Overrides of a (method, batch) run: pinned, problem and batch, the method's (rates by
    the batch rule, ``scaled``), ``own``
    (the run's cap, spacing, switch), then ``--set`` and ``--method-set``."""
    ov = [
        *PINNED,
        f"problem.dim={args.dim}",
        f"problem.res={args.res}",
        f"model.width={args.width}",
        f"data.train_samples={args.train_samples}",
        f"ds.train_batch_size={batch}",
        f"ds.train_micro_batch_size_per_gpu={min(args.micro, batch)}",
        *scaled(method, batch, args),
        *own,
    ]
    if method == "lbfgs":
        full = 0 < args.train_samples <= batch
        ov.append(f"optim.lbfgs.hold_steps={0 if full else LBFGS_HOLD_STEPS}")
    ov += args.extra
    return ov + [o.split(":", 1)[1] for o in args.method_set if o.split(":", 1)[0] == method]


def probe(method: str, batch: int, args: argparse.Namespace) -> float | None:
    """Median step time (s) of a 10-step run after its first 2 steps (None if it failed); a
    switch method is probed without its first phase."""
    own = ["train.time_limit=null", "train.steps=10", "train.log_every=1", "train.eval_every=0"]
    own += ["optim.switch_after=0"] if method in SWITCHES else []
    run_dir = train(
        f"probe_{method}_b{batch}", args.out, overrides(method, batch, args, own), args.threads
    )
    if run_dir is None:
        return None
    return statistics.median([r["time_step_s"] for r in rows(run_dir) if "time_step_s" in r][2:])


def capped(method: str, batch: int, args: argparse.Namespace, step_s: dict) -> list[str]:
    """Overrides of a capped run: ``--cap``, about ``--evals`` evaluations, the switch step."""
    t = step_s[(method, batch)]
    steps, own = args.cap / t, [f"train.time_limit={args.cap}"]
    if method in SWITCHES:
        first = max(1, round(args.switch_fraction * args.cap / step_s[(SWITCHES[method], batch)]))
        steps = first + (1.0 - args.switch_fraction) * args.cap / t
        own.append(f"optim.switch_after={first}")
    every = max(1, int(steps / args.evals))
    own += [f"train.eval_every={every}", f"train.log_every={every}"]
    return overrides(method, batch, args, own)


def result(c: list[dict], run_dir: Path, targets: list[float], adam: dict | None) -> dict:
    """One run's numbers: seconds and evaluated samples to each target, final error, steps,
    ms per evaluated sample, and (given Adam's result at the batch) the two goal ratios."""
    hits = [first_reach(c, x) for x in targets]
    summary = json.loads((run_dir / "summary.json").read_text())
    r = {
        "to_target_s": [h["train_s"] if h else None for h in hits],
        "to_target_evaluated": [h["evaluated"] if h else None for h in hits],
        "final": c[-1]["val_rel_l2_mean"],
        "best": min(x["val_rel_l2_mean"] for x in c),
        "train_s": summary["train_time_s"],
        "steps": summary["steps"],
        "evaluated": c[-1]["evaluated"],
    }
    r["ms_per_evaluated_sample"] = 1e3 * r["train_s"] / max(1, r["evaluated"])
    adam = adam or r
    t3, a3 = r["to_target_s"][2], adam["to_target_s"][2]
    r["time_ratio"] = t3 / a3 if t3 is not None and a3 else None
    r["lower_at_equal_time"] = adam["final"] / r["final"]
    return r


def drift(args: argparse.Namespace, curves: dict, lo: int, hi: int) -> dict:
    """Samples and seconds to Adam's final error at batch hi, at batch lo and hi.

    A run that does not reach it still bounds its ratio: it would need more than all it
    evaluated (ran), so ``*_ratio_range`` = [low, high] of batch hi / batch lo (inf = none)."""
    target = curves[("adam", hi)][-1]["val_rel_l2_mean"]
    out = {"target": target, "batches": [lo, hi], "methods": {}}
    for m in (m for m in args.methods if (m, lo) in curves and (m, hi) in curves):
        hits = [first_reach(curves[(m, b)], target) for b in (lo, hi)]
        ends = [curves[(m, b)][-1] for b in (lo, hi)]
        d = {"evaluated": [h and h["evaluated"] for h in hits]}
        d["seconds"] = [h and h["train_s"] for h in hits]
        for key, col in (("evaluated", "evaluated"), ("seconds", "train_s")):
            a, b = d[key]
            d[f"{key}_ratio"] = b / a if a and b is not None else None
            # each count: [itself, itself] if reached, else (all of the run's, inf)
            (a_lo, a_hi), (b_lo, b_hi) = (
                (x, x) if x is not None else (e[col], math.inf) for x, e in zip(d[key], ends)
            )
            d[f"{key}_ratio_range"] = [b_lo / a_hi, b_hi / a_lo if a_lo else math.inf]
        out["methods"][m] = d
    return out


def ratio_text(r: list[float]) -> str:
    """A ratio range as text: "1.23", "< 1.23", "> 1.23" or "-" (unbounded both ways)."""
    low, high = r
    if low == high:
        return f"{low:.2f}"
    if high < math.inf:
        return f"< {high:.2f}"
    return f"> {low:.2f}" if low > 0 else "-"


def summarise(args: argparse.Namespace, curves: dict, dirs: dict, step_s: dict) -> dict:
    """Settings, step times, targets per batch, every run's result, the drift."""
    batches = sorted({b for _, b in curves})
    s = {"settings": vars(args) | {"out": str(args.out)}, "cpu": cpu()}
    s["step_s"] = {f"{m}@{b}": t for (m, b), t in step_s.items()}
    s["targets"], s["results"] = {}, {}
    for b in batches:
        base = curves[("adam", b)]
        s["targets"][b] = [best_until(base, base[-1]["train_s"] * f) for f in (0.25, 0.5, 1.0)]
        adam = result(base, dirs[("adam", b)], s["targets"][b], None)
        for m in (m for m in args.methods if (m, b) in curves):
            r = result(curves[(m, b)], dirs[(m, b)], s["targets"][b], adam)
            ov = capped(m, b, args, step_s)
            s["results"][f"{m}@{b}"] = {"method": m, "batch": b, **r, "overrides": ov}
    s["drift"] = drift(args, curves, batches[0], batches[-1]) if len(batches) > 1 else None
    return s


def cpu() -> str:
    """The CPU model (/proc/cpuinfo) and os.cpu_count()."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        model = next(x.split(":", 1)[1].strip() for x in lines if x.startswith("model name"))
    except (OSError, StopIteration):
        model = "unknown CPU"
    return f"{model}, os.cpu_count() {os.cpu_count()}"


def fmt(x: float | None, spec: str) -> str:
    """x formatted, "-" for None."""
    return "-" if x is None else format(x, spec)


def batch_table(s: dict, b: int) -> list[str]:
    """The per-run table of batch b, under its targets."""
    lines = [
        "",
        f"global batch {b}: targets T1, T2, T3 = Adam's best after 1/4, 1/2, all of its time: "
        f"{', '.join(f'{x:.4g}' for x in s['targets'][b])}",
        "",
        "| method | steps | s to T1 | s to T2 | s to T3 | samples to T1 | to T2 | to T3 | "
        "final rel-L2 | time to T3 / Adam's | x lower at equal time | ms / evaluated sample |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in (r for r in s["results"].values() if r["batch"] == b):
        secs = " | ".join(fmt(x, ".1f") for x in r["to_target_s"])
        samples = " | ".join(fmt(x, "d") for x in r["to_target_evaluated"])
        lines.append(
            f"| {r['method']} | {r['steps']} | {secs} | {samples} | {r['final']:.4g} | "
            f"{fmt(r['time_ratio'], '.2f')} | {r['lower_at_equal_time']:.2f} | "
            f"{r['ms_per_evaluated_sample']:.2f} |"
        )
    return lines


def drift_table(d: dict) -> list[str]:
    """Samples and seconds to the drift target at the smallest and largest batch."""
    lo, hi = d["batches"]
    lines = [
        "",
        f"drift from batch {lo} to {hi}: to Adam's final rel-L2 at batch {hi}, {d['target']:.4g};"
        f" ratio = batch {hi} / batch {lo} (1 = no drift)",
        "",
        f"| method | samples at {lo} | at {hi} | ratio | s at {lo} | at {hi} | ratio |",
        "|---|---|---|---|---|---|---|",
    ]
    for m, r in d["methods"].items():
        (ea, eb), (sa, sb) = r["evaluated"], r["seconds"]
        lines.append(
            f"| {m} | {fmt(ea, 'd')} | {fmt(eb, 'd')} | {ratio_text(r['evaluated_ratio_range'])} "
            f"| {fmt(sa, '.1f')} | {fmt(sb, '.1f')} | {ratio_text(r['seconds_ratio_range'])} |"
        )
    lines.append(f"(< x: batch {lo} does not reach it; > x: batch {hi} does not)")
    return lines


def verdict(s: dict, b: int) -> str:
    """The best second-order method at batch b against both goals."""
    others = [r for r in s["results"].values() if r["batch"] == b and r["method"] != "adam"]
    if not others:
        return f"batch {b}: no second-order method ran."
    reached = [r for r in others if r["to_target_s"][2] is not None]
    if reached:
        best = min(reached, key=lambda r: r["to_target_s"][2])
        how = f"{best['to_target_s'][2]:.1f} s to T3"
    else:
        best = min(others, key=lambda r: r["final"])
        how = "none reached T3; lowest final"
    tr, lo = best["time_ratio"], best["lower_at_equal_time"]
    return (
        f"batch {b}: best second-order = {best['method']} ({how}): {fmt(tr, '.2f')} of Adam's "
        f"time to T3 (goal <= 0.5 of Adam's time: "
        f"{'MET' if tr is not None and tr <= 0.5 else 'NOT met'}); final {best['final']:.4g}, "
        f"{lo:.2f}x lower than Adam's at equal time (goal >= 3x lower at equal time: "
        f"{'MET' if lo >= 3 else 'NOT met'})."
    )


def drift_verdict(d: dict) -> str:
    """Each method's drift ratios against Adam's: smaller when its whole range lies below
    Adam's, not smaller when above, "-" when the ranges overlap."""
    words = []
    for m in (m for m in d["methods"] if m != "adam"):
        for key, what in (("evaluated_ratio_range", "samples"), ("seconds_ratio_range", "seconds")):
            x, a = d["methods"][m][key], d["methods"]["adam"][key]
            cmp = "smaller" if x[1] < a[0] else "not smaller" if x[0] >= a[1] else "-"
            words.append(f"{m} {what} {ratio_text(x)} vs Adam's {ratio_text(a)}: {cmp}")
    return f"verdict drift: {'; '.join(words) or 'no other method ran at both batches'}."


def report(s: dict, args: argparse.Namespace, failed: list[str]) -> str:
    """The markdown: settings and step times, a table per batch, drift, verdicts, failures."""
    lines = [
        f"problem {args.dim}-D at res {args.res}, width {args.width}, cap {args.cap:g} s of "
        f"training per run, batches {args.batches} (micro {args.micro}), training samples "
        f"{args.train_samples or 'fresh'}, {args.threads} thread(s) a run, {args.jobs} run(s) at "
        f"a time; rates x (batch / {args.lr_batch})^{LR_SCALING[args.lr_scaling]:g} "
        f"({args.lr_scaling}); {s['cpu']}",
        "measured step times [ms]: "
        + ", ".join(f"{k} {1e3 * t:.0f}" for k, t in s["step_s"].items()),
    ]
    for b in s["targets"]:
        lines += batch_table(s, b)
    lines += drift_table(s["drift"]) if s["drift"] else []
    lines += ["", *(f"verdict {verdict(s, b)}" for b in s["targets"])]
    lines += [drift_verdict(s["drift"])] if s["drift"] else []
    if failed:
        lines += ["", f"failed (see their .log in {args.out}): {', '.join(failed)}"]
    return "\n".join(lines)


def plot(path: Path, curves: dict, s: dict, args: argparse.Namespace) -> None:
    """Error vs training seconds, one panel per batch, targets dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    batches = list(s["targets"])
    fig, axes = plt.subplots(1, len(batches), figsize=(6 * len(batches), 4.5), squeeze=False)
    for ax, b in zip(axes[0], batches, strict=True):
        for i, m in enumerate(METHODS):
            if c := curves.get((m, b)):
                x, y = [r["train_s"] for r in c], [r["val_rel_l2_mean"] for r in c]
                ax.plot(x, y, "o-", ms=2, color=f"C{i}", label=m)
        for x in s["targets"][b]:
            ax.axhline(x, color="gray", ls="--", lw=0.8)
        ax.set(title=f"global batch {b}", yscale="log")
        ax.set_xlabel("training wall time [s] (evaluation excluded)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    axes[0][0].set_ylabel(f"held-out mean rel-L2 at {args.res}^{args.dim}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def parse() -> argparse.Namespace:
    """Command line; Adam is always run (first), at every batch."""
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--dim", type=int, default=3, choices=(2, 3), help="problem.dim")
    ap.add_argument("--res", type=int, default=32, help="problem.res")
    ap.add_argument("--width", type=int, default=8, help="model.width")
    ap.add_argument("--cap", type=float, default=300.0, help="training seconds per run")
    ap.add_argument("--batches", type=int, nargs="+", default=[8, 64], help="global batches")
    ap.add_argument("--micro", type=int, default=8, help="micro-batch (per rank)")
    ap.add_argument(
        "--lr-scaling", default="sqrt", choices=list(LR_SCALING), help="rates at other batches"
    )
    ap.add_argument("--lr-batch", type=int, default=8, help="batch the METHODS rates are for")
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    ap.add_argument("--drift-methods", nargs="+", choices=list(METHODS), help="at later batches")
    ap.add_argument("--method-set", action="append", default=[], metavar="METHOD:KEY=VALUE")
    ap.add_argument("--set", dest="extra", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--train-samples", type=int, default=0, help="data.train_samples (0: fresh)")
    ap.add_argument("--switch-fraction", type=float, default=0.3, help="cap share of Adam first")
    ap.add_argument("--evals", type=int, default=30, help="evaluations per run (about)")
    ap.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of each run")
    ap.add_argument("--jobs", type=int, default=2, help="runs at a time")
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "bench_optim")
    args = ap.parse_args()
    args.methods = ["adam", *(m for m in args.methods if m != "adam")]  # Adam sets the targets
    drift = args.drift_methods or args.methods
    args.drift_methods = ["adam", *(m for m in args.methods if m in drift and m != "adam")]
    return args


def main() -> None:
    """Probe, run (``--jobs`` at a time), summarise, write md / json / png."""
    args = parse()
    args.out.mkdir(parents=True, exist_ok=True)
    first = args.batches[0]
    plan = [(m, b) for b in args.batches for m in (args.drift_methods, args.methods)[b == first]]
    step_s = {mb: probe(*mb, args) for mb in plan}  # one at a time: clean step times
    failed = [f"probe {m}@{b}" for (m, b), t in step_s.items() if t is None]
    step_s = {mb: t for mb, t in step_s.items() if t is not None}
    todo = [mb for mb in plan if mb in step_s]

    def run(mb: tuple[str, int]) -> Path | None:
        return train(f"{mb[0]}_b{mb[1]}", args.out, capped(*mb, args, step_s), args.threads)

    if any(("adam", b) not in step_s for b in args.batches):
        raise SystemExit(f"Adam's probe failed; see {args.out}/probe_adam_b*.log")
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        dirs = dict(zip(todo, pool.map(run, todo), strict=True))
    failed += [f"{m}@{b}" for (m, b), d in dirs.items() if d is None]
    if any(dirs[("adam", b)] is None for b in args.batches):
        raise SystemExit(f"an Adam run failed (it sets the targets); see {args.out}/adam_b*.log")
    dirs = {mb: d for mb, d in dirs.items() if d is not None}
    curves = {(m, b): curve(d) for (m, b), d in dirs.items()}
    s = summarise(args, curves, dirs, step_s)
    text = report(s, args, failed)
    print(text)
    (args.out / "bench_optim.md").write_text(text + "\n")
    (args.out / "bench_optim.json").write_text(json.dumps(s | {"failed": failed}, indent=2))
    plot(args.out / "bench_optim.png", curves, s, args)
    print(f"written: {args.out}/bench_optim.md, .json, .png")


if __name__ == "__main__":
    main()
