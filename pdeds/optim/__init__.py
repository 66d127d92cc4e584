"""Client optimizers for the DeepSpeed engine and the one-step protocol the trainer follows.

The experiment's ``optim:`` section (``OptimConfig``) is the single source of the optimizer: a
DeepSpeed config with its own ``"optimizer"`` block is refused. The trainer does

    ds = prepare_ds_config(cfg.optim, ds)           # patched copy of the DeepSpeed JSON dict
    opt = build_optimizer(model, cfg.optim, ds)     # a torch.optim.Optimizer
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=ds, ...)

Step protocol. One optimizer step consumes this rank's micro-batches of one global batch and a
``loss_fn(micro_batch) -> Tensor``: the scalar loss of that micro-batch (its mean energy),
computed through ``engine(...)``. DeepSpeed divides by the gradient-accumulation steps and
averages over ranks, so the accumulated gradient is that of the global-batch mean loss

    L(theta) = 1 / (W * M) * sum_{ranks r} sum_{micro-batches m} loss_fn(mb_{r,m}).

- First-order optimizers (``needs_engine_step(opt)`` is False): the standard DeepSpeed loop,
  ``for mb in micro_batches: engine.backward(loss_fn(mb)); engine.step()``.
- L-BFGS (and any optimizer with ``needs_closure = True``) evaluates L and its gradient several
  times per step (line search). ``engine_step(engine, micro_batches, loss_fn)`` performs one
  whole optimizer step: every evaluation is a forward+backward of all micro-batches through the
  engine, and DeepSpeed counts exactly one global step (LR scheduler and monitor advance once).

``engine_step`` works for every optimizer (for first-order ones it is the standard loop), and
returns L at the start of the step, all-reduced, hence identical on every rank. It needs exactly
``gradient_accumulation_steps`` micro-batches (one global batch).

What runs where (checked by ``prepare_ds_config``; fp32 unless noted):

    optimizer          ZeRO stages   offload_optimizer   fp16/bf16   step
    adam/adamw/sgd     0 1 2 3       yes                 yes         standard loop
    lbfgs              0 1 2         yes (ZeRO 1/2)      no          engine_step (line search)
    kfac               0             no                  no          standard loop (hooks)
    gauss_newton       0             no                  no          engine_step (CG + LM)
    switch_after > 0   0             no                  no          first-order, then the above

L-BFGS under ZeRO 3 is refused (the parameters themselves are partitioned and gathered inside
forward, so a trial point cannot be written back with ZeRO 1/2's copy + all-gather); K-FAC under
ZeRO >= 1 is refused (its step needs each layer's whole gradient matrix, ZeRO 1/2 hand the
client a flat slice of it); both refuse fp16/bf16 (noisy evaluations, and the mixed-precision
wrappers hand the client master copies K-FAC's hooks do not see) and L-BFGS refuses
``gradient_clipping`` (the line search needs the true gradient). For L-BFGS and K-FAC
``gradient_clipping`` defaults to 0 here: DeepSpeed's own default is 1.0.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from pdeds import distributed
from pdeds.errors import PdedsError
from pdeds.optim.first_order import (
    FIRST_ORDER,
    build_first_order,
    offload_optimizer_device,
    uses_ds_cpu_adam,
)
from pdeds.optim.gauss_newton import GaussNewtonConfig, build_gauss_newton
from pdeds.optim.gauss_newton import validate as _validate_gauss_newton
from pdeds.optim.kfac import INNER_OPTIMIZERS, KFACConfig, build_kfac
from pdeds.optim.lbfgs import LINE_SEARCHES, LBFGSConfig, build_lbfgs
from pdeds.optim.switch import build_switched, check_stage
from pdeds.optim.switch import validate as _validate_switch

__all__ = [
    "GaussNewtonConfig",
    "KFACConfig",
    "LBFGSConfig",
    "OptimConfig",
    "build_optimizer",
    "engine_step",
    "needs_engine_step",
    "prepare_ds_config",
]

NAMES = (*FIRST_ORDER, "lbfgs", "kfac", "gauss_newton")

ZERO_STAGES: dict[str, tuple[int, ...]] = {
    "adam": (0, 1, 2, 3),
    "adamw": (0, 1, 2, 3),
    "sgd": (0, 1, 2, 3),
    "lbfgs": (0, 1, 2),
    "kfac": (0,),
    "gauss_newton": (0,),
}
"""ZeRO stages each optimizer runs under (see the optimizer modules for why)."""

SECOND_ORDER = ("lbfgs", "kfac", "gauss_newton")

OFFLOAD_OK = ("adam", "adamw", "sgd", "lbfgs")
"""Optimizers that run with ``zero_optimization.offload_optimizer`` / ``offload_param`` (within
their ZeRO stages: K-FAC runs under ZeRO 0 only, where DeepSpeed offloads nothing)."""


@dataclass
class OptimConfig:
    """The experiment's ``optim:`` section."""

    name: str = "adam"
    """Optimizer: adam | adamw | sgd | lbfgs | kfac | gauss_newton."""
    lr: float = 1e-3
    """Learning rate. L-BFGS: the first trial step of each line search (use 1: the quasi-Newton
    step; the very first iteration tries lr * min(1, 1/|g|_1)). K-FAC: the inner update's rate."""
    weight_decay: float = 0.0
    """L2 penalty (Adam, SGD, K-FAC inner) or decoupled decay (AdamW); not used by L-BFGS."""
    betas: tuple[float, float] = (0.9, 0.999)
    """Adam moment decay rates (beta1, beta2)."""
    eps: float = 1e-8
    """Adam denominator guard."""
    momentum: float = 0.9
    """SGD heavy-ball momentum (also K-FAC's inner SGD)."""
    lbfgs: LBFGSConfig = field(default_factory=LBFGSConfig)
    """L-BFGS settings, used when name == "lbfgs"."""
    kfac: KFACConfig = field(default_factory=KFACConfig)
    """K-FAC settings, used when name == "kfac"."""
    gauss_newton: GaussNewtonConfig = field(default_factory=GaussNewtonConfig)
    """Gauss-Newton settings, used when name == "gauss_newton" (``pdeds.optim.gauss_newton``)."""
    switch_after: int = 0
    """Steps of a first-order phase (optimizer ``first`` at ``first_lr``) before ``name`` takes
    over (``pdeds.optim.switch``); 0 = no first phase."""
    first: str = "adam"
    """The first phase's optimizer: adam | adamw | sgd (with switch_after > 0)."""
    first_lr: float = 1e-3
    """The first phase's learning rate (``lr`` is the second phase's)."""

    def validate(self) -> None:
        """Raise PdedsError naming the first bad key and its fix."""
        if self.name not in NAMES:
            raise PdedsError(f"optim.name: {self.name!r} is not one of {', '.join(NAMES)}")
        _positive("optim.lr", self.lr)
        _at_least("optim.weight_decay", self.weight_decay, 0.0)
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise PdedsError(f"optim.betas: {self.betas!r} must be two numbers in [0, 1)")
        _positive("optim.eps", self.eps)
        if not 0.0 <= self.momentum < 1.0:
            raise PdedsError(f"optim.momentum: {self.momentum} must lie in [0, 1)")
        if self.name == "lbfgs" and self.weight_decay > 0:
            raise PdedsError(
                "optim.weight_decay is not used by L-BFGS; set it to 0 (optim.lbfgs.damping adds "
                "curvature instead)"
            )
        _validate_lbfgs(self.lbfgs)
        _validate_kfac(self.kfac)
        _validate_gauss_newton(self.gauss_newton)
        _validate_switch(self, FIRST_ORDER)


def _positive(key: str, value: float) -> None:
    if not value > 0:
        raise PdedsError(f"{key}: {value} must be > 0; set a positive number")


def _at_least(key: str, value: float, low: float) -> None:
    if not value >= low:
        raise PdedsError(f"{key}: {value} must be >= {low}")


def _integer_at_least(key: str, value: int, low: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise PdedsError(f"{key}: {value!r} must be an integer >= {low}")


def _validate_lbfgs(c: LBFGSConfig) -> None:
    _integer_at_least("optim.lbfgs.history_size", c.history_size, 1)
    _integer_at_least("optim.lbfgs.max_iter", c.max_iter, 1)
    _integer_at_least("optim.lbfgs.max_evals", c.max_evals, 2)
    _integer_at_least("optim.lbfgs.hold_steps", c.hold_steps, 0)
    if c.line_search not in LINE_SEARCHES:
        raise PdedsError(
            f"optim.lbfgs.line_search: {c.line_search!r} is not one of {', '.join(LINE_SEARCHES)}"
        )
    _at_least("optim.lbfgs.damping", c.damping, 0.0)
    if not 0.0 < c.wolfe_c1 < c.wolfe_c2 < 1.0:
        raise PdedsError(
            f"optim.lbfgs.wolfe_c1, wolfe_c2: {c.wolfe_c1}, {c.wolfe_c2} must satisfy "
            "0 < c1 < c2 < 1 (e.g. 1e-4 and 0.9)"
        )
    _at_least("optim.lbfgs.tolerance_grad", c.tolerance_grad, 0.0)
    _at_least("optim.lbfgs.tolerance_change", c.tolerance_change, 0.0)


def _validate_kfac(c: KFACConfig) -> None:
    _positive("optim.kfac.damping", c.damping)
    if not 0.0 <= c.factor_decay < 1.0:
        raise PdedsError(f"optim.kfac.factor_decay: {c.factor_decay} must lie in [0, 1)")
    _integer_at_least("optim.kfac.factor_update_steps", c.factor_update_steps, 1)
    _integer_at_least("optim.kfac.inv_update_steps", c.inv_update_steps, 1)
    _at_least("optim.kfac.kl_clip", c.kl_clip, 0.0)
    if c.inner not in INNER_OPTIMIZERS:
        raise PdedsError(
            f"optim.kfac.inner: {c.inner!r} is not one of {', '.join(INNER_OPTIMIZERS)}"
        )


def _zero_stage(ds: dict) -> int:
    return int((ds.get("zero_optimization") or {}).get("stage", 0) or 0)


def _offloads(ds: dict) -> list[str]:
    zero = ds.get("zero_optimization") or {}
    return [
        key
        for key in ("offload_optimizer", "offload_param")
        if str((zero.get(key) or {}).get("device", "none") or "none") != "none"
    ]


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
    if "optimizer" in ds:
        raise PdedsError(
            "the DeepSpeed config has an 'optimizer' block; remove it: the experiment's optim "
            "section is the single source of the optimizer"
        )
    stage = _zero_stage(ds)
    if stage not in ZERO_STAGES[cfg.name]:
        ok = ", ".join(str(s) for s in ZERO_STAGES[cfg.name])
        raise PdedsError(
            f"optim.name {cfg.name!r} does not run under ZeRO stage {stage}; "
            f"use zero_optimization.stage in ({ok}) or another optimizer"
        )
    check_stage(cfg, stage)
    offloads = _offloads(ds)
    if offloads and cfg.name not in OFFLOAD_OK:
        raise PdedsError(
            f"optim.name {cfg.name!r} does not support zero_optimization.{offloads[0]}; "
            f"remove the offload or use one of {', '.join(OFFLOAD_OK)}"
        )
    for half in ("fp16", "bf16"):
        if cfg.name in SECOND_ORDER and (ds.get(half) or {}).get("enabled", False):
            raise PdedsError(
                f"optim.name {cfg.name!r} needs fp32 parameters and gradients; "
                f"set {half}.enabled false in the DeepSpeed config"
            )
    clip = float(ds.get("gradient_clipping", 0.0) or 0.0)
    if cfg.name in ("lbfgs", "gauss_newton") and clip > 0:
        raise PdedsError(
            f"gradient_clipping: {clip} changes the gradient {cfg.name}'s step relies on; "
            f"remove it from the DeepSpeed config for optim.name {cfg.name!r}"
        )
    out = copy.deepcopy(ds)
    out["zero_allow_untested_optimizer"] = True
    if cfg.name in SECOND_ORDER:
        # DeepSpeed's default is 1.0; second-order steps are bounded by the line search / KL-clip.
        out.setdefault("gradient_clipping", 0.0)
    if offload_optimizer_device(ds) == "cpu" and not uses_ds_cpu_adam(cfg.name, ds):
        out["zero_force_ds_cpu_optimizer"] = False
    return out


def build_optimizer(model: nn.Module, cfg: OptimConfig, ds: dict) -> torch.optim.Optimizer:
    """The client optimizer for ``deepspeed.initialize(optimizer=...)``.

    Args:
        model: the network (K-FAC registers its factor hooks on its layers).
        cfg: the ``optim`` section.
        ds: the DeepSpeed config as returned by ``prepare_ds_config``.
    """
    cfg.validate()
    if cfg.switch_after:
        return build_switched(
            model,
            cfg,
            lambda c: build_first_order(model, c, ds),
            lambda c: build_optimizer(model, c, ds),
        )
    if cfg.name in FIRST_ORDER:
        return build_first_order(model, cfg, ds)
    if cfg.name == "lbfgs":
        return build_lbfgs(model, cfg)
    if cfg.name == "gauss_newton":
        return build_gauss_newton(model, cfg)
    return build_kfac(model, cfg)


def client_optimizer(optimizer: Any) -> Any:
    """The client optimizer behind an engine, a ZeRO wrapper, or the optimizer itself."""
    for attr in ("basic_optimizer", "optimizer"):
        inner = getattr(optimizer, attr, None)
        if isinstance(inner, torch.optim.Optimizer) and inner is not optimizer:
            return client_optimizer(inner)
    return optimizer


def needs_engine_step(optimizer: Any) -> bool:
    """True if ``optimizer`` (client, ZeRO wrapper or engine) must be stepped by ``engine_step``."""
    return bool(getattr(client_optimizer(optimizer), "needs_closure", False))


LossFn = Callable[[Any], torch.Tensor]


def engine_step(engine: Any, micro_batches: Sequence[Any], loss_fn: LossFn) -> float:
    """One optimizer step through ``engine``; returns the global-batch mean loss at its start.

    Args:
        engine: the ``deepspeed.DeepSpeedEngine``.
        micro_batches: this rank's micro-batches of the global batch (gradient-accumulation
            steps of them).
        loss_fn: scalar loss of one micro-batch, computed through ``engine(...)``.
    """
    opt = client_optimizer(engine)
    if needs_engine_step(opt):
        return float(opt.engine_step(engine, micro_batches, loss_fn))
    return standard_step(engine, micro_batches, loss_fn)


def standard_step(engine: Any, micro_batches: Sequence[Any], loss_fn: LossFn) -> float:
    """The plain DeepSpeed loop: backward per micro-batch, then one ``engine.step()``."""
    total = torch.zeros((), dtype=torch.float64)
    for mb in micro_batches:
        loss = loss_fn(mb)
        engine.backward(loss)
        engine.step()
        total += loss.detach().double().cpu()
    return global_mean(total, len(micro_batches))


def global_mean(local_sum: torch.Tensor, local_count: int) -> float:
    """Mean over ranks and micro-batches of per-micro-batch losses, given this rank's sum."""
    both = torch.stack([local_sum.double(), torch.tensor(float(local_count), dtype=torch.float64)])
    both = distributed.all_reduce_sum(both)
    return float(both[0] / both[1])
