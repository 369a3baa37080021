"""``scatlas predict``: plan, embed with Lightning, write parts atomically, report.

Lightning's pieces are used as they are: ``Trainer.predict`` drives the loop
over the data module's batches (:mod:`pipeline.run.datamodule`), the network
is a LightningModule (:mod:`pipeline.run.module`), and a prediction writer
(:mod:`pipeline.run.writer`) writes each unit's files as soon as its last batch
is predicted, then marks the unit done.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path

import lightning as L
import pandas as pd
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from rich.console import Console

from pipeline import DATA_DIR
from pipeline.atlas.layout import description_path, sparse_copy_path
from pipeline.atlas.manifest import atlas_description, done_parts, read_units, write_datasets_table, write_units
from pipeline.io.files import read_json, remove_temporaries, write_json
from pipeline.plan.datasets import DatasetPlan, plan_dataset
from pipeline.plan.inputs import expand_genomes, resolve_inputs
from pipeline.plan.units import Unit, make_units
from pipeline.run.module import AtlasPredictor
from pipeline.run.progress import CellsPerSecondBar
from pipeline.run.signals import install_stop_handlers, stop_requested
from pipeline.run.writer import PartWriter

log = logging.getLogger(__name__)

EXIT_OK, EXIT_DATASETS_FAILED, EXIT_PREEMPTED, EXIT_INTERRUPTED = 0, 3, 75, 130  # 75: "requeue me" (slurm/)


DEMO_DATASET = DATA_DIR / "neurips2021_human_bmmc_cite_rna_600x1000.h5ad"


# ----------------------------------------------------------------------------- run


def plan_run(cfg: DictConfig, vocabulary: dict[str, list[str]]) -> tuple[list[DatasetPlan], list[Unit]]:
    """Plan every dataset and the units; reuse the stored unit plan of ``out_dir`` if there is one."""
    inputs = resolve_inputs(cfg.input if cfg.input else str(DEMO_DATASET))  # (path, a catalog row's settings)
    inputs = expand_genomes(inputs, str(cfg.data.counts))  # a barnyard 10x h5: one dataset per genome
    paths = [os.path.abspath(path) for path, _ in inputs]  # datasets.parquet must not depend on the cwd
    stored_units, stored_paths = read_units(cfg.out_dir)
    for dataset, path in stored_paths.items():
        if dataset >= len(paths) or paths[dataset] != os.path.abspath(path):
            raise ValueError(
                f"{cfg.out_dir} was planned with dataset {dataset} = {path}, but the inputs now give "
                f"{paths[dataset] if dataset < len(paths) else 'nothing'}; keep the input list (new inputs may "
                "only be appended) or use another out_dir"
            )
    settings = OmegaConf.to_container(cfg.data, resolve=True)
    datasets = [plan_dataset(i, path, vocabulary, {**settings, **overrides})
                for i, (path, (_, overrides)) in enumerate(zip(paths, inputs))]  # fmt: skip
    for ds in datasets:
        if ds.status == "failed":
            log.error("%s", ds.error)
    units = make_units(datasets, int(cfg.data.cells_per_unit), stored_units)
    return datasets, units


def resolve_run(out_dir: Path, requested: int | None) -> int:
    """The run counter: the one asked for, else the latest run of ``out_dir``, else 0."""
    if requested is not None:
        return int(requested)
    path = description_path(out_dir)
    if path.exists():
        runs = read_json(path).get("runs", [])
        if runs:
            return max(r["run"] for r in runs)
    return 0


def settings_fingerprint(cfg: DictConfig, model) -> dict:
    """What changes the numbers a run writes; a resumed run must match it."""
    return {
        "model": cfg.model.name,
        "checkpoint_sha256": model.checkpoint_sha256,
        "max_len": int(cfg.model.max_len),
        "seed": int(cfg.seed),
        "min_counts": int(cfg.data.min_counts),
        "min_genes": int(cfg.data.min_genes),
        "n_neighbors": int(cfg.data.n_neighbors),
        "counts": str(cfg.data.counts),
        "organism": cfg.data.organism,
        "gene_draw": "dataset identity",  # seeded by datasets.parquet's identity (before: the position in the inputs)
    }


def run_predict(cfg: DictConfig, extra_lines: Callable[[Path, int], list[str]] | None = None) -> int:
    """Run (or resume) one atlas; returns the process exit code.

    ``extra_lines(out_dir, run)`` adds lines to the end-of-run summary (the
    command line adds the demo model's held-out accuracy).
    """
    out_dir = Path(cfg.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    install_stop_handlers()
    predictor = AtlasPredictor(name=cfg.model.name, checkpoint=cfg.model.checkpoint,
                               max_len=int(cfg.model.max_len), seed=int(cfg.seed))  # fmt: skip
    model = predictor.model
    run = resolve_run(out_dir, cfg.run)
    fingerprint = settings_fingerprint(cfg, model)
    description_file = description_path(out_dir)
    runs = read_json(description_file).get("runs", []) if description_file.exists() else []
    previous = next((r for r in runs if r["run"] == run), None)
    if previous and previous["settings"] != fingerprint:
        changed = sorted(k for k in fingerprint if previous["settings"].get(k) != fingerprint[k])
        raise ValueError(
            f"{out_dir}: run {run} was made with other settings ({', '.join(changed)}); "
            f"resume with the same settings, or start a new run with run={max(r['run'] for r in runs) + 1}"
        )

    datasets, units = plan_run(cfg, model.config.genes)
    datamodule = instantiate(cfg.data)
    datamodule.attach(
        units=units, datasets=datasets, out_dir=out_dir, run=run, seed=int(cfg.seed),
        vocabulary_offsets=model.config.organism_offsets,
        uses_neighbors=model.config.expr_emb_style == "metacell",
    )  # fmt: skip
    writer = PartWriter(out_dir, run)
    trainer: L.Trainer = instantiate(cfg.trainer, callbacks=[writer, CellsPerSecondBar()])
    if trainer.global_rank == 0:
        remove_temporaries(out_dir)
        write_units(out_dir, units, {d.dataset: d.path for d in datasets})
        if previous is None:
            runs.append({"run": run, "settings": fingerprint, "attempts": []})
        entry = next(r for r in runs if r["run"] == run)
        entry["attempts"].append({"started": time.strftime("%Y-%m-%dT%H:%M:%S"), "world_size": trainer.world_size})
        write_json(description_file, atlas_description(cfg, model, run, runs))
        write_datasets_table(out_dir, datasets, units, run)
    try:
        trainer.predict(predictor, datamodule=datamodule, return_predictions=False)
    except BaseException:
        if stop_requested() is None:
            raise
        log.warning("rank %d stopped by signal %d; done units are kept, resume with the same command",
                    trainer.global_rank, stop_requested())  # fmt: skip
        trainer.strategy.barrier()  # release ranks that finished and wait for the others
        return EXIT_INTERRUPTED if stop_requested() == signal.SIGINT else EXIT_PREEMPTED
    trainer.strategy.barrier()
    if trainer.global_rank != 0:
        return EXIT_OK
    table = write_datasets_table(out_dir, datasets, units, run)
    for dataset in table.dataset[table.status == "done"]:  # a done dataset's sparse copy is not read again
        sparse_copy_path(out_dir, dataset).unlink(missing_ok=True)
    entry["attempts"][-1]["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S")
    write_json(description_file, atlas_description(cfg, model, run, runs, with_names=True))
    print_summary(out_dir, table, units, run, extra_lines)
    return EXIT_DATASETS_FAILED if (table.status == "failed").any() else EXIT_OK


def print_summary(out_dir: Path, table: pd.DataFrame, units: list[Unit], run: int, extra_lines=None) -> None:
    console = Console(stderr=False)
    done = done_parts(out_dir, run)
    console.print(f"[bold]atlas[/bold] {out_dir.resolve()}  (run {run})")
    console.print(
        f"units done {sum(u.part in done for u in units)}/{len(units)}, cells embedded "
        f"{int(table.n_embedded.sum()):,}, dropped {int(table.n_dropped.sum()):,}, "
        f"datasets done {(table.status == 'done').sum()}/{len(table)}"
    )
    for row in table[table.status == "failed"].itertuples():
        console.print(f"[red]failed[/red] {row.error}")
    for line in extra_lines(out_dir, run) if extra_lines else []:
        console.print(line, markup=False, highlight=False, soft_wrap=True)
    console.print(f"read it: scatlas status {out_dir}  |  scatlas validate {out_dir}")
