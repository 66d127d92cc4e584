"""One-GPU check of the 512^3 path: bf16 training steps at 64^3 / 128^3 / 256^3, ZeRO 2 vs 3,
one 512^3 step with activation checkpointing, each next to what ``pdeds plan`` predicts.

    launch/gpu_check [--out DIR] [--budget-s 420] [--config launch/configs/poisson3d_512.yaml]
    launch/gpu_check --dry-run --out /tmp/gc     # the same code on CPU at tiny sizes (no GPU)

Per row: samples/s, step time split into data (nu fields) / forward / energy / backward /
optimizer step (device-synchronised), the peak memory (torch.cuda.max_memory_allocated from
before the engine is built, so model states, DeepSpeed's buffers and the steps), the planner's
prediction for the same run (its symbolic execution of the step), and the achieved
TFLOP/s of the convolutions: their FLOPs counted by torch's FlopCounterMode on meta tensors of
the same shapes (forward, backward, and the checkpoint recomputation) over forward + backward
time. Writes DIR/gpu_check.json and DIR/gpu_check.md after every row (DIR: --out, else $OUT,
else ./gpu_check_out).

Degrades: every row runs in its own try block; an out-of-memory error records "OOM" and the
check goes on; a row that would start with less than its minimum time left in --budget-s is
recorded as skipped; the bash wrapper kills the whole run at a hard cap. Without DeepSpeed
(a bare GPU image) the rows run on a plain torch stand-in (bf16 weights, torch Adam) and the
ZeRO 3 row is skipped; ``launch/gpu_check``'s header says how to carry DeepSpeed as wheels.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from pdeds import plan  # noqa: E402
from pdeds.config import resolve  # noqa: E402
from pdeds.errors import PdedsError  # noqa: E402


@dataclass(frozen=True)
class Row:
    """One measurement: a training run of ``steps`` timed steps after ``warmup`` ones."""

    name: str
    res: int
    micro_batch: int
    zero: int = 2
    checkpoint: bool = False
    warmup: int = 2
    steps: int = 5
    budget_s: float = 40.0
    """Timed steps stop once they took this long (at least one runs)."""
    min_s: float = 10.0
    """Skip the row if less than this is left of the whole check's budget."""


FULL = {
    "rows": [
        Row("bf16 step", 64, 8),
        Row("bf16 step", 128, 4),
        Row("bf16 step ZeRO 3", 128, 4, zero=3),
        Row("bf16 step", 256, 2, min_s=30.0),
        Row("512^3 checkpointed", 512, 1, checkpoint=True, warmup=1, steps=1, min_s=60.0),
    ],
    "overrides": [],
}
SMOKE = {
    "rows": [
        Row("bf16 step", 16, 2, warmup=1, steps=1),
        Row("bf16 step", 24, 2, warmup=1, steps=1),
        Row("bf16 step ZeRO 3", 16, 2, zero=3, warmup=1, steps=1),
        Row("512^3 checkpointed (smoke: 32^3)", 32, 1, checkpoint=True, warmup=0, steps=1),
    ],
    "overrides": ["model.width=4", "model.depth=2", "model.groups=2"],
}


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="launch/gpu_check", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=None, help="output folder (default $OUT or ./gpu_check_out)")
    p.add_argument("--budget-s", type=float, default=420.0, help="wall-time budget (s)")
    p.add_argument(
        "--config",
        default=str(ROOT / "launch/configs/poisson3d_512.yaml"),
        help="experiment whose model / problem / optimizer the rows use",
    )
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument(
        "--dry-run",
        "--cpu-smoke",
        dest="dry_run",
        action="store_true",
        help="run on CPU at tiny sizes with a tiny model (tests the script, measures nothing)",
    )
    return p.parse_args(argv)


class Clock:
    """The check's wall-time budget."""

    def __init__(self, budget_s: float) -> None:
        self.start = time.perf_counter()
        self.budget_s = budget_s

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def left(self) -> float:
        return self.budget_s - self.elapsed()


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def is_oom(err: BaseException) -> bool:
    return isinstance(err, torch.cuda.OutOfMemoryError) or "out of memory" in str(err).lower()


def free(dev: torch.device) -> None:
    gc.collect()
    if dev.type == "cuda":
        torch.cuda.empty_cache()


def has_deepspeed() -> bool:
    try:
        import deepspeed  # noqa: F401
    except Exception:
        return False
    return True


class TorchEngine:
    """Stand-in for DeepSpeed's engine without DeepSpeed: bf16 weights, torch Adam on them."""

    def __init__(self, model: torch.nn.Module, lr: float) -> None:
        self.module = model.to(torch.bfloat16)
        self.optimizer = torch.optim.Adam(self.module.parameters(), lr=lr)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.module(x)

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def step(self) -> None:
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=False)


def row_overrides(row: Row) -> list[str]:
    """The experiment changes of a row: one level at row.res, bf16, one rank's batch."""
    return [
        f"problem.res={row.res}",
        "schedule.cycle=single",
        "schedule.level=[]",
        "schedule.resolutions=null",
        "schedule.custom=null",
        f"model.checkpoint={'true' if row.checkpoint else 'false'}",
        "ds.bf16.enabled=true",
        f"ds.zero_optimization.stage={row.zero}",
        f"ds.train_batch_size={row.micro_batch}",
        f"ds.train_micro_batch_size_per_gpu={row.micro_batch}",
        "ds.gradient_accumulation_steps=1",
    ]


def conv_flops(dim: int, model_cfg: Any, res: int, batch: int) -> float:
    """FLOPs of every convolution in one forward + backward (+ recomputation), on meta tensors."""
    from torch.utils.flop_counter import FlopCounterMode

    from pdeds.models.unet import UNet

    with torch.device("meta"):
        net = UNet(dim, model_cfg).to(torch.bfloat16)
        nu = torch.ones((batch, 1) + (res,) * dim)
    with FlopCounterMode(display=False) as counter:
        net(nu).float().sum().backward()
    return float(
        sum(v for op, v in counter.get_flop_counts()["Global"].items() if "convolution" in str(op))
    )


def timed_step(engine: Any, data: Any, idx: np.ndarray, cfg: Any, dev: torch.device):
    """One training step (the trainer's, ``pdeds.train.step.train_step``) on one micro-batch;
    returns the device-synchronised seconds of data / forward / energy / backward / optimizer
    and the loss."""
    from pdeds.train.step import MarkedEngine, Phases, train_step

    phases = Phases(sync=lambda: sync(dev))
    p, weighting = cfg.problem, cfg.train.loss_weighting
    marked = MarkedEngine(engine, phases)
    loss = train_step(marked, data, [idx], res=p.res, f=p.f, weighting=weighting, phases=phases)
    return dict(phases.wall), loss


def row_head(row: Row, engine: str) -> dict[str, Any]:
    """The columns that name a row."""
    return {
        "name": row.name,
        "res": row.res,
        "micro_batch": row.micro_batch,
        "zero_stage": row.zero,
        "checkpoint": row.checkpoint,
        "engine": engine,
    }


def run_row(row: Row, ctx: dict[str, Any], clock: Clock) -> dict[str, Any]:
    """Measure one row; never raises (errors are recorded)."""
    out = row_head(row, "deepspeed" if ctx["deepspeed"] else "torch")
    if clock.left() < row.min_s:
        out["status"] = f"skipped: {clock.left():.0f} s of the budget left, needs {row.min_s:.0f}"
        return out
    if row.zero == 3 and not ctx["deepspeed"]:
        out["status"] = "skipped: deepspeed not importable"
        return out
    dev = ctx["device"]
    try:
        out.update(_measure(row, ctx, clock, out))
        out["status"] = "ok"
    except Exception as err:
        out["status"] = "OOM" if is_oom(err) else f"error: {type(err).__name__}: {err}"[:300]
        if not is_oom(err):
            out["traceback"] = traceback.format_exc()[-2000:]
    finally:
        free(dev)
    return out


def _measure(row: Row, ctx: dict[str, Any], clock: Clock, out: dict[str, Any]) -> dict[str, Any]:
    from pdeds.models.unet import build_model
    from pdeds.physics.kl import sample_coefficients
    from pdeds.train.data import TrainingSet

    dev = ctx["device"]
    over = ctx["overrides"] + row_overrides(row)
    resolved = resolve(ctx["config"], over)
    cfg = resolved.cfg
    offload = _offload_if_planned(resolved, ctx)
    if offload:
        resolved = resolve(ctx["config"], over + offload)
        out["offload"] = offload
    dim, mb = cfg.problem.dim, row.micro_batch
    coeffs = sample_coefficients(mb, cfg.problem.modes, 0)
    data = TrainingSet(coeffs, dim, cfg.problem.eta, cfg.problem.family, dev)
    idx = np.arange(mb)
    times: list[dict[str, float]] = []
    result: dict[str, Any] = {}

    def body() -> None:
        torch.manual_seed(0)
        model = build_model(dim, cfg.model).to(dev)
        if ctx["deepspeed"]:
            from pdeds.train.engine import build_engine

            engine, _ = build_engine(model, cfg, resolved.ds)
        else:
            engine = TorchEngine(model, cfg.optim.lr)
        try:
            for _ in range(row.warmup):
                timed_step(engine, data, idx, cfg, dev)
            t0 = time.perf_counter()
            while len(times) < row.steps:
                parts, loss = timed_step(engine, data, idx, cfg, dev)
                times.append(parts)
                result["loss"] = loss
                if time.perf_counter() - t0 > row.budget_s or clock.left() < 5:
                    break
        finally:
            getattr(engine, "destroy", lambda: None)()  # DeepSpeed < 0.15 has none

    peak = plan.measure_peak(body, dev)
    mean = {k: float(np.mean([t[k] for t in times])) for k in times[0]}
    step_s = sum(mean.values())
    flops = conv_flops(dim, cfg.model, row.res, mb)
    predicted = _predicted(resolved, ctx, row)
    result.update(
        {
            "timed_steps": len(times),
            "step_s": step_s,
            "samples_per_s": mb / step_s,
            **{f"{k}_s": v for k, v in mean.items()},
            "conv_gflop": flops / 1e9,
            "conv_tflops": flops / (mean["forward"] + mean["backward"]) / 1e12,
            "peak_bytes": int(peak),
            "planned_bytes": int(predicted),
            "plan_error": (predicted - peak) / peak if peak > 0 else None,
        }
    )
    return result


def _predicted(resolved: Any, ctx: dict[str, Any], row: Row) -> float:
    """The planner's M(n, b) for this row on one rank. For the torch stand-in: bf16 weights,
    gradients and Adam moments (8 B per parameter) and no DeepSpeed bucket."""
    hw = plan.Hardware(gpu_mem_gib=ctx["mem_gib"])
    p = plan.make_plan(resolved, hw)
    if ctx["deepspeed"]:
        return p.levels[-1].device_total
    return 8.0 * p.parameters + p.levels[-1].activations


def _offload_if_planned(resolved: Any, ctx: dict[str, Any]) -> list[str]:
    """ZeRO offload overrides when the plan for this device asks for them (else none)."""
    hw = plan.Hardware(gpu_mem_gib=ctx["mem_gib"])
    p = plan.make_plan(resolved, hw)
    over = []
    for rec in p.recommendations:
        for key in ("offload_optimizer", "offload_param"):
            if key in rec:
                over.append(f"ds.zero_optimization.{key}.device=cpu")
    return over


def environment(dev: torch.device, with_ds: bool) -> dict[str, Any]:
    env: dict[str, Any] = {"torch": torch.__version__, "device": str(dev), "python": sys.version}
    if dev.type == "cuda":
        props = torch.cuda.get_device_properties(dev)
        env.update(
            gpu=props.name,
            gpu_mem_gib=props.total_memory / 2**30,
            multiprocessors=props.multi_processor_count,
            cudnn=torch.backends.cudnn.version(),
        )
    if with_ds:
        import deepspeed

        env["deepspeed"] = deepspeed.__version__
    else:
        env["deepspeed"] = None
    return env


def markdown(report: dict[str, Any]) -> str:
    """The rows as a markdown table."""
    env = report["env"]
    head = (
        f"# pdeds GPU check\n\n{env.get('gpu', env['device'])}, torch {env['torch']}, "
        f"deepspeed {env['deepspeed']}; {report['wall_s']:.0f} s of {report['budget_s']:.0f} s"
        f"{' (dry run on CPU: numbers mean nothing)' if report['dry_run'] else ''}\n\n"
    )
    cols = (
        "| case | n | mb | ZeRO | ckpt | status | samples/s | step s | data / fwd / energy / "
        "bwd / opt s | conv TFLOP/s | peak | planned | plan err |\n"
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|\n"
    )
    lines = []
    for r in report["rows"]:
        ok = r.get("status") == "ok"

        def g(key: str, fmt: str, r: dict[str, Any] = r, ok: bool = ok) -> str:
            return format(r[key], fmt) if ok and r.get(key) is not None else "-"

        split = (
            " / ".join(
                f"{r[k + '_s']:.3f}" for k in ("data", "forward", "energy", "backward", "optimizer")
            )
            if ok
            else "-"
        )
        mem = {k: (plan.fmt_bytes(r[k]) if ok else "-") for k in ("peak_bytes", "planned_bytes")}
        lines.append(
            f"| {r['name']} | {r['res']} | {r['micro_batch']} | {r['zero_stage']} | "
            f"{'yes' if r['checkpoint'] else 'no'} | {r['status']} | {g('samples_per_s', '.2f')} | "
            f"{g('step_s', '.3f')} | {split} | {g('conv_tflops', '.3g')} | {mem['peak_bytes']} | "
            f"{mem['planned_bytes']} | {g('plan_error', '+.1%')} |"
        )
    return head + cols + "\n".join(lines) + "\n"


def write(report: dict[str, Any], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for name, text in (
        ("gpu_check.json", json.dumps(report, indent=2, default=str)),
        ("gpu_check.md", markdown(report)),
    ):
        tmp = out / (name + ".tmp")
        tmp.write_text(text)
        tmp.replace(out / name)


def main(argv: list[str]) -> int:
    args = parse(argv)
    clock = Clock(args.budget_s)
    out = Path(args.out or os.environ.get("OUT") or "gpu_check_out")
    sizes = SMOKE if args.dry_run else FULL
    if not args.dry_run and not torch.cuda.is_available():
        print(
            "launch/gpu_check: no CUDA device; use --dry-run for the CPU smoke run", file=sys.stderr
        )
        return 2
    dev = torch.device("cpu" if args.dry_run else "cuda")
    if dev.type == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    with_ds = has_deepspeed()
    report: dict[str, Any] = {
        "dry_run": args.dry_run,
        "budget_s": args.budget_s,
        "config": args.config,
        "env": environment(dev, with_ds),
        "rows": [],
        "wall_s": 0.0,
    }
    overrides = list(sizes["overrides"]) + list(args.overrides)
    try:
        resolve(args.config, overrides)  # a bad config: one line before any row
    except PdedsError as err:
        print(f"launch/gpu_check: {err}", file=sys.stderr)
        return 2
    if with_ds:
        from pdeds.train.engine import init_distributed

        init_distributed()
    ctx = {
        "device": dev,
        "deepspeed": with_ds,
        "config": args.config,
        "overrides": overrides,
        "mem_gib": report["env"].get("gpu_mem_gib", 80.0),
    }
    for row in sizes["rows"]:
        report["rows"].append(run_row(row, ctx, clock))
        report["wall_s"] = clock.elapsed()
        write(report, out)
        print(f"gpu_check: {row.name} n={row.res}: {report['rows'][-1]['status']}", flush=True)
    report["wall_s"] = clock.elapsed()
    write(report, out)
    print(markdown(report))
    return 0


if __name__ == "__main__":
    code = main(sys.argv[1:])
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)  # skip the teardown of DeepSpeed / NCCL state
