"""Which format a dataset is, and :func:`open_counts`, the one way the pipeline opens a dataset.

Formats and where their counts are (``counts_location``): AnnData h5ad / zarr
(``X``, ``raw/X``, ``layers/<name>``; :mod:`pipeline.io.h5ad`), 10x ``.h5`` and
``matrix.mtx`` directories (:mod:`pipeline.io.tenx`), pandas HDF5 tables (the
table's key) and sparse ``.npz`` pairs (:mod:`pipeline.io.tables`), TileDB-SOMA
experiments (``ms/<measurement>/X/<layer>``; :mod:`pipeline.io.soma`).
"""

from __future__ import annotations

import functools
import logging
import os

import h5py

from pipeline.io.h5ad import open_anndata
from pipeline.io.matrix import DatasetError, check_readable, open_hdf5_file
from pipeline.io.soma import is_soma_experiment, open_soma
from pipeline.io.tables import open_pandas_table, open_sparse_pair, pandas_objects, sparse_pair_paths
from pipeline.io.tenx import genome_groups, open_10x_h5, open_10x_mtx

log = logging.getLogger(__name__)


#: Formats :func:`detect_format` names, as a phrase for error messages.
KNOWN_FORMATS = (
    "h5ad, AnnData zarr, 10x .h5 or matrix.mtx directory, pandas .h5 table, _values.sparse + _idxcol.npz pair, "
    "TileDB-SOMA experiment"
)


def detect_format(path):
    """The format of a dataset, from its content.

    Parameters
    ----------
    path : str
        A file or directory.

    Returns
    -------
    str
        A key of :data:`OPENERS`: ``'h5ad'``, ``'zarr'``, ``'10x_h5'``,
        ``'10x_mtx'``, ``'pandas_h5'``, ``'sparse_pair'`` or ``'soma'``.

    Raises
    ------
    DatasetError
        Missing, unreadable, or of no known format.
    """
    if sparse_pair_paths(path) is not None:
        return "sparse_pair"
    check_readable(path)
    if os.path.isdir(path):
        kind = directory_format(path)
        if kind is None:
            raise DatasetError(path, "is a directory, but neither a zarr store (no .zgroup or zarr.json), a 10x "
                               "matrix directory (no matrix.mtx.gz) nor a TileDB-SOMA experiment (no "
                               "__tiledb_group.tdb with obs and ms)")  # fmt: skip
        return kind
    if not h5py.is_hdf5(path):
        if path.endswith(".h5ad"):
            raise DatasetError(path, "is not an h5ad file (not HDF5)")
        raise DatasetError(path, f"is of no format scatlas reads (not HDF5; it reads {KNOWN_FORMATS})")
    with open_hdf5_file(path) as h5_file:
        if isinstance(h5_file.get("matrix"), h5py.Group):
            return "10x_h5"
        if ("obs" in h5_file and "var" in h5_file) or path.endswith(".h5ad"):
            return "h5ad"
        if pandas_objects(h5_file):
            return "pandas_h5"
        if genome_groups(h5_file):
            return "10x_h5"
    raise DatasetError(path, "is HDF5 of no layout scatlas reads (no obs/var of h5ad, no matrix group of 10x, "
                       "no pandas table)")  # fmt: skip


def dataset_stat(path):
    """(bytes, latest modification time in ns) of the files a dataset is made of: the file, both files of a sparse
    pair, or every file under a dataset directory (zarr store, 10x matrix directory)."""
    pair = sparse_pair_paths(path)
    if pair is not None:
        files = list(pair)
    elif os.path.isdir(path):
        files = [os.path.join(root, name) for root, _, names in os.walk(path) for name in names]
    else:
        files = [path]
    stats = [os.stat(f) for f in files if os.path.exists(f)]
    return sum(s.st_size for s in stats), max((s.st_mtime_ns for s in stats), default=0)


def genomes_of(path):
    """The genomes of a multi-genome (barnyard) Cell Ranger 1/2 ``.h5``, each a dataset; ``[]`` for any other input."""
    try:
        if os.path.isdir(path) or path.lower().endswith(".h5ad") or not h5py.is_hdf5(path):
            return []  # an h5ad is HDF5 too, but never a Cell Ranger file: not opened here
        with h5py.File(path, "r") as h5_file:
            genomes = [] if "matrix" in h5_file else genome_groups(h5_file)
    except (OSError, ValueError):  # missing or unreadable: open_counts names the problem
        return []
    return genomes if len(genomes) > 1 else []


def directory_format(path):
    """``'zarr'``, ``'10x_mtx'`` or ``'soma'`` for a directory that is one dataset, else None."""
    if is_soma_experiment(path):
        return "soma"
    names = set(os.listdir(path))
    if names & {".zgroup", "zarr.json"}:
        return "zarr"
    if names & {"matrix.mtx.gz", "matrix.mtx"}:
        return "10x_mtx"
    return None


#: :func:`detect_format`'s answer -> the function that opens that format.
OPENERS = {
    "h5ad": open_anndata,
    "zarr": open_anndata,
    "10x_h5": open_10x_h5,
    "10x_mtx": open_10x_mtx,
    "pandas_h5": open_pandas_table,
    "sparse_pair": open_sparse_pair,
    "soma": open_soma,
}


def open_counts(path, counts="auto", obs_filter=None):
    """Open a dataset's raw counts for reading in row blocks, whatever its format.

    The format is told from the content (see :func:`detect_format`):
    h5ad, AnnData zarr store, 10x ``.h5`` or ``matrix.mtx`` directory, pandas
    HDF5 table (Kaggle ``.h5``), ``_values.sparse`` + ``_idxcol.npz`` pair.

    Parameters
    ----------
    path : str or os.PathLike
        The dataset.
    counts : str
        Where the raw counts are: ``'auto'``, or a location of the format
        (``'X'``, ``'raw/X'``, ``'layers/<name>'`` for AnnData; the table's key
        for a pandas HDF5 file; an X layer (``raw`` or ``ms/RNA/X/raw``) for a
        SOMA experiment; the one location the other formats have).
    obs_filter : str, optional
        A TileDB-SOMA value filter on ``obs`` (``data.soma_filter``): a SOMA
        experiment is read for the cells it keeps. Other formats ignore it,
        with a warning in ``matrix.warnings``.

    Returns
    -------
    CountMatrix
        Open; close it, or use it as a context manager.

    Raises
    ------
    DatasetError
        The dataset is missing, unreadable, of no known format, corrupt, empty,
        not RNA (ATAC peaks, proteins), or holds no raw counts where ``counts``
        says (one line naming the file and the problem).
    ValueError
        ``counts`` is not a form an AnnData location can take.
    """
    path = os.fspath(path)
    kind = detect_format(path)
    if kind == "soma":
        matrix = open_soma(path, counts, obs_filter)
    else:
        matrix = OPENERS[kind](path, counts)
        if obs_filter:
            matrix.warnings.append(
                f"data.soma_filter={obs_filter!r} is ignored: it filters TileDB-SOMA experiments only"
            )
    # a pickled copy (a data-loader worker) reopens the same cells
    matrix._opener = functools.partial(open_counts, obs_filter=obs_filter) if obs_filter else open_counts
    return matrix
