"""``scatlas predict``: plan, embed with Lightning, write parts atomically, report.

The Lightning pieces are used as they are: ``Trainer.predict`` drives the loop,
:class:`AtlasPredictor` wraps the network, :class:`PartWriter` (a
``BasePredictionWriter``) writes each unit's files as soon as its last batch is
predicted, then marks the unit done.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import time
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import lightning as L
import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from lightning.pytorch.callbacks import BasePredictionWriter, TQDMProgressBar
from omegaconf import DictConfig, OmegaConf

from models import build_model
from models.checkpoint import file_sha256
from pipeline import manifest
from pipeline.atlas import term_names
from pipeline.data import sparse_copy_path
from pipeline.plan import DatasetPlan, Unit, make_units, plan_dataset, resolve_inputs

log = logging.getLogger(__name__)

EXIT_OK, EXIT_DATASETS_FAILED, EXIT_PREEMPTED, EXIT_INTERRUPTED = 0, 3, 75, 130  # 75: "requeue me" (slurm/)
DEMO_DATASET = Path(__file__).parent / "data" / "neurips2021_human_bmmc_cite_rna_600x1000.h5ad"


def tool_version() -> str:
    try:
        return version("scprint-atlas")
    except PackageNotFoundError:
        return "unknown"


KEEP_FREED_BYTES = 256 * 2**20  # blocks up to this size stay in the heap when freed (see keep_freed_memory)


def keep_freed_memory() -> bool:
    """Let glibc's malloc keep freed blocks of up to 256 MiB for reuse instead of returning them to the system.

    By default glibc serves blocks above 32 MiB (less before its threshold
    adapts) with fresh ``mmap`` calls and trims the heap as soon as 64 MiB is
    free at its top. A CPU forward allocates and frees the same large
    activations batch after batch, so every batch faulted its pages in again:
    on the shipped 10,000-cell file that was a fifth of the forward's time,
    spent in the kernel. Keeping them costs no more than the peak (the memory
    is reused, not grown). Set in the process that runs the forward, once its
    kNN graphs are built: their temporaries, hundreds of MiB each, still go
    back to the system. DataLoader workers keep glibc's defaults. Returns
    False where there is no glibc (macOS, musl): nothing is changed there.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3  # mallopt parameters, from glibc's malloc.h
    return bool(libc.mallopt(m_mmap_threshold, KEEP_FREED_BYTES) and libc.mallopt(m_trim_threshold, KEEP_FREED_BYTES))


FP32_MATMUL_RTOL = 1e-5  # fp32 matmuls are ~1e-6 from float64 here; one pass of bf16 inputs is 6e-3 to 7e-3
PROBE_TOKENS = 8192  # tokens per timed probe: a batch of max_len 256 or 4096, two cells at 3200


def fp32_matmul_probe(dim: int, n_heads: int, n_tokens: int, seed: int = 0) -> tuple[float, float]:
    """Error and time of fp32 matmuls and attention at a transformer block's shapes, under the current settings.

    The probe is ``[T, dim] @ [dim, 4 dim] @ [4 dim, dim]`` and scaled-dot-product
    attention over cells of ``n_tokens`` tokens in ``n_heads`` heads, for
    ``T`` = :data:`PROBE_TOKENS` tokens (at least one cell), on random inputs.

    Returns
    -------
    error
        The largest absolute difference from float64 over the largest absolute
        float64 value, on the matmuls and on the first cell's attention.
    seconds
        The fastest of three timed runs of the probe, after one untimed.
    """
    gen = torch.Generator().manual_seed(seed)
    n_cells = max(1, PROBE_TOKENS // n_tokens)
    x = torch.randn(n_cells * n_tokens, dim, generator=gen)
    w_in, w_out = torch.randn(dim, 4 * dim, generator=gen), torch.randn(4 * dim, dim, generator=gen) / 2
    q, k, v = torch.randn(3, n_cells, n_heads, n_tokens, dim // n_heads, generator=gen)

    def block():
        return x @ w_in @ w_out, F.scaled_dot_product_attention(q, k, v)

    with torch.inference_mode():
        seconds = []
        for _ in range(4):
            start = time.perf_counter()
            mlp, attention = block()
            seconds.append(time.perf_counter() - start)
        mlp_ref = x.double() @ w_in.double() @ w_out.double()
        attention_ref = F.scaled_dot_product_attention(q[:1].double(), k[:1].double(), v[:1].double())
    pairs = [(mlp, mlp_ref), (attention[:1], attention_ref)]
    error = max(float((out.double() - ref).abs().max() / ref.abs().max()) for out, ref in pairs)
    return error, min(seconds[1:])


def fp32_matmul_precision() -> str | None:
    """``torch.backends.mkldnn.matmul.fp32_precision``, or None with a torch that lacks the setting or oneDNN."""
    if not torch.backends.mkldnn.is_available():
        return None
    return getattr(getattr(torch.backends.mkldnn, "matmul", None), "fp32_precision", None)


def fast_fp32_matmul(dim: int, n_heads: int, n_tokens: int) -> bool:
    """Let oneDNN run fp32 matmuls and CPU attention on bf16 units where that is as exact as fp32, and faster.

    ``torch.backends.mkldnn.matmul.fp32_precision = "bf16"`` allows oneDNN to
    compute fp32 products with bf16 instructions (AVX512-BF16, AMX). How exact
    and how fast that is depends on the CPU's kernels and on the shapes. On the
    reference machine (AMD EPYC, AVX512-BF16) the products stay within ~1e-6 of
    float64, as fp32 instructions do, and the small model's forward runs 1.7x
    faster (outputs 2.5e-6 from strict fp32); the tiny model's attention, with
    heads of 8 dimensions, runs slower. Kernels that rounded the inputs to one
    bf16 term would be 6e-3 to 7e-3 off. So the setting is kept only if, at the
    model's shapes (:func:`fp32_matmul_probe`), it is within 1e-5 of float64
    and at least 10% faster than fp32 instructions; otherwise it is put back.
    Returns whether it is on; always False with a torch that lacks the
    setting or oneDNN.
    """
    previous = fp32_matmul_precision()
    if previous is None:
        return False
    matmul = torch.backends.mkldnn.matmul
    matmul.fp32_precision = "ieee"
    fp32_seconds = fp32_matmul_probe(dim, n_heads, n_tokens)[1]
    matmul.fp32_precision = "bf16"
    error, bf16_seconds = fp32_matmul_probe(dim, n_heads, n_tokens)
    keep = error <= FP32_MATMUL_RTOL and bf16_seconds < 0.9 * fp32_seconds
    log.info("fp32 matmuls on bf16 units: %.2g from float64, %.2gx the time of fp32 units: %s", error,
             bf16_seconds / fp32_seconds, "used" if keep else "not used")  # fmt: skip
    if not keep:
        matmul.fp32_precision = previous
    return keep


class Preempted(Exception):
    """Raised at a batch boundary after SIGTERM / SIGUSR1: the current unit is abandoned, done units stay done."""


_STOP = {"signal": None}


def _request_stop(signum, frame) -> None:
    if signum == signal.SIGINT and _STOP["signal"] is not None:
        raise KeyboardInterrupt  # a second Ctrl-C stops at once
    if _STOP["signal"] is None:
        log.warning("received signal %d: stopping at the next batch (done units are kept; run the same "
                    "command again to resume)", signum)  # fmt: skip
    _STOP["signal"] = signum


def install_stop_handlers() -> None:
    """SIGTERM / SIGUSR1 (SLURM's warning before a time limit or pre-emption) and Ctrl-C ask the run to stop.

    The run stops at the next batch boundary: the current unit is abandoned,
    done units stay done. Installed before Lightning's own handlers, so
    Lightning keeps ours and does not save a training checkpoint on SIGUSR1.
    """
    _STOP["signal"] = None
    for signum in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):
        signal.signal(signum, _request_stop)


class AtlasPredictor(L.LightningModule):
    """The scPRINT-2 network as a LightningModule: batch of tokens -> (embs, top ids, scores) on CPU."""

    def __init__(self, name: str = "tiny", checkpoint: str | None = None, max_len: int = 256, seed: int = 0):
        super().__init__()
        self.model = build_model(name, checkpoint, seed)
        self.name, self.max_len = name, max_len

    def on_predict_start(self) -> None:
        keep_freed_memory()  # after the kNN graphs (setup), so their large temporaries still go back to the system
        self._fp32_precision = fp32_matmul_precision()  # put back at the end of the run
        if self.device.type == "cpu":
            fast_fp32_matmul(self.model.config.d_model, self.model.config.nhead, self.max_len)

    def on_predict_end(self) -> None:
        if self._fp32_precision is not None:
            torch.backends.mkldnn.matmul.fp32_precision = self._fp32_precision

    def predict_step(self, batch: dict, batch_idx: int) -> dict | None:
        if batch["error"] or len(batch["genes"]) == 0:
            return None
        out = self.model.predict(batch["genes"], batch["counts"], batch.get("knn_counts"), batch.get("knn_dists"))
        if not out["embs"].is_cuda:
            return out
        # copy to pinned host memory without waiting: the GPU goes on with the next batch, and the writer
        # waits for the copies (host_outputs) only when the unit's files are written
        host = {k: torch.empty(v.shape, dtype=v.dtype, pin_memory=True).copy_(v, non_blocking=True)
                for k, v in out.items()}  # fmt: skip
        host["copied"] = torch.cuda.Event()
        host["copied"].record()
        return host


def host_outputs(prediction: dict) -> dict[str, np.ndarray]:
    """A predict step's outputs as numpy arrays, once their copy from the GPU (if any) is complete."""
    if "copied" in prediction:
        prediction["copied"].synchronize()
    return {k: v.numpy() for k, v in prediction.items() if k != "copied"}


class PartWriter(BasePredictionWriter):
    """Collects the batches of a unit and writes its five files, then its done marker."""

    def __init__(self, out_dir: Path, run: int):
        super().__init__(write_interval="batch")
        self.out_dir, self.run = Path(out_dir), run
        self.pending: dict[int, dict] = {}
        self.n_cells = 0
        self.n_failed = 0

    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx):
        if _STOP["signal"] is not None:
            raise Preempted(f"stopped by signal {_STOP['signal']}")
        unit = Unit(*batch["unit"])
        state = self.pending.setdefault(unit.part, {"outputs": [], "cells": [], "dropped": [], "error": "",
                                                    "started": time.time()})  # fmt: skip
        if batch["error"]:
            state["error"] = state["error"] or batch["error"]
        else:
            state["cells"].append(batch["cells"])
            state["dropped"].append(batch["dropped"])
            if prediction is not None:
                state["outputs"].append(prediction)
        if not batch["last"]:
            return
        del self.pending[unit.part]
        rank = trainer.global_rank
        if state["error"]:
            log.error("part %d failed: %s", unit.part, state["error"])
            manifest.mark_failed(self.out_dir, self.run, unit, rank, state["error"])
            self.n_failed += 1
            return
        record = write_part(self.out_dir, self.run, unit, rank, state, pl_module.model.config)
        self.n_cells += record["n_cells"]
        manifest.mark_done(self.out_dir, self.run, record)
        log.info("rank %d: part %d done, %d cells embedded + %d dropped in %.1f s (%.0f cells/s)", rank, unit.part,
                 record["n_cells"], record["n_dropped"], record["seconds"], unit.n_cells / max(record["seconds"], 1e-9))


def write_part(out_dir: Path, run: int, unit: Unit, rank: int, state: dict, config) -> dict:
    """Write one unit's embs/top3/scores/cells/dropped files atomically; return its done record."""
    width = sum(w for _, w in config.embedding_blocks)
    n_top = sum(config.topk.values())
    outputs = [host_outputs(o) for o in state["outputs"]]
    arrays = {
        "embs": np.concatenate([o["embs"] for o in outputs]) if outputs else np.zeros((0, width), np.float32),
        "top3": np.concatenate([o["top_ids"] for o in outputs]).astype(np.int32)
        if outputs else np.zeros((0, n_top), np.int32),
        "scores": np.concatenate([o["top_scores"] for o in outputs]) if outputs else np.zeros((0, n_top), np.float32),
    }  # fmt: skip
    cells = pd.DataFrame({k: np.concatenate([c[k] for c in state["cells"]]) for k in state["cells"][0]})
    dropped = pd.DataFrame({k: np.concatenate([d[k] for d in state["dropped"]]) for k in state["dropped"][0]})
    cells["obs_name"] = cells["obs_name"].astype(str)
    cells["organism"] = cells["organism"].astype(str)
    dropped["obs_name"] = dropped["obs_name"].astype(str)
    dropped["reason"] = dropped["reason"].astype(str)
    if len(cells) != len(arrays["embs"]):
        raise RuntimeError(f"part {unit.part}: {len(cells)} cells but {len(arrays['embs'])} embeddings")
    stem = manifest.part_stem(run, unit.part, rank)
    for stale in out_dir.glob(f"step_{run}__predict_part_{unit.part}_*"):  # an earlier attempt on another rank
        if not stale.name.startswith(stem + "_"):
            stale.unlink(missing_ok=True)
    files = {}
    for name, array in arrays.items():
        path = out_dir / f"{stem}_{name}.npz"
        manifest.atomic_write(path, lambda tmp, a=array, n=name: _save_npz(tmp, n, a))
        files[path.name] = file_sha256(path)
    for name, table in (("cells", cells), ("dropped", dropped)):
        path = out_dir / f"{stem}_{name}.parquet"
        manifest.atomic_write(path, lambda tmp, t=table: t.to_parquet(tmp, index=False))
        files[path.name] = file_sha256(path)
    return {
        "part": unit.part, "dataset": unit.dataset, "start": unit.start, "stop": unit.stop, "rank": rank,
        "stem": stem, "n_cells": len(cells), "n_dropped": len(dropped), "files": files,
        "seconds": round(time.time() - state["started"], 3), "finished": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }  # fmt: skip


def _save_npz(path: str, name: str, array: np.ndarray) -> None:
    with open(path, "wb") as fh:
        np.savez(fh, **{name: array})


class CellsPerSecondBar(TQDMProgressBar):
    """Lightning's progress bar, with cells/s and cells embedded."""

    def on_predict_start(self, trainer, pl_module):
        super().on_predict_start(trainer, pl_module)
        self._t0, self._cells = time.time(), 0

    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        self._cells += 0 if batch["error"] else len(batch["cells"]["row"])
        elapsed = max(time.time() - self._t0, 1e-6)
        postfix = {"cells": self._cells, "cells/s": f"{self._cells / elapsed:.0f}"}
        self.predict_progress_bar.set_postfix(postfix, refresh=False)  # drawn once, by the update below
        super().on_predict_batch_end(trainer, pl_module, outputs, batch, batch_idx, dataloader_idx)


# ----------------------------------------------------------------------------- run


def plan_run(cfg: DictConfig, vocabulary: dict[str, list[str]]) -> tuple[list[DatasetPlan], list[Unit]]:
    """Plan every dataset and the units; reuse the stored unit plan of ``out_dir`` if there is one."""
    inputs = resolve_inputs(cfg.input if cfg.input else str(DEMO_DATASET))  # (path, a catalog row's settings)
    paths = [os.path.abspath(path) for path, _ in inputs]  # datasets.parquet must not depend on the cwd
    stored_units, stored_paths = manifest.read_units(cfg.out_dir)
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
    path = out_dir / "atlas.json"
    if path.exists():
        runs = manifest.read_json(path).get("runs", [])
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
    }


def atlas_description(cfg: DictConfig, model, run: int, runs: list[dict], with_names: bool = False) -> dict:
    """The content of ``atlas.json``; ``with_names`` adds ``label_names`` (term -> ontology name, a slow first lookup)."""
    config = model.config
    blocks, start = [], 0
    for name, width in config.embedding_blocks:
        blocks.append({"name": name, "start": start, "width": width})
        start += width
    classes, col = [], 0
    for name, k in config.topk.items():
        classes.append({"name": name, "k": k, "start": col, "n_labels": config.classes[name]})
        col += k
    description = {
        "format": "scprint-atlas/1",
        "tool_version": tool_version(),
        "embedding_width": start,
        "embedding_blocks": blocks,
        "top_columns": col,
        "classes": classes,
        "labels": {c: {str(code): term for code, term in config.label_decoders[c].items() if code < n}
                   for c, n in config.classes.items()},  # fmt: skip
        "model": {
            "name": cfg.model.name,
            "checkpoint": model.checkpoint_path,
            "checkpoint_sha256": model.checkpoint_sha256,
            "max_len": int(cfg.model.max_len),
            "organisms": config.organisms,
            "vocabulary_size": len(config.vocabulary),
        },
        "config": OmegaConf.to_container(cfg, resolve=True),
        "run": run,
        "runs": runs,
    }
    if with_names:
        description["label_names"] = term_names(t for labels in description["labels"].values() for t in labels.values())
    return description


def run_predict(cfg: DictConfig) -> int:
    """Run (or resume) one atlas; returns the process exit code."""
    out_dir = Path(cfg.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    install_stop_handlers()
    predictor = AtlasPredictor(name=cfg.model.name, checkpoint=cfg.model.checkpoint,
                               max_len=int(cfg.model.max_len), seed=int(cfg.seed))  # fmt: skip
    model = predictor.model
    run = resolve_run(out_dir, cfg.run)
    fingerprint = settings_fingerprint(cfg, model)
    runs = manifest.read_json(out_dir / "atlas.json").get("runs", []) if (out_dir / "atlas.json").exists() else []
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
        manifest.remove_temporaries(out_dir)
        manifest.write_units(out_dir, units, {d.dataset: d.path for d in datasets})
        if previous is None:
            runs.append({"run": run, "settings": fingerprint, "attempts": []})
        entry = next(r for r in runs if r["run"] == run)
        entry["attempts"].append({"started": time.strftime("%Y-%m-%dT%H:%M:%S"), "world_size": trainer.world_size})
        manifest.write_json(out_dir / "atlas.json", atlas_description(cfg, model, run, runs))
        write_datasets_table(out_dir, datasets, units, run)
    try:
        trainer.predict(predictor, datamodule=datamodule, return_predictions=False)
    except BaseException:
        if _STOP["signal"] is None:
            raise
        log.warning("rank %d stopped by signal %d; done units are kept, resume with the same command",
                    trainer.global_rank, _STOP["signal"])  # fmt: skip
        trainer.strategy.barrier()  # release ranks that finished and wait for the others
        return EXIT_INTERRUPTED if _STOP["signal"] == signal.SIGINT else EXIT_PREEMPTED
    trainer.strategy.barrier()
    if trainer.global_rank != 0:
        return EXIT_OK
    table = write_datasets_table(out_dir, datasets, units, run)
    for dataset in table.dataset[table.status == "done"]:  # a done dataset's sparse copy is not read again
        sparse_copy_path(out_dir, dataset).unlink(missing_ok=True)
    entry["attempts"][-1]["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S")
    manifest.write_json(out_dir / "atlas.json", atlas_description(cfg, model, run, runs, with_names=True))
    print_summary(out_dir, table, units, run)
    return EXIT_DATASETS_FAILED if (table.status == "failed").any() else EXIT_OK


def write_datasets_table(out_dir: Path, datasets: list[DatasetPlan], units: list[Unit], run: int) -> pd.DataFrame:
    """``datasets.parquet``: planning facts plus each dataset's status from the part markers."""
    done = manifest.done_parts(out_dir, run)
    failed = manifest.failed_parts(out_dir, run)
    rows = []
    for ds in datasets:
        row = ds.record()
        mine = [u for u in units if u.dataset == ds.dataset]
        row["n_units"] = len(mine)
        row["n_units_done"] = sum(u.part in done for u in mine)
        row["n_embedded"] = sum(done[u.part]["n_cells"] for u in mine if u.part in done)
        row["n_dropped"] = sum(done[u.part]["n_dropped"] for u in mine if u.part in done)
        errors = [failed[u.part]["error"] for u in mine if u.part in failed and u.part not in done]
        if ds.status != "failed":
            if errors:
                row["status"], row["error"] = "failed", errors[0]
            elif mine and row["n_units_done"] == len(mine):
                row["status"] = "done"
            else:
                row["status"] = "pending"
        rows.append(row)
    table = pd.DataFrame(rows)
    manifest.atomic_write(out_dir / "datasets.parquet", lambda tmp: table.to_parquet(tmp, index=False))
    return table


def print_summary(out_dir: Path, table: pd.DataFrame, units: list[Unit], run: int) -> None:
    from rich.console import Console

    console = Console(stderr=False)
    done = manifest.done_parts(out_dir, run)
    console.print(f"[bold]atlas[/bold] {out_dir.resolve()}  (run {run})")
    console.print(
        f"units done {sum(u.part in done for u in units)}/{len(units)}, cells embedded "
        f"{int(table.n_embedded.sum()):,}, dropped {int(table.n_dropped.sum()):,}, "
        f"datasets done {(table.status == 'done').sum()}/{len(table)}"
    )
    for row in table[table.status == "failed"].itertuples():
        console.print(f"[red]failed[/red] {row.error}")
    from pipeline.train_demo import heldout_report  # the demo model: its labels and held-out accuracy

    for line in heldout_report(out_dir, run):
        console.print(line, markup=False, highlight=False, soft_wrap=True)
    console.print(f"read it: scatlas status {out_dir}  |  scatlas validate {out_dir}")
