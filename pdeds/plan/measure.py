"""The symbolic figure against a real step: ``step_check`` runs one training step of the
configured model at a small resolution on this machine's device, measures its peak
(``measure_peak``) and compares it with the symbolic A(n, b) at the same n and b:
rel_error = (symbolic - measured) / measured.

On CPU the check measures a 16-bit variant as fp32 (same network, same checkpointing) and says
why: without native bf16 kernels (``pdeds.machine.native_bf16``) a bf16 step keeps fp32 copies of
its fields and takes minutes; with them, oneDNN reorders its fields (5-15 % more, by width).
Either is a property of that CPU, not of the run on a GPU, which the check does measure in the
configured dtype.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from pdeds.plan.symbolic import DTYPES, Activations, Variant, build, training_step

TOLERANCE = 0.10
"""The symbolic peak must lie within 10 % of a measured one."""
FIELDS_OVER_WEIGHTS = 10.0
"""The check's step must need >= 10x the largest layer's weight bytes: on CPU oneDNN reorders a
layer's weights into a workspace of their size, which is no tensor and would dominate a step of
tiny fields."""


@dataclass(frozen=True)
class StepCheck:
    """One real step against its symbolic figure."""

    res: int
    micro_batch: int
    variant: str
    """The variant measured (fp32 stands in for a 16-bit one on a CPU without its kernels)."""
    symbolic_bytes: int
    measured_bytes: int
    device: str
    cpu_capability: str
    native_bf16: bool
    note: str = ""

    @property
    def rel_error(self) -> float:
        return (self.symbolic_bytes - self.measured_bytes) / max(self.measured_bytes, 1)

    @property
    def within_tolerance(self) -> bool:
        return abs(self.rel_error) <= TOLERANCE

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        return {**d, "rel_error": self.rel_error, "within_tolerance": self.within_tolerance}


def measure_peak(fn: Callable[[], Any], device: Any) -> float:
    """Peak bytes allocated by ``fn()`` above what was allocated before it.

    CUDA: ``torch.cuda.max_memory_allocated`` after a reset. CPU: the running sum of the
    allocator's records in torch's profiler (``profile_memory``), the same tensor-allocator
    view; memory freed that was allocated before ``fn`` is not subtracted.
    """
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        return float(torch.cuda.max_memory_allocated(device) - base)
    os.environ.setdefault("KINETO_LOG_LEVEL", "6")  # else kineto prints two lines per profile
    # torch.autograd's profiler: torch.profiler's would parse every op event on exit (5x slower)
    with torch.autograd.profiler.profile(profile_memory=True) as prof:
        fn()
    events = [e for e in prof.kineto_results.events() if e.name() == "[memory]"]
    events.sort(key=lambda e: e.start_ns())
    current = peak = 0
    for e in events:
        current += e.nbytes()
        peak = max(peak, current)
    return float(peak)


def measured_variant(variant: Variant, device: torch.device) -> tuple[Variant, str]:
    """The variant a real step here can stand for, and why it differs from ``variant``."""
    from pdeds.machine import cpu_capability, native_bf16

    if device.type == "cuda" or variant.dtype == "fp32":
        return variant, ""
    fp32 = dataclasses.replace(variant, dtype="fp32")
    if variant.dtype == "bf16" and native_bf16():
        why = "its bf16 kernels add oneDNN reorders of their fields that a GPU run does not have"
    else:
        why = (
            f"it has no native {variant.dtype} kernels, so a {variant.dtype} step keeps fp32 copies"
        )
    return fp32, (
        f"{variant.dtype} not measured on this CPU ({cpu_capability()}): {why} (a property of the "
        f"CPU, not of the plan); measured {fp32} instead"
    )


def check_point(
    acts: Activations, variant: Variant, coarsest: int, layer: float
) -> tuple[int, int]:
    """The cheapest (n, b) for the check: n the coarsest level's halved while the network
    accepts it, then b = 2, 4, 8 (then n doubled) until A(n, b) >= FIELDS_OVER_WEIGHTS x
    ``layer``, the bytes of the largest layer's weights (not b = 1: on CPU torch runs fp32
    micro-batch-1 convolutions of few channels through im2col, a CPU-only workspace). Steps the
    plan executed already say, as bytes per node and sample, where to execute the first one."""
    n, b = coarsest, 2
    while n % 2 == 0 and acts.accepts(n // 2):
        n //= 2
    need, per_node = FIELDS_OVER_WEIGHTS * layer, acts.bytes_per_node(variant)

    def enough(n: int, b: int) -> bool:  # skips executing steps the estimate rules out
        if per_node is not None and per_node * b * n**acts.dim < 1.2 * need:
            return False
        return acts.peak(variant, n, b) >= need

    while n < coarsest and not enough(n, b):
        n, b = (n, 2 * b) if b < 8 else (2 * n, 2)
    return n, b


def step_check(
    acts: Activations,
    variant: Variant,
    coarsest: int,
    largest_layer: int,
    say: Callable[[str], None],
) -> StepCheck:
    """Measure one real step of ``acts``' model (see the module docstring) at the ``check_point``
    below the schedule's ``coarsest`` resolution (``largest_layer``: parameters of the largest
    layer), next to its symbolic figure."""
    from pdeds.machine import cpu_capability, native_bf16

    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    var, note = measured_variant(variant, dev)
    n, b = check_point(acts, var, coarsest, largest_layer * DTYPES[var.dtype].itemsize)
    say(f"measuring one real {var} step at n = {n}, micro-batch {b} on {dev.type}")
    torch.manual_seed(0)
    model = build(acts.dim, acts.model_cfg, var, dev)
    shape = (b, 1) + (n,) * acts.dim
    if dev.type == "cuda":  # the first step sets up cuDNN and its workspaces
        training_step(model, shape, acts.f, acts.weighting)
    peak = measure_peak(lambda: training_step(model, shape, acts.f, acts.weighting), dev)
    return StepCheck(
        res=n,
        micro_batch=b,
        variant=str(var),
        symbolic_bytes=acts.peak(var, n, b),
        measured_bytes=int(peak),
        device=torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
        cpu_capability=cpu_capability(),
        native_bf16=native_bf16(),
        note=note,
    )
