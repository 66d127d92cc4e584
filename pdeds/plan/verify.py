"""``check``: the plan against real training steps. Runs ``deepspeed.initialize`` +
``engine_step`` of a config at small resolutions (one rank, single-level schedule), each run in a
fresh subprocess, and compares the measured peak with the planned M(n, b):
rel_error = (predicted - measured) / measured.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from pdeds.plan.fit import Calibration
from pdeds.plan.hardware import Hardware
from pdeds.plan.measure import measure_peak, run_subprocess
from pdeds.plan.planner import make_plan


def measure_steps(job: dict[str, Any]) -> list[dict[str, Any]]:
    """In a fresh process, for each override list of ``job['runs']``: build the config's engine
    and run ``job['steps']`` optimizer steps. Each peak covers that run's model states,
    DeepSpeed's buffers and steps (everything allocated from the model's construction on)."""
    import numpy as np
    import torch

    from pdeds.config import batch_sizes, resolve
    from pdeds.models.unet import build_model
    from pdeds.optim import engine_step
    from pdeds.physics import fem
    from pdeds.train.data import TrainingSet
    from pdeds.train.engine import build_engine, device, init_distributed

    init_distributed()
    dev = device()
    results = []
    for over in job["runs"]:
        res = resolve(job["config"], list(over))
        cfg = res.cfg
        n = cfg.problem.res
        _, mb, acc = batch_sizes(res.ds, 1)
        coeffs = np.random.default_rng(0).uniform(-3, 3, size=(mb * acc, cfg.problem.modes))
        data = TrainingSet(coeffs, cfg.problem.dim, cfg.problem.eta, cfg.problem.family, dev)
        micro = [np.arange(i * mb, (i + 1) * mb) for i in range(acc)]

        def run(cfg: Any = cfg, res: Any = res, data: Any = data, micro: Any = micro) -> None:
            torch.manual_seed(cfg.train.seed)
            model = build_model(cfg.problem.dim, cfg.model).to(dev)
            engine, _ = build_engine(model, cfg, res.ds)

            def loss_fn(idx: np.ndarray) -> torch.Tensor:
                nu = data.nu(idx, cfg.problem.res)
                return fem.energy(engine(nu).float(), nu, cfg.problem.f).mean()

            for _ in range(int(job["steps"])):
                engine_step(engine, micro, loss_fn)
            engine.destroy()

        results.append({"res": n, "micro_batch": mb, "peak_bytes": measure_peak(run, dev)})
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    return results


def check(
    config: str | Path | dict[str, Any],
    overrides: list[str] | tuple[str, ...],
    runs: list[int | tuple[int, list[str]]],
    calibration: Calibration,
    *,
    steps: int = 2,
    timeout: float = 900.0,
) -> list[dict[str, Any]]:
    """Planner vs. measured peak: real training steps of the config (one rank, single-level
    schedule), one run per entry of ``runs`` (a resolution, or (resolution, extra overrides)),
    each in a fresh subprocess (a second DeepSpeed engine in one process measures differently);
    on CPU several at a time.

    Returns rows {res, micro_batch, overrides, predicted_bytes, measured_bytes, rel_error},
    rel_error = (predicted - measured) / measured.
    """
    import torch

    from pdeds.config import resolve

    if isinstance(config, (str, Path)):
        config = str(Path(config).resolve())
    jobs, rows = [], []
    for run in runs:
        n, extra = (run, []) if isinstance(run, int) else (run[0], list(run[1]))
        over = (
            list(overrides)
            + extra
            + [
                f"problem.res={n}",
                "schedule.cycle=single",
                "schedule.level=[]",
                "schedule.resolutions=null",
                "schedule.custom=null",
            ]
        )
        lv = make_plan(resolve(config, over), Hardware(), calibration).levels[-1]
        jobs.append(over)
        rows.append(
            {
                "res": n,
                "micro_batch": lv.micro_batch,
                "overrides": extra,
                "predicted_bytes": int(lv.device_total),
            }
        )

    def measure(over: list[str]) -> dict[str, Any]:
        job = {"config": config, "runs": [over], "steps": steps}
        return run_subprocess("measure-steps", job, timeout)[0]

    # CPU runs are independent processes; runs sharing one GPU would share its memory
    workers = 1 if torch.cuda.is_available() else min(len(jobs), os.cpu_count() or 1)
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        measured = list(pool.map(measure, jobs))
    for row, m in zip(rows, measured, strict=True):
        row["measured_bytes"] = int(m["peak_bytes"])
        row["rel_error"] = (row["predicted_bytes"] - m["peak_bytes"]) / m["peak_bytes"]
    return rows
