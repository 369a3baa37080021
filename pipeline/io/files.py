"""File helpers every stage uses: atomic writes, JSON, memory-mapped ``.npz`` arrays, file hashes."""

from __future__ import annotations

import hashlib
import json
import os
import struct
import tempfile
import zipfile
from collections.abc import Callable
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
