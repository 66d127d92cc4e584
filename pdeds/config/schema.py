"""The experiment schema: one typed tree of sections, each with its own checks.

An experiment YAML has the sections ``problem``, ``data``, ``model``, ``optim``, ``schedule``,
``train`` and ``deepspeed``. Each field's docstring is its documentation; ``validate`` raises
one ``PdedsError`` naming the key and the fix. Loading, ``--set`` overrides and coercion of YAML
values to these types live in ``pdeds.config.load``. DeepSpeed settings (batch sizes, ZeRO,
bf16, scheduler) live only in the DeepSpeed JSON, in DeepSpeed's own schema.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pdeds.errors import PdedsError
from pdeds.models import resolution_problem
from pdeds.models.config import ModelConfig
from pdeds.multigrid import ScheduleConfig
from pdeds.optim import OptimConfig

LR_SCHEDULES = ("constant", "cosine")
LOSS_WEIGHTINGS = ("none", "lifting")
REFERENCE_METHODS = ("amg", "gmg", "matrix_free")  # physics.reference.METHODS, without scipy
DURATION_UNITS = {"h": 3600.0, "m": 60.0, "s": 1.0}
_DURATION = re.compile(r"(\d+(?:\.\d*)?|\.\d+)([hms])")


def parse_duration(value: float | str | None) -> float | None:
    """Seconds of a wall-clock budget: a number of seconds, or a string of number-unit terms
    such as "4m", "90s", "1h30m", "1.5h". None or 0 mean no budget.

    Raises:
        PdedsError: anything else, naming ``train.time_limit`` and the accepted forms.
    """
    seconds: float | None = None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        seconds = float(value)
    elif isinstance(value, str):
        text = value.strip().lower()
        try:
            seconds = float(text)
        except ValueError:
            terms = _DURATION.findall(text)
            if terms and "".join(n + u for n, u in terms) == text.replace(" ", ""):
                seconds = sum(float(n) * DURATION_UNITS[u] for n, u in terms)
    elif value is None:
        return None
    if seconds is None or not (math.isfinite(seconds) and seconds >= 0):
        raise PdedsError(
            f"train.time_limit: {value!r} is not a duration; give seconds (240) or a string "
            "such as 4m, 90s, 1h30m (0 or null: no limit)"
        )
    return seconds or None


@dataclass
class ProblemConfig:
    """The PDE family: -div(nu grad u) = f on [0, 1]^dim (METHOD.md sec. 1-2)."""

    dim: int = 3
    """Spatial dimension, 2 or 3."""
    res: int = 32
    """Nodes per axis at the finest level (training and held-out evaluation)."""
    eta: float = 0.5
    """Correlation length of the KL covariance."""
    modes: int = 6
    """Number of KL coefficients m."""
    family: str = "diagonal"
    """KL family: "diagonal" (published) or "tensor" (m largest eigenvalue products)."""
    f: float = 0.0
    """Constant source term."""

    def validate(self) -> None:
        from pdeds.physics import kl

        if self.dim not in (2, 3):
            raise PdedsError(f"problem.dim: must be 2 or 3, got {self.dim}")
        if self.res < 2:
            raise PdedsError(f"problem.res: needs at least 2 nodes per axis, got {self.res}")
        if not (self.eta > 0 and math.isfinite(self.eta)):
            raise PdedsError(f"problem.eta: must be a positive number, got {self.eta}")
        if self.modes < 1:
            raise PdedsError(f"problem.modes: must be >= 1, got {self.modes}")
        if self.family not in kl.FAMILIES:
            raise PdedsError(
                f"problem.family: {self.family!r} is not one of {', '.join(kl.FAMILIES)}"
            )
        if not math.isfinite(self.f):
            raise PdedsError(f"problem.f: must be finite, got {self.f}")


@dataclass
class DataConfig:
    """Where the coefficient vectors come from."""

    train_samples: int = 64
    """Training coefficient vectors drawn from U([-3, 3]^m) with ``seed`` and visited in
    per-epoch permutations. 0: an unlimited stream of fresh vectors, vector i a deterministic
    function of (seed, i), so the loss does not depend on the rank count and resume is exact."""
    val_samples: int = 8
    """Held-out coefficient vectors, drawn with ``val_seed``."""
    seed: int = 0
    """Seed of the training draw."""
    val_seed: int = 1_000_003
    """Seed of the held-out draw (keep it apart from ``seed``)."""
    sobol: bool = False
    """Draw with a scrambled Sobol sequence instead of pseudo-random numbers."""
    path: str | None = None
    """A pdeds HDF5 data file whose ``/coeffs`` replace the training draw."""
    val_path: str | None = None
    """A pdeds data file with reference solutions (``pdeds data --reference`` / ``pdeds solve``)
    at the evaluation resolution: its coefficients and ``u_ref`` are the held-out set, so no
    reference is solved at start-up (needed where AMG cannot run, e.g. 512^3)."""

    def validate(self) -> None:
        if self.train_samples < 0:
            raise PdedsError(
                f"data.train_samples: must be >= 0 (0: fresh samples), got {self.train_samples}"
            )
        if self.train_samples == 0 and self.path is not None:
            raise PdedsError(
                "data.train_samples: 0 streams fresh samples, but data.path names a fixed set; "
                "set data.train_samples to the number of its vectors to use, or drop data.path"
            )
        if self.val_samples < 1:
            raise PdedsError(f"data.val_samples: must be >= 1, got {self.val_samples}")
        for key in ("path", "val_path"):
            value = getattr(self, key)
            if value is not None and not Path(value).is_file():
                raise PdedsError(f"data.{key}: no file at {value}; create it with `pdeds data`")


@dataclass
class TrainConfig:
    """Length of the run and how often it reports."""

    steps: int = 200
    """Optimizer steps (global batches)."""
    eval_every: int = 50
    """Held-out evaluation every k steps (and at the end); 0 = only at the end."""
    checkpoint_every: int = 50
    """Checkpoint every k steps (and at the end, and on SIGTERM/SIGINT); 0 = only those."""
    log_every: int = 10
    """A metrics.jsonl row every k steps."""
    seed: int = 0
    """Seed of the weight initialisation."""
    eval_res: int | None = None
    """Resolution of the held-out evaluation (default problem.res, the finest level)."""
    reference: str = "amg"
    """Held-out reference solver (METHOD.md sec. 4): amg (assembled, host, ~2 KiB per unknown) |
    gmg (matrix-free multigrid CG, device, ~0.4 KiB: large eval_res) | matrix_free (Jacobi)."""
    keep_checkpoints: int = 3
    """How many complete checkpoints to keep (oldest removed first); 0 = keep all."""
    lr_schedule: str = "constant"
    """constant | cosine: lr x (r + (1 - r)(1 + cos(pi t)) / 2), t = step / steps, r =
    min_lr_ratio. Ignored when the DeepSpeed config has a "scheduler" block (DeepSpeed's own
    scheduler then drives the learning rate)."""
    warmup_steps: int = 0
    """Linear warm-up from 0 over this many steps (with lr_schedule)."""
    min_lr_ratio: float = 0.0
    """Final lr / initial lr of the cosine schedule."""
    time_limit: float | str | None = None
    """Wall-clock budget of the training (evaluation excluded, carried across resumes): seconds
    or a string such as "4m", "90s", "1h30m"; null or 0 = none. When it is spent the run finishes
    the step, checkpoints, evaluates and stops; ``--resume auto`` with a larger one continues."""
    loss_weighting: str = "none"
    """none: loss = mean_b J_h(U_b) (METHOD.md sec. 3). lifting: mean_b J_h(U_b) / J_h(g_b)
    with g the lifting u = 1 - x1 (for f = 0, J_h(g_b) = 1/2 int nu_b): each sample's minimiser
    is unchanged, but samples of large nu no longer dominate the batch."""

    def validate(self) -> None:
        if self.steps < 1:
            raise PdedsError(f"train.steps: must be >= 1, got {self.steps}")
        for key in ("eval_every", "checkpoint_every", "keep_checkpoints"):
            if getattr(self, key) < 0:
                raise PdedsError(f"train.{key}: must be >= 0, got {getattr(self, key)}")
        if self.log_every < 1:
            raise PdedsError(f"train.log_every: must be >= 1, got {self.log_every}")
        if self.lr_schedule not in LR_SCHEDULES:
            raise PdedsError(
                f"train.lr_schedule: {self.lr_schedule!r} is not one of {', '.join(LR_SCHEDULES)}"
            )
        if self.reference not in REFERENCE_METHODS:
            raise PdedsError(
                f"train.reference: {self.reference!r} is not one of "
                f"{', '.join(REFERENCE_METHODS)}; gmg scales to large eval_res"
            )
        if self.loss_weighting not in LOSS_WEIGHTINGS:
            raise PdedsError(
                f"train.loss_weighting: {self.loss_weighting!r} is not one of "
                f"{', '.join(LOSS_WEIGHTINGS)}"
            )
        if self.warmup_steps < 0:
            raise PdedsError(f"train.warmup_steps: must be >= 0, got {self.warmup_steps}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise PdedsError(f"train.min_lr_ratio: must be in [0, 1], got {self.min_lr_ratio}")
        parse_duration(self.time_limit)

    @property
    def time_limit_s(self) -> float | None:
        """``time_limit`` in seconds (None: no budget)."""
        return parse_duration(self.time_limit)


@dataclass
class DeepSpeedSection:
    """Which DeepSpeed JSON to use (relative paths: the YAML's folder, the CWD, the project)."""

    config: str = "ds_configs/zero0.json"


@dataclass
class ExperimentConfig:
    """The whole experiment."""

    problem: ProblemConfig = field(default_factory=ProblemConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    deepspeed: DeepSpeedSection = field(default_factory=DeepSpeedSection)

    def validate(self) -> None:
        """Every section's own checks, then the cross-section ones."""
        for f in dataclasses.fields(self):
            sub = getattr(self, f.name)
            if hasattr(sub, "validate"):
                sub.validate()
        if self.optim.name == "lbfgs" and (
            self.train.lr_schedule != "constant" or self.train.warmup_steps
        ):
            raise PdedsError(
                "train.lr_schedule / train.warmup_steps: L-BFGS picks its step by line search and "
                "optim.lr is its first trial step; a schedule would shrink it towards 0. Set "
                "train.lr_schedule: constant and train.warmup_steps: 0 for optim.name: lbfgs"
            )
        if self.optim.name == "gauss_newton" and self.model.norm in ("batch", "sync_batch"):
            raise PdedsError(
                f"model.norm: {self.model.norm} couples the samples of a micro-batch, so "
                "Gauss-Newton's per-sample curvature would not be the loss's; use model.norm "
                "group, instance or none with optim.name: gauss_newton"
            )
        ggn = self.optim.name == "kfac" and self.optim.kfac.curvature == "ggn"
        if ggn and self.model.norm in ("batch", "sync_batch"):
            raise PdedsError(
                f"model.norm: {self.model.norm} couples the samples of a micro-batch (and its "
                "running statistics would see K-FAC's extra curvature forward), so "
                "optim.kfac.curvature: ggn needs model.norm group, instance or none; or use "
                "optim.kfac.curvature: empirical"
            )
        if self.data.train_samples == 0:
            for i, lv in enumerate(self.schedule.level):
                if lv.epochs is not None:
                    raise PdedsError(
                        f"schedule.level[{i}].epochs: a fresh stream (data.train_samples: 0) "
                        "has no epochs; give the level steps, or set data.train_samples > 0"
                    )
        levels = self.schedule.resolutions_for(self.problem.res)
        for res in levels + ([self.train.eval_res] if self.train.eval_res else []):
            why = resolution_problem(self.model, res)
            if why is not None:
                raise PdedsError(
                    f"problem.res / schedule.resolutions / train.eval_res: {why} (model.arch: "
                    f"{self.model.arch})"
                )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
