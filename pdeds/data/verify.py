"""Checking every sample of a pdeds data file (``pdeds data --inspect F --verify``).

For each resolution group and each sample: every field can be read, is finite, nu is positive,
and, where the file has them (format_version >= 2), the data and the statistics match the
checksums written with them. /coeffs must be finite and match ``coeffs_crc32``. A group must be
complete. Files of format_version 1 carry no checksums: their values alone are checked.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np

from pdeds.data.hdf5 import (
    CHECKSUMS,
    NOT_WRITTEN,
    STATS,
    checksum_table,
    open_checked,
    py_value,
    res_group,
    resolutions_in,
    stats_checksum,
)
from pdeds.data.integrity import H5_ERRORS, PathLike, checksum, reading, reason


@dataclass
class Verdict:
    """What :func:`verify` found."""

    path: Path
    checked: list[str] = field(default_factory=list)
    """One line per part checked: what it holds and how it was checked."""
    problems: list[str] = field(default_factory=list)
    """One line per problem: a bad sample by group and index, an incomplete group, bad coeffs."""
    bad: dict[int, list[int]] = field(default_factory=dict)
    """Resolution -> indices of its bad samples."""

    @property
    def ok(self) -> bool:
        return not self.problems

    def summary(self) -> str:
        """The problems in one line: bad samples by resolution and index (the first 20 of
        each), then the others (incomplete groups, bad coefficients)."""
        parts = []
        for n, ks in self.bad.items():
            more = f" ... ({len(ks)} in all)" if len(ks) > 20 else ""
            parts.append(f"res {n} samples {', '.join(map(str, ks[:20]))}{more}")
        parts += [p for p in self.problems if " sample " not in p]
        return "; ".join(parts)


def _sample_problems(
    group: h5py.Group, k: int, fields: list[str], crc: np.ndarray | None, columns: list[str]
) -> list[str]:
    """What is wrong with sample k of a group (empty when nothing is)."""
    out = []
    sums = {}
    for name in fields:
        try:
            a = group[name][k]
        except H5_ERRORS as err:
            out.append(f"{name} unreadable ({reason(err)})")
            continue
        sums[name] = a
        if not np.isfinite(a).all():
            out.append(f"{name} not finite")
        if name == "nu" and not (a > 0).all():
            out.append("nu not positive" + (" (all zero)" if not a.any() else ""))
    if crc is None:
        return out
    if (crc[k] == NOT_WRITTEN).any():
        return out + ["never written"]
    for c, column in enumerate(columns):
        if column == "stats":
            try:
                got = stats_checksum({s: group[s][k] for s in STATS})
            except H5_ERRORS as err:
                out.append(f"stats unreadable ({reason(err)})")
                continue
        elif column in sums:
            got = checksum(sums[column])
        else:
            continue
        if got != crc[k, c]:
            out.append(f"{column} checksum mismatch")
    return out


def _verify_group(f: h5py.File, n: int, samples: int, verdict: Verdict, version: int) -> None:
    name = res_group(n)
    with reading(verdict.path, f"/{name}"):
        group = f[name]
        table = checksum_table(group)
        complete = bool(py_value(group.attrs.get("complete", True)))
        written = int(py_value(group.attrs.get("written", samples)))
        fields = [
            key
            for key, item in group.items()
            if isinstance(item, h5py.Dataset) and key != CHECKSUMS and item.ndim >= 3
        ]
    crc, columns = table if table is not None else (None, [])
    if not complete:
        verdict.problems.append(f"/{name} is incomplete ({written} of {samples} samples written)")
    for k in range(samples):
        # Samples not written yet are counted in the incomplete line above, not as bad ones.
        if not complete and ((crc[k] == NOT_WRITTEN).all() if crc is not None else k >= written):
            continue
        found = _sample_problems(group, k, fields, crc, columns)
        if found:
            verdict.bad.setdefault(n, []).append(k)
            verdict.problems.append(f"/{name} sample {k}: {', '.join(found)}")
    how = "values and checksums" if crc is not None else _values_only(version)
    verdict.checked.append(f"/{name}: {', '.join(fields)} x {samples} samples ({how})")


def _values_only(version: int) -> str:
    if version < 2:
        return f"values only: format_version {version} has no checksums"
    return "values only: this group was written without checksums"


def verify(path: PathLike) -> Verdict:
    """Read and check every sample of a data file; the verdict lists each problem found.

    Raises:
        PdedsError: the file is not a readable pdeds data file (as :func:`open_checked`).
    """
    verdict = Verdict(Path(path))
    with open_checked(path) as f:
        version = int(py_value(f.attrs.get("format_version", 1)))
        try:
            coeffs = f["coeffs"][...]
        except H5_ERRORS as err:
            verdict.problems.append(f"/coeffs unreadable ({reason(err)})")
            coeffs = None
        if coeffs is not None:
            stored = py_value(f.attrs.get("coeffs_crc32"))
            if not np.isfinite(coeffs).all():
                verdict.problems.append("/coeffs not finite")
            if stored is not None and checksum(coeffs) != stored:
                verdict.problems.append("/coeffs checksum mismatch")
            how = "values and checksum" if stored is not None else _values_only(version)
            verdict.checked.append(f"/coeffs: {coeffs.shape[0]} x {coeffs.shape[1]} ({how})")
        with reading(verdict.path, "its groups"):
            samples = int(f["coeffs"].shape[0])
            res = resolutions_in(f)
        for n in res:
            _verify_group(f, n, samples, verdict, version)
    return verdict
