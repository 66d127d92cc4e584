"""``pdeds solve``: timed reference solutions at any resolution, written to HDF5.

    pdeds solve --coeffs held_out.h5 --res 65 --res 129 --out ref.h5
    pdeds solve --seed 3 --modes 6 --samples 4 --dim 2 --res 257 --out ref.h5 --method amg

Coefficients come from a data file (``--coeffs``; ``--samples K`` keeps its first K) or are
drawn from a seed like ``pdeds data`` does. For every resolution and sample the FEM solution
is computed one sample at a time and stored as ``/res_{N}/u_ref`` with its timings (assembly,
AMG setup, CG solve, iterations, final relative residual); the coefficients and their
generating parameters are copied in. A table of the timings is printed at the end.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Any

from pdeds.cli import data as data_cmd
from pdeds.errors import PdedsError

EXAMPLES = """examples:
  pdeds solve --coeffs held_out.h5 --res 65 --res 129 --out ref.h5
  pdeds solve --seed 3 --modes 6 --samples 4 --dim 2 --res 257 --out ref.h5
"""
GENERATING = ("dim", "modes", "eta", "family", "sobol")
"""Flags that define coefficients drawn from --seed; with --coeffs they come from the file."""


def add_parser(subparsers: Any) -> None:
    """Register ``pdeds solve``."""
    p = subparsers.add_parser(
        "solve",
        help="timed reference FEM solutions for coefficients from a file or a seed",
        description=(
            "Reference FEM solutions, timed (assembly, AMG setup, solve, iterations), for\n"
            "coefficients from a data file (--coeffs; --samples K keeps the first K) or drawn\n"
            "from a seed (--seed, with --dim --modes --eta --family --sobol --samples as in\n"
            "`pdeds data`), written to HDF5 with the coefficients copied in."
        ),
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--coeffs",
        type=Path,
        metavar="F.h5",
        help="take coefficients from F.h5 (or draw them: --seed)",
    )
    data_cmd.add_problem_args(p, defaults=None, seed_group=source)
    p.add_argument(
        "--res",
        type=int,
        action="extend",
        nargs="+",
        required=True,
        metavar="N",
        help="nodes per axis (repeatable)",
    )
    p.add_argument("--out", type=Path, required=True, metavar="OUT.h5", help="file to write")
    data_cmd.add_solver_args(p)
    p.add_argument("--nu", action="store_true", help="also store the nu fields")
    p.add_argument("--xdmf", action="store_true", help="write a ParaView sidecar per resolution")
    p.add_argument("--force", action="store_true", help="overwrite existing output files")


def _from_file(args: argparse.Namespace) -> tuple[Any, dict[str, Any]]:
    from pdeds.data.hdf5 import RESERVED_ATTRS, check_coeffs, read_coefficients

    given = [f"--{k}" for k in GENERATING if getattr(args, k) not in (None, False)]
    if given:
        raise PdedsError(
            f"{', '.join(given)} cannot be combined with --coeffs (the file fixes the "
            "generating parameters); drop " + ("them" if len(given) > 1 else "it")
        )
    coeffs, stored = read_coefficients(args.coeffs)
    try:
        check_coeffs(coeffs)
    except PdedsError as err:
        raise PdedsError(f"{args.coeffs}: {err}") from None
    k = coeffs.shape[0]
    if args.samples is not None:
        if not 1 <= args.samples <= k:
            raise PdedsError(
                f"--samples must lie in [1, {k}] for {args.coeffs} ({k} samples), "
                f"got {args.samples}"
            )
        coeffs = coeffs[: args.samples]
    meta = {key: v for key, v in stored.items() if key not in RESERVED_ATTRS}
    meta.update(samples=coeffs.shape[0], source=str(args.coeffs))
    if args.f is not None:
        meta["f"] = args.f
    meta.setdefault("f", 0.0)
    return coeffs, meta


def _from_seed(args: argparse.Namespace) -> tuple[Any, dict[str, Any]]:
    for key, value in data_cmd.DEFAULTS.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    data_cmd.check_problem(args)
    return data_cmd.draw_coefficients(args)


def format_table(rows: list[tuple[int, Any, dict[str, float]]]) -> str:
    """Timing table: one row per (res, sample) and a mean row per resolution."""
    head = ("res", "sample", "assembly s", "setup s", "solve s", "iterations", "residual")
    widths = (5, 7, 11, 9, 9, 11, 10)
    lines = ["".join(f"{h:>{w}}" for h, w in zip(head, widths, strict=True))]
    for n, sample, st in rows:
        cells = (
            str(n),
            str(sample),
            f"{st['assembly_s']:.4f}",
            f"{st['setup_s']:.4f}",
            f"{st['solve_s']:.4f}",
            f"{st['iterations']:.0f}" if sample != "mean" else f"{st['iterations']:.1f}",
            f"{st['residual']:.2e}",
        )
        lines.append("".join(f"{c:>{w}}" for c, w in zip(cells, widths, strict=True)))
    return "\n".join(lines)


def _table_rows(out: Path, res: list[int]) -> list[tuple[int, Any, dict[str, float]]]:
    from pdeds.data.hdf5 import STATS, read_fields

    rows: list[tuple[int, Any, dict[str, float]]] = []
    for n in res:
        stored = read_fields(out, n)
        k = len(stored["solve_s"])
        for i in range(k):
            rows.append((n, i, {s: float(stored[s][i]) for s in STATS}))
        if k > 1:
            mean = {s: float(stored[s].mean()) for s in STATS if s != "residual"}
            mean["residual"] = float(stored["residual"].max())
            rows.append((n, "mean", mean))
    return rows


def run(args: argparse.Namespace) -> int:
    """``pdeds solve``: reference solutions for every --res, timed, written to --out."""
    if args.coeffs is not None:
        coeffs, meta = _from_file(args)
    else:
        coeffs, meta = _from_seed(args)
    data_cmd.check_solver(args)
    if not math.isfinite(meta["f"]):
        raise PdedsError(f"f = {meta['f']} is not finite; pass --f with a finite value")
    res = list(dict.fromkeys(args.res))
    written = data_cmd.build_file(
        args.out,
        coeffs,
        meta,
        res=res,
        nu=args.nu,
        reference=True,
        rtol=args.rtol,
        method=args.method,
        force=args.force,
        xdmf=args.xdmf,
    )
    print(format_table(_table_rows(written[0], res)))
    print(
        f"wrote {written[0]}: u_ref for {coeffs.shape[0]} samples at res "
        f"{', '.join(map(str, res))} ({args.method}, rtol {args.rtol:g}); "
        "mean rows: mean times and iterations, max residual"
    )
    for path in written[1:]:
        print(f"wrote {path}")
    return 0
