"""``pdeds data`` and ``pdeds solve`` through the real entry point, in-process."""

from __future__ import annotations

import subprocess
import sys
import types
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

import pdeds.cli
from pdeds.cli import main
from pdeds.data.hdf5 import read_coefficients, read_fields, write_coefficients
from pdeds.data.integrity import checksum
from pdeds.physics import fem, kl

SMALL = ["--dim", "2", "--modes", "4", "--samples", "3", "--seed", "5"]


def cli(capsys, *argv: str | Path) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code: int, err: str, *needles: str) -> None:
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("pdeds: error: "), err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


@pytest.mark.parametrize(
    "flags, needles",
    [
        (["--eta", "0"], ["--eta must be a positive", "--eta 0.5"]),
        (["--eta", "-1"], ["--eta must be a positive"]),
        (["--eta", "nan"], ["--eta must be a positive"]),
        (["--modes", "0"], ["--modes must be >= 1", "--modes 6"]),
        (["--res", "1"], ["--res must be >= 2", "--res 33"]),
        (["--dim", "4"], ["--dim must be 2 or 3", "--dim 2"]),
        (["--samples", "0"], ["--samples must be >= 1"]),
        (["--seed", "-3"], ["--seed must be >= 0"]),
        (["--rtol", "0"], ["--rtol must lie in (0, 1)"]),
        (["--f", "inf"], ["--f must be a finite number"]),
        (["--family", "round"], ["invalid choice: 'round'", "pdeds data --help"]),
        (["--res", "x"], ["invalid int value: 'x'"]),
        (["--reference"], ["--reference needs at least one --res"]),
        (["--bogus"], ["unrecognized arguments: --bogus"]),
    ],
)
def test_data_bad_input_is_one_line_and_writes_nothing(tmp_path, capsys, flags, needles):
    out = tmp_path / "d.h5"
    code, _, err = cli(capsys, "data", "--out", out, *SMALL, *flags)
    assert_one_line_error(code, err, *needles)
    assert not list(tmp_path.iterdir())


def test_missing_samples_and_missing_subcommand(tmp_path, capsys):
    code, _, err = cli(capsys, "data", "--out", tmp_path / "d.h5")
    assert_one_line_error(code, err, "--samples K is required")
    code, _, err = cli(capsys, "data", "--samples", "2")
    assert_one_line_error(code, err, "one of the arguments --out --inspect is required")
    assert main([]) == 2 and "usage: pdeds" in capsys.readouterr().err
    code, _, err = cli(capsys, "data", "--out", tmp_path / "no" / "d.h5", "--samples", "2")
    assert_one_line_error(code, err, "output folder", "does not exist; create it first")


def test_no_overwrite_without_force(tmp_path, capsys):
    out = tmp_path / "d.h5"
    assert cli(capsys, "data", "--out", out, *SMALL)[0] == 0
    before = out.read_bytes()
    code, _, err = cli(capsys, "data", "--out", out, *SMALL, "--seed", "6")
    assert_one_line_error(code, err, f"{out} exists; pass --force to overwrite")
    assert out.read_bytes() == before
    code, _, err = cli(capsys, "solve", "--coeffs", out, "--res", "5", "--out", out)
    assert_one_line_error(code, err, "exists; pass --force")
    assert out.read_bytes() == before
    assert cli(capsys, "data", "--out", out, *SMALL, "--seed", "6", "--force")[0] == 0
    assert not np.array_equal(read_coefficients(out)[0], kl.sample_coefficients(3, 4, 5))


def test_data_reference_end_to_end_satisfies_the_discrete_equation(tmp_path, capsys):
    out = tmp_path / "d.h5"
    code, stdout, err = cli(
        capsys, "data", "--out", out, *SMALL, "--res", "8", "--reference", "--f", "1.5", "--xdmf"
    )
    assert code == 0, err
    assert f"wrote {out}" in stdout and (tmp_path / "d_res8.xdmf").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.h5", "d_res8.xdmf"]

    coeffs, meta = read_coefficients(out)
    assert coeffs.tobytes() == kl.sample_coefficients(3, 4, 5).tobytes()
    assert (meta["dim"], meta["modes"], meta["eta"], meta["family"]) == (2, 4, 0.5, "diagonal")
    assert (meta["seed"], meta["sobol"], meta["samples"], meta["f"]) == (5, False, 3, 1.5)
    fields = read_fields(out, 8)
    nu = kl.diffusivity(torch.from_numpy(coeffs), 8, dim=2)
    assert fields["nu"].tobytes() == nu.float().numpy().tobytes()
    assert (fields["iterations"] >= 1).all() and (fields["residual"] <= 1e-10).all()

    # Independent truth: the matrix-free K U - F of fem vanishes on the free nodes.
    u = torch.from_numpy(fields["u_ref"])
    residual = (fem.stiffness_apply(u, nu) - fem.load_vector(1.5, u))[:, :, 1:-1]
    scale = fem.stiffness_apply(fem.apply_dirichlet(torch.zeros_like(u)), nu)[:, :, 1:-1]
    rel = residual.flatten(1).norm(dim=1) / scale.flatten(1).norm(dim=1)
    assert rel.max() < 1e-9, rel
    assert (u[:, :, 0] == 1).all() and (u[:, :, -1] == 0).all()


def test_inspect(tmp_path, capsys):
    out = tmp_path / "d.h5"
    cli(capsys, "data", "--out", out, *SMALL, "--res", "5")
    code, stdout, _ = cli(capsys, "data", "--inspect", out)
    assert code == 0
    assert "format         = pdeds-data" in stdout and "/res_5/nu" in stdout
    plain = tmp_path / "plain.h5"
    with h5py.File(plain, "w") as f:
        f["x"] = 1
    code, _, err = cli(capsys, "data", "--inspect", plain)
    assert_one_line_error(code, err, "not a pdeds data file")


def test_solve_from_file_and_from_seed(tmp_path, capsys):
    data = tmp_path / "d.h5"
    cli(capsys, "data", "--out", data, *SMALL, "--res", "9", "--reference")
    ref = tmp_path / "ref.h5"
    code, stdout, err = cli(
        capsys, "solve", "--coeffs", data, "--samples", "2", "--res", "9", "5", "--out", ref
    )
    assert code == 0, err
    table = stdout.splitlines()
    assert table[0].split() == [
        "res", "sample", "assembly", "s", "setup", "s", "solve", "s", "iterations", "residual"
    ]  # fmt: skip
    assert [r.split()[:2] for r in table[1:7]] == [
        ["9", "0"], ["9", "1"], ["9", "mean"], ["5", "0"], ["5", "1"], ["5", "mean"]
    ]  # fmt: skip
    coeffs, meta = read_coefficients(ref)
    assert coeffs.tobytes() == read_coefficients(data)[0][:2].tobytes()
    assert meta["samples"] == 2 and meta["seed"] == 5 and meta["source"] == str(data)
    np.testing.assert_allclose(
        read_fields(ref, 9)["u_ref"], read_fields(data, 9)["u_ref"][:2], rtol=0, atol=1e-12
    )
    assert "nu" not in read_fields(ref, 9)

    seeded = tmp_path / "seeded.h5"
    code, _, err = cli(capsys, "solve", *SMALL, "--res", "5", "--out", seeded, "--nu")
    assert code == 0, err
    assert read_coefficients(seeded)[0].tobytes() == read_coefficients(data)[0].tobytes()
    assert "nu" in read_fields(seeded, 5)


def _nan_file(tmp_path: Path) -> Path:
    path = tmp_path / "nan.h5"
    write_coefficients(path, np.zeros((2, 3)), dict(dim=2, eta=0.5, family="diagonal"))
    with h5py.File(path, "r+") as f:
        f["coeffs"][1, 1] = np.nan
        # As another tool would write it: NaN in, with a checksum that matches.
        f.attrs["coeffs_crc32"] = checksum(f["coeffs"][...])
    return path


def test_solve_bad_input(tmp_path, capsys):
    out = tmp_path / "ref.h5"
    code, _, err = cli(capsys, "solve", "--coeffs", _nan_file(tmp_path), "--res", "5", "--out", out)
    assert_one_line_error(code, err, "nan.h5: coefficients contain NaN or inf (samples [1])")
    code, _, err = cli(capsys, "solve", "--coeffs", tmp_path / "no.h5", "--res", "5", "--out", out)
    assert_one_line_error(code, err, "no.h5 does not exist")
    data = tmp_path / "nan.h5"
    code, _, err = cli(
        capsys, "solve", "--coeffs", data, "--eta", "0.3", "--res", "5", "--out", out
    )
    assert_one_line_error(code, err, "--eta cannot be combined with --coeffs")
    code, _, err = cli(capsys, "solve", "--coeffs", data, "--seed", "1", "--res", "5", "--out", out)
    assert_one_line_error(code, err, "not allowed with argument --coeffs")
    code, _, err = cli(capsys, "solve", "--seed", "1", "--res", "5", "--out", out)
    assert_one_line_error(code, err, "--samples K is required")
    assert not out.exists()


def test_interrupted_run_leaves_no_output_and_resumes_bitwise(tmp_path, capsys, monkeypatch):
    import pdeds.physics.reference as reference

    clean, out = tmp_path / "clean.h5", tmp_path / "d.h5"
    args = [*SMALL, "--res", "6", "--reference"]
    assert cli(capsys, "data", "--out", clean, *args)[0] == 0

    real, calls = reference.solve_with_stats, []

    def interrupted(*a, **kw):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*a, **kw)

    monkeypatch.setattr(reference, "solve_with_stats", interrupted)
    code, _, err = cli(capsys, "data", "--out", out, *args)
    assert code == 130 and "interrupted" in err
    assert not out.exists() and (tmp_path / "d.h5.tmp").exists()
    # A second interrupted try that also asked for res 7: the rerun below must drop it.
    calls.clear()
    code, _, err = cli(capsys, "data", "--out", out, *args, "--res", "7")
    assert code == 130 and "resuming from" in err and len(calls) == 3
    with h5py.File(tmp_path / "d.h5.tmp") as f:
        assert f["res_6"].attrs["complete"] and f["res_7"].attrs["written"] == 1

    monkeypatch.setattr(reference, "solve_with_stats", real)
    code, _, err = cli(capsys, "data", "--out", out, *args)
    assert code == 0 and "resuming from" in err
    assert not (tmp_path / "d.h5.tmp").exists()
    assert read_fields(out, 6)["u_ref"].tobytes() == read_fields(clean, 6)["u_ref"].tobytes()
    with h5py.File(out) as f:
        assert sorted(f) == ["coeffs", "res_6"]


def test_a_subcommand_is_one_module(monkeypatch, capsys):
    fake = types.ModuleType("pdeds.cli.hello")
    fake.add_parser = lambda sub: sub.add_parser("hello", help="greet").add_argument(
        "--times", type=int
    )
    fake.run = lambda args: args.times
    monkeypatch.setitem(sys.modules, "pdeds.cli.hello", fake)
    monkeypatch.setattr(pdeds.cli, "SUBCOMMANDS", ["hello", "not_written_yet"])
    assert main(["hello", "--times", "7"]) == 7
    assert main(["--help"]) == 0
    assert "hello" in capsys.readouterr().out


def test_console_script_and_python_m(tmp_path):
    script = Path(sys.executable).parent / "pdeds"
    done = subprocess.run([script, "--help"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and "data" in done.stdout and "solve" in done.stdout
    done = subprocess.run(
        [sys.executable, "-m", "pdeds", "data", "--out", "x.h5", "--samples", "1", "--eta", "0"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
    )
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "pdeds: error: --eta must be a positive correlation length, got 0.0; e.g. --eta 0.5"
    ]
