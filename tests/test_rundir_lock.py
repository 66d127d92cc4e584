"""The run-directory lock and unwritable run directories, through the real ``pdeds`` command."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys

import pytest
from trainer_util import ROOT, pdeds, write_tiny

from pdeds.train import runlock


def _error_line(proc) -> str:
    """The one ``pdeds: error:`` line of a refused command (exit 2, no traceback)."""
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
    (line,) = [x for x in proc.stderr.splitlines() if x.startswith("pdeds: error:")]
    return line


def _check_only(capsys, *args: str) -> str:
    """``pdeds train ... --check-only`` in this process (no engine); its error line."""
    from pdeds.cli import main

    capsys.readouterr()
    assert main(["train", *args, "--check-only"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    (line,) = [x for x in err.splitlines() if x.startswith("pdeds: error:")]
    return line


def test_second_writer_is_refused_naming_the_holder(tmp_path, capsys):
    cfg, run = write_tiny(tmp_path / "c.yaml"), tmp_path / "run"
    lock = runlock.acquire(run)  # this process plays the running `pdeds train`
    try:
        lines = [
            _error_line(pdeds("train", str(cfg), "--run-dir", str(run))),
            _check_only(capsys, str(cfg), "--run-dir", str(run)),
        ]
        for line in lines:
            assert f"pid {os.getpid()} on host {socket.gethostname()}" in line, line
            assert "in use" in line and "another --run-dir" in line
    finally:
        lock.release()
    assert runlock.holder(run) is None
    assert not (run / "config.yaml").exists()  # the refused runs wrote nothing


def test_lock_of_a_killed_holder_is_free(tmp_path):
    run = tmp_path / "run"
    code = (
        "import sys, time; from pathlib import Path; from pdeds.train import runlock; "
        "runlock.acquire(Path(sys.argv[1])); print('held', flush=True); time.sleep(60)"
    )
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    holder = subprocess.Popen(
        [sys.executable, "-c", code, str(run)], stdout=subprocess.PIPE, text=True, env=env
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        assert str(holder.pid) in (runlock.holder(run) or "")
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert runlock.holder(run) is None  # the OS dropped the lock; the file stays
    assert (run / runlock.LOCK).is_file()


def test_unwritable_run_dir_is_one_error_check_only_too(tmp_path, capsys):
    cfg = write_tiny(tmp_path / "c.yaml")
    (tmp_path / "afile").write_text("x")
    bad = tmp_path / "afile" / "run"
    line = _check_only(capsys, str(cfg), "--run-dir", str(bad))
    assert f"--run-dir {bad} cannot be created: {tmp_path / 'afile'} is not a directory" in line
    line = _error_line(pdeds("train", str(cfg), "--run-dir", str(bad)))
    assert f"--run-dir {bad}: cannot create or write it" in line


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_run_dir_is_refused_by_check_only(tmp_path, capsys):
    cfg, ro = write_tiny(tmp_path / "c.yaml"), tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        line = _check_only(capsys, str(cfg), "--run-dir", str(ro / "run"))
        assert "not writable" in line
    finally:
        ro.chmod(0o755)
