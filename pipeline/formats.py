"""Count-matrix formats besides AnnData: 10x, pandas HDF5 tables, sparse ``.npz`` pairs.

Each ``open_*`` function returns a :class:`pipeline.readers.CountMatrix` (the
interface the pipeline reads every dataset through), checked like an h5ad file:
the first rows must hold raw counts (finite, non-negative whole numbers), and
every block read later is checked again. :func:`detect_format` tells the
format from the content; ``pipeline.readers.open_counts`` dispatches on it.

Formats, and where their counts are (``counts_location``):

- 10x Cell Ranger ``.h5`` (v3 ``matrix`` group, or v2 ``<genome>`` group):
  read by rows straight from the file; only ``Gene Expression`` features.
- 10x matrix directory (``matrix.mtx(.gz)``, ``barcodes.tsv(.gz)``,
  ``features.tsv(.gz)`` or v2 ``genes.tsv``): Matrix Market text cannot be read
  by rows, so it is loaded into memory once (per reading process).
- pandas HDF5 (``DataFrame.to_hdf``, e.g. the Kaggle Open Problems 2022
  ``train_cite_inputs.h5``): cells x genes, index = cell ids, columns = genes
  (``ENSG00000121410_A1BG`` style columns give Ensembl ids). ``fixed`` frames
  are read by rows with h5py, ``table`` frames with pandas; never whole.
  The location is the table's key.
- ``xxx_values.sparse(.npz)`` (``scipy.sparse.save_npz``) + ``xxx_idxcol.npz``
  (``index`` = cell ids, ``columns`` = genes), the common sparse conversion of
  those pandas files: loaded into memory once (per reading process).
"""

import logging
import os
import pickle
import zipfile
from contextlib import contextmanager
from typing import ClassVar

import h5py
import numpy as np
import pandas as pd
import scipy.io
import scipy.sparse as sp
from pandas.api.types import is_numeric_dtype

from pipeline.genes import to_ensembl
from pipeline.readers import (
    CSC_WARNING_VALUES,
    N_SAMPLE_ROWS,
    N_SAMPLE_VALUES,
    CountMatrix,
    CSRRows,
    DatasetError,
    _read_dense_rows,
    _short_reason,
    _values_problem,
    check_not_peaks,
    check_readable,
    open_anndata,
    open_hdf5_file,
)

log = logging.getLogger(__name__)

#: Formats :func:`detect_format` names, as a phrase for error messages.
KNOWN_FORMATS = (
    "h5ad, AnnData zarr, 10x .h5 or matrix.mtx directory, pandas .h5 table, _values.sparse + _idxcol.npz pair"
)
#: Names of the values file of a sparse pair (scipy's save_npz appends .npz), and of its partner.
SPARSE_VALUES_SUFFIXES = ("_values.sparse.npz", "_values.sparse")
SPARSE_NAMES_SUFFIX = "_idxcol.npz"
#: Kaggle gene columns: Ensembl gene id, underscore, symbol (``ENSG00000121410_A1BG``).
ENSEMBL_SYMBOL_COLUMN = r"^(ENS[A-Z]*G\d{11})(?:\.\d+)?_(.+)$"
#: 10x feature type of the RNA features.
GENE_EXPRESSION = "Gene Expression"
#: A table whose columns are symbols is refused as non-RNA (e.g. proteins) when fewer of them match a gene.
MIN_GENE_SYMBOL_FRACTION = 0.5


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
        ``'10x_mtx'``, ``'pandas_h5'`` or ``'sparse_pair'``.

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
            raise DatasetError(path, "is a directory, but neither a zarr store (no .zgroup or zarr.json) nor a 10x "
                               "matrix directory (no matrix.mtx.gz)")  # fmt: skip
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
        if _tenx_v2_group(h5_file) is not None:
            return "10x_h5"
    raise DatasetError(path, "is HDF5 of no layout scatlas reads (no obs/var of h5ad, no matrix group of 10x, "
                       "no pandas table)")  # fmt: skip


def directory_format(path):
    """``'zarr'`` or ``'10x_mtx'`` for a directory that is one dataset, else None."""
    names = set(os.listdir(path))
    if names & {".zgroup", "zarr.json"}:
        return "zarr"
    if names & {"matrix.mtx.gz", "matrix.mtx"}:
        return "10x_mtx"
    return None


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
            found[name] = _text(kind)

    h5_file.visititems(visit)
    return found


# ----------------------------------------------------------------------------- openers


def open_10x_h5(path, counts="auto"):
    """Open a 10x Cell Ranger ``.h5`` feature-barcode matrix (v3 ``matrix`` group, or v2).

    Rows are read from the file's CSC-by-barcode arrays; only the ``Gene
    Expression`` features are kept (other feature types are named in the
    matrix's warnings). ``counts`` is ``'auto'`` or the group (``'matrix'``).
    """
    h5_file = open_hdf5_file(path)
    with _closed_on_error(path, "a 10x HDF5 file", h5_file):
        group_name = "matrix" if "matrix" in h5_file else _tenx_v2_group(h5_file)
        _check_only_location(path, counts, group_name, "a 10x HDF5 file")
        group = h5_file[group_name]
        n_features, n_barcodes = (int(n) for n in group["shape"][:2])
        barcodes = _text(group["barcodes"][:])
        if "features" in group:
            features = group["features"]
            ids, names = _text(features["id"][:]), _text(features["name"][:])
            types = _text(features["feature_type"][:]) if "feature_type" in features else None
        else:  # Cell Ranger 2
            ids, names, types = _text(group["genes"][:]), _text(group["gene_names"][:]), None
        n_columns = group["indptr"].shape[0] - 1
        if (len(ids), len(barcodes), n_columns) != (n_features, n_barcodes, n_barcodes):
            raise DatasetError(path, f"{group_name}/shape is {n_features} features x {n_barcodes} barcodes, but it lists "
                               f"{len(ids)} features, {len(barcodes)} barcodes and {n_columns} indptr columns")  # fmt: skip
        var, keep, findings = _tenx_var(path, ids, names, types)
        rows = CSRRows(group["data"], group["indices"], group["indptr"], n_features, keep)
        return _count_matrix(path, group_name, pd.Index(barcodes, name="barcode"), var, rows, h5_file, findings)


def open_10x_mtx(path, counts="auto"):
    """Open a 10x matrix directory (``matrix.mtx(.gz)``, ``barcodes.tsv(.gz)``, ``features.tsv(.gz)``/``genes.tsv``).

    The Matrix Market file is read into memory once; only ``Gene Expression``
    features are kept. ``counts`` is ``'auto'`` or the matrix file's name.
    """
    files = {what: _first_file(path, names) for what, names in (
        ("matrix", ("matrix.mtx.gz", "matrix.mtx")),
        ("barcodes", ("barcodes.tsv.gz", "barcodes.tsv")),
        ("features", ("features.tsv.gz", "features.tsv", "genes.tsv.gz", "genes.tsv")),
    )}  # fmt: skip
    location = os.path.basename(files["matrix"])
    _check_only_location(path, counts, location, "a 10x matrix directory")
    for what in ("barcodes", "features"):
        if not os.path.exists(files[what]):
            raise DatasetError(path, f"has {location} but no {what}.tsv.gz (a 10x matrix directory needs both)")
    with _closed_on_error(path, "a 10x matrix directory"):
        barcodes = pd.read_csv(files["barcodes"], sep="\t", header=None, dtype=str, keep_default_na=False)[0]
        features = pd.read_csv(files["features"], sep="\t", header=None, dtype=str, keep_default_na=False)
        matrix = scipy.io.mmread(files["matrix"])
    n_features, n_barcodes = matrix.shape
    if (len(features), len(barcodes)) != (n_features, n_barcodes):
        raise DatasetError(path, f"{location} is {n_features} features x {n_barcodes} barcodes, but "
                           f"{os.path.basename(files['features'])} has {len(features)} rows and "
                           f"{os.path.basename(files['barcodes'])} {len(barcodes)}")  # fmt: skip
    ids = features[0].to_numpy(dtype=object)
    names = features[1].to_numpy(dtype=object) if features.shape[1] > 1 else ids
    types = features[2].to_numpy(dtype=object) if features.shape[1] > 2 else None
    var, keep, findings = _tenx_var(path, ids, names, types)
    rows = sp.csr_matrix(matrix.T)
    if keep is not None:
        rows = rows[:, keep]
    findings += _in_memory_findings(path, location, rows.nnz)
    return _count_matrix(path, location, pd.Index(barcodes.to_numpy(dtype=object), name="barcode"), var, rows,
                         None, findings)  # fmt: skip


def open_pandas_table(path, counts="auto"):
    """Open a pandas HDF5 table of cells x genes (``DataFrame.to_hdf``, fixed or table format).

    ``counts`` is ``'auto'`` (the file's only table) or the table's key. The
    index gives the cell ids; the columns the genes (``ENSG..._SYMBOL``
    columns are split into ``var['gene_ids']`` and ``var['gene_symbols']``).
    Tables of ATAC peaks or of protein names are refused.
    """
    h5_file = open_hdf5_file(path)
    with _closed_on_error(path, "a pandas HDF5 table", h5_file):
        objects = pandas_objects(h5_file)
        key = _choose_table(path, objects, counts)
        if objects[key] == "frame":
            return _open_fixed_frame(path, h5_file, key)
    h5_file.close()
    if objects[key] != "frame_table":
        raise DatasetError(path, f"{key} is a pandas {objects[key]}, not a table of cells x genes")
    with _closed_on_error(path, "a pandas HDF5 table"), pd.HDFStore(path, mode="r") as store:
        head = store.select(key, start=0, stop=0)
        index = store.select_column(key, "index")
    _check_numeric(path, key, head.dtypes)
    cells = pd.Index(index.to_numpy(dtype=object).astype(str), name=head.index.name)
    var = table_var(path, head.columns)
    rows = _DenseRows([_TableArray(path, key, (len(cells), len(var)))])
    return _count_matrix(path, key, cells, var, rows, None)


def open_sparse_pair(path, counts="auto"):
    """Open an ``xxx_values.sparse(.npz)`` + ``xxx_idxcol.npz`` pair (given by either file).

    The values (``scipy.sparse.load_npz``) are loaded into memory; ``index``
    and ``columns`` of the names file give the cell ids and the genes (object
    arrays are unpickled with numpy types only). ``counts`` is ``'auto'`` or
    the values file's name.
    """
    values_path, names_path = sparse_pair_paths(path)
    location = os.path.basename(values_path)
    _check_only_location(path, counts, location, "a sparse pair")
    if not os.path.exists(values_path) and not os.path.exists(names_path):
        raise DatasetError(path, "file does not exist")
    for partner in (values_path, names_path):
        if not os.path.exists(partner):
            raise DatasetError(path, f"its partner {os.path.basename(partner)} does not exist (a sparse pair is "
                               "xxx_values.sparse.npz + xxx_idxcol.npz)")  # fmt: skip
        check_readable(partner)
    with _closed_on_error(path, "a sparse pair"):
        values = sp.load_npz(values_path).tocsr()
        cells, genes = _npz_names(names_path, "index"), _npz_names(names_path, "columns")
    if values.shape != (len(cells), len(genes)):
        raise DatasetError(path, f"{location} is {values.shape[0]} x {values.shape[1]}, but {os.path.basename(names_path)} "
                           f"names {len(cells)} cells and {len(genes)} columns")  # fmt: skip
    var = table_var(path, genes)
    findings = _in_memory_findings(path, location, values.nnz)
    return _count_matrix(path, location, pd.Index(cells, name="cell_id"), var, values, None, findings)


#: :func:`detect_format`'s answer -> the function that opens that format.
OPENERS = {
    "h5ad": open_anndata,
    "zarr": open_anndata,
    "10x_h5": open_10x_h5,
    "10x_mtx": open_10x_mtx,
    "pandas_h5": open_pandas_table,
    "sparse_pair": open_sparse_pair,
}


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


def _tenx_var(path, ids, names, types):
    """(var of the Gene Expression features, their column positions or None for all, findings)."""
    types = np.full(len(ids), GENE_EXPRESSION, dtype=object) if types is None else types
    var = pd.DataFrame({"gene_symbols": names, "feature_types": types}, index=pd.Index(ids, name="gene_ids"))
    is_rna = types == GENE_EXPRESSION
    if is_rna.all():
        return var, None, []
    kinds = pd.Series(types[~is_rna]).value_counts()
    if not is_rna.any():
        if set(kinds.index) == {"Peaks"}:
            raise DatasetError(path, "looks like ATAC peaks, not RNA (all its features are Peaks): scPRINT-2 embeds "
                               "gene expression")  # fmt: skip
        raise DatasetError(path, f"has no {GENE_EXPRESSION} features (only {', '.join(kinds.index)}): scPRINT-2 "
                           "embeds gene expression")  # fmt: skip
    left_out = ", ".join(f"{n} {kind}" for kind, n in kinds.items())
    finding = f"kept the {int(is_rna.sum())} {GENE_EXPRESSION} features; left out {left_out}"
    return var[is_rna], np.flatnonzero(is_rna), [finding]


# ----------------------------------------------------------------------------- row readers


class _DenseRows:
    """Rows of a table stored as dense arrays of columns (pandas blocks), as CSR, in the table's column order."""

    def __init__(self, arrays, order=None):
        self.arrays, self.order = arrays, order

    def __getitem__(self, selection):
        rows = np.arange(selection.start, selection.stop) if isinstance(selection, slice) else np.asarray(selection)
        parts = [_read_dense_rows(array, rows) for array in self.arrays]
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


# ----------------------------------------------------------------------------- helpers


def _count_matrix(path, location, cells, var, rows_source, file, findings=()):
    """A CountMatrix of a format without obs/uns, after checking its first rows hold raw counts."""
    n_cells, n_genes = len(cells), len(var)
    if n_cells == 0:
        raise DatasetError(path, f"has no cells ({location} has 0 rows)")
    if n_genes == 0:
        raise DatasetError(path, f"has no genes ({location} has 0 columns)")
    findings = list(findings)
    n_duplicated = int(cells.duplicated().sum())
    if n_duplicated:
        findings.append(f"{n_duplicated} duplicated cell ids; cells are identified by their row")
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
    problem = _values_problem(matrix._read(slice(0, n_sample), f"rows [0, {n_sample})").data)
    if problem:
        raise DatasetError(path, f"{location} holds {problem}; scPRINT-2 needs raw counts")
    return matrix


@contextmanager
def _closed_on_error(path, what, handle=None):
    """Close ``handle`` if the block raises; turn reading errors into a one-line DatasetError."""
    try:
        yield
    except BaseException as err:
        if handle is not None:
            handle.close()
        if isinstance(err, (OSError, KeyError, ValueError, TypeError, RuntimeError, zipfile.BadZipFile)) and not (
            isinstance(err, DatasetError)
        ):
            raise DatasetError(path, f"cannot be read as {what}: {_short_reason(err)}") from err
        raise


def _check_only_location(path, counts, location, what):
    if counts not in ("auto", location):
        raise DatasetError(path, f"has no count matrix at {counts}: it is {what}, whose counts are in {location}")


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
    columns, cells = _text(group["axis0"][:]), _text(group["axis1"][:])
    blocks, items = [], []
    for i in range(int(group.attrs["nblocks"])):
        values, names = group[f"block{i}_values"], _text(group[f"block{i}_items"][:])
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
    cells = pd.Index(cells, name=_text(name) if isinstance(name, (bytes, str)) else None)
    return _count_matrix(path, key, cells, var, rows, h5_file)


def _check_numeric(path, key, dtypes):
    text_columns = [str(column) for column, dtype in dtypes.items() if not is_numeric_dtype(dtype)]
    if text_columns:
        raise DatasetError(path, f"{key} has non-numeric columns (e.g. {text_columns[0]}); counts are numbers")


def _tenx_v2_group(h5_file):
    return next((name for name, group in h5_file.items() if isinstance(group, h5py.Group)
                 and {"barcodes", "genes", "indptr"} <= set(group)), None)  # fmt: skip


def _first_file(folder, names):
    """The first of ``names`` that exists in ``folder``, else the first name (for messages)."""
    paths = [os.path.join(folder, name) for name in names]
    return next((p for p in paths if os.path.exists(p)), paths[0])


def _in_memory_findings(path, location, n_stored):
    if n_stored <= CSC_WARNING_VALUES:
        return []
    message = f"{location} holds {n_stored:,} stored values, read into memory by each reading process"
    log.warning("%s: %s", path, message)
    return [message]


def _text(values):
    """Names read from HDF5 (bytes or str, array or scalar) as str (an object array for arrays)."""
    if isinstance(values, (bytes, np.bytes_)):
        return values.decode()
    if isinstance(values, str):
        return values
    values = np.asarray(values)
    if values.dtype.kind == "S":
        return np.char.decode(values, "utf-8").astype(object)
    return np.array([v.decode() if isinstance(v, bytes) else str(v) for v in values.reshape(-1)], dtype=object)


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
        version = np.lib.format.read_magic(member)
        read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        read_header(member)
        try:
            array = _NamesUnpickler(member).load()
        except (pickle.UnpicklingError, EOFError, AttributeError) as err:
            raise DatasetError(path, f"array {key!r} cannot be read as names ({_short_reason(err)})") from err
    return np.asarray(array).astype(str).astype(object)
