"""The count matrix every reader returns, and the checks every reader shares.

:class:`CountMatrix` keeps its file open and reads the rows it is asked for,
checking on the way that they hold raw counts (finite, non-negative whole
numbers). :class:`DatasetError` is the one-line refusal of a dataset.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import zipfile
from contextlib import contextmanager
from dataclasses import dataclass, field

import h5py
import numpy as np
import pandas as pd
import scipy.sparse as sp
import zarr

log = logging.getLogger(__name__)


#: Rows sampled from the start of a matrix to decide whether it holds raw counts.
N_SAMPLE_ROWS = 2000


#: At most this many values (dense or CSC matrices) are sampled to decide whether they hold raw counts.
N_SAMPLE_VALUES = 20_000_000


#: Values hashed at each end of a matrix for its fingerprint (1 MiB of float32).
FINGERPRINT_VALUES = 1 << 18


#: Values of a dense matrix read at a time (40 MB of float32).
DENSE_READ_VALUES = 10_000_000


#: A CSC matrix with more stored values than this is worth a warning: it is
#: converted to CSR in memory.
CSC_WARNING_VALUES = 100_000_000


#: Feature names of ATAC peaks: ``chr1:9776-10668``, ``chr1-9776-10668``, ``GL000194.1:55-1000``.
PEAK_NAME = re.compile(r"^(chr[\w.]*[:_-]\d+[-_]\d+|[\w.]+:\d+-\d+)$")


class DatasetError(Exception):
    """A dataset that cannot be embedded.

    ``str(err)`` is one line: ``'<path>: <problem>'``.

    Parameters
    ----------
    path : str
        The dataset's file.
    problem : str
        What is wrong with it, one line.
    """

    def __init__(self, path, problem):
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")

    def __reduce__(self):
        return type(self), (self.path, self.problem)


@dataclass
class CountMatrix:
    """One opened dataset whose raw counts are read in row blocks.

    Build it with :func:`open_counts`. The file stays open until
    :meth:`close` (or the end of a ``with`` block). A pickled CountMatrix (e.g.
    sent to a data-loader worker) reopens the dataset on unpickling.

    Attributes
    ----------
    path : str
        The dataset: a file, or a directory (zarr store, 10x mtx directory).
    n_cells, n_genes : int
        Shape of the count matrix.
    obs_names : np.ndarray
        Cell names (object array of str), in row order. They may repeat: cells
        are identified by their row.
    obs : pd.DataFrame
        Cell metadata, categoricals decoded (empty for formats without any).
    var : pd.DataFrame
        Gene table matching the count matrix's columns (``raw/var`` when the
        counts are ``raw/X``), indexed by var names.
    uns_organism : str or None
        ``uns['organism_ontology_term_id']``, else ``uns['organism']``, as
        written in the file (AnnData only).
    counts_location : str
        Where the counts are in the dataset: ``'X'``, ``'raw/X'`` or
        ``'layers/<name>'`` for AnnData; see ``pipeline.io.formats`` for the
        others. ``open_counts(path, counts=counts_location)`` opens the same
        matrix again.
    warnings : list of str
        Non-fatal findings about the file.
    """

    path: str
    n_cells: int
    n_genes: int
    obs_names: np.ndarray
    obs: pd.DataFrame
    var: pd.DataFrame
    uns_organism: str | None
    counts_location: str
    warnings: list[str] = field(default_factory=list)
    # what close() closes: an h5py.File or pd.HDFStore; None for zarr and in-memory matrices
    _file: object = field(default=None, repr=False)
    # a dense h5py/zarr array, or anything that returns rows for a slice or sorted row indices
    # (CSRRows, in-memory scipy CSR, the row readers of pipeline.io.tenx and pipeline.io.tables)
    _rows_source: object = field(default=None, repr=False)
    # the function that opened it (pipeline.io.formats.open_counts): how a pickled copy reopens the dataset
    _opener: object = field(default=None, repr=False)

    @property
    def n_stored(self):
        """Values the matrix stores: its non-zeros when sparse, ``n_cells * n_genes`` when dense or unknown."""
        source = self._rows_source
        if isinstance(source, CSRRows):
            return source.n_stored
        return int(source.nnz) if sp.issparse(source) else self.n_cells * self.n_genes

    def read_rows(self, start, stop):
        """Raw counts of rows ``[start, stop)``.

        Parameters
        ----------
        start, stop : int
            Row range, ``0 <= start <= stop <= n_cells``.

        Returns
        -------
        scipy.sparse.csr_matrix
            float32, shape ``(stop - start, n_genes)``.

        Raises
        ------
        DatasetError
            The rows hold NaN/inf, negative or non-integer values, or cannot be
            read from the file.
        """
        start, stop = int(start), int(stop)
        if not 0 <= start <= stop <= self.n_cells:
            raise ValueError(f"{self.path}: row range [{start}, {stop}) is outside [0, {self.n_cells})")
        block = self._read(slice(start, stop), f"rows [{start}, {stop})")
        check_counts(block, self.path, self.counts_location, np.arange(start, stop))
        return block

    def fingerprint(self):
        """sha256 of the shape and of the counts of the first and last rows (about 1 MiB of values at each end).

        Cheap to compute, and another whenever a file is rewritten with other
        counts where they start or end (a re-export, counts scaled...), which
        its size and modification time alone may not tell. Empty when those
        rows cannot be read (the unit holding them fails when embedded).
        """
        per_row = max(1, self.n_stored // max(self.n_cells, 1))
        n_rows = min(self.n_cells, max(1, FINGERPRINT_VALUES // per_row))
        digest = hashlib.sha256(f"{self.n_cells}x{self.n_genes} {self.counts_location}".encode())
        try:
            for start, stop in ((0, n_rows), (self.n_cells - n_rows, self.n_cells)):
                block = self.read_rows(start, stop)
                for array in (block.indptr, block.indices, block.data):
                    digest.update(np.ascontiguousarray(array).tobytes())
        except DatasetError:
            return ""
        return digest.hexdigest()

    def read_rows_at(self, rows):
        """Raw counts of the given rows, in the given order.

        Parameters
        ----------
        rows : array of int
            Row indices, in any order; duplicates are allowed.

        Returns
        -------
        scipy.sparse.csr_matrix
            float32, shape ``(len(rows), n_genes)``, row ``i`` holding row
            ``rows[i]`` of the dataset.

        Raises
        ------
        DatasetError
            As :meth:`read_rows`.
        """
        rows = np.asarray(rows, dtype=np.int64).reshape(-1)
        if rows.size and (rows.min() < 0 or rows.max() >= self.n_cells):
            raise ValueError(f"{self.path}: row indices outside [0, {self.n_cells})")
        unique_rows, position = np.unique(rows, return_inverse=True)
        if unique_rows.size == 0:
            return sp.csr_matrix((0, self.n_genes), dtype=np.float32)
        block = self._read(unique_rows, f"{unique_rows.size} rows between {unique_rows[0]} and {unique_rows[-1]}")
        check_counts(block, self.path, self.counts_location, unique_rows)
        return block[position]

    def _read(self, selection, what):
        if self._rows_source is None:
            raise ValueError(f"{self.path}: the count matrix is closed")
        try:
            if is_array(self._rows_source):
                rows = np.arange(selection.start, selection.stop) if isinstance(selection, slice) else selection
                block = read_dense_rows(self._rows_source, rows)
            else:
                block = self._rows_source[selection]
        except (OSError, KeyError, RuntimeError, ValueError) as err:
            raise DatasetError(self.path, f"cannot read {what} of {self.counts_location}: {short_reason(err)}") from err
        return sp.csr_matrix(block, dtype=np.float32)

    def read_from_sparse_copy(self, path):
        """Read the rows from ``path`` from now on: a CSR copy of this matrix (``pipeline.tokens.batches.ensure_sparse_copy``).

        The copy is an HDF5 file with ``data``, ``indices`` and ``indptr`` and a
        ``shape`` attribute equal to this matrix's; the original file is closed.
        """
        copy = open_hdf5(path)
        shape = tuple(int(n) for n in copy.attrs.get("shape", ()))
        if shape != (self.n_cells, self.n_genes):
            copy.close()
            raise DatasetError(path, f"is a copy of shape {shape}, not {(self.n_cells, self.n_genes)}")
        self.close()
        self._file = copy
        self._rows_source = CSRRows(copy["data"], copy["indices"], copy["indptr"], self.n_genes)

    def close(self):
        """Close the file; the matrix cannot be read afterwards."""
        if self._file is not None:
            self._file.close()
        self._file = None
        self._rows_source = None

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()

    def __getstate__(self):
        return {"path": self.path, "counts_location": self.counts_location, "opener": self._opener}

    def __setstate__(self, state):
        reopened = state["opener"](state["path"], counts=state["counts_location"])
        self.__dict__.update(reopened.__dict__)


HULL_READ_VALUES = 100_000  # read scattered rows as one block when it holds at most this many values


RUN_GAP_VALUES = 4_096  # scattered rows closer than this many values apart are read in one call


class CSRRows:
    """Rows of a CSR matrix stored as ``data``/``indices``/``indptr`` arrays (an h5ad or zarr group, 10x ``.h5``).

    Row ranges are one slice of each array. Scattered rows are read as runs:
    rows whose stored values lie close together in the file are read with one
    call, and the run's unwanted values dropped. ``keep_columns`` selects
    columns after reading.
    """

    def __init__(self, data, indices, indptr, n_columns, keep_columns=None):
        self.data, self.indices = data, indices
        self.indptr = np.asarray(indptr[:], dtype=np.int64)
        self.n_columns, self.keep_columns = int(n_columns), keep_columns

    @property
    def n_stored(self):
        return int(self.indptr[-1])

    def __getitem__(self, selection):
        if isinstance(selection, slice):
            block = self._read_range(selection.start, selection.stop)
        else:
            block = self._read_rows(np.asarray(selection, dtype=np.int64))
        return block if self.keep_columns is None else block[:, self.keep_columns]

    def _read_rows(self, rows):
        """Sorted, unique rows."""
        if rows.size == 0:
            return sp.csr_matrix((0, self.n_columns), dtype=self.data.dtype)
        lo, hi = int(rows[0]), int(rows[-1]) + 1
        starts, stops = self.indptr[rows], self.indptr[rows + 1]
        span = int(self.indptr[hi] - self.indptr[lo])
        if span <= max(4 * int((stops - starts).sum()), HULL_READ_VALUES):  # one sequential read beats many small ones
            return self._read_range(lo, hi)[rows - lo]
        # runs: a new one starts where the gap to the previous row's values is wide
        first = np.flatnonzero(np.r_[True, starts[1:] - stops[:-1] > RUN_GAP_VALUES])
        last = np.r_[first[1:], rows.size] - 1
        run_starts, run_stops = starts[first].tolist(), stops[last].tolist()
        data = np.concatenate([self.data[a:b] for a, b in zip(run_starts, run_stops)])
        indices = np.concatenate([self.indices[a:b] for a, b in zip(run_starts, run_stops)])
        # where each wanted row's values sit in the concatenated runs
        run_lengths = stops[last] - starts[first]
        run_offsets = np.r_[0, np.cumsum(run_lengths)[:-1]]
        run_of_row = np.repeat(np.arange(first.size), last - first + 1)
        row_offsets = run_offsets[run_of_row] + starts - starts[first][run_of_row]
        lengths = stops - starts
        indptr = np.r_[0, np.cumsum(lengths)]
        take = np.repeat(row_offsets - indptr[:-1], lengths) + np.arange(indptr[-1])
        return sp.csr_matrix((data[take], indices[take], indptr), shape=(rows.size, self.n_columns))

    def _read_range(self, start, stop):
        lo, hi = int(self.indptr[start]), int(self.indptr[stop])
        indptr = self.indptr[start : stop + 1] - lo
        return sp.csr_matrix((self.data[lo:hi], self.indices[lo:hi], indptr), shape=(stop - start, self.n_columns))


def check_not_peaks(path, feature_names):
    """Raise a DatasetError if most feature names are ATAC peaks (``chr1:9776-10668``)."""
    names = pd.Series(np.asarray(feature_names, dtype=object).astype(str))
    is_peak = names.str.match(PEAK_NAME)
    if len(names) and is_peak.mean() >= 0.5:
        raise DatasetError(
            path, f"looks like ATAC peaks, not RNA ({int(is_peak.sum())} of {len(names)} features are genomic ranges, "
            f"e.g. {names[is_peak].iloc[0]}): scPRINT-2 embeds gene expression"
        )  # fmt: skip


def read_dense_rows(dataset, rows):
    """Rows (increasing) of a dense matrix as CSR, read a few at a time so a block is never held dense."""
    rows_per_read = max(1, DENSE_READ_VALUES // max(dataset.shape[1], 1))
    parts = [sp.csr_matrix((0, dataset.shape[1]), dtype=np.float32)]
    for first in range(0, rows.size, rows_per_read):
        chunk = rows[first : first + rows_per_read]
        if chunk[-1] - chunk[0] + 1 == chunk.size:
            parts.append(sp.csr_matrix(dataset[chunk[0] : chunk[-1] + 1]))
        else:
            parts.append(sp.csr_matrix(dataset[chunk]))
    return sp.vstack(parts, format="csr")


def values_problem(values):
    """What ``values`` hold that raw counts do not (a phrase), or None if they are raw counts."""
    if values.dtype.kind in "iub":
        negative = values[values < 0]
        return f"negative values (e.g. {negative[0]})" if negative.size else None
    if values.dtype.kind != "f":
        return f"{values.dtype} values, not numbers"
    not_finite = values[~np.isfinite(values)]
    if not_finite.size:
        return f"NaN/inf values (e.g. {not_finite[0]})"
    negative = values[values < 0]
    if negative.size:
        return f"negative values (e.g. {negative[0]:.4g})"
    fractional = values[values != np.round(values)]
    if fractional.size:
        kind = "log-normalised" if values.max() < 30 else "normalised"
        return f"non-integer values (e.g. {fractional[0]:.4g}), looks {kind}"
    return None


def check_counts(block, path, location, rows):
    problem = values_problem(block.data)
    if problem is None:
        return
    bad_value = ~np.isfinite(block.data) | (block.data < 0) | (block.data != np.round(block.data))
    first_bad_row = rows[np.searchsorted(block.indptr, np.flatnonzero(bad_value)[0], side="right") - 1]
    raise DatasetError(
        path, f"{location} row {first_bad_row} (in rows read [{rows[0]}, {rows[-1] + 1})) holds {problem}"
    )


def short_reason(err):
    """The informative part of an (h5py) error message, one line."""
    message = " ".join(str(err).split())
    if "(" in message and message.endswith(")"):
        message = message[message.index("(") + 1 : -1]
    return message or type(err).__name__


# ----------------------------------------------------------------------------- helpers


def table_count_matrix(path, location, cells, var, rows_source, file, findings=()):
    """A CountMatrix of a format without obs/uns, after checking its first rows hold raw counts."""
    n_cells, n_genes = len(cells), len(var)
    check_shape(path, location, n_cells, n_genes)
    findings = list(findings) + duplicated_names(cells, "cell ids")
    matrix = CountMatrix(
        path=path,
        n_cells=n_cells,
        n_genes=n_genes,
        obs_names=cells.to_numpy(dtype=object),
        obs=pd.DataFrame(index=cells),
        var=var,
        uns_organism=None,
        counts_location=location,
        warnings=findings,
        _file=file,
        _rows_source=rows_source,
    )
    n_sample = min(n_cells, N_SAMPLE_ROWS, max(1, N_SAMPLE_VALUES // n_genes))
    problem = values_problem(matrix._read(slice(0, n_sample), f"rows [0, {n_sample})").data)
    if problem:
        raise DatasetError(path, f"{location} holds {problem}; scPRINT-2 needs raw counts")
    return matrix


def check_shape(path, location, n_cells, n_genes):
    """Refuse a matrix without cells or without genes."""
    if n_cells == 0:
        raise DatasetError(path, f"has no cells ({location} has 0 rows)")
    if n_genes == 0:
        raise DatasetError(path, f"has no genes ({location} has 0 columns)")


def duplicated_names(names, what):
    """A finding when cell names repeat (cells are identified by their row, so they are kept)."""
    n_duplicated = int(pd.Index(names).duplicated().sum())
    return [f"{n_duplicated} duplicated {what}; cells are identified by their row"] if n_duplicated else []


@contextmanager
def closed_on_error(path, what, handle=None):
    """Close ``handle`` if the block raises; turn reading errors into a one-line DatasetError."""
    try:
        yield
    except BaseException as err:
        if handle is not None:
            handle.close()
        if isinstance(err, (OSError, KeyError, ValueError, TypeError, RuntimeError, zipfile.BadZipFile)) and not (
            isinstance(err, DatasetError)
        ):
            raise DatasetError(path, f"cannot be read as {what}: {short_reason(err)}") from err
        raise


def check_only_location(path, counts, location, what):
    if counts not in ("auto", location):
        raise DatasetError(path, f"has no count matrix at {counts}: it is {what}, whose counts are in {location}")


def in_memory_findings(path, location, n_stored):
    if n_stored <= CSC_WARNING_VALUES:
        return []
    message = f"{location} holds {n_stored:,} stored values, read into memory by each reading process"
    log.warning("%s: %s", path, message)
    return [message]


def as_text(values):
    """Names read from HDF5 (bytes or str, array or scalar) as str (an object array for arrays)."""
    if isinstance(values, (bytes, np.bytes_)):
        return values.decode()
    if isinstance(values, str):
        return values
    values = np.asarray(values)
    if values.dtype.kind == "S":
        return np.char.decode(values, "utf-8").astype(object)
    return np.array([v.decode() if isinstance(v, bytes) else str(v) for v in values.reshape(-1)], dtype=object)


def check_readable(path):
    """Raise a DatasetError if ``path`` does not exist or cannot be read."""
    if not os.path.exists(path):
        raise DatasetError(path, "file does not exist")
    try:
        if os.path.isdir(path):
            os.listdir(path)
        else:
            with open(path, "rb"):
                pass
    except PermissionError:
        raise DatasetError(path, "is not readable (permission denied)") from None
    except OSError as err:
        raise DatasetError(path, f"is not readable ({short_reason(err)})") from err


def open_hdf5(path):
    """An HDF5 file opened for reading, with a DatasetError naming what it is if it is not one."""
    check_readable(path)
    if os.path.isdir(path):
        raise DatasetError(path, "is a directory, not an h5ad file")
    if not h5py.is_hdf5(path):
        raise DatasetError(path, "is not an h5ad file (not HDF5)")
    return open_hdf5_file(path)


def open_hdf5_file(path):
    """``h5py.File(path, 'r')``, with a DatasetError for a truncated or corrupt file."""
    try:
        return h5py.File(path, "r")
    except OSError as err:
        raise DatasetError(path, f"is a truncated or corrupt HDF5 file ({short_reason(err)})") from err


def is_array(element):
    """A dense array of an HDF5 file or zarr store (not a group holding a sparse matrix)."""
    return isinstance(element, (h5py.Dataset, zarr.Array))
