"""Will a run fit where it goes? ``pdeds plan`` answers per run, here and on the cluster.

A run with one node and no more ranks than this machine has slots is planned on this machine
(``pdeds.plan.make_plan``, each network's step executed symbolically once); if it does
not fit it becomes a cluster script like a multi-node run. A run for the cluster is planned on
the cluster's nodes when the study says their memory (``cluster.memory_gib``, and
``cluster.gpu_mem_gib`` for GPU nodes); one that would not fit there is flagged before an
allocation is spent on it. Per node of R ranks:

- GPU nodes (one rank per GPU): each rank's peak M (model states + bucket + activations and
  energy, the largest level of its schedule) must fit one device (the planner's usable
  memory), and the host states the host: ``Plan.fits``;
- CPU nodes: every rank of a node lives in the same host memory, so the need is

      R (1.1 M + R0) + H   and, while rank 0 solves the held-out references first,   E + R R0

  against ``(1 - RESERVE)`` x the node's memory, where R0 is the resident size of an idle rank
  (Python, torch, DeepSpeed; ``RANK_RESIDENT``), H the host-side states of the node (offloaded
  states, DeepSpeed's fp32 model copies), E the held-out reference solve at the evaluation
  resolution (``reference.solve_memory``, by ``train.reference``; 0 when
  ``data.val_path`` holds the references) and 1.1 the measured ``CPU_SLACK``.

``machine.check_memory: false`` (or ``pdeds study --no-memory-check``) skips all of it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pdeds.machine import GiB
from pdeds.study.expansion import Run
from pdeds.study.spec import Study

RANK_RESIDENT = 0.6 * GiB
"""R0: resident memory of one rank outside what the planner's M counts: 0.29 GiB after importing
torch, DeepSpeed and the trainer (VmRSS), 0.55 GiB measured as a run's max RSS less its planned M
(quickstart model, 64^3, micro-batch 2, 1 rank: 1.255 GiB max RSS; torch 2.13 CPU, DeepSpeed
0.19.8): gloo's buffers, the data, the allocator's cached and fragmented blocks."""
RESERVE = 0.1
"""Fraction of the machine's memory left to the OS and other processes."""
CPU_SLACK = 0.1
"""On CPU, M is taken 10% larger: torch's allocation peak of a step measured 4.6-4.7% above the
plan at 64^3 and 96^3 (`pdeds plan launch/configs/quickstart.yaml --check 64,96`), and the
process's max RSS holds freed blocks beyond that (max RSS - allocation peak: 0.59 GiB at 64^3,
0.78 GiB at 96^3, against R0 = 0.6 GiB)."""


@dataclass(frozen=True)
class Nodes:
    """Where a run's ranks go, for its memory plan."""

    nodes: int
    ranks_per_node: int
    memory_gib: float
    """Host memory of one node."""
    gpu_mem_gib: float = 0.0
    """Memory of one GPU; 0 for CPU nodes."""
    label: str = "here"
    """``here`` or the cluster launcher."""


@dataclass
class MemoryFit:
    """One run's memory need where it goes against what that place has."""

    need: float
    """Bytes: per device with GPUs, per node on CPU nodes."""
    usable: float
    """Bytes the need is compared with."""
    fits: bool
    what: str
    """``device`` (per GPU) or ``host`` (a node's memory)."""
    rank0: float = 0.0
    """Bytes: the planned peak of rank 0, what its ``peak_memory_mb`` measures (the CUDA
    allocator's peak M with GPUs; max RSS on CPU: max(1.1 M + H / R, E) + R0, rank 0 solving
    the references)."""
    where: str = "here"

    def cell(self) -> str:
        """``0.42/21.6GiB`` (``!`` appended when it does not fit)."""
        return f"{self.need / GiB:.2f}/{self.usable / GiB:.1f}GiB" + ("" if self.fits else "!")

    def reason(self) -> str:
        per = "per GPU" if self.what == "device" else "of host memory per node"
        place = "here" if self.where == "here" else f"on the {self.where} nodes"
        return f"needs {self.need / GiB:.2f} GiB {per}, {self.usable / GiB:.2f} GiB usable {place}"

    def to_dict(self) -> dict[str, Any]:
        return {
            "where": self.where,
            "need_bytes": int(self.need),
            "usable_bytes": int(self.usable),
            "fits": self.fits,
            "what": self.what,
            "rank0_bytes": int(self.rank0),
        }


def reference_bytes(cfg: Any) -> float:
    """E: the held-out reference solve's memory, 0 when ``data.val_path`` supplies it."""
    if cfg.data.val_path:
        return 0.0
    from pdeds.physics.reference import solve_memory

    n = cfg.train.eval_res or cfg.problem.res
    return solve_memory((n,) * cfg.problem.dim, cfg.train.reference)


def plan_run(resolved: Any, place: Nodes, name: str = "") -> MemoryFit:
    """The memory plan of a resolved run on ``place`` (see the module docstring)."""
    from pdeds import plan

    rpn = place.ranks_per_node
    if place.gpu_mem_gib > 0:
        hw = plan.Hardware(
            gpus_per_node=rpn,
            nodes=place.nodes,
            gpu_mem_gib=place.gpu_mem_gib,
            host_mem_gib=place.memory_gib or None,
            reserve=RESERVE,
        )
        p = plan.make_plan(resolved, hw, config_name=name)
        need = max(lv.device_total for lv in p.levels)
        return MemoryFit(need, hw.usable_bytes, p.fits, "device", rank0=need, where=place.label)
    hw = plan.Hardware(gpus_per_node=rpn, nodes=place.nodes, gpu_mem_gib=place.memory_gib / rpn)
    p = plan.make_plan(resolved, hw, config_name=name)
    peak = max(lv.device_total for lv in p.levels) * (1.0 + CPU_SLACK)
    train = rpn * (peak + RANK_RESIDENT) + p.states.host_total
    ref = reference_bytes(resolved.cfg)
    need = max(train, ref + rpn * RANK_RESIDENT)
    usable = place.memory_gib * GiB * (1.0 - RESERVE)
    rank0 = max(peak + p.states.host_total / rpn, ref) + RANK_RESIDENT
    return MemoryFit(need, usable, need <= usable, "host", rank0=rank0, where=place.label)


def _cluster_nodes(study: Study, run: Run) -> Nodes | None:
    """The cluster nodes of a run, or None when the study does not say their memory."""
    c = study.cluster
    gpu = c.launcher == "slurm_gpu" or (c.launcher == "hostfile" and c.gpu_mem_gib)
    if not c.memory_gib or (gpu and not c.gpu_mem_gib):
        return None
    return Nodes(
        nodes=run.nodes,
        ranks_per_node=run.ranks // run.nodes,
        memory_gib=c.memory_gib,
        gpu_mem_gib=(c.gpu_mem_gib or 0.0) if gpu else 0.0,
        label=c.launcher,
    )


def check_memory(study: Study, runs: list[Run], say: Any = None) -> None:
    """Plan every run where it goes. A run that fits here by ranks but not by memory goes to
    the cluster (``run.fits = False``, the reason in ``run.not_here``); ``run.memory`` is the
    plan where the run goes (None where the study does not say the cluster's memory)."""
    from pdeds.config import resolve

    m = study.machine
    here = {"memory_gib": m.memory_gib, "gpu_mem_gib": m.gpu_mem_gib if m.gpus else 0.0}
    if say is not None:
        say("planning memory per run (pdeds plan: each network's step executed symbolically)")
    for run in runs:
        place = Nodes(1, run.ranks, **here) if run.fits else _cluster_nodes(study, run)
        if place is None:
            continue
        resolved = resolve(study.base, run.all_overrides(study))
        run.memory = plan_run(resolved, place, run.name)
        if run.fits and not run.memory.fits:
            run.fits, run.not_here = False, run.memory.reason()
            place = _cluster_nodes(study, run)
            run.memory = None if place is None else plan_run(resolved, place, run.name)
