"""Checkpoints that are either complete or ignored.

A checkpoint is the folder ``checkpoints/step00000120/`` written by DeepSpeed's
``save_checkpoint`` (model, optimizer and scheduler state of every rank) plus ``pdeds.json``
(step, client state), which rank 0 writes last, atomically, after every rank has finished.
Resume picks the newest folder holding ``pdeds.json``: a checkpoint interrupted half-way has no
marker and is never picked. Older complete checkpoints beyond ``keep`` are removed only after a
newer one is complete.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from pdeds import distributed
from pdeds.errors import PdedsError

MARKER = "pdeds.json"


def tag_for(step: int) -> str:
    return f"step{step:08d}"


def complete(root: Path) -> list[Path]:
    """Complete checkpoint folders under ``root``, oldest first."""
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and (p / MARKER).is_file())


def latest(root: Path) -> Path | None:
    found = complete(root)
    return found[-1] if found else None


def save(engine: Any, root: Path, step: int, client_state: dict[str, Any], keep: int) -> Path:
    """Save on every rank; rank 0 then marks the folder complete and prunes old ones."""
    tag = tag_for(step)
    client_state = {"step": step, **client_state}
    engine.save_checkpoint(str(root), tag=tag, client_state={"pdeds": client_state})
    distributed.barrier()
    path = root / tag
    if distributed.rank() == 0:
        tmp = path / (MARKER + ".tmp")
        tmp.write_text(json.dumps(client_state, indent=1))
        os.replace(tmp, path / MARKER)
        if keep > 0:
            for old in complete(root)[:-keep]:
                shutil.rmtree(old, ignore_errors=True)
    distributed.barrier()
    return path


def resolve_resume(run_dir: Path, resume: str | None) -> Path | None:
    """'auto' -> newest complete checkpoint of the run (None if there is none); a path -> it."""
    if resume is None:
        return None
    if resume == "auto":
        return latest(run_dir / "checkpoints")
    p = Path(resume)
    if not (p / MARKER).is_file():
        raise PdedsError(
            f"--resume {resume}: not a complete pdeds checkpoint (no {MARKER}); "
            f"use --resume auto or one of {[str(c) for c in complete(run_dir / 'checkpoints')]}"
        )
    return p.resolve()


def load(engine: Any, path: Path) -> dict[str, Any]:
    """Restore engine state from a complete checkpoint; returns the pdeds client state."""
    _, client = engine.load_checkpoint(
        str(path.parent), tag=path.name, load_optimizer_states=True, load_lr_scheduler_states=True
    )
    if client is None:
        raise PdedsError(f"DeepSpeed could not load the checkpoint at {path}")
    return client["pdeds"]


def load_weights(path: Path) -> dict[str, torch.Tensor]:
    """fp32 model weights of a checkpoint, any ZeRO stage, without an engine."""
    states = sorted(path.glob("*mp_rank_*_model_states.pt"))
    if not states:
        raise PdedsError(f"{path} holds no DeepSpeed model states; is it a checkpoint folder?")
    meta = torch.load(states[0], map_location="cpu", weights_only=False)
    stage = (meta.get("ds_config") or {}).get("zero_optimization", {}).get("stage", 0)
    module = meta.get("module")
    if stage == 0 and module:
        return {k: v.float() if v.is_floating_point() else v for k, v in module.items()}
    # ZeRO 1-3 keep the fp32 master weights partitioned in the optimizer states.
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return get_fp32_state_dict_from_zero_checkpoint(str(path.parent), tag=path.name)
