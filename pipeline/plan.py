"""Planning: inputs -> datasets -> work units with global part ids.

The plan is a pure function of the inputs, the model's vocabulary and the data
settings, so every process (any rank, any restart) computes the same units and
the same part ids; "resume" is "plan again, skip what is done".
"""

from __future__ import annotations

import glob
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import scipy.sparse as sp

from pipeline.genes import organism_id, to_ensembl, vocabulary_matrix
from pipeline.readers import CountMatrix, DatasetError, open_counts

log = logging.getLogger(__name__)

READABLE_SUFFIXES = (".h5ad",)


@dataclass
class DatasetPlan:
    """One input dataset: what we know about it and how its genes map to the model."""

    dataset: int
    path: str
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
    gene_map: sp.csr_matrix | None = field(default=None, repr=False)
    cell_organisms: np.ndarray | None = field(default=None, repr=False)
    matrix: CountMatrix | None = field(default=None, repr=False)

    def record(self) -> dict:
        """The row of ``datasets.parquet``."""
        return {
            "dataset": self.dataset, "path": self.path, "n_cells": self.n_cells, "status": self.status,
            "error": self.error, "counts_location": self.counts_location, "organism": self.gene_organism,
            "gene_source": self.gene_source, "n_genes": self.n_genes, "n_vocab_genes": self.n_vocab_genes,
            "vocab_coverage": self.vocab_coverage, "warnings": "; ".join(self.warnings),
        }  # fmt: skip


@dataclass(frozen=True)
class Unit:
    """A block of rows of one dataset, written as one part."""

    part: int
    dataset: int
    start: int
    stop: int

    @property
    def n_cells(self) -> int:
        return self.stop - self.start


def resolve_inputs(spec) -> list[str]:
    """A file, a glob, a directory (its readable files, sorted) or a list of these -> paths.

    Paths that do not exist are kept: they become failed datasets with a clear
    error, so one typo does not stop a long catalog.
    """
    items = [spec] if isinstance(spec, (str, os.PathLike)) else list(spec)
    paths: list[str] = []
    for item in map(str, items):
        if os.path.isdir(item):
            found = sorted(str(p) for p in Path(item).iterdir() if p.suffix in READABLE_SUFFIXES)
            if not found:
                raise ValueError(f"input directory {item} holds no {'/'.join(READABLE_SUFFIXES)} file")
            paths += found
        elif glob.has_magic(item) and not os.path.exists(item):
            found = sorted(glob.glob(item))
            if not found:
                raise ValueError(f"input pattern {item} matches no file")
            paths += found
        else:
            paths.append(item)
    return paths


def cell_organisms(matrix: CountMatrix, default: str | None) -> np.ndarray:
    """Each cell's organism id: obs column, else uns, else ``default`` ('' if none)."""
    if "organism_ontology_term_id" in matrix.obs:
        values = matrix.obs["organism_ontology_term_id"].astype(str).to_numpy()
        mapped = {v: organism_id(v) or "" for v in np.unique(values)}
        return np.array([mapped[v] for v in values], dtype=object)
    organism = organism_id(matrix.uns_organism) or default or ""
    return np.full(matrix.n_cells, organism, dtype=object)


def plan_dataset(dataset: int, path: str, vocabulary: dict[str, list[str]], settings: dict) -> DatasetPlan:
    """Open one dataset and work out its organism and gene mapping; failures are recorded, not raised."""
    plan = DatasetPlan(dataset=dataset, path=path)
    try:
        matrix = open_counts(path, counts=settings.get("counts", "auto"))
    except DatasetError as err:
        plan.status, plan.error = "failed", str(err)
        return plan
    plan.matrix, plan.n_cells, plan.n_genes = matrix, matrix.n_cells, matrix.n_genes
    plan.counts_location, plan.warnings = matrix.counts_location, list(matrix.warnings)
    try:
        _map_genes(plan, matrix, vocabulary, settings)
    except DatasetError as err:
        plan.status, plan.error = "failed", str(err)
    except ValueError as err:  # e.g. an organism name we cannot read
        plan.status, plan.error = "failed", str(DatasetError(path, str(err)))
    return plan


def _map_genes(plan: DatasetPlan, matrix: CountMatrix, vocabulary: dict[str, list[str]], settings: dict) -> None:
    default = organism_id(settings.get("organism"))
    organisms = cell_organisms(matrix, default)
    known = [o for o in organisms if o]
    hint = organism_id(matrix.uns_organism) or default or (max(set(known), key=known.count) if known else None)
    ids = to_ensembl(matrix.var, organism=hint)
    gene_organism = ids.organism or hint
    if not gene_organism:
        raise DatasetError(plan.path, "cannot tell the organism (no organism in obs/uns, gene ids are not "
                           "Ensembl, symbols match no gene table); set data.organism=...")  # fmt: skip
    if gene_organism not in vocabulary:
        raise DatasetError(plan.path, f"organism {gene_organism} is not in the model (it knows {sorted(vocabulary)})")
    organisms[organisms == ""] = gene_organism
    gene_map, n_covered = vocabulary_matrix(ids.ids, vocabulary[gene_organism])
    plan.gene_organism, plan.gene_source = gene_organism, ids.source
    plan.n_vocab_genes = int(n_covered)
    plan.vocab_coverage = n_covered / len(vocabulary[gene_organism])
    if plan.vocab_coverage < settings["min_gene_coverage"]:
        raise DatasetError(
            plan.path,
            f"only {n_covered} of its {matrix.n_genes} genes are in the model vocabulary "
            f"({plan.vocab_coverage:.2%} of {len(vocabulary[gene_organism])}; data.min_gene_coverage="
            f"{settings['min_gene_coverage']}); check the gene ids ({ids.source})",
        )
    if plan.vocab_coverage < 0.2:
        plan.warnings.append(
            f"small gene panel: {n_covered} vocabulary genes ({plan.vocab_coverage:.1%} of the model's {gene_organism} "
            "genes); embeddings of such cells are less informative"
        )
    plan.gene_map, plan.cell_organisms = gene_map, organisms
    for warning in plan.warnings:
        log.warning("%s: %s", plan.path, warning)


def make_units(datasets: list[DatasetPlan], cells_per_unit: int, stored: list[Unit] = ()) -> list[Unit]:
    """Cut every plannable dataset into row ranges of at most ``cells_per_unit`` cells.

    Units already in ``stored`` (an earlier attempt's plan) keep their part ids;
    datasets that had none (new inputs, or ones that failed to open before) get
    new ids after the largest stored one. So part ids never change on resume.
    """
    by_dataset: dict[int, list[Unit]] = {}
    for unit in stored:
        by_dataset.setdefault(unit.dataset, []).append(unit)
    next_part = max((u.part for u in stored), default=-1) + 1
    units: list[Unit] = []
    for ds in datasets:
        if ds.status == "failed":
            continue
        if ds.dataset in by_dataset:
            kept = sorted(by_dataset[ds.dataset], key=lambda u: u.start)
            if kept[-1].stop != ds.n_cells:
                raise ValueError(
                    f"{ds.path}: now has {ds.n_cells} cells, but this atlas planned {kept[-1].stop}; "
                    "the file changed since the first attempt: use a new out_dir"
                )
            units += kept
            continue
        for start in range(0, ds.n_cells, cells_per_unit):
            units.append(Unit(next_part, ds.dataset, start, min(start + cells_per_unit, ds.n_cells)))
            next_part += 1
    return units


def assign_units(units: list[Unit], world_size: int) -> list[list[Unit]]:
    """Balance units over ranks by number of cells (largest first onto the least-loaded rank)."""
    loads = [0] * world_size
    ranks: list[list[Unit]] = [[] for _ in range(world_size)]
    for unit in sorted(units, key=lambda u: (-u.n_cells, u.part)):
        rank = min(range(world_size), key=lambda r: (loads[r], r))
        ranks[rank].append(unit)
        loads[rank] += unit.n_cells
    return [sorted(r, key=lambda u: u.part) for r in ranks]
