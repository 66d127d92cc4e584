"""First-order client optimizers: Adam, AdamW, SGD with momentum.

These run under the standard DeepSpeed loop (``engine.backward`` per micro-batch, one
``engine.step``). With ZeRO-Offload on a CUDA accelerator Adam/AdamW is DeepSpeed's
``DeepSpeedCPUAdam`` (vectorised host kernel); everywhere else, torch's own implementation:
on the CPU accelerator DeepSpeedCPUAdam would JIT-build a C++ op (~50 s) for no gain, so
``prepare_ds_config`` sets ``zero_force_ds_cpu_optimizer: false`` there.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from pdeds import dsconfig

FIRST_ORDER = ("adam", "adamw", "sgd")


def accelerator_name() -> str:
    """DeepSpeed's accelerator ("cpu", "cuda", ...)."""
    from deepspeed.accelerator import get_accelerator

    return get_accelerator().device_name()


def uses_ds_cpu_adam(name: str, view: dsconfig.DeepSpeedView) -> bool:
    """True when ``build_optimizer`` returns DeepSpeedCPUAdam (Adam/AdamW, CPU offload, CUDA)."""
    return (
        name in ("adam", "adamw")
        and view.offload_optimizer == "cpu"
        and accelerator_name() != "cpu"
    )


def build_first_order(model: nn.Module, cfg: Any, ds: dict) -> torch.optim.Optimizer:
    """Adam / AdamW / SGD over the model's trainable parameters.

    Args:
        model: the network; only parameters with ``requires_grad`` are optimised.
        cfg: the validated ``OptimConfig`` (``name`` in FIRST_ORDER).
        ds: the DeepSpeed config that will be passed to ``deepspeed.initialize``.

    Returns:
        The client optimizer for ``deepspeed.initialize(optimizer=...)``.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    return first_order(cfg.name, params, cfg, uses_ds_cpu_adam(cfg.name, dsconfig.read(ds)))


def first_order(
    name: str, params: Iterable[torch.Tensor], cfg: Any, cpu_adam: bool = False
) -> torch.optim.Optimizer:
    """Torch's Adam / AdamW / SGD (``name``) over ``params`` with the hyperparameters of ``cfg``
    (an ``OptimConfig``); DeepSpeedCPUAdam for Adam/AdamW when ``cpu_adam``."""
    params = list(params)
    if name == "sgd":
        return torch.optim.SGD(
            params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay
        )
    betas = (float(cfg.betas[0]), float(cfg.betas[1]))
    if cpu_adam:
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(
            params,
            lr=cfg.lr,
            betas=betas,
            eps=cfg.eps,
            weight_decay=cfg.weight_decay,
            adamw_mode=name == "adamw",
        )
    kind = torch.optim.AdamW if name == "adamw" else torch.optim.Adam
    return kind(params, lr=cfg.lr, betas=betas, eps=cfg.eps, weight_decay=cfg.weight_decay)
