"""A damaged newest checkpoint: resume, eval and predict fall back to the previous one.

One 1-rank run saves at steps 2, 4 and 6; the newest checkpoint gets a truncated ``.pt``.
``--resume auto`` then continues from step 4 and must reproduce the uninterrupted curve at
steps 5 and 6, keep the damaged files byte for byte, and save its own step 6 beside them.
"""

from __future__ import annotations

import hashlib

import pytest
from trainer_util import TINY, losses

from pdeds.errors import PdedsError
from pdeds.testing.distributed import run_ranks
from pdeds.train import checkpoint

OVERRIDES = [
    "optim.name=adam",
    "optim.lr=1e-3",
    "train.steps=6",
    "train.checkpoint_every=2",
    "train.keep_checkpoints=2",
]


def _digest(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _truncate(path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _fallback_body(root: str) -> dict:
    """Train 6 steps, damage step 6, look at it as eval would, resume, damage everything."""
    from pathlib import Path

    from pdeds.config import resolve
    from pdeds.train.inference import load_run
    from pdeds.train.trainer import train

    run, ckpts = Path(root) / "run", Path(root) / "run" / "checkpoints"
    train(resolve(TINY, OVERRIDES), run)
    out: dict = {"first": losses(run)}
    pt = ckpts / "step00000006" / "mp_rank_00_model_states.pt"
    _truncate(pt)
    out["digest"] = _digest(pt)
    said: list[str] = []
    out["eval_pick"] = checkpoint.newest_loadable(ckpts, say=said.append)[0].name
    out["eval_said"] = said
    out["load_run"] = load_run(run).checkpoint.name
    out["summary"] = train(resolve(TINY, OVERRIDES), run, resume="auto")
    out["second"] = losses(run)
    out["digest_after"] = _digest(pt)
    out["folders"] = sorted(p.name for p in ckpts.iterdir() if p.is_dir())
    out["damaged_note"] = (ckpts / "step00000006" / checkpoint.DAMAGED).read_text()
    out["latest_file"] = (ckpts / "latest").read_text().strip()
    out["newest"] = checkpoint.latest(ckpts).name
    for p in checkpoint.complete(ckpts):
        _truncate(next(p.glob("*.pt")))
    try:
        train(resolve(TINY, OVERRIDES), run, resume="auto")
    except PdedsError as err:
        out["none_loads"] = str(err)
    return out


@pytest.fixture(scope="module")
def fallback(tmp_path_factory):
    return run_ranks(_fallback_body, 1, str(tmp_path_factory.mktemp("fb")), timeout=300)[0]


def test_resume_falls_back_and_reproduces_the_curve(fallback):
    first, second = fallback["first"], fallback["second"]
    assert fallback["summary"]["completed"]
    for step in (5, 6):
        assert second[step] == pytest.approx(first[step], rel=1e-6, abs=1e-9), step


def test_damaged_checkpoint_is_kept_and_never_used_again(fallback):
    assert fallback["digest_after"] == fallback["digest"]  # not one byte changed
    assert "mp_rank_00_model_states.pt" in fallback["damaged_note"]
    # the resumed run's own step 6 went beside the damaged one, and is now the newest
    assert "step00000006" in fallback["folders"] and "step00000006.1" in fallback["folders"]
    assert fallback["newest"] == fallback["latest_file"] == "step00000006.1"


def test_eval_and_predict_fall_back_with_one_warning(fallback):
    assert fallback["eval_pick"] == fallback["load_run"] == "step00000004"
    (line,) = fallback["eval_said"]
    assert "step00000006" in line and "step00000004" in line


def test_no_loadable_checkpoint_is_one_error_naming_the_directory(fallback):
    msg = fallback["none_loads"]
    assert "no checkpoint in" in msg and "checkpoints" in msg and "--force" in msg
    assert "\n" not in msg
