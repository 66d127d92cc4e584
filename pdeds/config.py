"""The experiment configuration: one typed tree, validated once.

An experiment YAML has the sections ``problem``, ``data``, ``model``, ``optim``, ``schedule``,
``train`` and ``deepspeed``. Precedence is CLI ``--set`` > file > dataclass defaults.
``--set a.b=value`` sets a field (value parsed as YAML: ``2``, ``1e-3``, ``true``, ``[1, 2]``);
``--set ds.<json.path>=value`` patches the DeepSpeed JSON named by ``deepspeed.config``.
Unknown keys are errors that list the valid ones. DeepSpeed settings (batch sizes, ZeRO, bf16,
scheduler) live only in the DeepSpeed JSON, in DeepSpeed's own schema.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from pdeds import dsconfig
from pdeds.dsconfig import DeepSpeedView
from pdeds.errors import PdedsError
from pdeds.models.config import ModelConfig
from pdeds.multigrid import ScheduleConfig, Visit, plan
from pdeds.optim import OptimConfig

PROJECT_ROOT = Path(__file__).resolve().parent.parent
LR_SCHEDULES = ("constant", "cosine")
LOSS_WEIGHTINGS = ("none", "lifting")
REFERENCE_METHODS = ("amg", "gmg", "matrix_free")  # physics.reference.METHODS, without scipy


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
    """Training coefficient vectors drawn from U([-3, 3]^m) with ``seed``."""
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
        if self.train_samples < 1:
            raise PdedsError(f"data.train_samples: must be >= 1, got {self.train_samples}")
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

    def lr_factor(self, step: int, total: int) -> float:
        """Multiplier of the configured lr at ``step`` (0-based) of ``total``."""
        warm = min(1.0, (step + 1) / self.warmup_steps) if self.warmup_steps else 1.0
        if self.lr_schedule == "constant":
            return warm
        t = min(1.0, step / max(1, total))
        r = self.min_lr_ratio
        return warm * (r + (1.0 - r) * 0.5 * (1.0 + math.cos(math.pi * t)))


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
        from pdeds.models import resolution_problem

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


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Convert a YAML value to the annotated type, or raise naming the key."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except PdedsError:
                continue
        raise PdedsError(f"{key}: {value!r} is not a valid {tp}")
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise PdedsError(f"{key}: expected a mapping of {_type_name(tp)} fields, got {value!r}")
        return build(tp, value, key)
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise PdedsError(f"{key}: expected a list, got {value!r}")
        args = typing.get_args(tp)
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise PdedsError(f"{key}: expected {len(args)} values, got {len(value)}")
            return tuple(_coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
        inner = args[0] if args else Any
        items = [_coerce(v, inner, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise PdedsError(f"{key}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise PdedsError(f"{key}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise PdedsError(f"{key}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise PdedsError(f"{key}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise PdedsError(f"{key}: expected a string, got {value!r}")
    return value


def build(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    """Instantiate dataclass ``cls`` from a mapping; unknown keys list the valid ones."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(data) - set(names))
    if unknown:
        where = prefix or "top level"
        raise PdedsError(
            f"unknown key(s) {', '.join(repr(k) for k in unknown)} in {where}; "
            f"valid keys: {', '.join(names)}"
        )
    kwargs = {}
    for name in names:
        if name in data:
            kwargs[name] = _coerce(data[name], hints[name], f"{prefix}.{name}" if prefix else name)
    return cls(**kwargs)


def parse_override(text: str) -> tuple[list[str], Any]:
    """'a.b.c=value' -> (['a', 'b', 'c'], yaml-parsed value)."""
    if "=" not in text:
        raise PdedsError(f"--set {text!r}: expected KEY=VALUE, e.g. --set optim.lr=1e-3")
    key, raw = text.split("=", 1)
    parts = [p for p in key.strip().split(".") if p]
    if not parts:
        raise PdedsError(f"--set {text!r}: empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return parts, value


def _set_path(tree: dict[str, Any], parts: list[str], value: Any) -> None:
    node = tree
    for p in parts[:-1]:
        nxt = node.setdefault(p, {})
        if not isinstance(nxt, dict):
            raise PdedsError(f"--set {'.'.join(parts)}: {p!r} is a value, not a section")
        node = nxt
    node[parts[-1]] = value


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read an experiment YAML into a dict; missing or malformed files are PdedsErrors."""
    p = Path(path)
    if not p.is_file():
        raise PdedsError(
            f"config file {path} not found; pass a YAML such as launch/configs/quickstart.yaml"
        )
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise PdedsError(
            f"config file {path} is not valid YAML: {str(e).splitlines()[0]}"
        ) from None
    if not isinstance(data, dict):
        raise PdedsError(f"config file {path} must hold a mapping of sections")
    return data


def find_file(name: str, base: Path | None) -> Path | None:
    """Resolve a relative path against the YAML's folder, the CWD, then the project root."""
    p = Path(name)
    if p.is_absolute():
        return p if p.is_file() else None
    for root in ([base] if base else []) + [Path.cwd(), PROJECT_ROOT]:
        if (root / p).is_file():
            return (root / p).resolve()
    return None


def load_ds_config(path: Path) -> dict[str, Any]:
    """Read a DeepSpeed JSON; malformed files are PdedsErrors."""
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise PdedsError(f"DeepSpeed config {path} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise PdedsError(f"DeepSpeed config {path} must hold a JSON object")
    return data


@dataclass
class Resolved:
    """A validated experiment and the DeepSpeed JSON it runs with."""

    cfg: ExperimentConfig
    ds: dict[str, Any]
    ds_path: Path
    view: DeepSpeedView
    """The typed view of ``ds`` (``pdeds.dsconfig.read``)."""


def resolve(
    config: str | Path | dict[str, Any] | None, overrides: list[str] | tuple[str, ...] = ()
) -> Resolved:
    """Load (YAML path, dict or None for defaults), apply ``--set`` overrides, validate."""
    if isinstance(config, dict):
        data, base = copy.deepcopy(config), None
    elif config is None:
        data, base = {}, None
    else:
        data, base = load_yaml(config), Path(config).resolve().parent
    ds_overrides = []
    for text in overrides:
        parts, value = parse_override(text)
        if parts[0] == "ds":
            if len(parts) < 2:
                raise PdedsError(
                    f"--set {text}: name a DeepSpeed key, e.g. ds.zero_optimization.stage=2"
                )
            ds_overrides.append((parts[1:], value))
        else:
            _set_path(data, parts, value)
    cfg = build(ExperimentConfig, data)
    ds_path = find_file(cfg.deepspeed.config, base)
    if ds_path is None:
        raise PdedsError(
            f"deepspeed.config: {cfg.deepspeed.config} not found (looked beside the YAML, in the "
            f"CWD and in {PROJECT_ROOT}); pick one of ds_configs/*.json"
        )
    ds = load_ds_config(ds_path)
    for parts, value in ds_overrides:
        _set_path(ds, parts, value)
    cfg.validate()
    view = dsconfig.read(ds)  # unknown or invalid DeepSpeed keys, up front
    from pdeds.optim import prepare_ds_config

    prepare_ds_config(cfg.optim, ds)  # optimizer vs ZeRO stage / offload / precision, up front
    return Resolved(cfg=cfg, ds=ds, ds_path=ds_path, view=view)


def batch_sizes(ds: dict[str, Any], world: int) -> tuple[int, int, int]:
    """(global batch, micro-batch per rank, accumulation steps) as DeepSpeed will derive them
    for ``world`` ranks (``pdeds.dsconfig.DeepSpeedView.batch_sizes``)."""
    return dsconfig.read(ds).batch_sizes(world)


def dump_yaml(cfg: ExperimentConfig) -> str:
    """The resolved config as YAML (what a run directory's config.yaml holds)."""
    return yaml.safe_dump(_plain(cfg.to_dict()), sort_keys=False)


def _plain(x: Any) -> Any:
    if isinstance(x, dict):
        return {k: _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    return x


def visits_for(res: Resolved, world: int, samples: int | None = None) -> list[Visit]:
    """The run's visit plan for ``world`` ranks (what the trainer follows).

    Args:
        res: the resolved experiment and its DeepSpeed JSON.
        world: number of data-parallel ranks.
        samples: training-set size when it differs from data.train_samples (a data file).
    """
    g, mb, _ = batch_sizes(res.ds, world)
    cfg = res.cfg
    return plan(
        cfg.schedule,
        finest_res=cfg.problem.res,
        total_steps=cfg.train.steps,
        samples=samples if samples is not None else cfg.data.train_samples,
        batch=g,
        micro_batch=mb,
        world=world,
    )
