"""The networks: the full-multigrid network (default), the U-Net, their normalisation layers.

``build_model(dim, cfg)`` builds the network the ``model`` section names (``cfg.arch``);
``resolution_problem(cfg, n)`` says why it cannot run at n nodes per axis (None if it can).
"""

from __future__ import annotations

from torch import nn

from pdeds.models.config import ACTIVATIONS, ARCHS, ModelConfig
from pdeds.models.fmg import FMGNet, fmg_resolution_problem
from pdeds.models.norms import NORM_KINDS, SyncBatchNorm, make_norm
from pdeds.models.unet import (
    UNet,
    UNetConfig,
    allowed_resolutions,
    count_parameters,
    unet_resolution_problem,
)

__all__ = [
    "ACTIVATIONS",
    "ARCHS",
    "NORM_KINDS",
    "FMGNet",
    "ModelConfig",
    "SyncBatchNorm",
    "UNet",
    "UNetConfig",
    "allowed_resolutions",
    "build_model",
    "count_parameters",
    "make_norm",
    "resolution_problem",
]


def build_model(dim: int, cfg: ModelConfig) -> nn.Module:
    """The ``dim``-D network described by ``cfg`` (validated): FMGNet or UNet by ``cfg.arch``."""
    cfg.validate()
    return FMGNet(dim, cfg) if cfg.arch == "fmg" else UNet(dim, cfg)


def resolution_problem(cfg: ModelConfig, n: int) -> str | None:
    """Why the network of ``cfg`` cannot run at n nodes per axis, or None."""
    if cfg.arch == "fmg":
        return fmg_resolution_problem(cfg.core_res, n)
    return unet_resolution_problem(cfg.depth, n)
