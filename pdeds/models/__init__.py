"""The network: a fully convolutional U-Net and its normalisation layers."""

from __future__ import annotations

from pdeds.models.norms import NORM_KINDS, SyncBatchNorm, make_norm
from pdeds.models.unet import (
    ACTIVATIONS,
    UNet,
    UNetConfig,
    allowed_resolutions,
    build_model,
    count_parameters,
)

__all__ = [
    "ACTIVATIONS",
    "NORM_KINDS",
    "SyncBatchNorm",
    "UNet",
    "UNetConfig",
    "allowed_resolutions",
    "build_model",
    "count_parameters",
    "make_norm",
]
