"""``pdeds predict``: predicted fields at any resolution, as HDF5 with an XDMF sidecar.

    pdeds predict runs/qs --seed 7 --samples 4 --res 64 --out pred.h5
    pdeds predict runs/qs --coeffs held_out.h5 --res 128 --out pred.h5

The file is a pdeds data file (coefficients and their generating parameters) with
``/res_<N>/nu`` and ``/res_<N>/u_pred``, each sample with its checksums; ``pred.xdmf`` beside
it opens in ParaView. Neither is overwritten without ``--force``. The resolution must suit the
U-Net and its fields and activations must fit in memory; both are checked before anything is
allocated or written.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

ACTIVATION_FLOATS = 6
"""float32 values per node and channel that a no-grad U-Net forward holds at its peak, counted
at every level: a decoder stage holds its skip, the upsampled input, their concatenation and
the block's output. Measured on CPU at width 16 (depth 3, growth 2): 460-480 bytes per node of
the finest grid, against this bound's 510 (3-D) and 720 (2-D)."""
HOST_FIELD_BYTES = 32
"""Host bytes per node and sample for nu and the prediction around the forward: the float64
sum of the KL modes and its exp (kl.diffusivity), the float32 nu and prediction; measured at
21 in 2-D."""


def add_parser(subparsers: Any) -> None:
    """Register ``pdeds predict``."""
    p = subparsers.add_parser(
        "predict",
        help="predicted fields of a trained run into HDF5 + XDMF",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("run_dir", help="run directory written by pdeds train")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--coeffs", help="pdeds data file whose /coeffs to predict for")
    src.add_argument("--seed", type=int, help="draw coefficients with this seed")
    p.add_argument("--samples", type=int, default=None, help="how many (default: all / 4)")
    p.add_argument("--res", type=int, required=True, help="nodes per axis")
    p.add_argument("--out", required=True, help="output HDF5 file")
    p.add_argument("--batch", type=int, default=2, help="inference batch size")
    p.add_argument("--force", action="store_true", help="overwrite an existing --out and .xdmf")


def forward_bytes(model_cfg: Any, dim: int, n: int, batch: int) -> float:
    """Bound on the activations of one no-grad U-Net forward of ``batch`` fields at n nodes per
    axis: 4 B x :data:`ACTIVATION_FLOATS` x sum_s c_s (n / 2^s)^dim per sample."""
    levels = enumerate(model_cfg.channels())
    return 4.0 * ACTIVATION_FLOATS * batch * sum(c * (n / 2**s) ** dim for s, c in levels)


def check_resolution(trained: Any, res: int, flag: str = "--res") -> None:
    """Refuse a resolution the run's U-Net cannot take (< 2 nodes, or not passing its
    downsamplings), naming the flag."""
    from pdeds.errors import PdedsError

    if res < 2:
        raise PdedsError(f"{flag} must be >= 2 nodes per axis, got {res}; e.g. {flag} 64")
    try:
        trained.model.check_resolution(res)
    except PdedsError as err:
        raise PdedsError(f"{flag} {res}: {err}") from None


def check_memory(what: str, host: float, forward: float, device: Any, fix: str) -> None:
    """Refuse a job whose ``host`` bytes (plus the ``forward`` activations when the model runs
    on the CPU) or whose ``forward`` bytes on the GPU exceed 90% of what is free there
    (``pdeds.machine.available_bytes``), before anything is allocated."""
    from pdeds.data.integrity import size
    from pdeds.errors import PdedsError
    from pdeds.machine import available_bytes

    gpu = device.type == "cuda"
    needs = [("host", host + (0.0 if gpu else forward), False)]
    if gpu:
        needs.append(("GPU", forward, True))
    for where, need, on_gpu in needs:
        free = available_bytes(on_gpu)
        if need > 0.9 * free:
            raise PdedsError(
                f"{what} needs ~{size(need)} of {where} memory, {size(free)} is free; {fix}"
            )


def run(args: argparse.Namespace) -> int:
    import torch

    from pdeds.data import hdf5
    from pdeds.data.fields import FieldWriter
    from pdeds.data.problem import check_problem
    from pdeds.data.xdmf import write_xdmf
    from pdeds.errors import PdedsError
    from pdeds.physics import kl
    from pdeds.train.inference import load_run

    if args.samples is not None and args.samples < 1:
        raise PdedsError(f"--samples must be >= 1, got {args.samples}")
    if args.batch < 1:
        raise PdedsError(f"--batch must be >= 1, got {args.batch}; e.g. --batch 2")
    out = hdf5.check_output(args.out, force=args.force)
    xdmf = out.with_suffix(".xdmf")
    if xdmf == out:
        raise PdedsError(f"--out {out} is the sidecar's name; give an .h5 name such as pred.h5")
    hdf5.check_output(xdmf, force=args.force)
    trained = load_run(Path(args.run_dir))
    p = trained.cfg.problem
    check_resolution(trained, args.res)
    if args.coeffs is not None:
        check_problem(args.coeffs, p, key="--coeffs", samples=args.samples, settable=False)
        coeffs, meta = hdf5.read_coefficients(args.coeffs)
        coeffs = coeffs[: args.samples] if args.samples else coeffs
        seed = meta.get("seed")
    else:
        coeffs = kl.sample_coefficients(args.samples or 4, p.modes, args.seed)
        seed = args.seed
    batch = min(args.batch, len(coeffs))
    check_memory(
        f"--res {args.res}: predicting {batch} sample(s) at a time on {args.res}^{p.dim} nodes",
        HOST_FIELD_BYTES * batch * args.res**p.dim,
        forward_bytes(trained.cfg.model, p.dim, args.res, batch),
        trained.device,
        "use a smaller --res or --batch 1",
    )
    meta = dict(dim=p.dim, eta=p.eta, family=p.family, seed=seed, f=p.f, run=str(args.run_dir))
    tmp = hdf5.staging_path(out)
    hdf5.write_coefficients(tmp, coeffs, meta, force=True)
    try:
        with FieldWriter(
            tmp,
            args.res,
            nu=True,
            u_pred=True,
            attrs={"checkpoint": str(trained.checkpoint)},
            then=f"{out} is unchanged",
        ) as writer:
            for i in range(0, len(coeffs), batch):
                c = torch.from_numpy(coeffs[i : i + batch])
                nu = kl.diffusivity(c, args.res, dim=p.dim, eta=p.eta, family=p.family).float()
                u = trained.predict(nu).cpu()
                for j in range(len(c)):
                    writer.write(i + j, nu=nu[j], u_pred=u[j])
    except BaseException:
        hdf5.discard(tmp)
        raise
    hdf5.publish(tmp, out)
    group = hdf5.res_group(args.res)
    write_xdmf(out, xdmf, {"nu": f"{group}/nu", "u_pred": f"{group}/u_pred"}, args.res, p.dim)
    print(f"written: {out} ({len(coeffs)} samples at {args.res}^{p.dim}) and {xdmf}")
    return 0
