"""One dataset's plan: opened, its organism and gene mapping worked out, its metadata joined.

Planning never raises past one dataset: a dataset that cannot be embedded is
recorded as failed with a one-line error and the others go on.
"""

from __future__ import annotations

import hashlib
import logging
import math
from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np
import pandas as pd

from pipeline.io.formats import open_counts
from pipeline.io.matrix import CountMatrix, DatasetError
from pipeline.plan.genes import organism_id, to_ensembl, vocabulary_columns

log = logging.getLogger(__name__)


#: Columns of a metadata table that may hold the cell ids, in order of preference (else its first column).
METADATA_ID_COLUMNS = ("cell_id", "obs_name", "obs_names", "barcode", "barcodes", "cell")


#: Columns a part's cell table always has; metadata columns of the same name get a ``meta_`` prefix.
#: Symbols as gene names: fewer matching a human or mouse gene than this fraction is a protein panel, not RNA.
MIN_GENE_SYMBOL_FRACTION = 0.5
CELL_COLUMNS = ("dataset", "row", "obs_name", "organism", "n_counts", "n_genes")


#: Rows of a count matrix that its fingerprint reads: this many at each end and this many spread between.
IDENTITY_ROWS = 32


@dataclass
class DatasetPlan:
    """One input dataset: what we know about it and how its genes map to the model."""

    dataset: int
    path: str
    dataset_id: str = ""  # the catalog's dataset_id, if any
    identity: str = ""  # what seeds its cells' gene draws (dataset_identity), never its position in the inputs
    metadata: str = ""  # the metadata table joined to the cells, if any
    status: str = "pending"  # "pending" or "failed" at planning time
    error: str = ""
    n_cells: int = 0
    counts_location: str = ""
    gene_organism: str = ""
    gene_source: str = ""
    n_genes: int = 0
    n_vocab_genes: int = 0
    vocab_coverage: float = 0.0
    warnings: list[str] = field(default_factory=list)
    # not persisted: what workers need to tokenize this dataset's cells
    gene_columns: np.ndarray | None = field(default=None, repr=False)  # vocabulary column per gene, -1 if none
    n_vocab: int = 0  # genes in the model's vocabulary of gene_organism
    cell_organisms: np.ndarray | None = field(default=None, repr=False)
    matrix: CountMatrix | None = field(default=None, repr=False)
    cell_metadata: dict[str, np.ndarray] = field(default_factory=dict, repr=False)  # column -> value per row

    def record(self) -> dict:
        """The row of ``datasets.parquet``."""
        return {
            "dataset": self.dataset, "path": self.path, "dataset_id": self.dataset_id, "identity": self.identity,
            "metadata": self.metadata,
            "n_cells": self.n_cells, "status": self.status,
            "error": self.error, "counts_location": self.counts_location, "organism": self.gene_organism,
            "gene_source": self.gene_source, "n_genes": self.n_genes, "n_vocab_genes": self.n_vocab_genes,
            "vocab_coverage": self.vocab_coverage, "warnings": "; ".join(self.warnings),
        }  # fmt: skip


def cell_organisms(matrix: CountMatrix, default: str | None) -> np.ndarray:
    """Each cell's organism id: obs column, else uns, else ``default`` ('' if none)."""
    if "organism_ontology_term_id" in matrix.obs:
        values = matrix.obs["organism_ontology_term_id"].astype(str).to_numpy()
        mapped = {v: organism_id(v) or "" for v in np.unique(values)}
        return np.array([mapped[v] for v in values], dtype=object)
    organism = organism_id(matrix.uns_organism) or default or ""
    return np.full(matrix.n_cells, organism, dtype=object)


def plan_dataset(dataset: int, path: str, vocabulary: dict[str, list[str]], settings: dict) -> DatasetPlan:
    """Open one dataset, work out its organism and gene mapping, join its metadata; failures are recorded, not raised.

    ``settings`` are the data settings (``counts``, ``organism``,
    ``min_gene_coverage``, ``metadata``), with a catalog row's overrides and
    ``dataset_id``.
    """
    plan = DatasetPlan(dataset=dataset, path=path, dataset_id=settings.get("dataset_id") or "",
                       metadata=settings.get("metadata") or "")  # fmt: skip
    try:
        matrix = open_counts(path, counts=settings.get("counts", "auto"))
    except DatasetError as err:
        plan.status, plan.error = "failed", str(err)
        return plan
    plan.matrix, plan.n_cells, plan.n_genes = matrix, matrix.n_cells, matrix.n_genes
    plan.counts_location, plan.warnings = matrix.counts_location, list(matrix.warnings)
    try:
        plan.identity = dataset_identity(matrix, plan.dataset_id)
        _map_genes(plan, matrix, vocabulary, settings)
        if plan.metadata:
            plan.cell_metadata = join_metadata(plan, matrix.obs_names)
    except DatasetError as err:
        plan.status, plan.error = "failed", str(err)
    except ValueError as err:  # e.g. an organism name we cannot read
        plan.status, plan.error = "failed", str(DatasetError(path, str(err)))
    return plan


def dataset_identity(matrix: CountMatrix, dataset_id: str = "") -> str:
    """What seeds the gene draws of a dataset's cells: ``dataset_id:<id>`` when a catalog names it, else a fingerprint.

    The fingerprint, ``counts:<sha256>``, hashes the count matrix's shape and
    the counts of :data:`IDENTITY_ROWS` rows at each end and as many spread
    between, as read (names are left out: a 10x h5 and the h5ad made from it
    name genes differently). So a cell's outputs do not depend on where its
    dataset sits in the inputs, the same counts in any format or copy give the
    same outputs, and a fingerprint costs about 100 rows' read, whatever the
    file's size. It seeds draws; it is not a checksum of the whole file. A
    sampled row that cannot be read is hashed as its error: that fails only
    its unit, when the unit is read.
    """
    if dataset_id:
        return f"dataset_id:{dataset_id}"
    n = matrix.n_cells
    digest = hashlib.sha256(f"{matrix.n_cells}x{matrix.n_genes}".encode())
    head, tail = np.arange(min(n, IDENTITY_ROWS)), np.arange(max(0, n - IDENTITY_ROWS), n)
    for rows in (head, np.linspace(0, n - 1, IDENTITY_ROWS).astype(np.int64), tail):
        try:
            block = matrix.read_rows_at(np.unique(rows))
        except DatasetError as err:  # a bad value or chunk fails its unit when read, not the whole dataset here
            digest.update(err.problem.encode())
            continue
        block.sort_indices()
        for array, dtype in ((block.indptr, np.int64), (block.indices, np.int64), (block.data, np.float32)):
            digest.update(np.ascontiguousarray(array, dtype=dtype).tobytes())
    return f"counts:{digest.hexdigest()[:32]}"


def _map_genes(plan: DatasetPlan, matrix: CountMatrix, vocabulary: dict[str, list[str]], settings: dict) -> None:
    default = organism_id(settings.get("organism"))
    organisms = cell_organisms(matrix, default)
    known = [o for o in organisms if o]
    hint = organism_id(matrix.uns_organism) or default or (max(set(known), key=known.count) if known else None)
    ids = to_ensembl(matrix.var, organism=hint)
    known = ids.ids != ""
    if ids.source.startswith("symbols") and known.mean() < MIN_GENE_SYMBOL_FRACTION:
        examples = ", ".join(matrix.var.index[~known][:3])
        raise DatasetError(plan.path, f"looks like protein (antibody) names, not RNA: only {int(known.sum())} of its "
                           f"{len(known)} columns are human or mouse gene symbols (not: {examples}); scPRINT-2 embeds "
                           "gene expression")  # fmt: skip
    gene_organism = ids.organism or hint
    if not gene_organism:
        raise DatasetError(plan.path, "cannot tell the organism (no organism in obs/uns, gene ids are not "
                           "Ensembl, symbols match no gene table); set data.organism=...")  # fmt: skip
    if gene_organism not in vocabulary:
        raise DatasetError(plan.path, f"organism {gene_organism} is not in the model (it knows {sorted(vocabulary)})")
    organisms[organisms == ""] = gene_organism
    gene_columns, n_covered = vocabulary_columns(ids.ids, vocabulary[gene_organism])
    plan.gene_organism, plan.gene_source = gene_organism, ids.source
    plan.n_vocab_genes = int(n_covered)
    plan.vocab_coverage = n_covered / len(vocabulary[gene_organism])
    if plan.vocab_coverage < settings["min_gene_coverage"]:
        n_model = len(vocabulary[gene_organism])
        n_needed = math.ceil(settings["min_gene_coverage"] * n_model)
        raise DatasetError(
            plan.path,
            f"{n_covered} of its {matrix.n_genes} genes are in the model vocabulary: they cover "
            f"{plan.vocab_coverage:.2%} of the model's {n_model} {gene_organism} genes, and at least {n_needed} "
            f"({settings['min_gene_coverage']:.2%}, data.min_gene_coverage) are needed; check the gene ids "
            f"({ids.source})",
        )
    if plan.vocab_coverage < 0.2:
        plan.warnings.append(
            f"small gene panel: {n_covered} vocabulary genes ({plan.vocab_coverage:.1%} of the model's {gene_organism} "
            "genes); embeddings of such cells are less informative"
        )
    plan.gene_columns, plan.n_vocab = gene_columns, len(vocabulary[gene_organism])
    plan.cell_organisms = organisms
    for warning in plan.warnings:
        log.warning("%s: %s", plan.path, warning)


def join_metadata(plan: DatasetPlan, obs_names: np.ndarray) -> dict[str, np.ndarray]:
    """The columns of the plan's metadata table, one value per row of the dataset, matched by cell id.

    The cell ids are the table's ``cell_id`` column (else ``obs_name``,
    ``barcode``, ``cell``..., else its first column) and must match the
    dataset's obs names. Cells without a row get empty (null) values, with a
    warning. A column named like a column of a part's cell table gets a ``meta_``
    prefix.

    Raises
    ------
    DatasetError
        The table cannot be read, or repeats the id of one of the dataset's cells.
    """
    table = _read_metadata_table(plan.metadata)
    id_column = next((c for c in METADATA_ID_COLUMNS if c in table.columns), table.columns[0])
    ids = table[id_column].astype(str)
    cells = pd.Index(np.asarray(obs_names).astype(str))
    mine = ids.isin(cells).to_numpy()
    repeated = ids[mine][ids[mine].duplicated()]
    if len(repeated):
        raise DatasetError(plan.metadata, f"cell id {repeated.iloc[0]!r} of {plan.path} is in "
                           f"{int(ids.eq(repeated.iloc[0]).sum())} rows (column {id_column!r}); give this dataset a "
                           "table of its own (catalog column metadata)")  # fmt: skip
    rows = table[mine].drop(columns=id_column).set_axis(ids[mine].to_numpy(), axis=0).reindex(cells)
    n_missing = int((~cells.isin(ids[mine])).sum())
    if n_missing:
        warning = f"metadata {plan.metadata}: {n_missing} of {len(cells)} cells have no row (their columns are empty)"
        plan.warnings.append(warning)
        log.warning("%s: %s", plan.path, warning)
    return {(f"meta_{name}" if str(name) in CELL_COLUMNS else str(name)): rows[name].to_numpy() for name in rows}


@lru_cache(maxsize=4)
def _read_metadata_table(path: str) -> pd.DataFrame:
    """A csv/tsv/parquet table, read once per process (one table often serves every dataset of a run)."""
    try:
        if path.lower().endswith(".parquet"):
            table = pd.read_parquet(path)
            return table if isinstance(table.index, pd.RangeIndex) else table.reset_index()
        return pd.read_csv(path, sep="\t" if path.lower().endswith(".tsv") else ",")
    except (OSError, ValueError) as err:
        raise DatasetError(path, f"cannot be read as a metadata table ({' '.join(str(err).split())})") from err
