"""What every export writes: one table per done part of cells with decoded predictions, its embedding, the
atlas's provenance, and a staging directory renamed onto the output only when it is complete.

An export reads the atlas part by part (:meth:`pipeline.atlas.Atlas.iter_parts`), so its memory is that of
one part whatever the size of the atlas.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.atlas.labels import short_name
from pipeline.atlas.layout import part_file
from pipeline.atlas.manifest import tool_version

#: Key of the provenance (JSON) in the metadata of every exported file or store.
PROVENANCE_KEY = "scprint_atlas"


def provenance(atlas) -> dict:
    """Where the exported cells come from: the atlas, its run, model and checkpoint sha256, and the run's settings.

    These are the facts a reader of the export needs to tell two exports apart
    or to reproduce one; ``atlas.json`` keeps the full configuration.
    """
    description = atlas.description
    run_entry = next((r for r in description.get("runs", []) if r["run"] == atlas.run), {})
    return {
        "format": description.get("format"),
        "atlas": str(Path(atlas.out_dir).resolve()),
        "run": atlas.run,
        "n_cells": atlas.n_cells,
        "n_parts": len(atlas.parts),
        "n_planned_parts": atlas.n_planned_parts,
        "model": description["model"],
        "settings": run_entry.get("settings", {}),
        "atlas_tool_version": description.get("tool_version"),
        "export_tool_version": tool_version(),
        "exported": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "embedding_blocks": description["embedding_blocks"],
        "classes": [{"name": c["name"], "short": short_name(c["name"]), "k": c["k"]} for c in description["classes"]],
    }


@dataclass
class CellTable:
    """How one export lays out the cells: the columns of the cell table and the label vocabulary of each class.

    Attributes
    ----------
    source_columns : dict
        Column of the parts' cell tables -> its arrow type, over every
        done part (a metadata column one dataset lacks is null there).
    label_terms, label_names : dict
        Class short name -> array of terms / names indexed by label id.
    classes : list of dict
        ``atlas.json``'s classes (``name``, ``k``, ``start``).
    """

    source_columns: dict
    label_terms: dict
    label_names: dict
    classes: list

    @property
    def prediction_columns(self) -> list[str]:
        """``cell_type_top1``, ``cell_type_top1_name``, ``cell_type_top1_score``, ... as :meth:`Atlas.predictions`."""
        names = []
        for info in self.classes:
            short = short_name(info["name"])
            for rank in range(1, info["k"] + 1):
                names += [f"{short}_top{rank}", f"{short}_top{rank}_name", f"{short}_top{rank}_score"]
        return names

    def categories(self, column: str) -> list[str] | None:
        """The fixed categories of a prediction term or name column, else None (so every part has the same ones)."""
        short, _, rest = column.rpartition("_top")
        if not short or rest.endswith("_score"):
            return None
        values = self.label_names[short] if rest.endswith("_name") else self.label_terms[short]
        return list(pd.unique(values))


def cell_table_layout(atlas) -> CellTable:
    """The columns of the cells over all done parts (read from the parquet footers only) and the label vocabularies."""
    columns: dict[str, pa.DataType] = {}
    for stem in atlas.parts["stem"]:
        for field in pq.read_schema(Path(atlas.out_dir) / part_file(stem, "cells")):
            if field.name not in columns or pa.types.is_null(columns[field.name]):
                columns[field.name] = field.type
            elif pa.types.is_integer(columns[field.name]) and pa.types.is_floating(field.type):
                columns[field.name] = field.type
    columns = {name: pa.string() if pa.types.is_null(kind) else kind for name, kind in columns.items()}
    columns.pop("__index_level_0__", None)
    terms, names = {}, {}
    for info in atlas.description["classes"]:
        labels = atlas.labels(info["name"])
        size = int(labels["id"].max()) + 1 if len(labels) else 0
        short = short_name(info["name"])
        terms[short] = np.full(size, "", dtype=object)
        names[short] = np.full(size, "", dtype=object)
        terms[short][labels["id"].to_numpy()] = labels["term"].to_numpy()
        names[short][labels["id"].to_numpy()] = labels["name"].to_numpy()
    return CellTable(columns, terms, names, atlas.description["classes"])


def part_tables(atlas, layout: CellTable) -> Iterator[tuple[pd.Series, pd.DataFrame, np.ndarray]]:
    """Each done part, in atlas order: its record, its cells with decoded predictions, and its embedding.

    The cell table has the columns of ``layout.source_columns`` (a column the
    part lacks is null, ints missing somewhere become floats), then ``part``
    and ``atlas_row`` (the row of :func:`pipeline.atlas.open_atlas`), then the
    prediction columns. Term and name columns are categoricals over the whole
    vocabulary of their class, so every part has the same categories.
    """
    for record, data in atlas.iter_parts(kinds=("embs", "top3", "scores"), description="exporting parts"):
        source = data["cells"]
        columns = {}
        for name, kind in layout.source_columns.items():
            if name in source:
                values = source[name]
                if pa.types.is_floating(kind) and not pd.api.types.is_float_dtype(values):
                    values = values.astype(np.float64)
            else:
                values = pd.Series(np.full(len(source), np.nan if pa.types.is_floating(kind) else None, dtype=object))
                if pa.types.is_floating(kind):
                    values = values.astype(np.float64)
            columns[name] = values.to_numpy()
        columns["part"] = np.full(len(source), record.part, dtype=np.int64)
        columns["atlas_row"] = np.arange(record.first, record.first + len(source), dtype=np.int64)
        top, scores = np.asarray(data["top3"]), np.asarray(data["scores"])
        for info in layout.classes:
            short = short_name(info["name"])
            for rank in range(info["k"]):
                ids = top[:, info["start"] + rank]
                for column, vocabulary in ((f"{short}_top{rank + 1}", layout.label_terms[short]),
                                           (f"{short}_top{rank + 1}_name", layout.label_names[short])):  # fmt: skip
                    columns[column] = pd.Categorical(vocabulary[ids], categories=layout.categories(column))
                columns[f"{short}_top{rank + 1}_score"] = scores[:, info["start"] + rank]
        yield record, pd.DataFrame(columns), np.asarray(data["embs"], dtype=np.float32)


@contextmanager
def staged_output(out: str | Path) -> Iterator[Path]:
    """A temporary directory next to ``out``, renamed onto ``out`` when the block ends without error.

    A failed or killed export leaves no ``out`` (only a ``.<name>.tmp-<pid>``
    directory after a kill, removed by the next export to the same path).

    Raises
    ------
    FileExistsError
        ``out`` exists already: an export never overwrites.
    """
    out = Path(out)
    if out.exists():
        raise FileExistsError(f"{out} exists; remove it or export to another path")
    out.parent.mkdir(parents=True, exist_ok=True)
    for leftover in out.parent.glob(f".{out.name}.tmp-*"):
        shutil.rmtree(leftover, ignore_errors=True)
    staging = out.parent / f".{out.name}.tmp-{os.getpid()}"
    staging.mkdir()
    try:
        yield staging
        os.replace(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def provenance_json(atlas) -> str:
    """:func:`provenance` as one JSON string, the form every export stores."""
    return json.dumps(provenance(atlas), default=str)
