"""Writing the field groups ``/res_{N}`` of a pdeds data file, sample by sample.

``FieldWriter`` appends one resolution group to a staging file, each sample with its checksums,
so an interrupted run resumes from the samples that verify; ``write_fields`` adds a whole group
to an existing file through a staging copy. The layout is described in ``pdeds.data.hdf5``.
"""

from __future__ import annotations

import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from pdeds.data.hdf5 import (
    CHECKSUMS,
    COMPRESSION,
    FIELD_DTYPES,
    FIELDS,
    NOT_WRITTEN,
    STAT_DTYPES,
    STAT_FILL,
    STATS,
    open_checked,
    publish,
    py_value,
    res_group,
    staging_path,
    stats_checksum,
    stats_row,
)
from pdeds.data.integrity import (
    H5_ERRORS,
    PathLike,
    check_space,
    checksum,
    close_or_abandon,
    discard,
    write_error,
)
from pdeds.errors import PdedsError

RESUME = "rerun the same command to resume: it keeps the samples whose checksums still match"


def _as_numpy(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    return np.asarray(x)


class FieldWriter:
    """Writes one resolution group sample by sample; resumes a group left unfinished.

    Use on a staging file (see :func:`staging_path`)::

        with FieldWriter(tmp, n, nu=True, u_ref=True, rtol=1e-10, method="amg") as w:
            for k in w.todo:
                w.write(k, nu=nu_k, u_ref=u_k, stats=stats_k)

    Each sample's data goes in before its checksums, which double as its "written" flag; the
    file is flushed after every sample. Opening an existing group re-reads every sample it
    claims and keeps only those that match their checksums (the others are in ``rejected``
    and back in ``todo``): after a crash or a full disk, HDF5 may have kept a sample's
    checksums but not its data. An existing group whose layout or solver settings differ is
    discarded and rewritten. ``complete`` is set on close only when every sample is in.

    A write that fails in HDF5 (full disk, I/O error) or that the free space cannot hold
    raises one PdedsError naming the file and the space left; the file is closed cleanly and
    kept to resume, or removed when HDF5 could not close it.

    Args:
        path: an existing pdeds data file (normally the staging file).
        n: nodes per axis.
        nu: store the diffusivity fields.
        u_ref: store reference solutions and their statistics.
        u_pred: store a network's predictions.
        rtol: solver tolerance recorded with u_ref.
        method: solver method recorded with u_ref.
        attrs: further group attributes (e.g. the checkpoint behind u_pred).
        then: what a failure message tells the user to do next; by default that rerunning
            resumes (pass "" when the caller removes the file on failure).
    """

    def __init__(
        self,
        path: PathLike,
        n: int,
        *,
        nu: bool = False,
        u_ref: bool = False,
        u_pred: bool = False,
        rtol: float | None = None,
        method: str | None = None,
        attrs: Mapping[str, Any] | None = None,
        then: str = RESUME,
    ) -> None:
        if not (nu or u_ref or u_pred):
            raise PdedsError("nothing to write for a resolution; ask for nu, u_ref or u_pred")
        if int(n) < 2:
            raise PdedsError(
                f"resolution must be >= 2 nodes per axis, got {n}; use --res 2 or more"
            )
        self.path = Path(path)
        self.n = int(n)
        self.then = then
        self._file = open_checked(path, mode="r+")
        try:
            self.samples = int(self._file["coeffs"].shape[0])
            self.dim = int(py_value(self._file.attrs["dim"]))
            wanted = (nu, u_ref, u_pred)
            self._names = [name for name, want in zip(FIELDS, wanted, strict=True) if want]
            self._columns = self._names + (["stats"] if u_ref else [])
            group_attrs = {"n": self.n, "samples": self.samples, **(attrs or {})}
            if u_ref:
                group_attrs.update(rtol=rtol, method=method)
            self._group = self._open_group({k: v for k, v in group_attrs.items() if v is not None})
            self._done, self.rejected = self._verify_kept()
        except H5_ERRORS as err:
            self._fail(err)
        except BaseException:
            self._file.close()
            raise

    @property
    def written(self) -> int:
        """How many samples are in (and verified, for those kept from an earlier run)."""
        return int(self._done.sum())

    @property
    def todo(self) -> list[int]:
        """Indices of the samples still to write, increasing."""
        return np.flatnonzero(~self._done).tolist()

    def _layout_matches(self, group: h5py.Group, attrs: Mapping[str, Any]) -> bool:
        """Whether an existing group can be resumed: same fields, shapes, settings, and
        readable checksums (a group without them, from format_version 1, is not trusted)."""
        shape = (self.samples, 1) + (self.n,) * self.dim
        try:
            held = sorted(k for k in group if k in FIELDS)
            if held != sorted(self._names) or CHECKSUMS not in group:
                return False
            if any(group[k].shape != shape for k in held):
                return False
            crc = group[CHECKSUMS]
            columns = [py_value(c) for c in crc.attrs.get("columns", [])]
            if columns != self._columns or crc[...].shape != (self.samples, len(columns)):
                return False
            return all(py_value(group.attrs.get(k)) == v for k, v in attrs.items())
        except H5_ERRORS:
            return False

    def _open_group(self, attrs: Mapping[str, Any]) -> h5py.Group:
        name = res_group(self.n)
        if name in self._file:
            if self._layout_matches(self._file[name], attrs):
                return self._file[name]
            del self._file[name]
        group = self._file.create_group(name)
        shape = (self.samples, 1) + (self.n,) * self.dim
        for field in self._names:
            group.create_dataset(
                field,
                shape=shape,
                dtype=FIELD_DTYPES[field],
                chunks=(1,) + shape[1:],
                **COMPRESSION,
            )
        if "u_ref" in self._names:
            for stat in STATS:
                dtype = STAT_DTYPES.get(stat, np.float64)
                fill = STAT_FILL.get(stat, np.nan)
                group.create_dataset(stat, data=np.full(self.samples, fill, dtype=dtype))
        crc = group.create_dataset(
            CHECKSUMS, data=np.full((self.samples, len(self._columns)), NOT_WRITTEN, np.int64)
        )
        crc.attrs["columns"] = self._columns
        for key, value in attrs.items():
            group.attrs[key] = value
        group.attrs["written"] = 0
        group.attrs["complete"] = False
        self._file.flush()
        return group

    def _stored_checksums(self, k: int) -> list[int] | None:
        """Checksums of sample k as it reads back now; None if it cannot be read."""
        try:
            sums = [checksum(self._group[field][k]) for field in self._names]
            if "stats" in self._columns:
                sums.append(stats_checksum({s: self._group[s][k] for s in STATS}))
        except H5_ERRORS:
            return None
        return sums

    def _verify_kept(self) -> tuple[np.ndarray, list[int]]:
        """Which samples are in and match their checksums, and which claimed to be but do not
        (their checksum entries are reset, so they count as not written)."""
        crc = self._group[CHECKSUMS][...]
        done = (crc != NOT_WRITTEN).all(axis=1)
        rejected = [
            int(k) for k in np.flatnonzero(done) if self._stored_checksums(k) != crc[k].tolist()
        ]
        if rejected:
            done[rejected] = False
            crc[rejected] = NOT_WRITTEN
            self._group[CHECKSUMS][...] = crc
        if rejected or int(py_value(self._group.attrs["written"])) != int(done.sum()):
            self._group.attrs["written"] = int(done.sum())
            self._group.attrs["complete"] = False
            self._file.flush()
        return done, rejected

    def write(
        self,
        k: int,
        *,
        nu: Any = None,
        u_ref: Any = None,
        u_pred: Any = None,
        stats: Mapping[str, float] | None = None,
    ) -> None:
        """Store sample k (one of ``todo``); arrays of shape (1, N..) or (1, 1, N..).

        Raises:
            ValueError: k is out of range or written already, or a field is missing.
            PdedsError: the folder has no room for the sample, or HDF5 failed to write it.
        """
        if not 0 <= k < self.samples or self._done[k]:
            raise ValueError(f"sample {k} is not one still to write at res {self.n}")
        given = {"nu": nu, "u_ref": u_ref, "u_pred": u_pred}
        arrays = {}
        for field in self._names:
            if given[field] is None:
                raise ValueError(f"sample {k} at res {self.n} lacks '{field}'")
            dset = self._group[field]
            a = _as_numpy(given[field]).reshape(dset.shape[1:]).astype(dset.dtype, copy=False)
            arrays[field] = np.ascontiguousarray(a)
        sums = [checksum(a) for a in arrays.values()]
        row = None
        if "u_ref" in self._names:
            if stats is None:
                raise ValueError(f"sample {k} at res {self.n} lacks solver statistics")
            row = stats_row(stats)
            sums.append(stats_checksum(row))
        check_space(self.path, sum(a.nbytes for a in arrays.values()), f"sample {k}", self.then)
        try:
            for field, a in arrays.items():
                self._group[field][k] = a
            for stat, value in (row or {}).items():
                self._group[stat][k] = value
            self._group[CHECKSUMS][k] = sums
            self._done[k] = True
            self._group.attrs["written"] = self.written
            self._file.flush()
        except H5_ERRORS as err:
            self._fail(err)

    def _fail(self, err: BaseException) -> None:
        """Close (or abandon) the file after HDF5 failed, and raise the one-line error."""
        kept = close_or_abandon(self._file, self.path, err)
        then = (
            self.then
            if kept
            else f"{self.path} was removed (HDF5 cannot close a file on a full disk)"
        )
        raise write_error(self.path, err, then) from None

    def close(self) -> None:
        """Mark the group complete when every sample is in, and close the file."""
        if not self._file.id.valid:
            return
        try:
            if self._done.all():
                self._group.attrs["complete"] = True
            self._file.close()
        except H5_ERRORS as err:
            self._fail(err)

    def __enter__(self) -> FieldWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def write_fields(
    path: PathLike,
    n: int,
    nu: Any = None,
    u_ref: Any = None,
    stats: Sequence[Mapping[str, float]] | None = None,
    *,
    rtol: float | None = None,
    method: str | None = None,
    force: bool = False,
) -> None:
    """Add resolution n (nu and/or u_ref for every sample) to an existing data file.

    The file is copied to ``<path>.tmp``, the group written there, and the copy renamed over
    ``path``, so a failure (a full disk included) leaves the original untouched (this copies
    the file once; the CLI builds files in one pass and does not pay it).

    Args:
        path: an existing pdeds data file.
        n: nodes per axis.
        nu: (K, 1, N..) diffusivity, stored as float32.
        u_ref: (K, 1, N..) reference solutions, stored as float64.
        stats: per-sample dicts (keys of :data:`STATS`), required with u_ref.
        rtol: solver tolerance, recorded with u_ref.
        method: solver method, recorded with u_ref.
        force: replace an existing group for resolution n.
    """
    path = Path(path)
    with open_checked(path) as f:
        k = int(f["coeffs"].shape[0])
        exists = res_group(n) in f
    if exists and not force:
        raise PdedsError(f"{path} already holds resolution {n}; pass --force to overwrite")
    if u_ref is not None and (stats is None or len(stats) != k):
        raise PdedsError(f"u_ref needs one statistics dict per sample ({k}); pass stats")
    arrays = {name: _as_numpy(a) for name, a in (("nu", nu), ("u_ref", u_ref)) if a is not None}
    for name, a in arrays.items():
        if a.shape[0] != k:
            raise PdedsError(f"{name} has {a.shape[0]} samples but the file has {k}; match them")
    tmp = staging_path(path)
    unchanged = f"{path} is unchanged"
    try:
        check_space(tmp, path.stat().st_size, f"a copy of {path}", unchanged)
        try:
            shutil.copyfile(path, tmp)
        except OSError as err:
            raise write_error(tmp, err, unchanged) from None
        with open_checked(tmp, mode="r+") as f:
            try:
                if res_group(n) in f:
                    del f[res_group(n)]
            except H5_ERRORS as err:
                raise write_error(tmp, err, unchanged) from None
        with FieldWriter(
            tmp,
            n,
            nu="nu" in arrays,
            u_ref="u_ref" in arrays,
            rtol=rtol,
            method=method,
            then=unchanged,
        ) as w:
            for i in w.todo:
                w.write(
                    i,
                    nu=arrays["nu"][i] if "nu" in arrays else None,
                    u_ref=arrays["u_ref"][i] if "u_ref" in arrays else None,
                    stats=stats[i] if stats is not None else None,
                )
    except BaseException:
        discard(tmp)
        raise
    publish(tmp, path)
