"""The report's tables: ``runs.csv`` (one row per run, every column) and ``report.md``."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

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
    "planned_memory_mb",
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
    ("planned_memory_mb", "planned (MiB)"),
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
