"""What to embed: a file, a glob, a directory or a catalog (csv/tsv) -> a list of (path, settings)."""

from __future__ import annotations

import glob
import logging
import os
from pathlib import Path

import pandas as pd

from pipeline.io.formats import directory_format, genomes_of
from pipeline.io.tables import SPARSE_VALUES_SUFFIXES

log = logging.getLogger(__name__)


#: Files of an input directory that are datasets (besides zarr / 10x mtx sub-directories and sparse pairs).
READABLE_SUFFIXES = (".h5ad", ".h5", ".hdf5")


#: An input file with one of these suffixes is a catalog: a table with a ``path`` column, one dataset a row.
CATALOG_SUFFIXES = (".csv", ".tsv")


#: Optional catalog columns: per-dataset data settings, and the id recorded in ``datasets.parquet``.
CATALOG_SETTINGS = ("organism", "counts", "metadata", "soma_filter")


def resolve_inputs(spec) -> list[tuple[str, dict]]:
    """Inputs -> one ``(path, settings)`` per dataset, in order (a dataset's id is its position).

    ``spec`` is a dataset, a glob, a directory, a catalog, or a list of these:

    - a dataset: a file, or a directory that is one (zarr store, 10x mtx,
      TileDB-SOMA experiment);
    - a directory: its datasets, sorted by name: ``.h5ad``/``.h5``/``.hdf5``
      files, ``*_values.sparse(.npz)`` pairs, zarr and 10x mtx sub-directories;
    - a catalog: a ``.csv``/``.tsv`` table with a ``path`` column, one dataset
      a row; relative paths are relative to the catalog's folder. Optional
      columns ``organism``, ``counts``, ``metadata``, ``soma_filter`` override the run's data
      settings for that row; ``dataset_id`` is recorded in ``datasets.parquet``.

    ``settings`` holds the row's overrides (empty outside catalogs). Paths that
    do not exist are kept: they become failed datasets with a clear error, so
    one typo does not stop a long catalog.

    Raises
    ------
    ValueError
        A directory without datasets, a pattern matching nothing, a catalog
        that is missing or has no ``path`` column.
    """
    items = [spec] if isinstance(spec, (str, os.PathLike)) else list(spec)
    inputs: list[tuple[str, dict]] = []
    for item in map(str, items):
        if os.path.isdir(item) and directory_format(item) is None:
            found = _directory_datasets(item)
            if not found:
                raise ValueError(f"input directory {item} holds no dataset ({'/'.join(READABLE_SUFFIXES)} file, "
                                 "_values.sparse pair, zarr or 10x mtx directory)")  # fmt: skip
            inputs += [(path, {}) for path in found]
        elif item.lower().endswith(CATALOG_SUFFIXES):
            inputs += read_catalog(item)
        elif glob.has_magic(item) and not os.path.exists(item):
            found = sorted(glob.glob(item))
            if not found:
                raise ValueError(f"input pattern {item} matches no file")
            inputs += [(path, {}) for path in found]
        else:
            inputs.append((item, {}))
    return inputs


def _directory_datasets(folder: str) -> list[str]:
    found = []
    for entry in sorted(Path(folder).iterdir()):
        if entry.is_dir():
            is_dataset = directory_format(str(entry)) is not None
        else:
            is_dataset = entry.suffix in READABLE_SUFFIXES or entry.name.endswith(SPARSE_VALUES_SUFFIXES)
        if is_dataset:
            found.append(str(entry))
    return found


def read_catalog(path: str) -> list[tuple[str, dict]]:
    """The ``(path, settings)`` of each row of a catalog (see :func:`resolve_inputs`); other columns are ignored."""
    if not os.path.isfile(path):
        raise ValueError(f"catalog {path} does not exist")
    try:
        table = pd.read_csv(path, sep="\t" if path.lower().endswith(".tsv") else ",", dtype=str,
                            keep_default_na=False, skipinitialspace=True)  # fmt: skip
    except (OSError, ValueError) as err:
        raise ValueError(f"catalog {path} cannot be read: {err}") from err
    if "path" not in table.columns:
        raise ValueError(f"catalog {path} has no 'path' column (its columns: {', '.join(table.columns)})")
    folder = os.path.dirname(path)
    inputs = []
    for line, row in enumerate(table.to_dict("records"), start=2):
        if not row["path"].strip():
            raise ValueError(f"catalog {path} line {line}: empty path")
        settings = {key: row[key].strip() for key in (*CATALOG_SETTINGS, "dataset_id") if row.get(key, "").strip()}
        if "metadata" in settings:
            settings["metadata"] = os.path.join(folder, settings["metadata"])
        inputs.append((os.path.join(folder, row["path"].strip()), settings))
    if not inputs:
        raise ValueError(f"catalog {path} lists no dataset")
    return inputs


def expand_genomes(inputs: list[tuple[str, dict]], counts: str = "auto") -> list[tuple[str, dict]]:
    """Each multi-genome (barnyard) 10x ``.h5`` of ``inputs`` -> one dataset per genome, in the file's order.

    A genome's dataset reads that genome's group (its ``counts`` setting) and
    its catalog ``dataset_id``, if any, gets ``/<genome>`` appended. A file
    whose ``counts`` (``data.counts`` or the catalog's) names one genome stays
    one dataset.
    """
    expanded = []
    for path, settings in inputs:
        genomes = genomes_of(path) if settings.get("counts", counts) == "auto" else []
        if not genomes:
            expanded.append((path, settings))
        for genome in genomes:
            named = {"dataset_id": f"{settings['dataset_id']}/{genome}"} if settings.get("dataset_id") else {}
            expanded.append((path, {**settings, "counts": genome, **named}))
    return expanded
