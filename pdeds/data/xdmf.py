"""XDMF 3 sidecar so ParaView (or VisIt) opens the fields of a pdeds data file.

The sidecar holds no data: it describes the grid and points into the HDF5 file. Each sample
is one uniform grid in a temporal collection, so ParaView's time slider steps through the
samples (time value = sample index). The grid is the nodal grid of METHOD.md: a
``3DCoRectMesh`` (``2DCoRectMesh`` in 2-D) with origin 0 and spacing h = 1/(n-1) on every
axis. Each field is a node-centred scalar read from the ``(K, 1, n, ..)`` dataset by a
HyperSlab selecting ``[k, 0, :, ..]`` (start k 0 0.., stride 1.., count 1 1 n..), declared
with Dimensions ``n n [n]`` so its rank matches the topology (VTK's XDMF reader checks this).

Axis mapping. XDMF lists ``Dimensions`` slowest-varying first ("z y x"); our arrays are
C-ordered with x1 on array axis 2 (slowest spatial axis), so the two orders coincide and
VTK's XDMF readers (ParaView's default Xdmf3 reader and the legacy one) give

    3-D: x1 (array axis 2) -> ParaView Z,  x2 (axis 3) -> Y,  x3 (axis 4) -> X
    2-D: x1 (array axis 2) -> ParaView Z,  x2 (axis 3) -> Y   (the grid lies in the plane X = 0;
         look along +X, "Set view direction to +X", to see it face on)

so the Dirichlet faces u = 1 (x1 = 0) and u = 0 (x1 = 1) are Z = 0 and Z = 1 in both cases
(checked with VTK 9's vtkXdmfReader: point (X, Y, Z) = (i, j, k) holds field[.., k, j, i]).
Origin and spacing are the same on every axis, so the order of the ORIGIN_DXDYDZ values does
not matter.
"""

from __future__ import annotations

import os
import xml.etree.ElementTree as ET
from collections.abc import Mapping, Sequence
from pathlib import Path

import h5py
import numpy as np

from pdeds.data.integrity import H5_ERRORS, PathLike, discard, reading, write_error
from pdeds.errors import PdedsError


def _dims(shape: Sequence[int]) -> str:
    return " ".join(str(int(s)) for s in shape)


def _number_type(dtype: np.dtype) -> tuple[str, int]:
    if np.issubdtype(dtype, np.floating):
        return "Float", dtype.itemsize
    if np.issubdtype(dtype, np.integer):
        return "Int", dtype.itemsize
    raise PdedsError(f"XDMF cannot describe a dataset of dtype {dtype}; export a numeric field")


def _dataset_info(h5_path: Path, datasets: Mapping[str, str], n: int, dim: int) -> dict:
    """Shape and dtype of each dataset, checked to be (K, 1, n, ..)."""
    info = {}
    try:
        f = h5py.File(h5_path, "r")
    except H5_ERRORS as err:
        raise PdedsError(f"cannot open {h5_path}: {err}; give a pdeds data file") from None
    with f, reading(h5_path, "its datasets"):
        for name, dpath in datasets.items():
            if dpath not in f or not isinstance(f[dpath], h5py.Dataset):
                raise PdedsError(f"{h5_path} has no dataset {dpath}; list it with --inspect")
            dset = f[dpath]
            if dset.ndim != 2 + dim or dset.shape[1] != 1 or dset.shape[2:] != (n,) * dim:
                want = "(K, 1, " + ", ".join([str(n)] * dim) + ")"
                raise PdedsError(
                    f"{h5_path}:{dpath} has shape {dset.shape}, not {want}; "
                    f"pick a field of resolution {n} in {dim}-D"
                )
            info[name] = (dset.shape, dset.dtype)
    ks = {shape[0] for shape, _ in info.values()}
    if len(ks) != 1:
        raise PdedsError(f"datasets {sorted(datasets)} hold different sample counts {sorted(ks)}")
    return info


def write_xdmf(
    h5_path: PathLike,
    xdmf_path: PathLike,
    datasets: Mapping[str, str],
    n: int,
    dim: int,
    *,
    samples: Sequence[int] | None = None,
) -> None:
    """Write an XDMF 3 file describing node-centred fields of one resolution.

    Args:
        h5_path: the HDF5 file the fields live in (referenced relative to the sidecar).
        xdmf_path: sidecar to write.
        datasets: attribute name -> HDF5 dataset path, e.g. {"nu": "/res_33/nu"}; each
            dataset has shape (K, 1, n, n[, n]).
        n: nodes per axis.
        dim: 2 or 3.
        samples: which samples to include (default all K), one grid each.

    Raises:
        PdedsError: a dataset missing or of the wrong shape, or the sidecar cannot be written
            (an existing sidecar is then unchanged).
    """
    if dim not in (2, 3):
        raise PdedsError(f"dim must be 2 or 3, got {dim!r}")
    if not datasets:
        raise PdedsError("no datasets to describe; pass at least one field")
    h5_path, xdmf_path = Path(h5_path), Path(xdmf_path)
    datasets = {name: "/" + dpath.lstrip("/") for name, dpath in datasets.items()}
    info = _dataset_info(h5_path, datasets, n, dim)
    k_all = next(iter(info.values()))[0][0]
    chosen = list(range(k_all)) if samples is None else [int(k) for k in samples]
    if any(not 0 <= k < k_all for k in chosen):
        raise PdedsError(f"sample indices must lie in [0, {k_all}); got {chosen}")
    ref = os.path.relpath(h5_path.resolve(), xdmf_path.resolve().parent)
    h = 1.0 / (n - 1)
    topology = f"{dim}DCoRectMesh"
    geometry = "ORIGIN_DXDYDZ" if dim == 3 else "ORIGIN_DXDY"

    root = ET.Element("Xdmf", Version="3.0")
    domain = ET.SubElement(root, "Domain")
    collection = ET.SubElement(
        domain, "Grid", Name="samples", GridType="Collection", CollectionType="Temporal"
    )
    for k in chosen:
        grid = ET.SubElement(collection, "Grid", Name=f"sample_{k}", GridType="Uniform")
        ET.SubElement(grid, "Time", Value=str(k))
        ET.SubElement(grid, "Topology", TopologyType=topology, Dimensions=_dims((n,) * dim))
        geo = ET.SubElement(grid, "Geometry", GeometryType=geometry)
        for values in ((0.0,) * dim, (h,) * dim):
            item = ET.SubElement(
                geo, "DataItem", Dimensions=str(dim), NumberType="Float", Precision="8"
            )
            item.set("Format", "XML")
            item.text = " ".join(repr(v) for v in values)
        for name, (shape, dtype) in info.items():
            attr = ET.SubElement(grid, "Attribute", Name=name, AttributeType="Scalar")
            attr.set("Center", "Node")
            count = (1, 1) + shape[2:]
            slab = ET.SubElement(attr, "DataItem", ItemType="HyperSlab", Type="HyperSlab")
            # The selection yields 1 x 1 x n.. values; readers want the item's own
            # Dimensions to match the topology's rank, so it is declared as n...
            slab.set("Dimensions", _dims(shape[2:]))
            sel = ET.SubElement(
                slab, "DataItem", Dimensions=f"3 {len(shape)}", NumberType="Int", Format="XML"
            )
            start = (k,) + (0,) * (len(shape) - 1)
            stride = (1,) * len(shape)
            sel.text = "  ".join(_dims(row) for row in (start, stride, count))
            number, precision = _number_type(dtype)
            src = ET.SubElement(slab, "DataItem", Dimensions=_dims(shape), NumberType=number)
            src.set("Precision", str(precision))
            src.set("Format", "HDF")
            src.text = f"{ref}:{datasets[name]}"
    ET.indent(root)
    body = ET.tostring(root, encoding="unicode")
    # Written beside and renamed, so a full disk never leaves a truncated sidecar.
    tmp = xdmf_path.with_name(xdmf_path.name + ".tmp")
    try:
        tmp.write_text(
            '<?xml version="1.0" ?>\n<!DOCTYPE Xdmf SYSTEM "Xdmf.dtd" []>\n' + body + "\n"
        )
        os.replace(tmp, xdmf_path)
    except OSError as err:
        discard(tmp)
        raise write_error(xdmf_path, err) from None
