"""The Lightning data module: the plan -> this rank's units that are not done -> batches.

Nothing is built before the first batch: a dataset's kNN graph (metacell
models) is made where its first batch is tokenized, in a DataLoader worker
while the forward runs (:meth:`pipeline.tokens.batches.UnitBatches._prepare`),
or beforehand by ``scatlas neighbors`` on CPUs; a dataset that fails there has
its units marked failed and the others go on.
"""

from __future__ import annotations

import logging
import os
import signal
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader

from pipeline.atlas.layout import attempt_path, neighbors_lock_path, neighbors_path, sparse_copy_path
from pipeline.atlas.manifest import done_parts, read_plan
from pipeline.io.files import read_json
from pipeline.plan.datasets import DatasetPlan
from pipeline.plan.units import Unit, assign_units
from pipeline.tokens.batches import NeighborFiles, UnitBatches

log = logging.getLogger(__name__)


class AtlasDataModule(L.LightningDataModule):
    """Plans nothing itself: it is given the plan (rank 0) or reads the one rank 0 stored (the other ranks), and
    picks the units of its rank that are not done."""

    def __init__(
        self,
        batch_size: int = 64,
        num_workers: int | str = "auto",
        min_counts: int = 1,
        min_genes: int = 10,
        n_neighbors: int = 6,
        max_len: int = 256,
        **planning,  # counts, organism, metadata, cells_per_unit, min_gene_coverage: read by run_predict's plan
    ):
        super().__init__()
        self.batch_size, self.num_workers = batch_size, num_workers
        self.min_counts, self.min_genes, self.n_neighbors = min_counts, min_genes, n_neighbors
        self.max_len = max_len
        self.units: list[Unit] | None = []  # None: read the plan rank 0 stored, in setup
        self.datasets: dict[int, DatasetPlan] = {}
        self.vocabulary: dict[str, list[str]] = {}
        self.attached = False  # whether run_predict gave the module its plan (or told it to read rank 0's)
        self.refused = ""  # the error rank 0 stopped the attempt with, read by the other ranks in setup
        self.out_dir: Path | None = None
        self.run, self.seed = 0, 0
        self.vocabulary_offsets: dict[str, int] = {}
        self.uses_neighbors = True
        self.rank_units: list[Unit] = []

    def attach(self, *, units, datasets, out_dir, run, seed, vocabulary, vocabulary_offsets, uses_neighbors) -> None:
        """Give the module the run's plan (done by :func:`pipeline.run.predict.run_predict`); ``units`` and
        ``datasets`` None: the plan is the one rank 0 stores before the ranks meet at Lightning's barrier."""
        self.attached, self.units = True, units
        self.datasets = {} if datasets is None else {d.dataset: d for d in datasets}
        self.vocabulary = vocabulary
        self.out_dir, self.run, self.seed = Path(out_dir), run, seed
        self.vocabulary_offsets, self.uses_neighbors = vocabulary_offsets, uses_neighbors

    def setup(self, stage: str) -> None:
        rank, world = self.trainer.global_rank, self.trainer.world_size
        if self.units is None:  # after the barrier: rank 0 has written attempt.json and the plan for this attempt
            self.refused = read_json(attempt_path(self.out_dir)).get("error", "")
            self.units, self.datasets = ([], {}) if self.refused else read_plan(self.out_dir)
        done = done_parts(self.out_dir, self.run)
        mine = assign_units([u for u in self.units if u.part not in done], world)[rank]
        self.rank_units = mine
        log.info("rank %d/%d: %d units, %d cells to embed", rank, world, len(mine), sum(u.n_cells for u in mine))

    def _neighbor_files(self) -> dict[int, NeighborFiles] | None:
        if not self.uses_neighbors:
            return None
        return {dataset: neighbor_files(self.out_dir, dataset) for dataset in {u.dataset for u in self.rank_units}}

    def predict_dataloader(self) -> DataLoader:
        batches = UnitBatches(
            self.rank_units,
            self.datasets,
            vocabulary_offsets=self.vocabulary_offsets,
            max_len=self.max_len,
            batch_size=self.batch_size,
            min_counts=self.min_counts,
            min_genes=self.min_genes,
            seed=self.seed,
            neighbor_files=self._neighbor_files(),
            n_neighbors=self.n_neighbors,
            vocabulary=self.vocabulary,
        )
        device_type = self.trainer.strategy.root_device.type
        num_workers = resolve_num_workers(self.num_workers, device_type)
        return DataLoader(
            batches,
            batch_size=None,
            collate_fn=_as_is,
            shuffle=False,
            num_workers=num_workers,
            persistent_workers=False,
            pin_memory=torch.cuda.is_available(),
            prefetch_factor=4 if num_workers else None,
            worker_init_fn=_init_cpu_worker if device_type == "cpu" else _leave_stop_signals_to_main,
        )


def neighbor_files(out_dir: Path, dataset: int) -> NeighborFiles:
    """The graph, sparse copy and lock files of a dataset in an atlas directory."""
    return NeighborFiles(neighbors_path(out_dir, dataset), sparse_copy_path(out_dir, dataset),
                         neighbors_lock_path(out_dir, dataset))  # fmt: skip


def resolve_num_workers(num_workers: int | str, device_type: str) -> int:
    """DataLoader worker processes for ``data.num_workers`` (a count, or ``auto``) on this device type.

    ``auto`` is 0 on a CPU: the forward uses every core, so tokenizing in the
    main process between forwards costs least (README, Performance). With a GPU
    it is 2: the CPU tokenizes while the GPU computes.
    """
    if num_workers == "auto":
        return 0 if device_type == "cpu" else 2
    if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 0:
        raise ValueError(f"data.num_workers must be auto or a number of processes >= 0, not {num_workers!r}")
    return num_workers


def _as_is(batch: dict) -> dict:
    return batch


def _yield_to_forward(worker_id: int) -> None:
    """With the forward on the CPU, workers run at the lowest priority: a worker taking a core from one of the
    forward's threads stalls all of them at their next synchronisation, so tokenizing is cheaper between forwards."""
    os.nice(19)


def _leave_stop_signals_to_main(worker_id: int) -> None:
    """Workers ignore SIGTERM and SIGUSR1: SLURM signals every process of a job step, and only the main process
    acts on them (it stops at the next batch and exits 75); a worker killed by SIGTERM would fail the run with a
    traceback instead. Workers still end with the main process."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)


def _init_cpu_worker(worker_id: int) -> None:
    _leave_stop_signals_to_main(worker_id)
    _yield_to_forward(worker_id)
