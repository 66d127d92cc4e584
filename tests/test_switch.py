"""optim.switch_after: Adam, then L-BFGS / Gauss-Newton; exact resume after the switch."""

from __future__ import annotations

from pathlib import Path

import pytest
from trainer_util import TINY, losses

from pdeds.errors import PdedsError
from pdeds.optim import LBFGSConfig, OptimConfig, prepare_ds_config
from pdeds.testing.distributed import run_ranks

SWITCHES = {
    "gauss_newton": ["optim.name=gauss_newton", "optim.lr=1.0"],
    "lbfgs": ["optim.name=lbfgs", "optim.lr=1.0", "optim.lbfgs.hold_steps=1"],
}


def _switch_body(root: str) -> dict:
    """Per second-order method: 5 steps (Adam for 2) uninterrupted; the same stopped after 3
    (checkpoint after the switch) and resumed; plain Adam for the first 2 steps."""
    from pdeds.config import resolve
    from pdeds.train.trainer import train

    out = {}
    base = ["optim.switch_after=2", "optim.first=adam", "optim.first_lr=1e-3"]
    for name, sets in SWITCHES.items():
        ov = [*sets, *base, "train.checkpoint_every=1", "train.keep_checkpoints=0"]
        full, part = Path(root) / f"{name}_full", Path(root) / f"{name}_part"
        train(resolve(TINY, [*ov, "train.steps=5"]), full)
        train(resolve(TINY, [*ov, "train.steps=3"]), part)
        train(resolve(TINY, [*ov, "train.steps=5"]), part, resume="auto")
        out[name] = {"full": losses(full), "resumed": losses(part)}
    adam = Path(root) / "adam"
    train(resolve(TINY, ["optim.name=adam", "optim.lr=1e-3", "train.steps=3"]), adam)
    out["adam"] = losses(adam)
    return out


def test_switch_follows_adam_then_resumes_exactly_after_the_switch(tmp_path: Path):
    out = run_ranks(_switch_body, 1, str(tmp_path), timeout=300)[0]
    for name in SWITCHES:
        full, resumed = out[name]["full"], out[name]["resumed"]
        assert sorted(full) == sorted(resumed) == [1, 2, 3, 4, 5]
        for step in full:
            assert resumed[step] == pytest.approx(full[step], rel=1e-6, abs=1e-9), (name, step)
        # the first two steps are Adam's (the loss at step 3 is after Adam's two updates)
        for step in (1, 2, 3):
            assert full[step] == pytest.approx(out["adam"][step], rel=1e-6), (name, step)
        assert full[5] < full[3], (name, full)


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
