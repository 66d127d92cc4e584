"""The pdeds data file: coefficients, optional fields and reference solutions in HDF5.

Layout (format "pdeds-data", format_version 2)::

    /                      attrs: format, format_version, pdeds_version, created (ISO 8601, UTC),
                                  coeffs_crc32, dim, modes, eta, family, seed, sobol, samples, f
                                  (+ extra meta)
    /coeffs                (K, m)        float64   KL coefficients a (always present)
    /res_{N}/              attrs: n, samples, written, complete, [rtol, method]
    /res_{N}/nu            (K, 1, N..)   float32   nu at the nodes (optional)
    /res_{N}/u_ref         (K, 1, N..)   float64   reference FEM solution (optional)
    /res_{N}/u_pred        (K, 1, N..)   float32   a network's prediction (`pdeds predict`)
    /res_{N}/assembly_s    (K,)          float64   seconds to assemble K and F      } only with
    /res_{N}/setup_s       (K,)          float64   seconds of AMG setup              } u_ref
    /res_{N}/solve_s       (K,)          float64   seconds of preconditioned CG      }
    /res_{N}/iterations    (K,)          int64     CG iterations                     }
    /res_{N}/residual      (K,)          float64   final relative residual           }
    /res_{N}/crc32         (K, C)        int64     per-sample checksums, attr columns

Fields are chunked one sample per chunk and gzip-compressed (with the shuffle filter), so a
reader pulls one sample without decompressing the others. Axis 2 of a field is x1.

Checksums. ``crc32[k, c]`` is the CRC-32 (zlib) of sample k's bytes of column c: a field
("nu", "u_ref", "u_pred") in its stored dtype, C order, or "stats", the statistics of sample k
in :data:`STATS` order. It is written after the sample's data and is -1 until then, so it is
also the sample's "written" flag; ``coeffs_crc32`` covers /coeffs the same way. A CRC of the
uncompressed bytes, computed once from the array in memory, covers everything between it and
a later read (filters, HDF5's chunk index, the disk), and costs ~1 ms per MiB-sample against
gzip's tens of ms. HDF5's own fletcher32 filter would not do: it checks a chunk HDF5 finds, and
a chunk lost in a crash reads back as the fill value (zeros) without complaint. Readers
(:func:`read_fields`) check the checksums of what they read; version 1 files have none and
are read as before (``pdeds data --inspect --verify`` checks their values only).

Crash safety: a new file is always written to ``<path>.tmp`` and renamed over ``<path>`` only
when complete, so a crash never leaves a half file under the final name. Long runs write the
staging file sample by sample through :class:`~pdeds.data.fields.FieldWriter`; a rerun keeps
the samples whose checksums still match and recomputes the others; a group is marked
``complete`` only when every sample is in. A full disk or another OS error while writing is a
:class:`PdedsError` naming the file and the free space (:mod:`pdeds.data.integrity`).
"""

from __future__ import annotations

import datetime
import os
import zlib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import h5py
import numpy as np

import pdeds
from pdeds.data.integrity import (
    H5_ERRORS,
    PathLike,
    check_space,
    checksum,
    close_or_abandon,
    damaged,
    discard,
    reading,
    reason,
    write_error,
)
from pdeds.errors import PdedsError

FORMAT = "pdeds-data"
FORMAT_VERSION = 2
"""2 added the checksums (``crc32``, ``coeffs_crc32``) and ``u_pred``; 1 is still read."""
RESERVED_ATTRS = ("format", "format_version", "pdeds_version", "created", "coeffs_crc32")
"""Root attributes set by the writer itself; meta cannot supply them."""
FIELDS = ("nu", "u_ref", "u_pred")
FIELD_DTYPES = {"nu": np.float32, "u_ref": np.float64, "u_pred": np.float32}
STATS = ("assembly_s", "setup_s", "solve_s", "iterations", "residual")
"""Per-sample reference-solve statistics stored next to u_ref (keys of solve_with_stats)."""
STAT_DTYPES = {"iterations": np.int64}
STAT_FILL = {"iterations": -1}
COMPRESSION = {"compression": "gzip", "compression_opts": 4, "shuffle": True}
CHECKSUMS = "crc32"
"""The (K, C) per-sample checksum dataset of a resolution group; its attr ``columns`` names C."""
NOT_WRITTEN = -1
"""A checksum entry of a sample whose data is not (yet) in the file."""


def res_group(n: int) -> str:
    """Name of the group that holds resolution n (nodes per axis)."""
    return f"res_{int(n)}"


def staging_path(path: PathLike) -> Path:
    """Where a file is built before the rename that publishes it: ``<path>.tmp``."""
    path = Path(path)
    return path.with_name(path.name + ".tmp")


def check_output(path: PathLike, *, force: bool) -> Path:
    """Refuse an output path that exists (unless ``force``) or whose folder is missing or
    cannot be written (permissions, a read-only file system)."""
    path = Path(path)
    if path.is_dir():
        raise PdedsError(f"output {path} is a directory; give a file name such as {path}/data.h5")
    if path.exists() and not force:
        raise PdedsError(f"{path} exists; pass --force to overwrite")
    if not path.parent.is_dir():
        raise PdedsError(f"output folder {path.parent} does not exist; create it first")
    if not os.access(path.parent, os.W_OK):
        raise PdedsError(
            f"output folder {path.parent} is not writable (permissions or a read-only file "
            "system); choose another output folder"
        )
    return path


def publish(staging: PathLike, path: PathLike) -> None:
    """Atomically rename a finished staging file to its final name."""
    os.replace(staging, path)


# ----------------------------------------------------------------------------- checksums


def stats_row(stats: Mapping[str, Any]) -> dict[str, Any]:
    """One sample's statistics as stored: each of :data:`STATS` in its dtype, fill if absent."""
    return {
        s: np.asarray(stats.get(s, STAT_FILL.get(s, np.nan)), STAT_DTYPES.get(s, np.float64))
        for s in STATS
    }


def stats_checksum(row: Mapping[str, Any]) -> int:
    """CRC-32 of a :func:`stats_row` (the "stats" column of ``crc32``)."""
    crc = 0
    for s in STATS:
        crc = zlib.crc32(np.asarray(row[s], STAT_DTYPES.get(s, np.float64)).tobytes(), crc)
    return crc


def checksum_table(group: h5py.Group) -> tuple[np.ndarray, list[str]] | None:
    """The (K, C) checksums of a resolution group and their column names; None when it has
    none (format_version 1, or a group written without FieldWriter)."""
    if CHECKSUMS not in group:
        return None
    dset = group[CHECKSUMS]
    return dset[...], [str(py_value(c)) for c in dset.attrs["columns"]]


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


def resolutions_in(f: h5py.File) -> list[int]:
    """The resolutions (nodes per axis) an open data file holds groups for, increasing."""
    out = []
    for name in f:
        if name.startswith("res_") and name[4:].isdigit() and isinstance(f[name], h5py.Group):
            out.append(int(name[4:]))
    return sorted(out)


def _describe_resolutions(f: h5py.File) -> str:
    res = resolutions_in(f)
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
            /coeffs, missing or incomplete resolution, missing field, damaged structure.
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
    except H5_ERRORS as err:
        raise PdedsError(
            f"cannot open {path}: {reason(err)}; check its permissions, or regenerate it if it "
            "is damaged"
        ) from None
    try:
        with reading(path, "its groups"):
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
    """The (K, m) float64 coefficients and the root attributes as plain Python values.

    Raises:
        PdedsError: as :func:`open_checked`, or /coeffs unreadable or not matching its
            checksum (format_version >= 2).
    """
    with open_checked(path) as f, reading(path, "/coeffs"):
        coeffs = f["coeffs"][...]
        meta = {k: py_value(v) for k, v in f.attrs.items()}
    stored = meta.get("coeffs_crc32")
    if stored is not None and checksum(coeffs) != stored:
        raise damaged(path, "/coeffs", "checksum mismatch")
    return coeffs, meta


def _read_samples(path: PathLike, dset: h5py.Dataset, sel: Any, index: np.ndarray) -> np.ndarray:
    """``dset[sel]``; when HDF5 fails, the first sample of ``index`` that cannot be read is
    named (a chunk is one sample, so one damaged chunk is one damaged sample)."""
    try:
        return dset[sel]
    except H5_ERRORS as err:
        first = err
    for k in index:
        try:
            dset[int(k)]
        except H5_ERRORS as err:
            raise damaged(path, f"{dset.name} sample {k}", err) from None
    raise damaged(path, dset.name, first)


def read_fields(
    path: PathLike, n: int, *, samples: slice | Sequence[int] | None = None
) -> dict[str, Any]:
    """Everything stored for resolution n, checked against its checksums.

    Args:
        path: the data file.
        n: nodes per axis.
        samples: a slice or increasing indices to read; all samples when None.

    Returns:
        Dict with every dataset of the group ("nu", "u_ref", with u_ref the statistics
        "assembly_s", "setup_s", "solve_s", "iterations", "residual", and any other such as
        "u_pred"; not the checksums) as numpy arrays, plus the group attributes ("rtol",
        "method", ...).

    Raises:
        PdedsError: as :func:`open_checked`, or a sample that cannot be read or does not match
            its checksum (named by index).
    """
    sel: Any = slice(None) if samples is None else samples
    if not isinstance(sel, slice):
        sel = np.asarray(sel, dtype=np.int64)
    name = res_group(n)
    with open_checked(path, res=[n]) as f, reading(path, f"/{name}"):
        group = f[name]
        index = np.arange(int(f["coeffs"].shape[0]))[sel]
        out: dict[str, Any] = {k: py_value(v) for k, v in group.attrs.items()}
        for key, item in group.items():
            if isinstance(item, h5py.Dataset) and key != CHECKSUMS:
                out[key] = _read_samples(path, item, sel, index)
        table = checksum_table(group)
    if table is not None:
        _check_read(path, name, out, index, *table)
    return out


def _check_read(
    path: PathLike,
    name: str,
    out: Mapping[str, Any],
    index: np.ndarray,
    crc: np.ndarray,
    columns: list[str],
) -> None:
    for c, column in enumerate(columns):
        if column != "stats" and column not in out:
            continue
        for j, k in enumerate(index):
            if column == "stats":
                got = stats_checksum({s: out[s][j] for s in STATS})
            else:
                got = checksum(out[column][j])
            if got != crc[k, c]:
                why = "never written" if crc[k, c] == NOT_WRITTEN else "checksum mismatch"
                raise damaged(path, f"/{name}/{column} sample {k}", why)


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
        coeffs_crc32=checksum(coeffs),
    )
    return attrs


def _create(path: Path, coeffs: np.ndarray, attrs: Mapping[str, Any]) -> None:
    """Write root attributes and /coeffs into a new file at ``path`` (truncating it)."""
    k, m = coeffs.shape
    check_space(path, coeffs.nbytes, "the coefficients")
    try:
        f = h5py.File(path, "w")
    except H5_ERRORS as err:
        raise write_error(path, err) from None
    try:
        for key, value in attrs.items():
            f.attrs[key] = value
        # Coefficient rows are tiny: chunk them in blocks, not one row per chunk.
        f.create_dataset("coeffs", data=coeffs, chunks=(min(k, 4096), m), **COMPRESSION)
        f.close()
    except BaseException as err:
        close_or_abandon(f, path, err)
        if isinstance(err, H5_ERRORS):
            raise write_error(path, err) from None
        raise


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

    Raises:
        PdedsError: bad path or coefficients, or a failed write (naming the free space); no
            file is left behind then and an existing ``path`` is unchanged.
    """
    path = check_output(path, force=force)
    coeffs = check_coeffs(coeffs)
    attrs = _root_attrs(coeffs, meta)
    tmp = staging_path(path)
    try:
        _create(tmp, coeffs, attrs)
    except BaseException:
        discard(tmp)
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
    except H5_ERRORS:
        return False
    want = _root_attrs(check_coeffs(coeffs), meta)
    want = {k: v for k, v in want.items() if k not in RESERVED_ATTRS}
    return same and stored == {k: py_value(np.asarray(v)[()]) for k, v in want.items()}


def drop_resolutions(path: PathLike, *, keep: Sequence[int]) -> None:
    """Delete every resolution group of ``path`` whose n is not in ``keep``."""
    with open_checked(path, mode="r+") as f:
        try:
            for n in resolutions_in(f):
                if n not in keep:
                    del f[res_group(n)]
        except H5_ERRORS as err:
            raise write_error(path, err) from None
