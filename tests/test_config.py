"""Experiment config: typed tree, overrides, one validation pass, errors that name the fix."""

from __future__ import annotations

import json

import pytest

from pdeds.config import ExperimentConfig, batch_sizes, dump_yaml, parse_duration, resolve
from pdeds.errors import PdedsError


def test_defaults_resolve_and_round_trip(tmp_path):
    r = resolve(None)
    assert isinstance(r.cfg, ExperimentConfig)
    assert r.ds["train_batch_size"] == 4
    path = tmp_path / "c.yaml"
    path.write_text(dump_yaml(r.cfg))
    assert resolve(path).cfg == r.cfg


def test_overrides_types_and_ds_patch():
    r = resolve(
        None,
        [
            "optim.lr=3e-4",
            "problem.dim=2",
            "model.width=4",
            "ds.zero_optimization.stage=2",
            "ds.bf16.enabled=true",
            "ds.scheduler={type: WarmupLR, params: {warmup_max_lr: 1e-3, warmup_num_steps: 5}}",
        ],
    )
    assert r.cfg.optim.lr == pytest.approx(3e-4) and isinstance(r.cfg.optim.lr, float)
    assert r.cfg.problem.dim == 2 and r.cfg.model.width == 4
    assert r.ds["zero_optimization"]["stage"] == 2 and r.ds["bf16"]["enabled"] is True
    # PyYAML reads 1e-3 as a string; a DeepSpeed value gets it as the number it is
    assert r.ds["scheduler"]["params"] == {"warmup_max_lr": 1e-3, "warmup_num_steps": 5}


def test_unknown_key_lists_valid_ones():
    with pytest.raises(PdedsError, match="unknown key.*'lrate'.*valid keys: .*lr"):
        resolve({"optim": {"lrate": 1}})
    with pytest.raises(PdedsError, match="unknown key.*'bogus'.*top level"):
        resolve({"bogus": {}})


@pytest.mark.parametrize(
    "overrides, match",
    [
        (["problem.dim=4"], "problem.dim"),
        (
            ["model.arch=unet", "problem.res=20"],
            "n=20 cannot pass 3 2x downsamplings.*multiple of 8",
        ),
        (["problem.res=4"], "n=4 is coarser than the network's core grid of 8 nodes"),
        (["problem.eta=-1"], "problem.eta"),
        (["problem.family=foo"], "problem.family"),
        (["train.steps=0"], "train.steps"),
        (["model.width=abc"], "model.width: expected an integer"),
        (["deepspeed.config=nope.json"], "deepspeed.config: nope.json not found"),
        (["schedule.cycle=zigzag"], "schedule.cycle"),
        (["optim.name=rmsprop"], "optim.name"),
        (["novalue"], "KEY=VALUE"),
        (["optim.name=lbfgs", "train.lr_schedule=cosine"], "L-BFGS picks its step"),
        (["optim.name=kfac", "ds.zero_optimization.stage=3"], "does not run under ZeRO stage 3"),
        (["optim.kfac.damping_mode=trace"], "optim.kfac.damping_mode: 'trace' is not one of"),
        (["optim.kfac.factor_average=sum"], "optim.kfac.factor_average: 'sum' is not one of"),
        (["optim.kfac.factor_samples=-1"], "optim.kfac.factor_samples: -1 must be an integer"),
        (["train.time_limit=4x"], "train.time_limit: '4x' is not a duration; give seconds"),
        (["train.time_limit=-5"], "train.time_limit: -5.0 is not a duration"),
        (["data.train_samples=-1"], "data.train_samples: must be >= 0"),
        (
            [
                "data.train_samples=0",
                "schedule.cycle=half-v",
                "schedule.levels=2",
                "schedule.level=[{epochs: 1}, {steps: 2}]",
            ],
            r"schedule.level\[0\].epochs: a fresh stream .* has no epochs; give the level steps",
        ),
        (["model.checkpoint=1"], "model.checkpoint: expected true or false, got 1"),
        (["train.steps=true"], "train.steps: expected an integer, got True"),
    ],
)
def test_bad_values_name_the_key(overrides, match):
    with pytest.raises(PdedsError, match=match):
        resolve(None, overrides)


def test_bad_files(tmp_path):
    with pytest.raises(PdedsError, match="not found"):
        resolve(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("problem: [unclosed")
    with pytest.raises(PdedsError, match="not valid YAML"):
        resolve(bad)
    ds = tmp_path / "ds.json"
    ds.write_text("{not json")
    with pytest.raises(PdedsError, match="not valid JSON"):
        resolve(None, [f"deepspeed.config={ds}"])


def test_ds_path_relative_to_yaml(tmp_path):
    (tmp_path / "mine.json").write_text(json.dumps({"train_batch_size": 8}))
    cfg = tmp_path / "exp.yaml"
    cfg.write_text("deepspeed:\n  config: mine.json\n")
    assert resolve(cfg).ds == {"train_batch_size": 8}


def test_batch_sizes_multiply_out():
    assert batch_sizes({"train_batch_size": 8, "train_micro_batch_size_per_gpu": 2}, 2) == (8, 2, 2)
    assert batch_sizes({"train_micro_batch_size_per_gpu": 2}, 3) == (6, 2, 1)
    assert batch_sizes({"train_batch_size": 8}, 4) == (8, 2, 1)
    with pytest.raises(PdedsError, match="do not multiply out.*change ds.train_batch_size to 8"):
        batch_sizes(
            {
                "train_batch_size": 6,
                "train_micro_batch_size_per_gpu": 2,
                "gradient_accumulation_steps": 2,
            },
            2,
        )
    with pytest.raises(PdedsError, match="not divisible by micro-batch 2 x 3"):
        batch_sizes({"train_batch_size": 8, "train_micro_batch_size_per_gpu": 2}, 3)
    with pytest.raises(PdedsError, match="neither"):
        batch_sizes({}, 1)


def test_time_limit_parses_durations():
    cases = {"4m": 240.0, "90s": 90.0, "1h30m": 5400.0, "1.5h": 5400.0, 90: 90.0, "0.5": 0.5}
    for text, seconds in cases.items():
        assert parse_duration(text) == seconds, text
    assert (
        parse_duration(0) is None and parse_duration(None) is None and parse_duration("0s") is None
    )
    assert resolve(None, ["train.time_limit=4m"]).cfg.train.time_limit_s == 240.0
    for bad in ("4x", "m4", "1h 30", "", True, "inf"):
        with pytest.raises(PdedsError, match="train.time_limit"):
            parse_duration(bad)


def test_fresh_stream_refuses_a_data_file(tmp_path):
    path = tmp_path / "d.h5"
    path.write_bytes(b"")
    with pytest.raises(PdedsError, match="data.train_samples: 0 streams fresh samples.*data.path"):
        resolve(None, ["data.train_samples=0", f"data.path={path}"])
