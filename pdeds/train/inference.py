"""A trained network outside the engine: weights from a run's checkpoint, predictions.

``load_run`` rebuilds the model of a run directory from its ``config.yaml`` and the fp32
weights of its newest complete checkpoint (any ZeRO stage), on one process, no launcher.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import yaml

from pdeds.config import ExperimentConfig, build
from pdeds.errors import PdedsError
from pdeds.models.unet import UNet, build_model
from pdeds.train import checkpoint
from pdeds.train.engine import device


@dataclass
class TrainedRun:
    cfg: ExperimentConfig
    model: UNet
    checkpoint: Path
    device: torch.device

    def predict(self, nu: torch.Tensor) -> torch.Tensor:
        """U for nu (B, 1, n..), float32 on the model's device."""
        with torch.no_grad():
            return self.model(nu.float().to(self.device))


def load_config(run_dir: Path) -> ExperimentConfig:
    """The resolved experiment of a run directory."""
    path = run_dir / "config.yaml"
    if not path.is_file():
        raise PdedsError(f"{run_dir} is not a pdeds run directory (no config.yaml); pass RUN_DIR")
    cfg = build(ExperimentConfig, yaml.safe_load(path.read_text()) or {})
    cfg.validate()
    return cfg


def load_run(run_dir: Path, ckpt: Path | None = None) -> TrainedRun:
    """Model of ``run_dir`` with the weights of ``ckpt`` (default: the newest complete one that
    loads; a warning names the damaged newer ones it skipped)."""
    cfg = load_config(run_dir)
    ckpt = ckpt or checkpoint.newest_loadable(run_dir / "checkpoints")[0]
    if ckpt is None:
        raise PdedsError(f"{run_dir} has no complete checkpoint yet; train it (pdeds train) first")
    dev = device()
    model = build_model(cfg.problem.dim, cfg.model)
    model.load_state_dict(checkpoint.load_weights(ckpt))
    model.to(dev).eval()
    return TrainedRun(cfg=cfg, model=model, checkpoint=ckpt, device=dev)
