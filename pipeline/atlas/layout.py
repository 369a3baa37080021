"""The directory layout of an atlas: the one place that spells its file names.

``<out>/``::

    atlas.json                                   blocks, classes, label vocabulary, model, config, runs
    datasets.parquet                             one row per input dataset (status, error, ...)
    manifest/units.parquet                       the plan: part id -> (dataset, row range), each input's identity
    manifest/lock                                held (lockf) by the run writing the atlas: its host and pid
    manifest/attempt.json                        rank 0's word to the other ranks: plan stored, or the error it met
    manifest/run_{run}/part_{part}.done.json     written last, after the part's files
    manifest/run_{run}/part_{part}.failed.json   a unit that could not be embedded
    manifest/run_{run}/{done,failed}_index.json  the markers' records, read once (a cache: the markers decide)
    neighbors/dataset_{id}.npz                   a dataset's kNN graph (metacell models)
    neighbors/dataset_{id}.counts.h5             CSR copy of a large dense count matrix, until the dataset is done
    neighbors/dataset_{id}.lock                  held by the process building those two
    step_{run}__predict_part_{part}_{rank}_{embs,top3,scores}.npz, _cells.parquet, _dropped.parquet
    index/index.json                             the nearest-neighbour index: settings, parts it covers, its file
    index/cells_{generation}.faiss               the faiss index; a new generation per build or extension
    queries/{name}/                              a query's own atlas (its embeddings) and its search results

A part counts as done only through its ``.done.json``, which records each of
its files' sha256.
"""

from __future__ import annotations

from pathlib import Path

#: The arrays of a part (one ``.npz`` each, one array named as the file) and their dtypes.
PART_ARRAYS = {"embs": "float32", "top3": "int32", "scores": "float32"}
#: The tables of a part (``.parquet``).
PART_TABLES = ("cells", "dropped")


def description_path(out_dir) -> Path:
    return Path(out_dir) / "atlas.json"


def datasets_path(out_dir) -> Path:
    return Path(out_dir) / "datasets.parquet"


def units_path(out_dir) -> Path:
    return Path(out_dir) / "manifest" / "units.parquet"


def attempt_path(out_dir) -> Path:
    """What rank 0 of a multi-rank attempt tells the others before they read its plan (see pipeline.run.predict)."""
    return Path(out_dir) / "manifest" / "attempt.json"


def lock_path(out_dir) -> Path:
    """The file a run holds an exclusive OS lock on while it writes the atlas (never replaced, only rewritten)."""
    return Path(out_dir) / "manifest" / "lock"


def marker_path(out_dir, run: int, part: int, kind: str) -> Path:
    """``manifest/run_{run}/part_{part}.{kind}.json``, ``kind`` ``done`` or ``failed``."""
    return run_dir(out_dir, run) / f"part_{part}.{kind}.json"


def is_marker(name: str, kind: str) -> bool:
    """Whether a file name of ``run_dir`` is a part marker of ``kind`` (``done`` or ``failed``)."""
    return name.startswith("part_") and name.endswith(f".{kind}.json")


def marker_index_path(out_dir, run: int, kind: str) -> Path:
    """``manifest/run_{run}/{kind}_index.json``: the markers of one kind read so far, so a reader need not open them."""
    return run_dir(out_dir, run) / f"{kind}_index.json"


def run_dir(out_dir, run: int) -> Path:
    return Path(out_dir) / "manifest" / f"run_{run}"


def neighbors_path(out_dir, dataset: int) -> Path:
    return Path(out_dir) / "neighbors" / f"dataset_{dataset}.npz"


def neighbors_lock_path(out_dir, dataset: int) -> Path:
    """Held while a process builds the dataset's graph and sparse copy, so no other builds them too."""
    return Path(out_dir) / "neighbors" / f"dataset_{dataset}.lock"


def sparse_copy_path(out_dir, dataset: int) -> Path:
    return Path(out_dir) / "neighbors" / f"dataset_{dataset}.counts.h5"


def part_stem(run: int, part: int, rank: int) -> str:
    """File name prefix of one part, as in the published atlas: ``step_0__predict_part_12_3``."""
    return f"step_{run}__predict_part_{part}_{rank}"


def part_file(stem: str, name: str) -> str:
    """The file name of one of a part's arrays (``embs``, ``top3``, ``scores``) or tables (``cells``, ``dropped``)."""
    return f"{stem}_{name}.npz" if name in PART_ARRAYS else f"{stem}_{name}.parquet"


def part_files_pattern(run: int, part: int | None = None) -> str:
    """A glob of the files of every part of a run, or of one part written by any rank."""
    return f"step_{run}__predict_part_*" if part is None else f"step_{run}__predict_part_{part}_*"


def index_dir(out_dir) -> Path:
    """``index/``: the nearest-neighbour index of an atlas (``scatlas index``)."""
    return Path(out_dir) / "index"


def index_description_path(out_dir) -> Path:
    """``index/index.json``, written last: it names the index file and the parts the index covers."""
    return index_dir(out_dir) / "index.json"


def index_file(out_dir, generation: int) -> Path:
    """``index/cells_{generation}.faiss``; each build or extension writes a new generation, so the old one
    stays valid until ``index.json`` points to the new one."""
    return index_dir(out_dir) / f"cells_{generation}.faiss"


def query_dir(out_dir, name: str) -> Path:
    """``queries/{name}/``: where ``scatlas query`` embeds query datasets and writes what it found."""
    return Path(out_dir) / "queries" / name


#: The tables a query writes in its directory (``.parquet``, and ``.csv`` for the transfer table).
QUERY_TABLES = {"neighbors": "neighbors.parquet", "transfer": "label_transfer.parquet"}
