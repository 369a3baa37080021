"""A rank's work units -> model batches: read, QC'd, mapped to the vocabulary and tokenized.

Each item of :class:`UnitBatches` is one batch: ``batch_size`` consecutive rows
of one unit as numpy arrays (:func:`batch_tensors` makes them tensors), tokenized in a DataLoader worker (vectorised, no per-cell Python
loop). Dropped cells travel with the batch so the writer can list them.
:func:`prepare_dataset` is what a dataset needs first when the model uses
neighbours; paths are given by the caller, which owns the atlas layout.
"""

from __future__ import annotations

import fcntl
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import scipy.sparse as sp
import torch
from torch.utils.data import Dataset

from pipeline.io.files import atomic_write
from pipeline.io.matrix import DatasetError
from pipeline.plan.datasets import DatasetPlan, load_dataset
from pipeline.plan.units import Unit
from pipeline.plan.vocabulary import to_vocabulary
from pipeline.tokens.neighbors import load_neighbors, neighbor_chunks, save_neighbors
from pipeline.tokens.select import cell_keys, identity_key, lookup, qc_reasons, select_genes

log = logging.getLogger(__name__)


# a worker holds a dataset's vocabulary counts in memory when it stores at most this many values (~128 MiB)
HELD_VALUES = 16_000_000


HELD_BLOCK_ROWS = 4096


@dataclass(frozen=True)
class NeighborFiles:
    """Where a dataset's kNN graph, its sparse copy and the lock that guards their making are (given by the caller)."""

    graph: Path
    sparse_copy: Path
    lock: Path


def prepare_dataset(ds: DatasetPlan, neighbors_file: Path, sparse_copy_file: Path, n_neighbors: int, seed: int) -> None:
    """Make a dataset ready for a metacell model: its counts read from a sparse copy when large and dense
    (:func:`ensure_sparse_copy`), and its kNN graph in ``neighbors_file``, computed unless a graph of its
    cells is stored there already.
    """
    ensure_sparse_copy(ds, sparse_copy_file)
    try:
        if len(load_neighbors(neighbors_file)[0]) == ds.n_cells:
            return
    except (OSError, ValueError):  # none yet, or an unreadable one (an older format): computed again
        pass
    log.info("%s: computing the %d-nearest-neighbour graph of %d cells", ds.path, n_neighbors, ds.n_cells)
    save_neighbors(neighbors_file, neighbor_chunks(ds.matrix, n_neighbors=n_neighbors, seed=seed))


def prepare_locked(ds: DatasetPlan, files: NeighborFiles, n_neighbors: int, seed: int) -> None:
    """:func:`prepare_dataset` under an exclusive lock on ``files.lock``, so that two processes (ranks,
    DataLoader workers, CPU array tasks) never build the same graph: the second waits, then finds it made.
    A file system without ``flock`` runs unlocked (both may build it; the writes are atomic)."""
    files.lock.parent.mkdir(parents=True, exist_ok=True)
    with open(files.lock, "a") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX)
        except OSError:
            pass
        try:
            prepare_dataset(ds, files.graph, files.sparse_copy, n_neighbors, seed)
        finally:
            try:
                fcntl.flock(lock, fcntl.LOCK_UN)
            except OSError:
                pass


def ensure_sparse_copy(ds: DatasetPlan, path: Path) -> bool:
    """Read a large dense dataset from a CSR copy of its counts at ``path``; write the copy if missing.

    A dense matrix (or one whose stored values are unknown) of more than
    ``HELD_VALUES`` values is copied once, block by block, with the checks of
    any read: a worker reading the scattered rows of a batch's neighbours from
    a dense file decompresses whole chunks for each row (190-1,090 cells/s on
    10,000 dense PBMC cells), while from a CSR copy they are read as runs.
    A copy left by an earlier attempt is used if it was made from the same
    matrix of the file as it is now (same counts location, shape, file size
    and modification time). Returns whether the dataset is now read from a copy.
    """
    matrix = ds.matrix
    if matrix.n_stored <= HELD_VALUES or matrix.n_stored < ds.n_cells * ds.n_genes:
        return False  # small enough to hold, or already sparse
    source = os.stat(ds.path)
    made_from = [source.st_size, source.st_mtime_ns]
    try:
        with h5py.File(path, "r") as copy:
            current = (
                [int(v) for v in copy.attrs.get("made_from", [])] == made_from
                and [int(v) for v in copy.attrs.get("shape", [])] == [ds.n_cells, ds.n_genes]
                and copy.attrs.get("counts_location") == ds.counts_location
            )
    except OSError:  # none yet, or unreadable
        current = False
    if current:
        matrix.read_from_sparse_copy(path)
        return True
    log.info("%s: dense count matrix: writing a sparse copy of its %d cells to %s", ds.path, ds.n_cells, path)
    block_rows = max(1, HELD_VALUES // max(ds.n_genes, 1))

    def write(tmp: str) -> None:
        with h5py.File(tmp, "w") as out:
            out.attrs["shape"] = (ds.n_cells, ds.n_genes)
            out.attrs["source"], out.attrs["counts_location"] = ds.path, ds.counts_location
            out.attrs["made_from"] = made_from  # the source file's size and modification time
            data = out.create_dataset("data", (0,), dtype=np.float32, maxshape=(None,), chunks=(1 << 16,))
            indices = out.create_dataset("indices", (0,), dtype=np.int32, maxshape=(None,), chunks=(1 << 16,))
            indptr = [np.zeros(1, dtype=np.int64)]
            for start in range(0, ds.n_cells, block_rows):
                block = matrix.read_rows(start, min(start + block_rows, ds.n_cells))
                n = data.shape[0]
                data.resize((n + block.nnz,))
                indices.resize((n + block.nnz,))
                data[n:], indices[n:] = block.data, block.indices
                indptr.append(block.indptr[1:].astype(np.int64) + n)
            out.create_dataset("indptr", data=np.concatenate(indptr))

    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, write)
    matrix.read_from_sparse_copy(path)
    return True


#: A batch's token arrays, in the order the model takes them (the last two for metacell models only).
TOKEN_ARRAYS = ("genes", "counts", "knn_counts", "knn_dists")


def batch_tensors(batch: dict, device: torch.device | str = "cpu") -> list[torch.Tensor | None]:
    """A batch's :data:`TOKEN_ARRAYS` as tensors on ``device`` (None for those it lacks).

    Workers hand batches over as numpy arrays: pickled through the worker's
    pipe, a batch costs the main process a copy, where a tensor costs it a
    socket connection to the worker per array (torch's shared-memory file
    descriptors), which waits on the worker when it is busy. They become
    tensors here, in the process that runs the forward.
    """
    return [None if batch.get(k) is None else torch.from_numpy(batch[k]).to(device) for k in TOKEN_ARRAYS]


class UnitBatches(Dataset):
    """Item ``i`` is one batch of one unit (see module docstring)."""

    def __init__(
        self,
        units: list[Unit],
        datasets: dict[int, DatasetPlan],
        *,
        vocabulary_offsets: dict[str, int],
        max_len: int,
        batch_size: int,
        min_counts: int,
        min_genes: int,
        seed: int,
        neighbor_files: Mapping[int, NeighborFiles] | None,
        n_neighbors: int = 6,
        vocabulary: dict[str, list[str]] | None = None,
    ):
        self.datasets = datasets  # light plans (opened again here, see _load) or loaded ones
        self.vocabulary = vocabulary  # the model's genes per organism: what a light plan is loaded with
        self.offsets = vocabulary_offsets
        self.max_len, self.seed = max_len, seed
        self.min_counts, self.min_genes = min_counts, min_genes
        self.neighbor_files = neighbor_files  # dataset -> its kNN graph; None: the model uses no neighbours
        self.n_neighbors = n_neighbors
        self._prepared: dict[int, str] = {}  # dataset -> "" once ready in this process, else the error it failed with
        self._loaded: tuple[int, DatasetPlan | str | None] = (-1, None)  # the last dataset loaded, or its error
        self.items = []  # (unit, start, stop, last)
        for unit in units:
            for start in range(unit.start, unit.stop, batch_size):
                stop = min(start + batch_size, unit.stop)
                self.items.append((unit, start, stop, stop == unit.stop))
        # the last dataset's neighbour graph, and its vocabulary counts when small (see _hold)
        self._neighbors: tuple[int, tuple[np.ndarray, np.ndarray] | None] = (-1, None)
        self._held: tuple[int, tuple[sp.csr_matrix, np.ndarray] | None] = (-1, None)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict:
        unit, start, stop, last = self.items[index]
        batch = {"unit": (unit.part, unit.dataset, unit.start, unit.stop), "last": last, "error": ""}
        try:
            batch.update(self._tokenize(unit.dataset, start, stop))
        except DatasetError as err:
            batch["error"] = str(err)
        except Exception as err:  # noqa: BLE001 - one broken unit must not stop the run
            batch["error"] = f"{self.datasets[unit.dataset].path}: rows {start}-{stop}: {type(err).__name__}: {err}"
        return batch

    def _load(self, dataset: int) -> DatasetPlan:
        """The plan of ``dataset`` ready to tokenize: a light plan is opened again (:func:`load_dataset`) the first
        time this process reaches it, and kept while its units are tokenized (a rank's units are in dataset order).
        """
        plan = self.datasets[dataset]
        if plan.loaded:
            return plan
        if self._loaded[0] != dataset:
            self._loaded = (dataset, None)  # let the previous one go first
            try:
                self._loaded = (dataset, load_dataset(plan, self.vocabulary))
            except Exception as err:  # noqa: BLE001 - one broken dataset must not stop the run
                self._loaded = (dataset, _failure(plan.path, err))
        if isinstance(self._loaded[1], str):
            _fail(plan.path, self._loaded[1])
        return self._loaded[1]

    def _prepare(self, ds: DatasetPlan) -> None:
        """The first time this process reaches a dataset: its graph and sparse copy (:func:`prepare_locked`).

        Done here, in the worker (or between forwards), not all at once before
        the first batch; a dataset that fails here fails every batch of it with
        the same error, and the other datasets go on.
        """
        if ds.dataset not in self._prepared:
            try:
                prepare_locked(ds, self.neighbor_files[ds.dataset], self.n_neighbors, self.seed)
                self._prepared[ds.dataset] = ""
            except Exception as err:  # noqa: BLE001 - e.g. a bad value past the rows checked at planning
                self._prepared[ds.dataset] = _failure(ds.path, err, "neighbour graph: ")
        if self._prepared[ds.dataset]:
            _fail(ds.path, self._prepared[ds.dataset])

    def _tokenize(self, dataset: int, start: int, stop: int) -> dict:
        ds = self._load(dataset)
        if self.neighbor_files is not None:
            self._prepare(ds)
        vocab, n_counts = self._read_cells(ds, start, stop)
        rows = np.arange(start, stop)
        n_genes = np.diff(vocab.indptr)
        reasons = qc_reasons(n_counts, n_genes, self.min_counts, self.min_genes)
        organisms = ds.cell_organisms[start:stop]
        reasons[organisms != ds.gene_organism] = "organism_mismatch"
        reasons[~np.isin(organisms, list(self.offsets))] = "organism_unsupported"
        keep = reasons == ""
        obs_names = ds.matrix.obs_names[start:stop]
        cells = {
            "dataset": np.full(keep.sum(), dataset, dtype=np.int64),
            "row": rows[keep],
            "obs_name": obs_names[keep],
            "organism": organisms[keep],
            "n_counts": n_counts[keep],
            "n_genes": n_genes[keep],
            **{name: values[start:stop][keep] for name, values in ds.cell_metadata.items()},  # data.metadata columns
        }
        dropped = {
            "dataset": np.full((~keep).sum(), dataset, dtype=np.int64),
            "row": rows[~keep],
            "obs_name": obs_names[~keep],
            "reason": reasons[~keep],
        }
        vocab = vocab[keep]
        n, length = len(cells["row"]), min(self.max_len, vocab.shape[1])
        out = {"cells": cells, "dropped": dropped}
        if n == 0:
            out["genes"] = np.zeros((0, length), dtype=np.int64)
            out["counts"] = np.zeros((0, length), dtype=np.float32)
            return out
        keys = cell_keys(self.seed, identity_key(ds.identity), cells["row"])  # not the list position
        if self.neighbor_files is None:
            genes = select_genes(vocab, keys, self.max_len)
        else:
            knn_vocab, knn_rows, dists = self._neighbor_counts(ds, cells["row"])
            k = knn_rows.shape[1]
            # only cells expressing fewer than max_len genes look at what their neighbours express
            short = np.flatnonzero(cells["n_genes"] < length)  # (to_vocabulary stores no zeros)
            # [n, n_neighbours_read] with a 1 per (short cell, neighbour): times their counts = summed neighbour counts
            pick = sp.csr_matrix((np.ones(short.size * k), (np.repeat(short, k), knn_rows[short].ravel())),
                                 shape=(n, knn_vocab.shape[0]))  # fmt: skip
            genes = select_genes(vocab, keys, self.max_len, (pick @ knn_vocab).tocsr())
            knn_counts = lookup(knn_vocab, knn_rows.ravel(), np.repeat(genes, k, axis=0))
            out["knn_counts"] = knn_counts.reshape(n, k, -1)
            out["knn_dists"] = dists.astype(np.float32)
        out["genes"] = genes + self.offsets[ds.gene_organism]
        out["counts"] = lookup(vocab, np.arange(n), genes)
        return out

    def _neighbor_counts(self, ds: DatasetPlan, rows: np.ndarray):
        """Vocabulary counts of the neighbours of ``rows``: (csr [n_unique + 1, G], [n, K] row index, [n, K] distance).

        Missing neighbours (index -1, datasets with fewer cells than K + 1) point
        at an all-zero last row.
        """
        if self._neighbors[0] != ds.dataset:
            self._neighbors = (ds.dataset, load_neighbors(self.neighbor_files[ds.dataset].graph))
        indices, distances = self._neighbors[1]
        idx, dist = indices[rows], distances[rows].copy()
        unique, inverse = np.unique(idx, return_inverse=True)
        real = unique[unique >= 0]
        counts = self._vocabulary_rows(ds, real)
        counts = sp.vstack([counts, sp.csr_matrix((1, counts.shape[1]), dtype=counts.dtype)]).tocsr()
        position = np.where(unique >= 0, np.searchsorted(real, unique), len(real))
        dist[idx < 0] = 0.0
        return counts, position[inverse].reshape(idx.shape), dist

    def _read_cells(self, ds: DatasetPlan, start: int, stop: int) -> tuple[sp.csr_matrix, np.ndarray]:
        """Vocabulary counts and total counts (all genes) of rows ``[start, stop)``."""
        held = self._hold(ds)
        if held is not None:
            return held[0][start:stop], held[1][start:stop]
        return _read_vocabulary_counts(ds, start, stop)

    def _vocabulary_rows(self, ds: DatasetPlan, rows: np.ndarray) -> sp.csr_matrix:
        """Vocabulary counts of sorted, unique ``rows``."""
        held = self._hold(ds)
        if held is not None:
            return held[0][rows]
        return to_vocabulary(ds.matrix.read_rows_at(rows), ds.gene_columns, ds.n_vocab)

    def _hold(self, ds: DatasetPlan) -> tuple[sp.csr_matrix, np.ndarray] | None:
        """The dataset's vocabulary and total counts, in memory, when it is small enough to hold; else None.

        Neighbours are scattered over the whole dataset, so with a metacell
        model a worker reads a dataset of at most ``HELD_VALUES`` stored values
        once (in blocks, checked as any read) and keeps it while it works on
        it, instead of reading each batch's neighbours from the file.
        """
        if self._held[0] != ds.dataset:
            self._held = (ds.dataset, None)  # let the previous one go first
            # a large dense dataset is read from its sparse copy (ensure_sparse_copy): its stored values are non-zeros
            if self.neighbor_files is not None and ds.matrix.n_stored <= HELD_VALUES:
                blocks = [_read_vocabulary_counts(ds, start, min(start + HELD_BLOCK_ROWS, ds.n_cells))
                          for start in range(0, ds.n_cells, HELD_BLOCK_ROWS)]  # fmt: skip
                vocab, totals = zip(*blocks)
                self._held = (ds.dataset, (sp.vstack(vocab, format="csr"), np.concatenate(totals)))
        return self._held[1]


def _failure(path: str, err: Exception, step: str = "") -> str:
    """What every batch of a dataset that failed once in this process fails with: a DatasetError says it
    already; any other exception is named, after the ``step`` that raised it."""
    return str(err) if isinstance(err, DatasetError) else f"{path}: {step}{type(err).__name__}: {err}"


def _fail(path: str, message: str) -> None:
    """Raise the DatasetError of a :func:`_failure` message again (the message already names the file)."""
    raise DatasetError(path, message.removeprefix(f"{path}: "))


def _read_vocabulary_counts(ds: DatasetPlan, start: int, stop: int) -> tuple[sp.csr_matrix, np.ndarray]:
    """Rows ``[start, stop)`` read from the file: their vocabulary counts, and their total counts over all genes."""
    raw = ds.matrix.read_rows(start, stop)
    return to_vocabulary(raw, ds.gene_columns, ds.n_vocab), np.asarray(raw.sum(1)).ravel()
