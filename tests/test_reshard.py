"""Resume on another rank count: a checkpoint of N ranks continues on M ranks (N, M in {1, 2}).

pdeds' loss is the same for any rank count (tests/test_train_ranks.py), so the truth is one
uninterrupted 1-rank run: each case trains 2 of 4 steps on N ranks, resumes on M ranks with
``--resume auto`` and must reproduce steps 3 and 4 within the rank-count tolerance. Three
spawns carry every case: 1 rank (truth + first halves of 1 -> 2), 2 ranks (first halves of
2 -> 1 + the 1 -> 2 resumes), 1 rank (the 2 -> 1 resumes).
"""

from __future__ import annotations

import json

import pytest
from trainer_util import TINY, losses

from pdeds.errors import PdedsError
from pdeds.testing.distributed import run_ranks

ADAM = ["optim.name=adam", "optim.lr=1e-3", "train.checkpoint_every=2"]
DEFAULT_STAGES = (2,)
SLOW_STAGES = (0, 1, 3)


def _overrides(stage: int, steps: int) -> list[str]:
    return [*ADAM, f"train.steps={steps}", f"deepspeed.config=ds_configs/zero{stage}.json"]


def _body(root: str, jobs: list[tuple[str, int, int, bool]]) -> dict:
    """Train each (name, stage, steps, resume) job in ROOT/name; rank 0 returns losses, the
    summary and the checkpoint marker of the last save."""
    from pathlib import Path

    from pdeds import distributed
    from pdeds.config import resolve
    from pdeds.train import checkpoint
    from pdeds.train.trainer import train

    out = {}
    for name, stage, steps, resume in jobs:
        run = Path(root) / name
        summary = train(
            resolve(TINY, _overrides(stage, steps)), run, resume="auto" if resume else None
        )
        distributed.barrier()
        if distributed.rank() == 0:
            marker = checkpoint.latest(run / "checkpoints") / checkpoint.MARKER
            out[name] = {
                "losses": losses(run),
                "summary": summary,
                "marker": json.loads(marker.read_text()),
                "universal": (run / "checkpoints/step00000002/universal").is_dir(),
            }
    return out


def _cases(root, stages) -> tuple[dict, dict]:
    """The truth and, per 'z{stage}_{N}to{M}', the resumed run's results."""
    one = [(f"z{s}_1to2", s, 2, False) for s in stages]
    two = [(f"z{s}_2to1", s, 2, False) for s in stages]
    first = run_ranks(_body, 1, root, [("truth", 1, 4, False), *one], timeout=300)[0]
    run_ranks(_body, 2, root, two, timeout=300)
    resumed = run_ranks(_body, 2, root, [(n, s, 4, True) for n, s, _, _ in one], timeout=300)[0]
    resumed |= run_ranks(_body, 1, root, [(n, s, 4, True) for n, s, _, _ in two], timeout=300)[0]
    return first["truth"], resumed


def _check(truth: dict, resumed: dict, stages) -> None:
    want = truth["losses"]
    assert want[4] < want[1]  # it trained
    for s in stages:
        for n, m in ((1, 2), (2, 1)):
            got = resumed[f"z{s}_{n}to{m}"]
            assert sorted(got["losses"]) == [1, 2, 3, 4], (s, n, m)
            for step in (3, 4):
                assert got["losses"][step] == pytest.approx(want[step], rel=1e-5), (s, n, m, step)
            assert got["summary"]["completed"] and got["summary"]["world_size"] == m
            assert got["marker"]["world"] == m and got["marker"]["step"] == 4
            # the clock carried over: training time of both sessions
            assert got["summary"]["train_time_s"] > 0
            assert got["universal"] == (s > 0), (s, n, m)


def test_resume_on_another_rank_count_zero2(tmp_path):
    truth, resumed = _cases(str(tmp_path), DEFAULT_STAGES)
    _check(truth, resumed, DEFAULT_STAGES)


@pytest.mark.slow
def test_resume_on_another_rank_count_zero0_zero1_zero3(tmp_path):
    truth, resumed = _cases(str(tmp_path), SLOW_STAGES)
    _check(truth, resumed, SLOW_STAGES)


def test_rank_count_change_is_said_and_unsupported_optimizer_refused(tmp_path, monkeypatch):
    from pdeds.config import resolve
    from pdeds.train import checkpoint
    from pdeds.train.trainer import preflight

    monkeypatch.setattr(checkpoint, "damage", lambda path: None)  # files are not what is tested
    for name, extra, world in (("adam", [], 1), ("sgd", ["optim.name=sgd"], 1)):
        res = resolve(TINY, [*_overrides(2, 4), *extra])
        run = tmp_path / name
        ckpt = run / "checkpoints" / "step00000002"
        ckpt.mkdir(parents=True)
        (run / "config.yaml").write_text(preflight(res, run, world, memory=False).config_text)
        (ckpt / checkpoint.MARKER).write_text(json.dumps({"step": 2, "world": 2}))
        if name == "adam":
            setup = preflight(res, run, world, resume="auto", memory=False)
            assert "checkpoint of 2 rank(s) on 1 rank(s) (ZeRO 2, DeepSpeed's universal" in (
                setup.describe()
            )
        else:
            with pytest.raises(PdedsError, match=r"Adam/AdamW state only .*on 2 rank\(s\)"):
                preflight(res, run, world, resume="auto", memory=False)
