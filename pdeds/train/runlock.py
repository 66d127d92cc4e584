"""The run-directory lock: one ``pdeds train`` writes a run directory at a time.

Rank 0 holds an advisory ``fcntl.flock`` on ``RUN_DIR/pdeds.lock`` for the run's whole life and
writes its PID, host and start time into the file. A second ``pdeds train`` on the same directory
is refused at once with one line naming the holder. The lock is released on exit, on exceptions
(``RunLock.release`` in ``finally``) and by the OS when the holder dies (kill -9 included); a
lock file left behind by a dead holder is therefore not held and is simply taken over.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path

from pdeds import distributed
from pdeds.errors import PdedsError

LOCK = "pdeds.lock"


@dataclass
class RunLock:
    """The held lock (rank 0) or nothing to hold (other ranks: ``fd`` None)."""

    path: Path
    fd: int | None = None

    def release(self) -> None:
        """Drop the lock; the file stays (its content names the last holder)."""
        if self.fd is not None:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None


def _held_by(path: Path, fd: int) -> str:
    """'pid P on host H since T' from the lock file's content."""
    try:
        who = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
    except (OSError, ValueError):
        who = {}
    return f"pid {who.get('pid', '?')} on host {who.get('host', '?')} since {who.get('since', '?')}"


def _in_use(run_dir: Path, holder: str) -> str:
    return (
        f"--run-dir {run_dir} is in use: pdeds train {holder} holds {run_dir / LOCK}; wait for it "
        "to end (or stop it) or choose another --run-dir"
    )


def holder(run_dir: Path) -> str | None:
    """The error line when another process holds the lock of ``run_dir``, else None. Takes
    and drops the lock at once (a check, e.g. ``--check-only``)."""
    path = run_dir / LOCK
    if not path.is_file():
        return None
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return _in_use(run_dir, _held_by(path, fd))
    finally:
        os.close(fd)  # closing drops a lock taken here
    return None


def _take(run_dir: Path) -> tuple[RunLock | None, str | None]:
    """Create ``run_dir`` if needed and lock it: (lock, None) or (None, why not)."""
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(run_dir / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as err:
        return None, (
            f"--run-dir {run_dir}: cannot create or write it ({err.strerror or err}); choose a "
            "writable --run-dir"
        )
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        why = _in_use(run_dir, _held_by(run_dir / LOCK, fd))
        os.close(fd)
        return None, why
    me = {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "since": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    os.ftruncate(fd, 0)
    os.pwrite(fd, (json.dumps(me) + "\n").encode(), 0)
    return RunLock(run_dir / LOCK, fd), None


def acquire(run_dir: Path) -> RunLock:
    """Rank 0 takes the lock of ``run_dir`` (created if needed); every rank raises the same
    ``PdedsError`` when it is held by another process or the directory cannot be written."""
    lock, why = (None, None)
    if distributed.rank() == 0:
        lock, why = _take(run_dir)
    why = distributed.broadcast_object(why)
    if why is not None:
        raise PdedsError(str(why))
    return lock or RunLock(run_dir / LOCK)
