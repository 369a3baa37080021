"""AnnData: h5ad files and zarr stores, read by rows (CSC matrices are converted in memory)."""

from __future__ import annotations

import json
import logging
import os
import warnings
from importlib.metadata import version

import anndata
import anndata.io
import numpy as np
import pandas as pd
import zarr

from pipeline.io.matrix import (
    CSC_WARNING_VALUES,
    N_SAMPLE_ROWS,
    N_SAMPLE_VALUES,
    CountMatrix,
    CSRRows,
    DatasetError,
    as_text,
    check_not_peaks,
    check_readable,
    check_shape,
    duplicated_names,
    is_array,
    open_hdf5,
    short_reason,
    values_problem,
)

log = logging.getLogger(__name__)


#: The first anndata and zarr-python releases that read zarr format 3 stores.
ZARR3_READERS = {"anndata": (0, 11), "zarr": (3, 0)}


#: zarr's reason is cut to this many characters: it can be a whole metadata structure.
ZARR_REASON_CHARS = 60


#: Where ``counts="auto"`` looks for raw counts, in order of preference.
AUTO_COUNT_LOCATIONS = ("layers/counts", "raw/X", "X")


def open_anndata(path, counts="auto"):
    """Open the raw counts of an h5ad file or AnnData zarr store for reading in row blocks.

    Parameters
    ----------
    path : str or os.PathLike
        The h5ad file or zarr directory.
    counts : str
        Where the raw counts are: ``'X'``, ``'raw/X'``, ``'layers/<name>'``,
        or ``'auto'`` to take the first of ``layers/counts``, ``raw/X``, ``X``
        whose first rows hold raw counts (finite, non-negative whole numbers).

    Returns
    -------
    CountMatrix
        Open; close it, or use it as a context manager.

    Raises
    ------
    DatasetError
        The file is missing, unreadable, not AnnData, corrupt, empty, holds ATAC
        peaks, or holds no raw counts where ``counts`` says (one line naming the
        file and the problem).
    ValueError
        ``counts`` is not one of the forms above.

    Notes
    -----
    Dense and CSR matrices are read lazily. A CSC matrix cannot be cut into
    rows efficiently, so it is converted once to an in-memory CSR matrix (a
    warning is logged above 1e8 stored values). Every block returned by
    :meth:`CountMatrix.read_rows` is checked again for raw counts.
    """
    path = os.fspath(path)
    if not isinstance(counts, str) or (
        counts not in ("auto", "X", "raw/X") and not (counts.startswith("layers/") and len(counts) > len("layers/"))
    ):
        raise ValueError(f"counts must be 'auto', 'X', 'raw/X' or 'layers/<name>', got {counts!r}")
    if os.path.isdir(path):
        root, h5_file, kind = _open_zarr(path), None, "AnnData zarr"
    else:
        root = h5_file = open_hdf5(path)
        kind = "h5ad"
    try:
        return _build_count_matrix(path, root, counts, kind, h5_file)
    except DatasetError:
        if h5_file is not None:
            h5_file.close()
        raise
    except (OSError, KeyError, RuntimeError, ValueError, TypeError) as err:
        if h5_file is not None:
            h5_file.close()
        raise _zarr_refusal(path, err) or DatasetError(path, f"cannot be read as {kind}: {short_reason(err)}") from err


def _open_zarr(path):
    check_readable(path)
    try:
        return zarr.open_group(path, mode="r")
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise _zarr_refusal(path, err) or DatasetError(
            path, f"is not a readable zarr store ({short_reason(err)})"
        ) from err


def _zarr_refusal(path, err):
    """The one-line refusal of a zarr format 3 store the installed anndata and zarr cannot read, else None.

    zarr's own message can be a whole metadata structure; what the user needs
    is the store's format and which anndata and zarr read it.
    """
    try:
        with open(os.path.join(path, "zarr.json")) as fh:
            zarr_format = json.load(fh).get("zarr_format")
    except (OSError, ValueError, AttributeError):
        return None
    if zarr_format != 3:
        return None
    installed = {name: version(name) for name in ZARR3_READERS}
    too_old = [name for name, first in ZARR3_READERS.items()
               if tuple(int(part) for part in installed[name].split(".")[:2] if part.isdigit()) < first]  # fmt: skip
    needed = " with ".join(f"{name} >= {'.'.join(map(str, first))}" for name, first in ZARR3_READERS.items())
    if not too_old:
        needed = "a newer anndata and zarr, probably those that wrote it"
    reason = short_reason(err)
    reason = reason if len(reason) <= ZARR_REASON_CHARS else reason[: ZARR_REASON_CHARS - 3] + "..."
    return DatasetError(path, f"is a zarr format 3 store that the installed anndata {installed['anndata']} with zarr "
                        f"{installed['zarr']} cannot read ({reason}); it needs {needed}: pip install -U anndata zarr, "
                        "or write it as h5ad")  # fmt: skip


def _build_count_matrix(path, root, counts, kind, h5_file):
    if "obs" not in root or "var" not in root:
        what = "an h5ad file" if kind == "h5ad" else "an AnnData zarr store"
        raise DatasetError(path, f"is not {what} (no obs/var tables)")
    location = _choose_counts_location(path, root, counts)
    element = _element(root, location)
    n_cells, n_genes = _element_shape(element)
    check_shape(path, location, n_cells, n_genes)

    obs = _read_table(path, root, "obs")
    var = _read_table(path, root, "raw/var" if location == "raw/X" else "var")
    if len(obs) != n_cells:
        raise DatasetError(path, f"obs has {len(obs)} rows but {location} has {n_cells}")
    if len(var) != n_genes:
        var_name = "raw/var" if location == "raw/X" else "var"
        raise DatasetError(path, f"{var_name} has {len(var)} rows but {location} has {n_genes} columns")
    check_not_peaks(path, var.index)
    obs_names = obs.index.to_numpy(dtype=object)

    findings = duplicated_names(obs.index, "obs names")
    rows_source = element
    if _sparse_format(element) == "csc":
        csc = anndata.io.sparse_dataset(element)
        n_stored = int(element["data"].shape[0])
        if n_stored > CSC_WARNING_VALUES:
            message = f"{location} is CSC with {n_stored:,} stored values; converted to CSR in memory"
            log.warning("%s: %s", path, message)
            findings.append(message)
        rows_source = csc.to_memory().tocsr()
    elif _sparse_format(element) == "csr":
        rows_source = CSRRows(element["data"], element["indices"], element["indptr"], n_genes)

    return CountMatrix(
        path=path,
        n_cells=n_cells,
        n_genes=n_genes,
        obs_names=obs_names,
        obs=obs,
        var=var,
        uns_organism=_read_uns_organism(root),
        counts_location=location,
        warnings=findings,
        _file=h5_file,
        _rows_source=rows_source,
    )


def _element(root, location):
    """The element at ``location``, or None; ``raw/X`` and ``raw/var`` are ``raw.X`` and ``raw.var`` in old files."""
    for key in (location, location.replace("raw/", "raw.", 1)):
        if key in root:
            return root[key]
    return None


def _read_table(path, root, location):
    """obs or var as a DataFrame indexed by names, from the AnnData layout or that of anndata < 0.7.

    anndata < 0.7 stored a table as one record array whose first field is the
    index, with the categories of a categorical column ``c`` in
    ``uns/c_categories`` and its integer codes in the field (anndata still
    reads these files; its ``read_elem`` on the table gives the bare array).
    """
    element = _element(root, location)
    if element is None:
        raise DatasetError(path, f"has no {location} table")
    if not is_array(element):
        with warnings.catch_warnings():
            # files from anndata < 0.8 lack encoding metadata; anndata reads them fine
            warnings.simplefilter("ignore", anndata.OldFormatWarning)
            return anndata.io.read_elem(element)
    records = element[()]
    if records.dtype.names is None or element.ndim != 1:
        raise DatasetError(path, f"{location} is a {records.dtype} array of shape {records.shape}, not a table "
                           "(neither the AnnData layout nor the record array of anndata < 0.7)")  # fmt: skip
    columns = {}
    for name in records.dtype.names:
        values = records[name]
        columns[name] = as_text(values) if values.dtype.kind in "SOU" else values
        categories = _element(root, f"uns/{name}_categories")
        codes = columns[name]
        if categories is not None and is_array(categories) and codes.dtype.kind in "iu":
            labels = as_text(categories[()]).reshape(-1)
            if codes.size == 0 or codes.max() < len(labels):  # names shared by obs and var kept one set (old bug)
                columns[name] = pd.Categorical.from_codes(codes, labels)
    table = pd.DataFrame(columns)
    return table.set_index(records.dtype.names[0])


def _choose_counts_location(path, root, counts):
    if counts != "auto":
        if not _is_matrix(root, counts):
            raise DatasetError(path, f"has no count matrix at {counts}")
        problem = _counts_problem(_element(root, counts))
        if problem:
            raise DatasetError(path, f"{counts} holds {problem}; pass data.counts=... if raw counts are elsewhere")
        return counts

    findings, missing = [], []
    for location in AUTO_COUNT_LOCATIONS:
        if not _is_matrix(root, location):
            old_problem = _counts_problem(root["raw.X"]) if location == "raw/X" and _is_matrix(root, "raw.X") else None
            if old_problem:  # anndata < 0.7 kept raw.X at the top level: say it is no counts either, not "no raw.X"
                findings.append(f"raw.X holds {old_problem}")
            else:
                missing.append(_display_name(location))
            continue
        problem = _counts_problem(_element(root, location))
        if problem is None:
            return location
        findings.append(f"{_display_name(location)} holds {problem}")
    if missing:
        findings.append("no " + " or ".join(missing))
    other_layers = [name for name in root.get("layers", {}) if name != "counts"]
    if other_layers:
        findings.append("other layers: " + ", ".join(other_layers))
    findings.append("pass data.counts=... if raw counts are elsewhere")
    raise DatasetError(path, "; ".join(findings))


def _display_name(location):
    if location.startswith("layers/"):
        return f"layers['{location[len('layers/') :]}']"
    return "raw.X" if location == "raw/X" else location


def _is_matrix(root, location):
    element = _element(root, location)
    if element is None:
        return False
    return is_array(element) or _sparse_format(element) in ("csr", "csc")


def _sparse_format(element):
    if is_array(element):
        return None
    encoding = element.attrs.get("encoding-type", element.attrs.get("h5sparse_format", ""))
    encoding = encoding.decode() if isinstance(encoding, bytes) else str(encoding)
    return encoding.replace("_matrix", "")


def _element_shape(element):
    if is_array(element):
        if element.ndim != 2:
            raise ValueError(f"count matrix has {element.ndim} dimensions")
        return tuple(int(n) for n in element.shape)
    shape = element.attrs.get("shape", element.attrs.get("h5sparse_shape"))
    return int(shape[0]), int(shape[1])


def _counts_problem(element):
    """Why the first rows of a matrix are not raw counts, or None if they are."""
    if is_array(element):
        n_genes = element.shape[1] if element.ndim == 2 else 1
        values = element[: min(N_SAMPLE_ROWS, max(1, N_SAMPLE_VALUES // max(n_genes, 1)))]
    elif _sparse_format(element) == "csr":
        end = int(element["indptr"][min(N_SAMPLE_ROWS, element["indptr"].shape[0] - 1)])
        values = element["data"][:end]
    else:
        values = element["data"][:N_SAMPLE_VALUES]
    return values_problem(np.asarray(values).reshape(-1))


def _read_uns_organism(root):
    for key in ("uns/organism_ontology_term_id", "uns/organism"):
        if key in root and is_array(root[key]):
            value = root[key][()]
            if isinstance(value, np.ndarray):
                if value.size != 1:
                    continue
                value = value.reshape(-1)[0]
            return value.decode() if isinstance(value, bytes) else str(value)
    return None
