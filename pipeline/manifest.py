"""The run manifest: what an atlas directory holds, written atomically.

Layout of ``<out>/`` (see README "Output format")::

    atlas.json                 blocks, classes, label vocabulary, model, config, runs
    datasets.parquet           one row per input dataset (status, error, ...)
    manifest/units.parquet     the plan: part id -> (dataset, row range); stable across restarts
    manifest/run_{run}/part_{part}.done.json     written last, after the part's files
    manifest/run_{run}/part_{part}.failed.json   a unit that could not be embedded
    neighbors/dataset_{id}.npz                   per-dataset kNN graph (metacell models)
    neighbors/dataset_{id}.counts.h5             CSR copy of a large dense count matrix, until the dataset is done
    step_{run}__predict_part_{part}_{rank}_{embs,top3,scores}.npz, _cells.parquet, _dropped.parquet

A part counts as done only through its ``.done.json``; the marker records each
file's size and sha256 so ``scatlas validate`` can check them.
"""

from __future__ import annotations

import json
import os
import struct
import tempfile
import zipfile
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd

from pipeline.plan import Unit

PART_FILES = ("embs.npz", "top3.npz", "scores.npz", "cells.parquet", "dropped.parquet")


def part_stem(run: int, part: int, rank: int) -> str:
    """File name prefix of one part, as in the published atlas: ``step_0__predict_part_12_3``."""
    return f"step_{run}__predict_part_{part}_{rank}"


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
    leftovers = [p for p in Path(out_dir).rglob(".*.tmp") if p.is_file()]
    for p in leftovers:
        p.unlink(missing_ok=True)
    return len(leftovers)


# ----------------------------------------------------------------------------- plan


def units_path(out_dir) -> Path:
    return Path(out_dir) / "manifest" / "units.parquet"


def read_units(out_dir) -> tuple[list[Unit], dict[int, str]]:
    """The stored plan: its units and the path of every dataset id it used."""
    path = units_path(out_dir)
    if not path.exists():
        return [], {}
    table = pd.read_parquet(path)
    units = [Unit(int(r.part), int(r.dataset), int(r.start), int(r.stop)) for r in table.itertuples()]
    return units, dict(zip(table.dataset.astype(int), table.path))


def write_units(out_dir, units: list[Unit], paths: dict[int, str]) -> None:
    table = pd.DataFrame(
        {
            "part": [u.part for u in units],
            "dataset": [u.dataset for u in units],
            "path": [paths[u.dataset] for u in units],
            "start": [u.start for u in units],
            "stop": [u.stop for u in units],
        }
    )
    atomic_write(units_path(out_dir), lambda tmp: table.to_parquet(tmp, index=False))


# ----------------------------------------------------------------------------- part markers


def run_dir(out_dir, run: int) -> Path:
    return Path(out_dir) / "manifest" / f"run_{run}"


def done_parts(out_dir, run: int) -> dict[int, dict]:
    """part id -> its done record, for one run."""
    return _part_records(out_dir, run, "done")


def failed_parts(out_dir, run: int) -> dict[int, dict]:
    """part id -> its failure record (unit, rank, error), for one run."""
    return _part_records(out_dir, run, "failed")


def _part_records(out_dir, run: int, kind: str) -> dict[int, dict]:
    records = {}
    for path in sorted(run_dir(out_dir, run).glob(f"part_*.{kind}.json")):
        record = read_json(path)
        records[int(record["part"])] = record
    return records


def mark_done(out_dir, run: int, record: dict) -> None:
    directory = run_dir(out_dir, run)
    (directory / f"part_{record['part']}.failed.json").unlink(missing_ok=True)
    write_json(directory / f"part_{record['part']}.done.json", record)


def mark_failed(out_dir, run: int, unit: Unit, rank: int, error: str) -> None:
    record = {"part": unit.part, "dataset": unit.dataset, "start": unit.start, "stop": unit.stop,
              "rank": rank, "error": error}  # fmt: skip
    write_json(run_dir(out_dir, run) / f"part_{unit.part}.failed.json", record)


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
            version = np.lib.format.read_magic(fh)
            read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            shape, fortran_order, dtype = read_header(fh)
            offset = fh.tell()
    except (OSError, KeyError, ValueError, zipfile.BadZipFile) as err:
        raise ValueError(f"{path}: cannot read array {name!r} ({err})") from err
    if 0 in shape:
        return np.zeros(shape, dtype)
    return np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=shape, order="F" if fortran_order else "C")
