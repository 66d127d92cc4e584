"""Axes -> runs: the product of the axes, run names, nodes, batch sizes, ``--set`` overrides.

Batch sizes per run (G global, m micro-batch per rank, a accumulation steps, G = m a W):

- strong: G fixed (axis ``batch`` or the base JSON); m = axis ``micro_batch``, else the
  largest divisor of G / W not above the base's; a = G / (m W). A rank count that does not
  divide G, or a micro_batch axis value that does not divide G / W, is an error.
- weak: m fixed (axis ``micro_batch`` or the base's), a = the base JSON's
  ``gradient_accumulation_steps`` (default 1), G = m a W.
- comparison: the axes set their keys and nothing is derived.

Nodes: axis ``nodes`` (W must be a multiple), else 1 when W ranks fit this machine (W <= its
GPUs, or cores without GPUs), else W / ``cluster.ranks_per_node``. A run fits here when it has
one node and fits this machine (:mod:`pdeds.study.runner` runs it through ``launch/local``);
the others become scripts (:mod:`pdeds.study.launch`).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any

from pdeds.config import resolve
from pdeds.errors import PdedsError
from pdeds.study.spec import AXES, Study

NAME_PREFIX = {
    "ranks": "r",
    "nodes": "n",
    "zero": "z",
    "offload": "off",
    "res": "res",
    "micro_batch": "mb",
    "batch": "gb",
    "optimizer": "",
    "cycle": "",
}
BATCH_KEYS = (
    "ds.train_batch_size",
    "ds.train_micro_batch_size_per_gpu",
    "ds.gradient_accumulation_steps",
)


@dataclass
class Run:
    """One run of a study."""

    name: str
    ranks: int
    nodes: int
    values: dict[str, Any]
    """Axis -> value of this run."""
    overrides: list[str]
    """``--set`` overrides of the axes (the study's fixed ones come first on the command)."""
    batch: tuple[int, int, int]
    """(global batch G, micro-batch m, accumulation a) with G = m a ranks."""
    fits: bool
    """One node, no more ranks than this machine's slots, and (once ``check_memory`` ran) its
    planned memory fits this machine."""
    extra: list[str] = field(default_factory=list)
    """Overrides that only satisfy another axis (e.g. schedule.levels for a cycle)."""
    memory: Any = None
    """``pdeds.study.memory.MemoryFit``: the memory plan where the run goes, once planned."""
    not_here: str | None = None
    """Why a run that fits here by ranks does not run here (its memory), once planned."""

    def all_overrides(self, study: Study) -> list[str]:
        """The study's fixed overrides, then this run's (repeats of a fixed one dropped)."""
        own = [o for o in (*self.overrides, *self.extra) if o not in study.fixed]
        return [*study.fixed, *own]


def run_name(values: dict[str, Any]) -> str:
    """``r2_z2_res32``: each axis's prefix and value, in :data:`AXES` order."""
    parts = [f"{NAME_PREFIX[a]}{values[a]}" for a in AXES if a in values]
    name = "_".join(parts) or "base"
    return "".join(c if c.isalnum() or c in "._-" else "-" for c in name)


def _nodes(study: Study, name: str, ranks: int, values: dict[str, Any]) -> int:
    """Nodes of a run: the axis, else 1 if it fits here, else ranks / cluster.ranks_per_node."""
    if "nodes" in values:
        nodes = values["nodes"]
        if ranks % nodes:
            raise PdedsError(
                f"study run {name}: {ranks} ranks cannot be spread evenly over {nodes} nodes; "
                "use rank counts that are multiples of the node counts"
            )
        return nodes
    if ranks <= study.machine.slots():
        return 1
    rpn = study.cluster.ranks_per_node
    if rpn is None:
        raise PdedsError(
            f"study run {name}: {ranks} ranks do not fit this machine "
            f"({study.machine.slots()} slots) and neither axes.nodes nor "
            "cluster.ranks_per_node says how to spread them; set cluster.ranks_per_node"
        )
    if ranks <= rpn:
        return 1
    if ranks % rpn:
        raise PdedsError(
            f"study run {name}: {ranks} ranks are not a multiple of cluster.ranks_per_node "
            f"{rpn}; use a multiple or add a nodes axis"
        )
    return ranks // rpn


def _base_batch(ds: dict[str, Any]) -> tuple[int | None, int | None, int | None]:
    return (
        ds.get("train_batch_size"),
        ds.get("train_micro_batch_size_per_gpu"),
        ds.get("gradient_accumulation_steps"),
    )


def _strong_batch(
    name: str, g: int, ranks: int, micro: int | None, fixed_micro: bool
) -> tuple[int, int, int]:
    """(G, m, a) with G fixed: G / W samples per rank in a micro-batches of m."""
    if g % ranks:
        raise PdedsError(
            f"study run {name}: strong scaling keeps the global batch {g}, which {ranks} ranks "
            f"do not divide; use rank counts that divide {g} or change axes.batch / "
            "ds.train_batch_size"
        )
    per_rank = g // ranks
    m = micro if micro is not None else per_rank
    if not fixed_micro:
        # The base micro-batch bounds the memory of one forward: take its largest divisor fit.
        m = max(d for d in range(1, min(m, per_rank) + 1) if per_rank % d == 0)
    if per_rank % m:
        raise PdedsError(
            f"study run {name}: {per_rank} samples per rank (global batch {g} / {ranks} ranks) "
            f"do not split into micro-batches of {m}; choose a micro_batch dividing {per_rank}"
        )
    return g, m, per_rank // m


def _batch(
    study: Study, name: str, values: dict[str, Any], ranks: int, ds: dict[str, Any]
) -> tuple[tuple[int, int, int] | None, list[str]]:
    """(G, m, a) of one run and the ``ds.*`` overrides that set them (none for comparison)."""
    g0, m0, a0 = _base_batch(ds)
    if study.kind == "strong":
        g = values.get("batch", g0)
        if g is None:
            raise PdedsError(
                f"study {study.path}: strong scaling needs a global batch; add axes.batch or "
                "ds.train_batch_size to the base DeepSpeed config"
            )
        g, m, a = _strong_batch(
            name, g, ranks, values.get("micro_batch", m0), "micro_batch" in values
        )
    elif study.kind == "weak":
        a = a0 or 1
        m = values.get("micro_batch", m0)
        if m is None:
            m = g0 // a if g0 and g0 % a == 0 else None
        if m is None:
            raise PdedsError(
                f"study {study.path}: weak scaling needs a per-rank micro-batch; add "
                "axes.micro_batch or ds.train_micro_batch_size_per_gpu"
            )
        g = m * a * ranks
    else:
        return None, []
    return (g, m, a), [f"{k}={v}" for k, v in zip(BATCH_KEYS, (g, m, a))]


def _offload_overrides(value: str, ds: dict[str, Any]) -> list[str]:
    """ds.* patches for offload none | optimizer (optimizer state on CPU) | param (+ weights)."""
    zero = ds.get("zero_optimization") or {}
    wanted = {"optimizer": ("offload_optimizer",), "param": ("offload_optimizer", "offload_param")}
    on = wanted.get(value, ())
    out = []
    for key in ("offload_optimizer", "offload_param"):
        if key in on:
            out += [f"ds.zero_optimization.{key}.device=cpu"]
            out += [f"ds.zero_optimization.{key}.pin_memory=false"]
        elif key in zero:
            out.append(f"ds.zero_optimization.{key}.device=none")
    return out


def _axis_overrides(values: dict[str, Any], ds: dict[str, Any]) -> list[str]:
    """The ``--set`` overrides of a run's axis values (ranks and nodes set none)."""
    out = []
    simple = {
        "zero": "ds.zero_optimization.stage",
        "res": "problem.res",
        "optimizer": "optim.name",
        "cycle": "schedule.cycle",
    }
    for axis in AXES:
        if axis not in values:
            continue
        v = values[axis]
        if axis in simple:
            out.append(f"{simple[axis]}={v}")
        elif axis == "offload":
            out += _offload_overrides(v, ds)
    return out


def expand(study: Study) -> list[Run]:
    """The study's runs: the product of its axes in file order, batch sizes derived by kind.

    Raises:
        PdedsError: naming the run whose ranks, nodes or batch sizes do not work out.
    """
    try:
        base = resolve(study.base, study.fixed)
    except PdedsError as err:
        raise PdedsError(f"study {study.path}: base {study.base} with its set: {err}") from None
    names = list(study.axes)
    runs = []
    for combo in itertools.product(*(study.axes[a] for a in names)):
        values = dict(zip(names, combo))
        name = run_name(values)
        ranks = values.get("ranks", 1)
        nodes = _nodes(study, name, ranks, values)
        derived, batch_over = _batch(study, name, values, ranks, base.ds)
        overrides = _axis_overrides(values, base.ds)
        if study.kind == "comparison":
            overrides += [
                f"{key}={values[axis]}"
                for axis, key in (("batch", BATCH_KEYS[0]), ("micro_batch", BATCH_KEYS[1]))
                if axis in values
            ]
        overrides += batch_over
        extra = []
        if values.get("cycle", "single") not in ("single", "custom") and (
            base.cfg.schedule.levels == 1
        ):
            extra.append("schedule.levels=2")
        runs.append(
            Run(
                name=name,
                ranks=ranks,
                nodes=nodes,
                values=values,
                overrides=overrides,
                batch=derived or (0, 0, 0),
                fits=nodes == 1 and ranks <= study.machine.slots(),
                extra=extra,
            )
        )
    return runs


def check_run(study: Study, run: Run) -> tuple[int, int, int]:
    """Resolve and check one run as its ranks will; returns its (G, m, a).

    Runs the checks a rank makes at start-up: the config (``pdeds.config.resolve``), the batch
    sizes for the rank count, the optimizer against ZeRO stage and offload, the multigrid plan.
    """
    from pdeds.config import batch_sizes, visits_for

    try:
        res = resolve(study.base, run.all_overrides(study))
        zero = res.ds.get("zero_optimization") or {}
        stage = int(zero.get("stage", 0) or 0)
        dev = {
            k: str((zero.get(k) or {}).get("device", "none"))
            for k in ("offload_optimizer", "offload_param")
        }
        if dev["offload_param"] != "none" and stage != 3:
            raise PdedsError(
                f"parameter offload needs ZeRO stage 3, the run has stage {stage}; "
                "pair offload param with zero 3"
            )
        if dev["offload_optimizer"] != "none" and stage == 0:
            raise PdedsError(
                "optimizer offload needs ZeRO stage >= 1, the run has stage 0; pair offload "
                "optimizer with zero 1, 2 or 3"
            )
        g, m, a = batch_sizes(res.ds, run.ranks)
        visits_for(res, run.ranks)  # resolve() already checked the optimizer against ZeRO
    except PdedsError as err:
        raise PdedsError(f"study run {run.name}: {err}") from None
    return g, m, a


def validate(study: Study, runs: list[Run]) -> None:
    """Check every run up front (first failure raises, naming the run); fills in batch sizes."""
    if len({r.name for r in runs}) != len(runs):
        raise PdedsError(f"study {study.path}: two runs share a name; list each axis value once")
    for run in runs:
        run.batch = check_run(study, run)
