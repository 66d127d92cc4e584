"""The ``model`` section of an experiment: which network, and its sizes.

``arch: fmg`` (the default) is the full-multigrid network of ``pdeds.models.fmg``: its weights
mean the same operator nu -> u at every resolution, so multigrid training and prediction at a
new resolution work. ``arch: unet`` is the plain U-Net of ``pdeds.models.unet`` (tied to the
resolution it was trained at; kept for comparison).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from pdeds.errors import PdedsError
from pdeds.models.norms import NORM_KINDS

ARCHS = ("fmg", "unet")
ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "gelu": nn.GELU,
    "relu": nn.ReLU,
    "silu": nn.SiLU,
    "tanh": nn.Tanh,
    "leaky_relu": nn.LeakyReLU,
}
"""The values ``ModelConfig.activation`` accepts."""


@dataclass
class ModelConfig:
    """Architecture of the network (the ``model`` section of the config)."""

    arch: str = "fmg"
    """fmg: a core U-Net on a fixed coarse grid + one shared refinement stage per doubling of
    the resolution, the same operator at every n (default) | unet: a U-Net of fixed depth."""
    depth: int = 3
    """unet: number of 2x downsamplings (levels below the finest)."""
    width: int = 16
    """Channels at the finest level (fmg: of the refinement stages and the core's top level)."""
    growth: float = 2.0
    """Channel multiplier per U-Net level: c_s = round(width * growth^s) (fmg: in the core)."""
    norm: str = "group"
    """Normalisation after each conv: batch | sync_batch | instance | group | none."""
    groups: int = 8
    """Groups for group norm, lowered to the largest divisor of the channel count."""
    activation: str = "gelu"
    """Nonlinearity: gelu | relu | silu | tanh | leaky_relu."""
    checkpoint: bool = False
    """Recompute each stage in backward instead of storing its activations."""
    blocks: int = 2
    """(conv, norm, act) triples per stage."""
    core_res: int = 8
    """fmg: nodes per axis of the core grid (the coarsest grid the network sees)."""
    core_depth: int = 2
    """fmg: 2x downsamplings of the core U-Net (core_res / 2^core_depth >= 2)."""
    refine_power: float = 2.0
    """fmg: the stage at spacing h adds its correction scaled by (h / h_1)^p (h_1: the first
    stage's spacing); p = 2 is the O(h^2) gap between Q1 solutions at h and 2h."""

    def validate(self) -> None:
        """Raise PdedsError naming the first bad key and the fix."""
        _require_choice(self.arch, "model.arch", ARCHS)
        _require_int(self.depth, "model.depth", 1)
        _require_int(self.width, "model.width", 1)
        _require_int(self.groups, "model.groups", 1)
        _require_int(self.blocks, "model.blocks", 1)
        _require_int(self.core_res, "model.core_res", 2)
        _require_int(self.core_depth, "model.core_depth", 1)
        for key in ("growth", "refine_power"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise PdedsError(f"model.{key}: {value!r} is not a number; use e.g. 2.0")
        if self.growth <= 0:
            raise PdedsError(f"model.growth: {self.growth!r} must be > 0; use e.g. 2.0")
        if self.refine_power < 0:
            raise PdedsError(f"model.refine_power: {self.refine_power!r} must be >= 0; use 2")
        _require_choice(self.norm, "model.norm", NORM_KINDS)
        _require_choice(self.activation, "model.activation", tuple(ACTIVATIONS))
        if not isinstance(self.checkpoint, bool):
            raise PdedsError(f"model.checkpoint: {self.checkpoint!r} is not a bool; use true/false")
        step = 2**self.core_depth
        if self.arch == "fmg" and (self.core_res % step or self.core_res < 2 * step):
            raise PdedsError(
                f"model.core_res: {self.core_res} nodes cannot pass the core's "
                f"{self.core_depth} 2x downsamplings; use a multiple of {step} that is >= "
                f"{2 * step} or lower model.core_depth"
            )

    def channels(self) -> list[int]:
        """c_s = max(1, round(width * growth^s)) for levels s = 0 .. depth."""
        return [max(1, round(self.width * self.growth**s)) for s in range(self.depth + 1)]


def _require_int(value: object, key: str, least: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < least:
        raise PdedsError(f"{key}: {value!r} is not an integer >= {least}; set it to one")


def _require_choice(value: object, key: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise PdedsError(f"{key}: {value!r} is not one of {', '.join(choices)}; pick one of them")
