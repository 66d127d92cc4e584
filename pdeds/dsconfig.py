"""One typed view of a DeepSpeed JSON, read by DeepSpeed's own config classes.

Every place in pdeds that needs a DeepSpeed setting (ZeRO stage, offload devices, dtype,
buckets, clipping, batch keys) asks ``read(ds)`` instead of walking the dict, so DeepSpeed's
defaults are its defaults (``reduce_bucket_size`` 5e8, ``overlap_comm`` on at stage 3 only,
``gradient_clipping`` 1.0 when the key is absent) and a value DeepSpeed would reject is
rejected here, before any rank starts.

Strict keys. DeepSpeed itself ignores a top-level key it does not know, so
``"zero_optimisation": {"stage": 2}`` would train at stage 0. ``read`` records which
top-level keys ``DeepSpeedConfig`` looks up while parsing (its own list of what it knows) and
refuses any other, naming the closest known key; inside ``zero_optimization`` (and the other
pydantic sections) DeepSpeed's models forbid unknown fields, and their error is turned into
the same one-line form.

Batch keys are read as written: ``batch_sizes(world)`` derives the global batch, micro-batch
and accumulation steps the way DeepSpeed will for ``world`` ranks, and says which key to change.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Any

from pdeds.errors import PdedsError

BATCH_KEYS = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps")
EXTRA_KNOWN = frozenset({"sequence_parallel_size"})
"""Top-level keys DeepSpeed reads outside ``DeepSpeedConfig`` (the engine, the launcher)."""


@dataclass(frozen=True)
class DeepSpeedView:
    """The settings of a DeepSpeed JSON pdeds depends on, with DeepSpeed's defaults filled in."""

    stage: int
    """zero_optimization.stage (0-3)."""
    offload_optimizer: str
    """Device of zero_optimization.offload_optimizer: "none", "cpu" or "nvme"."""
    offload_param: str
    """Device of zero_optimization.offload_param: "none", "cpu" or "nvme"."""
    dtype: str
    """Model (compute) dtype: "fp32", "bf16" or "fp16"."""
    grad_accum_dtype: str
    """Dtype gradients are accumulated in (data_types.grad_accum_dtype, default the model's)."""
    reduce_bucket_size: int
    allgather_bucket_size: int
    overlap_comm: bool
    contiguous_gradients: bool
    gradient_clipping: float
    """DeepSpeed's value: 1.0 when the JSON omits the key."""
    clipping_given: bool
    """True when the JSON sets gradient_clipping itself."""
    optimizer: str | None
    """Name in an "optimizer" block (pdeds refuses one: the experiment's optim section rules)."""
    scheduler: str | None
    """Name in a "scheduler" block (DeepSpeed's own LR scheduler), or None."""
    train_batch_size: int | None
    train_micro_batch_size_per_gpu: int | None
    gradient_accumulation_steps: int | None

    @property
    def half(self) -> bool:
        """True for 16-bit model weights (bf16 or fp16)."""
        return self.dtype != "fp32"

    @property
    def offloads(self) -> list[str]:
        """The zero_optimization offload keys whose device is not "none"."""
        return [
            key for key in ("offload_optimizer", "offload_param") if getattr(self, key) != "none"
        ]

    def batch_sizes(self, world: int) -> tuple[int, int, int]:
        """(global batch, micro-batch per rank, accumulation steps) for ``world`` ranks.

        Checks train_batch_size = micro x accumulation x world before DeepSpeed does, and says
        which key to change.
        """
        g = self.train_batch_size
        mb = self.train_micro_batch_size_per_gpu
        acc = self.gradient_accumulation_steps
        if g is None and mb is None:
            raise PdedsError(
                "the DeepSpeed config sets neither train_batch_size nor "
                "train_micro_batch_size_per_gpu; set at least one "
                "(e.g. --set ds.train_batch_size=8)"
            )
        if g is not None and mb is not None and acc is not None:
            if g != mb * acc * world:
                raise PdedsError(
                    f"batch sizes do not multiply out: train_batch_size {g} != micro-batch {mb} x "
                    f"accumulation {acc} x {world} rank(s) = {mb * acc * world}; change "
                    f"ds.train_batch_size to {mb * acc * world} or ds.gradient_accumulation_steps"
                )
            return g, mb, acc
        if g is not None and mb is not None:
            if g % (mb * world):
                raise PdedsError(
                    f"train_batch_size {g} is not divisible by micro-batch {mb} x {world} "
                    f"rank(s); change ds.train_batch_size to a multiple of {mb * world}"
                )
            return g, mb, g // (mb * world)
        if g is not None:
            acc = acc or 1
            if g % (acc * world):
                raise PdedsError(
                    f"train_batch_size {g} is not divisible by accumulation {acc} x {world} "
                    f"rank(s); change ds.train_batch_size to a multiple of {acc * world} or run "
                    "on a rank count that divides it"
                )
            return g, g // (acc * world), acc
        acc = acc or 1
        return mb * acc * world, mb, acc


def read(ds: dict[str, Any]) -> DeepSpeedView:
    """The typed view of the DeepSpeed JSON ``ds`` (a dict; left unchanged).

    Raises:
        PdedsError: an unknown key (with the closest known one), a value DeepSpeed's config
            classes reject, or a batch key that is not a positive integer.
    """
    if not isinstance(ds, dict):
        raise PdedsError("the DeepSpeed config must be a JSON object")
    batch = {key: ds.get(key) for key in BATCH_KEYS}
    for key, value in batch.items():
        if value is not None and (
            not isinstance(value, int) or isinstance(value, bool) or value < 1
        ):
            raise PdedsError(f"ds.{key}: must be a positive integer, got {value!r}")
    parsed, known = _parse(ds)
    unknown = sorted(set(ds) - known - EXTRA_KNOWN)
    if unknown:
        raise PdedsError(_unknown_key_message(unknown[0], sorted(known | EXTRA_KNOWN), "ds"))
    zero = parsed.zero_config
    return DeepSpeedView(
        stage=int(zero.stage),
        offload_optimizer=_device(zero.offload_optimizer),
        offload_param=_device(zero.offload_param),
        dtype=_dtype(parsed),
        grad_accum_dtype=_accum_dtype(parsed.grad_accum_dtype, _dtype(parsed)),
        reduce_bucket_size=int(zero.reduce_bucket_size),
        allgather_bucket_size=int(zero.allgather_bucket_size),
        overlap_comm=bool(zero.overlap_comm),
        contiguous_gradients=bool(zero.contiguous_gradients),
        gradient_clipping=float(parsed.gradient_clipping),
        clipping_given="gradient_clipping" in ds,
        optimizer=parsed.optimizer_name,
        scheduler=parsed.scheduler_name,
        **batch,
    )


class _Recorder(dict):
    """A dict that records every key looked up in it (``get``, ``[]``, ``in``, ``keys()``)."""

    def __init__(self, data: dict[str, Any], seen: set[str]) -> None:
        super().__init__(data)
        self.seen = seen

    def get(self, key: Any, default: Any = None) -> Any:
        self.seen.add(key)
        return super().get(key, default)

    def __getitem__(self, key: Any) -> Any:
        self.seen.add(key)
        return super().__getitem__(key)

    def __contains__(self, key: Any) -> bool:
        self.seen.add(key)
        return super().__contains__(key)

    def keys(self) -> Any:  # type: ignore[override]
        return _RecordingKeys(self)


class _RecordingKeys:
    """``keys()`` of a ``_Recorder``: membership tests are recorded too."""

    def __init__(self, owner: _Recorder) -> None:
        self.owner = owner

    def __contains__(self, key: Any) -> bool:
        return key in self.owner

    def __iter__(self) -> Any:
        return iter(dict.keys(self.owner))

    def __len__(self) -> int:
        return len(self.owner)


def _parse(ds: dict[str, Any]) -> tuple[Any, set[str]]:
    """DeepSpeedConfig of ``ds`` with batch keys made world-size neutral, and the top-level keys
    it looked up. Pydantic errors become PdedsErrors naming the key."""
    import pydantic
    from deepspeed.runtime.config import DeepSpeedConfig

    neutral = {k: v for k, v in ds.items() if k not in BATCH_KEYS}
    neutral["train_micro_batch_size_per_gpu"] = 1
    seen: set[str] = set()
    try:
        parsed = DeepSpeedConfig(_Recorder(neutral, seen))
    except pydantic.ValidationError as err:
        raise PdedsError(_pydantic_message(err, ds)) from None
    except (AssertionError, ValueError, TypeError, KeyError) as err:
        raise PdedsError(f"DeepSpeed rejects the config: {err}; fix the DeepSpeed JSON") from None
    return parsed, {k for k in seen if isinstance(k, str)}


def _pydantic_message(err: Any, ds: dict[str, Any]) -> str:
    """One line for the first error of one of DeepSpeed's pydantic config models."""
    first = err.errors()[0]
    loc = [str(p) for p in first.get("loc", ())]
    model = _model_named(err.title)
    section = next((k for k, v in ds.items() if isinstance(v, dict) and loc and loc[0] in v), None)
    where = ".".join(["ds"] + ([section] if section else []) + loc[:-1])
    if first.get("type") == "extra_forbidden" and loc:
        return _unknown_key_message(loc[-1], _fields(model, loc[:-1]), where)
    key = loc[-1] if loc else ""
    return f"{where}.{key}: {first.get('msg', 'invalid value')}; fix it in the DeepSpeed JSON"


def _model_named(title: str) -> Any:
    """The DeepSpeed pydantic config model class called ``title`` (None if not found)."""
    from deepspeed.runtime.config_utils import DeepSpeedConfigModel

    todo = [DeepSpeedConfigModel]
    while todo:
        cls = todo.pop()
        if cls.__name__ == title:
            return cls
        todo += cls.__subclasses__()
    return None


def _fields(model: Any, path: list[str]) -> list[str]:
    """Field names and aliases of ``model`` after following the fields named in ``path``."""
    import typing

    import pydantic

    for name in path:
        if model is None or name not in getattr(model, "model_fields", {}):
            return []
        ann = model.model_fields[name].annotation
        args = [a for a in (typing.get_args(ann) or (ann,)) if isinstance(a, type)]
        model = next((a for a in args if issubclass(a, pydantic.BaseModel)), None)
    if model is None:
        return []
    names = set(model.model_fields)
    names |= {f.alias for f in model.model_fields.values() if f.alias}
    return sorted(names)


def _unknown_key_message(key: str, known: list[str], where: str) -> str:
    close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
    hint = f"did you mean {where}.{close[0]}?" if close else f"known keys: {', '.join(known)}"
    return f"{where}.{key}: DeepSpeed does not know this key (it would ignore it silently); {hint}"


def _device(offload: Any) -> str:
    if offload is None:
        return "none"
    device = getattr(offload, "device", "none")
    return str(getattr(device, "value", device) or "none")


def _dtype(parsed: Any) -> str:
    if parsed.bfloat16_config.enabled:
        return "bf16"
    if parsed.float16_config.enabled:
        return "fp16"
    return "fp32"


def _accum_dtype(raw: Any, model_dtype: str) -> str:
    names = {"fp32": "fp32", "float32": "fp32", "bf16": "bf16", "bfloat16": "bf16"}
    names |= {"fp16": "fp16", "float16": "fp16"}
    return names.get(str(raw).lower(), model_dtype) if raw is not None else model_dtype
