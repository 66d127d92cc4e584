"""The pdeds HDF5 data file and its XDMF sidecar."""

from __future__ import annotations

import os
import xml.etree.ElementTree as ET
from pathlib import Path

import h5py
import numpy as np
import pytest

import pdeds
from pdeds.data import hdf5
from pdeds.data.fields import FieldWriter, write_fields
from pdeds.data.hdf5 import open_checked, read_coefficients, read_fields, write_coefficients
from pdeds.data.summary import inspect
from pdeds.data.xdmf import write_xdmf
from pdeds.errors import PdedsError

META = dict(dim=2, eta=0.5, family="diagonal", seed=7, sobol=True, f=0.25, note="round trip")


def _arrays(k: int = 3, m: int = 4, n: int = 5, dim: int = 2, seed: int = 0):
    rng = np.random.default_rng(seed)
    coeffs = rng.uniform(-3, 3, (k, m))
    shape = (k, 1) + (n,) * dim
    nu = rng.uniform(0.1, 10, shape).astype(np.float32)
    u = rng.standard_normal(shape)
    stats = [
        dict(
            assembly_s=0.1 * i, setup_s=0.2 * i, solve_s=0.3 * i, iterations=10 + i, residual=1e-11
        )
        for i in range(k)
    ]
    return coeffs, nu, u, stats


def _file(tmp_path: Path, **kw) -> tuple[Path, np.ndarray]:
    coeffs, nu, u, stats = _arrays(**kw)
    path = tmp_path / "d.h5"
    write_coefficients(path, coeffs, META)
    write_fields(path, 5, nu=nu, u_ref=u, stats=stats, rtol=1e-10, method="amg")
    return path, coeffs


def test_round_trip_is_bitwise_and_keeps_every_attribute(tmp_path):
    coeffs, nu, u, stats = _arrays()
    path = tmp_path / "d.h5"
    write_coefficients(path, coeffs, META)
    write_fields(path, 5, nu=nu, u_ref=u, stats=stats, rtol=1e-10, method="amg")
    write_fields(path, 9, nu=_arrays(n=9)[1])

    got, meta = read_coefficients(path)
    assert got.dtype == np.float64 and got.tobytes() == coeffs.tobytes()
    for key, value in META.items():
        assert meta[key] == value and type(meta[key]) is type(value), key
    assert meta["samples"] == 3 and meta["modes"] == 4
    assert meta["format"] == "pdeds-data" and meta["format_version"] == 2
    assert meta["pdeds_version"] == pdeds.__version__ and "T" in meta["created"]

    fields = read_fields(path, 5)
    assert fields["nu"].dtype == np.float32 and fields["nu"].tobytes() == nu.tobytes()
    assert fields["u_ref"].dtype == np.float64 and fields["u_ref"].tobytes() == u.tobytes()
    for key in hdf5.STATS:
        np.testing.assert_array_equal(fields[key], [s[key] for s in stats])
    assert fields["iterations"].dtype == np.int64
    assert fields["rtol"] == 1e-10 and fields["method"] == "amg" and fields["complete"]
    assert "u_ref" not in read_fields(path, 9)
    part = read_fields(path, 5, samples=[0, 2])
    assert part["u_ref"].tobytes() == u[[0, 2]].tobytes()

    with h5py.File(path) as f:
        dset = f["res_5/u_ref"]
        assert dset.chunks == (1, 1, 5, 5) and dset.compression == "gzip"


def test_write_coefficients_refuses_to_overwrite_without_force(tmp_path):
    path, coeffs = _file(tmp_path)
    before = path.read_bytes()
    with pytest.raises(PdedsError, match="exists; pass --force to overwrite"):
        write_coefficients(path, coeffs[:1], META)
    assert path.read_bytes() == before
    with pytest.raises(PdedsError, match="already holds resolution 5"):
        write_fields(path, 5, nu=_arrays()[1])
    assert path.read_bytes() == before
    write_coefficients(path, coeffs[:1], META, force=True)
    assert read_coefficients(path)[0].shape == (1, 4)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_coefficients_are_refused(tmp_path, bad):
    coeffs = _arrays()[0]
    coeffs[1, 2] = bad
    with pytest.raises(PdedsError, match=r"NaN or inf \(samples \[1\]\)"):
        write_coefficients(tmp_path / "d.h5", coeffs, META)
    assert not list(tmp_path.iterdir())


def test_failure_mid_write_leaves_no_final_file(tmp_path, monkeypatch):
    coeffs = _arrays()[0]
    path = tmp_path / "d.h5"
    real = h5py.Group.create_dataset

    def boom(self, name, *a, **kw):
        real(self, name, *a, **kw)
        raise OSError("disk full (injected)")

    monkeypatch.setattr(h5py.Group, "create_dataset", boom)
    with pytest.raises(PdedsError, match=r"cannot write .*d\.h5\.tmp: disk full \(injected\)"):
        write_coefficients(path, coeffs, META)
    assert not path.exists() and not list(tmp_path.iterdir())


def test_failure_while_appending_keeps_the_original(tmp_path, monkeypatch):
    path, _ = _file(tmp_path)
    before = path.read_bytes()
    real = FieldWriter.write

    def write(self, k, **kw):
        if k == 2:
            raise RuntimeError("crash (injected)")
        real(self, k, **kw)

    monkeypatch.setattr(FieldWriter, "write", write)
    with pytest.raises(RuntimeError, match="injected"):
        write_fields(path, 9, nu=_arrays(n=9)[1])
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.h5"]


def test_field_writer_resumes_an_unfinished_group(tmp_path):
    coeffs, nu, u, stats = _arrays()
    path = tmp_path / "d.h5"
    write_coefficients(path, coeffs, META)
    with FieldWriter(path, 5, nu=True, u_ref=True, rtol=1e-9, method="amg") as w:
        w.write(0, nu=nu[0], u_ref=u[0], stats=stats[0])
    with pytest.raises(PdedsError, match=r"incomplete \(1 of 3 samples written\)"):
        read_fields(path, 5)
    with FieldWriter(path, 5, nu=True, u_ref=True, rtol=1e-9, method="amg") as w:
        assert w.written == 1
        for k in w.todo:
            w.write(k, nu=nu[k], u_ref=u[k], stats=stats[k])
    assert read_fields(path, 5)["u_ref"].tobytes() == u.tobytes()
    # Other solver settings: the group is discarded and started again.
    with FieldWriter(path, 5, nu=True, u_ref=True, rtol=1e-6, method="amg") as w:
        assert w.written == 0


def _not_pdeds(tmp_path: Path) -> Path:
    path = tmp_path / "other.h5"
    with h5py.File(path, "w") as f:
        f["x"] = np.zeros(3)
    return path


def _text(tmp_path: Path) -> Path:
    path = tmp_path / "notes.h5"
    path.write_text("not hdf5\n")
    return path


def _newer(tmp_path: Path) -> Path:
    path, _ = _file(tmp_path)
    with h5py.File(path, "r+") as f:
        f.attrs["format_version"] = 99
    return path


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda p: p / "missing.h5", "does not exist"),
        (lambda p: p, "is a directory"),
        (_text, "is not an HDF5 file"),
        (_not_pdeds, "not a pdeds data file"),
        (_newer, "format_version 99, newer than"),
    ],
)
def test_bad_files_name_the_problem(tmp_path, make, message):
    path = make(tmp_path)
    for call in (open_checked, read_coefficients, inspect, lambda p: read_fields(p, 5)):
        with pytest.raises(PdedsError, match=message):
            call(path)


def test_missing_resolution_and_field_name_what_exists(tmp_path):
    path, _ = _file(tmp_path)
    write_fields(path, 9, nu=_arrays(n=9)[1])
    with pytest.raises(PdedsError, match=r"no resolution 17 .*res 5, res 9"):
        read_fields(path, 17)
    with pytest.raises(PdedsError, match=r"/res_9 has no 'u_ref' dataset \(it holds nu\)"):
        open_checked(path, res=[9], fields=["u_ref"])
    with h5py.File(path, "r+") as f:
        del f["coeffs"]
    with pytest.raises(PdedsError, match="no /coeffs dataset"):
        read_coefficients(path)


def test_inspect_lists_attributes_and_datasets(tmp_path):
    path, _ = _file(tmp_path)
    text = inspect(path)
    for needle in (
        "format_version = 2",
        "family         = diagonal",
        "/coeffs",
        "/res_5/nu          (3, 1, 5, 5)  float32  chunks 1x1x5x5, gzip 4, shuffle",
        "/res_5/u_ref       (3, 1, 5, 5)  float64",
        "/res_5: complete=True",
    ):
        assert needle in text, needle


def _slab(ref_dir: Path, item: ET.Element) -> np.ndarray:
    """Evaluate an XDMF HyperSlab DataItem with h5py: the reading ParaView would do."""
    sel, src = item.findall("DataItem")
    rank = len(src.get("Dimensions").split())
    assert sel.get("Dimensions") == f"3 {rank}"
    start, stride, count = np.array(sel.text.split(), dtype=int).reshape(3, rank)
    file_name, dset_path = src.text.split(":")
    with h5py.File(ref_dir / file_name) as f:
        dset = f[dset_path]
        assert " ".join(map(str, dset.shape)) == src.get("Dimensions")
        assert int(src.get("Precision")) == dset.dtype.itemsize
        index = tuple(slice(a, a + s * c, s) for a, s, c in zip(start, stride, count))
        out = dset[index]
    assert out.size == np.prod([int(d) for d in item.get("Dimensions").split()])
    return out


@pytest.mark.parametrize("dim, n", [(2, 5), (3, 4)])
def test_xdmf_sidecar_points_at_real_datasets(tmp_path, dim, n):
    coeffs, nu, u, stats = _arrays(n=n, dim=dim)
    path = tmp_path / "d.h5"
    write_coefficients(path, coeffs, dict(META, dim=dim))
    write_fields(path, n, nu=nu, u_ref=u, stats=stats, rtol=1e-10, method="amg")
    sidecar = tmp_path / "view" / "d.xdmf"
    sidecar.parent.mkdir()
    names = {"nu": f"/res_{n}/nu", "u_ref": f"/res_{n}/u_ref"}
    write_xdmf(path, sidecar, names, n, dim)

    root = ET.parse(sidecar).getroot()
    assert root.tag == "Xdmf" and root.get("Version") == "3.0"
    collection = root.find("Domain/Grid")
    assert collection.get("CollectionType") == "Temporal"
    grids = collection.findall("Grid")
    assert len(grids) == 3
    for k, grid in enumerate(grids):
        assert float(grid.find("Time").get("Value")) == k
        topo = grid.find("Topology")
        assert topo.get("TopologyType") == f"{dim}DCoRectMesh"
        assert topo.get("Dimensions") == " ".join([str(n)] * dim)
        origin, spacing = grid.findall("Geometry/DataItem")
        assert np.array(origin.text.split(), float).tolist() == [0.0] * dim
        np.testing.assert_allclose(np.array(spacing.text.split(), float), 1 / (n - 1), rtol=1e-15)
        attrs = {a.get("Name"): a for a in grid.findall("Attribute")}
        assert set(attrs) == set(names)
        for name, attr in attrs.items():
            assert attr.get("Center") == "Node" and attr.get("AttributeType") == "Scalar"
            assert attr.find("DataItem").get("Dimensions") == topo.get("Dimensions")
            values = _slab(sidecar.parent, attr.find("DataItem"))
            truth = {"nu": nu, "u_ref": u}[name][k : k + 1]
            assert values.tobytes() == truth.tobytes()
    assert os.path.relpath(path, sidecar.parent) in collection.find(".//Attribute/DataItem")[1].text


def test_xdmf_refuses_wrong_resolution_and_missing_dataset(tmp_path):
    path, _ = _file(tmp_path)
    with pytest.raises(PdedsError, match=r"not \(K, 1, 9, 9\)"):
        write_xdmf(path, tmp_path / "d.xdmf", {"nu": "/res_5/nu"}, 9, 2)
    with pytest.raises(PdedsError, match="no dataset /res_5/v"):
        write_xdmf(path, tmp_path / "d.xdmf", {"v": "res_5/v"}, 5, 2)


def test_groups_written_without_field_writer_are_readable(tmp_path):
    path, _ = _file(tmp_path)
    with h5py.File(path, "r+") as f:
        f["res_3/u_pred"] = np.ones((3, 1, 3, 3), np.float32)
    np.testing.assert_array_equal(read_fields(path, 3)["u_pred"], 1.0)
    write_xdmf(path, tmp_path / "p.xdmf", {"u": "res_3/u_pred"}, 3, 2)
    assert "d.h5:/res_3/u_pred" in (tmp_path / "p.xdmf").read_text()
