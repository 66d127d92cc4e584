"""Model states S and DeepSpeed's gradient bucket B: bytes of parameters, gradients and optimizer
states per rank (device) and per node (host) under a ZeRO stage and offload.

Counted in bytes per parameter as DeepSpeed's own estimators count them
(``estimate_zero2_model_states_mem_needs`` / ``estimate_zero3_model_states_mem_needs``: 2 B of
16-bit parameters + 18 B of 16-bit and fp32 gradients, fp32 master weights and the two Adam
moments, partitioned over the W ranks as the stage says); ZeRO 0 and 1, fp32 and other optimizers
by the same accounting (see ``model_state_bytes``). The bucket B is ``reduce_bucket_size``
elements (twice with ``overlap_comm`` at stage 1/2), allocated whatever the model size; the
estimators leave it out. The host holds, per node, what the estimators say (offloaded states, and
the fp32 model each process builds before moving it to its device, times their
``additional_buffer_factor``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from pdeds.errors import PdedsError

DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
DS_DEFAULT_BUCKET = 500_000_000
"""DeepSpeed's default zero_optimization.reduce_bucket_size (deepspeed/runtime/zero/config.py)."""
ADDITIONAL_BUFFER_FACTOR = 1.5
"""DeepSpeed's estimators multiply host memory by this."""


@dataclass(frozen=True)
class ZeroSetup:
    """The DeepSpeed settings that decide model-state memory (read by ``zero_setup``)."""

    stage: int = 0
    offload_optimizer: bool = False
    offload_param: bool = False
    dtype: str = "fp32"
    """Model (compute) dtype: fp32 | bf16 | fp16."""
    grad_accum_dtype: str = "fp32"
    reduce_bucket_size: int = DS_DEFAULT_BUCKET
    overlap_comm: bool = False
    contiguous_gradients: bool = True

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
        reduce_bucket_size=int(float(zero.get("reduce_bucket_size", DS_DEFAULT_BUCKET))),
        overlap_comm=bool(zero.get("overlap_comm", stage == 3)),
        contiguous_gradients=bool(zero.get("contiguous_gradients", True)),
    )


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
    """(total parameters, largest layer's parameters), counted as DeepSpeed's estimators do
    (``deepspeed.runtime.zero.stage3.model_to_params``): shared tensors once, a layer being one
    module's own parameters."""
    total = sum({p.data_ptr(): p.numel() for p in model.parameters()}.values())
    largest = max(
        (sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules()), default=0
    )
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
        buffers_device=bucket_bytes(z),
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
    try:
        import deepspeed  # noqa: F401
    except ImportError:
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


def bucket_bytes(z: ZeroSetup) -> float:
    """DeepSpeed's contiguous gradient bucket: reduce_bucket_size elements of the reduction dtype
    (stage 1: the gradient-accumulation dtype; 2 and 3: the model dtype), twice with overlap_comm
    at stage 1/2; allocated at that size even for a smaller model (deepspeed/runtime/zero:
    ``setup_buckets``, stage 3's ipg buffer)."""
    if z.stage == 0 or not z.contiguous_gradients:
        return 0.0
    if z.stage in (1, 2):
        dtype = z.grad_accum_dtype if z.stage == 1 else z.dtype
        copies = 2 if z.overlap_comm else 1
        return float(z.reduce_bucket_size * DTYPE_BYTES[dtype] * copies)
    return float(z.reduce_bucket_size * DTYPE_BYTES[z.dtype])
