"""matplotlib plots of a report: scaling, time to target, held-out error vs time, memory.

Figures are drawn on the Agg canvas without pyplot state; :func:`draw_all` draws every plot
the data allows and says why each other one was left out.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pdeds.report.rundirs import RunData


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
    """Peak memory of rank 0 against resolution, one line per (ranks, ZeRO, offload); the
    planned peak (``pdeds study``'s memory plan) dashed in the same colour where known."""
    pts = [r for r in rows if r["res"] and r["peak_memory_mb"]]
    if len({r["res"] for r in pts}) < 2:
        return False
    groups: dict[tuple, dict[int, float]] = {}
    plans: dict[tuple, dict[int, float]] = {}
    for r in pts:
        key = (r["ranks"], r["zero"], r["offload"])
        peaks = groups.setdefault(key, {})
        peaks[r["res"]] = max(peaks.get(r["res"], 0.0), r["peak_memory_mb"])
        if r.get("planned_memory_mb"):
            plans.setdefault(key, {})[r["res"]] = r["planned_memory_mb"]
    fig, (ax,) = _figure(1)
    for (ranks, zero, offload), peaks in sorted(groups.items(), key=str):
        res = sorted(peaks)
        (line,) = ax.plot(
            res,
            [peaks[n] for n in res],
            "o-",
            label=f"{ranks} ranks, ZeRO {zero}, offload {offload}",
        )
        planned = plans.get((ranks, zero, offload), {})
        if planned:
            xs = sorted(planned)
            ax.plot(xs, [planned[n] for n in xs], "x--", color=line.get_color(), label="planned")
    ticks = sorted({r["res"] for r in pts})
    ax.set_xscale("log", base=2)
    ax.set_xticks(ticks, [str(t) for t in ticks])
    ax.minorticks_off()
    values = [p for d in (*groups.values(), *plans.values()) for p in d.values()]
    _log_y(ax, values)
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
