"""Cells x genes tables: pandas HDF5 (``DataFrame.to_hdf``, e.g. Kaggle's ``train_cite_inputs.h5``) and
``xxx_values.sparse(.npz)`` + ``xxx_idxcol.npz`` pairs (their common sparse conversion).

Columns are genes (``ENSG..._SYMBOL`` columns give Ensembl ids), the index is
the cell ids. ``fixed`` frames are read by rows with h5py, ``table`` frames
with pandas; a sparse pair is loaded once per reading process.
"""

from __future__ import annotations

import os
import pickle
import zipfile
from typing import ClassVar

import h5py
import numpy as np
import pandas as pd
import scipy.sparse as sp
from pandas.api.types import is_numeric_dtype

from pipeline.io.files import read_npy_header
from pipeline.io.genes import to_ensembl
from pipeline.io.matrix import (
    DatasetError,
    as_text,
    check_not_peaks,
    check_only_location,
    check_readable,
    closed_on_error,
    in_memory_findings,
    open_hdf5_file,
    read_dense_rows,
    short_reason,
    table_count_matrix,
)

#: Names of the values file of a sparse pair (scipy's save_npz appends .npz), and of its partner.
SPARSE_VALUES_SUFFIXES = ("_values.sparse.npz", "_values.sparse")


SPARSE_NAMES_SUFFIX = "_idxcol.npz"


#: Kaggle gene columns: Ensembl gene id, underscore, symbol (``ENSG00000121410_A1BG``).
#: A table whose columns are symbols must have at least this fraction of known human or mouse symbols.
MIN_GENE_SYMBOL_FRACTION = 0.5
ENSEMBL_SYMBOL_COLUMN = r"^(ENS[A-Z]*G\d{11})(?:\.\d+)?_(.+)$"


def sparse_pair_paths(path):
    """(values file, names file) of a sparse pair named by either file, or None for other names.

    ``xxx_values.sparse`` also finds ``xxx_values.sparse.npz``, the name
    ``scipy.sparse.save_npz('xxx_values.sparse', ...)`` really writes.
    """
    for suffix in (*SPARSE_VALUES_SUFFIXES, SPARSE_NAMES_SUFFIX):
        if path.endswith(suffix):
            stem = path[: -len(suffix)]
            candidates = [path] if suffix != SPARSE_NAMES_SUFFIX else []
            candidates += [stem + s for s in SPARSE_VALUES_SUFFIXES]
            values = next((c for c in candidates if os.path.exists(c)), candidates[0])
            return values, stem + SPARSE_NAMES_SUFFIX
    return None


def pandas_objects(h5_file):
    """``{key: pandas_type}`` of the pandas objects (``frame``, ``frame_table``, ``series``...) of an HDF5 file."""
    found = {}

    def visit(name, obj):
        kind = obj.attrs.get("pandas_type") if isinstance(obj, h5py.Group) else None
        if kind is not None:
            found[name] = as_text(kind)

    h5_file.visititems(visit)
    return found


def open_pandas_table(path, counts="auto"):
    """Open a pandas HDF5 table of cells x genes (``DataFrame.to_hdf``, fixed or table format).

    ``counts`` is ``'auto'`` (the file's only table) or the table's key. The
    index gives the cell ids; the columns the genes (``ENSG..._SYMBOL``
    columns are split into ``var['gene_ids']`` and ``var['gene_symbols']``).
    Tables of ATAC peaks or of protein names are refused.
    """
    h5_file = open_hdf5_file(path)
    with closed_on_error(path, "a pandas HDF5 table", h5_file):
        objects = pandas_objects(h5_file)
        key = _choose_table(path, objects, counts)
        if objects[key] == "frame":
            return _open_fixed_frame(path, h5_file, key)
    h5_file.close()
    if objects[key] != "frame_table":
        raise DatasetError(path, f"{key} is a pandas {objects[key]}, not a table of cells x genes")
    with closed_on_error(path, "a pandas HDF5 table"), pd.HDFStore(path, mode="r") as store:
        head = store.select(key, start=0, stop=0)
        index = store.select_column(key, "index")
    _check_numeric(path, key, head.dtypes)
    cells = pd.Index(index.to_numpy(dtype=object).astype(str), name=head.index.name)
    var = table_var(path, head.columns)
    rows = _DenseRows([_TableArray(path, key, (len(cells), len(var)))])
    return table_count_matrix(path, key, cells, var, rows, None)


def open_sparse_pair(path, counts="auto"):
    """Open an ``xxx_values.sparse(.npz)`` + ``xxx_idxcol.npz`` pair (given by either file).

    The values (``scipy.sparse.load_npz``) are loaded into memory; ``index``
    and ``columns`` of the names file give the cell ids and the genes (object
    arrays are unpickled with numpy types only). ``counts`` is ``'auto'`` or
    the values file's name.
    """
    values_path, names_path = sparse_pair_paths(path)
    location = os.path.basename(values_path)
    check_only_location(path, counts, location, "a sparse pair")
    if not os.path.exists(values_path) and not os.path.exists(names_path):
        raise DatasetError(path, "file does not exist")
    for partner in (values_path, names_path):
        if not os.path.exists(partner):
            raise DatasetError(path, f"its partner {os.path.basename(partner)} does not exist (a sparse pair is "
                               "xxx_values.sparse.npz + xxx_idxcol.npz)")  # fmt: skip
        check_readable(partner)
    with closed_on_error(path, "a sparse pair"):
        values = sp.load_npz(values_path).tocsr()
        cells, genes = _npz_names(names_path, "index"), _npz_names(names_path, "columns")
    if values.shape != (len(cells), len(genes)):
        raise DatasetError(path, f"{location} is {values.shape[0]} x {values.shape[1]}, but {os.path.basename(names_path)} "
                           f"names {len(cells)} cells and {len(genes)} columns")  # fmt: skip
    var = table_var(path, genes)
    findings = in_memory_findings(path, location, values.nnz)
    return table_count_matrix(path, location, pd.Index(cells, name="cell_id"), var, values, None, findings)


# ----------------------------------------------------------------------------- genes of tables


def table_var(path, columns):
    """The var table of a cells x genes table's columns; refuses columns that are not genes.

    Parameters
    ----------
    path : str
        The dataset, for error messages.
    columns : array of str
        Column names: Ensembl ids, symbols, or Kaggle's ``ENSG..._SYMBOL``.

    Returns
    -------
    pd.DataFrame
        Indexed by the column names; ``gene_ids`` and ``gene_symbols`` columns
        when the names are ``ENSG..._SYMBOL``.

    Raises
    ------
    DatasetError
        The columns look like ATAC peaks (``chr1:9776-10668``), or are symbols
        of which fewer than half match a human or mouse gene (protein panels).
    """
    names = pd.Index(np.asarray(columns, dtype=object).astype(str))
    check_not_peaks(path, names)
    var = pd.DataFrame(index=names)
    parsed = names.str.extract(ENSEMBL_SYMBOL_COLUMN)
    if parsed[0].notna().mean() >= 0.5:
        var["gene_ids"] = parsed[0].fillna("").to_numpy(dtype=object)
        var["gene_symbols"] = parsed[1].fillna("").to_numpy(dtype=object)
        return var
    ids = to_ensembl(var)
    known = ids.ids != ""
    if ids.source.startswith("symbols") and known.mean() < MIN_GENE_SYMBOL_FRACTION:
        examples = ", ".join(names[~known][:3])
        raise DatasetError(path, f"looks like protein (antibody) names, not RNA: only {int(known.sum())} of its "
                           f"{len(names)} columns are human or mouse gene symbols (not: {examples}); scPRINT-2 embeds "
                           "gene expression")  # fmt: skip
    return var


# ----------------------------------------------------------------------------- row readers


class _DenseRows:
    """Rows of a table stored as dense arrays of columns (pandas blocks), as CSR, in the table's column order."""

    def __init__(self, arrays, order=None):
        self.arrays, self.order = arrays, order

    def __getitem__(self, selection):
        rows = np.arange(selection.start, selection.stop) if isinstance(selection, slice) else np.asarray(selection)
        parts = [read_dense_rows(array, rows) for array in self.arrays]
        block = parts[0] if len(parts) == 1 else sp.hstack(parts, format="csr")
        return block if self.order is None else block[:, self.order]


class _TableArray:
    """A pandas ``table``-format frame seen as a dense array: ``[start:stop]`` or ``[sorted rows]``.

    The file is opened for each read (a few ms): PyTables handles left open
    warn at exit and do not survive a fork.
    """

    def __init__(self, path, key, shape):
        self.path, self.key, self.shape = path, key, shape

    def __getitem__(self, selection):
        with pd.HDFStore(self.path, mode="r") as store:
            if isinstance(selection, slice):
                frame = store.select(self.key, start=selection.start, stop=selection.stop)
            else:
                frame = store.select(self.key, where=np.asarray(selection))
        return frame.to_numpy(dtype=np.float32)


def _choose_table(path, objects, counts):
    if counts == "auto":
        frames = [key for key, kind in objects.items() if kind.startswith("frame")]
        if len(frames) == 1:
            return frames[0]
        raise DatasetError(path, f"holds {len(frames)} pandas tables ({', '.join(frames) or 'none'}); name one with "
                           "data.counts=<key> or a catalog's counts column")  # fmt: skip
    key = counts.strip("/")
    if key not in objects:
        raise DatasetError(path, f"has no pandas table {key} (it holds {', '.join(objects)})")
    return key


def _open_fixed_frame(path, h5_file, key):
    """A pandas ``fixed`` frame: axis0 = columns, axis1 = index, one dense (rows x items) array per dtype block."""
    group = h5_file[key]
    columns, cells = as_text(group["axis0"][:]), as_text(group["axis1"][:])
    blocks, items = [], []
    for i in range(int(group.attrs["nblocks"])):
        values, names = group[f"block{i}_values"], as_text(group[f"block{i}_items"][:])
        if not isinstance(values, h5py.Dataset) or values.dtype.kind not in "biuf":
            raise DatasetError(path, f"{key} has non-numeric columns (e.g. {names[0]}); counts are numbers")
        if values.shape != (len(cells), len(names)):
            raise DatasetError(path, f"{key}/block{i}_values is {values.shape}, not {len(cells)} rows x {len(names)}")
        blocks.append(values)
        items.append(names)
    order = pd.Index(np.concatenate(items)).get_indexer(columns)
    var = table_var(path, columns)
    rows = _DenseRows(blocks, None if np.array_equal(order, np.arange(len(columns))) else order)
    name = group["axis1"].attrs.get("name")
    cells = pd.Index(cells, name=as_text(name) if isinstance(name, (bytes, str)) else None)
    return table_count_matrix(path, key, cells, var, rows, h5_file)


def _check_numeric(path, key, dtypes):
    text_columns = [str(column) for column, dtype in dtypes.items() if not is_numeric_dtype(dtype)]
    if text_columns:
        raise DatasetError(path, f"{key} has non-numeric columns (e.g. {text_columns[0]}); counts are numbers")


class _NamesUnpickler(pickle.Unpickler):
    """Unpickles numpy object arrays of names, and nothing else (no code from a data file runs)."""

    ALLOWED: ClassVar[dict] = {
        "_reconstruct": np.zeros(0).__reduce__()[0],
        "scalar": np.int64(0).__reduce__()[0],
        "ndarray": np.ndarray,
        "dtype": np.dtype,
    }

    def find_class(self, module, name):
        if module.split(".")[0] == "numpy" and name in self.ALLOWED:
            return self.ALLOWED[name]
        raise pickle.UnpicklingError(f"{module}.{name} is not allowed in a list of names")


def _npz_names(path, key):
    """Array ``key`` of an ``.npz`` file as str; object arrays (np.savez of pandas indexes) are unpickled safely."""
    try:
        with np.load(path, allow_pickle=False) as npz:
            if key not in npz.files:
                raise DatasetError(path, f"has no array {key!r} (it has {', '.join(npz.files)})")
            return npz[key].astype(str).astype(object)
    except ValueError as err:
        if "allow_pickle" not in str(err):
            raise
    with zipfile.ZipFile(path) as archive, archive.open(f"{key}.npy") as member:
        read_npy_header(member)
        try:
            array = _NamesUnpickler(member).load()
        except (pickle.UnpicklingError, EOFError, AttributeError) as err:
            raise DatasetError(path, f"array {key!r} cannot be read as names ({short_reason(err)})") from err
    return np.asarray(array).astype(str).astype(object)
