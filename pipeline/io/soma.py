"""TileDB-SOMA experiments (a local directory, e.g. written by ``tiledbsoma.io.from_h5ad`` or a copy of a
CELLxGENE Census slice), read by rows of one X layer of one measurement.

Which cells: every ``obs`` row, or those an obs value filter keeps (``data.soma_filter``, in SOMA's filter
syntax: ``tissue_general == 'blood' and is_primary_data == True``), in ``soma_joinid`` order. Row ``i`` of the
CountMatrix is the ``i``-th kept cell; ``obs['soma_joinid']`` gives its id in the experiment, and the atlas
writes it in each part's cell table.
"""

from __future__ import annotations

import os

import numpy as np
import pandas as pd
import scipy.sparse as sp

from pipeline.io.extras import import_extra
from pipeline.io.matrix import (
    N_SAMPLE_ROWS,
    N_SAMPLE_VALUES,
    CountMatrix,
    DatasetError,
    check_not_peaks,
    check_shape,
    duplicated_names,
    short_reason,
    values_problem,
)

#: The measurement read unless ``counts`` names another (CELLxGENE Census and ``from_h5ad`` call it RNA).
DEFAULT_MEASUREMENT = "RNA"


#: X layers tried by ``counts='auto'``, in order (Census: ``raw``; ``from_h5ad``: ``data`` for X, layer names).
AUTO_LAYERS = ("raw", "counts", "data")


#: Columns of obs / var that name cells and genes, in order of preference (else the soma_joinid).
OBS_NAME_COLUMNS = ("obs_id", "cell_id", "barcode")
VAR_NAME_COLUMNS = ("var_id", "feature_id", "gene_ids")


def is_soma_experiment(path: str) -> bool:
    """Whether a directory is a TileDB group holding ``obs`` and ``ms`` (a SOMA experiment), from its entries."""
    names = set(os.listdir(path))
    return "__tiledb_group.tdb" in names and {"obs", "ms"} <= names


def open_soma(path, counts="auto", obs_filter=None):
    """Open one X layer of a TileDB-SOMA experiment for reading in row blocks.

    Parameters
    ----------
    path : str
        The experiment's directory.
    counts : str
        ``'auto'`` (the first of ``raw``, ``counts``, ``data`` and then any
        other layer of measurement ``RNA`` whose first rows hold raw counts),
        a layer name (``raw``), or ``ms/<measurement>/X/<layer>``.
    obs_filter : str, optional
        A SOMA value filter on ``obs`` columns; only the cells it keeps are read.

    Returns
    -------
    CountMatrix
        ``obs`` holds the kept cells' obs columns with their ``soma_joinid``;
        ``counts_location`` is ``ms/<measurement>/X/<layer>``.

    Raises
    ------
    DatasetError
        tiledbsoma is not installed, the experiment, measurement or layer is
        missing, the filter is invalid or keeps no cell, or the layer does not
        hold raw counts (one line naming the experiment and the problem).
    """
    path = os.fspath(path)
    try:
        soma = import_extra("tiledbsoma", "soma", "reading a TileDB-SOMA experiment")
    except ModuleNotFoundError as err:
        raise DatasetError(path, f"is a TileDB-SOMA experiment: {err}") from None
    measurement, layer = _split_location(path, counts)
    try:
        with soma.Experiment.open(path) as experiment:
            if measurement not in experiment.ms:
                raise DatasetError(path, f"has no measurement {measurement!r} (it has {sorted(experiment.ms)}); "
                                   "pass data.counts=ms/<measurement>/X/<layer>")  # fmt: skip
            obs = _read_obs(path, experiment, obs_filter)
            var = _read_var(experiment.ms[measurement])
            layers = sorted(experiment.ms[measurement].X)
    except DatasetError:
        raise
    except (soma.SOMAError, OSError, ValueError, KeyError, RuntimeError, TypeError) as err:
        raise DatasetError(path, f"cannot be read as a TileDB-SOMA experiment: {soma_reason(err)}") from err
    check_not_peaks(path, var.index)
    rows = SomaRows(path, measurement, obs["soma_joinid"].to_numpy(np.int64), var["soma_joinid"].to_numpy(np.int64))
    layer = _choose_layer(path, rows, measurement, layer, layers)
    location = f"ms/{measurement}/X/{layer}"
    check_shape(path, location, len(obs), len(var))
    return CountMatrix(
        path=path,
        n_cells=len(obs),
        n_genes=len(var),
        obs_names=obs.index.to_numpy(dtype=object),
        obs=obs,
        var=var,
        uns_organism=None,
        counts_location=location,
        warnings=duplicated_names(obs.index, "obs names"),
        _file=rows,
        _rows_source=rows,
    )


def _split_location(path, counts):
    if counts == "auto":
        return DEFAULT_MEASUREMENT, None
    parts = str(counts).split("/")
    if len(parts) == 1 and parts[0]:
        return DEFAULT_MEASUREMENT, parts[0]
    if len(parts) == 4 and parts[0] == "ms" and parts[2] == "X" and parts[1] and parts[3]:
        return parts[1], parts[3]
    raise DatasetError(path, f"data.counts={counts} is not a SOMA X layer: pass auto, a layer name (raw) or "
                       "ms/<measurement>/X/<layer>")  # fmt: skip


def _read_obs(path, experiment, obs_filter):
    try:
        table = experiment.obs.read(value_filter=obs_filter or None).concat()
    except Exception as err:  # noqa: BLE001 - tiledbsoma reports a bad filter with several exception types
        if obs_filter:
            raise DatasetError(path, f"data.soma_filter={obs_filter!r} cannot filter obs: {soma_reason(err)} "
                               f"(obs columns: {', '.join(experiment.obs.schema.names)})") from err  # fmt: skip
        raise
    if obs_filter and table.num_rows == 0:
        raise DatasetError(path, f"data.soma_filter={obs_filter!r} keeps no cell")
    return _as_frame(table, OBS_NAME_COLUMNS)


def _read_var(measurement):
    return _as_frame(measurement.var.read().concat(), VAR_NAME_COLUMNS)


def _as_frame(table, name_columns):
    """A SOMA dataframe as pandas: in ``soma_joinid`` order, indexed by its first name column, categoricals as str."""
    frame = table.to_pandas().sort_values("soma_joinid", kind="stable").reset_index(drop=True)
    name_column = next((c for c in name_columns if c in frame.columns), "soma_joinid")
    frame.index = pd.Index(frame[name_column].astype(str).to_numpy(), name=None)
    for name in frame.columns:
        if isinstance(frame[name].dtype, pd.CategoricalDtype):
            frame[name] = frame[name].astype(str)
    return frame


def _choose_layer(path, rows, measurement, layer, layers):
    """The layer asked for if it holds raw counts; for ``auto`` the first that does."""
    if layer is not None and layer not in layers:
        raise DatasetError(path, f"has no X layer {layer!r} in measurement {measurement!r} (it has {layers}); "
                           "pass data.counts=<layer> or auto")  # fmt: skip
    candidates = (
        [layer] if layer else [n for n in AUTO_LAYERS if n in layers] + [n for n in layers if n not in AUTO_LAYERS]
    )
    n_sample = max(1, min(len(rows.joinids), N_SAMPLE_ROWS, N_SAMPLE_VALUES // max(len(rows.var_joinids), 1)))
    findings = []
    for name in candidates:
        rows.layer = name
        problem = values_problem(rows[slice(0, n_sample)].data)
        if problem is None:
            return name
        findings.append(f"X layer {name!r} holds {problem}")
    if not candidates:
        findings.append(f"measurement {measurement!r} has no X layer")
    raise DatasetError(path, "; ".join(findings) + "; scPRINT-2 needs raw counts (pass data.counts=<layer>)")


def soma_reason(err):
    """A tiledbsoma error in one line, without the C++ call stack it appends after ``At:``."""
    return short_reason(err).split(" At: ")[0]


class SomaRows:
    """Rows of one X layer of a SOMA experiment, the kept cells in order; opened lazily in each process.

    A TileDB handle must not cross a ``fork`` (data-loader workers), so the
    experiment is opened on first read in the process that reads, and again
    after a fork.
    """

    def __init__(self, path, measurement, joinids, var_joinids, layer=None):
        self.path, self.measurement, self.layer = path, measurement, layer
        self.joinids, self.var_joinids = joinids, var_joinids
        self._experiment, self._pid = None, None

    def _array(self):
        if self._experiment is None or self._pid != os.getpid():
            import tiledbsoma

            self._experiment, self._pid = tiledbsoma.Experiment.open(self.path), os.getpid()
        return self._experiment.ms[self.measurement].X[self.layer]

    def __getitem__(self, selection):
        rows = np.arange(len(self.joinids))[selection]
        wanted = self.joinids[rows]
        if wanted.size == 0:
            return sp.csr_matrix((0, len(self.var_joinids)), dtype=np.float32)
        contiguous = int(wanted[-1] - wanted[0]) == wanted.size - 1
        coords = slice(int(wanted[0]), int(wanted[-1])) if contiguous else wanted
        table = self._array().read(coords=(coords,)).tables().concat()
        cell = np.searchsorted(wanted, table["soma_dim_0"].to_numpy())
        gene = np.searchsorted(self.var_joinids, table["soma_dim_1"].to_numpy())
        values = table["soma_data"].to_numpy().astype(np.float32)
        return sp.csr_matrix((values, (cell, gene)), shape=(wanted.size, len(self.var_joinids)))

    def close(self):
        if self._experiment is not None and self._pid == os.getpid():
            self._experiment.close()
        self._experiment = None
