"""The activation model of one training step, fitted to measured peaks: the forward+backward
peak of the U-Net and the energy J_h at resolution n (n^d nodes) and micro-batch b is

    peak(n, b) = (c b + e) n^d + o

c bytes per node per sample (saved activations, the energy's field temporaries and gradients),
e bytes per node per micro-batch whatever its size (per-call workspaces), o a constant. A
``Calibration`` holds one ``Fit`` per (dtype, activation checkpointing) variant and one for the
energy alone, with what they were measured on.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

VARIANTS = ("fp32", "fp32+ckpt", "bf16", "bf16+ckpt")
"""Calibrated (dtype, activation checkpointing) combinations; fp16 uses the bf16 fit."""


@dataclass(frozen=True)
class Fit:
    """peak(n, b) = (per_sample b + per_batch) n^d + offset, bytes (d = dim)."""

    per_sample: float
    """c: bytes per node per sample."""
    per_batch: float
    """e: bytes per node per micro-batch, whatever its size."""
    offset: float
    """o: bytes."""
    points: tuple[tuple[int, int, float], ...] = ()
    """The measurements (n, b, peak bytes) it was fitted to."""

    def bytes(self, n: int, batch: int, dim: int) -> float:
        return (self.per_sample * batch + self.per_batch) * float(n) ** dim + self.offset

    @classmethod
    def from_points(cls, points: list[tuple[int, int, float]], dim: int) -> Fit:
        """Solve for (c, e, o) from three measurements (n1, b1), (n2, b1), (n1, b2), b2 != b1.

        Same micro-batch, two resolutions give the slope c b1 + e and o; same resolution, two
        micro-batches give c.
        """
        (n1, b1, p1), (n2, b1_, p2), (n1_, b2, p3) = points
        if b1 != b1_ or n1 != n1_ or n1 == n2 or b1 == b2:
            raise ValueError("calibration points must be (n1, b1), (n2, b1), (n1, b2)")
        v1, v2 = float(n1) ** dim, float(n2) ** dim
        slope = (p2 - p1) / (v2 - v1)
        c = (p3 - p1) / ((b2 - b1) * v1)
        return cls(
            per_sample=c, per_batch=slope - c * b1, offset=p1 - slope * v1, points=tuple(points)
        )


@dataclass(frozen=True)
class Calibration:
    """Measured peaks of one model on one device kind: a Fit per variant and for the energy."""

    device: str
    dim: int
    model: dict[str, Any]
    resolutions: tuple[int, int]
    micro_batches: tuple[int, int]
    step: dict[str, Fit]
    """Variant ("fp32", "bf16", "+ckpt") -> fit of a whole forward+energy+backward."""
    energy: Fit
    """The energy J_h alone (fp32 field, forward + backward)."""
    torch_version: str = ""
    method: str = ""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Calibration:
        def fit(x: dict[str, Any]) -> Fit:
            return Fit(
                per_sample=float(x["per_sample"]),
                per_batch=float(x["per_batch"]),
                offset=float(x["offset"]),
                points=tuple(tuple(p) for p in x.get("points", ())),
            )

        return cls(
            device=d["device"],
            dim=int(d["dim"]),
            model=dict(d["model"]),
            resolutions=tuple(d["resolutions"]),
            micro_batches=tuple(d["micro_batches"]),
            step={k: fit(v) for k, v in d["step"].items()},
            energy=fit(d["energy"]),
            torch_version=d.get("torch_version", ""),
            method=d.get("method", ""),
        )


def variant(dtype: str, checkpoint: bool) -> str:
    """The calibration key of a (dtype, checkpointing) combination."""
    return ("fp32" if dtype == "fp32" else "bf16") + ("+ckpt" if checkpoint else "")
