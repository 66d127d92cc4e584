"""How L-BFGS evaluates the global batch through the DeepSpeed engine: the engine set-ups it can
evaluate exactly, and the loss and reduced gradient at the optimizer's current point (under
ZeRO 1/2 through ZeRO's own partition step, so the gradient is the one a real step would see)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import torch

from pdeds.errors import PdedsError

if TYPE_CHECKING:
    from pdeds.optim.lbfgs import LBFGS

ZERO_STAGES = (0, 1, 2)
"""ZeRO stages L-BFGS runs under (see ``pdeds.optim.lbfgs``)."""


def check_engine(engine: Any, n_micro: int) -> None:
    """Refuse engine set-ups L-BFGS cannot evaluate exactly (named in the message)."""
    stage = engine.zero_optimization_stage()
    if stage not in ZERO_STAGES:
        raise PdedsError(
            f"L-BFGS runs under ZeRO stages {ZERO_STAGES}, not {stage}; set zero_optimization.stage"
        )
    if engine.gradient_clipping() > 0:
        raise PdedsError(
            "L-BFGS needs exact gradients; remove gradient_clipping from the DeepSpeed config"
        )
    if engine.fp16_enabled() or engine.bfloat16_enabled():
        raise PdedsError("L-BFGS needs fp32 evaluations; disable fp16/bf16 in the DeepSpeed config")
    if n_micro != engine.gradient_accumulation_steps():
        raise PdedsError(
            f"engine_step got {n_micro} micro-batches but gradient_accumulation_steps is "
            f"{engine.gradient_accumulation_steps()}; pass one global batch"
        )


def null_loss(engine: Any) -> torch.Tensor:
    """0 as a function of every trainable parameter (a backward of it costs no network pass)."""
    params = [p for p in engine.module.parameters() if p.requires_grad]
    return torch.stack([(p * 0).sum() for p in params]).sum()


class EngineEvaluator:
    """Loss and reduced gradient of the global batch at the optimizer's current parameters."""

    def __init__(
        self,
        opt: LBFGS,
        engine: Any,
        micro_batches: Sequence[Any],
        loss_fn: Callable,
        batch_key: Any = None,
    ) -> None:
        self.opt = opt
        self.engine = engine
        self.micro_batches = micro_batches
        self.loss_fn = loss_fn
        self.batch_key = batch_key

    def __call__(self) -> tuple[float, torch.Tensor]:
        from pdeds.optim import global_mean

        engine, opt = self.engine, self.opt
        zero = engine.optimizer if opt.partitioned else None
        if zero is not None:
            zero.update_lp_params()
            zero.zero_grad()
        else:
            engine.zero_grad()
        total = torch.zeros((), dtype=torch.float64)
        last = len(self.micro_batches) - 1
        try:
            with torch.enable_grad():
                for j, mb in enumerate(self.micro_batches):
                    engine.set_gradient_accumulation_boundary(j == last)
                    loss = self.loss_fn(mb)
                    engine.backward(loss)
                    total += loss.detach().double().cpu()
        finally:
            engine.set_gradient_accumulation_boundary(None)
        if zero is not None:
            self._capture_partition_gradient(zero)
        return global_mean(total, len(self.micro_batches)), opt._flat_grad()

    def _capture_partition_gradient(self, zero: Any) -> None:
        """Let ZeRO form the reduced fp32 partition gradient exactly as in a real step.

        ZeRO's ``step()`` flattens the reduced gradients of this rank's partition into the fp32
        partition's ``.grad`` and calls the client optimizer, which here only copies it. The
        parameters do not move, so ZeRO's following copy and all-gather leave the model as is.
        """
        from deepspeed.utils.timer import NoopTimer

        opt = self.opt
        timers, zero.timers = zero.timers, NoopTimer()  # ZeRO's own timers are mid-step here
        opt._capturing = True
        try:
            zero.step()
        finally:
            opt._capturing = False
            zero.timers = timers
        assert opt._captured is not None
        for p, g in zip(opt._params(), opt._captured, strict=True):
            if p.grad is not None and p.grad.shape == g.shape:
                p.grad.copy_(g)  # ZeRO-Offload keeps a persistent (pinned) gradient buffer
            else:
                p.grad = g
        opt._captured = None
