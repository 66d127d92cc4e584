"""The optimizer table and ``build_optimizer``: one line per optimizer says how it is built and
what DeepSpeed settings it runs under (``pdeds.optim.compat`` enforces the latter).

The trainer does

    ds = prepare_ds_config(cfg.optim, ds)           # patched copy of the DeepSpeed JSON dict
    opt = build_optimizer(model, cfg.optim, ds)     # a torch.optim.Optimizer
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=ds, ...)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from pdeds.optim import gauss_newton, lbfgs, lbfgs_engine
from pdeds.optim.first_order import build_first_order
from pdeds.optim.kfac import build_kfac
from pdeds.optim.switch import build_switched

if TYPE_CHECKING:
    from pdeds.optim.config import OptimConfig

Builder = Callable[[nn.Module, Any, dict], torch.optim.Optimizer]


@dataclass(frozen=True)
class Registration:
    """How an optimizer is built and what it runs under."""

    build: Builder
    """``build(model, optim_config, ds_config) -> torch.optim.Optimizer``."""
    zero_stages: tuple[int, ...]
    """ZeRO stages it runs under (the optimizer modules say why)."""
    offload: bool
    """Runs with ``zero_optimization.offload_optimizer`` / ``offload_param``."""
    half: bool
    """Runs with fp16/bf16 parameters and gradients."""
    second_order: bool = False
    """Its steps are bounded by a line search or trust region: ``gradient_clipping`` defaults
    to 0 (DeepSpeed's default is 1.0)."""
    exact_gradient: bool = False
    """Needs the true gradient: ``gradient_clipping`` is refused."""


def _lbfgs(model: nn.Module, cfg: Any, ds: dict) -> torch.optim.Optimizer:
    return lbfgs.build_lbfgs(model, cfg)


def _gauss_newton(model: nn.Module, cfg: Any, ds: dict) -> torch.optim.Optimizer:
    return gauss_newton.build_gauss_newton(model, cfg)


OPTIMIZERS: dict[str, Registration] = {
    "adam": Registration(build_first_order, (0, 1, 2, 3), offload=True, half=True),
    "adamw": Registration(build_first_order, (0, 1, 2, 3), offload=True, half=True),
    "sgd": Registration(build_first_order, (0, 1, 2, 3), offload=True, half=True),
    "lbfgs": Registration(
        _lbfgs,
        lbfgs_engine.ZERO_STAGES,
        offload=True,
        half=False,
        second_order=True,
        exact_gradient=True,
    ),
    "kfac": Registration(build_kfac, (0, 1, 2), offload=False, half=False, second_order=True),
    "gauss_newton": Registration(
        _gauss_newton, (0,), offload=False, half=False, second_order=True, exact_gradient=True
    ),
}
"""Every optimizer ``optim.name`` may name."""


def build_optimizer(model: nn.Module, cfg: OptimConfig, ds: dict) -> torch.optim.Optimizer:
    """The client optimizer for ``deepspeed.initialize(optimizer=...)``.

    Args:
        model: the network (K-FAC registers its factor hooks on its layers).
        cfg: the ``optim`` section.
        ds: the DeepSpeed config as returned by ``prepare_ds_config``.
    """
    cfg.validate()
    if cfg.switch_after:  # a first-order phase, then cfg.name (pdeds.optim.switch)
        return build_switched(
            model,
            cfg,
            lambda c: build_first_order(model, c, ds),
            lambda c: OPTIMIZERS[c.name].build(model, c, ds),
        )
    return OPTIMIZERS[cfg.name].build(model, cfg, ds)
