"""The pdeds data file: coefficients, optional fields and reference solutions in HDF5.

Layout (format "pdeds-data", format_version 1)::

    /                      attrs: format, format_version, pdeds_version, created (ISO 8601, UTC),
                                  dim, modes, eta, family, seed, sobol, samples, f (+ extra meta)
    /coeffs                (K, m)        float64   KL coefficients a (always present)
    /res_{N}/              attrs: n, samples, written, complete, [rtol, method]
    /res_{N}/nu            (K, 1, N..)   float32   nu at the nodes (optional)
    /res_{N}/u_ref         (K, 1, N..)   float64   reference FEM solution (optional)
    /res_{N}/assembly_s    (K,)          float64   seconds to assemble K and F      } only with
    /res_{N}/setup_s       (K,)          float64   seconds of AMG setup              } u_ref
    /res_{N}/solve_s       (K,)          float64   seconds of preconditioned CG      }
    /res_{N}/iterations    (K,)          int64     CG iterations                     }
    /res_{N}/residual      (K,)          float64   final relative residual           }

Fields are chunked one sample per chunk and gzip-compressed (with the shuffle filter), so a
reader pulls one sample without decompressing the others. Axis 2 of a field is x1.

Crash safety: a new file is always written to ``<path>.tmp`` and renamed over ``<path>`` only
when complete, so a crash never leaves a half file under the final name. Long runs write the
staging file sample by sample through :class:`FieldWriter`, which records how many samples
are done (``written``) so an interrupted run can resume; a group is marked ``complete`` only
when every sample is in.
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import h5py
import numpy as np

import pdeds
from pdeds.errors import PdedsError

FORMAT = "pdeds-data"
FORMAT_VERSION = 1
RESERVED_ATTRS = ("format", "format_version", "pdeds_version", "created")
"""Root attributes set by the writer itself; meta cannot supply them."""
FIELDS = ("nu", "u_ref")
FIELD_DTYPES = {"nu": np.float32, "u_ref": np.float64}
STATS = ("assembly_s", "setup_s", "solve_s", "iterations", "residual")
"""Per-sample reference-solve statistics stored next to u_ref (keys of solve_with_stats)."""
STAT_DTYPES = {"iterations": np.int64}
STAT_FILL = {"iterations": -1}
COMPRESSION = {"compression": "gzip", "compression_opts": 4, "shuffle": True}

PathLike = str | os.PathLike


def res_group(n: int) -> str:
    """Name of the group that holds resolution n (nodes per axis)."""
    return f"res_{int(n)}"


def staging_path(path: PathLike) -> Path:
    """Where a file is built before the rename that publishes it: ``<path>.tmp``."""
    path = Path(path)
    return path.with_name(path.name + ".tmp")


def check_output(path: PathLike, *, force: bool) -> Path:
    """Refuse an output path that exists (unless ``force``) or whose folder is missing."""
    path = Path(path)
    if path.is_dir():
        raise PdedsError(f"output {path} is a directory; give a file name such as {path}/data.h5")
    if path.exists() and not force:
        raise PdedsError(f"{path} exists; pass --force to overwrite")
    if not path.parent.is_dir():
        raise PdedsError(f"output folder {path.parent} does not exist; create it first")
    return path


def publish(staging: PathLike, path: PathLike) -> None:
    """Atomically rename a finished staging file to its final name."""
    os.replace(staging, path)


# ----------------------------------------------------------------------------- reading


def py_value(value: Any) -> Any:
    """An HDF5 attribute as a plain Python value (numpy scalars, bytes -> int/float/bool/str)."""
    if isinstance(value, bytes):
        return value.decode()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return value


def _resolutions(f: h5py.File) -> list[int]:
    out = []
    for name in f:
        if name.startswith("res_") and name[4:].isdigit() and isinstance(f[name], h5py.Group):
            out.append(int(name[4:]))
    return sorted(out)


def _describe_resolutions(f: h5py.File) -> str:
    res = _resolutions(f)
    return "it holds " + (", ".join(f"res {n}" for n in res) if res else "coefficients only")


def open_checked(
    path: PathLike,
    *,
    mode: str = "r",
    res: Sequence[int] = (),
    fields: Sequence[str] = (),
) -> h5py.File:
    """Open a pdeds data file, checking it is one and holds what the caller needs.

    Args:
        path: the file.
        mode: "r" or "r+".
        res: resolutions that must be present (as complete groups).
        fields: datasets (e.g. "u_ref") that every group in ``res`` must hold.

    Returns:
        The open ``h5py.File`` (use it as a context manager).

    Raises:
        PdedsError: missing file, not HDF5, not a pdeds file, newer format, missing
            /coeffs, missing or incomplete resolution, missing field.
    """
    path = Path(path)
    if not path.exists():
        raise PdedsError(f"{path} does not exist; check the path or create it with `pdeds data`")
    if path.is_dir():
        raise PdedsError(f"{path} is a directory, not a data file; give the .h5 file inside it")
    if not h5py.is_hdf5(path):
        raise PdedsError(f"{path} is not an HDF5 file; give a file written by `pdeds data`")
    try:
        f = h5py.File(path, mode)
    except OSError as err:
        raise PdedsError(f"cannot open {path}: {err}; check the file and its permissions") from None
    try:
        _check_file(f, path, res, fields)
    except BaseException:
        f.close()
        raise
    return f


def _check_file(f: h5py.File, path: Path, res: Sequence[int], fields: Sequence[str]) -> None:
    if py_value(f.attrs.get("format")) != FORMAT:
        raise PdedsError(
            f"{path} is an HDF5 file but not a pdeds data file (no format='{FORMAT}' attribute); "
            "give a file written by `pdeds data`"
        )
    version = py_value(f.attrs.get("format_version", 0))
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise PdedsError(
            f"{path} has format_version {version!r}, newer than this pdeds reads "
            f"({FORMAT_VERSION}); upgrade pdeds"
        )
    if "coeffs" not in f:
        raise PdedsError(f"{path} has no /coeffs dataset; the file is damaged, regenerate it")
    for n in res:
        name = res_group(n)
        if name not in f:
            raise PdedsError(
                f"{path} has no resolution {n} (/{name}; {_describe_resolutions(f)}); "
                f"generate it with `pdeds data --res {n}` or `pdeds solve --res {n}`"
            )
        group = f[name]
        # Groups written without FieldWriter carry no flag and count as complete.
        if not bool(py_value(group.attrs.get("complete", True))):
            raise PdedsError(
                f"{path}: /{name} is incomplete ({py_value(group.attrs.get('written', 0))} of "
                f"{py_value(group.attrs.get('samples', '?'))} samples written); rerun the command "
                "that wrote it"
            )
        for field in fields:
            if field not in group:
                held = ", ".join(k for k in group if k in FIELDS) or "no fields"
                hint = "--reference" if field == "u_ref" else f"--res {n}"
                raise PdedsError(
                    f"{path}: /{name} has no '{field}' dataset (it holds {held}); "
                    f"regenerate with `pdeds data ... {hint}`"
                )


def read_coefficients(path: PathLike) -> tuple[np.ndarray, dict[str, Any]]:
    """The (K, m) float64 coefficients and the root attributes as plain Python values."""
    with open_checked(path) as f:
        coeffs = f["coeffs"][...]
        meta = {k: py_value(v) for k, v in f.attrs.items()}
    return coeffs, meta


def read_fields(
    path: PathLike, n: int, *, samples: slice | Sequence[int] | None = None
) -> dict[str, Any]:
    """Everything stored for resolution n.

    Args:
        path: the data file.
        n: nodes per axis.
        samples: a slice or increasing indices to read; all samples when None.

    Returns:
        Dict with every dataset of the group ("nu", "u_ref", with u_ref the statistics
        "assembly_s", "setup_s", "solve_s", "iterations", "residual", and any other such as
        "u_pred") as numpy arrays, plus the group attributes ("rtol", "method", ...).
    """
    sel: Any = slice(None) if samples is None else samples
    if not isinstance(sel, slice):
        sel = np.asarray(sel, dtype=np.int64)
    with open_checked(path, res=[n]) as f:
        group = f[res_group(n)]
        out: dict[str, Any] = {k: py_value(v) for k, v in group.attrs.items()}
        for name, item in group.items():
            if isinstance(item, h5py.Dataset):
                out[name] = item[sel]
    return out


# ----------------------------------------------------------------------------- writing


def check_coeffs(coeffs: np.ndarray) -> np.ndarray:
    """Coefficients as a finite (K, m) float64 array, or a PdedsError naming the problem."""
    coeffs = np.asarray(coeffs)
    if coeffs.ndim != 2 or coeffs.shape[0] < 1 or coeffs.shape[1] < 1:
        raise PdedsError(
            f"coefficients must be a (samples, modes) array, got shape {coeffs.shape}; "
            "pass one row per sample"
        )
    if not np.issubdtype(coeffs.dtype, np.number):
        raise PdedsError(f"coefficients must be numbers, got dtype {coeffs.dtype}")
    coeffs = coeffs.astype(np.float64, copy=False)
    bad = ~np.isfinite(coeffs)
    if bad.any():
        rows = np.flatnonzero(bad.any(axis=1))
        raise PdedsError(
            f"coefficients contain NaN or inf (samples {rows[:5].tolist()}"
            f"{'...' if len(rows) > 5 else ''}); regenerate or clean the input"
        )
    return coeffs


def _root_attrs(coeffs: np.ndarray, meta: Mapping[str, Any]) -> dict[str, Any]:
    """Validated root attributes: meta plus modes/samples from the array and writer stamps."""
    k, m = coeffs.shape
    attrs = {key: value for key, value in meta.items() if key not in RESERVED_ATTRS}
    for key, actual in (("samples", k), ("modes", m)):
        if key in attrs and attrs[key] is not None and int(attrs[key]) != actual:
            raise PdedsError(
                f"meta says {key}={attrs[key]} but the coefficient array has {actual}; "
                "make them agree"
            )
        attrs[key] = actual
    attrs.setdefault("f", 0.0)
    for key in ("dim", "eta", "family"):
        if attrs.get(key) is None:
            raise PdedsError(f"meta lacks '{key}'; pass the parameters that generated the data")
    attrs = {key: value for key, value in attrs.items() if value is not None}
    attrs.update(
        format=FORMAT,
        format_version=FORMAT_VERSION,
        pdeds_version=pdeds.__version__,
        created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    )
    return attrs


def _create(path: Path, coeffs: np.ndarray, attrs: Mapping[str, Any]) -> None:
    """Write root attributes and /coeffs into a new file at ``path`` (truncating it)."""
    k, m = coeffs.shape
    try:
        f = h5py.File(path, "w")
    except OSError as err:
        raise PdedsError(f"cannot create {path}: {err}; check the folder is writable") from None
    with f:
        for key, value in attrs.items():
            f.attrs[key] = value
        # Coefficient rows are tiny: chunk them in blocks, not one row per chunk.
        f.create_dataset("coeffs", data=coeffs, chunks=(min(k, 4096), m), **COMPRESSION)


def write_coefficients(
    path: PathLike, coeffs: np.ndarray, meta: Mapping[str, Any], *, force: bool = False
) -> None:
    """Create a pdeds data file holding coefficients and generating parameters.

    Args:
        path: final file name; built as ``<path>.tmp`` and renamed when complete.
        coeffs: (K, m) coefficients, finite.
        meta: generating parameters: dim, eta, family required; seed, sobol, f, any extra
            scalar or string attributes optional (None values are skipped). samples and modes
            are taken from ``coeffs``.
        force: overwrite an existing file.
    """
    path = check_output(path, force=force)
    coeffs = check_coeffs(coeffs)
    attrs = _root_attrs(coeffs, meta)
    tmp = staging_path(path)
    try:
        _create(tmp, coeffs, attrs)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    publish(tmp, path)


def matches(path: PathLike, coeffs: np.ndarray, meta: Mapping[str, Any]) -> bool:
    """Whether an existing (staging) file holds exactly these coefficients and parameters."""
    try:
        f = open_checked(path)
    except PdedsError:
        return False
    try:
        with f:
            stored = {k: py_value(v) for k, v in f.attrs.items() if k not in RESERVED_ATTRS}
            same = np.array_equal(f["coeffs"][...], coeffs)
    except (OSError, KeyError):
        return False
    want = _root_attrs(check_coeffs(coeffs), meta)
    want = {k: v for k, v in want.items() if k not in RESERVED_ATTRS}
    return same and stored == {k: py_value(np.asarray(v)[()]) for k, v in want.items()}


def drop_resolutions(path: PathLike, *, keep: Sequence[int]) -> None:
    """Delete every resolution group of ``path`` whose n is not in ``keep``."""
    with open_checked(path, mode="r+") as f:
        for n in _resolutions(f):
            if n not in keep:
                del f[res_group(n)]


# ----------------------------------------------------------------------------- inspecting
