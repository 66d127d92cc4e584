"""Collect run directories into ``runs.csv``, ``report.md`` and matplotlib plots.

A run directory (see ``pdeds.train.trainer``) holds ``summary.json``, ``metrics.jsonl``,
``config.yaml``, ``ds_config.json`` and ``tb/``. Each may be missing or unreadable: the run is
then reported with what is there and the missing files named. TensorBoard events are read with
tensorboard's own ``EventAccumulator``; their ``loss`` series is checked against metrics.jsonl
(``tb_agrees``) and replaces metrics.jsonl when that file is missing.

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

import csv
import json
import math
import statistics
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from pdeds.errors import PdedsError

RUN_FILES = ("summary.json", "metrics.jsonl", "config.yaml", "ds_config.json", "tb")
COLUMNS = (
    "run",
    "path",
    "study",
    "kind",
    "ranks",
    "nodes",
    "zero",
    "offload",
    "res",
    "global_batch",
    "micro_batch",
    "accumulation",
    "optimizer",
    "cycle",
    "samples_per_s",
    "step_time_s",
    "peak_memory_mb",
    "final_val_rel_l2",
    "steps",
    "train_s",
    "samples",
    "samples_evaluated",
    "target",
    "time_to_target_s",
    "samples_to_target",
    "evaluated_to_target",
    "scaling_group",
    "efficiency",
    "completed",
    "tb_scalars",
    "tb_agrees",
    "missing",
)
OUTPUTS = ("runs.csv", "report.md")
TB_EVENT_TOLERANCE = 1e-5
"""TensorBoard stores float32: a metrics.jsonl value and its event agree to this relative error."""


@dataclass
class RunData:
    """What one run directory holds (absent parts empty) and the numbers derived from it."""

    path: Path
    name: str
    summary: dict[str, Any] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)
    ds: dict[str, Any] = field(default_factory=dict)
    steps: list[dict[str, Any]] = field(default_factory=list)
    """metrics.jsonl rows with a training loss."""
    evals: list[dict[str, Any]] = field(default_factory=list)
    """metrics.jsonl rows with a held-out error."""
    tb: dict[str, list[tuple[int, float]]] = field(default_factory=dict)
    """TensorBoard scalar tag -> [(step, value)]."""
    study: dict[str, Any] = field(default_factory=dict)
    """The run's entry in the study manifest, with "study", "kind" and "target" added."""
    missing: list[str] = field(default_factory=list)
    from_tb: bool = False
    """The rows were rebuilt from TensorBoard (metrics.jsonl missing)."""
    row: dict[str, Any] = field(default_factory=dict)
    """The CSV row (filled by :func:`summarise`)."""


def _read(path: Path, parse: Any, missing: list[str]) -> dict[str, Any]:
    """The mapping parse(text) of a file, or {} with the file noted as missing / unreadable."""
    if not path.is_file():
        missing.append(path.name)
        return {}
    try:
        data = parse(path.read_text())
    except (ValueError, yaml.YAMLError, UnicodeDecodeError) as err:
        missing.append(f"{path.name} (unreadable: {' '.join(str(err).split())[:60]})")
        return {}
    if not isinstance(data, dict):
        missing.append(f"{path.name} (unreadable: not a mapping)")
        return {}
    return data


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def read_metrics(path: Path, missing: list[str]) -> list[dict[str, Any]] | None:
    """metrics.jsonl rows (None if absent); lines that do not parse (a run killed mid-write)
    are skipped and counted in ``missing``."""
    if not path.is_file():
        missing.append(path.name)
        return None
    rows, bad = [], 0
    for line in path.read_text(errors="replace").splitlines():
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:
            row = None
        if isinstance(row, dict) and _is_number(row.get("step")):
            rows.append(row)
        else:
            bad += 1
    if bad:
        missing.append(f"metrics.jsonl ({bad} unreadable line{'s' * (bad > 1)})")
    return rows


def read_tensorboard(tb_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar series of a TensorBoard log folder (all its event files), by tag."""
    from tensorboard.backend.event_processing import event_accumulator as ea

    acc = ea.EventAccumulator(
        str(tb_dir), size_guidance={ea.SCALARS: 0, ea.IMAGES: 1, ea.TENSORS: 1}
    )
    acc.Reload()
    return {
        tag: [(int(e.step), float(e.value)) for e in acc.Scalars(tag)]
        for tag in acc.Tags().get("scalars", [])
    }


def rows_from_tensorboard(tb: dict[str, list[tuple[int, float]]]) -> list[dict[str, Any]]:
    """metrics.jsonl-like rows rebuilt from TensorBoard scalars (``time/x`` -> ``time_x``)."""
    by_step: dict[int, dict[str, Any]] = {}
    for tag, series in tb.items():
        key = tag.replace("time/", "time_")
        for step, value in series:
            by_step.setdefault(step, {"step": step})[key] = value
    rows = []
    for step in sorted(by_step):
        row = by_step[step]
        if "loss" in row:
            rows.append({k: v for k, v in row.items() if not k.startswith(("val_", "baseline_"))})
        if "val_rel_l2_mean" in row:
            rows.append(row)
    return rows


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


def load_manifests(paths: Iterable[Path]) -> dict[Path, dict[str, Any]]:
    """Run dir -> its study manifest entry, for run dirs listed in a parent's study.json."""
    out: dict[Path, dict[str, Any]] = {}
    for parent in {p.resolve().parent for p in paths}:
        man = parent / "study.json"
        if not man.is_file():
            continue
        try:
            data = json.loads(man.read_text())
        except json.JSONDecodeError:
            continue
        for run in data.get("runs", []):
            entry = {
                **run,
                "study": data.get("study", ""),
                "kind": data.get("kind", ""),
                "target": data.get("target"),
            }
            out[(parent / run.get("run_dir", run["name"])).resolve()] = entry
    return out


def load_run(path: Path, manifest: dict[str, Any] | None = None) -> RunData:
    """Read one run directory; anything absent or unreadable is listed in ``missing``."""
    run = RunData(path=path, name=path.name, study=dict(manifest or {}))
    if not path.is_dir():
        run.missing.append("the run directory")
        return run
    run.summary = _read(path / "summary.json", json.loads, run.missing)
    run.config = _read(path / "config.yaml", yaml.safe_load, run.missing)
    run.ds = _read(path / "ds_config.json", json.loads, run.missing)
    rows = read_metrics(path / "metrics.jsonl", run.missing)
    if (path / "tb").is_dir():
        try:
            run.tb = read_tensorboard(path / "tb")
        except Exception as err:  # a corrupt event file must not stop the report
            run.missing.append(f"tb (unreadable: {type(err).__name__})")
    else:
        run.missing.append("tb")
    run.from_tb = rows is None and bool(run.tb)
    if run.from_tb:
        rows = rows_from_tensorboard(run.tb)
    rows = rows or []
    run.steps = [r for r in rows if _is_number(r.get("loss"))]
    run.evals = [r for r in rows if _is_number(r.get("val_rel_l2_mean"))]
    return run


def _median(values: list[Any]) -> float | None:
    values = [v for v in values if _is_number(v)]
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
    if not any(_is_number(t) for t in times):
        times = [
            r["batch"] / r["samples_per_s"]
            for r in rows
            if _is_number(r.get("batch"))
            and _is_number(r.get("samples_per_s"))
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


def collect(paths: list[Path], target: float | None = None) -> tuple[list[RunData], list[str]]:
    """Read run dirs (a folder with study.json stands for its runs); returns runs and notes."""
    notes: list[str] = []
    run_paths: list[Path] = []
    for p in paths:
        man = p / "study.json"
        if man.is_file() and not (p / "config.yaml").exists():
            try:
                listed = json.loads(man.read_text()).get("runs", [])
            except json.JSONDecodeError:
                notes.append(f"{man}: not valid JSON; skipped")
                continue
            for entry in listed:
                d = p / entry.get("run_dir", entry["name"])
                if d.is_dir():
                    run_paths.append(d)
                else:
                    where = entry.get("script") or "not started"
                    notes.append(f"{d}: not run yet ({where})")
        else:
            run_paths.append(p)
    manifests = load_manifests(run_paths)
    runs = [load_run(p, manifests.get(p.resolve())) for p in run_paths]
    rows = [summarise(r, target) for r in runs]
    efficiency(rows)
    return runs, notes


def write_csv(rows: list[dict[str, Any]], path: Path) -> None:
    with path.open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=COLUMNS)
        w.writeheader()
        for r in rows:
            w.writerow({k: "" if r.get(k) is None else r[k] for k in COLUMNS})


def _fmt(v: Any, digits: int = 4) -> str:
    if v is None or v == "":
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:.{digits}g}"
    return str(v)


MD_COLUMNS = (
    ("run", "run"),
    ("ranks", "ranks"),
    ("zero", "zero"),
    ("offload", "offload"),
    ("res", "res"),
    ("global_batch", "global batch"),
    ("optimizer", "optimizer"),
    ("cycle", "cycle"),
    ("samples_per_s", "samples/s"),
    ("step_time_s", "step time (s)"),
    ("peak_memory_mb", "peak memory (MiB)"),
    ("final_val_rel_l2", "final val rel-L2"),
    ("time_to_target_s", "time to target (s)"),
    ("samples_to_target", "samples to target"),
    ("notes", "notes"),
)


def _notes(r: dict[str, Any]) -> str:
    out = []
    if r["missing"]:
        out.append(f"missing: {r['missing']}")
    if r["completed"] is False:
        out.append(f"incomplete ({_fmt(r['steps'])} steps)")
    if r["tb_agrees"] is False:
        out.append("TensorBoard loss differs from metrics.jsonl")
    if r["target"] is not None and r["time_to_target_s"] is None and r["final_val_rel_l2"]:
        out.append("target not reached")
    return "; ".join(out)


def markdown(
    rows: list[dict[str, Any]], plots: dict[str, str], skipped: list[str], notes: list[str]
) -> str:
    """report.md: the run table, the efficiency table, the plots and what was skipped."""
    targets = sorted({r["target"] for r in rows if r["target"] is not None})
    lines = [
        "# pdeds report",
        "",
        f"{len(rows)} run(s); held-out mean rel-L2 target: "
        f"{', '.join(f'{t:g}' for t in targets) or 'none (pass --target)'}.",
        "",
        "| " + " | ".join(h for _, h in MD_COLUMNS) + " |",
        "|" + "---|" * len(MD_COLUMNS),
    ]
    for r in rows:
        cells = [_notes(r) if k == "notes" else _fmt(r[k]) for k, _ in MD_COLUMNS]
        lines.append("| " + " | ".join(c.replace("|", "/") for c in cells) + " |")
    scaled = [r for r in rows if r["efficiency"] is not None]
    if scaled:
        lines += [
            "",
            "## Parallel efficiency",
            "",
            "strong: E = N0 T0 / (N T_N); weak: E = T0 / T_N (T = step time, N0 the "
            "group's smallest rank count).",
            "",
            "| group | kind | ranks | samples/s | step time (s) | efficiency |",
            "|---|---|---|---|---|---|",
        ]
        for r in sorted(scaled, key=lambda r: (r["scaling_group"], r["ranks"])):
            lines.append(
                f"| {r['scaling_group']} | {r['kind']} | {r['ranks']} | "
                f"{_fmt(r['samples_per_s'])} | {_fmt(r['step_time_s'])} | "
                f"{_fmt(r['efficiency'], 3)} |"
            )
    if plots:
        lines += ["", "## Plots", ""]
        for name, caption in plots.items():
            lines += [f"![{caption}]({name})", ""]
    if skipped or notes:
        lines += ["", "## Not shown", ""]
        lines += [f"- {s}" for s in skipped + notes]
    lines += [
        "",
        "samples/s and step time: medians over the logged steps at the run's finest resolution, "
        "the first left out when there are others. Time to target: training seconds (evaluation "
        "excluded) at the first evaluation with held-out mean rel-L2 <= target.",
        "",
    ]
    return "\n".join(lines)


def _figure(ncols: int = 1) -> tuple[Any, Any]:
    """A matplotlib Figure on the Agg canvas (no pyplot state, no display needed)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5.5 * ncols, 4.2), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, ncols, squeeze=False)[0]
    return fig, axes


def _log_y(ax: Any, values: list[float]) -> None:
    """A log y axis labelled 1, 2, 5 x 10^k in plain numbers when ``values`` span > 10x."""
    from matplotlib.ticker import LogLocator, NullLocator, StrMethodFormatter

    positive = [v for v in values if v and v > 0]
    if not positive or max(positive) <= 10 * min(positive):
        return
    ax.set_yscale("log")
    ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    ax.yaxis.set_major_formatter(StrMethodFormatter("{x:g}"))
    ax.yaxis.set_minor_locator(NullLocator())


def plot_scaling(rows: list[dict[str, Any]], kind: str, path: Path) -> bool:
    """Throughput and parallel efficiency against ranks, one line per scaling group."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        if r["kind"] == kind and r["efficiency"] is not None:
            groups.setdefault(r["scaling_group"], []).append(r)
    if not groups:
        return False
    fig, (ax_x, ax_e) = _figure(2)
    shown: list[float] = []
    for label, series in sorted(groups.items()):
        series = sorted(series, key=lambda r: r["ranks"])
        n = [r["ranks"] for r in series]
        line = ax_x.plot(n, [r["samples_per_s"] for r in series], "o-", label=label)[0]
        n0, x0 = n[0], series[0]["samples_per_s"]
        ideal = [x0 * k / n0 for k in n]
        ax_x.plot(n, ideal, ":", color=line.get_color(), alpha=0.6)
        ax_e.plot(n, [r["efficiency"] for r in series], "o-", color=line.get_color())
        shown += [r["samples_per_s"] for r in series] + ideal
    ax_e.axhline(1.0, color="grey", ls=":", lw=1)
    ticks = sorted({r["ranks"] for g in groups.values() for r in g})
    for ax in (ax_x, ax_e):
        ax.set_xscale("log", base=2)
        ax.set_xticks(ticks, [str(t) for t in ticks])
        ax.minorticks_off()
        ax.set_xlabel("ranks")
        ax.grid(alpha=0.3)
    _log_y(ax_x, shown)
    ax_x.set_ylabel("samples / s  (dotted: ideal)")
    formula = "N0 T0 / (N T_N)" if kind == "strong" else "T0 / T_N"
    ax_e.set_ylabel(f"parallel efficiency  {formula}")
    ax_e.set_ylim(0, max(1.1, max(r["efficiency"] for g in groups.values() for r in g) * 1.1))
    ax_x.set_title(f"{kind} scaling: throughput")
    ax_e.set_title(f"{kind} scaling: efficiency")
    ax_x.legend(fontsize=7)
    fig.savefig(path, dpi=110)
    return True


def plot_time_to_target(rows: list[dict[str, Any]], by: str, path: Path) -> str | None:
    """Bars of time and samples to the target per ``by`` value; None if drawn, else why not.

    Runs of studies (or folders) that vary ``by`` are shown; the others only when no study does.
    """
    cand = [r for r in rows if r[by] is not None and r["target"] is not None and r["evals_n"]]
    if not cand:
        return f"time to target per {by}: no run with a target and held-out evaluations"
    if len({r[by] for r in cand}) < 2:
        return f"time to target per {by}: the runs do not vary the {by}"
    studies: dict[str, list[dict[str, Any]]] = {}
    for r in cand:
        studies.setdefault(r["study"] or str(Path(r["path"]).parent), []).append(r)
    varied = [r for rs in studies.values() if len({x[by] for x in rs}) > 1 for r in rs]
    cand = varied or cand  # the studies that compare this axis, when they can be told apart
    if not any(r["time_to_target_s"] is not None for r in cand):
        return f"time to target per {by}: no run reached its target"
    cand = sorted(cand, key=lambda r: (str(r[by]), r["run"]))
    fig, (ax_t, ax_n) = _figure(2)
    labels = [
        str(r[by]) if sum(c[by] == r[by] for c in cand) == 1 else f"{r[by]}\n{r['run']}"
        for r in cand
    ]
    x = range(len(cand))
    values = sorted({str(r[by]) for r in cand})
    colors = [f"C{values.index(str(r[by])) % 10}" for r in cand]
    for ax, key, fallback, unit in (
        (ax_t, "time_to_target_s", "train_s", "training time to target (s)"),
        (ax_n, "samples_to_target", "samples", "samples to target"),
    ):
        for i, r in zip(x, cand):
            if r[key] is not None:
                ax.bar(i, r[key], color=colors[i])
            elif r[fallback]:
                ax.bar(i, r[fallback], color="none", edgecolor=colors[i], hatch="//")
                ax.text(i, r[fallback], "not\nreached", ha="center", va="bottom", fontsize=7)
        ax.set_xticks(list(x), labels, fontsize=8)
        ax.set_ylabel(unit)
        ax.set_xlabel(by)
        ax.grid(axis="y", alpha=0.3)
    targets = sorted({r["target"] for r in cand})
    fig.suptitle(f"held-out mean rel-L2 <= {', '.join(f'{t:g}' for t in targets)} per {by}")
    fig.savefig(path, dpi=110)
    return None


def plot_val_curves(runs: list[RunData], path: Path) -> bool:
    """Held-out mean rel-L2 against training time, one line per run."""
    drawn = [r for r in runs if any(e.get("train_s") is not None for e in r.evals)]
    if not drawn:
        return False
    fig, (ax,) = _figure(1)
    for i, r in enumerate(drawn):
        pts = [
            (e["train_s"], e["val_rel_l2_mean"]) for e in r.evals if e.get("train_s") is not None
        ]
        style = ("-", "--", ":")[i // 10 % 3]  # ten colours, then the next line style
        ax.plot(*zip(*pts), marker="o", ms=3, ls=style, label=r.name)
    targets = sorted({r.row["target"] for r in drawn if r.row["target"] is not None})
    for t in targets:
        ax.axhline(t, color="grey", ls="--", lw=1)
    _log_y(ax, [e["val_rel_l2_mean"] for r in drawn for e in r.evals])
    ax.set_xlabel("training time (s)")
    ax.set_ylabel("held-out mean rel-L2")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
    fig.savefig(path, dpi=110)
    return True


def plot_memory(rows: list[dict[str, Any]], path: Path) -> bool:
    """Peak memory of rank 0 against resolution, one line per (ranks, ZeRO, offload)."""
    pts = [r for r in rows if r["res"] and r["peak_memory_mb"]]
    if len({r["res"] for r in pts}) < 2:
        return False
    groups: dict[tuple, dict[int, float]] = {}
    for r in pts:
        peaks = groups.setdefault((r["ranks"], r["zero"], r["offload"]), {})
        peaks[r["res"]] = max(peaks.get(r["res"], 0.0), r["peak_memory_mb"])
    fig, (ax,) = _figure(1)
    for (ranks, zero, offload), peaks in sorted(groups.items(), key=str):
        res = sorted(peaks)
        ax.plot(
            res,
            [peaks[n] for n in res],
            "o-",
            label=f"{ranks} ranks, ZeRO {zero}, offload {offload}",
        )
    ticks = sorted({r["res"] for r in pts})
    ax.set_xscale("log", base=2)
    ax.set_xticks(ticks, [str(t) for t in ticks])
    ax.minorticks_off()
    _log_y(ax, [p for peaks in groups.values() for p in peaks.values()])
    ax.set_xlabel("resolution (nodes per axis)")
    ax.set_ylabel("peak memory of rank 0 (MiB)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
    fig.savefig(path, dpi=110)
    return True


def draw_all(runs: list[RunData], out: Path) -> tuple[dict[str, str], list[str]]:
    """Every plot the data allows; returns (file -> caption, reasons of the skipped ones)."""
    rows = [dict(r.row, evals_n=len(r.evals)) for r in runs]
    plots: dict[str, str] = {}
    skipped: list[str] = []
    for kind in ("strong", "weak"):
        name = f"scaling_{kind}.png"
        if plot_scaling(rows, kind, out / name):
            plots[name] = f"{kind} scaling: throughput and parallel efficiency vs ranks"
        else:
            skipped.append(f"{kind} scaling: no group of {kind}-scaling runs at two rank counts")
    for by in ("cycle", "optimizer"):
        name = f"time_to_target_{by}.png"
        why = plot_time_to_target(rows, by, out / name)
        if why is None:
            plots[name] = f"time and samples to the target per {by}"
        else:
            skipped.append(why)
    if plot_val_curves(runs, out / "val_vs_time.png"):
        plots["val_vs_time.png"] = "held-out error vs training time"
    else:
        skipped.append("validation curves: no run has held-out evaluations")
    if plot_memory(rows, out / "memory_vs_res.png"):
        plots["memory_vs_res.png"] = "peak memory vs resolution"
    else:
        skipped.append("memory vs resolution: needs runs at two or more resolutions")
    return plots, skipped


def report(
    paths: list[Path], out: Path, target: float | None = None, force: bool = False
) -> dict[str, Any]:
    """Collect ``paths`` and write runs.csv, report.md and the plots into ``out``."""
    if out.exists() and not out.is_dir():
        raise PdedsError(f"--out {out} is a file; pass a folder")
    held = [n for n in OUTPUTS if (out / n).exists()]
    if held and not force:
        raise PdedsError(
            f"--out {out} already holds a report ({', '.join(held)}); pass --force to replace "
            "it or choose another --out"
        )
    if not paths:
        raise PdedsError("no run directories given; pass RUN_DIR... (or a study's --out folder)")
    runs, notes = collect(paths, target)
    rows = [r.row for r in runs]
    out.mkdir(parents=True, exist_ok=True)
    write_csv(rows, out / "runs.csv")
    plots, skipped = draw_all(runs, out)
    (out / "report.md").write_text(markdown(rows, plots, skipped, notes))
    return {"rows": rows, "plots": plots, "skipped": skipped, "notes": notes}
