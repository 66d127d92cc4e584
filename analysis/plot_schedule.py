"""Plot a multigrid schedule: level (and resolution) vs optimizer step.

    python analysis/plot_schedule.py launch/configs/quickstart.yaml --set schedule.cycle=f \
        --set schedule.levels=3 --out schedule.png
    python analysis/plot_schedule.py runs/mg --out schedule.png      # a run dir: + its eval curve

With a config, the plan is computed exactly as the trainer does (``pdeds.multigrid.plan``, world
size ``--world``); with a run directory, the levels come from its metrics.jsonl and the held-out
error at the finest level is drawn on a second axis.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def plan_rows(config: str, overrides: list[str], world: int) -> list[tuple[int, int, int]]:
    """(step, level, res) at the start of every visit and at the end of the last one."""
    from pdeds.config import resolve, visits_for

    visits = visits_for(resolve(config, overrides), world)
    rows = [(v.start, v.level, v.res) for v in visits]
    return rows + [(visits[-1].end, visits[-1].level, visits[-1].res)]


def run_rows(run_dir: Path) -> tuple[list[tuple[int, int, int]], list[tuple[int, float]]]:
    """Logged (step, level, res) rows and (step, held-out mean rel-L2) of a run directory."""
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x]
    steps = [(r["step"], r["level"], r["res"]) for r in rows if "loss" in r]
    evals = [(r["step"], r["val_rel_l2_mean"]) for r in rows if "val_rel_l2_mean" in r]
    return steps, evals


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("source", help="experiment YAML or run directory")
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    ap.add_argument("--world", type=int, default=1, help="ranks (config only)")
    ap.add_argument("--out", type=Path, default=Path("schedule.png"))
    args = ap.parse_args()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    src = Path(args.source)
    evals: list[tuple[int, float]] = []
    if src.is_dir():
        rows, evals = run_rows(src)
    else:
        rows = plan_rows(args.source, args.overrides, args.world)
    fig, ax = plt.subplots(figsize=(8, 3.5))
    steps = [r[0] for r in rows]
    ax.step(steps, [r[1] for r in rows], where="post", color="C0")
    levels = sorted({(r[1], r[2]) for r in rows})
    ax.set_yticks([lv for lv, _ in levels], [f"{lv} ({res})" for lv, res in levels])
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("level (nodes per axis)")
    ax.grid(alpha=0.3)
    if evals:
        ax2 = ax.twinx()
        ax2.plot([e[0] for e in evals], [e[1] for e in evals], "o-", color="C1", ms=3)
        ax2.set_yscale("log")
        ax2.set_ylabel("held-out rel-L2 (finest)", color="C1")
    fig.tight_layout()
    fig.savefig(args.out, dpi=120)
    print(f"written: {args.out}")


if __name__ == "__main__":
    main()
