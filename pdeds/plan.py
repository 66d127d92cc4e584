"""Memory plan of a run: does it fit, what is the largest micro-batch, what to change if not.

Per rank, at a level of resolution n (n^d nodes) and micro-batch b, the device holds

    M(n, b) = S + B + (c b + e) n^d + o

- S, the model states (parameters, gradients, optimizer states) under the configured ZeRO stage
  and offload, counted in bytes per parameter as DeepSpeed's own estimators count them
  (``estimate_zero2_model_states_mem_needs`` / ``estimate_zero3_model_states_mem_needs``:
  2 B of 16-bit parameters + 18 B of 16-bit and fp32 gradients, fp32 master weights and the two
  Adam moments, partitioned over the W ranks as the stage says); ZeRO 0 and 1, fp32 and other
  optimizers by the same accounting (see ``model_state_bytes``).
- B, DeepSpeed's gradient bucket: ``reduce_bucket_size`` elements (twice with ``overlap_comm``
  at stage 1/2), allocated whatever the model size; the estimators leave it out.
- (c b + e) n^d + o, the forward+backward peak of the U-Net and the energy J_h: c bytes per node
  per sample (saved activations, the energy's field temporaries and gradients), e bytes per node
  per micro-batch whatever its size (per-call workspaces), o a constant. c, e, o are MEASURED:
  the peak of one training step of the configured model at two small resolutions and two
  micro-batches, separately for fp32/bf16 and with/without activation checkpointing (torch's
  CUDA peak statistics on a GPU, the profiler's allocation record on CPU), in a fresh
  subprocess; see ``calibrate``. The energy alone is calibrated the same way to report its share.

The host holds, per node, what DeepSpeed's estimators say (offloaded states, and the fp32 model
each process builds before moving it to its device, times their ``additional_buffer_factor``).

``check`` runs real training steps of a config (``deepspeed.initialize`` + ``engine_step``) at
small resolutions in fresh subprocesses and compares the measured peak with ``M``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pdeds.errors import PdedsError

GiB = float(2**30)
DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
VARIANTS = ("fp32", "fp32+ckpt", "bf16", "bf16+ckpt")
"""Calibrated (dtype, activation checkpointing) combinations; fp16 uses the bf16 fit."""
DS_DEFAULTS = {
    "reduce_bucket_size": 500_000_000,
    "contiguous_gradients": True,
    "stage3_max_live_parameters": 1_000_000_000,
}
"""DeepSpeed's defaults for the zero_optimization keys the plan reads (deepspeed/runtime/zero)."""
ADDITIONAL_BUFFER_FACTOR = 1.5
"""DeepSpeed's estimators multiply host memory by this."""
CALIBRATION_VOXELS = 12_000
"""The smaller calibration resolution has at least this many nodes: below it, per-layer
transients of the weights (not of the fields) set the peak."""


# ---- the run's setup ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Hardware:
    """Where the run goes: ``nodes`` x ``gpus_per_node`` ranks."""

    gpus_per_node: int = 1
    nodes: int = 1
    gpu_mem_gib: float = 80.0
    """Memory of one device (GiB); for CPU ranks, the memory one rank may use."""
    host_mem_gib: float | None = None
    """Host memory per node (GiB); None = not checked."""
    reserve: float = 0.1
    """Fraction of device memory kept free for the CUDA context, cuDNN workspaces outside the
    caching allocator, and fragmentation (none of which torch's peak statistics count)."""

    @property
    def world(self) -> int:
        return self.gpus_per_node * self.nodes

    @property
    def usable_bytes(self) -> float:
        return self.gpu_mem_gib * GiB * (1.0 - self.reserve)

    def validate(self) -> None:
        """Raise PdedsError naming the bad flag and the fix."""
        for flag, v in (("--gpus", self.gpus_per_node), ("--nodes", self.nodes)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise PdedsError(f"{flag}: must be an integer >= 1, got {v!r}; e.g. {flag} 8")
        if not (self.gpu_mem_gib > 0 and math.isfinite(self.gpu_mem_gib)):
            raise PdedsError(f"--gpu-mem: must be a positive number of GiB, got {self.gpu_mem_gib}")
        if self.host_mem_gib is not None and not (
            self.host_mem_gib > 0 and math.isfinite(self.host_mem_gib)
        ):
            raise PdedsError(
                f"--host-mem: must be a positive number of GiB, got {self.host_mem_gib}"
            )
        if not 0.0 <= self.reserve < 1.0:
            raise PdedsError(f"--reserve: must lie in [0, 1), got {self.reserve}; e.g. 0.1")


@dataclass(frozen=True)
class ZeroSetup:
    """The DeepSpeed settings that decide model-state memory (read by ``zero_setup``)."""

    stage: int = 0
    offload_optimizer: bool = False
    offload_param: bool = False
    dtype: str = "fp32"
    """Model (compute) dtype: fp32 | bf16 | fp16."""
    grad_accum_dtype: str = "fp32"
    reduce_bucket_size: int = DS_DEFAULTS["reduce_bucket_size"]
    overlap_comm: bool = False
    contiguous_gradients: bool = True
    max_live_parameters: int = DS_DEFAULTS["stage3_max_live_parameters"]

    @property
    def half(self) -> bool:
        return self.dtype != "fp32"


def _offload_on(zero: dict[str, Any], key: str) -> bool:
    return str((zero.get(key) or {}).get("device", "none") or "none") != "none"


def zero_setup(ds: dict[str, Any]) -> ZeroSetup:
    """The ZeRO stage, offload, dtypes and buffer sizes of a DeepSpeed config (with DS defaults)."""
    zero = ds.get("zero_optimization") or {}
    stage = int(zero.get("stage", 0) or 0)
    if stage not in (0, 1, 2, 3):
        raise PdedsError(f"ds.zero_optimization.stage: {stage} is not 0, 1, 2 or 3")
    dtype = "fp32"
    for half in ("bf16", "fp16"):
        if (ds.get(half) or {}).get("enabled", False):
            dtype = half
    accum = str((ds.get("data_types") or {}).get("grad_accum_dtype") or dtype)
    accum = {"fp32": "fp32", "float32": "fp32", "bf16": "bf16", "bfloat16": "bf16"}.get(
        accum, dtype
    )
    return ZeroSetup(
        stage=stage,
        offload_optimizer=_offload_on(zero, "offload_optimizer"),
        offload_param=_offload_on(zero, "offload_param"),
        dtype=dtype,
        grad_accum_dtype=accum,
        reduce_bucket_size=int(
            float(zero.get("reduce_bucket_size", DS_DEFAULTS["reduce_bucket_size"]))
        ),
        overlap_comm=bool(zero.get("overlap_comm", stage == 3)),
        contiguous_gradients=bool(zero.get("contiguous_gradients", True)),
        max_live_parameters=int(
            float(zero.get("stage3_max_live_parameters", DS_DEFAULTS["stage3_max_live_parameters"]))
        ),
    )


# ---- model states ------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelStates:
    """Bytes of parameters, gradients and optimizer states: per rank on the device, per node on
    the host (before DeepSpeed's buffer factor), plus the totals."""

    params_device: float
    grads_device: float
    optimizer_device: float
    params_host: float
    grads_host: float
    optimizer_host: float
    buffers_device: float
    """DeepSpeed's gradient bucket (not part of its estimators)."""
    host_total: float
    """Host bytes per node as DeepSpeed's estimators count them (x additional_buffer_factor)."""
    deepspeed_estimate: dict[str, Any] | None = None
    """DeepSpeed's own estimator's answer where one applies (16-bit Adam, ZeRO 2/3)."""

    @property
    def device_total(self) -> float:
        """Parameters + gradients + optimizer states on the device (what DS's estimators count)."""
        return self.params_device + self.grads_device + self.optimizer_device


def optimizer_state_bytes(optim: Any, model: Any = None) -> tuple[float, float]:
    """(fp32 bytes per parameter, extra bytes) of the optimizer's state.

    adam/adamw: two moments, 8 B. sgd: momentum buffer, 4 B (0 without momentum). lbfgs: m
    pairs (s, y) and three flat work vectors, 4 (2m + 3) B. kfac: its inner optimizer's bytes plus
    the Kronecker factors A, G, their eigenvectors and eigenvalues, 4 (2 (a^2 + g^2) + a + g) B per
    layer (a, g the factor sizes; needs ``model``).
    """
    name = optim.name
    if name in ("adam", "adamw"):
        return 8.0, 0.0
    if name == "sgd":
        return (4.0 if optim.momentum > 0 else 0.0), 0.0
    if name == "lbfgs":
        return 4.0 * (2 * optim.lbfgs.history_size + 3), 0.0
    inner = 8.0 if optim.kfac.inner == "adam" else (4.0 if optim.momentum > 0 else 0.0)
    extra = 0.0
    if model is not None:
        from pdeds.optim.kfac_layers import LayerHelper, supported

        for name_, module in model.named_modules():
            if supported(module):
                h = LayerHelper(name_, module)
                extra += 4.0 * (2 * (h.a_dim**2 + h.g_dim**2) + h.a_dim + h.g_dim)
    return inner, extra


def count_model_params(model: Any) -> tuple[int, int]:
    """(total parameters, largest layer's parameters), counted as DeepSpeed's estimators do."""
    from deepspeed.runtime.zero.stage3 import model_to_params

    total, largest = model_to_params(model)
    return int(total), int(largest)


def model_state_bytes(
    total_params: int,
    largest_layer_params: int,
    zero: ZeroSetup,
    *,
    optimizer_bytes: float = 8.0,
    optimizer_extra: float = 0.0,
    gpus_per_node: int = 1,
    nodes: int = 1,
) -> ModelStates:
    """Model-state bytes per rank (device) and per node (host) for a ZeRO setup.

    With P parameters, W = nodes x gpus ranks, b = 2 (16-bit) or 4 (fp32) bytes of the model
    dtype, s optimizer bytes per parameter, and the fp32 master copy m = 4 B (ZeRO >= 1 always
    keeps one; ZeRO 0 only with 16-bit weights) and fp32 gradient g32 = 4 B (16-bit only):

        stage 0: b P params + b P grads + (g32 + m + s) P optimizer          (all replicated)
        stage 1: b P params + b P grads + (g32 + m + s) P / W
        stage 2: b P params + (b + g32) P / W grads + (m + s) P / W
        stage 3: (b P / W + 4 L) params + 4 P / W grads + (m + s) P / W      (L largest layer)

    For 16-bit Adam (s = 8) stage 2 gives 2 P + 18 P / W and stage 3 4 L + 18 P / W: DeepSpeed's
    ``estimate_zero2/3_model_states_mem_needs`` (which count 18 B as 16-bit + fp32 gradients,
    fp32 master, two moments). Offload moves the optimizer part (and at stage 3 with
    offload_param the parameters) to the host, which holds per node what those estimators say:
    max(4 P per process building the model, the offloaded states) x 1.5.
    """
    p, big = float(total_params), float(largest_layer_params)
    w, g, n = gpus_per_node * nodes, gpus_per_node, nodes
    z = zero
    b = DTYPE_BYTES[z.dtype]
    g32 = 4.0 if z.half else 0.0
    master = 4.0 if (z.half or z.stage >= 1) else 0.0
    s = optimizer_bytes
    extra = optimizer_extra
    offload_opt = z.offload_optimizer and z.stage >= 1
    offload_par = z.offload_param and z.stage == 3
    params_h = grads_h = opt_h = 0.0
    if z.stage == 0:
        params, grads, opt = b * p, b * p, (g32 + master + s) * p + extra
    elif z.stage in (1, 2) and not offload_opt:
        params = b * p
        if z.stage == 1:
            grads, opt = b * p, (g32 + master + s) * p / w + extra
        else:
            grads, opt = (b + g32) * p / w, (master + s) * p / w + extra
    elif z.stage in (1, 2):
        params, grads, opt = b * p, 0.0, 0.0
        grads_h, opt_h = 4.0 * p * g / w, ((master + s) * p + extra) * g / w
    else:
        gathered = 4.0 * big
        grads, opt = 4.0 * p / w, (master + s) * p / w + extra
        params = b * p / w + gathered
        if offload_opt:
            grads_h, opt_h = grads * g, opt * g
            grads = opt = 0.0
        if offload_par:
            params_h, params = b * p / w * g, gathered
    host = _host_bytes(p, b, s, z, g, n, offload_opt, offload_par)
    states = ModelStates(
        params_device=params,
        grads_device=grads,
        optimizer_device=opt,
        params_host=params_h,
        grads_host=grads_h,
        optimizer_host=opt_h,
        buffers_device=bucket_bytes(z, total_params),
        host_total=host,
    )
    return dataclasses.replace(
        states,
        deepspeed_estimate=_deepspeed_estimate(total_params, largest_layer_params, z, s, g, n),
    )


def _host_bytes(
    p: float, b: int, s: float, z: ZeroSetup, g: int, n: int, offload_opt: bool, offload_par: bool
) -> float:
    """Host bytes per node, following DeepSpeed's estimators (zero_init=False: pdeds builds the
    full model in every process before DeepSpeed partitions it)."""
    f = ADDITIONAL_BUFFER_FACTOR
    states = 4.0 + 4.0 + s  # fp32 gradients + fp32 master + optimizer
    if z.stage == 3:
        if offload_par:
            return p * max(4.0 * g, (b + states) / n) * f
        if offload_opt:
            return p * max(4.0 * g, states / n) * f
        return p * 4.0 * g * f
    if offload_opt:
        return p * max(4.0 * g * n, states) * f
    return p * 4.0 * g * f


def _deepspeed_estimate(
    total: int, largest: int, z: ZeroSetup, s: float, g: int, n: int
) -> dict[str, Any] | None:
    """DeepSpeed's estimator's (gpu, cpu) bytes where it applies: 16-bit Adam at stage 2 or 3."""
    if not (z.half and s == 8.0 and z.stage in (2, 3)):
        return None
    if z.stage == 2:
        from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

        cpu, gpu = estimate_zero2_model_states_mem_needs(
            total, num_gpus_per_node=g, num_nodes=n, cpu_offload=z.offload_optimizer
        )
        fn = "estimate_zero2_model_states_mem_needs"
    else:
        from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs

        cpu, gpu, _ = estimate_zero3_model_states_mem_needs(
            total,
            largest,
            num_gpus_per_node=g,
            num_nodes=n,
            cpu_offload=z.offload_optimizer,
            cpu_offload_params=z.offload_param,
            zero_init=False,
        )
        fn = "estimate_zero3_model_states_mem_needs"
    return {"function": fn, "gpu_bytes": int(gpu), "cpu_bytes": int(cpu)}


def bucket_bytes(z: ZeroSetup, total_params: int) -> float:
    """DeepSpeed's contiguous gradient bucket: reduce_bucket_size elements of the reduction dtype
    (stage 1: the gradient-accumulation dtype; 2 and 3: the model dtype), twice with overlap_comm
    at stage 1/2; allocated at that size even for a smaller model. Stage 3 also gathers up to
    stage3_max_live_parameters 16-bit parameters (bounded by the model)."""
    if z.stage == 0 or not z.contiguous_gradients:
        return 0.0
    if z.stage in (1, 2):
        dtype = z.grad_accum_dtype if z.stage == 1 else z.dtype
        copies = 2 if z.overlap_comm else 1
        return float(z.reduce_bucket_size * DTYPE_BYTES[dtype] * copies)
    live = min(z.max_live_parameters, total_params) * DTYPE_BYTES[z.dtype] if z.offload_param else 0
    return float(z.reduce_bucket_size * DTYPE_BYTES[z.dtype] + live)


# ---- activation calibration --------------------------------------------------------------------


@dataclass(frozen=True)
class Fit:
    """peak(n, b) = (per_sample b + per_batch) n^d + offset, bytes (d = dim)."""

    per_sample: float
    """c: bytes per node per sample."""
    per_batch: float
    """e: bytes per node per micro-batch, whatever its size."""
    offset: float
    """o: bytes."""
    points: tuple[tuple[int, int, float], ...] = ()
    """The measurements (n, b, peak bytes) it was fitted to."""

    def bytes(self, n: int, batch: int, dim: int) -> float:
        return (self.per_sample * batch + self.per_batch) * float(n) ** dim + self.offset

    @classmethod
    def from_points(cls, points: list[tuple[int, int, float]], dim: int) -> Fit:
        """Solve for (c, e, o) from three measurements (n1, b1), (n2, b1), (n2, b2), b2 != b1.

        Same micro-batch, two resolutions give (c b1 + e) and o; same resolution, two
        micro-batches give c.
        """
        (n1, b1, p1), (n2, b1_, p2), (n2_, b2, p3) = points
        if b1 != b1_ or n2 != n2_ or n1 == n2 or b1 == b2:
            raise ValueError("calibration points must be (n1, b1), (n2, b1), (n2, b2)")
        v1, v2 = float(n1) ** dim, float(n2) ** dim
        slope = (p2 - p1) / (v2 - v1)
        offset = p1 - slope * v1
        c = (p3 - p2) / ((b2 - b1) * v2)
        return cls(per_sample=c, per_batch=slope - c * b1, offset=offset, points=tuple(points))


@dataclass(frozen=True)
class Calibration:
    """Measured peaks of one model on one device kind: a Fit per variant and for the energy."""

    device: str
    dim: int
    model: dict[str, Any]
    resolutions: tuple[int, int]
    micro_batches: tuple[int, int]
    step: dict[str, Fit]
    """Variant ("fp32", "bf16", "+ckpt") -> fit of a whole forward+energy+backward."""
    energy: Fit
    """The energy J_h alone (fp32 field, forward + backward)."""
    torch_version: str = ""
    method: str = ""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Calibration:
        def fit(x: dict[str, Any]) -> Fit:
            return Fit(
                per_sample=float(x["per_sample"]),
                per_batch=float(x["per_batch"]),
                offset=float(x["offset"]),
                points=tuple(tuple(p) for p in x.get("points", ())),
            )

        return cls(
            device=d["device"],
            dim=int(d["dim"]),
            model=dict(d["model"]),
            resolutions=tuple(d["resolutions"]),
            micro_batches=tuple(d["micro_batches"]),
            step={k: fit(v) for k, v in d["step"].items()},
            energy=fit(d["energy"]),
            torch_version=d.get("torch_version", ""),
            method=d.get("method", ""),
        )


def variant(dtype: str, checkpoint: bool) -> str:
    """The calibration key of a (dtype, checkpointing) combination."""
    return ("fp32" if dtype == "fp32" else "bf16") + ("+ckpt" if checkpoint else "")


def default_calibration_resolutions(dim: int, depth: int) -> tuple[int, int]:
    """Two allowed resolutions: the smallest with >= CALIBRATION_VOXELS nodes, then the smallest
    with >= 2.3 x as many (so the two differ enough for the fit)."""
    from pdeds.models.unet import allowed_resolutions

    step = 2**depth
    cands = allowed_resolutions(depth, 4096)
    n1 = next(n for n in cands if n**dim >= CALIBRATION_VOXELS and n >= 3 * step)
    n2 = next(n for n in cands if n**dim >= 2.3 * n1**dim)
    return n1, n2


def measure_peak(fn: Callable[[], Any], device: Any) -> float:
    """Peak bytes allocated by ``fn()`` above what was allocated before it.

    CUDA: ``torch.cuda.max_memory_allocated`` after a reset. CPU: the running sum of the
    allocator's records in torch's profiler (``profile_memory``), i.e. the same tensor-allocator
    view; memory freed that was allocated before ``fn`` is not subtracted.
    """
    import torch

    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        return float(torch.cuda.max_memory_allocated(device) - base)
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    events.sort(key=lambda e: e.start_ns())
    current = peak = 0
    for e in events:
        current += e.nbytes()
        peak = max(peak, current)
    return float(peak)


def _step_peak(model: Any, n: int, batch: int, dim: int, device: Any) -> float:
    """Peak of one forward + energy + backward (after a warm-up step that allocates the grads)."""
    import torch

    from pdeds.physics import fem

    nu = torch.rand((batch, 1) + (n,) * dim, device=device) + 0.5

    def step() -> None:
        u = model(nu)
        fem.energy(u.float(), nu).mean().backward()

    step()
    return measure_peak(step, device)


def _energy_peak(n: int, batch: int, dim: int, device: Any) -> float:
    """Peak of J_h alone, forward + backward, of a float32 field (the loss's temporaries)."""
    import torch

    from pdeds.physics import fem

    shape = (batch, 1) + (n,) * dim
    u = torch.rand(shape, device=device, requires_grad=True)
    nu = torch.rand(shape, device=device) + 0.5

    def step() -> None:
        fem.energy(u, nu).mean().backward()

    step()
    return measure_peak(step, device)


def run_calibration(
    dim: int,
    model: dict[str, Any],
    resolutions: tuple[int, int],
    micro_batches: tuple[int, int] = (2, 1),
    device: str | None = None,
    variants: tuple[str, ...] = VARIANTS,
) -> Calibration:
    """Measure the forward+backward peaks of the U-Net ``model`` (a ``model`` config section) and
    fit ``Fit`` per variant. Runs in this process; ``calibrate`` runs it in a fresh one.

    Micro-batch 2 first: on CPU, torch picks an im2col convolution for fp32 micro-batch 1 at small
    sizes (a CPU-only transient); the (n2, 1) point still measures it.
    """
    import torch

    from pdeds.config import build
    from pdeds.models.unet import UNet, UNetConfig

    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    n1, n2 = resolutions
    b1, b2 = micro_batches
    points = [(n1, b1), (n2, b1), (n2, b2)]
    step: dict[str, Fit] = {}
    for key in variants:
        cfg = build(UNetConfig, {**model, "checkpoint": key.endswith("+ckpt")}, "model")
        torch.manual_seed(0)
        net = UNet(dim, cfg).to(dev)
        if key.startswith("bf16"):
            net = net.to(torch.bfloat16)
        peaks = [(n, b, _step_peak(net, n, b, dim, dev)) for n, b in points]
        step[key] = Fit.from_points(peaks, dim)
        del net
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    energy = Fit.from_points([(n, b, _energy_peak(n, b, dim, dev)) for n, b in points], dim)
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
    return Calibration(
        device=f"{dev.type}: {name}" if dev.type == "cuda" else "cpu",
        dim=dim,
        model=dict(model),
        resolutions=(n1, n2),
        micro_batches=(b1, b2),
        step=step,
        energy=energy,
        torch_version=torch.__version__,
        method="torch.cuda.max_memory_allocated" if dev.type == "cuda" else "torch.profiler memory",
    )


def _model_dict(model_cfg: Any) -> dict[str, Any]:
    d = dataclasses.asdict(model_cfg) if dataclasses.is_dataclass(model_cfg) else dict(model_cfg)
    d.pop("checkpoint", None)
    if d.get("norm") == "sync_batch":
        d["norm"] = "batch"  # same memory; the all-reduce needs no process group here
    return d


def default_cache_dir() -> Path:
    """$PDEDS_CACHE or $XDG_CACHE_HOME/pdeds or ~/.cache/pdeds, + /plan."""
    base = os.environ.get("PDEDS_CACHE")
    if base:
        return Path(base) / "plan"
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg) / "pdeds" / "plan"


def _device_kind() -> str:
    import torch

    if torch.cuda.is_available():
        return f"cuda: {torch.cuda.get_device_name()}"
    return "cpu"


def calibrate(
    dim: int,
    model_cfg: Any,
    *,
    resolutions: tuple[int, int] | None = None,
    micro_batches: tuple[int, int] = (2, 1),
    cache_dir: Path | None = None,
    refresh: bool = False,
    timeout: float = 900.0,
) -> Calibration:
    """The model's Calibration on this machine's device, measured in a fresh subprocess and cached
    (key: dimension, model, device, torch version, resolutions, micro-batches)."""
    import torch

    model = _model_dict(model_cfg)
    if resolutions is None:
        resolutions = default_calibration_resolutions(dim, int(model.get("depth", 3)))
    job = {
        "dim": dim,
        "model": model,
        "resolutions": list(resolutions),
        "micro_batches": list(micro_batches),
    }
    key = json.dumps({**job, "device": _device_kind(), "torch": torch.__version__}, sort_keys=True)
    cache = (cache_dir or default_cache_dir()) / (
        "calibration-" + hashlib.sha256(key.encode()).hexdigest()[:16] + ".json"
    )
    if cache.is_file() and not refresh:
        return Calibration.from_dict(json.loads(cache.read_text()))
    result = _run_subprocess("calibrate", job, timeout)
    cal = Calibration.from_dict(result)
    cache.parent.mkdir(parents=True, exist_ok=True)
    cache.write_text(json.dumps(cal.to_dict(), indent=1))
    return cal


def _run_subprocess(task: str, job: dict[str, Any], timeout: float) -> dict[str, Any]:
    """Run ``python -m pdeds.plan TASK`` with ``job`` on stdin; its last stdout line is JSON."""
    env = dict(os.environ)
    for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    try:
        done = subprocess.run(
            [sys.executable, "-m", "pdeds.plan", task],
            input=json.dumps(job),
            capture_output=True,
            text=True,
            timeout=timeout,
            env=env,
        )
    except subprocess.TimeoutExpired:
        raise PdedsError(
            f"plan {task}: the measuring subprocess ran past {timeout:.0f} s; "
            "pass smaller --calibrate-res (or --check) resolutions"
        ) from None
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines:
        tail = " | ".join((done.stderr or done.stdout).strip().splitlines()[-3:])
        raise PdedsError(f"plan {task}: the measuring subprocess failed ({tail}); run it again")
    return json.loads(lines[-1])


# ---- the plan ----------------------------------------------------------------------------------


@dataclass
class LevelPlan:
    """One resolution of the schedule at its micro-batch."""

    level: int
    res: int
    micro_batch: int
    activations_per_sample: float
    energy_per_sample: float
    per_micro_batch: float
    """e n^d + o: independent of the micro-batch size."""
    device_total: float
    fits: bool
    max_micro_batch: int
    other_checkpointing: float
    """device_total with model.checkpoint flipped."""


@dataclass
class Plan:
    """The answer of ``pdeds plan``."""

    config: str
    hardware: Hardware
    zero: ZeroSetup
    optimizer: str
    parameters: int
    largest_layer: int
    checkpoint: bool
    variant: str
    states: ModelStates
    levels: list[LevelPlan]
    calibration: Calibration
    recommendations: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def device_fits(self) -> bool:
        return all(lv.fits for lv in self.levels)

    @property
    def host_fits(self) -> bool | None:
        if self.hardware.host_mem_gib is None:
            return None
        return self.states.host_total <= self.hardware.host_mem_gib * GiB

    @property
    def fits(self) -> bool:
        return self.device_fits and self.host_fits is not False

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: every byte count as an integer."""
        s = self.states
        return {
            "config": self.config,
            "hardware": {
                **dataclasses.asdict(self.hardware),
                "world": self.hardware.world,
                "usable_bytes": int(self.hardware.usable_bytes),
            },
            "zero": dataclasses.asdict(self.zero),
            "optimizer": self.optimizer,
            "parameters": self.parameters,
            "largest_layer_parameters": self.largest_layer,
            "checkpoint": self.checkpoint,
            "variant": self.variant,
            "model_states": {
                "device": {
                    "params": int(s.params_device),
                    "grads": int(s.grads_device),
                    "optimizer": int(s.optimizer_device),
                    "buffers": int(s.buffers_device),
                    "total": int(s.device_total + s.buffers_device),
                },
                "host_per_node": {
                    "params": int(s.params_host),
                    "grads": int(s.grads_host),
                    "optimizer": int(s.optimizer_host),
                    "total": int(s.host_total),
                },
                "deepspeed_estimate": s.deepspeed_estimate,
            },
            "levels": [
                {
                    k: (int(v) if isinstance(v, float) else v)
                    for k, v in dataclasses.asdict(lv).items()
                }
                for lv in self.levels
            ],
            "fits": self.fits,
            "device_fits": self.device_fits,
            "host_fits": self.host_fits,
            "recommendations": self.recommendations,
            "notes": self.notes,
            "calibration": self.calibration.to_dict(),
        }

    def table(self) -> str:
        """The plan as a text table (what ``pdeds plan`` prints)."""
        hw, z, s = self.hardware, self.zero, self.states
        ck = "on" if self.checkpoint else "off"
        out = [
            f"pdeds plan: {self.config}",
            f"  {hw.nodes} node(s) x {hw.gpus_per_node} device(s) = {hw.world} rank(s); "
            f"{hw.gpu_mem_gib:g} GiB per device, {hw.reserve:.0%} reserved -> "
            f"{fmt_bytes(hw.usable_bytes)} usable",
            f"  ZeRO stage {z.stage}, {z.dtype}, optimizer {self.optimizer}, offload optimizer "
            f"{'cpu' if z.offload_optimizer else 'none'} / params "
            f"{'cpu' if z.offload_param else 'none'}, activation checkpointing {ck}",
            f"  {self.parameters:,} parameters (largest layer {self.largest_layer:,})",
            f"  calibration: {self.calibration.device}, peaks measured at n = "
            f"{self.calibration.resolutions[0]}, {self.calibration.resolutions[1]} "
            f"({self.calibration.method})",
            "",
            f"  {'model states':<26}{'device/rank':>14}{'host/node':>14}",
            f"  {'parameters':<26}{fmt_bytes(s.params_device):>14}{fmt_bytes(s.params_host):>14}",
            f"  {'gradients':<26}{fmt_bytes(s.grads_device):>14}{fmt_bytes(s.grads_host):>14}",
            f"  {'optimizer states':<26}{fmt_bytes(s.optimizer_device):>14}"
            f"{fmt_bytes(s.optimizer_host):>14}",
            f"  {'DeepSpeed grad. bucket':<26}{fmt_bytes(s.buffers_device):>14}{'-':>14}",
            f"  {'total':<26}{fmt_bytes(s.device_total + s.buffers_device):>14}"
            f"{fmt_bytes(s.host_total):>14}  (host x{ADDITIONAL_BUFFER_FACTOR} as DeepSpeed)",
        ]
        if s.deepspeed_estimate:
            e = s.deepspeed_estimate
            out.append(
                f"  DeepSpeed {e['function']}: {fmt_bytes(e['gpu_bytes'])} per device, "
                f"{fmt_bytes(e['cpu_bytes'])} host"
            )
        out += [
            "",
            f"  per level ({self.variant}; activations incl. saved fields, energy = J_h "
            "temporaries, per micro-batch = size-independent part)",
            f"  {'level':>5}{'n':>6}{'mb':>4}{'activ./sample':>15}{'energy/sample':>15}"
            f"{'per mb':>11}{'total@mb':>12}{'ckpt ' + ('off' if self.checkpoint else 'on'):>12}"
            f"{'fits':>6}{'max mb':>8}",
        ]
        for lv in self.levels:
            out.append(
                f"  {lv.level:>5}{lv.res:>6}{lv.micro_batch:>4}"
                f"{fmt_bytes(lv.activations_per_sample):>15}{fmt_bytes(lv.energy_per_sample):>15}"
                f"{fmt_bytes(lv.per_micro_batch):>11}{fmt_bytes(lv.device_total):>12}"
                f"{fmt_bytes(lv.other_checkpointing):>12}{'yes' if lv.fits else 'NO':>6}"
                f"{lv.max_micro_batch:>8}"
            )
        host = {None: "not checked (pass --host-mem)", True: "yes", False: "NO"}[self.host_fits]
        out += [
            "",
            f"  fits: {'yes' if self.fits else 'NO'} (device: "
            f"{'yes' if self.device_fits else 'NO'}, host: {host})",
        ]
        out += [f"  change: {r}" for r in self.recommendations]
        out += [f"  note: {n}" for n in self.notes]
        return "\n".join(out)


def fmt_bytes(x: float) -> str:
    """Bytes in B / KiB / MiB / GiB with 3 significant digits."""
    x = float(x)
    for unit, size in (("GiB", GiB), ("MiB", 2.0**20), ("KiB", 2.0**10)):
        if abs(x) >= size:
            return f"{x / size:.3g} {unit}"
    return f"{x:.0f} B"


def level_micro_batches(cfg: Any, ds: dict[str, Any], world: int) -> list[tuple[int, int, int]]:
    """(level, resolution, micro-batch per rank) of every level of the schedule, coarsest first."""
    from pdeds.config import batch_sizes

    mb = ds.get("train_micro_batch_size_per_gpu")
    if mb is None:
        mb = batch_sizes(ds, world)[1]
    out = []
    for lvl, n in enumerate(cfg.schedule.resolutions_for(cfg.problem.res)):
        lv = cfg.schedule.level[lvl] if cfg.schedule.level else None
        m = mb
        if lv is not None and lv.micro_batch:
            m = lv.micro_batch
        elif lv is not None and lv.batch:
            m = min(mb, lv.batch // world) if lv.batch >= world else 1
        out.append((lvl, n, int(m)))
    return out


def predict(states: ModelStates, fit: Fit, n: int, micro_batch: int, dim: int) -> float:
    """M(n, b) = S + B + (c b + e) n^d + o, bytes per rank."""
    return states.device_total + states.buffers_device + fit.bytes(n, micro_batch, dim)


def largest_micro_batch(states: ModelStates, fit: Fit, n: int, dim: int, usable: float) -> int:
    """The largest b with M(n, b) <= usable (0 if not even b = 1)."""
    room = usable - states.device_total - states.buffers_device - fit.bytes(n, 0, dim)
    per = fit.per_sample * float(n) ** dim
    if per <= 0:
        return 0 if room < 0 else 1 << 20
    return max(0, int(math.floor(room / per)))


@dataclass(frozen=True)
class _Setup:
    """What the plan varies when it searches for a change that fits."""

    zero: ZeroSetup
    checkpoint: bool
    hardware: Hardware


def _states(setup: _Setup, params: int, largest: int, opt: tuple[float, float]) -> ModelStates:
    return model_state_bytes(
        params,
        largest,
        setup.zero,
        optimizer_bytes=opt[0],
        optimizer_extra=opt[1],
        gpus_per_node=setup.hardware.gpus_per_node,
        nodes=setup.hardware.nodes,
    )


def make_plan(
    resolved: Any,
    hardware: Hardware,
    calibration: Calibration,
    *,
    config_name: str = "",
) -> Plan:
    """The memory plan of a resolved experiment (``pdeds.config.resolve``) on ``hardware``."""
    from pdeds.models.unet import build_model

    hardware.validate()
    cfg, ds = resolved.cfg, resolved.ds
    dim = cfg.problem.dim
    if calibration.dim != dim:
        raise PdedsError(
            f"the calibration is for {calibration.dim}-D, the config for {dim}-D; recalibrate"
        )
    zero = zero_setup(ds)
    model = build_model(dim, cfg.model)  # on CPU: DeepSpeed's counter dedupes by data_ptr
    params, largest = count_model_params(model)
    opt = optimizer_state_bytes(cfg.optim, model)
    levels = level_micro_batches(cfg, ds, hardware.world)
    setup = _Setup(zero, cfg.model.checkpoint, hardware)
    states = _states(setup, params, largest, opt)
    key = variant(zero.dtype, cfg.model.checkpoint)
    plans = _level_plans(states, calibration, key, levels, dim, hardware)
    plan = Plan(
        config=config_name or str(resolved.ds_path),
        hardware=hardware,
        zero=zero,
        optimizer=cfg.optim.name,
        parameters=params,
        largest_layer=largest,
        checkpoint=cfg.model.checkpoint,
        variant=key,
        states=states,
        levels=plans,
        calibration=calibration,
    )
    plan.recommendations = _recommend(plan, setup, params, largest, opt, levels, cfg)
    plan.notes = _notes(plan, calibration)
    return plan


def _level_plans(
    states: ModelStates,
    cal: Calibration,
    key: str,
    levels: list[tuple[int, int, int]],
    dim: int,
    hw: Hardware,
) -> list[LevelPlan]:
    fit = cal.step[key]
    flipped = cal.step[key[:-5] if key.endswith("+ckpt") else key + "+ckpt"]
    out = []
    for lvl, n, mb in levels:
        vol = float(n) ** dim
        total = predict(states, fit, n, mb, dim)
        energy = cal.energy.per_sample * vol
        out.append(
            LevelPlan(
                level=lvl,
                res=n,
                micro_batch=mb,
                activations_per_sample=fit.per_sample * vol - energy,
                energy_per_sample=energy,
                per_micro_batch=fit.bytes(n, 0, dim),
                device_total=total,
                fits=total <= hw.usable_bytes,
                max_micro_batch=largest_micro_batch(states, fit, n, dim, hw.usable_bytes),
                other_checkpointing=predict(states, flipped, n, mb, dim),
            )
        )
    return out


def _fits(
    states: ModelStates,
    fit: Fit,
    levels: list[tuple[int, int, int]],
    dim: int,
    hw: Hardware,
    micro_batch_one: bool = False,
) -> bool:
    usable = hw.usable_bytes
    host_ok = hw.host_mem_gib is None or states.host_total <= hw.host_mem_gib * GiB
    return host_ok and all(
        predict(states, fit, n, 1 if micro_batch_one else mb, dim) <= usable for _, n, mb in levels
    )


def _recommend(
    plan: Plan,
    setup: _Setup,
    params: int,
    largest: int,
    opt: tuple[float, float],
    levels: list[tuple[int, int, int]],
    cfg: Any,
) -> list[str]:
    """Concrete config changes, cumulative, until the run fits (each with its new total)."""
    from pdeds.optim import OFFLOAD_OK, ZERO_STAGES

    if plan.fits:
        return []
    dim, cal = cfg.problem.dim, plan.calibration
    finest = max(levels, key=lambda t: t[1])
    recs: list[str] = []

    def state(s: _Setup) -> tuple[ModelStates, Fit]:
        return _states(s, params, largest, opt), cal.step[variant(s.zero.dtype, s.checkpoint)]

    def worst(s: _Setup) -> str:
        st, fit = state(s)
        return fmt_bytes(max(predict(st, fit, n, mb, dim) for _, n, mb in levels))

    steps: list[tuple[str, Callable[[_Setup], _Setup | None]]] = [
        (
            "set model.checkpoint: true",
            lambda s: None if s.checkpoint else dataclasses.replace(s, checkpoint=True),
        ),
        (
            "set bf16.enabled: true in the DeepSpeed JSON (e.g. ds_configs/zero2_bf16.json)",
            lambda s: (
                None
                if s.zero.half or cfg.optim.name in ("lbfgs", "kfac")
                else dataclasses.replace(
                    s, zero=dataclasses.replace(s.zero, dtype="bf16", grad_accum_dtype="bf16")
                )
            ),
        ),
        (
            f"set zero_optimization.reduce_bucket_size: {_round_up(params)} (the model's size)",
            lambda s: (
                None
                if bucket_bytes(s.zero, params) <= 4 * params * 2
                else dataclasses.replace(
                    s,
                    zero=dataclasses.replace(
                        s.zero, reduce_bucket_size=_round_up(params), overlap_comm=False
                    ),
                )
            ),
        ),
        (
            "set zero_optimization.stage: 3",
            lambda s: (
                None
                if s.zero.stage == 3 or 3 not in ZERO_STAGES[cfg.optim.name]
                else dataclasses.replace(s, zero=dataclasses.replace(s.zero, stage=3))
            ),
        ),
        (
            'set zero_optimization.offload_optimizer: {"device": "cpu"}',
            lambda s: (
                None
                if s.zero.offload_optimizer or cfg.optim.name not in OFFLOAD_OK
                else dataclasses.replace(
                    s, zero=dataclasses.replace(s.zero, offload_optimizer=True)
                )
            ),
        ),
        (
            'set zero_optimization.offload_param: {"device": "cpu"}',
            lambda s: (
                None
                if s.zero.offload_param or s.zero.stage != 3
                else dataclasses.replace(s, zero=dataclasses.replace(s.zero, offload_param=True))
            ),
        ),
    ]
    cur = setup
    for text, change in steps:
        st, fit = state(cur)
        if _fits(st, fit, levels, dim, cur.hardware):
            break
        nxt = change(cur)
        if nxt is None:
            continue
        cur = nxt
        recs.append(f"{text} -> {worst(cur)} per rank")
    st, fit = state(cur)
    if _fits(st, fit, levels, dim, cur.hardware):
        return recs
    if _fits(st, fit, levels, dim, cur.hardware, micro_batch_one=True):
        for lvl, n, mb in levels:
            best = largest_micro_batch(st, fit, n, dim, cur.hardware.usable_bytes)
            if best < mb:
                key = (
                    f"schedule.level[{lvl}].micro_batch"
                    if cfg.schedule.level
                    else "ds.train_micro_batch_size_per_gpu"
                )
                recs.append(
                    f"set {key}: {best} at n = {n} (raise gradient_accumulation_steps to keep "
                    f"train_batch_size = micro-batch x accumulation x {cur.hardware.world} ranks)"
                )
        return recs
    host_need = st.host_total
    if cur.hardware.host_mem_gib is not None and host_need > cur.hardware.host_mem_gib * GiB:
        recs.append(
            f"host memory: the offloaded states need {fmt_bytes(host_need)} per node; add nodes "
            "(--nodes) or drop offload_param / offload_optimizer"
        )
    _, n, _ = finest
    need = predict(st, fit, n, 1, dim) / (1.0 - cur.hardware.reserve)
    recs.append(
        f"micro-batch 1 at n = {n} still needs {fmt_bytes(predict(st, fit, n, 1, dim))} per "
        f"rank: a device of >= {need / GiB:.0f} GiB, or a coarser problem.res / smaller "
        "model.width (more GPUs spread model states, not a sample's activations)"
    )
    return recs


def _round_up(x: int) -> int:
    """x rounded up to 2 significant digits (a tidy bucket size)."""
    if x <= 0:
        return 1
    mag = 10 ** max(0, int(math.log10(x)) - 1)
    return int(math.ceil(x / mag) * mag)


def _notes(plan: Plan, cal: Calibration) -> list[str]:
    notes = []
    z = plan.zero
    if z.offload_optimizer and z.stage == 0:
        notes.append("offload_optimizer needs ZeRO stage >= 1; DeepSpeed ignores it at stage 0")
    if z.offload_param and z.stage != 3:
        notes.append("offload_param needs ZeRO stage 3; DeepSpeed ignores it below")
    if z.dtype == "fp16":
        notes.append("fp16 activations are sized with the bf16 calibration (same bytes)")
    s = plan.states
    if s.buffers_device > 4 * (s.device_total + 1):
        notes.append(
            f"DeepSpeed's gradient bucket ({fmt_bytes(s.buffers_device)}, reduce_bucket_size "
            f"{z.reduce_bucket_size:,}) outweighs the model states; "
            f"zero_optimization.reduce_bucket_size: {_round_up(plan.parameters)} frees it"
        )
    if not cal.device.startswith("cuda"):
        notes.append(
            "activations were calibrated on CPU: CUDA kernels (cuDNN workspaces) may differ; "
            "`launch/gpu_check` measures them on a GPU"
        )
    return notes


# ---- checking the plan against real training steps --------------------------------------------


def _measure_step(job: dict[str, Any]) -> dict[str, Any]:
    """In a fresh process: build the config's engine at resolution ``job['res']`` and run
    ``job['steps']`` optimizer steps; the peak covers the model states, DeepSpeed's buffers and
    the steps (everything after the imports)."""
    import numpy as np
    import torch

    from pdeds.config import batch_sizes, resolve
    from pdeds.models.unet import build_model
    from pdeds.optim import engine_step
    from pdeds.physics import fem
    from pdeds.train.data import TrainingSet
    from pdeds.train.engine import build_engine, device, init_distributed

    res = resolve(job["config"], list(job["overrides"]))
    cfg = res.cfg
    init_distributed()
    dev = device()
    n = cfg.problem.res
    _, mb, acc = batch_sizes(res.ds, 1)
    coeffs = np.random.default_rng(0).uniform(-3, 3, size=(mb * acc, cfg.problem.modes))
    data = TrainingSet(coeffs, cfg.problem.dim, cfg.problem.eta, cfg.problem.family, dev)
    micro = [np.arange(i * mb, (i + 1) * mb) for i in range(acc)]
    out: dict[str, Any] = {"res": n, "micro_batch": mb}

    def run() -> None:
        torch.manual_seed(cfg.train.seed)
        model = build_model(cfg.problem.dim, cfg.model).to(dev)
        engine, _ = build_engine(model, cfg, res.ds)

        def loss_fn(idx: np.ndarray) -> torch.Tensor:
            nu = data.nu(idx, n)
            return fem.energy(engine(nu).float(), nu, cfg.problem.f).mean()

        for _ in range(int(job["steps"])):
            engine_step(engine, micro, loss_fn)
        out["loss_finite"] = True

    out["peak_bytes"] = measure_peak(run, dev)
    return out


def check(
    config: str | Path | dict[str, Any],
    overrides: list[str] | tuple[str, ...],
    resolutions: list[int],
    calibration: Calibration,
    *,
    steps: int = 2,
    timeout: float = 600.0,
) -> list[dict[str, Any]]:
    """Planner vs. measured peak: real training steps of the config (one rank, single-level
    schedule) at each resolution, each in a fresh subprocess.

    Returns rows {res, micro_batch, predicted_bytes, measured_bytes, rel_error}, rel_error =
    (predicted - measured) / measured.
    """
    from pdeds.config import resolve

    if isinstance(config, (str, Path)):
        config = str(Path(config).resolve())
    rows = []
    for n in resolutions:
        over = list(overrides) + [
            f"problem.res={n}",
            "schedule.cycle=single",
            "schedule.level=[]",
            "schedule.resolutions=null",
            "schedule.custom=null",
        ]
        resolved = resolve(config, over)
        plan = make_plan(resolved, Hardware(), calibration)
        lv = plan.levels[-1]
        measured = _run_subprocess(
            "measure-step", {"config": config, "overrides": over, "steps": steps}, timeout
        )
        m = float(measured["peak_bytes"])
        rows.append(
            {
                "res": n,
                "micro_batch": lv.micro_batch,
                "predicted_bytes": int(lv.device_total),
                "measured_bytes": int(m),
                "rel_error": (lv.device_total - m) / m,
            }
        )
    return rows


def check_table(rows: list[dict[str, Any]]) -> str:
    """Rows of ``check`` as text."""
    out = [f"  {'n':>5}{'mb':>4}{'planned':>12}{'measured':>12}{'error':>9}"]
    for r in rows:
        out.append(
            f"  {r['res']:>5}{r['micro_batch']:>4}{fmt_bytes(r['predicted_bytes']):>12}"
            f"{fmt_bytes(r['measured_bytes']):>12}{r['rel_error']:>+9.1%}"
        )
    return "\n".join(out)


def _main(argv: list[str]) -> int:
    """``python -m pdeds.plan calibrate|measure-step`` with a JSON job on stdin."""
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    job = json.loads(sys.stdin.read())
    if argv == ["calibrate"]:
        cal = run_calibration(
            job["dim"],
            job["model"],
            tuple(job["resolutions"]),
            tuple(job["micro_batches"]),
            job.get("device"),
        )
        result = cal.to_dict()
    elif argv == ["measure-step"]:
        result = _measure_step(job)
    else:
        print("usage: python -m pdeds.plan calibrate|measure-step < job.json", file=sys.stderr)
        return 2
    sys.stdout.write("\n" + json.dumps(result) + "\n")
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # skip interpreter teardown of DeepSpeed / process-group state


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
