"""Activation bytes of one training step, by executing it symbolically.

One training step of micro-batch b at resolution n (n^d nodes): a field nu (b, 1, n..), the
network's forward, the loss (``pdeds.train.step``'s, the energy J_h with the
configured ``train.loss_weighting``) and the backward into gradients that already exist (as in
every step after the first). Here it runs on the meta device: every op computes the shapes and
dtypes of its outputs and nothing else, so a 512^3 step takes the same fraction of a second as a
16^3 one and allocates nothing, whatever the network is.

``LiveBytes`` watches every op: an output whose storage it has not seen adds that storage's
bytes, and a weakref callback takes them off when autograd or Python drops the storage. Its
``trace`` is the live total after each new storage; the maximum is the step's peak A(n, b) above
what existed before it (parameters, gradients): saved activations, the loss's field temporaries,
transient gradients.

Every tensor of a step holds bytes affine in the micro-batch (a per-sample part and a shared
one), so where the op sequence does not depend on b, entry i of the trace is t_i(b) = c_i + s_i b
with s_i = t_i(b + 1) - t_i(b), and the largest micro-batch with A(n, b) <= R is
min_i floor((R - c_i) / s_i) over the entries with s_i > 0. Kernel workspaces (cuDNN's, oneDNN's
scratchpads and reorders) are no op's output, so they are not in A; ``measure.step_check``
measures a real step to say how much they add.
"""

from __future__ import annotations

import dataclasses
import weakref
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
"""DeepSpeed's model dtypes; its bf16 / fp16 engines hold the module's weights in them."""


@dataclass(frozen=True)
class Variant:
    """What a step's activations depend on besides n and b: weights' dtype and checkpointing."""

    dtype: str
    """fp32 | bf16 | fp16 (the DeepSpeed config's model dtype)."""
    checkpoint: bool
    """model.checkpoint: recompute stages in backward instead of saving their activations."""

    def __str__(self) -> str:
        return self.dtype + ("+ckpt" if self.checkpoint else "")


class LiveBytes(TorchDispatchMode):
    """Bytes of the storages created by ops under it that are still alive (see module doc)."""

    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.trace: list[int] = []
        self._seen: weakref.WeakKeyDictionary[Any, int] = weakref.WeakKeyDictionary()

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage()._cdata for t in _tensors((args, kwargs))}
        for t in _tensors(out):
            storage = t.untyped_storage()
            # an output on an input's storage (in-place, view) is no allocation, even when that
            # storage predates the step (a gradient accumulated into, a parameter's view)
            if storage._cdata not in inputs and storage not in self._seen:
                self._add(storage)
        return out

    def _add(self, storage: Any) -> None:
        nbytes = storage.nbytes()
        self._seen[storage] = nbytes
        self.live += nbytes
        self.trace.append(self.live)
        weakref.finalize(storage, self._free, nbytes)

    def _free(self, nbytes: int) -> None:
        self.live -= nbytes


def _tensors(tree: Any) -> list[torch.Tensor]:
    return [t for t in tree_leaves(tree) if isinstance(t, torch.Tensor)]


def build(dim: int, model_cfg: Any, variant: Variant, device: Any) -> torch.nn.Module:
    """The configured network (``pdeds.models.build_model``) on ``device`` in the variant's dtype,
    with zero gradients allocated, as it stands at the start of every step after the first."""
    from pdeds.models import build_model

    cfg = dataclasses.replace(model_cfg, checkpoint=variant.checkpoint)
    with torch.device(device):
        model = build_model(dim, cfg)
    model.to(DTYPES[variant.dtype])
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    return model


class _Fields:
    """``data`` for the trainer's loss: nu (len(idx), 1, res..) drawn in [0.5, 1.5) (the values
    matter to a real step only as a valid diffusivity)."""

    def __init__(self, dim: int, device: torch.device) -> None:
        self.dim, self.device = dim, device

    def nu(self, idx: np.ndarray, res: int) -> torch.Tensor:
        return torch.rand((len(idx), 1) + (res,) * self.dim, device=self.device) + 0.5


def training_step(model: torch.nn.Module, shape: tuple[int, ...], f: float, weighting: str) -> None:
    """The trainer's micro-batch loss (``pdeds.train.step.make_loss_fn``: nu, forward, the energy
    with its weighting) for nu of ``shape``, and its backward: the step ``LiveBytes`` sees."""
    from pdeds.train.step import make_loss_fn

    device = next(model.parameters()).device
    loss = make_loss_fn(model, _Fields(len(shape) - 2, device), shape[2], f, weighting)
    loss(np.arange(shape[0])).backward()


class Activations:
    """A(n, b), the peak activation bytes of one training step of one model, by symbolic
    execution; traces are cached per (variant, n, b), so each step is executed once."""

    _shared: ClassVar[dict[str, Activations]] = {}

    def __init__(self, dim: int, model_cfg: Any, f: float = 0.0, weighting: str = "none") -> None:
        self.dim, self.model_cfg, self.f, self.weighting = dim, model_cfg, f, weighting
        self._traces: dict[tuple[Variant, int, int], np.ndarray] = {}

    @classmethod
    def of(cls, cfg: Any) -> Activations:
        """The activations of experiment ``cfg``'s network, source term and loss weighting,
        shared in this process by every experiment that has the same (a study plans many)."""
        model = sorted((k, v) for k, v in vars(cfg.model).items() if k != "checkpoint")
        key = repr((cfg.problem.dim, model, cfg.problem.f, cfg.train.loss_weighting))
        if key not in cls._shared:
            cls._shared[key] = cls(
                cfg.problem.dim, cfg.model, cfg.problem.f, cfg.train.loss_weighting
            )
        return cls._shared[key]

    def trace(self, variant: Variant, n: int, b: int) -> np.ndarray:
        """Live bytes after each new storage of the step at (n, b)."""
        key = (variant, n, b)
        if key not in self._traces:
            model = build(self.dim, self.model_cfg, variant, "meta")
            with LiveBytes() as live:
                training_step(model, (b, 1) + (n,) * self.dim, self.f, self.weighting)
            self._traces[key] = np.array(live.trace or [0], dtype=np.int64)
        return self._traces[key]

    def accepts(self, n: int) -> bool:
        """Whether the network runs at resolution n (``pdeds.models.resolution_problem``)."""
        from pdeds.models import resolution_problem

        return resolution_problem(self.model_cfg, n) is None

    def bytes_per_node(self, variant: Variant) -> float | None:
        """A(n, b) / (b n^d) of the largest step executed so far in ``variant`` (None: none)."""
        done = [(b * n**self.dim, t.max()) for (v, n, b), t in self._traces.items() if v == variant]
        return float(max(done)[1] / max(done)[0]) if done else None

    def peak(self, variant: Variant, n: int, b: int) -> int:
        """A(n, b) in bytes."""
        return int(self.trace(variant, n, b).max())

    def largest(self, variant: Variant, n: int, b: int, room: float, cap: int) -> int:
        """The largest micro-batch m <= ``cap`` with A(n, m) <= ``room`` (0 if not even 1), from
        the traces at b and b + 1 (see the module docstring)."""
        t0, t1 = self.trace(variant, n, b), self.trace(variant, n, b + 1)
        if len(t0) != len(t1):  # the op sequence depends on b: bisect on executed steps
            lo, hi = 0, cap + 1
            while hi - lo > 1:
                mid = (lo + hi) // 2
                lo, hi = (mid, hi) if self.peak(variant, n, mid) <= room else (lo, mid)
            return lo
        slope = t1 - t0
        shared = t0 - b * slope
        if (shared + slope).max() > room:
            return 0
        grows = slope > 0
        if not grows.any():
            return cap
        return int(min(cap, ((int(room) - shared[grows]) // slope[grows]).min()))
