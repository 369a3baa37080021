"""One dataset's plan: opened, its organism and gene mapping worked out, its metadata joined.

Planning never raises past one dataset: a dataset that cannot be embedded is
recorded as failed with a one-line error and the others go on.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import multiprocessing
import os
import signal
from dataclasses import dataclass, field, replace
from functools import lru_cache

import numpy as np
import pandas as pd

from pipeline.io.formats import dataset_stat, open_counts
from pipeline.io.genes import CLEAR_MAJORITY, ORGANISMS, GeneIds, organism_id, to_ensembl
from pipeline.io.matrix import CountMatrix, DatasetError
from pipeline.plan.vocabulary import vocabulary_columns

log = logging.getLogger(__name__)


#: Columns of a metadata table that may hold the cell ids, in order of preference (else its first column).
METADATA_ID_COLUMNS = ("cell_id", "obs_name", "obs_names", "barcode", "barcodes", "cell")


#: Columns a part's cell table always has; metadata columns of the same name get a ``meta_`` prefix.
CELL_COLUMNS = ("dataset", "row", "obs_name", "organism", "n_counts", "n_genes")
#: A file declares one organism when at least this share of its cells with an organism have it.
DECLARED_SHARE = 0.9


#: Rows of a count matrix that its fingerprint reads: this many at each end and this many spread between.
IDENTITY_ROWS = 32

#: The data settings that say how a dataset is read (a catalog row may override them): stored with its plan,
#: so that a DataLoader worker or another rank opens it again exactly as it was planned.
READ_SETTINGS = ("counts", "organism", "metadata", "soma_filter", "min_gene_coverage", "max_len", "dataset_id")

#: Planning runs in this many datasets per worker process and batch of work, at least (fewer: in this process).
DATASETS_PER_PROCESS = 32


@dataclass
class DatasetPlan:
    """One input dataset: what we know about it and how its genes map to the model."""

    dataset: int
    path: str
    dataset_id: str = ""  # the catalog's dataset_id, if any
    identity: str = ""  # what seeds its cells' gene draws (dataset_identity), never its position in the inputs
    metadata: str = ""  # the metadata table joined to the cells, if any
    soma_filter: str = ""  # the obs value filter a TileDB-SOMA experiment was read with, if any
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
    # the input's identity, recorded in the stored plan to tell a file rewritten since (see input_identity)
    size: int = 0
    mtime_ns: int = 0
    fingerprint: str = ""
    read_settings: dict = field(default_factory=dict)  # READ_SETTINGS as planned (datasets.parquet, as JSON)
    # not persisted, and not kept by the run's plan (see light): what workers need to tokenize its cells
    gene_columns: np.ndarray | None = field(default=None, repr=False)  # vocabulary column per gene, -1 if none
    n_vocab: int = 0  # genes in the model's vocabulary of gene_organism
    cell_organisms: np.ndarray | None = field(default=None, repr=False)
    matrix: CountMatrix | None = field(default=None, repr=False)
    cell_metadata: dict[str, np.ndarray] = field(default_factory=dict, repr=False)  # column -> value per row

    def record(self) -> dict:
        """The row of ``datasets.parquet``."""
        return {
            "dataset": self.dataset, "path": self.path, "dataset_id": self.dataset_id, "identity": self.identity,
            "metadata": self.metadata, "soma_filter": self.soma_filter,
            "n_cells": self.n_cells, "status": self.status,
            "error": self.error, "counts_location": self.counts_location, "organism": self.gene_organism,
            "gene_source": self.gene_source, "n_genes": self.n_genes, "n_vocab_genes": self.n_vocab_genes,
            "vocab_coverage": self.vocab_coverage, "warnings": "; ".join(self.warnings),
            "read_settings": json.dumps(self.read_settings, sort_keys=True),
        }  # fmt: skip

    @property
    def loaded(self) -> bool:
        """Whether the plan holds what tokenizing needs (its open counts and gene mapping), see :func:`load_dataset`."""
        return self.matrix is not None and self.gene_columns is not None

    def light(self) -> DatasetPlan:
        """This plan without its open counts, gene mapping and cell columns: what a run keeps of every dataset.

        About a kilobyte, picklable, and all the tables need; a worker opens
        the dataset again where it tokenizes it (:func:`load_dataset`), so a
        run's memory does not grow with the number of datasets it planned.
        """
        return replace(self, matrix=None, gene_columns=None, cell_organisms=None, cell_metadata={})


def plan_from_record(record: dict, known: dict | None = None) -> DatasetPlan:
    """The light plan of a dataset from its ``datasets.parquet`` row (see :meth:`DatasetPlan.light`): no file opened.

    ``known`` is the input identity the stored plan recorded (size,
    modification time, fingerprint), if any. A resumed run takes the plan of a
    finished dataset from here, and the ranks other than 0 the plan of every
    dataset that rank 0 stored for the attempt.
    """
    warnings = str(record.get("warnings") or "")
    identity = {} if known is None or known.get("fingerprint") is None else {"size": int(known["size"]), "mtime_ns": int(known["mtime_ns"]),
                                         "fingerprint": str(known["fingerprint"])}  # fmt: skip
    return DatasetPlan(
        dataset=int(record["dataset"]), path=str(record["path"]), dataset_id=str(record.get("dataset_id") or ""),
        metadata=str(record.get("metadata") or ""), n_cells=int(record["n_cells"]),
        status="failed" if failed_at_planning(record) else "pending",
        error=str(record.get("error") or ""),
        counts_location=str(record.get("counts_location") or ""), gene_organism=str(record.get("organism") or ""),
        gene_source=str(record.get("gene_source") or ""), n_genes=int(record.get("n_genes") or 0),
        n_vocab_genes=int(record.get("n_vocab_genes") or 0), vocab_coverage=float(record.get("vocab_coverage") or 0),
        warnings=warnings.split("; ") if warnings else [], soma_filter=str(record.get("soma_filter") or ""),
        identity=str(record.get("identity") or ""), read_settings=json.loads(record.get("read_settings") or "{}"),
        **identity,
    )  # fmt: skip


def cell_organisms(matrix: CountMatrix, default: str | None) -> np.ndarray:
    """Each cell's organism id: obs column, else uns, else ``default`` ('' if none)."""
    if "organism_ontology_term_id" in matrix.obs:
        values = matrix.obs["organism_ontology_term_id"].astype(str).to_numpy()
        mapped = {v: organism_id(v) or "" for v in np.unique(values)}
        return np.array([mapped[v] for v in values], dtype=object)
    organism = organism_id(matrix.uns_organism) or default or ""
    return np.full(matrix.n_cells, organism, dtype=object)


def plan_dataset(dataset: int, path: str, vocabulary: dict[str, list[str]], settings: dict,
                 known: dict | None = None) -> DatasetPlan:  # fmt: skip
    """Open one dataset, work out its organism and gene mapping, join its metadata; failures are recorded, not raised.

    ``settings`` are the data settings (``counts``, ``organism``,
    ``min_gene_coverage``, ``metadata``, ``soma_filter``, ``max_len``: a panel
    of fewer genes is warned about), with a catalog row's overrides and
    ``dataset_id``. A TileDB-SOMA experiment's cells get their ``soma_joinid``
    in the cell table. ``known`` is the identity the stored plan recorded for
    this dataset, if any (see :func:`input_identity`).
    """
    read_settings = read_settings_of(settings)
    plan = DatasetPlan(dataset=dataset, path=path, dataset_id=settings.get("dataset_id") or "",
                       metadata=settings.get("metadata") or "", soma_filter=settings.get("soma_filter") or "",
                       read_settings=read_settings)  # fmt: skip
    try:
        matrix = _open_and_map(plan, vocabulary)
        plan.size, plan.mtime_ns, plan.fingerprint = input_identity(path, matrix, known)
        plan.identity = dataset_identity(matrix, plan.dataset_id)
    except DatasetError as err:
        plan.status, plan.error = "failed", str(err)
    except ValueError as err:  # e.g. an organism name we cannot read
        plan.status, plan.error = "failed", str(DatasetError(path, " ".join(str(err).split())))
    except Exception as err:  # noqa: BLE001 - anything else a reader raises fails this dataset, not the run
        log.debug("%s: planning failed", path, exc_info=True)
        message = " ".join(str(err).split())
        plan.status, plan.error = "failed", str(DatasetError(path, f"{type(err).__name__}: {message}"))
    return plan


def read_settings_of(settings: dict) -> dict:
    """The :data:`READ_SETTINGS` of a dataset's data settings (with its catalog row's overrides), those that are set."""
    return {key: settings[key] for key in READ_SETTINGS if settings.get(key) not in (None, "")}


def failed_at_planning(record: dict) -> bool:
    """Whether a ``datasets.parquet`` row is of a dataset that failed at planning (failed, and given no unit);
    one whose units failed while embedding was planned."""
    return record.get("status") == "failed" and record.get("n_units", 1) == 0


def stored_plan_holds(record: dict, settings: dict) -> bool:
    """Whether a dataset's stored ``datasets.parquet`` row is its plan for ``settings``: it was planned (not
    failed at planning) and read with the same settings. Its file must also be unchanged on disk."""
    same_settings = record.get("read_settings") == json.dumps(read_settings_of(settings), sort_keys=True)
    return not failed_at_planning(record) and same_settings


def _open_and_map(plan: DatasetPlan, vocabulary: dict[str, list[str]], quiet: bool = False) -> CountMatrix:
    """Open the plan's dataset with its ``read_settings`` and fill in its counts, gene mapping and cell columns."""
    settings = plan.read_settings
    matrix = open_counts(plan.path, counts=settings.get("counts", "auto"), obs_filter=plan.soma_filter or None)
    plan.matrix, plan.n_cells, plan.n_genes = matrix, matrix.n_cells, matrix.n_genes
    plan.counts_location, plan.warnings = matrix.counts_location, list(matrix.warnings)
    _map_genes(plan, matrix, vocabulary, settings, quiet)
    if plan.metadata:
        plan.cell_metadata = join_metadata(plan, matrix.obs_names, quiet)
    if "soma_joinid" in matrix.obs:  # a TileDB-SOMA cell's id in its experiment, whatever the filter
        plan.cell_metadata["soma_joinid"] = matrix.obs["soma_joinid"].to_numpy(np.int64)
    return matrix


def load_dataset(plan: DatasetPlan, vocabulary: dict[str, list[str]]) -> DatasetPlan:
    """A light plan (:meth:`DatasetPlan.light`) made ready to tokenize: its file opened again as it was planned.

    Done where the dataset's first batch is tokenized (a DataLoader worker).
    Its warnings were logged at planning and are not logged again.

    Raises
    ------
    DatasetError
        The file cannot be read now, or no longer has the cells and genes it was planned with.
    """
    if plan.loaded:
        return plan
    loaded = replace(plan, warnings=[])
    try:
        _open_and_map(loaded, vocabulary, quiet=True)
    except (DatasetError, OSError):
        raise
    except Exception as err:  # noqa: BLE001 - fails the dataset's units with the reason, as planning would
        raise DatasetError(plan.path, f"{type(err).__name__}: {' '.join(str(err).split())}") from err
    if (loaded.n_cells, loaded.n_genes, loaded.gene_organism) != (plan.n_cells, plan.n_genes, plan.gene_organism):
        found = f"{loaded.n_cells} cells x {loaded.n_genes} genes ({loaded.gene_organism or 'no organism'})"
        raise DatasetError(plan.path, f"now has {found}, but was planned with {plan.n_cells} x {plan.n_genes} "
                           f"({plan.gene_organism}); the file changed during the run: run the same command "
                           "again to plan it anew")  # fmt: skip
    return replace(loaded, warnings=plan.warnings)


def plan_datasets(jobs: list[tuple[int, str, dict, dict | None]], vocabulary: dict[str, list[str]],
                  processes: int | None = None) -> list[DatasetPlan]:  # fmt: skip
    """The light plans (:meth:`DatasetPlan.light`) of ``jobs``: ``(dataset, path, settings, known)`` each.

    Datasets are planned in parallel, in ``processes`` forked worker processes
    (default: one per CPU this process may use, at most one per
    :data:`DATASETS_PER_PROCESS` datasets, so a short list is planned here).
    Planning opens every file, so at atlas scale it is the longest step
    before the first batch; its results do not depend on the process that
    made them. Failures are recorded in the plans, as :func:`plan_dataset` does.
    """
    if processes is None:
        processes = min(len(os.sched_getaffinity(0)), len(jobs) // DATASETS_PER_PROCESS)
    if processes <= 1:
        return [_plan_light(job, vocabulary) for job in jobs]
    context = multiprocessing.get_context("fork")  # workers share the vocabulary, nothing is pickled but plans
    global _POOL_VOCABULARY
    _POOL_VOCABULARY = vocabulary
    pool = context.Pool(processes, initializer=_default_signals)
    try:
        chunk = max(1, min(DATASETS_PER_PROCESS, len(jobs) // (4 * processes)))
        plans = pool.map(_plan_in_worker, jobs, chunksize=chunk)
        pool.close()
        return plans
    finally:
        pool.terminate()
        pool.join()
        _POOL_VOCABULARY = None


_POOL_VOCABULARY: dict[str, list[str]] | None = None  # the vocabulary of plan_datasets' forked workers


def _default_signals() -> None:
    """A planning worker ends on SIGTERM (the run's stop handlers, inherited by the fork, would keep it alive) and
    leaves Ctrl-C to the run, which stops at its first batch boundary once planning is done."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGUSR1, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _plan_in_worker(job: tuple[int, str, dict, dict | None]) -> DatasetPlan:
    return _plan_light(job, _POOL_VOCABULARY)


def _plan_light(job: tuple[int, str, dict, dict | None], vocabulary: dict[str, list[str]]) -> DatasetPlan:
    dataset, path, settings, known = job
    plan = plan_dataset(dataset, path, vocabulary, settings, known)
    if plan.matrix is not None:
        plan.matrix.close()
    return plan.light()


def input_identity(path: str, matrix: CountMatrix, known: dict | None) -> tuple[int, int, str]:
    """(bytes, modification time, fingerprint of the counts) of a dataset, to tell on resume whether it changed.

    The fingerprint (:meth:`CountMatrix.fingerprint`, about 2 MiB read) is
    computed again only when the size or modification time differ from the
    ``known`` identity, so an unchanged input costs one ``stat``.
    """
    size, mtime_ns = dataset_stat(path)
    if known and known.get("fingerprint") is not None and (known["size"], known["mtime_ns"]) == (size, mtime_ns):
        return size, mtime_ns, known["fingerprint"]
    return size, mtime_ns, matrix.fingerprint()


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


def _map_genes(plan: DatasetPlan, matrix: CountMatrix, vocabulary: dict[str, list[str]], settings: dict,
               quiet: bool = False) -> None:  # fmt: skip
    default = organism_id(settings.get("organism"))
    organisms = cell_organisms(matrix, default)
    known = [o for o in organisms if o]
    hint = organism_id(matrix.uns_organism) or default or (max(set(known), key=known.count) if known else None)
    declared = declared_organism(matrix)
    genes = to_ensembl(matrix.var)  # what the genes alone say
    disagreement = organism_disagreement(matrix, declared, genes)
    if disagreement and not default:
        raise DatasetError(plan.path, f"{disagreement}; correct the file's organism, or set "
                           f"data.organism={ORGANISMS[genes.organism]} (a catalog's organism column for one dataset) "
                           "to embed it as that organism")  # fmt: skip
    if disagreement:
        hint = default
        organisms[organisms == declared] = default
        plan.warnings.append(
            f"{disagreement}; its cells are taken as {ORGANISMS.get(default, default)} (data.organism)"
        )
    ids = genes if hint is None else to_ensembl(matrix.var, organism=hint)
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
    if n_covered < settings.get("max_len", 0):  # the data settings of a run carry model.max_len
        plan.warnings.append(
            f"small gene panel: {n_covered} vocabulary genes, fewer than the {settings['max_len']} gene tokens a "
            "cell shows the model (model.max_len): every cell is filled up with genes the panel did not measure, "
            "shown as unexpressed; embeddings of such cells are less informative"
        )
    plan.gene_columns, plan.n_vocab = gene_columns, len(vocabulary[gene_organism])
    plan.cell_organisms = organisms
    for warning in [] if quiet else plan.warnings:
        log.warning("%s: %s", plan.path, warning)


def declared_organism(matrix: CountMatrix) -> str | None:
    """The organism a file gives its cells (obs, else uns), if at least ``DECLARED_SHARE`` of them share it."""
    organisms = cell_organisms(matrix, None)
    values, counts = np.unique(organisms[organisms != ""].astype(str), return_counts=True)
    if not len(values) or counts.max() < DECLARED_SHARE * counts.sum():
        return None
    return str(values[counts.argmax()])


def organism_disagreement(matrix: CountMatrix, declared: str | None, genes: GeneIds) -> str | None:
    """Why the file's declared organism clearly disagrees with its genes, or None.

    Clear means: the declared organism has a gene table, and most genes name
    another organism, at least ``CLEAR_MAJORITY`` times as many as name the
    declared one (a common curation error: mouse symbols labelled human).
    """
    if declared not in ORGANISMS or not genes.matches:
        return None
    other = max(genes.matches, key=genes.matches.get)
    n_other, n_declared = genes.matches[other], genes.matches.get(declared, 0)
    if other == declared or n_other < 0.5 * matrix.n_genes or n_other < CLEAR_MAJORITY * n_declared:
        return None
    where = "obs organism_ontology_term_id" if "organism_ontology_term_id" in matrix.obs else "uns organism"
    what = "gene symbols match" if genes.source.startswith("symbols") else "Ensembl ids are"
    return (f"{where} says {ORGANISMS[declared]} ({declared}) but its genes are {ORGANISMS[other]}: {n_other} of "
            f"{matrix.n_genes} {what} {ORGANISMS[other]}, {n_declared} {ORGANISMS[declared]}")  # fmt: skip


def join_metadata(plan: DatasetPlan, obs_names: np.ndarray, quiet: bool = False) -> dict[str, np.ndarray]:
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
        if not quiet:
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
