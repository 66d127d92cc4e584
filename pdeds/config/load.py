"""Loading an experiment: a YAML file or a dict, ``--set`` overrides, coercion, one validation.

Precedence is CLI ``--set`` > file > dataclass defaults. ``--set a.b=value`` sets a field (value
parsed as YAML: ``2``, ``1e-3``, ``true``, ``[1, 2]``); ``--set ds.<json.path>=value`` patches the
DeepSpeed JSON named by ``deepspeed.config``. Unknown keys are errors that list the valid ones.

YAML values are coerced to the annotated types here rather than by pydantic (2.14): its lax
mode turns ``true`` into 1, ``1`` into True and ``"7"`` into 7; its strict mode refuses the
string PyYAML makes of ``1e-3`` and, for stdlib dataclasses, any plain mapping. Here an integer
field takes integers (and integral floats), a bool field true/false only, and a number may be
written as a string.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import re
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from pdeds import dsconfig
from pdeds.config.schema import ExperimentConfig
from pdeds.dsconfig import DeepSpeedView
from pdeds.errors import PdedsError
from pdeds.multigrid import Visit, plan

PROJECT_ROOT = Path(__file__).resolve().parents[2]
_EXPONENT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")
_EXPECTED = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}


def _scalar(value: Any, tp: type, key: str) -> Any:
    """``value`` as the scalar type ``tp`` (bool, int, float or str), or an error naming ``key``."""
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if (tp is bool and isinstance(value, bool)) or (tp is str and isinstance(value, str)):
        return value
    if tp is int and number and float(value).is_integer():
        return int(value)
    if tp is float and (number or isinstance(value, str)):
        try:
            return float(value)
        except ValueError:
            pass
    raise PdedsError(f"{key}: expected {_EXPECTED[tp]}, got {value!r}")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Convert a YAML value to the annotated type ``tp``, or raise naming the key."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, arg, key)
            except PdedsError:
                continue
        raise PdedsError(f"{key}: {value!r} is not a valid {tp}")
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise PdedsError(f"{key}: expected a mapping of {tp.__name__} fields, got {value!r}")
        return build(tp, value, key)
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise PdedsError(f"{key}: expected a list, got {value!r}")
        fixed = origin is tuple and args and args[-1] is not Ellipsis
        if fixed and len(value) != len(args):
            raise PdedsError(f"{key}: expected {len(args)} values, got {len(value)}")
        kinds = args if fixed else [args[0] if args else Any] * len(value)
        items = [_coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, kinds))]
        return tuple(items) if origin is tuple else items
    return _scalar(value, tp, key) if tp in _EXPECTED else value


def build(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    """Instantiate dataclass ``cls`` from a mapping; unknown keys list the valid ones."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(data) - set(names))
    if unknown:
        raise PdedsError(
            f"unknown key(s) {', '.join(repr(k) for k in unknown)} in {prefix or 'top level'}; "
            f"valid keys: {', '.join(names)}"
        )
    key = (lambda n: f"{prefix}.{n}") if prefix else (lambda n: n)
    return cls(**{n: _coerce(data[n], hints[n], key(n)) for n in names if n in data})


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


def _numbers(value: Any) -> Any:
    """Exponent literals as floats, recursively: PyYAML reads 1e-3 (no dot) as a string, and a
    DeepSpeed value has no schema here to coerce it."""
    if isinstance(value, dict):
        return {k: _numbers(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_numbers(v) for v in value]
    if isinstance(value, str) and _EXPONENT.fullmatch(value.strip()):
        return float(value)
    return value


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
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        raise PdedsError(
            f"config file {path} is not valid YAML: {str(e).splitlines()[0]}"
        ) from None
    if data is None:
        raise PdedsError(
            f"config file {path} is empty; write the sections to set (see "
            "launch/configs/quickstart.yaml), or `{}` for every default"
        )
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
        if parts[0] != "ds":
            _set_path(data, parts, value)
        elif len(parts) < 2:
            raise PdedsError(
                f"--set {text}: name a DeepSpeed key, e.g. ds.zero_optimization.stage=2"
            )
        else:
            ds_overrides.append((parts[1:], _numbers(value)))
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
    """Tuples as lists, recursively (safe_dump writes no tuples)."""
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
        samples: training-set size when it differs from data.train_samples (a data file);
            0 for a fresh stream.
    """
    g, mb, _ = res.view.batch_sizes(world)
    cfg = res.cfg
    return plan(
        cfg.schedule,
        finest_res=cfg.problem.res,
        total_steps=cfg.train.steps,
        time_limit_s=cfg.train.time_limit_s,
        samples=cfg.data.train_samples if samples is None else samples,
        batch=g,
        micro_batch=mb,
        world=world,
    )
