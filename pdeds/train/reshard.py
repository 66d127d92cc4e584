"""Resume a checkpoint written by N ranks on M ranks.

pdeds' loss, gradients and weights do not depend on the rank count (METHOD.md sec. 6), so a
checkpoint only has to be re-partitioned:

- ZeRO 0 keeps the whole optimizer state in ``mp_rank_00_model_states.pt``; DeepSpeed loads
  it on any rank count as it is.
- ZeRO 1, 2 and 3 keep 1/N of the fp32 master weights and Adam moments per rank (ZeRO 3 the
  parameters too). DeepSpeed refuses a plain load on another rank count; its universal
  checkpoint (``deepspeed.checkpoint.ds_to_universal``: one file per parameter and state) is
  loaded by any rank count with ``"checkpoint": {"load_universal": true}`` (checked on
  DeepSpeed 0.19.8, CPU/gloo, 1 <-> 2 ranks, ZeRO 1-3). Rank 0 converts once, into
  ``stepNNNNNNNN/universal/`` inside the original (whose files are never changed); the
  conversion carries ``exp_avg`` / ``exp_avg_sq`` only, so the optimizer must be Adam or AdamW
  (SGD's momentum, L-BFGS or K-FAC state would be lost: refused, with the fix).

The trainer's own state (step, clock, schedule position, sample stream position) lives in
``pdeds.json`` / the client state and is independent of the rank count.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from pdeds import distributed
from pdeds.errors import PdedsError

UNIVERSAL = "universal"
"""Sub-folder of a checkpoint holding its universal form."""
ADAM_FAMILY = ("adam", "adamw")


@dataclass(frozen=True)
class Reshard:
    """A resume across rank counts: the checkpoint's world and this run's."""

    saved: int
    world: int
    stage: int

    @property
    def universal(self) -> bool:
        """Whether DeepSpeed must load the universal form (ZeRO 1-3 across rank counts)."""
        return self.saved != self.world and self.stage > 0

    def describe(self) -> str:
        how = "DeepSpeed's universal checkpoint" if self.universal else "the same files"
        return (
            f"resuming a checkpoint of {self.saved} rank(s) on {self.world} rank(s) "
            f"(ZeRO {self.stage}, {how})"
        )


def saved_world(path: Path) -> int | None:
    """Ranks that wrote the checkpoint ``path``: ``world`` of ``pdeds.json``, else the count of
    per-rank ZeRO files; None when unknown (an older ZeRO 0 checkpoint)."""
    try:
        marker = json.loads((path / "pdeds.json").read_text())
    except (OSError, ValueError):
        marker = {}
    if "world" in marker:
        return int(marker["world"])
    ranks = {
        m.group(1) for f in path.glob("*.pt") if (m := re.search(r"zero_pp_rank_(\d+)_", f.name))
    }
    return len(ranks) or None


def plan(path: Path | None, world: int, stage: int, optimizer: str) -> Reshard | None:
    """What resuming ``path`` on ``world`` ranks needs (None: same rank count or unknown);
    raises when it cannot be done."""
    saved = saved_world(path) if path is not None else None
    if saved is None or saved == world:
        return None
    fix = f"resume on {saved} rank(s), the checkpoint's count"
    if stage > 0 and optimizer not in ADAM_FAMILY:
        raise PdedsError(
            f"{path} was written by {saved} rank(s) under ZeRO {stage} and this run has {world}; "
            f"DeepSpeed's universal checkpoint carries Adam/AdamW state only (optim.name: "
            f"{optimizer}); {fix}"
        )
    return Reshard(saved, world, stage)


def universal(path: Path) -> Path:
    """Rank 0 writes the universal form of checkpoint ``path`` (once: kept for later resumes)
    into ``path/universal``; every rank gets its path."""
    out = path / UNIVERSAL
    why = None
    if distributed.rank() == 0 and not (out / "pdeds.json").is_file():
        why = _convert(path, out)
    why = distributed.broadcast_object(why)
    if why is not None:
        raise PdedsError(str(why))
    return out


def _convert(path: Path, out: Path) -> str | None:
    """ds_to_universal into ``out`` via a temporary folder; None or the error line."""
    from deepspeed.checkpoint.ds_to_universal import main

    tmp = out.with_name(UNIVERSAL + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    args = argparse.Namespace(
        input_folder=str(path),
        output_folder=str(tmp),
        num_extract_workers=1,  # in-process: no fork of a rank with live gloo threads
        num_merge_workers=1,
        keep_temp_folder=False,
        strict=True,
        inject_missing_state=True,
    )
    log = io.StringIO()
    try:
        with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
            main(args)
        shutil.copy2(path / "pdeds.json", tmp / "pdeds.json")
        tmp.rename(out)
    except Exception as err:  # noqa: BLE001  (any failure of the converter is one line)
        shutil.rmtree(tmp, ignore_errors=True)
        return (
            f"converting {path} for another rank count failed ({type(err).__name__}: {err}); "
            "resume on the checkpoint's rank count"
        )
    return None
