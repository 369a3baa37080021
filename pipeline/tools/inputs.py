"""Model inputs of whole files, prepared exactly as ``scatlas predict`` prepares them, for the tools.

The settings come from the predict config itself (:func:`configs.compose_predict`),
so a tool never keeps a copy of them.
"""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from configs import compose_predict
from pipeline.atlas.layout import neighbors_path, sparse_copy_path
from pipeline.plan.datasets import DatasetPlan, plan_dataset
from pipeline.plan.units import Unit
from pipeline.run.datamodule import neighbor_files
from pipeline.tokens.batches import UnitBatches, prepare_dataset


def predict_config(model_name: str, overrides: list[str] = ()) -> DictConfig:
    """The config of ``scatlas predict model=<model_name> <overrides>``."""
    return compose_predict([f"model={model_name}", *overrides])


def plan_files(paths: list[Path], genes: dict[str, list[str]], cfg: DictConfig, first_id: int = 0) -> list[DatasetPlan]:
    """Plan files as a predict run of them in this order does (dataset ids from ``first_id``); a failure raises."""
    settings = OmegaConf.to_container(cfg.data, resolve=True)
    plans = [plan_dataset(first_id + i, str(path), genes, settings) for i, path in enumerate(paths)]
    for plan in plans:
        if plan.status == "failed":
            raise ValueError(plan.error)
    return plans


def prepare(plans: list[DatasetPlan], cfg: DictConfig, work_dir: Path) -> None:
    """Sparse copies and kNN graphs of the datasets under ``work_dir``, laid out as in an atlas directory."""
    for plan in plans:
        prepare_dataset(plan, neighbors_path(work_dir, plan.dataset), sparse_copy_path(work_dir, plan.dataset),
                        int(cfg.data.n_neighbors), int(cfg.seed))  # fmt: skip


def whole_file_batches(plans: list[DatasetPlan], vocabulary_offsets: dict[str, int], cfg: DictConfig, work_dir: Path | None,
                       batch_size: int | None = None, seed: int | None = None) -> UnitBatches:  # fmt: skip
    """Batches of every cell of the planned datasets, one unit per dataset; ``work_dir`` holds their graphs
    (:func:`prepare`), None for a model without neighbours. ``seed`` overrides the gene-sampling seed."""
    return UnitBatches(
        [Unit(p.dataset, p.dataset, 0, p.n_cells) for p in plans], {p.dataset: p for p in plans},
        vocabulary_offsets=vocabulary_offsets, max_len=int(cfg.model.max_len),
        batch_size=int(batch_size or cfg.data.batch_size), min_counts=int(cfg.data.min_counts),
        min_genes=int(cfg.data.min_genes), seed=int(cfg.seed if seed is None else seed),
        neighbor_files=None if work_dir is None else {p.dataset: neighbor_files(work_dir, p.dataset) for p in plans},
        n_neighbors=int(cfg.data.n_neighbors),
    )  # fmt: skip
