"""``pdeds data``: sample KL coefficients and write them, with optional fields, to HDF5.

    pdeds data --out held_out.h5 --dim 3 --modes 6 --eta 0.5 --family diagonal \\
        --samples 16 --seed 1 --res 33 --res 65 --reference
    pdeds data --inspect held_out.h5

Coefficients (and the parameters that generated them) are always written; ``--res N``
adds the diffusivity nu at N nodes per axis and ``--reference`` the reference FEM solution
with its timings. The file is built as ``<out>.tmp`` one sample at a time and renamed when
complete; rerunning an interrupted command with the same arguments resumes from it, keeping
only the samples that still match their checksums. ``--inspect F --verify`` reads every sample
back and checks it (finite, nu > 0, checksums). A full disk is one error line naming the free
space. The layout is documented in :mod:`pdeds.data.hdf5`.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pdeds.errors import PdedsError

EXAMPLES = """examples:
  pdeds data --out held_out.h5 --dim 3 --samples 16 --seed 1 --res 33 --reference
  pdeds data --out train.h5 --dim 2 --modes 6 --samples 1024 --sobol
  pdeds data --inspect held_out.h5 --verify
"""
DEFAULTS = {"dim": 3, "modes": 6, "eta": 0.5, "family": "diagonal", "seed": 0, "sobol": False}
FAMILIES = ("diagonal", "tensor")
METHODS = ("amg", "gmg", "matrix_free")
"""``pdeds.physics.reference.METHODS`` (checked equal in the tests; not imported for speed)."""


def add_problem_args(
    p: argparse.ArgumentParser,
    *,
    defaults: dict[str, Any] | None,
    seed_group: Any = None,
) -> None:
    """--dim --modes --eta --family --seed --sobol --samples.

    Args:
        p: the subcommand parser.
        defaults: default values (shown in --help); None leaves every flag None when not
            given, so a caller can tell which were passed.
        seed_group: where --seed goes (e.g. a mutually exclusive group); default ``p``.
    """
    d = defaults or {}

    def note(key: str) -> str:
        return f" (default {d[key]})" if key in d else ""

    (seed_group or p).add_argument(
        "--seed", type=int, default=d.get("seed"), help="sampling seed" + note("seed")
    )
    p.add_argument("--dim", type=int, default=d.get("dim"), help="2 or 3" + note("dim"))
    p.add_argument("--modes", type=int, default=d.get("modes"), help="KL modes m" + note("modes"))
    p.add_argument(
        "--eta", type=float, default=d.get("eta"), help="correlation length" + note("eta")
    )
    p.add_argument(
        "--family", choices=FAMILIES, default=d.get("family"), help="KL mode set" + note("family")
    )
    p.add_argument(
        "--sobol",
        action="store_true",
        default=None if defaults is None else False,
        help="scrambled Sobol points instead of uniform random",
    )
    p.add_argument("--samples", type=int, metavar="K", help="number of coefficient vectors")


def add_solver_args(p: argparse.ArgumentParser) -> None:
    """--method --rtol --f."""
    p.add_argument(
        "--method",
        choices=METHODS,
        default="amg",
        help="reference solver: amg (assembled, default) | gmg (matrix-free multigrid-CG, GPU, "
        "large grids) | matrix_free (Jacobi-CG)",
    )
    p.add_argument(
        "--rtol", type=float, default=1e-10, help="relative residual of the solve (1e-10)"
    )
    p.add_argument("--f", type=float, default=None, help="constant source term f (0.0)")


def add_parser(subparsers: Any) -> None:
    """Register ``pdeds data``."""
    p = subparsers.add_parser(
        "data",
        help="sample coefficients; write nu fields and reference solutions to HDF5",
        description=(
            "Sample KL coefficients and write them, with optional nu fields and reference\n"
            "solutions, to a pdeds HDF5 file (built as OUT.tmp, renamed when complete; an\n"
            "interrupted run resumes when rerun with the same arguments, keeping the samples\n"
            "that match their checksums); or --inspect one (--verify: check every sample)."
        ),
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    target = p.add_mutually_exclusive_group(required=True)
    target.add_argument("--out", type=Path, metavar="F.h5", help="file to write")
    target.add_argument("--inspect", type=Path, metavar="F.h5", help="print what a file holds")
    p.add_argument(
        "--verify",
        action="store_true",
        help="with --inspect: read every sample back and check it (finite, nu > 0, checksums)",
    )
    add_problem_args(p, defaults=DEFAULTS)
    p.add_argument(
        "--res",
        type=int,
        action="extend",
        nargs="+",
        default=[],
        metavar="N",
        help="store nu at N nodes per axis (repeatable)",
    )
    p.add_argument(
        "--reference", action="store_true", help="also store reference solutions at every --res"
    )
    add_solver_args(p)
    p.add_argument("--xdmf", action="store_true", help="write a ParaView sidecar per resolution")
    p.add_argument("--force", action="store_true", help="overwrite existing output files")


# ----------------------------------------------------------------------------- validation


def check_problem(args: argparse.Namespace) -> None:
    """Validate generating parameters; each failure names the flag and a fix."""
    if args.dim not in (2, 3):
        raise PdedsError(f"--dim must be 2 or 3, got {args.dim}; use --dim 2 or --dim 3")
    if args.modes < 1:
        raise PdedsError(f"--modes must be >= 1 (KL modes), got {args.modes}; e.g. --modes 6")
    if not (math.isfinite(args.eta) and args.eta > 0):
        raise PdedsError(
            f"--eta must be a positive correlation length, got {args.eta}; e.g. --eta 0.5"
        )
    if args.samples is None:
        raise PdedsError("--samples K is required; e.g. --samples 16")
    if args.samples < 1:
        raise PdedsError(f"--samples must be >= 1, got {args.samples}; e.g. --samples 16")
    if args.seed is not None and args.seed < 0:
        raise PdedsError(f"--seed must be >= 0, got {args.seed}; e.g. --seed 0")


def check_solver(args: argparse.Namespace) -> None:
    """Validate --res, --rtol, --f."""
    for n in args.res:
        if n < 2:
            raise PdedsError(f"--res must be >= 2 nodes per axis, got {n}; e.g. --res 33")
    if not (0.0 < args.rtol < 1.0):
        raise PdedsError(f"--rtol must lie in (0, 1), got {args.rtol}; e.g. --rtol 1e-10")
    if args.f is not None and not math.isfinite(args.f):
        raise PdedsError(f"--f must be a finite number, got {args.f}; e.g. --f 0.0")


def check_solve_memory(dim: int, res: Sequence[int], method: str) -> None:
    """Refuse, before any file is touched, a reference solve that would not fit this machine:
    amg in host memory, the matrix-free methods on the GPU when there is one."""
    from pdeds.physics.reference import memory_problem

    why = memory_problem((max(res),) * dim, method)
    if why is not None:
        fix = "--method gmg or a smaller --res" if method == "amg" else "a smaller --res"
        raise PdedsError(f"--res {max(res)}: {why}; use {fix}")


def xdmf_path(out: Path, n: int) -> Path:
    """Sidecar name for resolution n of ``out``: ``<stem>_res{n}.xdmf`` beside it."""
    return out.with_name(f"{out.stem}_res{n}.xdmf")


# ----------------------------------------------------------------------------- building


def _progress(total: int, start: int, desc: str) -> Any:
    """A tqdm bar on stderr for several samples (shown on terminals, silent in pipes)."""
    from tqdm import tqdm

    return tqdm(
        total=total,
        initial=start,
        desc=desc,
        unit="sample",
        file=sys.stderr,
        disable=None if total > 1 else True,
    )


def _write_resolution(
    staging: Path,
    coeffs: Any,
    meta: dict[str, Any],
    n: int,
    *,
    nu: bool,
    reference: bool,
    rtol: float,
    method: str,
) -> None:
    """Compute and store resolution n sample by sample, resuming where the file stops."""
    import torch

    from pdeds.data.fields import FieldWriter
    from pdeds.physics.kl import diffusivity

    kw = dict(dim=meta["dim"], eta=meta["eta"], family=meta["family"])
    with FieldWriter(
        staging,
        n,
        nu=nu,
        u_ref=reference,
        rtol=rtol if reference else None,
        method=method if reference else None,
    ) as writer:
        if writer.rejected:
            print(
                f"pdeds: res {n}: samples {', '.join(map(str, writer.rejected))} of {staging} "
                "do not match their checksums; computing them again",
                file=sys.stderr,
            )
        bar = _progress(writer.samples, writer.written, f"res {n}")
        with bar:
            for k in writer.todo:
                nu_k = diffusivity(torch.from_numpy(coeffs[k : k + 1]), n, **kw)
                u_k, stats = None, None
                if reference:
                    u_k, stats = _solve_one(nu_k, meta["f"], rtol, method, n, k)
                writer.write(k, nu=nu_k if nu else None, u_ref=u_k, stats=stats)
                bar.update(1)


def _solve_one(nu: Any, f: float, rtol: float, method: str, n: int, k: int) -> tuple[Any, dict]:
    """One reference solve; the matrix-free methods run on the GPU when there is one."""
    import torch

    from pdeds.physics.reference import solve_with_stats

    if method != "amg" and torch.cuda.is_available():
        nu = nu.cuda()
    try:
        u, stats = solve_with_stats(nu, f, rtol=rtol, method=method)
        u = u.cpu()
    except RuntimeError as err:
        raise PdedsError(
            f"res {n}, sample {k}: {err}; loosen --rtol or try --method "
            f"{'gmg' if method == 'amg' else 'amg'}"
        ) from None
    return u, stats[0]


def build_file(
    out: Path,
    coeffs: Any,
    meta: dict[str, Any],
    *,
    res: Sequence[int],
    nu: bool,
    reference: bool,
    rtol: float,
    method: str,
    force: bool,
    xdmf: bool,
) -> list[Path]:
    """Write a complete data file at ``out`` (via ``<out>.tmp``); return the files written.

    An existing ``<out>.tmp`` of the same coefficients and parameters is resumed: its samples
    are verified against their checksums and the ones that fail are computed again. ``out`` is
    published (renamed) only once every group is complete; a failure leaves an existing
    ``out`` unchanged and the staging file resumable (or removed, when HDF5 could not close it).

    Args:
        out: final file name.
        coeffs: (K, m) float64 coefficients.
        meta: root attributes (dim, eta, family, f, seed, sobol, ...).
        res: resolutions to store fields for.
        nu: store nu at every resolution.
        reference: store reference solutions and timings at every resolution.
        rtol: solver tolerance.
        method: "amg", "gmg" or "matrix_free" (``pdeds.physics.reference.METHODS``).
        force: overwrite ``out`` (and its sidecars).
        xdmf: write a ParaView sidecar per resolution.
    """
    from pdeds.data import hdf5
    from pdeds.data.xdmf import write_xdmf

    if reference:
        check_solve_memory(int(meta["dim"]), res, method)
    out = hdf5.check_output(out, force=force)
    sidecars = {n: xdmf_path(out, n) for n in res} if xdmf else {}
    for path in sidecars.values():
        hdf5.check_output(path, force=force)
    coeffs = hdf5.check_coeffs(coeffs)
    staging = hdf5.staging_path(out)
    if staging.exists() and hdf5.matches(staging, coeffs, meta):
        print(f"pdeds: resuming from {staging} (same parameters)", file=sys.stderr)
        hdf5.drop_resolutions(staging, keep=res if nu or reference else ())
    else:
        if staging.exists():
            print(
                f"pdeds: {staging} holds other parameters or cannot be read; starting again",
                file=sys.stderr,
            )
        hdf5.write_coefficients(staging, coeffs, meta, force=True)
    if nu or reference:
        for n in res:
            _write_resolution(
                staging, coeffs, meta, n, nu=nu, reference=reference, rtol=rtol, method=method
            )
    hdf5.publish(staging, out)
    fields = (["nu"] if nu else []) + (["u_ref"] if reference else [])
    for n, path in sidecars.items():
        group = hdf5.res_group(n)
        write_xdmf(out, path, {k: f"/{group}/{k}" for k in fields}, n, meta["dim"])
    return [out, *sidecars.values()]


# ----------------------------------------------------------------------------- command


def draw_coefficients(args: argparse.Namespace) -> tuple[Any, dict[str, Any]]:
    """Coefficients drawn from --seed (and --samples, --modes, --sobol) with their metadata."""
    from pdeds.physics.kl import sample_coefficients

    coeffs = sample_coefficients(args.samples, args.modes, args.seed, sobol=args.sobol)
    meta = dict(
        dim=args.dim,
        modes=args.modes,
        eta=args.eta,
        family=args.family,
        seed=args.seed,
        sobol=bool(args.sobol),
        samples=args.samples,
        f=0.0 if args.f is None else args.f,
    )
    return coeffs, meta


def verify_file(path: Path) -> None:
    """Print what ``pdeds data --inspect --verify`` checked; raise naming every bad sample."""
    from pdeds.data.verify import verify

    verdict = verify(path)
    print("verified:")
    for line in verdict.checked:
        print(f"  {line}")
    for line in verdict.problems:
        print(f"  BAD {line}")
    if not verdict.ok:
        raise PdedsError(
            f"{path} failed verification ({verdict.summary()}); rebuild it with the "
            "`pdeds data` (or `pdeds solve`) command that wrote it and --force"
        )
    print("all samples ok")


def run(args: argparse.Namespace) -> int:
    """``pdeds data``: inspect a file, or sample coefficients and build one."""
    if args.inspect is not None:
        from pdeds.data.summary import inspect

        print(inspect(args.inspect))
        if args.verify:
            verify_file(args.inspect)
        return 0
    if args.verify:
        raise PdedsError("--verify checks an existing file; use it with --inspect F.h5")
    check_problem(args)
    check_solver(args)
    args.res = list(dict.fromkeys(args.res))
    if args.reference and not args.res:
        raise PdedsError("--reference needs at least one --res N; e.g. --res 33 --reference")
    if args.xdmf and not args.res:
        raise PdedsError("--xdmf needs fields to show; add --res N")
    coeffs, meta = draw_coefficients(args)
    written = build_file(
        args.out,
        coeffs,
        meta,
        res=args.res,
        nu=bool(args.res),
        reference=args.reference,
        rtol=args.rtol,
        method=args.method,
        force=args.force,
        xdmf=args.xdmf,
    )
    fields = "nu + u_ref" if args.reference else "nu"
    stored = f"; {fields} at res {', '.join(map(str, args.res))}" if args.res else ""
    print(
        f"wrote {written[0]}: {args.samples} samples x {args.modes} modes "
        f"({args.dim}-D, {args.family}, eta {args.eta:g}, seed {args.seed}"
        f"{', sobol' if args.sobol else ''}){stored}"
    )
    for path in written[1:]:
        print(f"wrote {path}")
    return 0
