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
import shlex
import shutil
import signal
import sys
import time
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path

import lightning as L
import pandas as pd
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from rich.console import Console

from pipeline import DATA_DIR
from pipeline.atlas.layout import (
    attempt_path,
    datasets_path,
    description_path,
    lock_path,
    marker_path,
    neighbors_path,
    part_files_pattern,
    sparse_copy_path,
)
from pipeline.atlas.manifest import (
    INPUT_COLUMNS,
    atlas_description,
    damaged_parts,
    done_parts,
    forget_part,
    index_markers,
    read_units,
    write_datasets_table,
    write_units,
)
from pipeline.io.files import hold_lock, read_json, remove_temporaries, write_json
from pipeline.io.matrix import DatasetError
from pipeline.plan.datasets import (
    DatasetPlan,
    dataset_stat,
    plan_dataset,
    plan_datasets,
    plan_from_record,
    stored_plan_holds,
)
from pipeline.plan.inputs import expand_genomes, resolve_inputs
from pipeline.plan.units import Unit, make_units
from pipeline.run.datamodule import neighbor_files
from pipeline.run.module import AtlasPredictor, forward_numerics, precision_warning
from pipeline.run.progress import progress_callback
from pipeline.run.signals import install_stop_handlers, slurm_plugins, stop_requested
from pipeline.run.writer import PartWriter
from pipeline.tokens.batches import prepare_locked

log = logging.getLogger(__name__)

EXIT_OK, EXIT_DATASETS_FAILED, EXIT_PREEMPTED, EXIT_INTERRUPTED = 0, 3, 75, 130  # 75: "requeue me" (slurm/)
EXIT_ENVIRONMENT, EXIT_IN_USE = 4, 5  # the disk, a permission or a path stopped the run; another run holds out_dir


DEMO_DATASET = DATA_DIR / "neurips2021_human_bmmc_cite_rna_600x1000.h5ad"


# ----------------------------------------------------------------------------- run


def plan_run(
    cfg: DictConfig, vocabulary: dict[str, list[str]], run: int
) -> tuple[list[DatasetPlan], list[Unit], list[Unit]]:
    """Plan every dataset and the units; reuse the stored unit plan of ``out_dir`` if there is one.

    A dataset of the stored plan whose file has the size and modification time
    recorded is not opened again when its every unit of ``run`` is done, or
    when it was planned with the same read settings: its ``datasets.parquet``
    row is its plan (see :func:`stored_records`).

    Returns the datasets, the units, and the stored units of inputs changed
    since they were planned, which ``data.reembed_changed=true`` replaces (new
    part ids); without it a changed input is refused, before anything is embedded.
    """
    paths, settings, stored_units, stored = run_inputs(cfg)
    records, finished = stored_records(cfg.out_dir, run, stored_units)
    datasets: list[DatasetPlan | None] = [None] * len(paths)
    jobs = []
    for i, path in enumerate(paths):
        known, record = stored.get(i), records.get(i)
        if (record is not None and known and known.get("fingerprint") is not None
                and (i in finished or stored_plan_holds(record, settings[i]))
                and unchanged_on_disk(path, known)):  # fmt: skip
            datasets[i] = plan_from_record(record, known)  # its file is not opened
        else:
            jobs.append((i, path, settings[i], known))
    for plan in plan_datasets(jobs, vocabulary):
        datasets[plan.dataset] = plan
    for ds in datasets:
        if ds.status == "failed":
            log.error("%s", ds.error)
    changed = {ds.dataset: why for ds in datasets if (why := input_change(ds, stored.get(ds.dataset)))}
    if changed and not cfg.data.reembed_changed:
        dataset, why = next(iter(changed.items()))
        raise ValueError(
            f"{paths[dataset]}: changed since {cfg.out_dir} embedded it ({why}"
            f"{f'; {len(changed) - 1} other inputs changed too' if len(changed) > 1 else ''}); embed the changed "
            "datasets again with data.reembed_changed=true, or use a new out_dir"
        )
    replaced = [u for u in stored_units if u.dataset in changed]
    kept = [u for u in stored_units if u.dataset not in changed]
    units = make_units(datasets, int(cfg.data.cells_per_unit), kept)
    return datasets, units, replaced


def run_inputs(cfg: DictConfig) -> tuple[list[str], list[dict], list[Unit], dict[int, dict]]:
    """The datasets of a predict config, in dataset-id order, without opening a file but a 10x ``.h5``'s genome list.

    Returns their absolute paths, their data settings (``cfg.data`` with a
    catalog row's overrides), and the units and ``datasets.parquet`` rows of
    the plan stored in ``out_dir`` (none for a new atlas). Raises ValueError
    when the inputs no longer start with the datasets of the stored plan.
    """
    inputs = resolve_inputs(cfg.input if cfg.input else str(DEMO_DATASET))  # (path, a catalog row's settings)
    inputs = expand_genomes(inputs, str(cfg.data.counts))  # a barnyard 10x h5: one dataset per genome
    paths = [os.path.abspath(path) for path, _ in inputs]  # datasets.parquet must not depend on the cwd
    stored_units, stored = read_units(cfg.out_dir)
    for dataset, known in stored.items():
        if dataset >= len(paths) or paths[dataset] != os.path.abspath(known["path"]):
            raise ValueError(
                f"{cfg.out_dir} was planned with dataset {dataset} = {known['path']}, but the inputs now give "
                f"{paths[dataset] if dataset < len(paths) else 'nothing'}; keep the input list (new inputs may "
                "only be appended) or use another out_dir"
            )
    data = OmegaConf.to_container(cfg.data, resolve=True)
    return paths, [{**data, **overrides} for _, overrides in inputs], stored_units, stored


def stored_records(out_dir, run: int, stored_units: list[Unit]) -> tuple[dict[int, dict], set[int]]:
    """The ``datasets.parquet`` rows a resumed run may take as plans without opening the files, and which of
    those datasets are finished.

    Every dataset of the stored plan whose parts are whole: a finished one,
    and one still to embed when it was planned with the same read settings
    (:func:`stored_plan_holds`: a requeued job starts predicting at once). A
    dataset with a damaged part is embedded again, and planned again.
    """
    if not stored_units or not datasets_path(out_dir).exists():
        return {}, set()
    done = done_parts(out_dir, run)
    broken = damaged_parts(out_dir, done)  # once: a stat per file of every done part
    damaged = {u.dataset for u in stored_units if u.part in broken}
    table = pd.read_parquet(datasets_path(out_dir))
    table = table[~table.dataset.isin(damaged) & table.dataset.isin({u.dataset for u in stored_units})]
    pending = {u.dataset for u in stored_units if u.part not in done}
    records = {int(row["dataset"]): row for row in table.to_dict("records")}
    return records, set(records) - pending


def unchanged_on_disk(path: str, known: dict) -> bool:
    """Whether a file has the size and modification time the stored plan recorded (one ``stat``)."""
    try:
        return dataset_stat(path) == (int(known["size"]), int(known["mtime_ns"]))
    except OSError:
        return False


def input_change(ds: DatasetPlan, known: dict | None) -> str:
    """What changed in a planned input since the stored plan recorded it ('' if nothing, or if it cannot be told)."""
    if known is None or known.get("fingerprint") is None or ds.status == "failed":
        return ""  # new, planned by an older version, or unreadable now (then it fails by name)
    if ds.size != known["size"]:
        return f"{int(known['size']):,} bytes then, {ds.size:,} now"
    if ds.mtime_ns == known["mtime_ns"]:
        return ""
    if not ds.fingerprint:  # its first or last rows cannot be read: nothing to compare
        return "modified, and its counts cannot be compared"
    return "its counts differ" if ds.fingerprint != known["fingerprint"] else ""


def forget_units(out_dir: Path, run: int, units: list[Unit]) -> None:
    """Remove what ``run`` wrote for ``units`` (their markers and part files) and their datasets' kNN graphs."""
    for unit in units:
        forget_part(out_dir, run, unit.part)
        marker_path(out_dir, run, unit.part, "failed").unlink(missing_ok=True)
        for path in out_dir.glob(part_files_pattern(run, unit.part)):
            path.unlink(missing_ok=True)
    for dataset in {u.dataset for u in units}:
        neighbors_path(out_dir, dataset).unlink(missing_ok=True)
        sparse_copy_path(out_dir, dataset).unlink(missing_ok=True)


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


def predict_command() -> str | None:
    """The command line of this run (``scatlas predict`` and its overrides), for ``validate`` to tell how to repair."""
    if not HydraConfig.initialized():
        return None
    return shlex.join(["scatlas", "predict", *HydraConfig.get().overrides.task])


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
        # only when set, so atlases made before the setting existed resume
        **({"soma_filter": str(cfg.data.soma_filter)} if cfg.data.get("soma_filter") else {}),
        "gene_draw": "dataset identity",  # seeded by datasets.parquet's identity (before: the position in the inputs)
    }


def run_predict(cfg: DictConfig, extra_lines: Callable[[Path, int], list[str]] | None = None) -> int:
    """Run (or resume) one atlas; returns the process exit code.

    ``extra_lines(out_dir, run)`` adds lines to the end-of-run summary (the
    command line adds the demo model's held-out accuracy). Global rank 0 holds
    the lock of ``out_dir`` for the whole run (the other ranks are its own
    processes), so a second run into the same directory refuses at once.
    """
    out_dir = Path(cfg.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    install_stop_handlers()
    run = resolve_run(out_dir, cfg.run)
    writer = PartWriter(out_dir, run, earlier_world_size(out_dir, run))
    numerics = NumericsReport()
    trainer: L.Trainer = instantiate(
        cfg.trainer, callbacks=[writer, progress_callback(), numerics], plugins=slurm_plugins()
    )
    with hold_lock(lock_path(out_dir), str(out_dir)) if trainer.global_rank == 0 else nullcontext():
        return _embed(cfg, out_dir, run, trainer, numerics, extra_lines)


def earlier_world_size(out_dir: Path, run: int) -> int:
    """The largest world size of the earlier attempts of ``run`` (0 for a new run): the ranks whose part files
    of a unit a writer may find and replace."""
    path = description_path(out_dir)
    runs = read_json(path).get("runs", []) if path.exists() else []
    return max((a["world_size"] for r in runs if r["run"] == run for a in r["attempts"]), default=0)


def _embed(cfg: DictConfig, out_dir: Path, run: int, trainer: L.Trainer, numerics: NumericsReport, extra_lines) -> int:
    """Plan, record the attempt, predict and report: :func:`run_predict` once it holds ``out_dir``.

    Rank 0 plans and stores the plan; the other ranks open no input to plan:
    they read the stored plan after Lightning's barrier, before setup (see
    :class:`pipeline.run.datamodule.AtlasDataModule`).
    """
    predictor = AtlasPredictor(name=cfg.model.name, checkpoint=cfg.model.checkpoint,
                               max_len=int(cfg.model.max_len), seed=int(cfg.seed))  # fmt: skip
    model = predictor.model
    datamodule = instantiate(cfg.data)
    plan_settings = dict(out_dir=out_dir, run=run, seed=int(cfg.seed), vocabulary=model.config.genes,
                         vocabulary_offsets=model.config.organism_offsets,
                         uses_neighbors=model.config.expr_emb_style == "metacell")  # fmt: skip
    if trainer.global_rank != 0:
        datamodule.attach(units=None, datasets=None, **plan_settings)
        stopped = _predict(trainer, predictor, datamodule)
        if datamodule.refused:  # rank 0 stopped the attempt before predicting, and said why
            raise ValueError(datamodule.refused)
        return EXIT_OK if stopped is None else stopped
    # ranks started by SLURM or torchrun wait for rank 0 at the barrier: it must meet them there, even to stop
    waited_for = trainer.world_size > 1 and trainer.strategy.cluster_environment.creates_processes_externally
    try:
        return _embed_rank_zero(cfg, out_dir, run, trainer, numerics, extra_lines, predictor, datamodule,
                                plan_settings, waited_for)  # fmt: skip
    except Exception as err:
        if waited_for and not datamodule.attached and stop_requested() is None:  # not past the barrier yet
            write_json(attempt_path(out_dir), {"error": str(err)})
            datamodule.attach(units=[], datasets=[], **plan_settings)
            _predict(trainer, predictor, datamodule)
        raise


def _embed_rank_zero(cfg, out_dir, run, trainer, numerics, extra_lines, predictor, datamodule, plan_settings,
                     waited_for) -> int:  # fmt: skip
    model = predictor.model
    fingerprint = settings_fingerprint(cfg, model)
    description_file = description_path(out_dir)
    existing = read_json(description_file) if description_file.exists() else {}
    if existing.get("shards"):
        raise ValueError(f"{out_dir} was made by scatlas merge of shard atlases ({existing['shards'][0]['path']}, "
                         "...): predict into the shards, then merge them again into a new directory")  # fmt: skip
    runs = existing.get("runs", [])
    previous = next((r for r in runs if r["run"] == run), None)
    if previous and previous["settings"] != fingerprint:
        changed = sorted(k for k in fingerprint if previous["settings"].get(k) != fingerprint[k])
        raise ValueError(
            f"{out_dir}: run {run} was made with other settings ({', '.join(changed)}); "
            f"resume with the same settings, or start a new run with run={max(r['run'] for r in runs) + 1}"
        )

    datasets, units, replaced = plan_run(cfg, model.config.genes, run)
    done, failed = index_markers(out_dir, run)
    finished = previous and not replaced and all(unit.part in done for unit in units)
    damaged = damaged_parts(out_dir, done)  # one stat per file of every done part
    if finished and not waited_for and not damaged:  # nothing to predict, no Lightning noise
        if any(ds.status == "failed" for ds in datasets):
            table = write_datasets_table(out_dir, datasets, units, done, failed)
            print_summary(out_dir, table, units, run, done, extra_lines)
            return EXIT_DATASETS_FAILED
        n_cells = sum(int(record["n_cells"]) for record in done.values())
        print(f"atlas {out_dir} is complete, nothing to do: {n_cells:,} cells embedded (run {run}, "
              f"{len(units)} units)")  # fmt: skip
        return EXIT_OK

    def record_numerics(found: dict) -> None:  # the attempt in atlas.json gets the forward's device and precision
        entry["attempts"][-1].update(found)
        write_json(description_file, atlas_description(cfg, model, run, runs))

    numerics.record = record_numerics
    remove_temporaries(out_dir)
    for part, problem in damaged.items():
        log.warning("%s: part %d is damaged (%s): its unit is embedded again", out_dir, part, problem)
        forget_part(out_dir, run, part)
    if replaced:
        log.warning("%s: embedding %d units of changed inputs again (data.reembed_changed=true)", out_dir,
                    len(replaced))  # fmt: skip
        forget_units(out_dir, run, replaced)
    write_units(out_dir, units, {d.dataset: {c: getattr(d, c) for c in INPUT_COLUMNS} for d in datasets})
    if previous is None:
        runs.append({"run": run, "settings": fingerprint, "attempts": []})
    entry = next(r for r in runs if r["run"] == run)
    entry["attempts"].append({"started": time.strftime("%Y-%m-%dT%H:%M:%S"), "world_size": trainer.world_size,
                              "command": predict_command()})  # fmt: skip
    write_json(description_file, atlas_description(cfg, model, run, runs))
    write_datasets_table(out_dir, datasets, units, *index_markers(out_dir, run))
    if trainer.world_size > 1:  # the other ranks read the plan just stored, after the barrier
        write_json(attempt_path(out_dir), {"error": "", "started": entry["attempts"][-1]["started"]})
    datamodule.attach(units=units, datasets=datasets, **plan_settings)
    stopped = _predict(trainer, predictor, datamodule)
    if stopped is not None:
        return stopped
    done, failed = index_markers(out_dir, run)
    table = write_datasets_table(out_dir, datasets, units, done, failed)
    for dataset in table.dataset[table.status == "done"]:  # a done dataset's sparse copy is not read again
        sparse_copy_path(out_dir, dataset).unlink(missing_ok=True)
    entry["attempts"][-1]["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S")
    write_json(description_file, atlas_description(cfg, model, run, runs, with_names=True))
    print_summary(out_dir, table, units, run, done, extra_lines)
    return EXIT_DATASETS_FAILED if (table.status == "failed").any() else EXIT_OK


def _predict(trainer: L.Trainer, predictor: AtlasPredictor, datamodule) -> int | None:
    """``trainer.predict`` and the barrier after it; None when it ran to the end, else the exit code of a stop
    requested by a signal (the rank stopped at a batch boundary; done units are kept)."""
    try:
        trainer.predict(predictor, datamodule=datamodule, return_predictions=False)
    except BaseException:
        if stop_requested() is None:
            raise
        log.warning("rank %d stopped by %s at a batch boundary; done units are kept, and the same command "
                    "(a requeued job) resumes the atlas", trainer.global_rank, signal.Signals(stop_requested()).name)  # fmt: skip
        trainer.strategy.barrier()  # release ranks that finished and wait for the others
        return EXIT_INTERRUPTED if stop_requested() == signal.SIGINT else EXIT_PREEMPTED
    trainer.strategy.barrier()
    return None


class NumericsReport(L.Callback):
    """On rank 0, once the forward's settings are chosen: one log line with the device, precision and fp32
    matmul mode, a warning for 16-bit autocast on a CPU, and ``record(numerics)`` (the attempt in ``atlas.json``)."""

    def __init__(self, record: Callable[[dict], None] | None = None):
        self.record = record  # set by run_predict once the run's attempt is in atlas.json

    def on_predict_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.global_rank != 0:
            return
        numerics = forward_numerics(pl_module.device, trainer.precision)
        log.info("forward on %s, precision %s, fp32 matmul mode %s", *numerics.values())
        warning = precision_warning(numerics)
        if warning:
            log.warning("%s", warning)
            numerics["warning"] = warning
        if self.record is not None:
            self.record(numerics)


def run_neighbors(cfg: DictConfig, task: int = 0, n_tasks: int = 1) -> int:
    """``scatlas neighbors``: the kNN graphs (and sparse copies) of the datasets left to embed, on CPUs only.

    Array task ``task`` of ``n_tasks`` takes the datasets whose id is ``task``
    modulo ``n_tasks``. Run before the GPU job (same config, same ``out_dir``),
    it leaves the predict run only graphs to load; a graph being built by
    another process is waited for, not built twice. Returns 0, or 3 if a
    dataset failed (predict records it when it reaches it).
    """
    from models import build_model

    out_dir = Path(cfg.out_dir)
    model = build_model(cfg.model.name, cfg.model.checkpoint, int(cfg.seed))
    if model.config.expr_emb_style != "metacell":
        print(f"model {cfg.model.name} uses no neighbours: nothing to build")
        return EXIT_OK
    run = resolve_run(out_dir, cfg.run)
    paths, settings, stored_units, stored = run_inputs(cfg)  # a task opens its own datasets' files only
    done = done_parts(out_dir, run)
    finished = set(stored) - {u.dataset for u in stored_units if u.part not in done}
    mine = [i for i in range(len(paths)) if i % n_tasks == task and i not in finished]
    n_failed = 0
    for i in mine:
        start = time.perf_counter()
        ds = plan_dataset(i, paths[i], model.config.genes, settings[i], stored.get(i))
        error = ds.error if ds.status == "failed" else ""
        try:
            if not error:
                prepare_locked(ds, neighbor_files(out_dir, i), int(cfg.data.n_neighbors), int(cfg.seed))
        except DatasetError as err:
            error = str(err)
        finally:
            if ds.matrix is not None:
                ds.matrix.close()
        if error:
            log.error("%s", error)
            n_failed += 1
            continue
        print(f"dataset {i}: graph ready in {time.perf_counter() - start:.1f} s ({ds.n_cells:,} cells, {ds.path})")
    print(f"task {task}/{n_tasks}: {len(mine) - n_failed} graphs ready, {n_failed} failed, in {out_dir}")
    return EXIT_DATASETS_FAILED if n_failed else EXIT_OK


def print_summary(out_dir: Path, table: pd.DataFrame, units: list[Unit], run: int, done: dict[int, dict],
                  extra_lines=None) -> None:  # fmt: skip
    """The end-of-run report; lines are never wrapped, so the commands it ends with can be pasted."""
    console = Console(stderr=False, soft_wrap=True)
    console.print(f"[bold]atlas[/bold] {out_dir.resolve()}  (run {run})")
    console.print(
        f"units done {sum(u.part in done for u in units)}/{len(units)}, cells embedded "
        f"{int(table.n_embedded.sum()):,}, dropped {int(table.n_dropped.sum()):,}, "
        f"datasets done {(table.status == 'done').sum()}/{len(table)}"
    )
    for row in table[table.status == "failed"].itertuples():
        console.print(f"[red]failed[/red] {row.error}", highlight=False)
    for line in extra_lines(out_dir, run) if extra_lines else []:
        console.print(line, markup=False, highlight=False)
    command, atlas = scatlas_command(), shlex.quote(str(out_dir))
    print(f"read it:  {command} status {atlas}\n          {command} validate {atlas}")


def scatlas_command() -> str:
    """``scatlas`` as this process was started, for a user to paste: ``scatlas`` when that is the command
    on PATH, else the path that was typed (``.venv/bin/scatlas``) or ``<python> -m pipeline``."""
    argv = sys.orig_argv  # the command line as typed; the CLI rewrites sys.argv for DDP
    if "-m" in argv[:-1] and argv[argv.index("-m") + 1].startswith("pipeline"):
        return shlex.join(argv[: argv.index("-m")] + ["-m", "pipeline"])
    script = next((arg for arg in argv[1:] if not arg.startswith("-")), "scatlas")
    on_path = shutil.which("scatlas")
    if on_path and os.path.exists(script) and os.path.samefile(on_path, script):
        return "scatlas"
    return shlex.quote(script)
