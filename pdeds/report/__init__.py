"""Collect run directories into ``runs.csv``, ``report.md`` and matplotlib plots.

``report(paths, out, target)`` (``pdeds report``) reads the run directories, derives each run's
numbers and the parallel efficiency of scaling groups, then writes the tables and plots.
Modules, one concept each:

- :mod:`pdeds.report.rundirs`: reading run dirs (summary.json, metrics.jsonl, config.yaml,
  ds_config.json, TensorBoard via ``EventAccumulator``), study manifests, ``collect``.
- :mod:`pdeds.report.stats`: throughput, time to target, the CSV row, the TensorBoard
  cross-check, parallel efficiency (strong E = N0 T0 / (N T_N), weak E = T0 / T_N).
- :mod:`pdeds.report.tables`: ``runs.csv`` and ``report.md``.
- :mod:`pdeds.report.plots`: the matplotlib figures.
- :mod:`pdeds.report.write`: ``report``, the whole output folder.
"""

from __future__ import annotations

from pdeds.report.plots import (
    draw_all,
    plot_memory,
    plot_scaling,
    plot_time_to_target,
    plot_val_curves,
)
from pdeds.report.rundirs import (
    RUN_FILES,
    RunData,
    collect,
    load_manifests,
    load_run,
    read_metrics,
    read_tensorboard,
    rows_from_tensorboard,
)
from pdeds.report.stats import (
    TB_EVENT_TOLERANCE,
    efficiency,
    offload_of,
    summarise,
    tb_agrees,
    throughput,
    to_target,
)
from pdeds.report.tables import COLUMNS, MD_COLUMNS, markdown, write_csv
from pdeds.report.write import OUTPUTS, report

__all__ = [
    "COLUMNS",
    "MD_COLUMNS",
    "OUTPUTS",
    "RUN_FILES",
    "TB_EVENT_TOLERANCE",
    "RunData",
    "collect",
    "draw_all",
    "efficiency",
    "load_manifests",
    "load_run",
    "markdown",
    "offload_of",
    "plot_memory",
    "plot_scaling",
    "plot_time_to_target",
    "plot_val_curves",
    "read_metrics",
    "read_tensorboard",
    "report",
    "rows_from_tensorboard",
    "summarise",
    "tb_agrees",
    "throughput",
    "to_target",
    "write_csv",
]
