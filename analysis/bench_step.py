"""Per-step time breakdown and samples/s of the pdeds training step, on 1 or more gloo ranks.

    .venv/bin/python analysis/bench_step.py              # 32^3, 64^3 x 1, 2 ranks x ZeRO 0, 2, 3
    .venv/bin/python analysis/bench_step.py --res 32 --ranks 2 --zero 0 --steps 5
    .venv/bin/python analysis/bench_step.py --res 64 --steps 4 --warmup 1 --json step64.json
    .venv/bin/python analysis/bench_step.py --data generate             # nu evaluated every step

Each case (res, ranks, ZeRO stage) runs in fresh spawned processes
(``pdeds.testing.distributed.run_ranks``) and builds the real trainer pieces: the experiment
(``launch/configs/quickstart.yaml`` through ``pdeds.config.resolve`` with ``problem.res``,
``model.width/depth``, ``deepspeed.config=ds_configs/zero{Z}.json`` and the DeepSpeed patches
``ds.wall_clock_breakdown=true``, ``ds.train_batch_size``, ``ds.train_micro_batch_size_per_gpu``),
``build_model``, ``init_distributed`` + ``build_engine``, and ``training_samples`` /
``split_global_batch`` for the batches. A step is the trainer's own
(``pdeds.train.step.train_step``, with timers hooked in): per micro-batch nu -> ``engine(nu)`` ->
the micro-batch loss (``train.loss_weighting`` as configured) -> ``engine.backward`` ->
``engine.step()``, then the all-reduced mean of the loss. A barrier before every step (outside
the timing) plays the part of the trainer's per-step stop-flag all-reduce. ``--warmup`` steps
are dropped; every column is the median over ``--steps`` steps of the per-step sum over
micro-batches, averaged over ranks (``step`` is the slowest rank's). Threads per rank default to
cores // ranks (``--threads``).

Columns (ms per global step):

- data: ``TrainingSet.nu(idx, res)`` as the trainer calls it. The trainer caches the nu fields of
  the whole training set at a resolution (filled in the first, warm-up, step), so this is an
  index gather; ``--data generate`` evaluates the KL field from the coefficients every step
  instead (what happens when the set exceeds ``pdeds.train.data.CACHE_BYTES``).
- forward: wall time of ``engine(nu)``. Under ZeRO 3 on >1 rank it includes the parameter
  all-gathers that DeepSpeed issues in its forward hooks (not separable with its timers).
- energy: the micro-batch loss (``fem.energy``) forward plus its backward (K U - F), the latter
  timed from ``engine.backward`` until the gradient reaches the network output U (a hook on U).
- backward: DeepSpeed's ``bwd_inner`` timer: local autograd of the network. Under ZeRO 2 it also
  holds the copies of gradients into the reduce bucket done in hooks; under ZeRO 3 on >1 rank the
  parameter re-gathers and gradient partitioning done in hooks.
- comm: DeepSpeed's ``bwd_allreduce`` timer (the gradient all-reduce of ZeRO 0 and the reduce /
  reduce-scatter of the ZeRO 2/3 bucket at the end of backward, with its flatten / copy / average
  work) + ``optimizer_allgather`` (ZeRO 1/2: all-gather of the updated partitions in step) + the
  trainer's all-reduce of the step loss. On 1 rank the collectives are trivial and this is their
  local copy work.
- optimizer: wall time of ``engine.step()`` minus ``optimizer_allgather``: the Adam update, ZeRO
  bookkeeping, zeroing gradients, and any gradient-norm all-reduce DeepSpeed does there (one
  scalar).
- step: wall time of the whole step; samples/s = global batch / step. The columns need not add
  up to it exactly (medians; loop overhead); the JSON rows also hold the unattributed rest.
- energy %: energy / step in wall time (the issue's target: <= 10%). energy % cpu: the same
  ratio in process CPU time (``time.process_time``), which waiting for a busy core does not
  inflate; it does count spinning OpenMP and gloo threads, so it is a cross-check, not a truth.
- load: the 1-minute load average when the case started. Other processes on the cores stretch
  every column, multi-threaded small ops (the energy's) the most.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
QUICKSTART = ROOT / "launch" / "configs" / "quickstart.yaml"
COLUMNS = ("data", "forward", "energy", "backward", "comm", "optimizer")
TARGET_ENERGY_SHARE = 0.10
"""The issue's target: the energy (forward + backward) is at most 10% of a step."""


class DeepSpeedTimerLog:
    """Keeps the DeepSpeed timers that ``wall_clock_breakdown`` would print, in ms.

    With ``wall_clock_breakdown`` the engine and the ZeRO optimizers call
    ``timers.log(names, reset=True)`` inside ``engine.step()``: it prints the elapsed times and
    resets the timers, so they are gone when ``step()`` returns. This replaces ``log`` on the
    engine's timer group by one that adds each named timer's elapsed ms to ``ms`` (and resets it
    as asked) instead of printing. Micro-step and global timer names both arrive; use the global
    ones (``bwd_inner``, ``bwd_allreduce``, ``step``, ...), which sum over a step's micro-batches.
    """

    def __init__(self, timers: Any) -> None:
        self.ms: dict[str, float] = {}
        self._timers = timers
        timers.log = self._log

    def _log(
        self,
        names: Any,
        normalizer: float = 1.0,
        reset: bool = True,
        memory_breakdown: bool = False,
        ranks: Any = None,
    ) -> None:
        for name in names:
            if name in self._timers.timers:
                elapsed = self._timers.timers[name].elapsed(reset=reset) / normalizer
                self.ms[name] = self.ms.get(name, 0.0) + elapsed

    def take(self) -> dict[str, float]:
        """The timers logged since the last call, then forget them."""
        out, self.ms = self.ms, {}
        return out


def case_overrides(res: int, zero: int, args: argparse.Namespace) -> list[str]:
    """``--set`` overrides of the quickstart experiment for one benchmark case."""
    return [
        f"problem.res={res}",
        f"model.width={args.width}",
        f"model.depth={args.depth}",
        f"deepspeed.config=ds_configs/zero{zero}.json",
        "ds.wall_clock_breakdown=true",
        f"ds.train_batch_size={args.batch}",
        f"ds.train_micro_batch_size_per_gpu={args.micro_batch}",
        *args.set,
    ]


def now() -> tuple[float, float]:
    """(wall clock, CPU time of this process's threads), seconds."""
    return time.perf_counter(), time.process_time()


def timed_step(engine: Any, data: Any, micro: list, res: int, cfg: Any, log: Any) -> dict:
    """One optimizer step (``pdeds.train.step.train_step``, the trainer's own) with timers;
    returns its phases in ms.

    ``Phases`` charges data / forward / energy inside the loss, ``MarkedEngine`` the engine's
    backward and step calls, and a hook on the network output U ends the energy's backward
    (``energy_bwd``: from ``engine.backward`` until the gradient reaches U). ``energy_cpu`` and
    ``step_cpu`` are the same intervals in process CPU time: unlike wall time they do not grow
    while the rank waits for a core another process holds (they do count spinning OpenMP and
    gloo threads).
    """
    from pdeds.train.step import MarkedEngine, Phases, train_step

    phases = Phases()

    def hook_output(u: Any) -> None:
        u.register_hook(lambda grad: phases.mark("energy_bwd"))

    log.take()
    start = now()
    f, weighting = cfg.problem.f, cfg.train.loss_weighting
    marked = MarkedEngine(engine, phases)
    train_step(
        marked, data, micro, res=res, f=f, weighting=weighting, phases=phases, on_output=hook_output
    )
    end = now()
    ms = {k: 1e3 * v for k, v in phases.wall.items()}
    ds = log.take()
    allgather = ds.get("optimizer_allgather", 0.0)
    loss_reduce = 1e3 * (end[0] - start[0]) - sum(ms.values())  # the step loss's all-reduce
    row = {
        "data": ms["data"],
        "forward": ms["forward"],
        "energy": ms["energy"] + ms.get("energy_bwd", 0.0),
        "energy_fwd": ms["energy"],
        "energy_bwd": ms.get("energy_bwd", 0.0),
        "backward": ds.get("bwd_inner", 0.0),
        "comm": ds.get("bwd_allreduce", 0.0) + allgather + loss_reduce,
        "optimizer": ms["optimizer"] - allgather,
        "step": 1e3 * (end[0] - start[0]),
        "energy_cpu": 1e3 * (phases.cpu["energy"] + phases.cpu.get("energy_bwd", 0.0)),
        "step_cpu": 1e3 * (end[1] - start[1]),
        "ds_timers": ds,
    }
    row["rest"] = row["step"] - sum(row[c] for c in COLUMNS)
    return row


def bench_rank(case: dict) -> dict:
    """Rank body: build the trainer's pieces for ``case`` and time its steps."""
    import torch

    from pdeds import distributed
    from pdeds.config import resolve
    from pdeds.errors import PdedsError
    from pdeds.models.unet import build_model, count_parameters
    from pdeds.optim import needs_engine_step
    from pdeds.train.data import split_global_batch, training_coeffs, training_samples
    from pdeds.train.engine import build_engine, device, init_distributed

    os.environ["OMP_NUM_THREADS"] = str(case["threads"])
    torch.set_num_threads(case["threads"])
    resolved = resolve(case["config"], case["overrides"])
    cfg = resolved.cfg
    rank, world = init_distributed()
    dev = device()
    batch, micro_batch, _ = resolved.view.batch_sizes(world)
    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg.problem.dim, cfg.model).to(dev)
    n_params = count_parameters(model)
    with contextlib.redirect_stdout(sys.stderr):  # ZeRO 3 prints an init timer to stdout
        engine, _ = build_engine(model, cfg, resolved.ds)
    if needs_engine_step(engine):
        raise PdedsError(
            f"optim.name {cfg.optim.name!r} steps through its own line search; "
            "bench_step times the first-order step, use --set optim.name=adam"
        )
    log = DeepSpeedTimerLog(engine.timers)
    stream, data = training_samples(cfg, training_coeffs(cfg), dev)
    if case["data"] == "generate":
        data.cache_bytes = 0  # nu from the coefficients at every call: a fresh stream does that
    engine.train()
    rows = []
    for step in range(case["warmup"] + case["steps"]):
        micro = split_global_batch(stream.indices(step * batch, batch), micro_batch, world, rank)
        distributed.barrier()
        rows.append(timed_step(engine, data, micro, cfg.problem.res, cfg, log))
    return {
        "rank": rank,
        "parameters": n_params,
        "batch": batch,
        "micro_batch": micro_batch,
        "threads": torch.get_num_threads(),
        "steps": rows[case["warmup"] :],
    }


def summarize(per_rank: list[dict]) -> dict:
    """Median over steps of the rank-mean of each phase (``step``: the slowest rank)."""
    steps = list(zip(*(r["steps"] for r in per_rank)))
    keys = [k for k in per_rank[0]["steps"][0] if k not in ("step", "ds_timers")]
    out = {k: statistics.median(statistics.fmean(r[k] for r in s) for s in steps) for k in keys}
    out["step"] = statistics.median(max(r["step"] for r in s) for s in steps)
    names = sorted({n for r in per_rank for s in r["steps"] for n in s["ds_timers"]})
    out["ds_timers"] = {
        n: statistics.median(statistics.fmean(r["ds_timers"].get(n, 0.0) for r in s) for s in steps)
        for n in names
    }
    return out


def run_case(res: int, ranks: int, zero: int, args: argparse.Namespace) -> dict:
    """One (res, ranks, ZeRO) case in fresh processes; its summary row."""
    from pdeds.testing.distributed import run_ranks

    threads = args.threads or max(1, (os.cpu_count() or 1) // ranks)
    case = {
        "config": str(args.config),
        "overrides": case_overrides(res, zero, args),
        "threads": threads,
        "data": args.data,
        "warmup": args.warmup,
        "steps": args.steps,
    }
    load = os.getloadavg()[0]
    t0 = time.perf_counter()
    per_rank = run_ranks(bench_rank, ranks, case, timeout=args.timeout)
    row = {
        "res": res,
        "ranks": ranks,
        "zero": zero,
        "threads_per_rank": per_rank[0]["threads"],
        "parameters": per_rank[0]["parameters"],
        "batch": per_rank[0]["batch"],
        "micro_batch": per_rank[0]["micro_batch"],
        "steps": args.steps,
        "warmup": args.warmup,
        "data_mode": args.data,
        "load_before": load,
        "load_after": os.getloadavg()[0],
        "case_wall_s": time.perf_counter() - t0,
        **summarize(per_rank),
    }
    row["samples_per_s"] = row["batch"] / (row["step"] / 1e3)
    row["energy_share"] = row["energy"] / row["step"]
    row["energy_share_cpu"] = row["energy_cpu"] / row["step_cpu"]
    return row


def format_table(rows: list[dict]) -> str:
    """Markdown table of the summary rows."""
    head = (
        "| res | ranks | zero | thr/rank | samples/s | step ms | "
        + " | ".join(f"{c} ms" for c in COLUMNS)
        + " | energy % | energy % cpu | load |"
    )
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        cells = [f"{r['res']}^3", str(r["ranks"]), str(r["zero"]), str(r["threads_per_rank"])]
        cells += [f"{r['samples_per_s']:.2f}", f"{r['step']:.0f}"]
        cells += [f"{r[c]:.1f}" for c in COLUMNS]
        cells.append(f"{100 * r['energy_share']:.1f}")
        cells.append(f"{100 * r['energy_share_cpu']:.1f}")
        cells.append(f"{r['load_before']:.1f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def verdict(rows: list[dict]) -> str:
    """Whether the energy stays within the issue's share of a step (wall time), per row."""
    worst = max(rows, key=lambda r: r["energy_share"])
    held = sum(r["energy_share"] <= TARGET_ENERGY_SHARE for r in rows)
    status = "met" if held == len(rows) else "MISSED"
    return (
        f"target energy <= {100 * TARGET_ENERGY_SHARE:.0f}% of a step {status}: it holds in "
        f"{held}/{len(rows)} cases; largest share {100 * worst['energy_share']:.1f}% at "
        f"{worst['res']}^3, {worst['ranks']} rank(s), ZeRO {worst['zero']}"
    )


def machine() -> str:
    """CPU, core count and library versions of this machine."""
    import deepspeed
    import torch

    return (
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"Python {platform.python_version()}, torch {torch.__version__}, "
        f"deepspeed {deepspeed.__version__}"
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", type=Path, default=QUICKSTART, help="experiment YAML")
    p.add_argument("--res", type=int, nargs="+", default=[32, 64], help="nodes per axis")
    p.add_argument("--ranks", type=int, nargs="+", default=[1, 2], help="gloo ranks")
    p.add_argument("--zero", type=int, nargs="+", default=[0, 2, 3], help="ZeRO stages")
    p.add_argument("--steps", type=int, default=10, help="timed steps per case")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps before them")
    p.add_argument("--width", type=int, default=None, help="U-Net width (default: config's)")
    p.add_argument("--depth", type=int, default=None, help="U-Net depth (default: config's)")
    p.add_argument("--batch", type=int, default=4, help="global batch (train_batch_size)")
    p.add_argument("--micro-batch", type=int, default=2, help="micro-batch per rank")
    p.add_argument(
        "--threads", type=int, default=0, help="torch threads per rank (0: cores // ranks)"
    )
    p.add_argument("--data", choices=("cached", "generate"), default="cached", help="nu source")
    p.add_argument("--set", action="append", default=[], help="extra --set override (repeat)")
    p.add_argument("--timeout", type=float, default=1800.0, help="seconds per case")
    p.add_argument("--json", type=Path, default=None, help="write the rows here")
    args = p.parse_args(argv)
    if args.steps < 1 or args.warmup < 0:
        p.error("--steps must be >= 1 and --warmup >= 0")
    return args


def fill_model_defaults(args: argparse.Namespace) -> None:
    """--width / --depth default to the experiment's model section."""
    from pdeds.config import resolve

    model = resolve(args.config).cfg.model
    args.width = model.width if args.width is None else args.width
    args.depth = model.depth if args.depth is None else args.depth


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    args = parse_args(argv)
    fill_model_defaults(args)
    rows = []
    for res in args.res:
        for ranks in args.ranks:
            for zero in args.zero:
                row = run_case(res, ranks, zero, args)
                print(
                    f"  {res}^3 ranks {ranks} ZeRO {zero}: {row['step']:.0f} ms/step, "
                    f"{row['samples_per_s']:.2f} samples/s (load {row['load_before']:.2f})",
                    file=sys.stderr,
                    flush=True,
                )
                rows.append(row)
    info = (
        f"{machine()}; model width {args.width} depth {args.depth} "
        f"({rows[0]['parameters']:,} parameters); global batch {args.batch}, micro-batch "
        f"{args.micro_batch}; median of {args.steps} steps after {args.warmup} warm-up; "
        f"data {args.data}; 1-min load {min(r['load_before'] for r in rows):.2f}.."
        f"{max(r['load_after'] for r in rows):.2f}"
    )
    print(format_table(rows))
    print()
    print(info)
    print(verdict(rows))
    if args.json:
        args.json.write_text(json.dumps({"machine": info, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
