"""The training step without DeepSpeed: ``train_step`` and ``Trainer.train_step`` on a fake engine,
checked against a full-batch computation of the same loss and SGD step."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch

from pdeds.config import resolve
from pdeds.models.unet import build_model
from pdeds.physics import fem, kl
from pdeds.train.data import SampleStream, TrainingSet
from pdeds.train.step import train_step

TINY2 = {
    "problem": {"dim": 2, "res": 16, "modes": 6},
    "data": {"train_samples": 10, "val_samples": 2},
    "model": {"depth": 2, "width": 4, "norm": "group", "groups": 2},
    "optim": {"name": "sgd", "lr": 1.0e-2, "momentum": 0.0},
    "train": {"steps": 6, "log_every": 1, "lr_schedule": "cosine", "warmup_steps": 2},
}


class FakeEngine:
    """DeepSpeed's training interface on a plain module: ``backward`` divides by the
    accumulation steps, ``step`` steps the optimizer and the LR scheduler after the last
    micro-batch of a global batch."""

    def __init__(self, model: torch.nn.Module, lr: float, accumulation: int = 1) -> None:
        self.module = model
        self.optimizer = torch.optim.SGD(model.parameters(), lr=lr)
        self.lr_scheduler = None
        self.accumulation, self.micro_batch, self.calls = accumulation, 1, 0

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.module(x)

    def backward(self, loss: torch.Tensor) -> None:
        (loss / self.accumulation).backward()

    def step(self) -> None:
        self.calls += 1
        if self.calls % self.accumulation == 0:
            self.optimizer.step()
            self.optimizer.zero_grad()
            if self.lr_scheduler is not None:
                self.lr_scheduler.step()

    def train(self) -> None:
        self.module.train()

    def eval(self) -> None:
        self.module.eval()

    def set_train_micro_batch_size(self, m: int) -> None:
        self.micro_batch = m

    def set_train_batch_size(self, b: int) -> None:
        self.accumulation = b // self.micro_batch


def full_batch_loss(model: torch.nn.Module, coeffs: np.ndarray, res: int, weighting: str):
    """mean_b J_h(U_b) [/ |J_h(g_b)|] of the whole batch in one forward (the independent truth)."""
    nu = kl.diffusivity(torch.from_numpy(coeffs), res, dim=2).float()
    j = fem.energy(model(nu).float(), nu, 0.0)
    if weighting == "lifting":
        j = j / fem.energy(fem.apply_dirichlet(torch.zeros_like(nu)), nu, 0.0).abs()
    return j.mean()


def _check_sgd_step(after: torch.nn.Module, before: torch.nn.Module, loss, lr: float) -> None:
    """after - before = -lr grad L, to float32 round-off of the update (summation order of
    micro-batches against one batch)."""
    grads = torch.autograd.grad(loss, list(before.parameters()))
    scale = max(float(g.abs().max()) for g in grads) * lr
    for p, q, g in zip(after.parameters(), before.parameters(), grads):
        torch.testing.assert_close(p - q, -lr * g, rtol=1e-3, atol=1e-4 * scale)


@pytest.mark.parametrize("weighting", ["none", "lifting"])
def test_train_step_is_one_step_on_the_global_batch_mean(weighting):
    cfg = resolve(TINY2).cfg
    torch.manual_seed(0)
    model = build_model(2, cfg.model)
    before = copy.deepcopy(model)
    coeffs = kl.sample_coefficients(8, 6, seed=1)
    data = TrainingSet(coeffs, 2, 0.5, "diagonal", torch.device("cpu"))
    micro = [np.array([0, 3]), np.array([5, 6])]  # two accumulation steps of one global batch
    engine = FakeEngine(model, lr=1e-2, accumulation=2)
    loss = train_step(engine, data, micro, res=16, f=0.0, weighting=weighting)
    truth = full_batch_loss(before, coeffs[[0, 3, 5, 6]], 16, weighting)
    assert loss == pytest.approx(truth.item(), rel=1e-6)
    _check_sgd_step(model, before, truth, 1e-2)


def test_trainer_step_follows_stream_schedule_and_clock(tmp_path):
    from pdeds.train.lr import build_scheduler
    from pdeds.train.trainer import Trainer, preflight

    res = resolve(TINY2)
    setup = preflight(res, tmp_path / "run", 1)
    (tmp_path / "run").mkdir()
    g, _, _ = setup.batch
    torch.manual_seed(0)
    engine = FakeEngine(build_model(2, res.cfg.model), lr=res.cfg.optim.lr)
    engine.lr_scheduler = build_scheduler(res.cfg.train, setup.visits, res.ds, engine.optimizer)
    ticks = iter(range(0, 10_000, 2))
    trainer = Trainer(setup, engine=engine, now=lambda: float(next(ticks)))  # 2 s per reading
    stream = SampleStream(10, res.cfg.data.seed)
    try:
        for step in range(3):
            before = copy.deepcopy(engine.module)
            stats = trainer.train_step(step)
            ids = stream.indices(step * g, g)  # crosses the epoch boundary at step 2
            truth = full_batch_loss(before, trainer.data.coeffs[ids], 16, "none")
            assert stats.loss == pytest.approx(truth.item(), rel=1e-6)
            _check_sgd_step(engine.module, before, truth, stats.lr)
            cosine = 0.5 * (1 + math.cos(math.pi * step / 6))
            assert stats.lr == pytest.approx(1e-2 * min(1, (step + 1) / 2) * cosine)
            assert stats.step == step + 1 and stats.seconds == 2.0
            row = stats.row()
            assert row["samples_per_s"] == g / 2.0 and row["time_data_s"] >= 0.0
        assert trainer.clock.evaluated == 3 * g
    finally:
        trainer.monitor.close()
