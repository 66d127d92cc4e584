"""Model states S and DeepSpeed's gradient bucket B: bytes of parameters, gradients and optimizer
states per rank (device) and per node (host) under the ZeRO stage and offload of a DeepSpeed
config (read through ``pdeds.dsconfig.DeepSpeedView``).

With P parameters (L in the largest layer, both counted by DeepSpeed's ``model_to_params``),
W = nodes x gpus ranks, b = 2 (16-bit) or 4 (fp32) bytes of the model dtype, s optimizer bytes
per parameter, the fp32 master copy m = 4 B (ZeRO >= 1 always keeps one; ZeRO 0 only with
16-bit weights) and the fp32 gradient g32 = 4 B (16-bit only):

    stage 0: b P params + b P grads + (g32 + m + s) P optimizer          (all replicated)
    stage 1: b P params + b P grads + (g32 + m + s) P / W
    stage 2: b P params + (b + g32) P / W grads + (m + s) P / W
    stage 3: (b P / W + 4 L) params + 4 P / W grads + (m + s) P / W

For 16-bit Adam (s = 8) stage 2 gives 2 P + 18 P / W and stage 3 4 L + 18 P / W: DeepSpeed's
``estimate_zero2/3_model_states_mem_needs``, whose answer the plan carries beside its own.
Offload moves the optimizer part (and at stage 3 with offload_param the parameters) to the host,
which holds per node what those estimators say: max(4 P per process building the model, the
offloaded states) x 1.5. The bucket B is ``reduce_bucket_size`` elements (twice with
``overlap_comm`` at stage 1/2), allocated whatever the model size; the estimators leave it out.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pdeds.dsconfig import DeepSpeedView

DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
ADDITIONAL_BUFFER_FACTOR = 1.5
"""DeepSpeed's estimators multiply host memory by this."""


@dataclass(frozen=True)
class ModelStates:
    """Bytes of parameters, gradients and optimizer states per rank on the device and per node on
    the host, DeepSpeed's bucket, and DeepSpeed's own estimate where one applies."""

    params_device: float
    grads_device: float
    optimizer_device: float
    params_host: float
    grads_host: float
    optimizer_host: float
    bucket: float
    """DeepSpeed's gradient bucket on the device (not part of its estimators)."""
    host_total: float
    """Host bytes per node as DeepSpeed's estimators count them (x additional_buffer_factor)."""
    deepspeed_estimate: dict[str, Any] | None = None
    """{function, gpu_bytes, cpu_bytes} of DeepSpeed's estimator (16-bit Adam, ZeRO 2/3)."""

    @property
    def device_total(self) -> float:
        """S + B: everything of the model states on one device."""
        return self.params_device + self.grads_device + self.optimizer_device + self.bucket


def count_params(model: Any) -> tuple[int, int]:
    """(P, L): parameters, shared ones once, and the largest layer's, as DeepSpeed counts them."""
    from deepspeed.runtime.zero.stage3 import model_to_params

    total, largest = model_to_params(model)
    return int(total), int(largest)


def optimizer_bytes(optim: Any, model: Any = None) -> tuple[float, float]:
    """(fp32 bytes per parameter, extra bytes) of the optimizer's state.

    adam/adamw: two moments, 8 B. sgd: momentum buffer, 4 B (0 without momentum). lbfgs: m
    pairs (s, y) and three flat work vectors, 4 (2m + 3) B. kfac: its inner optimizer's bytes plus
    the Kronecker factors A, G, their eigenvectors and eigenvalues, 4 (2 (a^2 + g^2) + a + g) B per
    layer (a, g the factor sizes; needs ``model``), and with the KL-clip in backward mode the
    layer's preconditioned gradient V kept for the clip, 4 a g B (under ZeRO 1/2 its all-reduce
    copies it once more for a moment: not counted). gauss_newton: the float64 flat vectors of a
    step (gradient, CG's d, G d, r, p, G p, (G + lambda) p, the product's sum; the previous
    solution with ``warm_start``) and three fp32 copies (start point, tangents, VJP), 8 x 8 + 12 B
    (+ 8).
    """
    name = optim.name
    if name in ("adam", "adamw"):
        return 8.0, 0.0
    if name == "sgd":
        return (4.0 if optim.momentum > 0 else 0.0), 0.0
    if name == "lbfgs":
        return 4.0 * (2 * optim.lbfgs.history_size + 3), 0.0
    if name == "gauss_newton":
        return 8.0 * (8 + (optim.gauss_newton.warm_start > 0)) + 12.0, 0.0
    inner = 8.0 if optim.kfac.inner in ("adam", "adamw") else (4.0 if optim.momentum > 0 else 0.0)
    extra = 0.0
    if model is not None:
        from pdeds.optim.kfac_layers import preconditioned_layers

        clip = optim.kfac.kl_clip > 0 and optim.kfac.precondition == "backward"
        for h in preconditioned_layers(model, optim.kfac.max_factor_dim):
            extra += 4.0 * (2 * (h.a_dim**2 + h.g_dim**2) + h.a_dim + h.g_dim)
            extra += 4.0 * h.a_dim * h.g_dim * clip
    return inner, extra


def model_states(
    params: int, largest: int, ds: DeepSpeedView, opt: tuple[float, float], gpus: int, nodes: int
) -> ModelStates:
    """S and B per rank and per node (the module docstring's table) for ``opt`` = (bytes per
    parameter, extra bytes) of the optimizer on ``nodes`` x ``gpus`` ranks."""
    p, big, w = float(params), float(largest), gpus * nodes
    b, (s, extra) = DTYPE_BYTES[ds.dtype], opt
    g32 = 4.0 if ds.half else 0.0
    master = 4.0 if (ds.half or ds.stage >= 1) else 0.0
    off_opt = ds.offload_optimizer != "none" and ds.stage >= 1
    off_par = ds.offload_param != "none" and ds.stage == 3
    host = [0.0, 0.0, 0.0]
    if ds.stage == 0:
        dev = [b * p, b * p, (g32 + master + s) * p + extra]
    elif ds.stage == 1:
        dev = [b * p, b * p, (g32 + master + s) * p / w + extra]
    elif ds.stage == 2:
        dev = [b * p, (b + g32) * p / w, (master + s) * p / w + extra]
    else:
        dev = [b * p / w + 4.0 * big, 4.0 * p / w, (master + s) * p / w + extra]
    if off_opt and ds.stage < 3:  # the partitioned fp32 gradients and optimizer go to the host
        host[1:] = [4.0 * p * gpus / w, ((master + s) * p + extra) * gpus / w]
        dev[1:] = [0.0, 0.0]
    elif off_opt:
        host[1:] = [dev[1] * gpus, dev[2] * gpus]
        dev[1:] = [0.0, 0.0]
    if off_par:
        host[0], dev[0] = b * p / w * gpus, 4.0 * big
    return ModelStates(
        *dev,
        *host,
        bucket=bucket_bytes(ds),
        host_total=_host_bytes(p, b, s, ds, gpus, nodes, off_opt, off_par),
        deepspeed_estimate=_deepspeed_estimate(params, largest, ds, s, gpus, nodes),
    )


def _host_bytes(
    p: float, b: int, s: float, ds: DeepSpeedView, g: int, n: int, off_opt: bool, off_par: bool
) -> float:
    """Host bytes per node, following DeepSpeed's estimators (zero_init=False: pdeds builds the
    full model in every process before DeepSpeed partitions it)."""
    states = 4.0 + 4.0 + s  # fp32 gradients + fp32 master + optimizer
    if ds.stage == 3 and off_par:
        need = max(4.0 * g, (b + states) / n)
    elif ds.stage == 3 and off_opt:
        need = max(4.0 * g, states / n)
    elif off_opt:
        need = max(4.0 * g * n, states)
    else:
        need = 4.0 * g
    return p * need * ADDITIONAL_BUFFER_FACTOR


def _deepspeed_estimate(
    params: int, largest: int, ds: DeepSpeedView, s: float, g: int, n: int
) -> dict[str, Any] | None:
    """DeepSpeed's estimator's (gpu, cpu) bytes where it applies: 16-bit Adam at stage 2 or 3."""
    if not (ds.half and s == 8.0 and ds.stage in (2, 3)):
        return None
    offload = ds.offload_optimizer != "none"
    if ds.stage == 2:
        from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

        cpu, gpu = estimate_zero2_model_states_mem_needs(
            params, num_gpus_per_node=g, num_nodes=n, cpu_offload=offload
        )
        fn = "estimate_zero2_model_states_mem_needs"
    else:
        from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs

        cpu, gpu, _ = estimate_zero3_model_states_mem_needs(
            params,
            largest,
            num_gpus_per_node=g,
            num_nodes=n,
            cpu_offload=offload,
            cpu_offload_params=ds.offload_param != "none",
            zero_init=False,
        )
        fn = "estimate_zero3_model_states_mem_needs"
    return {"function": fn, "gpu_bytes": int(gpu), "cpu_bytes": int(cpu)}


def bucket_bytes(ds: DeepSpeedView) -> float:
    """DeepSpeed's contiguous gradient bucket: reduce_bucket_size elements of the reduction dtype
    (stage 1: the gradient-accumulation dtype; 2 and 3: the model dtype), twice with overlap_comm
    at stage 1/2; allocated at that size even for a smaller model (deepspeed/runtime/zero:
    ``setup_buckets``, stage 3's ipg buffer)."""
    if ds.stage == 0 or not ds.contiguous_gradients:
        return 0.0
    if ds.stage == 3:
        return float(ds.reduce_bucket_size * DTYPE_BYTES[ds.dtype])
    dtype = ds.grad_accum_dtype if ds.stage == 1 else ds.dtype
    return float(ds.reduce_bucket_size * DTYPE_BYTES[dtype] * (2 if ds.overlap_comm else 1))
