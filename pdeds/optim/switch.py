"""First-order, then second-order: ``optim.switch_after`` (issue 13).

    optim: {name: lbfgs, lr: 1.0, switch_after: 500, first: adam, first_lr: 1.0e-3}

trains with ``first`` (adam | adamw | sgd, at ``first_lr``) for the first ``switch_after``
optimizer steps, then with ``name`` (lbfgs | gauss_newton, at ``lr``): the combination reported
best for physics-informed losses (Adam to the basin, then a quasi-Newton or Gauss-Newton
method; the authors' public code switches with a training callback). ``Switched`` is one client
optimizer holding both, so DeepSpeed sees one optimizer, one LR scheduler and one state dict:
the steps done and both optimizers' states are checkpointed together and a run resumes exactly
on either side of the switch.

Learning rate. The LR scheduler sets this optimizer's lr(s) = lr x factor(s); the first phase
runs at first_lr x factor(s), the second at lr x factor(s) (L-BFGS refuses schedules, so its
factor is 1). The trainer logs the scheduler's lr, i.e. lr x factor(s) in both phases.

Limits: ZeRO 0 only (ZeRO 1/2 rebind the client optimizer's parameters to flat partitions, which
this wrapper would have to hand to two optimizers of different kinds), and L-BFGS draws a new
batch every step (``optim.lbfgs.hold_steps: 1``): the stream position of a step is one formula
per visit and cannot change its hold mid-visit.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from pdeds.errors import PdedsError

SECOND = ("lbfgs", "gauss_newton")
"""Optimizers that may follow a first-order phase."""


def validate(cfg: Any, first_order: Sequence[str]) -> None:
    """Raise PdedsError naming the first bad switch key of the ``optim`` section ``cfg``."""
    n = cfg.switch_after
    if not isinstance(n, int) or isinstance(n, bool) or n < 0:
        raise PdedsError(f"optim.switch_after: {n!r} must be an integer >= 0 (0: no switch)")
    if n == 0:
        return
    if cfg.name not in SECOND:
        raise PdedsError(
            f"optim.switch_after: switches to a second-order optimizer, not {cfg.name!r}; set "
            f"optim.name to one of {', '.join(SECOND)} or switch_after: 0"
        )
    if cfg.first not in first_order:
        raise PdedsError(
            f"optim.first: {cfg.first!r} is not one of {', '.join(first_order)} (the optimizer "
            "of the first optim.switch_after steps)"
        )
    if not cfg.first_lr > 0:
        raise PdedsError(f"optim.first_lr: {cfg.first_lr} must be > 0")
    if cfg.name == "lbfgs" and cfg.lbfgs.hold_steps != 1:
        raise PdedsError(
            f"optim.lbfgs.hold_steps: {cfg.lbfgs.hold_steps}; with optim.switch_after every step "
            "draws a new batch; set optim.lbfgs.hold_steps: 1"
        )


def check_stage(cfg: Any, stage: int) -> None:
    """Refuse ZeRO stages the switch cannot run under (one line)."""
    if cfg.switch_after and stage != 0:
        raise PdedsError(
            f"optim.switch_after runs under ZeRO stage 0 only, not {stage}; set "
            "zero_optimization.stage 0 or optim.switch_after: 0"
        )


class Switched(torch.optim.Optimizer):
    """``first`` for ``switch_after`` steps, then ``second``, as one client optimizer.

    Args:
        params: the model's trainable parameters (those of both optimizers).
        first, second: the two optimizers, built on ``params``.
        switch_after: steps of the first phase.
        lr: the second phase's lr (this optimizer's lr, which the LR scheduler scales).
        first_lr: the first phase's lr at factor 1.
    """

    def __init__(
        self,
        params: list[torch.Tensor],
        *,
        first: torch.optim.Optimizer,
        second: torch.optim.Optimizer,
        switch_after: int,
        lr: float,
        first_lr: float,
    ) -> None:
        super().__init__(params, dict(lr=lr))
        self.first, self.second = first, second
        self.switch_after = switch_after
        self.base_lr, self.first_lr = lr, first_lr
        self.steps_done = 0
        self._last: torch.optim.Optimizer = first

    @property
    def active(self) -> torch.optim.Optimizer:
        """The optimizer of the next step."""
        return self.first if self.steps_done < self.switch_after else self.second

    @property
    def needs_closure(self) -> bool:  # type: ignore[override]
        """The next step goes through ``engine_step`` (second phase of L-BFGS / Gauss-Newton)."""
        return bool(getattr(self.active, "needs_closure", False))

    @property
    def evaluations_last_step(self) -> int:
        return int(getattr(self._last, "evaluations_last_step", 1))

    def _sync_lr(self) -> None:
        lr = float(self.param_groups[0]["lr"])
        scale = self.first_lr / self.base_lr if self.active is self.first else 1.0
        for group in self.active.param_groups:
            group["lr"] = lr * scale

    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        """One step of the active optimizer."""
        self._sync_lr()
        opt = self.active
        out = opt.step(closure) if closure is not None else opt.step()
        self._last = opt
        self.steps_done += 1
        return out

    def engine_step(self, engine: Any, micro_batches: Sequence[Any], loss_fn: Callable) -> float:
        """The second phase's ``engine_step`` (its engine.step() comes back to ``step``)."""
        return float(self.second.engine_step(engine, micro_batches, loss_fn))  # type: ignore[attr-defined]

    def reset_state(self) -> None:
        """Forget both optimizers' state (``schedule.optimizer_state: reset``); not the phase."""
        for opt in (self.first, self.second):
            if hasattr(opt, "reset_state"):
                opt.reset_state()
            else:
                opt.state.clear()

    def state_dict(self) -> dict[str, Any]:
        sd = super().state_dict()
        sd["switch"] = {
            "steps_done": self.steps_done,
            "first": self.first.state_dict(),
            "second": self.second.state_dict(),
        }
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        sd = dict(state_dict)
        switch = sd.pop("switch")
        super().load_state_dict(sd)
        self.steps_done = int(switch["steps_done"])
        self.first.load_state_dict(switch["first"])
        self.second.load_state_dict(switch["second"])
        self._last = self.second if self.steps_done > self.switch_after else self.first


def build_switched(
    model: torch.nn.Module,
    cfg: Any,
    build_first: Callable[[Any], torch.optim.Optimizer],
    build_second: Callable[[Any], torch.optim.Optimizer],
) -> Switched:
    """The ``Switched`` optimizer of the ``optim`` section ``cfg``: ``build_first(c)`` /
    ``build_second(c)`` build an optimizer for a copy ``c`` of ``cfg`` naming one phase."""
    import dataclasses

    first_cfg = dataclasses.replace(cfg, name=cfg.first, lr=cfg.first_lr, switch_after=0)
    second_cfg = dataclasses.replace(cfg, switch_after=0)
    return Switched(
        [p for p in model.parameters() if p.requires_grad],
        first=build_first(first_cfg),
        second=build_second(second_cfg),
        switch_after=cfg.switch_after,
        lr=cfg.lr,
        first_lr=cfg.first_lr,
    )
