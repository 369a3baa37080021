"""Writing parts: a unit's batches -> its five files, written atomically, then its done marker."""

from __future__ import annotations

import logging
import queue
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd
from lightning.pytorch.callbacks import BasePredictionWriter

from pipeline.atlas.layout import PART_ARRAYS, PART_TABLES, part_file, part_stem
from pipeline.atlas.manifest import mark_done, mark_failed
from pipeline.io.files import atomic_write, file_sha256
from pipeline.plan.units import Unit
from pipeline.run.module import host_outputs
from pipeline.run.signals import Preempted, stop_requested

log = logging.getLogger(__name__)

#: Finished units waiting for the writer thread; the predict loop waits when this many are queued.
QUEUED_UNITS = 2


class PartWriter(BasePredictionWriter):
    """Collects the batches of a unit; a writer thread writes its five files, then its done marker.

    The predict loop hands a finished unit to the thread through a bounded
    queue (``QUEUED_UNITS``) and goes on with the next batch: the files, their
    checksums and the wait for a GPU's copies to the host are off its path.
    A write error is raised in the predict loop at the next unit or at the end.
    The thread is joined at the end of the run and when it stops on an
    exception (SIGTERM, Ctrl-C): units already handed over are written, the
    unit in progress is abandoned.
    """

    def __init__(self, out_dir: Path, run: int, earlier_world_size: int = 0):
        super().__init__(write_interval="batch")
        self.out_dir, self.run = Path(out_dir), run
        self.earlier_world_size = earlier_world_size  # the most ranks an earlier attempt of this run had
        self.pending: dict[int, dict] = {}
        self.n_cells = 0
        self.n_failed = 0
        self._queue: queue.Queue | None = None
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._batch_ended = time.time()

    def on_predict_start(self, trainer, pl_module) -> None:
        self._batch_ended = time.time()

    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx):
        if stop_requested() is not None:
            raise Preempted(f"stopped by signal {stop_requested()}")
        unit = Unit(*batch["unit"])
        state = self.pending.setdefault(unit.part, {"outputs": [], "cells": [], "dropped": [], "error": "",
                                                    "started": self._batch_ended})  # fmt: skip
        self._batch_ended = time.time()  # when the next batch began: the loop reads it while this one is written
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
            mark_failed(self.out_dir, self.run, unit, rank, state["error"])
            self.n_failed += 1
            return
        self._raise_write_error()
        state["predicted"] = time.time()  # the unit's time is its batches', not its wait for the writer
        if self._thread is None:
            self._queue = queue.Queue(maxsize=QUEUED_UNITS)
            self._thread = threading.Thread(target=self._write_units, name="part-writer", daemon=True)
            self._thread.start()
        self._queue.put((unit, rank, state, pl_module.model.config))

    def on_predict_end(self, trainer, pl_module) -> None:
        self.close()

    def on_exception(self, trainer, pl_module, exception) -> None:
        self.close(raise_error=False)

    def close(self, raise_error: bool = True) -> None:
        """Write what was handed over, stop the thread and raise its error (if any, and ``raise_error``)."""
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join()
            self._thread = self._queue = None
        if raise_error:
            self._raise_write_error()
        elif self._error is not None:
            log.error("writing a part failed: %s", self._error)

    def _raise_write_error(self) -> None:
        if self._error is not None:
            error, self._error = self._error, None
            raise error

    def _write_units(self) -> None:
        """The writer thread: each handed-over unit's files, then its marker; after an error, nothing more."""
        while (item := self._queue.get()) is not None:
            if self._error is not None:
                continue
            unit, rank, state, config = item
            try:
                record = write_part(self.out_dir, self.run, unit, rank, state, config, self.earlier_world_size)
                mark_done(self.out_dir, self.run, record)
            except BaseException as err:  # noqa: BLE001 - raised in the predict loop (_raise_write_error)
                self._error = err
                continue
            self.n_cells += record["n_cells"]
            log.info("rank %d: part %d done, %d cells embedded + %d dropped in %.1f s (%.0f cells/s)", rank, unit.part,
                     record["n_cells"], record["n_dropped"], record["seconds"],
                     unit.n_cells / max(record["seconds"], 1e-9))  # fmt: skip


def write_part(out_dir: Path, run: int, unit: Unit, rank: int, state: dict, config, earlier_world_size: int) -> dict:
    """Write one unit's embs/top3/scores/cells/dropped files atomically; return its done record.

    Files of the same part left by an earlier attempt on another rank (one of
    ``earlier_world_size``) are removed first, by name: no listing of the atlas.
    """
    widths = {"embs": sum(w for _, w in config.embedding_blocks), "top3": sum(config.topk.values())}
    widths["scores"] = widths["top3"]
    outputs = [host_outputs(o) for o in state["outputs"]]
    arrays = {}
    for name, key in (("embs", "embs"), ("top3", "top_ids"), ("scores", "top_scores")):
        dtype = np.dtype(PART_ARRAYS[name])
        arrays[name] = (np.concatenate([o[key] for o in outputs]).astype(dtype, copy=False) if outputs
                        else np.zeros((0, widths[name]), dtype))  # fmt: skip
    cells = pd.DataFrame({k: np.concatenate([c[k] for c in state["cells"]]) for k in state["cells"][0]})
    dropped = pd.DataFrame({k: np.concatenate([d[k] for d in state["dropped"]]) for k in state["dropped"][0]})
    cells["obs_name"] = cells["obs_name"].astype(str)
    cells["organism"] = cells["organism"].astype(str)
    dropped["obs_name"] = dropped["obs_name"].astype(str)
    dropped["reason"] = dropped["reason"].astype(str)
    if len(cells) != len(arrays["embs"]):
        raise RuntimeError(f"part {unit.part}: {len(cells)} cells but {len(arrays['embs'])} embeddings")
    stem = part_stem(run, unit.part, rank)
    for other in range(earlier_world_size):  # an earlier attempt on another rank
        if other != rank:
            for name in (*PART_ARRAYS, *PART_TABLES):
                (out_dir / part_file(part_stem(run, unit.part, other), name)).unlink(missing_ok=True)
    tables = dict(zip(PART_TABLES, (cells, dropped)))
    files, sizes = {}, {}
    for name, array in arrays.items():
        path = out_dir / part_file(stem, name)
        atomic_write(path, lambda tmp, a=array, n=name: _save_npz(tmp, n, a))
        files[path.name], sizes[path.name] = file_sha256(path), path.stat().st_size
    for name, table in tables.items():
        path = out_dir / part_file(stem, name)
        atomic_write(path, lambda tmp, t=table: t.to_parquet(tmp, index=False))
        files[path.name], sizes[path.name] = file_sha256(path), path.stat().st_size
    return {
        "part": unit.part, "dataset": unit.dataset, "start": unit.start, "stop": unit.stop, "rank": rank,
        "stem": stem, "n_cells": len(cells), "n_dropped": len(dropped), "files": files, "sizes": sizes,
        "top1": top1_counts(arrays["top3"], config.topk),
        "seconds": round(state.get("predicted", time.time()) - state["started"], 3),
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }  # fmt: skip


def top1_counts(top3: np.ndarray, topk: dict[str, int]) -> dict[str, dict[str, int]]:
    """Cells per top-1 label id of each class in a part, kept in its done marker so that a run's summary counts
    labels from the markers, never by reading the parts again."""
    counts, start = {}, 0
    for name, k in topk.items():
        codes, n = np.unique(top3[:, start], return_counts=True)
        counts[name] = {str(int(code)): int(c) for code, c in zip(codes, n)}
        start += k
    return counts


def _save_npz(path: str, name: str, array: np.ndarray) -> None:
    with open(path, "wb") as fh:
        np.savez(fh, **{name: array})
