"""What keeps a pdeds data file whole: checksums, and failures turned into one clear line.

A write can fail half way (a full disk, a read-only folder, a quota); a read can meet a file
damaged since it was written. Both end in a :class:`~pdeds.errors.PdedsError` that names the file
and the fix, never an h5py traceback, and a failed write never leaves HDF5 holding a file it
cannot close (:func:`close_or_abandon`). The layout these protect is in :mod:`pdeds.data.hdf5`.
"""

from __future__ import annotations

import errno
import math
import os
import re
import shutil
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import h5py
import numpy as np

from pdeds.errors import PdedsError

PathLike = str | os.PathLike

H5_ERRORS = (OSError, RuntimeError, KeyError)
"""What h5py raises when HDF5 fails: a damaged file, a failed write or flush (full disk)."""
WRITE_SLACK = 256 * 2**10
"""Bytes kept free beyond a sample's own for HDF5's metadata, the flush and a sidecar."""


def checksum(array: np.ndarray) -> int:
    """CRC-32 of an array's bytes in C order (one entry of a ``crc32`` dataset)."""
    return zlib.crc32(np.ascontiguousarray(array).reshape(-1).view(np.uint8))


def discard(path: PathLike) -> None:
    """Remove a staging file after a failure, if it is there; a folder that refuses (read-only)
    keeps it, and the failure being reported stays the one the user sees."""
    try:
        Path(path).unlink(missing_ok=True)
    except OSError:
        pass


_HDF5_ERRNO = re.compile(r"errno = (\d+)")
"""How HDF5 passes the OS's errno on in its messages ("file write failed: ..., errno = 28")."""


def _errno(err: BaseException) -> int | None:
    if isinstance(err, OSError) and err.errno:
        return err.errno
    found = _HDF5_ERRNO.search(str(err))
    return int(found.group(1)) if found else None


def reason(err: BaseException) -> str:
    """What went wrong, in a few words: the OS's message when HDF5 passes one on."""
    number = _errno(err)
    if number is not None:
        return os.strerror(number)
    text = " ".join(str(err).split())
    return text if len(text) <= 160 else text[:157] + "..."


def size(nbytes: float) -> str:
    """Bytes as KiB below 1 MiB, MiB below 1 GiB, else GiB."""
    if nbytes < 2**20:
        return f"{nbytes / 2**10:.0f} KiB"
    if nbytes < 2**30:
        return f"{nbytes / 2**20:.1f} MiB"
    return f"{nbytes / 2**30:.1f} GiB"


def free_bytes(folder: PathLike) -> float:
    """Bytes free for this user in ``folder`` (shutil.disk_usage); inf when it cannot say."""
    try:
        return float(shutil.disk_usage(folder).free)
    except OSError:
        return math.inf


def _free_note(folder: Path) -> str:
    free = free_bytes(folder)
    return f"{size(free)} free in {folder}" if math.isfinite(free) else f"free space in {folder}?"


def disk_full(err: BaseException) -> bool:
    """Whether a failure is a full disk or an exhausted quota (ENOSPC, EDQUOT)."""
    return _errno(err) in (errno.ENOSPC, errno.EDQUOT)


def write_error(path: PathLike, err: BaseException, then: str = "") -> PdedsError:
    """The one-line error for a failed write to ``path``: the OS's reason, the space left in its
    folder, the fix, and ``then`` (what became of the file)."""
    path = Path(path)
    fix = "free space or write elsewhere" if disk_full(err) else "check it or write elsewhere"
    tail = f"; {then}" if then else ""
    return PdedsError(
        f"cannot write {path}: {reason(err)} ({_free_note(path.parent)}); {fix}{tail}"
    )


def check_space(path: PathLike, need: int, what: str, then: str = "") -> None:
    """Refuse, before HDF5 is asked, to write ``what`` (``need`` bytes) into ``path`` when its
    folder has less than that plus :data:`WRITE_SLACK` free: stopping here leaves the file whole
    and closable, where HDF5 running out of space mid-flush does not."""
    path = Path(path)
    free = free_bytes(path.parent)
    if free < need + WRITE_SLACK:
        tail = f"; {then}" if then else ""
        raise PdedsError(
            f"cannot write {path}: {size(free)} free in {path.parent}, {what} needs up to "
            f"{size(need + WRITE_SLACK)}; free space or write elsewhere{tail}"
        )


def close_or_abandon(f: h5py.File, path: PathLike, err: BaseException) -> bool:
    """Close ``f`` after the failure ``err``; True if it closed (the file is kept, and must be
    verified before reuse), False if it had to be removed.

    HDF5 closes a file by flushing its caches. On a full disk that flush fails, and a failed
    close leaves HDF5's state broken: the file stays open and the process crashes (segfault)
    when HDF5 retries at exit. So after a full disk the file is first truncated, which frees
    its space and lets the close succeed; the file is then garbage and removed. After other
    failures the file is closed as it is, and removed the same way if that close fails.
    """
    if not disk_full(err):
        try:
            f.close()
        except H5_ERRORS:
            pass
        if not f.id.valid:
            return True
    try:
        os.truncate(path, 0)
    except OSError:
        pass
    try:
        f.close()
    except H5_ERRORS:
        pass
    discard(path)
    return False


def damaged(path: PathLike, where: str, err: BaseException | str) -> PdedsError:
    """The one-line error for a pdeds file that cannot be read back as written; ``where`` is
    the part ("/res_64/nu sample 91", "/coeffs", "its structure")."""
    what = reason(err) if isinstance(err, BaseException) else err
    hint = (
        f" (`pdeds data --inspect {path} --verify` lists every bad sample)"
        if where.startswith("/res_")
        else ""
    )
    return PdedsError(f"{path} is damaged ({where}: {what}); regenerate it{hint}")


@contextmanager
def reading(path: PathLike, where: str) -> Iterator[None]:
    """Turn h5py's errors on a damaged file into one PdedsError naming the file and ``where``
    ("/res_64/nu", "/coeffs", ...)."""
    try:
        yield
    except H5_ERRORS as err:
        raise damaged(path, where, err) from None
