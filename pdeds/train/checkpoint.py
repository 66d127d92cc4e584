"""Checkpoints that are either complete or ignored.

A checkpoint is the folder ``checkpoints/step00000120/`` written by DeepSpeed's
``save_checkpoint`` (model, optimizer and scheduler state of every rank) plus ``pdeds.json``
(step, client state), which rank 0 writes last, atomically, after every rank has finished.
Resume picks the newest folder holding ``pdeds.json``: a checkpoint interrupted half-way has no
marker and is never picked. Older complete checkpoints beyond ``keep`` are removed only after a
newer one is complete.

A complete checkpoint can still be damaged afterwards (a truncated or overwritten ``.pt``).
``newest_loadable`` checks every file of a checkpoint (each ``.pt`` is a zip archive with a
CRC-32 per member, and every rank's files must be there) and falls back to the previous complete
one. Resume marks a damaged checkpoint with ``pdeds.damaged`` (its data stays untouched), so it
is never picked or pruned again, and a later save of the same step goes to ``stepNNNNNNNN.1``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from pdeds import distributed
from pdeds.errors import PdedsError

MARKER = "pdeds.json"
DAMAGED = "pdeds.damaged"
"""Beside the data of a checkpoint that does not load: why (written by a resume that skipped it)."""


def tag_for(step: int) -> str:
    return f"step{step:08d}"


def free_tag(root: Path, step: int) -> str:
    """``tag_for(step)``, or ``tag.1``, ``tag.2`` .. when that folder holds a damaged checkpoint
    (which is kept, never overwritten)."""
    tag, k = tag_for(step), 0
    while (root / (tag if k == 0 else f"{tag}.{k}") / DAMAGED).exists():
        k += 1
    return tag if k == 0 else f"{tag}.{k}"


def complete(root: Path) -> list[Path]:
    """Complete checkpoint folders under ``root`` not marked damaged, oldest first."""
    if not root.is_dir():
        return []
    return sorted(
        p
        for p in root.iterdir()
        if p.is_dir() and (p / MARKER).is_file() and not (p / DAMAGED).exists()
    )


def latest(root: Path) -> Path | None:
    found = complete(root)
    return found[-1] if found else None


def save(engine: Any, root: Path, step: int, client_state: dict[str, Any], keep: int) -> Path:
    """Save on every rank; rank 0 then marks the folder complete and prunes old ones."""
    tag = free_tag(root, step)
    client_state = {"step": step, "world": distributed.world_size(), **client_state}
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


def damage(path: Path) -> str | None:
    """Why the complete checkpoint ``path`` would not load, or None when every file is sound:
    ``pdeds.json`` must parse, each rank's DeepSpeed files (``world`` of ``pdeds.json``) must
    exist, and every ``.pt`` zip archive must be whole with matching CRC-32s (read, not
    unpickled: memory stays at one archive member)."""
    try:
        world = int(json.loads((path / MARKER).read_text()).get("world", 1))
    except (OSError, ValueError, AttributeError) as err:
        return f"{MARKER} unreadable ({err})"
    files = sorted(path.glob("*.pt"))
    if not any(f.name.endswith("model_states.pt") for f in files):
        return "no DeepSpeed model states"
    ranks = {m.group(1) for f in files if (m := re.search(r"zero_pp_rank_(\d+)_", f.name))}
    if ranks and len(ranks) != world:
        return f"files of {len(ranks)} rank(s), written by {world}"
    for f in files:
        try:
            with zipfile.ZipFile(f) as z:
                bad = z.testzip()
        except (OSError, zipfile.BadZipFile, EOFError) as err:
            return f"{f.name}: {err}"
        if bad is not None:
            return f"{f.name}: member {bad} fails its CRC-32"
    return None


def warn(message: str) -> None:
    """One ``pdeds: warning:`` line on stderr."""
    print(f"pdeds: warning: {message}", file=sys.stderr, flush=True)


def newest_loadable(
    root: Path, *, say: Callable[[str], None] = warn
) -> tuple[Path | None, list[tuple[Path, str]]]:
    """The newest complete checkpoint under ``root`` that loads, and the newer ones skipped with
    why; one ``say`` line when it fell back. Raises when checkpoints exist but none loads."""
    skipped: list[tuple[Path, str]] = []
    for path in reversed(complete(root)):
        why = damage(path)
        if why is None:
            if skipped:
                names = ", ".join(f"{p.name} ({w})" for p, w in skipped)
                say(f"checkpoint(s) {names} in {root} do not load; using {path.name} instead")
            return path, skipped
        skipped.append((path, why))
    if skipped:
        names = ", ".join(f"{p.name} ({w})" for p, w in skipped)
        raise PdedsError(
            f"no checkpoint in {root} loads: {names}; restore one from a backup, or start the "
            "run anew with --force (the damaged ones are kept)"
        )
    return None, []


def mark_damaged(skipped: list[tuple[Path, str]], root: Path, use: Path | None) -> None:
    """Rank 0 of a resume: mark each skipped checkpoint ``pdeds.damaged`` (data untouched) and
    point DeepSpeed's ``latest`` file at ``use``, the checkpoint the run continues from."""
    if distributed.rank() != 0 or not skipped:
        return
    for path, why in skipped:
        (path / DAMAGED).write_text(why + "\n")
    if use is not None:
        (root / "latest").write_text(use.name)


def resolve_resume(run_dir: Path, resume: str | None) -> tuple[Path | None, list[tuple[Path, str]]]:
    """'auto' -> newest complete checkpoint of the run that loads (None if there is none) and
    the damaged newer ones; a path -> it, if it loads. Rank 0 decides, every rank gets it."""
    if resume is None:
        return None, []
    found: Any = None
    if distributed.rank() == 0:
        try:
            found = _resolve(run_dir, resume)
        except PdedsError as err:
            found = err
    found = distributed.broadcast_object(found)
    if isinstance(found, PdedsError):
        raise PdedsError(str(found))
    return found


def _resolve(run_dir: Path, resume: str) -> tuple[Path | None, list[tuple[Path, str]]]:
    if resume == "auto":
        return newest_loadable(run_dir / "checkpoints")
    p = Path(resume)
    if not (p / MARKER).is_file():
        raise PdedsError(
            f"--resume {resume}: not a complete pdeds checkpoint (no {MARKER}); "
            f"use --resume auto or one of {[str(c) for c in complete(run_dir / 'checkpoints')]}"
        )
    why = damage(p)
    if why is not None:
        raise PdedsError(f"--resume {resume}: the checkpoint does not load ({why}); use another")
    return p.resolve(), []


def load(engine: Any, path: Path) -> dict[str, Any]:
    """Restore engine state from a complete checkpoint; returns the pdeds client state."""
    try:
        _, client = engine.load_checkpoint(
            str(path.parent),
            tag=path.name,
            load_optimizer_states=True,
            load_lr_scheduler_states=True,
        )
    except (RuntimeError, OSError, EOFError, KeyError) as err:
        raise PdedsError(
            f"DeepSpeed could not load the checkpoint at {path} ({str(err).splitlines()[0]}); "
            f"resume from an older one with --resume {path.parent}/stepNNNNNNNN"
        ) from err
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
