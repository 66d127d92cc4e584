"""Numbers derived from run data: throughput, time to target, the CSV row, parallel efficiency.

Per run (all medians over the logged steps at the run's finest resolution, the first logged
step left out when there are others, as it carries start-up costs):

- ``samples_per_s`` = global batch / step time; ``step_time_s`` = wall time of one optimizer step.
- ``time_to_target_s`` / ``samples_to_target`` / ``evaluated_to_target``: training time
  (``train_s``, evaluation excluded), samples drawn and sample forward/backward passes
  (``samples_evaluated``: L-BFGS line searches count) at the first evaluation with held-out
  mean rel-L2 <= target (METHOD.md sec. 5).

Parallel efficiency within a scaling group (same study, ZeRO stage, offload, resolution,
optimizer, cycle; strong: same global batch; weak: same micro-batch), relative to the group's
smallest rank count N0 with step time T0:

    strong (fixed global batch):   E(N) = N0 T0 / (N T_N)
    weak (fixed per-rank batch):   E(N) = T0 / T_N

The kind comes from the study manifest (``study.json`` beside the run dirs, written by
``pdeds study``), else from "strong"/"weak" in the run's path, else from the data: a constant
global batch across rank counts is strong, a global batch proportional to ranks is weak.
"""

from __future__ import annotations

import math
import statistics
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pdeds.report.rundirs import RunData


TB_EVENT_TOLERANCE = 1e-5
"""TensorBoard stores float32: a metrics.jsonl value and its event agree to this relative error."""


def is_number(v: Any) -> bool:
    """A finite int or float (not a bool)."""
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _median(values: list[Any]) -> float | None:
    values = [v for v in values if is_number(v)]
    return statistics.median(values) if values else None


def throughput(steps: list[dict[str, Any]]) -> tuple[float | None, float | None]:
    """(samples/s, step time) medians over the logged steps at the finest resolution."""
    if not steps:
        return None, None
    finest = max(r.get("res") or 0 for r in steps)
    rows = [r for r in steps if (r.get("res") or 0) == finest]
    if len(rows) > 1:
        rows = rows[1:]
    times = [r.get("time_step_s") for r in rows]
    if not any(is_number(t) for t in times):
        times = [
            r["batch"] / r["samples_per_s"]
            for r in rows
            if is_number(r.get("batch"))
            and is_number(r.get("samples_per_s"))
            and r["samples_per_s"] > 0
        ]
    return _median([r.get("samples_per_s") for r in rows]), _median(times)


def to_target(run: RunData, target: float | None) -> dict[str, Any]:
    """Training seconds, samples drawn and samples evaluated (forward/backward passes, with
    L-BFGS line-search evaluations) at the first evaluation with val rel-L2 <= target."""
    keys = ("train_s", "samples", "samples_evaluated")
    if target is None:
        return dict.fromkeys(keys)
    by_step = {r["step"]: r for r in run.steps}
    for e in run.evals:
        if e["val_rel_l2_mean"] <= target:
            s = by_step.get(e["step"], {})
            return {k: e.get(k, s.get(k)) for k in keys}
    return dict.fromkeys(keys)


def tb_agrees(steps: list[dict[str, Any]], tb: dict[str, list[tuple[int, float]]]) -> bool | None:
    """True when TensorBoard's loss series equals metrics.jsonl's (None: nothing to compare)."""
    if not steps or not tb:
        return None
    logged = dict(tb.get("loss", []))
    for r in steps:
        v = logged.get(r["step"])
        if v is None or abs(v - r["loss"]) > TB_EVENT_TOLERANCE * max(1.0, abs(r["loss"])):
            return False
    return True


def _get(tree: dict[str, Any], *keys: str) -> Any:
    for k in keys:
        if not isinstance(tree, dict):
            return None
        tree = tree.get(k)
    return tree


def offload_of(ds: dict[str, Any]) -> str | None:
    """none | optimizer | param from a DeepSpeed config (None without one)."""
    if not ds:
        return None
    zero = ds.get("zero_optimization") or {}
    on = [
        k
        for k in ("offload_param", "offload_optimizer")
        if str((zero.get(k) or {}).get("device", "none")) != "none"
    ]
    return "param" if "offload_param" in on else "optimizer" if on else "none"


def _ranks(run: RunData) -> int | None:
    if run.summary.get("world_size"):
        return int(run.summary["world_size"])
    if run.study.get("ranks"):
        return int(run.study["ranks"])
    g, m, a = (
        run.ds.get(k)
        for k in (
            "train_batch_size",
            "train_micro_batch_size_per_gpu",
            "gradient_accumulation_steps",
        )
    )
    ok = all(isinstance(v, int) and v > 0 for v in (g, m, a))
    return g // (m * a) if ok else None


def _kind_from_path(path: Path) -> str:
    text = str(path).lower()
    return "strong" if "strong" in text else "weak" if "weak" in text else ""


def _planned_mb(run: RunData) -> float | None:
    """Rank 0's planned peak (MiB) from the study manifest (``pdeds.study.memory``), if any."""
    planned = (run.study.get("memory") or {}).get("rank0_bytes")
    return planned / 2**20 if is_number(planned) and planned > 0 else None


def summarise(run: RunData, target: float | None) -> dict[str, Any]:
    """The CSV row of one run (empty strings where the data is absent)."""
    sps, step_t = throughput(run.steps)
    target = target if target is not None else run.study.get("target")
    at = to_target(run, target)
    first = run.steps[0] if run.steps else {}
    last_step = run.steps[-1] if run.steps else {}
    final = run.evals[-1]["val_rel_l2_mean"] if run.evals else run.summary.get("val_rel_l2_mean")
    peak = run.summary.get("peak_memory_mb")
    if peak is None and run.steps:
        peak = max((r.get("peak_memory_mb") or 0.0) for r in run.steps) or None
    row = {
        "run": run.name,
        "path": str(run.path),
        "study": run.study.get("study", ""),
        "kind": run.study.get("kind") or _kind_from_path(run.path),
        "ranks": _ranks(run),
        "nodes": run.study.get("nodes"),
        "zero": _get(run.ds, "zero_optimization", "stage"),
        "offload": offload_of(run.ds),
        "res": _get(run.config, "problem", "res")
        or (max(r.get("res") or 0 for r in run.steps) if run.steps else None),
        "global_batch": run.ds.get("train_batch_size", first.get("batch")),
        "micro_batch": run.ds.get("train_micro_batch_size_per_gpu", first.get("micro_batch")),
        "accumulation": run.ds.get("gradient_accumulation_steps"),
        "optimizer": _get(run.config, "optim", "name"),
        "cycle": _get(run.config, "schedule", "cycle"),
        "samples_per_s": sps,
        "step_time_s": step_t,
        "peak_memory_mb": peak,
        "planned_memory_mb": _planned_mb(run),
        "final_val_rel_l2": final,
        "steps": run.summary.get("steps", last_step.get("step")),
        "train_s": run.summary.get("train_time_s", last_step.get("train_s")),
        "samples": run.summary.get("samples_seen", last_step.get("samples")),
        "samples_evaluated": last_step.get("samples_evaluated"),
        "target": target,
        "time_to_target_s": at["train_s"],
        "samples_to_target": at["samples"],
        "evaluated_to_target": at["samples_evaluated"],
        "scaling_group": "",
        "efficiency": None,
        "completed": run.summary.get("completed"),
        "tb_scalars": len(run.tb) if run.tb else None,
        "tb_agrees": None if run.from_tb else tb_agrees(run.steps, run.tb),
        "missing": "; ".join(run.missing),
    }
    run.row = row
    return row


def _group_key(row: dict[str, Any]) -> tuple:
    parent = str(Path(row["path"]).parent)
    return (
        row["study"] or parent,
        row["zero"],
        row["offload"],
        row["res"],
        row["optimizer"],
        row["cycle"],
    )


def _infer_kind(rows: list[dict[str, Any]]) -> str:
    """strong if the global batch is the same for every rank count, weak if it is proportional."""
    if any(r["global_batch"] is None for r in rows):
        return ""
    if len({r["global_batch"] for r in rows}) == 1:
        return "strong"
    if len({r["global_batch"] / r["ranks"] for r in rows}) == 1:
        return "weak"
    return ""


def efficiency(rows: list[dict[str, Any]]) -> None:
    """Fill ``kind``, ``scaling_group`` and ``efficiency`` of scaling runs (see module doc)."""
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for r in rows:
        if r["ranks"] and r["step_time_s"] and r["kind"] != "comparison":
            groups.setdefault(_group_key(r), []).append(r)
    for key, members in groups.items():
        kinds = {r["kind"] for r in members} - {""}
        kind = kinds.pop() if len(kinds) == 1 else _infer_kind(members)
        if kind not in ("strong", "weak"):
            continue
        sub: dict[Any, list[dict[str, Any]]] = {}
        for r in members:
            batch = r["global_batch"] if kind == "strong" else (r["micro_batch"], r["accumulation"])
            sub.setdefault(batch, []).append(r)
        for batch, series in sub.items():
            if len({r["ranks"] for r in series}) < 2:
                continue
            base = min(series, key=lambda r: r["ranks"])
            n0, t0 = base["ranks"], base["step_time_s"]
            size = f"G {batch}" if kind == "strong" else f"m {batch[0]} x a {batch[1]}"
            label = f"{key[0]} z{key[1]} {key[2]} res{key[3]} {key[4]} {key[5]} {size}"
            for r in series:
                n, t = r["ranks"], r["step_time_s"]
                r["kind"] = r["kind"] or kind
                r["scaling_group"] = label
                r["efficiency"] = n0 * t0 / (n * t) if kind == "strong" else t0 / t
