"""Studies: one YAML expands into runs; those that fit here run, the others become scripts.

A study file (see ``analysis/studies/``)::

    base: ../../launch/configs/quickstart.yaml   # experiment YAML: the study's folder, CWD, project
    kind: strong                                  # strong | weak | comparison
    axes:                                         # axis -> values; the runs are the product
      ranks: [1, 2, 32, 64]
      zero: [0, 2]
    set: [train.steps=20, problem.res=16]         # fixed overrides of every run (ds.* too)
    target: 0.05                                  # held-out rel-L2 target (time-to-target)
    machine: {cores: 2, gpus: 0}                  # this machine (keys not given: detected)
    cluster: {launcher: slurm_cpu, ranks_per_node: 8}

Axes and the keys they set: ``ranks`` (world size W, the launcher's N), ``nodes``, ``zero``
(``ds.zero_optimization.stage``), ``offload`` (none | optimizer | param: ``ds.zero_optimization.
offload_*.device``), ``res`` (``problem.res``), ``micro_batch``
(``ds.train_micro_batch_size_per_gpu``), ``batch`` (``ds.train_batch_size``), ``optimizer``
(``optim.name``), ``cycle`` (``schedule.cycle``, plus ``schedule.levels=2`` when the base has
one level).

Batch sizes per run (G global, m micro-batch per rank, a accumulation steps, G = m a W):

- strong: G fixed (axis ``batch`` or the base JSON); m = axis ``micro_batch``, else the
  largest divisor of G / W not above the base's; a = G / (m W). A rank count that does not
  divide G, or a micro_batch axis value that does not divide G / W, is an error.
- weak: m fixed (axis ``micro_batch`` or the base's), a = the base JSON's
  ``gradient_accumulation_steps`` (default 1), G = m a W.
- comparison: the axes set their keys and nothing is derived.

Nodes: axis ``nodes`` (W must be a multiple), else 1 when W ranks fit this machine (W <= its
GPUs, or cores without GPUs), else W / ``cluster.ranks_per_node``. A run fits here when it has
one node and fits this machine; it runs through ``launch/local``. Other runs are written as
``OUT/NAME.sbatch`` (``launch/slurm/*_cluster.sh``) or ``OUT/NAME.sh`` (``launch/multinode``).
"""

from __future__ import annotations

import itertools
import json
import os
import shlex
import subprocess
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from pdeds.config import PROJECT_ROOT, build, find_file, load_yaml, resolve
from pdeds.errors import PdedsError

KINDS = ("strong", "weak", "comparison")
AXES = ("ranks", "nodes", "zero", "offload", "res", "micro_batch", "batch", "optimizer", "cycle")
"""Axis names in the order they appear in run names."""
OFFLOADS = ("none", "optimizer", "param")
LAUNCHERS = ("slurm_cpu", "slurm_gpu", "hostfile")
STUDY_KEYS = ("name", "base", "kind", "axes", "set", "target", "machine", "cluster")
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
INT_AXES = ("ranks", "nodes", "zero", "res", "micro_batch", "batch")
BATCH_KEYS = (
    "ds.train_batch_size",
    "ds.train_micro_batch_size_per_gpu",
    "ds.gradient_accumulation_steps",
)
MANIFEST = "study.json"


@dataclass
class Machine:
    """The machine the study runs on; decides which runs fit here."""

    cores: int = 1
    """CPU cores this process may use."""
    gpus: int = 0
    """CUDA devices (ranks go one per GPU when there are any)."""
    memory_gib: float = 0.0
    """Host memory (recorded in the manifest; the fit test counts ranks and nodes only)."""

    @classmethod
    def detect(cls) -> Machine:
        """Cores from the CPU affinity mask, GPUs from torch, memory from sysconf."""
        import torch

        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 1
        pages = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        return cls(cores=cores, gpus=torch.cuda.device_count(), memory_gib=pages / 2**30)

    def slots(self) -> int:
        """Ranks one node of this machine takes: one per GPU, else one per core."""
        return self.gpus if self.gpus > 0 else self.cores

    def describe(self) -> str:
        return f"{self.cores} cores, {self.gpus} GPUs, {self.memory_gib:.1f} GiB"


@dataclass
class Cluster:
    """Where runs that do not fit here go."""

    launcher: str = "slurm_cpu"
    """slurm_cpu (launch/slurm/cpu_cluster.sh) | slurm_gpu (gpu_cluster.sh) | hostfile
    (launch/multinode)."""
    ranks_per_node: int | None = None
    """Ranks per node of runs without a ``nodes`` axis that do not fit here."""
    threads_per_rank: int | None = None
    """OpenMP threads per rank on CPU nodes (default: cores / ranks per node)."""
    time: str = "04:00:00"
    """SLURM wall-time limit."""
    partition: str | None = None
    """SLURM partition."""
    account: str | None = None
    """SLURM account."""
    hostfile: str = "launch/hostfile.example"
    """Default hostfile of the hostfile launcher (the script's HOSTFILE overrides it)."""

    def validate(self) -> None:
        if self.launcher not in LAUNCHERS:
            raise PdedsError(
                f"cluster.launcher: {self.launcher!r} is not one of {', '.join(LAUNCHERS)}"
            )
        for key in ("ranks_per_node", "threads_per_rank"):
            v = getattr(self, key)
            if v is not None and v < 1:
                raise PdedsError(f"cluster.{key}: must be >= 1, got {v}")


@dataclass
class Study:
    """A parsed study file."""

    path: Path
    name: str
    base: Path
    kind: str
    axes: dict[str, list[Any]]
    fixed: list[str]
    """The study's ``set:`` overrides, applied to every run before the axis overrides."""
    target: float | None
    machine: Machine
    cluster: Cluster


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
    """One node, and no more ranks than this machine's slots."""
    extra: list[str] = field(default_factory=list)
    """Overrides that only satisfy another axis (e.g. schedule.levels for a cycle)."""

    def all_overrides(self, study: Study) -> list[str]:
        """The study's fixed overrides, then this run's (repeats of a fixed one dropped)."""
        own = [o for o in (*self.overrides, *self.extra) if o not in study.fixed]
        return [*study.fixed, *own]


def _list_of(value: Any, key: str) -> list[Any]:
    if not isinstance(value, list) or not value:
        raise PdedsError(f"{key}: expected a non-empty list, e.g. {key}: [1, 2]")
    return value


def _check_axis(name: str, values: list[Any]) -> None:
    key = f"axes.{name}"
    if len(set(map(str, values))) != len(values):
        raise PdedsError(f"{key}: lists a value twice ({values}); list each value once")
    for v in values:
        if name in INT_AXES:
            if not isinstance(v, int) or isinstance(v, bool) or v < (0 if name == "zero" else 1):
                raise PdedsError(f"{key}: {v!r} is not a positive integer")
            if name == "zero" and v > 3:
                raise PdedsError(f"{key}: ZeRO stage {v} does not exist; use 0, 1, 2 or 3")
        elif name == "offload" and v not in OFFLOADS:
            raise PdedsError(f"{key}: {v!r} is not one of {', '.join(OFFLOADS)}")
        elif not isinstance(v, str):
            raise PdedsError(f"{key}: {v!r} is not a name (a string)")


def load_study(path: str | Path, machine: Machine | None = None) -> Study:
    """Read and check a study YAML (not yet its runs: see :func:`expand` and :func:`validate`).

    Args:
        path: the study file.
        machine: this machine; default the study's ``machine:`` section, else detected.
    """
    path = Path(path)
    data = load_yaml(path)
    unknown = sorted(set(data) - set(STUDY_KEYS))
    if unknown:
        raise PdedsError(
            f"unknown key(s) {', '.join(map(repr, unknown))} in study {path}; "
            f"valid keys: {', '.join(STUDY_KEYS)}"
        )
    if "base" not in data:
        raise PdedsError(f"study {path}: no base; add base: <experiment YAML>")
    base = find_file(str(data["base"]), path.resolve().parent)
    if base is None:
        raise PdedsError(
            f"study {path}: base {data['base']} not found beside the study, in the CWD or in "
            f"{PROJECT_ROOT}; give the path of an experiment YAML"
        )
    kind = data.get("kind", "comparison")
    if kind not in KINDS:
        raise PdedsError(f"study {path}: kind {kind!r} is not one of {', '.join(KINDS)}")
    axes_in = data.get("axes") or {}
    if not isinstance(axes_in, dict):
        raise PdedsError(f"study {path}: axes must map axis names to lists of values")
    bad = sorted(set(axes_in) - set(AXES))
    if bad:
        raise PdedsError(
            f"study {path}: unknown axis {', '.join(map(repr, bad))}; axes are {', '.join(AXES)}"
        )
    axes = {a: _list_of(axes_in[a], f"axes.{a}") for a in AXES if a in axes_in}
    for a, values in axes.items():
        _check_axis(a, values)
    if kind == "weak" and "batch" in axes:
        raise PdedsError(
            f"study {path}: weak scaling fixes the per-rank micro-batch and grows the global "
            "batch with the ranks; remove axes.batch (vary axes.micro_batch instead)"
        )
    fixed = data.get("set") or []
    if not isinstance(fixed, list) or not all(isinstance(s, str) and "=" in s for s in fixed):
        raise PdedsError(f"study {path}: set must be a list of 'key=value' strings")
    target = data.get("target")
    if target is not None and (isinstance(target, bool) or not isinstance(target, (int, float))):
        raise PdedsError(f"study {path}: target must be a number (a held-out rel-L2), got {target}")
    if target is not None and not target > 0:
        raise PdedsError(f"study {path}: target must be > 0, got {target}")
    if machine is None:
        given = data.get("machine") or {}
        if not isinstance(given, dict):
            raise PdedsError(f"study {path}: machine must map cores, gpus, memory_gib to numbers")
        pinned = build(Machine, given, "machine")
        detected = Machine.detect() if set(given) != {"cores", "gpus", "memory_gib"} else pinned
        machine = Machine(**{**asdict(detected), **{k: getattr(pinned, k) for k in given}})
    cluster = build(Cluster, data.get("cluster") or {}, "cluster")
    cluster.validate()
    return Study(
        path=path,
        name=str(data.get("name") or path.stem),
        base=base,
        kind=kind,
        axes=axes,
        fixed=list(fixed),
        target=None if target is None else float(target),
        machine=machine,
        cluster=cluster,
    )


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
    from pdeds.config import batch_sizes
    from pdeds.multigrid import plan
    from pdeds.optim import prepare_ds_config

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
        prepare_ds_config(res.cfg.optim, res.ds)
        plan(
            res.cfg.schedule,
            finest_res=res.cfg.problem.res,
            total_steps=res.cfg.train.steps,
            samples=res.cfg.data.train_samples,
            batch=g,
            micro_batch=m,
            world=run.ranks,
        )
    except PdedsError as err:
        raise PdedsError(f"study run {run.name}: {err}") from None
    return g, m, a


def validate(study: Study, runs: list[Run]) -> None:
    """Check every run up front (first failure raises, naming the run); fills in batch sizes."""
    if len({r.name for r in runs}) != len(runs):
        raise PdedsError(f"study {study.path}: two runs share a name; list each axis value once")
    for run in runs:
        run.batch = check_run(study, run)


def _show(path: Path, root: Path) -> str:
    """``path`` relative to ``root`` when it lies below it, else absolute."""
    path = Path(os.path.abspath(path))
    try:
        return str(path.relative_to(os.path.abspath(root)))
    except ValueError:
        return str(path)


def _set_flags(overrides: list[str]) -> list[str]:
    return [x for o in overrides for x in ("--set", o)]


def local_command(study: Study, run: Run, out: Path, cwd: Path | None = None) -> list[str]:
    """``launch/local N BASE --run-dir OUT/NAME --set ...`` with paths relative to ``cwd``."""
    cwd = cwd or Path.cwd()
    return [
        _show(PROJECT_ROOT / "launch" / "local", cwd),
        str(run.ranks),
        _show(study.base, cwd),
        "--run-dir",
        _show(out / run.name, cwd),
        *_set_flags(run.all_overrides(study)),
    ]


def script_path(study: Study, run: Run, out: Path) -> Path:
    suffix = ".sh" if study.cluster.launcher == "hostfile" else ".sbatch"
    return out / f"{run.name}{suffix}"


def _train_args(study: Study, run: Run, out: Path) -> str:
    """The pdeds train arguments of a script, paths relative to the project root."""
    args = [
        _show(study.base, PROJECT_ROOT),
        "--run-dir",
        _show(out / run.name, PROJECT_ROOT),
        "--resume",
        "auto",
        *_set_flags(run.all_overrides(study)),
    ]
    return " ".join(shlex.quote(a) for a in args)


def script_text(study: Study, run: Run, out: Path) -> str:
    """A ready-to-submit script for a run that does not fit here (``--resume auto``: a requeued
    or resubmitted job continues from its newest checkpoint)."""
    c = study.cluster
    rpn = run.ranks // run.nodes
    head = (
        f"#!/usr/bin/env bash\n# pdeds study {study.name}, run {run.name}: {run.ranks} ranks on "
        f"{run.nodes} node(s), {rpn} per node ({study.kind}).\n"
        f"# Written by `pdeds study {_show(study.path, PROJECT_ROOT)}`.\n"
    )
    if c.launcher == "hostfile":
        hostfile = shlex.quote(c.hostfile)
        return (
            head + "# Run on the first node, from the project root: "
            f"HOSTFILE=hosts bash {_show(script_path(study, run, out), PROJECT_ROOT)}\n"
            "set -euo pipefail\n"
            '[ -f launch/multinode ] || { echo "run this from the pdeds project root" >&2; '
            "exit 2; }\n"
            f'hostfile="${{HOSTFILE:-{hostfile}}}"\n'
            "hosts() { awk '!/^[[:space:]]*#/ && NF' \"$hostfile\"; }\n"
            "nodes=$(hosts | wc -l)\n"
            "slots=$(hosts | awk '{for (i = 2; i <= NF; i++) if ($i == \"slots="
            f"{rpn}\") n++}} END {{print n + 0}}')\n"
            f'if [ "$nodes" -ne {run.nodes} ] || [ "$slots" -ne {run.nodes} ]; then\n'
            f'    echo "$hostfile lists $nodes node(s), $slots with slots={rpn}; run {run.name} '
            f'needs {run.nodes} nodes with slots={rpn}" >&2\n    exit 2\nfi\n'
            f'exec launch/multinode "$hostfile" {_train_args(study, run, out)}\n'
        )
    gpu = c.launcher == "slurm_gpu"
    cluster_script = "launch/slurm/gpu_cluster.sh" if gpu else "launch/slurm/cpu_cluster.sh"
    sbatch = [
        f"--job-name=pdeds-{run.name}",
        f"--nodes={run.nodes}",
        "--ntasks-per-node=1",
        "--exclusive",
        f"--time={c.time}",
        f"--output={_show(out, PROJECT_ROOT)}/{run.name}-%j.out",
    ]
    if gpu:
        sbatch.append(f"--gpus-per-node={rpn}")
    sbatch += [f"--partition={c.partition}"] * (c.partition is not None)
    sbatch += [f"--account={c.account}"] * (c.account is not None)
    env = [] if gpu else [f"export RANKS_PER_NODE={rpn}"]
    if c.threads_per_rank and not gpu:
        env.append(f"export THREADS={c.threads_per_rank}")
    submit = _show(script_path(study, run, out), PROJECT_ROOT)
    return (
        head
        + f"# Submit from the project root: sbatch {submit}\n"
        + "".join(f"#SBATCH {s}\n" for s in sbatch)
        + "set -euo pipefail\n"
        + 'cd "${SLURM_SUBMIT_DIR:-.}"\n'
        + f'[ -f {cluster_script} ] || {{ echo "submit from the pdeds project root" >&2; '
        "exit 2; }\n"
        + "".join(f"{e}\n" for e in env)
        + f"exec bash {cluster_script} {_train_args(study, run, out)}\n"
    )


def run_state(run_dir: Path) -> str:
    """new | done (summary.json completed) | partial (holds a run) | other (files, no run)."""
    if not run_dir.is_dir() or not any(run_dir.iterdir()):
        return "new"
    summary = run_dir / "summary.json"
    if summary.is_file():
        try:
            if json.loads(summary.read_text()).get("completed") is True:
                return "done"
        except (json.JSONDecodeError, AttributeError):
            pass
    return "partial" if (run_dir / "config.yaml").is_file() else "other"


RESUME_FLAGS = {"new": [], "partial": ["--resume", "auto"], "other": ["--force"]}
"""Flags per run-dir state: a partial run continues; a folder holding no run (a start that died
before writing config.yaml) is moved aside by --force."""


def manifest(study: Study, runs: list[Run], out: Path) -> dict[str, Any]:
    """What ``pdeds report`` reads from OUT/study.json: kind, target and every run's layout."""
    return {
        "study": study.name,
        "file": str(study.path),
        "kind": study.kind,
        "base": str(study.base),
        "target": study.target,
        "set": study.fixed,
        "machine": asdict(study.machine),
        "cluster": asdict(study.cluster),
        "runs": [
            {
                "name": r.name,
                "ranks": r.ranks,
                "nodes": r.nodes,
                "values": r.values,
                "batch": {"global": r.batch[0], "micro": r.batch[1], "accumulation": r.batch[2]},
                "overrides": r.all_overrides(study),
                "where": "here" if r.fits else study.cluster.launcher,
                "run_dir": r.name,
                "script": None if r.fits else script_path(study, r, out).name,
            }
            for r in runs
        ],
    }


def table(study: Study, runs: list[Run], out: Path) -> str:
    """The plan as text: a header, one row per run, then every run's command."""
    rows = [("name", "ranks", "nodes", "G = m x a x W", "where", "state", "overrides")]
    for r in runs:
        g, m, a = r.batch
        shown = [o for o in r.overrides + r.extra if o.split("=")[0] not in BATCH_KEYS]
        where = "here" if r.fits else study.cluster.launcher
        state = run_state(out / r.name) if r.fits else "script"
        rows.append(
            (
                r.name,
                str(r.ranks),
                str(r.nodes),
                f"{g} = {m} x {a} x {r.ranks}",
                where,
                state,
                " ".join(shown) or "-",
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    lines = [
        f"study {study.name}: {study.kind}, base {_show(study.base, Path.cwd())}, "
        f"{len(runs)} run(s), out {_show(out, Path.cwd())}",
        f"fixed: {' '.join(study.fixed) or '-'}",
        f"machine: {study.machine.describe()}; runs that do not fit: {study.cluster.launcher}",
        "",
    ]
    for row in rows:
        lines.append("  ".join(c.ljust(w) for c, w in zip(row, widths)) + "  " + row[-1])
    lines += ["", "commands:"]
    for r in runs:
        if r.fits:
            cmd = shlex.join(local_command(study, r, out))
        else:
            verb = "bash" if study.cluster.launcher == "hostfile" else "sbatch"
            cmd = (
                f"{verb} {_show(script_path(study, r, out), PROJECT_ROOT)}  (from the project root)"
            )
        lines.append(f"  {r.name}: {cmd}")
    return "\n".join(lines)


def write_scripts(study: Study, runs: list[Run], out: Path, say: Callable[[str], None]) -> None:
    """Write each non-fitting run's script; a differing existing one is left as is."""
    for r in runs:
        if r.fits:
            continue
        path = script_path(study, r, out)
        text = script_text(study, r, out)
        if path.is_file() and path.read_text() != text:
            say(
                f"{r.name}: {path} differs from the study's script; left as is (delete it to "
                "regenerate)"
            )
            continue
        path.write_text(text)
        path.chmod(0o755)
        say(f"{r.name}: written, not run: {path}")


def execute(
    study: Study, runs: list[Run], out: Path, say: Callable[[str], None] = print
) -> list[str]:
    """Run the fitting runs one after another through launch/local; returns the failed names.

    Each run's output goes to OUT/NAME.log. A done run is skipped, a partial one resumed. On
    Ctrl-C the current run (which gets the same signal) checkpoints and exits; then it stops.
    """
    failed = []
    local = [r for r in runs if r.fits]
    for i, r in enumerate(local, 1):
        run_dir = out / r.name
        state = run_state(run_dir)
        if state == "done":
            say(f"[{i}/{len(local)}] {r.name}: done already, skipped")
            continue
        cmd = local_command(study, r, out) + RESUME_FLAGS[state]
        log = out / f"{r.name}.log"
        say(f"[{i}/{len(local)}] {r.name}: {state}, running (log {log})")
        t0 = time.perf_counter()
        with log.open("a") as fh:
            fh.write(f"$ {shlex.join(cmd)}\n")
            fh.flush()
            proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT)
            try:
                rc = proc.wait()
            except KeyboardInterrupt:
                proc.wait()
                raise
        dt = time.perf_counter() - t0
        if rc == 0 and run_state(run_dir) == "done":
            say(f"[{i}/{len(local)}] {r.name}: completed in {dt:.0f} s")
            continue
        failed.append(r.name)
        tail = log.read_text().splitlines()[-5:]
        say(f"[{i}/{len(local)}] {r.name}: FAILED (exit {rc}) after {dt:.0f} s; end of {log}:")
        for line in tail:
            say(f"    {line}")
    return failed
