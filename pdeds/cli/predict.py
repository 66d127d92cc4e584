"""``pdeds predict``: predicted fields at any resolution, as HDF5 with an XDMF sidecar.

    pdeds predict runs/qs --seed 7 --samples 4 --res 64 --out pred.h5
    pdeds predict runs/qs --coeffs held_out.h5 --res 128 --out pred.h5

The file is a pdeds data file (coefficients and their generating parameters) with
``/res_<N>/nu`` and ``/res_<N>/u_pred``; ``pred.xdmf`` beside it opens in ParaView.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any


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
    p.add_argument("--force", action="store_true", help="overwrite an existing --out")


def run(args: argparse.Namespace) -> int:
    import h5py
    import torch

    from pdeds.data import hdf5
    from pdeds.data.xdmf import write_xdmf
    from pdeds.errors import PdedsError
    from pdeds.physics import kl
    from pdeds.train.inference import load_run

    if args.samples is not None and args.samples < 1:
        raise PdedsError(f"--samples must be >= 1, got {args.samples}")
    out = hdf5.check_output(args.out, force=args.force)
    trained = load_run(Path(args.run_dir))
    p = trained.cfg.problem
    trained.model.check_resolution(args.res)
    if args.coeffs is not None:
        coeffs, meta = hdf5.read_coefficients(args.coeffs)
        if coeffs.shape[1] != p.modes:
            raise PdedsError(
                f"{args.coeffs} holds {coeffs.shape[1]} modes, the run was trained on {p.modes}"
            )
        coeffs = coeffs[: args.samples] if args.samples else coeffs
        seed = meta.get("seed")
    else:
        coeffs = kl.sample_coefficients(args.samples or 4, p.modes, args.seed)
        seed = args.seed
    meta = dict(dim=p.dim, eta=p.eta, family=p.family, seed=seed, f=p.f, run=str(args.run_dir))
    tmp = hdf5.staging_path(out)
    hdf5.write_coefficients(tmp, coeffs, meta, force=True)
    group = hdf5.res_group(args.res)
    try:
        with h5py.File(tmp, "r+") as f:
            shape = (len(coeffs), 1) + (args.res,) * p.dim
            chunks = (1, 1) + (args.res,) * p.dim
            nu_d = f.create_dataset(f"{group}/nu", shape, "f4", chunks=chunks, compression="gzip")
            u_d = f.create_dataset(
                f"{group}/u_pred", shape, "f4", chunks=chunks, compression="gzip"
            )
            f[group].attrs["checkpoint"] = str(trained.checkpoint)
            for i in range(0, len(coeffs), args.batch):
                c = torch.from_numpy(coeffs[i : i + args.batch])
                nu = kl.diffusivity(c, args.res, dim=p.dim, eta=p.eta, family=p.family).float()
                nu_d[i : i + len(c)] = nu.numpy()
                u_d[i : i + len(c)] = trained.predict(nu).cpu().numpy()
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    hdf5.publish(tmp, out)
    xdmf = out.with_suffix(".xdmf")
    write_xdmf(out, xdmf, {"nu": f"{group}/nu", "u_pred": f"{group}/u_pred"}, args.res, p.dim)
    print(f"written: {out} ({len(coeffs)} samples at {args.res}^{p.dim}) and {xdmf}")
    return 0
