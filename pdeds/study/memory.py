"""Does a run that fits this machine's ranks also fit its memory? ``pdeds plan`` says, per run.

A run with one node and no more ranks than this machine has slots is planned on this machine
(``pdeds.plan.make_plan``, the model calibrated once per model section and cached):

- with GPUs, each rank's peak M (model states + bucket + activations and energy, the largest
  level of its schedule) must fit one device (the planner's usable memory), and the host states
  the host: ``Plan.fits``;
- on CPU every rank lives in the same host memory, so the need is

      W (1.1 M + R) + H   and, while rank 0 solves the held-out references first,   E + W R

  against ``(1 - reserve)`` x the machine's memory, where R is the resident size of an idle
  rank (Python, torch, DeepSpeed; ``RANK_RESIDENT``), H the host-side states (offloaded states,
  DeepSpeed's fp32 model copies) and E the assembled AMG reference solve at the evaluation
  resolution (``REFERENCE_BYTES_PER_UNKNOWN`` per unknown), needed unless ``data.val_path``
  holds the references.

A run that does not fit is not run here: it becomes a cluster script like a multi-node one,
and the table says why. ``machine.check_memory: false`` (or ``pdeds study --no-memory-check``)
skips the check, e.g. on a machine whose memory is shared with other jobs in a known way.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pdeds.plan.hardware import GiB
from pdeds.study.expansion import Run
from pdeds.study.spec import Study

RANK_RESIDENT = 0.6 * GiB
"""R: resident memory of one rank outside what the planner's M counts: 0.29 GiB after importing
torch, DeepSpeed and the trainer (VmRSS), 0.55 GiB measured as a run's max RSS less its planned M
(quickstart model, 64^3, micro-batch 2, 1 rank: 1.255 GiB max RSS; torch 2.13 CPU, DeepSpeed
0.19.8): gloo's buffers, the data, the allocator's cached and fragmented blocks."""
REFERENCE_BYTES_PER_UNKNOWN = 2048.0
"""E per unknown: the reference AMG-CG solve's peak RSS less the idle process, measured at 64^3
((0.75 - 0.30) GB / 254k unknowns = 1.8 KB) and 128^3 ((4.2 - 0.3) GB / 2.06M = 1.9 KB)."""
RESERVE = 0.1
"""Fraction of the machine's memory left to the OS and other processes."""
CPU_SLACK = 0.1
"""On CPU, M is taken 10% larger: torch's allocation peak of a step measured 4.6-4.7% above the
plan at 64^3 and 96^3 (`pdeds plan launch/configs/quickstart.yaml --check 64,96`), and the
process's max RSS holds freed blocks beyond that (max RSS - allocation peak: 0.59 GiB at 64^3,
0.78 GiB at 96^3, against R = 0.6 GiB)."""


@dataclass
class MemoryFit:
    """One run's memory need on this machine against what it has."""

    need: float
    """Bytes: per device with GPUs, for the whole machine on CPU."""
    usable: float
    """Bytes the need is compared with."""
    fits: bool
    what: str
    """``device`` (per GPU) or ``host`` (the whole machine's memory)."""
    rank0: float = 0.0
    """Bytes: the planned peak of rank 0, what its ``peak_memory_mb`` measures (the CUDA
    allocator's peak M with GPUs; max RSS on CPU: max(1.1 M + H / W, E) + R, rank 0 solving
    the references)."""

    def cell(self) -> str:
        """``0.42/21.6GiB`` (``!`` appended when it does not fit)."""
        return f"{self.need / GiB:.2f}/{self.usable / GiB:.1f}GiB" + ("" if self.fits else "!")

    def reason(self) -> str:
        return (
            f"needs {self.need / GiB:.2f} GiB of {self.what} memory, "
            f"{self.usable / GiB:.2f} GiB usable there"
        )

    def to_dict(self) -> dict[str, Any]:
        return {
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
    n = cfg.train.eval_res or cfg.problem.res
    return REFERENCE_BYTES_PER_UNKNOWN * float(n) ** (cfg.problem.dim - 1) * (n - 2)


def run_memory(study: Study, run: Run, calibrations: dict[str, Any]) -> MemoryFit:
    """Plan ``run`` on this machine (see the module docstring for the formula)."""
    import json

    from pdeds import plan
    from pdeds.config import resolve

    resolved = resolve(study.base, run.all_overrides(study))
    cfg = resolved.cfg
    key = json.dumps([cfg.problem.dim, plan.model_section(cfg.model)], sort_keys=True)
    if key not in calibrations:
        calibrations[key] = plan.calibrate(cfg.problem.dim, cfg.model)
    m = study.machine
    if m.gpus > 0:
        hw = plan.Hardware(
            gpus_per_node=run.ranks,
            gpu_mem_gib=m.gpu_mem_gib,
            host_mem_gib=m.memory_gib,
            reserve=RESERVE,
        )
        p = plan.make_plan(resolved, hw, calibrations[key], config_name=run.name)
        need = max(lv.device_total for lv in p.levels)
        return MemoryFit(need, hw.usable_bytes, p.fits, "device", rank0=need)
    hw = plan.Hardware(gpus_per_node=run.ranks, gpu_mem_gib=m.memory_gib / run.ranks)
    p = plan.make_plan(resolved, hw, calibrations[key], config_name=run.name)
    peak = max(lv.device_total for lv in p.levels) * (1.0 + CPU_SLACK)
    train = run.ranks * (peak + RANK_RESIDENT) + p.states.host_total
    ref = reference_bytes(cfg)
    need = max(train, ref + run.ranks * RANK_RESIDENT)
    usable = m.memory_gib * GiB * (1.0 - RESERVE)
    rank0 = max(peak + p.states.host_total / run.ranks, ref) + RANK_RESIDENT
    return MemoryFit(need, usable, need <= usable, "host", rank0=rank0)


def check_memory(study: Study, runs: list[Run], say: Any = None) -> None:
    """Plan every run that fits here by ranks; one that does not fit by memory is sent to the
    cluster (``run.fits = False``) with the reason in ``run.memory``."""
    calibrations: dict[str, Any] = {}
    for run in runs:
        if not run.fits:
            continue
        if not calibrations and say is not None:
            say("planning memory per run (pdeds plan; the first calibration takes a few seconds)")
        run.memory = run_memory(study, run, calibrations)
        if not run.memory.fits:
            run.fits = False
