"""``check_steps``: the plan against real DeepSpeed training steps (``pdeds plan --check``).

Each run builds the config's engine (``deepspeed.initialize`` through the trainer's
``build_engine``) and takes the trainer's optimizer steps (``pdeds.train.step.train_step``, with
``train.loss_weighting``) at one small resolution on one rank, in a fresh
``python -m pdeds.plan.verify`` process that reads the job as JSON on stdin and prints its
result as the last stdout line (a second engine in one process measures differently); its peak
covers model states, DeepSpeed's buffers and the steps. It is compared with the planned M(n, b):
rel_error = (planned - measured) / measured.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pdeds.errors import PdedsError

SINGLE_LEVEL = [
    "schedule.cycle=single",
    "schedule.level=[]",
    "schedule.resolutions=null",
    "schedule.custom=null",
]


def measure_steps(job: dict[str, Any]) -> dict[str, Any]:
    """In this (fresh) process: ``job['steps']`` optimizer steps of ``job['config']`` with
    ``job['overrides']``; the peak from the model's construction on."""
    import numpy as np
    import torch

    from pdeds.config import resolve
    from pdeds.models import build_model
    from pdeds.plan.measure import measure_peak
    from pdeds.train.data import TrainingSet
    from pdeds.train.engine import build_engine, device, init_distributed
    from pdeds.train.step import train_step

    init_distributed()
    dev = device()
    res = resolve(job["config"], job["overrides"])
    cfg, p = res.cfg, res.cfg.problem
    _, mb, acc = res.view.batch_sizes(1)
    coeffs = np.random.default_rng(0).uniform(-3, 3, size=(mb * acc, p.modes))
    data = TrainingSet(coeffs, p.dim, p.eta, p.family, dev)
    micro = [np.arange(i * mb, (i + 1) * mb) for i in range(acc)]

    def run() -> None:
        torch.manual_seed(cfg.train.seed)
        engine, _ = build_engine(build_model(p.dim, cfg.model).to(dev), cfg, res.ds)
        for _ in range(int(job["steps"])):
            train_step(engine, data, micro, res=p.res, f=p.f, weighting=cfg.train.loss_weighting)
        engine.destroy()

    return {"res": p.res, "micro_batch": mb, "peak_bytes": measure_peak(run, dev)}


def check_steps(
    config: str | Path | dict[str, Any],
    overrides: list[str] | tuple[str, ...],
    runs: list[int | tuple[int, list[str]]],
    *,
    steps: int = 2,
    timeout: float = 600.0,
    say: Callable[[str], None] = lambda line: None,
) -> list[dict[str, Any]]:
    """Planned vs measured peak of real training steps (one rank, single-level schedule), one
    run per entry of ``runs`` (a resolution, or (resolution, extra overrides)), one at a time.

    Returns rows {res, micro_batch, overrides, predicted_bytes, measured_bytes, rel_error}.
    """
    from pdeds.config import resolve
    from pdeds.plan.planner import Hardware, make_plan

    if isinstance(config, (str, Path)):
        config = str(Path(config).resolve())
    rows = []
    for run in runs:
        n, extra = (run, []) if isinstance(run, int) else (run[0], list(run[1]))
        over = [*overrides, *extra, f"problem.res={n}", *SINGLE_LEVEL]
        level = make_plan(resolve(config, over), Hardware()).levels[-1]
        say(f"measuring {steps} DeepSpeed training steps at n = {n} {' '.join(extra)}".rstrip())
        job = {"config": config, "overrides": over, "steps": steps}
        measured = run_subprocess(job, timeout)["peak_bytes"]
        rows.append(
            {
                "res": n,
                "micro_batch": level.micro_batch,
                "overrides": extra,
                "predicted_bytes": int(level.device_total),
                "measured_bytes": int(measured),
                "rel_error": (level.device_total - measured) / measured,
            }
        )
    return rows


def run_subprocess(job: dict[str, Any], timeout: float) -> Any:
    """``python -m pdeds.plan.verify`` with ``job`` on stdin; returns its JSON result."""
    rendezvous = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
    env = {k: v for k, v in os.environ.items() if k not in rendezvous}
    try:
        done = subprocess.run(
            [sys.executable, "-m", "pdeds.plan.verify"],
            input=json.dumps(job),
            capture_output=True,
            text=True,
            timeout=timeout,
            env=env,
        )
    except subprocess.TimeoutExpired:
        raise PdedsError(
            f"plan --check: the training steps ran past {timeout:.0f} s; "
            "pass smaller --check resolutions"
        ) from None
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines:
        tail = " | ".join((done.stderr or done.stdout).strip().splitlines()[-3:])
        raise PdedsError(f"plan --check: the training steps failed ({tail}); run it again")
    return json.loads(lines[-1])


if __name__ == "__main__":
    if not __import__("torch").cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    sys.stdout.write("\n" + json.dumps(measure_steps(json.loads(sys.stdin.read()))) + "\n")
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # skip interpreter teardown of DeepSpeed / process-group state
