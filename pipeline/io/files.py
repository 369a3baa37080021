"""File helpers every stage uses: atomic writes, JSON, memory-mapped ``.npz`` arrays, file hashes, the
directory lock, and the one-line description of an error of the file system."""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import socket
import struct
import tempfile
import time
import zipfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np


def _file_mode() -> int:
    """The mode ``open()`` gives a new file under the process umask (``mkstemp`` gives 0600)."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def atomic_write(path: str | Path, write: Callable[[str], None]) -> None:
    """Call ``write(tmp_path)`` then rename onto ``path``; a crash leaves no partial file under ``path``.

    The file gets the permissions of any file the user creates (umask), so an
    atlas written for a team is readable by it.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, _file_mode())
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except OSError as err:
        Path(tmp).unlink(missing_ok=True)
        if err.errno is not None and err.filename in (None, tmp):  # name the file meant, not its temporary
            raise OSError(err.errno, err.strerror, str(path)) from err
        raise
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: str | Path, payload: dict) -> None:
    text = json.dumps(payload, indent=1, sort_keys=False, default=str)
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def read_json(path: str | Path) -> dict:
    return json.loads(Path(path).read_text())


def remove_temporaries(out_dir: str | Path) -> int:
    """Delete leftovers of writes that were interrupted (``.*.tmp``); returns how many."""
    leftovers = [Path(folder, name) for folder, _, names in os.walk(out_dir)
                 for name in names if name.startswith(".") and name.endswith(".tmp")]  # fmt: skip
    for p in leftovers:
        p.unlink(missing_ok=True)
    return len(leftovers)


def memmap_npz(path: str | Path, name: str) -> np.ndarray:
    """Memory-map array ``name`` of an uncompressed ``.npz`` file (as ``np.savez`` writes it).

    The array's bytes are found from the zip member's local header and the
    ``.npy`` header; a compressed member is read whole instead.
    """
    path = Path(path)
    try:
        with zipfile.ZipFile(path) as archive:
            info = archive.getinfo(f"{name}.npy")
        if info.compress_type != zipfile.ZIP_STORED:
            with np.load(path) as npz:
                return npz[name]
        with open(path, "rb") as fh:
            fh.seek(info.header_offset)
            header = fh.read(30)
            if header[:4] != b"PK\x03\x04":
                raise ValueError("bad zip member header")
            name_length, extra_length = struct.unpack("<HH", header[26:30])
            fh.seek(info.header_offset + 30 + name_length + extra_length)
            shape, fortran_order, dtype = read_npy_header(fh)
            offset = fh.tell()
    except (OSError, KeyError, ValueError, zipfile.BadZipFile) as err:
        raise ValueError(f"{path}: cannot read array {name!r} ({err})") from err
    if 0 in shape:
        return np.zeros(shape, dtype)
    return np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=shape, order="F" if fortran_order else "C")


def read_npy_header(fh) -> tuple[tuple[int, ...], bool, np.dtype]:
    """Read the ``.npy`` magic and header at ``fh``'s position: (shape, fortran_order, dtype); ``fh`` is left at the data."""
    version = np.lib.format.read_magic(fh)
    read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    return read_header(fh)


def file_sha256(path: str | Path) -> str:
    """Hex sha256 of a file's bytes."""
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


class LockHeld(Exception):
    """Another process holds the lock; ``str(err)`` is one line naming it."""


@contextmanager
def hold_lock(path: str | Path, what: str) -> Iterator[None]:
    """Hold an exclusive OS lock on ``path`` while the block runs; refuse at once if another process holds it.

    The lock is a POSIX record lock (``fcntl.lockf``), which belongs to this
    process alone: a process forked while it is held (a DataLoader worker, a
    planning worker) does not hold it, so a worker orphaned for a few seconds
    after its run was killed cannot make the requeued run refuse. (An
    ``flock`` lock would be shared with every forked child.) The OS releases
    the lock when the process dies, however it dies, so a killed run never
    leaves ``what`` locked. The file records the holder's host and pid, for the
    refusal of the next one; it is rewritten in place, never replaced, since a
    lock belongs to the file's inode. This process must not open and close
    ``path`` elsewhere while it holds it: closing any descriptor of the file
    drops a POSIX lock.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, _file_mode())
    try:
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            if err.errno not in (errno.EACCES, errno.EAGAIN):
                raise
            holder = os.pread(fd, 4096, 0).decode(errors="replace").strip() or "another process"
            raise LockHeld(f"{what} is in use by another run ({holder}); wait for it to end, or use "
                           "another out_dir") from None  # fmt: skip
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"host {socket.gethostname()} pid {os.getpid()} since {time.strftime('%Y-%m-%dT%H:%M:%S')}\n"
                  .encode(), 0)  # fmt: skip
        yield
    finally:
        os.close(fd)  # releases the lock


#: What to do about an error of the file system, by errno: (what happened, the remedy).
_ENVIRONMENT_ERRORS = {
    errno.ENOSPC: ("no space left on device", "free space and re-run the same command; nothing done so far is lost"),
    errno.EDQUOT: ("disk quota exceeded", "free space or raise the quota and re-run the same command; nothing done "
                   "so far is lost"),
    errno.EFBIG: ("file too large (a file size limit)", "raise the limit (ulimit -f) and re-run the same command; "
                  "nothing done so far is lost"),
    errno.EACCES: ("permission denied", "make it readable/writable for you, or use another out_dir"),
    errno.EPERM: ("operation not permitted", "make it writable for you, or use another out_dir"),
    errno.EROFS: ("read-only file system", "use an out_dir on a writable file system"),
    errno.ENOTDIR: ("not a directory", "out_dir must name a directory (or a path to create): remove the file or "
                    "use another out_dir"),
    errno.EEXIST: ("exists and is not a directory", "out_dir must name a directory: remove the file or use "
                   "another out_dir"),
    errno.ENOENT: ("no longer exists", "restore it (or remove it from the inputs) and re-run the same command; "
                   "done parts are kept"),
    errno.EIO: ("input/output error", "check the device, then re-run the same command; done parts are kept"),
}  # fmt: skip


def environment_error(err: BaseException, default_path: str | Path) -> str | None:
    """One line for an error of the machine rather than of the data: the path, the cause and what to do.

    None when ``err`` is not such an error (not an ``OSError`` with one of the
    errnos above). ``default_path`` is named when the error does not say which
    file it was (a failed ``write`` says no name).
    """
    if not isinstance(err, OSError) or err.errno not in _ENVIRONMENT_ERRORS:
        return None
    cause, remedy = _ENVIRONMENT_ERRORS[err.errno]
    return f"{err.filename or default_path}: {cause} ({err.strerror}): {remedy}"
