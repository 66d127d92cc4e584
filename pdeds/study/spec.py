"""The study YAML: its keys, the dataclasses they fill, and their one validation pass.

A study file (see ``analysis/studies/``)::

    base: ../../launch/configs/quickstart.yaml   # experiment YAML: the study's folder, CWD, project
    kind: strong                                  # strong | weak | comparison
    axes:                                         # axis -> values; the runs are the product
      ranks: [1, 2, 32, 64]
      zero: [0, 2]
    set: [train.steps=20, problem.res=16]         # fixed overrides of every run (ds.* too)
    target: 0.05                                  # held-out rel-L2 target (time-to-target)
    machine: {cores: 2, gpus: 0}                  # this machine (keys not given: detected);
                                                  # check_memory: false skips the memory plan
    cluster: {launcher: slurm_cpu, ranks_per_node: 8, memory_gib: 256}  # + gpu_mem_gib (GPUs)

Axes and the keys they set: ``ranks`` (world size W, the launcher's N), ``nodes``, ``zero``
(``ds.zero_optimization.stage``), ``offload`` (none | optimizer | param: ``ds.zero_optimization.
offload_*.device``), ``res`` (``problem.res``), ``micro_batch``
(``ds.train_micro_batch_size_per_gpu``), ``batch`` (``ds.train_batch_size``), ``optimizer``
(``optim.name``), ``cycle`` (``schedule.cycle``, plus ``schedule.levels=2`` when the base has
one level). How the axes become runs: :mod:`pdeds.study.expansion`.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from pdeds.config import PROJECT_ROOT, build, find_file, load_yaml
from pdeds.errors import PdedsError
from pdeds.machine import available_memory_gib

KINDS = ("strong", "weak", "comparison")
AXES = ("ranks", "nodes", "zero", "offload", "res", "micro_batch", "batch", "optimizer", "cycle")
"""Axis names in the order they appear in run names."""
OFFLOADS = ("none", "optimizer", "param")
LAUNCHERS = ("slurm_cpu", "slurm_gpu", "hostfile")
STUDY_KEYS = ("name", "base", "kind", "axes", "set", "target", "machine", "cluster")
INT_AXES = ("ranks", "nodes", "zero", "res", "micro_batch", "batch")


@dataclass
class Machine:
    """The machine the study runs on; decides which runs fit here."""

    cores: int = 1
    """CPU cores this process may use."""
    gpus: int = 0
    """CUDA devices (ranks go one per GPU when there are any)."""
    memory_gib: float = 0.0
    """Host memory the study may use (GiB); detected: MemAvailable when the study starts."""
    gpu_mem_gib: float = 0.0
    """Memory of one GPU (GiB); 0 without GPUs."""
    check_memory: bool = True
    """Plan each run's memory here (``pdeds.study.memory``); one that does not fit becomes a
    cluster script. False: ranks and nodes alone decide."""

    @classmethod
    def detect(cls) -> Machine:
        """Cores from the CPU affinity mask, GPUs and their memory from torch, host memory as
        what the kernel says is available now (other jobs' memory is not ours to plan with)."""
        import torch

        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 1
        gpus = torch.cuda.device_count()
        gpu_mem = torch.cuda.get_device_properties(0).total_memory / 2**30 if gpus else 0.0
        return cls(cores=cores, gpus=gpus, memory_gib=available_memory_gib(), gpu_mem_gib=gpu_mem)

    def validate(self, path: Path) -> None:
        """Raise PdedsError naming the bad ``machine`` key."""
        for key in ("cores", "gpus"):
            v = getattr(self, key)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0 or (key == "cores" and v < 1):
                raise PdedsError(
                    f"study {path}: machine.{key} must be an integer >= "
                    f"{1 if key == 'cores' else 0}, got {v!r}"
                )
        if self.check_memory and not self.memory_gib > 0:
            raise PdedsError(
                f"study {path}: machine.memory_gib must be > 0 to check memory; "
                "give it, or set machine.check_memory: false"
            )
        if self.check_memory and self.gpus and not self.gpu_mem_gib > 0:
            raise PdedsError(
                f"study {path}: machine.gpu_mem_gib must be > 0 with gpus "
                f"{self.gpus}; give it, or set machine.check_memory: false"
            )

    def slots(self) -> int:
        """Ranks one node of this machine takes: one per GPU, else one per core."""
        return self.gpus if self.gpus > 0 else self.cores

    def describe(self) -> str:
        gpu = f" x {self.gpu_mem_gib:.0f} GiB" if self.gpus else ""
        return f"{self.cores} cores, {self.gpus} GPUs{gpu}, {self.memory_gib:.1f} GiB"


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
    memory_gib: float | None = None
    """Host memory of one node (GiB): with it, runs for the cluster are planned too."""
    gpu_mem_gib: float | None = None
    """Memory of one GPU (GiB) of GPU nodes (slurm_gpu, or hostfile with GPU nodes)."""

    def validate(self) -> None:
        if self.launcher not in LAUNCHERS:
            raise PdedsError(
                f"cluster.launcher: {self.launcher!r} is not one of {', '.join(LAUNCHERS)}"
            )
        for key in ("ranks_per_node", "threads_per_rank"):
            v = getattr(self, key)
            if v is not None and v < 1:
                raise PdedsError(f"cluster.{key}: must be >= 1, got {v}")
        for key in ("memory_gib", "gpu_mem_gib"):
            v = getattr(self, key)
            if v is not None and not v > 0:
                raise PdedsError(f"cluster.{key}: must be > 0 GiB, got {v}; or leave it out")


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
    if not path.is_file():
        raise PdedsError(
            f"study file {path} not found; pass a study YAML such as "
            "analysis/studies/strong_scaling_cpu.yaml"
        )
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
        hardware = {"cores", "gpus", "memory_gib", "gpu_mem_gib"}
        detected = Machine.detect() if not hardware <= set(given) else pinned
        machine = Machine(**{**asdict(detected), **{k: getattr(pinned, k) for k in given}})
        machine.validate(path)
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
