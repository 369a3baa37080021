"""An atlas as a parquet dataset: ``cells/`` (one row per cell, predictions decoded) and ``embeddings/``, one file
per atlas part in each, so duckdb, polars or pandas query it without our reader.

``OUT/``::

    cells/part-000012.parquet       dataset, row, obs_name, organism, ..., part, atlas_row, cell_type_top1, ...
    embeddings/part-000012.parquet  dataset, row, atlas_row, embedding (fixed-size list of float32)
    datasets.parquet                the atlas's datasets table: dataset -> path, dataset_id, status

Every file carries the atlas's provenance (JSON) under the schema metadata key ``scprint_atlas``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.export.cells import PROVENANCE_KEY, cell_table_layout, part_tables, provenance_json, staged_output


def export_parquet(atlas, out: str | Path) -> Path:
    """Write the atlas's done parts as a parquet dataset at ``out`` (see the module docstring); returns ``out``.

    Parts are read and written one at a time; ``out`` appears only once every
    file is written.
    """
    layout = cell_table_layout(atlas)
    metadata = {PROVENANCE_KEY.encode(): provenance_json(atlas).encode()}
    with staged_output(out) as staging:
        (staging / "cells").mkdir()
        (staging / "embeddings").mkdir()
        for record, cells, embs in part_tables(atlas, layout):
            name = f"part-{int(record.part):06d}.parquet"
            table = typed_nulls(pa.Table.from_pandas(cells, preserve_index=False), layout.source_columns)
            pq.write_table(with_metadata(table, metadata), staging / "cells" / name)
            pq.write_table(with_metadata(embedding_table(cells, embs), metadata), staging / "embeddings" / name)
        datasets = pa.Table.from_pandas(atlas.datasets, preserve_index=False)
        pq.write_table(with_metadata(datasets, metadata), staging / "datasets.parquet")
    return Path(out)


def embedding_table(cells, embs: np.ndarray) -> pa.Table:
    """``dataset``, ``row``, ``atlas_row`` of the cells and their embedding as one fixed-size list column."""
    width = embs.shape[1]
    values = pa.array(np.ascontiguousarray(embs, dtype=np.float32).reshape(-1), type=pa.float32())
    return pa.table({
        "dataset": pa.array(cells["dataset"].to_numpy()),
        "row": pa.array(cells["row"].to_numpy()),
        "atlas_row": pa.array(cells["atlas_row"].to_numpy()),
        "embedding": pa.FixedSizeListArray.from_arrays(values, width),
    })  # fmt: skip


def typed_nulls(table: pa.Table, types: dict) -> pa.Table:
    """The table with its all-null columns (a metadata column this part's dataset lacks) given their type in
    ``types``, so every file of the dataset has one schema."""
    for index, field in enumerate(table.schema):
        if pa.types.is_null(field.type) and field.name in types:
            table = table.set_column(index, field.name, table.column(index).cast(types[field.name]))
    return table


def with_metadata(table: pa.Table, metadata: dict) -> pa.Table:
    """The table with ``metadata`` added to its schema's (pandas') metadata."""
    return table.replace_schema_metadata({**(table.schema.metadata or {}), **metadata})


def read_embeddings(path: str | Path) -> np.ndarray:
    """The ``embedding`` column of a parquet file or directory of the export as an ``[n, width]`` float32 array."""
    column = pq.read_table(path, columns=["embedding"]).column("embedding").combine_chunks()
    return column.flatten().to_numpy().reshape(len(column), column.type.list_size)
