"""The typed DeepSpeed view against DeepSpeed's own parsing, and its strict keys."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pdeds import dsconfig
from pdeds.errors import PdedsError

ROOT = Path(__file__).resolve().parent.parent
SHIPPED = sorted((ROOT / "ds_configs").glob("*.json"))


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.stem)
def test_view_equals_deepspeeds_own_config(path):
    from deepspeed.runtime.config import DeepSpeedConfig

    ds = json.loads(path.read_text())
    view = dsconfig.read(ds)
    theirs = DeepSpeedConfig(dict(ds))  # world 1: no process group here
    zero = theirs.zero_config
    assert view.stage == zero.stage
    assert view.reduce_bucket_size == zero.reduce_bucket_size
    assert view.overlap_comm == zero.overlap_comm
    assert view.contiguous_gradients == zero.contiguous_gradients
    assert view.gradient_clipping == theirs.gradient_clipping
    assert view.dtype == ("bf16" if theirs.bfloat16_config.enabled else "fp32")
    for key in ("offload_optimizer", "offload_param"):
        sub = getattr(zero, key)
        device = None if sub is None else getattr(sub.device, "value", sub.device)
        assert getattr(view, key) == ("none" if sub is None else str(device))
    assert view.batch_sizes(1) == (
        theirs.train_batch_size,
        theirs.train_micro_batch_size_per_gpu,
        theirs.gradient_accumulation_steps,
    )


def test_deepspeed_defaults_are_deepspeeds():
    view = dsconfig.read({"train_batch_size": 4, "zero_optimization": {"stage": 3}})
    assert view.overlap_comm  # on at stage 3 only
    assert not dsconfig.read(
        {"train_batch_size": 4, "zero_optimization": {"stage": 2}}
    ).overlap_comm
    assert view.reduce_bucket_size == 500_000_000
    assert view.gradient_clipping == 1.0 and not view.clipping_given
    assert view.offloads == []


@pytest.mark.parametrize(
    "ds, message",
    [
        (
            {"zero_optimisation": {"stage": 2}},
            "ds.zero_optimisation: .*did you mean ds.zero_optimization",
        ),
        (
            {"zero_optimization": {"stage": 2, "overlap_com": True}},
            "did you mean ds.zero_optimization.overlap_comm",
        ),
        (
            {
                "zero_optimization": {
                    "stage": 2,
                    "offload_optimizer": {"device": "cpu", "pin_memry": 1},
                }
            },
            "did you mean ds.zero_optimization.offload_optimizer.pin_memory",
        ),
        ({"bf16": {"enabld": True}}, "did you mean ds.bf16.enabled"),
        ({"zero_optimization": {"stage": 7}}, "ds.zero_optimization.stage"),
    ],
)
def test_unknown_and_invalid_keys_are_one_clear_error(ds, message):
    with pytest.raises(PdedsError, match=message):
        dsconfig.read({"train_batch_size": 4, **ds})


def test_batch_keys_multiply_out_for_the_world_size():
    view = dsconfig.read({"train_batch_size": 8, "train_micro_batch_size_per_gpu": 2})
    assert view.batch_sizes(2) == (8, 2, 2)
    assert view.batch_sizes(4) == (8, 2, 1)
    with pytest.raises(PdedsError, match="not divisible by micro-batch 2 x 3"):
        view.batch_sizes(3)
    with pytest.raises(PdedsError, match="ds.train_batch_size: must be a positive integer"):
        dsconfig.read({"train_batch_size": 0})


def test_resolve_refuses_a_misspelt_deepspeed_key():
    from pdeds.config import resolve

    with pytest.raises(PdedsError, match="did you mean ds.zero_optimization"):
        resolve(None, ["ds.zero_optimisation.stage=2"])
    assert resolve(None, []).view.stage == 0
