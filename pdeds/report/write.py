"""``report``: collect run directories and write runs.csv, report.md and the plots."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pdeds.errors import PdedsError
from pdeds.report.plots import draw_all
from pdeds.report.rundirs import RUN_FILES, collect
from pdeds.report.tables import markdown, write_csv

OUTPUTS = ("runs.csv", "report.md")


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
    if runs and all(r.is_empty() for r in runs) and not notes:
        names = ", ".join(str(r.path) for r in runs)
        raise PdedsError(
            f"no run found in {names}: none holds {', '.join(RUN_FILES)} or a study.json; pass "
            "run directories (pdeds train --run-dir) or a `pdeds study` output folder"
        )
    rows = [r.row for r in runs]
    out.mkdir(parents=True, exist_ok=True)
    write_csv(rows, out / "runs.csv")
    plots, skipped = draw_all(runs, out)
    (out / "report.md").write_text(markdown(rows, plots, skipped, notes))
    return {"rows": rows, "plots": plots, "skipped": skipped, "notes": notes}
