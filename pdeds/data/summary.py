"""A human-readable summary of a pdeds data file (``pdeds data --inspect``)."""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import h5py

from pdeds.data.hdf5 import open_checked, py_value
from pdeds.data.integrity import PathLike, reading


def _filters(dset: h5py.Dataset) -> str:
    parts = []
    if dset.chunks:
        parts.append("chunks " + "x".join(map(str, dset.chunks)))
    if dset.compression:
        opts = f" {dset.compression_opts}" if dset.compression_opts is not None else ""
        parts.append(f"{dset.compression}{opts}")
    if dset.shuffle:
        parts.append("shuffle")
    return ", ".join(parts) or "contiguous"


def _format_attr(value: Any) -> str:
    value = py_value(value)
    if isinstance(value, float) and math.isfinite(value):
        return f"{value:g}"
    return str(value)


def _natural(name: str) -> list[Any]:
    """Sort key that orders res_9 before res_17."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def inspect(path: PathLike) -> str:
    """A human summary of a data file: root attributes, then every group and dataset.

    Raises:
        PdedsError: not a readable pdeds data file, or its structure is damaged.
    """
    path = Path(path)
    with open_checked(path) as f, reading(path, "its structure"):
        lines = [f"{path}  ({path.stat().st_size / 2**20:.2f} MiB)"]
        lines.append("attributes:")
        width = max(len(k) for k in f.attrs)
        for key in sorted(f.attrs):
            lines.append(f"  {key:<{width}} = {_format_attr(f.attrs[key])}")
        rows: list[tuple[str, str, str, str]] = []
        group_attrs: list[str] = []

        def visit(name: str, obj: Any) -> None:
            if isinstance(obj, h5py.Dataset):
                shape = "(" + ", ".join(map(str, obj.shape)) + ")"
                rows.append(("/" + name, shape, str(obj.dtype), _filters(obj)))
            elif obj.attrs:
                attrs = "  ".join(f"{k}={_format_attr(v)}" for k, v in sorted(obj.attrs.items()))
                group_attrs.append(f"  /{name}: {attrs}")

        f.visititems(visit)
        rows.sort(key=lambda r: _natural(r[0]))
        group_attrs.sort(key=_natural)
        lines.append("datasets:")
        widths = [max(len(r[i]) for r in rows) for i in range(3)]
        for r in rows:
            lines.append(f"  {r[0]:<{widths[0]}}  {r[1]:<{widths[1]}}  {r[2]:<{widths[2]}}  {r[3]}")
        if group_attrs:
            lines.append("groups:")
            lines.extend(group_attrs)
    return "\n".join(lines)
