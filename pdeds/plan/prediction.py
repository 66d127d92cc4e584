"""The prediction per level of the schedule: per rank, at resolution n (n^d nodes) and
micro-batch b, the device holds

    M(n, b) = S + B + (c b + e) n^d + o

(S model states, B DeepSpeed's gradient bucket, ``pdeds.plan.states``; c, e, o the calibrated
``Fit``). A level fits when M <= the usable device memory; its largest micro-batch is the
largest b that does. ``Plan`` is the whole answer of ``pdeds plan``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from pdeds.errors import PdedsError
from pdeds.plan.fit import Calibration, Fit
from pdeds.plan.hardware import GiB, Hardware
from pdeds.plan.states import ModelStates, ZeroSetup
from pdeds.plan.table import plan_dict, plan_table


@dataclass
class LevelPlan:
    """One resolution of the schedule at its micro-batch."""

    level: int
    res: int
    micro_batch: int
    activations_per_sample: float
    energy_per_sample: float
    per_micro_batch: float
    """e n^d + o: independent of the micro-batch size."""
    device_total: float
    fits: bool
    max_micro_batch: int
    other_checkpointing: float | None
    """device_total with model.checkpoint flipped (None if that variant is not calibrated)."""


@dataclass
class Plan:
    """The answer of ``pdeds plan``."""

    config: str
    hardware: Hardware
    zero: ZeroSetup
    optimizer: str
    parameters: int
    largest_layer: int
    checkpoint: bool
    variant: str
    states: ModelStates
    levels: list[LevelPlan]
    calibration: Calibration
    recommendations: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def device_fits(self) -> bool:
        return all(lv.fits for lv in self.levels)

    @property
    def host_fits(self) -> bool | None:
        if self.hardware.host_mem_gib is None:
            return None
        return self.states.host_total <= self.hardware.host_mem_gib * GiB

    @property
    def fits(self) -> bool:
        return self.device_fits and self.host_fits is not False

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: every byte count as an integer."""
        return plan_dict(self)

    def table(self) -> str:
        """The plan as a text table (what ``pdeds plan`` prints)."""
        return plan_table(self)


def level_micro_batches(cfg: Any, ds: dict[str, Any], world: int) -> list[tuple[int, int, int]]:
    """(level, resolution, micro-batch per rank) of every level of the schedule, coarsest first."""
    from pdeds.config import batch_sizes

    mb = ds.get("train_micro_batch_size_per_gpu")
    if mb is None:
        mb = batch_sizes(ds, world)[1]
    out = []
    for lvl, n in enumerate(cfg.schedule.resolutions_for(cfg.problem.res)):
        lv = cfg.schedule.level[lvl] if cfg.schedule.level else None
        m = mb
        if lv is not None and lv.micro_batch:
            m = lv.micro_batch
        elif lv is not None and lv.batch:
            m = min(mb, lv.batch // world) if lv.batch >= world else 1
        out.append((lvl, n, int(m)))
    return out


def predict(states: ModelStates, fit: Fit, n: int, micro_batch: int, dim: int) -> float:
    """M(n, b) = S + B + (c b + e) n^d + o, bytes per rank."""
    return states.device_total + states.buffers_device + fit.bytes(n, micro_batch, dim)


def largest_micro_batch(states: ModelStates, fit: Fit, n: int, dim: int, usable: float) -> int:
    """The largest b with M(n, b) <= usable (0 if not even b = 1)."""
    room = usable - states.device_total - states.buffers_device - fit.bytes(n, 0, dim)
    per = fit.per_sample * float(n) ** dim
    if per <= 0:
        return 0 if room < 0 else 1 << 20
    return max(0, int(math.floor(room / per)))


def level_plans(
    states: ModelStates,
    cal: Calibration,
    key: str,
    levels: list[tuple[int, int, int]],
    dim: int,
    hw: Hardware,
) -> list[LevelPlan]:
    """One ``LevelPlan`` per (level, n, micro-batch) of ``levels``: M(n, b) with the ``key``
    variant's fit, whether it fits ``hw``, the largest micro-batch, and M with checkpointing
    flipped."""
    if key not in cal.step:
        raise PdedsError(
            f"the calibration has no {key!r} measurements (it has {', '.join(cal.step)}); "
            "recalibrate with --recalibrate"
        )
    fit = cal.step[key]
    flipped = cal.step.get(key[:-5] if key.endswith("+ckpt") else key + "+ckpt")
    out = []
    for lvl, n, mb in levels:
        vol = float(n) ** dim
        total = predict(states, fit, n, mb, dim)
        energy = cal.energy.per_sample * vol
        out.append(
            LevelPlan(
                level=lvl,
                res=n,
                micro_batch=mb,
                activations_per_sample=fit.per_sample * vol - energy,
                energy_per_sample=energy,
                per_micro_batch=fit.bytes(n, 0, dim),
                device_total=total,
                fits=total <= hw.usable_bytes,
                max_micro_batch=largest_micro_batch(states, fit, n, dim, hw.usable_bytes),
                other_checkpointing=predict(states, flipped, n, mb, dim) if flipped else None,
            )
        )
    return out
