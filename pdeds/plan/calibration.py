"""Calibration: the peaks of one training step of the configured U-Net measured at two small
resolutions and two micro-batches, in a fresh subprocess, fitted to (c b + e) n^d + o per
variant (fp32/bf16, with/without activation checkpointing) and for the energy alone, and cached.

Peaks are torch's CUDA peak statistics on a GPU, the profiler's allocation record on CPU (see
``measure_peak``). The cache key is the dimension, the model section, the device, the torch
version, the resolutions, the micro-batches and the variants.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path
from typing import Any

from pdeds.plan.fit import VARIANTS, Calibration, Fit
from pdeds.plan.measure import measure_peak, run_subprocess

CALIBRATION_VOXELS = {"cpu": 12_000, "cuda": 250_000}
"""The smaller calibration resolution has at least this many nodes: below it, per-layer
transients of the weights (and on CUDA, fixed-size workspaces) rather than fields set the peak."""
CALIBRATION_MICRO_BATCHES = {"cpu": (2, 4), "cuda": (1, 2)}
"""Micro-batches of the calibration. Not 1 on CPU: there torch runs fp32 micro-batch-1
convolutions of few channels through im2col (``use_mkldnn`` in aten), a CPU-only transient
that would make the fit unfaithful for every other micro-batch."""


def default_calibration_resolutions(dim: int, depth: int, device: str = "cpu") -> tuple[int, int]:
    """Two allowed resolutions: the smallest with >= CALIBRATION_VOXELS[device] nodes, then the
    smallest with >= 2.3 x as many (so the two differ enough for the fit)."""
    from pdeds.models.unet import allowed_resolutions

    step = 2**depth
    cands = allowed_resolutions(depth, 4096)
    least = CALIBRATION_VOXELS["cuda" if device.startswith("cuda") else "cpu"]
    n1 = next(n for n in cands if n**dim >= least and n >= 3 * step)
    n2 = next(n for n in cands if n**dim >= 2.3 * n1**dim)
    return n1, n2


def _step_peak(model: Any, n: int, batch: int, dim: int, device: Any) -> float:
    """Peak of one forward + energy + backward with the gradients already allocated (as in every
    training step after the first): a warm-up step on CUDA (it also sets up cuDNN), zero
    gradients on CPU."""
    import torch

    from pdeds.physics import fem

    nu = torch.rand((batch, 1) + (n,) * dim, device=device) + 0.5

    def step() -> None:
        u = model(nu)
        fem.energy(u.float(), nu).mean().backward()

    if torch.device(device).type == "cuda":
        step()
    else:
        for p in model.parameters():
            if p.grad is None:
                p.grad = torch.zeros_like(p)
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

    u.grad = torch.zeros_like(u)
    return measure_peak(step, device)


def run_calibration(
    dim: int,
    model: dict[str, Any],
    resolutions: tuple[int, int],
    micro_batches: tuple[int, int] | None = None,
    device: str | None = None,
    variants: tuple[str, ...] = VARIANTS,
) -> Calibration:
    """Measure the forward+backward peaks of the U-Net ``model`` (a ``model`` config section) at
    (n1, b1), (n2, b1), (n1, b2) and fit a ``Fit`` per variant. Runs in this process;
    ``calibrate`` runs it in a fresh one.
    """
    import torch

    from pdeds.config import build
    from pdeds.models.unet import UNet, UNetConfig

    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    n1, n2 = resolutions
    b1, b2 = micro_batches or CALIBRATION_MICRO_BATCHES[dev.type]
    points = [(n1, b1), (n2, b1), (n1, b2)]
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


def model_section(model_cfg: Any) -> dict[str, Any]:
    """The ``model`` config as the calibration keys it: checkpointing is a variant, not a key;
    sync_batch is measured as batch (same memory; its all-reduce needs no process group)."""
    d = dataclasses.asdict(model_cfg) if dataclasses.is_dataclass(model_cfg) else dict(model_cfg)
    d.pop("checkpoint", None)
    if d.get("norm") == "sync_batch":
        d["norm"] = "batch"
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
    micro_batches: tuple[int, int] | None = None,
    variants: tuple[str, ...] = VARIANTS,
    cache_dir: Path | None = None,
    refresh: bool = False,
    timeout: float = 900.0,
) -> Calibration:
    """The model's Calibration on this machine's device, measured in a fresh subprocess and cached
    (key: dimension, model, device, torch version, resolutions, micro-batches, variants)."""
    import torch

    model = model_section(model_cfg)
    kind = _device_kind()
    if resolutions is None:
        resolutions = default_calibration_resolutions(dim, int(model.get("depth", 3)), kind)
    if micro_batches is None:
        micro_batches = CALIBRATION_MICRO_BATCHES["cuda" if kind.startswith("cuda") else "cpu"]
    job = {
        "dim": dim,
        "model": model,
        "resolutions": list(resolutions),
        "micro_batches": list(micro_batches),
        "variants": list(variants),
    }
    key = json.dumps({**job, "device": kind, "torch": torch.__version__}, sort_keys=True)
    cache = (cache_dir or default_cache_dir()) / (
        "calibration-" + hashlib.sha256(key.encode()).hexdigest()[:16] + ".json"
    )
    if cache.is_file() and not refresh:
        return Calibration.from_dict(json.loads(cache.read_text()))
    result = run_subprocess("calibrate", job, timeout)
    cal = Calibration.from_dict(result)
    cache.parent.mkdir(parents=True, exist_ok=True)
    cache.write_text(json.dumps(cal.to_dict(), indent=1))
    return cal
