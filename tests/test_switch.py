"""optim.switch_after: Adam, then L-BFGS / Gauss-Newton; exact resume after the switch."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from trainer_util import TINY, losses

from pdeds.errors import PdedsError
from pdeds.optim import LBFGSConfig, OptimConfig, prepare_ds_config
from pdeds.optim.switch import Switched
from pdeds.testing.distributed import run_ranks

SWITCHES = {
    "gauss_newton": ["optim.name=gauss_newton", "optim.lr=1.0"],
    "lbfgs": ["optim.name=lbfgs", "optim.lr=1.0", "optim.lbfgs.hold_steps=1"],
}


def _switch_body(root: str, name: str) -> dict:
    """4 steps (Adam for 2) uninterrupted; the same stopped after 3 (a checkpoint after the
    switch) and resumed to 4."""
    from pdeds.config import resolve
    from pdeds.train.trainer import train

    base = ["optim.switch_after=2", "optim.first=adam", "optim.first_lr=1e-3"]
    ov = [*SWITCHES[name], *base, "train.checkpoint_every=1", "train.keep_checkpoints=0"]
    full, part = Path(root) / "full", Path(root) / "part"
    train(resolve(TINY, [*ov, "train.steps=4"]), full)
    train(resolve(TINY, [*ov, "train.steps=3"]), part)
    train(resolve(TINY, [*ov, "train.steps=4"]), part, resume="auto")
    return {"full": losses(full), "resumed": losses(part)}


def _resumes_exactly(tmp_path: Path, name: str) -> None:
    out = run_ranks(_switch_body, 1, str(tmp_path), name, timeout=600)[0]
    full, resumed = out["full"], out["resumed"]
    assert sorted(full) == sorted(resumed) == [1, 2, 3, 4]
    for step in full:
        assert resumed[step] == pytest.approx(full[step], rel=1e-6, abs=1e-9), (name, step)
    assert full[4] < full[3] < full[1], full


def test_adam_then_gauss_newton_resumes_exactly_after_the_switch(tmp_path: Path):
    _resumes_exactly(tmp_path, "gauss_newton")


@pytest.mark.slow
def test_adam_then_lbfgs_resumes_exactly_after_the_switch(tmp_path: Path):
    _resumes_exactly(tmp_path, "lbfgs")


class _Counting(torch.optim.SGD):
    needs_closure = True

    def engine_step(self, engine, micro_batches, loss_fn):  # noqa: ANN001, ANN201
        raise AssertionError("not used here")


def test_switched_runs_first_then_second_with_their_rates():
    """The first switch_after steps are the first optimizer's at first_lr x factor, the rest the
    second's at lr x factor (an SGD on a quadratic: x <- x - rate x; factor 1/2 from the LR
    scheduler); the state dict carries the phase."""
    x = torch.nn.Parameter(torch.ones(3))
    first = torch.optim.SGD([x], lr=0.1)
    second = _Counting([x], lr=1.0)
    opt = Switched([x], first=first, second=second, switch_after=2, lr=1.0, first_lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: 0.5)
    values = []
    for _ in range(4):
        phase_two = opt.needs_closure
        x.grad = x.detach().clone()
        opt.step()
        sched.step()
        values.append((phase_two, float(x[0])))
    assert [v[0] for v in values] == [False, False, True, True]
    want, v = [], 1.0
    for rate in (0.05, 0.05, 0.5, 0.5):
        v -= rate * v
        want.append(v)
    assert [v[1] for v in values] == pytest.approx(want, rel=1e-6)
    sd = opt.state_dict()
    again = Switched(
        [x], first=torch.optim.SGD([x], lr=0.1), second=_Counting([x], lr=1.0), switch_after=2,
        lr=1.0, first_lr=0.1,
    )  # fmt: skip
    again.load_state_dict(sd)
    assert again.steps_done == 4 and again.needs_closure


def test_switch_refusals():
    with pytest.raises(PdedsError, match="optim.switch_after: switches"):
        OptimConfig(name="adam", switch_after=3).validate()
    with pytest.raises(PdedsError, match="optim.first"):
        OptimConfig(name="gauss_newton", switch_after=3, first="kfac").validate()
    with pytest.raises(PdedsError, match="hold_steps"):
        OptimConfig(name="lbfgs", lr=1.0, switch_after=3, lbfgs=LBFGSConfig()).validate()
    cfg = OptimConfig(name="lbfgs", lr=1.0, switch_after=3, lbfgs=LBFGSConfig(hold_steps=1))
    with pytest.raises(PdedsError, match="ZeRO stage 0 only"):
        prepare_ds_config(cfg, {"zero_optimization": {"stage": 1}})
    assert TINY["deepspeed"]["config"].endswith("zero0.json")
