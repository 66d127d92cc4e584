"""Process-group and DeepSpeed-engine set-up, the same under no launcher, deepspeed, torchrun.

Without a launcher (no RANK in the environment) a 1-rank world is set up on 127.0.0.1 with a
free port. The backend is gloo on CPU and nccl on CUDA. Before the first
``deepspeed.initialize`` the unused shm-comm op build is skipped (see ``pdeds.dsutil``).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from pdeds import distributed
from pdeds.config import ExperimentConfig
from pdeds.dsutil import skip_shm_comm_build
from pdeds.optim import build_optimizer, prepare_ds_config


def device() -> torch.device:
    """cuda:LOCAL_RANK when CUDA is available, else cpu."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def init_distributed() -> tuple[int, int]:
    """Join (or create) the process group; returns (rank, world size)."""
    if "RANK" not in os.environ:
        from pdeds.machine import free_port

        os.environ.update(
            RANK="0",
            LOCAL_RANK="0",
            WORLD_SIZE="1",
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=os.environ.get("MASTER_PORT", str(free_port())),
        )
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        os.environ.setdefault("LOCAL_SIZE", os.environ.get("LOCAL_WORLD_SIZE", "1"))
    import deepspeed

    if not torch.distributed.is_initialized():
        skip_shm_comm_build()
        deepspeed.init_distributed(
            dist_backend="nccl" if torch.cuda.is_available() else "gloo",
            verbose=False,
        )
    if torch.cuda.is_available():
        torch.cuda.set_device(device())
    return distributed.rank(), distributed.world_size()


def build_engine(
    model: nn.Module,
    cfg: ExperimentConfig,
    ds: dict[str, Any],
    *,
    lr_scheduler: Callable[[torch.optim.Optimizer], Any] | None = None,
) -> tuple[Any, dict]:
    """deepspeed.initialize with the experiment's client optimizer and, if given, the LR
    scheduler ``lr_scheduler(optimizer)`` on it; returns (engine, DeepSpeed config used)."""
    import deepspeed

    skip_shm_comm_build()
    ds = prepare_ds_config(cfg.optim, ds)
    ds.setdefault("steps_per_print", 1 << 30)
    optimizer = build_optimizer(model, cfg.optim, ds)
    sched = lr_scheduler(optimizer) if lr_scheduler is not None else None
    engine, _, _, _ = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=sched, config=ds
    )
    return engine, ds
