"""Which optimizer runs under which DeepSpeed settings, and the DeepSpeed JSON patched for it.

The experiment's ``optim:`` section (``OptimConfig``) is the single source of the optimizer: a
DeepSpeed config with its own ``"optimizer"`` block is refused. What runs where (the table is
``pdeds.optim.factory.OPTIMIZERS``; fp32 unless noted):

    optimizer          ZeRO stages   offload_optimizer   fp16/bf16   step
    adam/adamw/sgd     0 1 2 3       yes                 yes         standard loop
    lbfgs              0 1 2         yes (ZeRO 1/2)      no          engine_step (line search)
    kfac               0 1 2         no                  no          standard loop (hooks)

L-BFGS under ZeRO 3 is refused (the parameters themselves are partitioned and gathered inside
forward, so a trial point cannot be written back with ZeRO 1/2's copy + all-gather). K-FAC
preconditions each rank's local gradient of a whole layer inside backward, before DeepSpeed's
gradient hooks reduce (ZeRO 0-2) or partition (ZeRO 1/2) it; under ZeRO 3 the weights
themselves are partitioned and gathered per layer, and K-FAC with ``precondition: step`` needs
the model's own gradients in ``step()`` (ZeRO 0). Both refuse fp16/bf16 (noisy evaluations,
and the mixed-precision wrappers hand the client master copies K-FAC's hooks do not see) and
offload (K-FAC: the host optimizer never sees a layer whole), and L-BFGS refuses
``gradient_clipping`` (the line search needs the true gradient). For L-BFGS and K-FAC
``gradient_clipping`` defaults to 0 here: DeepSpeed's own default is 1.0.
"""

from __future__ import annotations

import copy

from pdeds import dsconfig
from pdeds.errors import PdedsError
from pdeds.optim.config import OptimConfig
from pdeds.optim.factory import OPTIMIZERS
from pdeds.optim.first_order import uses_ds_cpu_adam
from pdeds.optim.switch import check_stage


def prepare_ds_config(cfg: OptimConfig, ds: dict) -> dict:
    """A copy of the DeepSpeed config ``ds`` patched for the client optimizer ``cfg``.

    Sets ``zero_allow_untested_optimizer`` (DeepSpeed asserts on any client optimizer under
    ZeRO otherwise); with ``offload_optimizer: cpu``, ``zero_force_ds_cpu_optimizer: false``
    unless the optimizer is DeepSpeedCPUAdam (Adam/AdamW on a CUDA accelerator): on the CPU
    accelerator torch's Adam spares a JIT-built op (~50 s), and SGD / L-BFGS are no CPU-Adam;
    for L-BFGS and K-FAC ``gradient_clipping: 0`` unless given (DeepSpeed's default is 1.0).

    Raises:
        PdedsError: the DeepSpeed config has an ``optimizer`` block, its ZeRO stage / offload
            is one the chosen optimizer does not support, or it clips gradients for L-BFGS.
    """
    cfg.validate()
    view = dsconfig.read(ds)
    check_support(cfg, view)
    out = copy.deepcopy(ds)
    out["zero_allow_untested_optimizer"] = True
    if OPTIMIZERS[cfg.name].second_order:
        # DeepSpeed's default is 1.0; second-order steps are bounded by the line search / KL-clip.
        out.setdefault("gradient_clipping", 0.0)
    if view.offload_optimizer == "cpu" and not uses_ds_cpu_adam(cfg.name, view):
        out["zero_force_ds_cpu_optimizer"] = False
    return out


def check_support(cfg: OptimConfig, view: dsconfig.DeepSpeedView) -> None:
    """Raise PdedsError if the optimizer ``cfg`` does not run under the DeepSpeed settings."""
    if view.optimizer is not None:
        raise PdedsError(
            "the DeepSpeed config has an 'optimizer' block; remove it: the experiment's optim "
            "section is the single source of the optimizer"
        )
    check_stage(cfg, view.stage)
    entry = OPTIMIZERS[cfg.name]
    stages, other = entry.zero_stages, "another optimizer"
    if cfg.name == "kfac" and cfg.kfac.precondition == "step":
        stages, other = (0,), "optim.kfac.precondition: backward"
    if view.stage not in stages:
        ok = ", ".join(str(s) for s in stages)
        raise PdedsError(
            f"optim.name {cfg.name!r} does not run under ZeRO stage {view.stage}; "
            f"use zero_optimization.stage in ({ok}) or {other}"
        )
    if view.offloads and not entry.offload:
        ok = ", ".join(name for name, e in OPTIMIZERS.items() if e.offload)
        raise PdedsError(
            f"optim.name {cfg.name!r} does not support zero_optimization.{view.offloads[0]}; "
            f"remove the offload or use one of {ok}"
        )
    if view.half and not entry.half:
        raise PdedsError(
            f"optim.name {cfg.name!r} needs fp32 parameters and gradients; "
            f"set {view.dtype}.enabled false in the DeepSpeed config"
        )
    if entry.exact_gradient and view.clipping_given and view.gradient_clipping > 0:
        raise PdedsError(
            f"gradient_clipping: {view.gradient_clipping} changes the gradient {cfg.name}'s step "
            f"relies on; remove it from the DeepSpeed config for optim.name {cfg.name!r}"
        )
