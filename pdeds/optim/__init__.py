"""Client optimizers for the DeepSpeed engine: Adam/AdamW/SGD, distributed L-BFGS, K-FAC.

One concept per module:

- ``config``: the ``optim:`` section (``OptimConfig``, ``KFACConfig``) and its validation;
- ``factory``: the optimizer table (one line per optimizer) and ``build_optimizer``;
- ``compat``: what runs under which ZeRO stage / offload / precision, ``prepare_ds_config``;
- ``protocol``: the one-step protocol the trainer follows (``engine_step``);
- ``first_order``, ``lbfgs`` (+ ``line_search``), ``kfac`` (+ ``kfac_layers``,
  ``kfac_distributed``): the optimizers.
"""

from __future__ import annotations

from pdeds.optim.compat import prepare_ds_config
from pdeds.optim.config import KFACConfig, OptimConfig
from pdeds.optim.factory import OPTIMIZERS, build_optimizer
from pdeds.optim.gauss_newton import GaussNewtonConfig
from pdeds.optim.lbfgs import LBFGSConfig
from pdeds.optim.protocol import (
    client_optimizer,
    engine_step,
    global_mean,
    needs_engine_step,
    reset_state,
    standard_step,
)

__all__ = [
    "OPTIMIZERS",
    "GaussNewtonConfig",
    "KFACConfig",
    "LBFGSConfig",
    "OptimConfig",
    "build_optimizer",
    "client_optimizer",
    "engine_step",
    "global_mean",
    "needs_engine_step",
    "prepare_ds_config",
    "reset_state",
    "standard_step",
]
