"""An atlas as a TileDB-SOMA experiment: ``obs`` the cells with decoded predictions (``soma_joinid`` = the atlas
row, ``obs_id`` = the source cell's name), the embedding as ``ms['RNA'].obsm['X_scprint2']`` (a dense array)
and each of its blocks as ``obsm['X_scprint2_<block>']`` (``X_scprint2_cell_type``...: a copy of its columns,
so a block is read alone); ``tiledbsoma`` and ``tiledbsoma.io.to_anndata`` read it.

The measurement has no genes (``var`` is empty, there is no ``X``): the counts stay in the source files, which
``dataset`` and ``row`` point to. The provenance (JSON) is the experiment's metadata ``scprint_atlas``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa

from pipeline.atlas.labels import short_name
from pipeline.export.cells import PROVENANCE_KEY, cell_table_layout, part_tables, provenance_json, staged_output
from pipeline.io.extras import import_extra

#: The measurement that holds the embedding, as CELLxGENE Census names its RNA measurement.
MEASUREMENT = "RNA"


def export_soma(atlas, out: str | Path) -> Path:
    """Write the atlas's done parts as a TileDB-SOMA experiment at ``out``; returns ``out``.

    Parts are written one at a time into arrays sized for the whole atlas up
    front; ``out`` appears only once every part is written.
    """
    soma = import_extra("tiledbsoma", "soma", "scatlas export --to soma")
    layout = cell_table_layout(atlas)
    n_cells, width = atlas.n_cells, atlas.embedding_width
    if n_cells == 0:
        raise ValueError(f"{atlas.out_dir}: no part is done; there is nothing to export")
    with staged_output(out) as staging, soma.Experiment.create(str(staging)) as experiment:
        obs, embedding, schema = None, None, None
        for _, cells, embs in part_tables(atlas, layout):
            table = obs_table(cells)
            if obs is None:
                schema = table.schema
                obs = experiment.add_new_dataframe("obs", schema=schema, domain=[(0, n_cells - 1)])
                measurement = experiment.add_new_collection("ms").add_new_collection(MEASUREMENT, soma.Measurement)
                measurement.add_new_dataframe("var", schema=pa.schema([("soma_joinid", pa.int64()),
                                              ("var_id", pa.large_string())]), domain=[(0, 0)])  # fmt: skip
                obsm = measurement.add_new_collection("obsm")
                embedding = obsm.add_new_dense_ndarray("X_scprint2", type=pa.float32(), shape=(n_cells, width))
                blocks = {f"X_scprint2_{short_name(b['name'])}": (b, obsm.add_new_dense_ndarray(
                    f"X_scprint2_{short_name(b['name'])}", type=pa.float32(), shape=(n_cells, b["width"])))
                    for b in atlas.description["embedding_blocks"]}  # fmt: skip
            first = int(cells["atlas_row"].iloc[0]) if len(cells) else 0
            if len(cells):
                obs.write(table.cast(schema))
                rows = slice(first, first + len(cells) - 1)  # SOMA slices include their end
                embedding.write((rows, slice(None)), pa.Tensor.from_numpy(embs))
                for block, array in blocks.values():
                    columns = embs[:, block["start"] : block["start"] + block["width"]]
                    array.write((rows, slice(None)), pa.Tensor.from_numpy(np.ascontiguousarray(columns)))
        experiment.metadata[PROVENANCE_KEY] = provenance_json(atlas)
    return Path(out)


def obs_table(cells: pd.DataFrame) -> pa.Table:
    """The cell table as SOMA ``obs``: ``soma_joinid`` (the atlas row), ``obs_id`` (the cell's name), then the rest;
    categoricals become strings (SOMA enumerations of a part cannot grow past the first part's)."""
    columns = {"soma_joinid": pa.array(cells["atlas_row"].to_numpy(np.int64)),
               "obs_id": pa.array(cells["obs_name"].astype(str).to_numpy(), pa.large_string())}  # fmt: skip
    for name in cells.columns.drop("obs_name"):
        values = cells[name]
        if isinstance(values.dtype, pd.CategoricalDtype) or values.dtype == object:
            columns[name] = pa.array(values.astype(object).where(values.notna(), None).to_numpy(), pa.large_string())
        else:
            columns[name] = pa.array(values.to_numpy())
    return pa.table(columns)
