"""Nothing lost, nothing silent: data files on a full disk, in a read-only folder, damaged.

The disk-full cases run on a real 2 MiB tmpfs where this machine lets the test mount one
(root with CAP_SYS_ADMIN) and are skipped elsewhere; the same paths are also driven by a fake
h5py failure or a fake free-space figure, which always run.
"""

from __future__ import annotations

import gc
import math
import os
import shutil
import subprocess
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from test_cli_data import assert_one_line_error, cli
from trainer_util import write_tiny

from pdeds.config import ExperimentConfig, build, dump_yaml
from pdeds.data import fields, hdf5, integrity
from pdeds.data.hdf5 import read_coefficients, read_fields
from pdeds.data.problem import check_problem
from pdeds.data.verify import verify
from pdeds.errors import PdedsError

ISSUE = ["--dim", "2", "--samples", "256", "--res", "64", "--seed", "3"]
"""The command of issue 14 that filled a 2 MB tmpfs."""
SMALL = ["--dim", "2", "--modes", "4", "--samples", "8", "--seed", "5", "--res", "8"]


def _mount(folder: Path, options: str) -> bool:
    if os.geteuid() != 0 or shutil.which("mount") is None:
        return False
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)], capture_output=True
    )
    return done.returncode == 0


def _unmount(folder: Path) -> None:
    subprocess.run(["umount", "-l", str(folder)], capture_output=True)


@pytest.fixture
def small_disk(tmp_path):
    """A 2 MiB tmpfs; skipped where mounting is not allowed."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if not _mount(disk, "size=2m"):
        pytest.skip("cannot mount a tmpfs here (needs root with CAP_SYS_ADMIN)")
    yield disk
    _unmount(disk)


@pytest.fixture
def read_only(tmp_path):
    """A folder nothing can be written to: a read-only tmpfs as root, else mode 0555."""
    folder = tmp_path / "ro"
    folder.mkdir()
    if os.geteuid() != 0:
        folder.chmod(0o555)
        yield folder
        folder.chmod(0o755)
        return
    if not _mount(folder, "ro,size=1m"):
        pytest.skip("root cannot be kept out of a folder without mounting one read-only")
    yield folder
    _unmount(folder)


def _open_files() -> list:
    """HDF5 files this process still holds open (a failed close leaves one, and HDF5 then
    crashes at exit retrying its flush)."""
    gc.collect()
    return h5py.h5f.get_obj_ids(types=h5py.h5f.OBJ_FILE)


def _hdf5_failure(errno_: int, message: str) -> RuntimeError:
    """What h5py raises when HDF5's write() fails (its message carries the OS's errno)."""
    return RuntimeError(
        f"Can't synchronously write data (file write failed: time = now, filename = 'x', "
        f"file descriptor = 3, errno = {errno_}, error message = '{message}', buf = 0x1)"
    )


def _fail_writing_sample(monkeypatch, k: int, err: BaseException) -> None:
    real = h5py.Dataset.__setitem__

    def setitem(self, key, value):
        if self.name.endswith("/nu") and key == k:
            raise err
        real(self, key, value)

    monkeypatch.setattr(h5py.Dataset, "__setitem__", setitem)


def _stored(path: Path, n: int, names=("nu", "u_ref", "iterations", "residual")) -> dict:
    """The deterministic datasets of a group (not the timings), as bytes."""
    got = read_fields(path, n)
    return {k: got[k].tobytes() for k in names if k in got}


# ----------------------------------------------------------------------------- disk full


def test_disk_full_is_one_line_and_the_rerun_resumes_to_a_verified_file(
    tmp_path, small_disk, capsys
):
    out = small_disk / "big2.h5"
    staging = hdf5.staging_path(out)
    code, _, err = cli(capsys, "data", "--out", out, *ISSUE)
    assert_one_line_error(
        code, err, f"cannot write {staging}", f"free in {small_disk}", "rerun the same command"
    )
    assert staging.exists() and not out.exists() and not _open_files()
    partial = verify(staging)
    assert len(partial.problems) == 1 and "/res_64 is incomplete (" in partial.problems[0]

    subprocess.run(["mount", "-o", "remount,size=8m", str(small_disk)], check=True)
    code, _, err = cli(capsys, "data", "--out", out, *ISSUE)
    assert code == 0 and "resuming from" in err, err
    assert not staging.exists() and verify(out).ok
    clean = tmp_path / "clean.h5"
    assert cli(capsys, "data", "--out", clean, *ISSUE)[0] == 0
    assert _stored(out, 64) == _stored(clean, 64)


def test_hdf5_itself_out_of_space_is_one_line_and_leaves_nothing_open(
    small_disk, capsys, monkeypatch
):
    """With the free-space check out of the way (as when another process fills the disk), HDF5
    hits ENOSPC inside its flush: the file it cannot close is freed, closed and removed,
    instead of the second traceback and the segfault at exit of issue 14."""
    monkeypatch.setattr(fields, "check_space", lambda *a, **kw: None)
    out = small_disk / "big2.h5"
    code, _, err = cli(capsys, "data", "--out", out, *ISSUE)
    assert_one_line_error(code, err, "No space left on device", "was removed")
    assert list(small_disk.iterdir()) == [] and not _open_files()


def test_an_hdf5_write_failure_keeps_the_staging_file_to_resume(tmp_path, capsys, monkeypatch):
    out, clean = tmp_path / "d.h5", tmp_path / "clean.h5"
    assert cli(capsys, "data", "--out", clean, *SMALL, "--reference")[0] == 0
    with monkeypatch.context() as m:
        _fail_writing_sample(m, 5, _hdf5_failure(5, "Input/output error"))
        code, _, err = cli(capsys, "data", "--out", out, *SMALL, "--reference")
    staging = hdf5.staging_path(out)
    assert_one_line_error(
        code, err, f"cannot write {staging}: Input/output error", "free in", "rerun the same"
    )
    assert not out.exists() and not _open_files()
    with h5py.File(staging) as f:
        assert f["res_8"].attrs["written"] == 5 and not f["res_8"].attrs["complete"]
    code, _, err = cli(capsys, "data", "--out", out, *SMALL, "--reference")
    assert code == 0 and "resuming from" in err and "checksums" not in err
    assert _stored(out, 8) == _stored(clean, 8) and verify(out).ok


def test_an_injected_disk_full_removes_what_hdf5_cannot_close(tmp_path, capsys, monkeypatch):
    out = tmp_path / "d.h5"
    before = b"an earlier file"
    out.write_bytes(before)
    _fail_writing_sample(monkeypatch, 2, _hdf5_failure(28, "No space left on device"))
    code, _, err = cli(capsys, "data", "--out", out, *SMALL, "--force")
    assert_one_line_error(code, err, "No space left on device", "free space or write elsewhere")
    assert out.read_bytes() == before and not hdf5.staging_path(out).exists()
    assert not _open_files()


def test_too_little_free_space_stops_before_the_sample(tmp_path, capsys, monkeypatch):
    """The free-space check refuses a sample the folder cannot hold (plus HDF5's slack)
    before HDF5 sees it, so the staging file stays whole and resumes."""
    out, clean = tmp_path / "d.h5", tmp_path / "clean.h5"
    assert cli(capsys, "data", "--out", clean, *SMALL)[0] == 0
    calls = []

    def free(folder):
        calls.append(folder)
        return math.inf if len(calls) <= 4 else 1000.0  # /coeffs, then samples 0-2

    with monkeypatch.context() as m:
        m.setattr(integrity, "free_bytes", free)
        code, _, err = cli(capsys, "data", "--out", out, *SMALL)
    assert_one_line_error(code, err, "1 KiB free in", "sample 3 needs up to", "rerun the same")
    code, _, err = cli(capsys, "data", "--out", out, *SMALL)
    assert code == 0 and "resuming from" in err
    assert _stored(out, 8) == _stored(clean, 8)


def test_resume_recomputes_samples_whose_data_did_not_reach_the_disk(tmp_path, capsys, monkeypatch):
    """Issue 14's corrupt file: a crash mid-flush can leave a sample's checksums (or the old
    `written` count) on disk without its data, which then reads as zeros. The rerun re-reads
    every kept sample and computes the failing ones again."""
    import pdeds.physics.reference as reference

    clean, out = tmp_path / "clean.h5", tmp_path / "d.h5"
    args = [*SMALL, "--reference"]
    assert cli(capsys, "data", "--out", clean, *args)[0] == 0
    real, calls = reference.solve_with_stats, []

    def interrupted(*a, **kw):
        calls.append(1)
        if len(calls) == 7:
            raise KeyboardInterrupt
        return real(*a, **kw)

    with monkeypatch.context() as m:
        m.setattr(reference, "solve_with_stats", interrupted)
        assert cli(capsys, "data", "--out", out, *args)[0] == 130
    staging = hdf5.staging_path(out)
    with h5py.File(staging, "r+") as f:
        assert f["res_8"].attrs["written"] == 6
        f["res_8/nu"][1] = 0  # the data of sample 1 lost, its checksums kept
        chunk = f["res_8/u_ref"].id.get_chunk_info_by_coord((3, 0, 0, 0))
    _garble(staging, chunk.byte_offset + chunk.size // 2, 16)  # sample 3's chunk damaged

    code, _, err = cli(capsys, "data", "--out", out, *args)
    assert code == 0, err
    assert "samples 1, 3 of" in err and "computing them again" in err
    assert _stored(out, 8) == _stored(clean, 8) and verify(out).ok


# ----------------------------------------------------------------------------- verify


def test_verify_names_every_bad_sample(tmp_path, capsys):
    out = tmp_path / "d.h5"
    assert cli(capsys, "data", "--out", out, *SMALL, "--reference")[0] == 0
    code, stdout, _ = cli(capsys, "data", "--inspect", out, "--verify")
    assert code == 0 and "/res_8: nu, u_ref x 8 samples (values and checksums)" in stdout
    assert "all samples ok" in stdout
    with h5py.File(out, "r+") as f:
        f["res_8/nu"][2] = 0
        f["res_8/u_ref"][5, 0, 3, 3] = np.nan
        f["res_8/iterations"][6] = 99
    code, stdout, err = cli(capsys, "data", "--inspect", out, "--verify")
    assert_one_line_error(code, err, f"{out} failed verification (res 8 samples 2, 5, 6)")
    assert "/res_8 sample 2: nu not positive (all zero), nu checksum mismatch" in stdout
    assert "/res_8 sample 5: u_ref not finite, u_ref checksum mismatch" in stdout
    assert "/res_8 sample 6: stats checksum mismatch" in stdout
    with pytest.raises(PdedsError, match=r"/res_8/nu sample 2: checksum mismatch"):
        read_fields(out, 8)
    assert read_fields(out, 8, samples=[0, 1])["nu"].shape == (2, 1, 8, 8)
    code, _, err = cli(capsys, "data", "--out", tmp_path / "e.h5", *SMALL, "--verify")
    assert_one_line_error(code, err, "--verify checks an existing file")


def _as_version_1(path: Path) -> None:
    """Rewrite a file as format_version 1 wrote it: no checksums."""
    with h5py.File(path, "r+") as f:
        f.attrs["format_version"] = 1
        del f.attrs["coeffs_crc32"]
        for name in f:
            if name.startswith("res_"):
                del f[name]["crc32"]


def test_format_version_1_files_are_read_checked_by_value_and_not_resumed(
    tmp_path, capsys, monkeypatch
):
    out = tmp_path / "d.h5"
    assert cli(capsys, "data", "--out", out, *SMALL)[0] == 0
    want = _stored(out, 8)
    _as_version_1(out)
    assert _stored(out, 8) == want and read_coefficients(out)[0].shape == (8, 4)
    verdict = verify(out)
    assert verdict.ok and "values only: format_version 1 has no checksums" in verdict.checked[1]
    with h5py.File(out, "r+") as f:
        f["res_8/nu"][4] = 0
    assert verify(out).bad == {8: [4]}

    # A version-1 staging file of the same parameters: its samples carry no checksums, so
    # the rerun writes the group again rather than trusting them.
    staging = hdf5.staging_path(out)
    out.rename(staging)
    code, _, err = cli(capsys, "data", "--out", out, *SMALL)
    assert code == 0 and "resuming from" in err
    assert _stored(out, 8) == want and verify(out).ok


# ----------------------------------------------------------------------------- damaged files


def _garble(path: Path, offset: int, n: int = 64) -> None:
    data = bytearray(path.read_bytes())
    data[offset : offset + n] = bytes((37 * i + 11) % 256 for i in range(n))
    path.write_bytes(bytes(data))


def test_a_damaged_sample_or_structure_is_one_line_naming_the_file(tmp_path, capsys):
    out = tmp_path / "d.h5"
    assert cli(capsys, "data", "--out", out, *SMALL, "--reference")[0] == 0
    with h5py.File(out) as f:
        chunk = f["res_8/u_ref"].id.get_chunk_info_by_coord((3, 0, 0, 0))
        coeffs = f["coeffs"].id.get_chunk_info_by_coord((0, 0))
        header = h5py.h5o.get_info(f["res_8"].id).addr
    sample, table, tree = (tmp_path / f"{k}.h5" for k in ("sample", "coeffs", "tree"))
    for path, offset in ((sample, chunk.byte_offset), (table, coeffs.byte_offset)):
        shutil.copyfile(out, path)
        _garble(path, offset + 8, 16)
    shutil.copyfile(out, tree)
    _garble(tree, header, 64)

    with pytest.raises(PdedsError, match=rf"{sample} is damaged \(/res_8/u_ref sample 3: "):
        read_fields(sample, 8)
    code, _, err = cli(capsys, "data", "--inspect", sample, "--verify")
    assert_one_line_error(code, err, f"{sample} failed verification (res 8 samples 3)")
    code, _, err = cli(capsys, "solve", "--coeffs", table, "--res", "5", "--out", tmp_path / "s.h5")
    assert_one_line_error(code, err, f"{table} is damaged (/coeffs: ")
    code, _, err = cli(capsys, "data", "--inspect", tree)
    assert_one_line_error(code, err, f"{tree} is damaged (its structure: ")
    with pytest.raises(PdedsError, match=rf"{tree} is damaged \("):
        read_fields(tree, 8)
    assert not (tmp_path / "s.h5").exists()

    # Held-out references from data.val_path are read through the same functions.
    from pdeds.train.evaluate import load_held_out

    cfg = build(
        ExperimentConfig,
        {"problem": {"dim": 2, "modes": 4}, "data": {"val_path": str(sample), "val_samples": 8}},
    )
    with pytest.raises(PdedsError, match=r"/res_8/u_ref sample 3"):
        load_held_out(cfg, 8, None)
    # Training coefficients from data.path, through the trainer's start-up check.
    tiny = write_tiny(tmp_path / "c.yaml", problem={"dim": 2, "modes": 4, "res": 16})
    run = tmp_path / "run"
    code, _, err = cli(
        capsys, "train", tiny, "--run-dir", run, "--check-only", "--set", f"data.path={table}"
    )
    assert_one_line_error(code, err, f"{table} is damaged (/coeffs: ")
    assert not run.exists()


def test_garbled_bytes_anywhere_are_one_line_or_change_nothing(tmp_path, capsys):
    """Bytes overwritten at 7 places in the middle of a file: every reader either reports one
    line naming the file or returns exactly the data written (checksums verified)."""
    out = tmp_path / "d.h5"
    assert cli(capsys, "data", "--out", out, *SMALL, "--reference")[0] == 0
    want, size = _stored(out, 8), out.stat().st_size
    for i in range(1, 8):
        path = tmp_path / f"g{i}.h5"
        shutil.copyfile(out, path)
        _garble(path, size * i // 8)
        try:
            assert _stored(path, 8) == want, i
        except PdedsError as err:
            assert str(path) in str(err)
        code, _, err = cli(capsys, "data", "--inspect", path, "--verify")
        if code != 0:
            assert_one_line_error(code, err, str(path))


# ----------------------------------------------------------------------------- read-only


def test_a_read_only_folder_is_one_line_for_data_and_solve(tmp_path, read_only, capsys):
    code, _, err = cli(capsys, "data", "--out", read_only / "d.h5", *SMALL)
    assert_one_line_error(code, err, f"output folder {read_only} is not writable")
    code, _, err = cli(capsys, "solve", *SMALL, "--out", read_only / "r.h5")
    assert_one_line_error(code, err, f"output folder {read_only} is not writable")
    assert list(read_only.iterdir()) == []


def test_a_write_refused_by_the_os_is_one_line_and_its_cleanup_is_quiet(
    read_only, capsys, monkeypatch
):
    """Past the up-front check (here faked), the OS refuses the staging file: one line, not
    the second traceback of the cleanup's unlink on a read-only file system."""
    monkeypatch.setattr(hdf5.os, "access", lambda *a, **kw: True)
    code, _, err = cli(capsys, "data", "--out", read_only / "d.h5", *SMALL)
    assert_one_line_error(code, err, f"cannot write {read_only / 'd.h5.tmp'}")
    assert list(read_only.iterdir()) == []


# ----------------------------------------------------------------------------- check_problem


def _problem(**kw) -> object:
    p = ExperimentConfig().problem
    for key, value in {**dict(dim=2, modes=4, eta=0.5, family="diagonal", f=0.0), **kw}.items():
        setattr(p, key, value)
    return p


@pytest.mark.parametrize(
    "change, needle",
    [
        (dict(dim=3), "was made for dim=2 but problem.dim is 3; set problem.dim: 2, or "),
        (dict(modes=6), "made for modes=4 but problem.modes is 6"),
        (dict(eta=0.3), "made for eta=0.5 but problem.eta is 0.3"),
        (dict(family="tensor"), "`pdeds data --family tensor ...`"),
        (dict(f=1.0), "made for f=0.0 but problem.f is 1.0; set problem.f: 0.0, or regenerate"),
    ],
)
def test_check_problem_names_the_key_and_the_fix(tmp_path, capsys, change, needle):
    out = tmp_path / "d.h5"
    assert cli(capsys, "data", "--out", out, *SMALL, "--reference")[0] == 0
    meta = check_problem(out, _problem(), key="data.val_path", res=8, fields=("u_ref",))
    assert meta["samples"] == 8 and meta["format_version"] == hdf5.FORMAT_VERSION
    with pytest.raises(PdedsError, match="^data.val_path " + str(out).replace(".", r"\.")) as e:
        check_problem(out, _problem(**change), key="data.val_path", res=8, fields=("u_ref",))
    assert needle in str(e.value)


def test_check_problem_resolution_samples_and_closeness(tmp_path, capsys):
    out = tmp_path / "d.h5"
    assert cli(capsys, "data", "--out", out, *SMALL)[0] == 0
    check_problem(out, _problem(eta=0.5 * (1 + 1e-15), f=3.0), key="data.path")  # f: no u_ref
    with pytest.raises(PdedsError, match=r"no resolution 16 \(/res_16; it holds res 8\)"):
        check_problem(out, _problem(), key="data.path", res=16)
    with pytest.raises(PdedsError, match=r"/res_8 has no 'u_ref' dataset"):
        check_problem(out, _problem(), key="data.val_path", res=8, fields=("u_ref",))
    with pytest.raises(PdedsError, match=r"holds 8 samples but 9 are asked for"):
        check_problem(out, _problem(), key="data.path", samples=9)
    with pytest.raises(PdedsError, match=r"problem.dim is 3; regenerate the file with"):
        check_problem(out, _problem(dim=3), key="--coeffs", settable=False)


# ----------------------------------------------------------------------------- predict, eval


def _make_run(run: Path) -> Path:
    """What `pdeds train` leaves for eval and predict (a resolved config.yaml and one complete
    ZeRO-0 checkpoint of an untrained 2-D U-Net), written directly to skip DeepSpeed's
    start-up; load_run must read it back exactly, so a change of layout fails here first."""
    from pdeds.models.unet import build_model
    from pdeds.train import checkpoint
    from pdeds.train.inference import load_run

    cfg = build(
        ExperimentConfig,
        {
            "problem": {"dim": 2, "res": 16, "modes": 4},
            "data": {"val_samples": 2},
            "model": {"depth": 2, "width": 4, "norm": "group", "groups": 2},
        },
    )
    cfg.validate()
    tag = run / "checkpoints" / checkpoint.tag_for(1)
    tag.mkdir(parents=True)
    (run / "config.yaml").write_text(dump_yaml(cfg))
    weights = build_model(2, cfg.model).state_dict()
    states = {"module": weights, "ds_config": {"zero_optimization": {"stage": 0}}}
    torch.save(states, tag / "mp_rank_00_model_states.pt")
    (tag / checkpoint.MARKER).write_text('{"step": 1}')
    loaded = load_run(run).model.state_dict()
    assert all(torch.equal(loaded[k].cpu(), v) for k, v in weights.items())
    return run


@pytest.fixture
def run_dir(tmp_path):
    return _make_run(tmp_path / "run")


def test_predict_refuses_an_existing_sidecar_and_writes_nothing(tmp_path, run_dir, capsys):
    out, xdmf = tmp_path / "pred.h5", tmp_path / "pred.xdmf"
    xdmf.write_text("<Xdmf>mine</Xdmf>")
    argv = ["predict", run_dir, "--seed", "1", "--samples", "2", "--res", "16", "--out", out]
    code, _, err = cli(capsys, *argv)
    assert_one_line_error(code, err, f"{xdmf} exists; pass --force to overwrite")
    assert xdmf.read_text() == "<Xdmf>mine</Xdmf>" and not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pred.xdmf", "run"]
    code, stdout, err = cli(capsys, *argv, "--force")
    assert code == 0, err
    assert "pred.h5" in xdmf.read_text() and verify(out).ok
    got = read_fields(out, 16)
    assert got["u_pred"].shape == (2, 1, 16, 16) and (got["u_pred"][:, :, 0] == 1).all()
    code, _, err = cli(capsys, *argv[:-1], tmp_path / "p.xdmf")
    assert_one_line_error(code, err, "is the sidecar's name")


def test_eval_of_a_run_on_a_read_only_file_system_is_one_line(small_disk, capsys):
    """The held-out references are cached in the run directory; a read-only one is one line."""
    run = _make_run(small_disk / "run")
    subprocess.run(["mount", "-o", "remount,ro", str(small_disk)], check=True)
    code, _, err = cli(capsys, "eval", run, "--res", "16")
    assert_one_line_error(code, err, f"the held-out reference cache {run / 'cache'} failed: ")
    assert "Read-only file system" in err


def test_predict_into_a_read_only_folder_is_one_line(run_dir, read_only, capsys):
    argv = ["predict", run_dir, "--seed", "1", "--res", "16", "--out", read_only / "p.h5"]
    code, _, err = cli(capsys, *argv)
    assert_one_line_error(code, err, f"output folder {read_only} is not writable")


@pytest.mark.parametrize(
    "argv, needles",
    [
        (["eval", "--res", "0"], ["--res must be >= 2 nodes per axis, got 0"]),
        (["eval", "--res", "-4"], ["--res must be >= 2"]),
        (
            ["eval", "--res", "6"],
            ["--res 6: resolution n=6 is coarser than the network's core grid"],
        ),
        (["eval", "--res", "100000"], ["--res 100000: the amg reference solve", "--reference gmg"]),
        (["eval", "--res", "100000", "--reference", "gmg"], ["--res 100000: the gmg reference"]),
        (["predict", "--res", "0"], ["--res must be >= 2"]),
        (["predict", "--res", "100000"], ["--res 100000: predicting 2 sample(s)", "host memory"]),
        (["predict", "--batch", "0"], ["--batch must be >= 1"]),
    ],
)
def test_bad_resolutions_are_refused_before_any_allocation(
    tmp_path, run_dir, capsys, argv, needles
):
    command, *flags = argv
    extra = ["--seed", "1", "--out", tmp_path / "p.h5"] if command == "predict" else []
    if "--res" not in flags:
        flags += ["--res", "16"]
    code, _, err = cli(capsys, command, run_dir, *flags, *extra)
    assert_one_line_error(code, err, *needles)
    assert not (tmp_path / "p.h5").exists() and not list(run_dir.glob("eval_*"))


def test_eval_checks_a_held_out_file_against_the_run(tmp_path, run_dir, capsys):
    held = tmp_path / "held.h5"
    assert cli(capsys, "data", "--out", held, *SMALL, "--res", "16", "--reference")[0] == 0
    config = run_dir / "config.yaml"
    config.write_text(config.read_text().replace("val_path: null", f"val_path: {held}"))
    code, stdout, err = cli(capsys, "eval", run_dir, "--res", "16")
    assert code == 0, err
    assert "held-out evaluation: 2 samples at 16 nodes per axis" in stdout
    code, _, err = cli(capsys, "eval", run_dir, "--res", "32")
    assert_one_line_error(code, err, f"{held} has no resolution 32")
    config.write_text(config.read_text().replace("eta: 0.5", "eta: 0.25"))
    code, _, err = cli(capsys, "eval", run_dir, "--res", "16")
    assert_one_line_error(code, err, "data.val_path", "made for eta=0.5 but problem.eta is 0.25")
