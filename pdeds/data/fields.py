"""Writing the field groups ``/res_{N}`` of a pdeds data file, sample by sample.

``FieldWriter`` appends one resolution group to a staging file and records how many samples
are in (``written``), so an interrupted run resumes; ``write_fields`` adds a whole group to an
existing file through a staging copy. The layout is described in ``pdeds.data.hdf5``.
"""

from __future__ import annotations

import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from pdeds.data.hdf5 import (
    COMPRESSION,
    FIELD_DTYPES,
    FIELDS,
    STAT_DTYPES,
    STAT_FILL,
    STATS,
    PathLike,
    open_checked,
    publish,
    py_value,
    res_group,
    staging_path,
)
from pdeds.errors import PdedsError


def _as_numpy(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    return np.asarray(x)


class FieldWriter:
    """Writes one resolution group sample by sample; resumes a group left unfinished.

    Use on a staging file (see :func:`staging_path`)::

        with FieldWriter(tmp, n, nu=True, u_ref=True, rtol=1e-10, method="amg") as w:
            for k in range(w.written, w.samples):
                w.write(k, nu=nu_k, u_ref=u_k, stats=stats_k)

    Samples are written in order; after each one the file is flushed and the group's
    ``written`` attribute counts it, so a rerun continues where a crash stopped. An existing
    group whose layout or solver settings differ is discarded and rewritten.

    Args:
        path: an existing pdeds data file (normally the staging file).
        n: nodes per axis.
        nu: store the diffusivity fields.
        u_ref: store reference solutions and their statistics.
        rtol: solver tolerance recorded with u_ref.
        method: solver method recorded with u_ref.
    """

    def __init__(
        self,
        path: PathLike,
        n: int,
        *,
        nu: bool = False,
        u_ref: bool = False,
        rtol: float | None = None,
        method: str | None = None,
    ) -> None:
        if not (nu or u_ref):
            raise PdedsError("nothing to write for a resolution; ask for nu and/or u_ref")
        if int(n) < 2:
            raise PdedsError(
                f"resolution must be >= 2 nodes per axis, got {n}; use --res 2 or more"
            )
        self.path = Path(path)
        self.n = int(n)
        self._file = open_checked(path, mode="r+")
        try:
            self.samples = int(self._file["coeffs"].shape[0])
            self.dim = int(py_value(self._file.attrs["dim"]))
            self._names = [name for name, want in zip(FIELDS, (nu, u_ref), strict=True) if want]
            attrs = {"n": self.n, "samples": self.samples}
            if u_ref:
                attrs.update(rtol=rtol, method=method)
            self._group = self._open_group({k: v for k, v in attrs.items() if v is not None})
        except BaseException:
            self._file.close()
            raise
        self.written = int(py_value(self._group.attrs["written"]))

    def _layout_matches(self, group: h5py.Group, attrs: Mapping[str, Any]) -> bool:
        shape = (self.samples, 1) + (self.n,) * self.dim
        held = sorted(k for k in group if k in FIELDS)
        if held != sorted(self._names):
            return False
        if any(group[k].shape != shape for k in held):
            return False
        return all(py_value(group.attrs.get(k)) == v for k, v in attrs.items())

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
        for key, value in attrs.items():
            group.attrs[key] = value
        group.attrs["written"] = 0
        group.attrs["complete"] = False
        self._file.flush()
        return group

    def write(
        self,
        k: int,
        *,
        nu: Any = None,
        u_ref: Any = None,
        stats: Mapping[str, float] | None = None,
    ) -> None:
        """Store sample k (must equal ``written``); arrays of shape (1, N..) or (1, 1, N..)."""
        if k != self.written:
            raise ValueError(f"samples are written in order: expected {self.written}, got {k}")
        given = {"nu": nu, "u_ref": u_ref}
        for field in self._names:
            if given[field] is None:
                raise ValueError(f"sample {k} at res {self.n} lacks '{field}'")
            dset = self._group[field]
            dset[k] = _as_numpy(given[field]).reshape(dset.shape[1:]).astype(dset.dtype)
        if "u_ref" in self._names:
            if stats is None:
                raise ValueError(f"sample {k} at res {self.n} lacks solver statistics")
            for stat in STATS:
                if stat in stats:
                    self._group[stat][k] = stats[stat]
        self.written = k + 1
        self._group.attrs["written"] = self.written
        self._file.flush()

    def close(self) -> None:
        """Mark the group complete when every sample is in, and close the file."""
        if self._file.id.valid:
            if self.written == self.samples:
                self._group.attrs["complete"] = True
            self._file.close()

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
    ``path``, so a crash leaves the original untouched (this copies the file once; the CLI
    builds files in one pass and does not pay it).

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
    shutil.copyfile(path, tmp)
    try:
        with open_checked(tmp, mode="r+") as f:
            if res_group(n) in f:
                del f[res_group(n)]
        with FieldWriter(
            tmp, n, nu="nu" in arrays, u_ref="u_ref" in arrays, rtol=rtol, method=method
        ) as w:
            for i in range(k):
                w.write(
                    i,
                    nu=arrays["nu"][i] if "nu" in arrays else None,
                    u_ref=arrays["u_ref"][i] if "u_ref" in arrays else None,
                    stats=stats[i] if stats is not None else None,
                )
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    publish(tmp, path)
