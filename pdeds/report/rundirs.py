"""Reading run directories: summary, metrics, config, DeepSpeed config, TensorBoard, manifests.

A run directory (see ``pdeds.train.trainer``) holds ``summary.json``, ``metrics.jsonl``,
``config.yaml``, ``ds_config.json`` and ``tb/``. Each may be missing or unreadable: the run is
then reported with what is there and the missing files named. TensorBoard events are read with
tensorboard's own ``EventAccumulator``; their ``loss`` series is checked against metrics.jsonl
(:func:`pdeds.report.stats.tb_agrees`) and replaces metrics.jsonl when that file is missing. A
study folder (one with the ``study.json`` manifest ``pdeds study`` writes) stands for its runs;
:func:`collect` reads them all and derives each run's numbers (:mod:`pdeds.report.stats`).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from pdeds.report.stats import efficiency, is_number, summarise

RUN_FILES = ("summary.json", "metrics.jsonl", "config.yaml", "ds_config.json", "tb")


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

    def is_empty(self) -> bool:
        """Nothing of a run is there: no folder, or none of :data:`RUN_FILES` in it."""
        return "the run directory" in self.missing or set(RUN_FILES) <= set(self.missing)


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
        if isinstance(row, dict) and is_number(row.get("step")):
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
    run.steps = [r for r in rows if is_number(r.get("loss"))]
    run.evals = [r for r in rows if is_number(r.get("val_rel_l2_mean"))]
    return run


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
