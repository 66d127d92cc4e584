"""Held-out evaluation against the reference solver (METHOD.md sec. 3).

The held-out set is ``data.val_samples`` coefficient vectors drawn with ``data.val_seed``; its
reference solutions at a resolution are solved once (``train.reference``: AMG-CG by default,
rtol 1e-10) and cached in an HDF5 file, so evaluation during training costs only network
forwards.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import torch

from pdeds import distributed
from pdeds.config import ExperimentConfig
from pdeds.machine import available_bytes, size_text
from pdeds.physics import fem, kl, metrics, reference

Predictor = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class HeldOut:
    """Held-out coefficients with nu and reference solutions at one resolution (float64)."""

    coeffs: np.ndarray
    res: int
    nu: torch.Tensor
    u_ref: torch.Tensor
    solve_s: float
    """Mean reference solve time per sample (assembly + setup + CG)."""


def held_out_coeffs(cfg: ExperimentConfig, samples: int | None = None) -> np.ndarray:
    k = samples or cfg.data.val_samples
    return kl.sample_coefficients(k, cfg.problem.modes, cfg.data.val_seed, sobol=cfg.data.sobol)


def _cache_key(cfg: ExperimentConfig, res: int, samples: int) -> str:
    p = cfg.problem
    return (
        f"dim{p.dim}_res{res}_m{p.modes}_eta{p.eta}_{p.family}_f{p.f}_"
        f"seed{cfg.data.val_seed}_sobol{int(cfg.data.sobol)}_k{samples}"
    )


def _solve(cfg: ExperimentConfig, coeffs: np.ndarray, res: int) -> tuple[torch.Tensor, float]:
    p = cfg.problem
    nu = kl.diffusivity(torch.from_numpy(coeffs), res, dim=p.dim, eta=p.eta, family=p.family)
    method = cfg.train.reference
    if method != "amg":  # matrix-free: on the rank's device, one sample at a time
        from pdeds.train.engine import device

        dev = device()
        parts = [
            reference.solve_with_stats(nu[i : i + 1].to(dev), p.f, rtol=1e-10, method=method)
            for i in range(nu.shape[0])
        ]
        u = torch.cat([part[0].cpu() for part in parts])
        stats = [part[1][0] for part in parts]
        del parts
        if dev.type == "cuda":
            torch.cuda.empty_cache()  # the solve's fields go back before training allocates
    else:
        u, stats = reference.solve_with_stats(nu, p.f, rtol=1e-10)
    per = float(np.mean([s["assembly_s"] + s["setup_s"] + s["solve_s"] for s in stats]))
    return u, per


def held_out_size_problem(cfg: ExperimentConfig, res: int) -> str | None:
    """Why this host cannot hold the held-out set at ``res``, or None: per sample its
    coefficients (m float64) and nu, the reference and the prediction (float64, res^d each):
    K (8 m + 24 res^d) bytes."""
    if cfg.data.val_path is not None:
        return None
    k = cfg.data.val_samples
    need = k * (8 * cfg.problem.modes + 24 * res**cfg.problem.dim)
    free = available_bytes(False)
    if need <= free:
        return None
    return (
        f"data.val_samples {k:,}: the held-out set at {res}^{cfg.problem.dim} needs "
        f"{size_text(need)} of host memory, {size_text(free)} is available; lower "
        "data.val_samples (or train.eval_res)"
    )


def held_out_memory_problem(cfg: ExperimentConfig, cache_dir: Path | None) -> str | None:
    """Why rank 0 could not solve the held-out references (host memory for amg, its GPU for the
    matrix-free methods), or None: they come from data.val_path or the cache, or they fit."""
    res = cfg.train.eval_res or cfg.problem.res
    why = held_out_size_problem(cfg, res)
    if why is not None:
        return why
    cached = (
        cache_dir is not None
        and (cache_dir / f"heldout_{_cache_key(cfg, res, cfg.data.val_samples)}.h5").is_file()
    )
    if cfg.data.val_path is not None or cached:
        return None
    why = reference.memory_problem((res,) * cfg.problem.dim, cfg.train.reference)
    if why is None:
        return None
    return (
        f"train.eval_res {res}: {why}; set train.reference: gmg, a smaller train.eval_res, or "
        "data.val_path (references solved offline with `pdeds solve`)"
    )


def load_held_out(
    cfg: ExperimentConfig, res: int, cache_dir: Path | None, samples: int | None = None
) -> HeldOut:
    """The held-out set at ``res``; rank 0 solves (or reads the cache), the others wait and read."""
    p = cfg.problem
    if cfg.data.val_path is not None:
        return _held_out_from_file(cfg, res, samples)
    coeffs = held_out_coeffs(cfg, samples)
    key = _cache_key(cfg, res, len(coeffs))
    path = cache_dir / f"heldout_{key}.h5" if cache_dir is not None else None
    if path is None:
        u, per = _solve(cfg, coeffs, res)
    else:
        if distributed.rank() == 0 and not path.is_file():
            u, per = _solve(cfg, coeffs, res)
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp")
            with h5py.File(tmp, "w") as h:
                h["coeffs"] = coeffs
                h["u_ref"] = u.numpy()
                h.attrs["solve_s"] = per
            tmp.replace(path)
        distributed.barrier()
        with h5py.File(path, "r") as h:
            u = torch.from_numpy(h["u_ref"][...])
            per = float(h.attrs["solve_s"])
    nu = kl.diffusivity(torch.from_numpy(coeffs), res, dim=p.dim, eta=p.eta, family=p.family)
    return HeldOut(coeffs=coeffs, res=res, nu=nu, u_ref=u, solve_s=per)


def _held_out_from_file(cfg: ExperimentConfig, res: int, samples: int | None) -> HeldOut:
    """The held-out set of ``data.val_path``: its coefficients and reference solutions."""
    from pdeds.data.hdf5 import read_coefficients, read_fields
    from pdeds.errors import PdedsError

    p = cfg.problem
    coeffs, meta = read_coefficients(cfg.data.val_path)
    for key in ("dim", "eta", "family", "modes"):
        if key in meta and meta[key] != getattr(p, key):
            raise PdedsError(
                f"data.val_path {cfg.data.val_path} has {key}={meta[key]} but problem.{key} is "
                f"{getattr(p, key)}; use a held-out file of the same problem"
            )
    k = min(samples or cfg.data.val_samples, len(coeffs))
    fields = read_fields(cfg.data.val_path, res, samples=slice(0, k))
    if "u_ref" not in fields:
        raise PdedsError(
            f"data.val_path {cfg.data.val_path} has no reference solutions at {res} nodes; "
            f"add them with `pdeds solve --coeffs {cfg.data.val_path} --res {res} --out ...`"
        )
    coeffs = coeffs[:k]
    nu = kl.diffusivity(torch.from_numpy(coeffs), res, dim=p.dim, eta=p.eta, family=p.family)
    per = float(np.mean(fields["assembly_s"] + fields["setup_s"] + fields["solve_s"]))
    return HeldOut(
        coeffs=coeffs, res=res, nu=nu, u_ref=torch.from_numpy(fields["u_ref"]), solve_s=per
    )


def predict_all(predict: Predictor, nu: torch.Tensor, batch: int, device: torch.device):
    """Run ``predict`` over nu in batches; returns (U float64 on CPU, seconds per sample)."""
    outs = []
    t0 = time.perf_counter()
    with torch.no_grad():
        for i in range(0, nu.shape[0], batch):
            outs.append(predict(nu[i : i + batch].float().to(device)).double().cpu())
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return torch.cat(outs), (time.perf_counter() - t0) / nu.shape[0]


def scores(u: torch.Tensor, ho: HeldOut, f: float) -> dict[str, float]:
    """Mean/max relative L2 error and mean/max energy gap of predictions ``u``."""
    e = metrics.rel_l2(u, ho.u_ref)
    g = metrics.energy_gap(u, ho.u_ref, ho.nu, f)
    return {
        "rel_l2_mean": float(e.mean()),
        "rel_l2_max": float(e.max()),
        "energy_gap": float(g.mean()),
        "energy_gap_max": float(g.max()),
    }


def evaluate(predict: Predictor, ho: HeldOut, f: float, batch: int, device: torch.device) -> dict:
    """Scores of the network and, for reference, of the lifting alone (u = 1 - x1)."""
    u, per = predict_all(predict, ho.nu, batch, device)
    out = {f"val_{k}": v for k, v in scores(u, ho, f).items()}
    lift = fem.apply_dirichlet(torch.zeros_like(ho.u_ref))
    out.update({f"baseline_{k}": v for k, v in scores(lift, ho, f).items()})
    out["inference_s_per_sample"] = per
    out["reference_s_per_sample"] = ho.solve_s
    return out
