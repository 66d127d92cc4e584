"""A tiny experiment and helpers shared by the trainer tests (not a test module)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

TINY = {
    "problem": {"dim": 3, "res": 16, "modes": 6},
    "data": {"train_samples": 10, "val_samples": 2},
    "model": {"depth": 2, "width": 4, "norm": "group", "groups": 2},
    "optim": {"name": "sgd", "lr": 1.0e-4, "momentum": 0.9},
    "train": {"steps": 3, "eval_every": 0, "checkpoint_every": 0, "log_every": 1},
    "deepspeed": {"config": "ds_configs/zero0.json"},
}


def write_tiny(path: Path, **sections: dict) -> Path:
    """TINY with ``sections`` merged in, as a YAML file."""
    import yaml

    cfg = json.loads(json.dumps(TINY))
    for k, v in sections.items():
        cfg.setdefault(k, {}).update(v)
    path.write_text(yaml.safe_dump(cfg))
    return path


def losses(run_dir: Path) -> dict[int, float]:
    """step -> loss of a run's metrics.jsonl."""
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def train_cases(root: str, cases: list[tuple[str, list[str]]]) -> dict:
    """Rank body: train each (name, overrides) case of TINY; rank 0 returns losses + weights."""
    from pdeds import distributed
    from pdeds.config import resolve
    from pdeds.train import checkpoint
    from pdeds.train.trainer import train

    out = {}
    for name, overrides in cases:
        run_dir = Path(root) / name
        summary = train(resolve(TINY, overrides), run_dir)
        distributed.barrier()
        if distributed.rank() == 0:
            weights = checkpoint.load_weights(checkpoint.latest(run_dir / "checkpoints"))
            out[name] = {"losses": losses(run_dir), "weights": weights, "summary": summary}
    return out


def pdeds(*args: str, cwd: Path | None = None, timeout: float = 300, env: dict | None = None):
    """Run the real `pdeds` console entry point in a subprocess."""
    e = dict(os.environ, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", **(env or {}))
    return subprocess.run(
        [sys.executable, "-m", "pdeds", *args],
        cwd=cwd or ROOT,
        env=e,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
