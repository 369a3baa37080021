"""Progress of a predict run: Lightning's bar on a terminal, one line every so often in a log file.

A progress bar redrawn into a file (a SLURM log) is one endless line; when
stderr is not a terminal, a line with the cells done, cells/s and ETA is
logged every ``LOG_EVERY_S`` seconds instead (each done unit has its own line
from the writer).
"""

from __future__ import annotations

import logging
import sys
import time

from lightning.pytorch.callbacks import ProgressBar, TQDMProgressBar

log = logging.getLogger(__name__)

#: Seconds between two progress lines in a log file.
LOG_EVERY_S = 30.0


def progress_callback() -> ProgressBar:
    """The bar on a terminal, progress lines otherwise."""
    return CellsPerSecondBar() if sys.stderr.isatty() else ProgressLines()


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


class ProgressLines(ProgressBar):
    """One log line every ``every_s`` seconds and at the end: rows done of the rank's rows, cells/s, ETA."""

    def __init__(self, every_s: float = LOG_EVERY_S):
        super().__init__()
        self.every_s = every_s
        self._enabled = True

    def disable(self) -> None:
        self._enabled = False

    def enable(self) -> None:
        self._enabled = True

    def on_predict_start(self, trainer, pl_module):
        loader = trainer.predict_dataloaders
        self._items = (
            loader[0] if isinstance(loader, list | tuple) else loader
        ).dataset.items  # (unit, start, stop, last)
        self._total = sum(stop - start for _, start, stop, _ in self._items)
        self._rank = trainer.global_rank
        self._t0 = self._last = time.time()
        self._rows = self._cells = 0

    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        _, start, stop, _ = self._items[batch_idx]
        self._rows += stop - start
        self._cells += 0 if batch["error"] else len(batch["cells"]["row"])
        if time.time() - self._last >= self.every_s:
            self._line()

    def on_predict_end(self, trainer, pl_module):
        self._line()

    def _line(self) -> None:
        self._last = time.time()
        if not self._enabled:
            return
        elapsed = max(self._last - self._t0, 1e-6)
        rate = self._cells / elapsed
        left = max(self._total - self._rows, 0)
        eta = f"ETA {left / (self._rows / elapsed) / 60:.1f} min" if self._rows and left else "done" if not left else ""
        log.info("rank %d: %s of %s rows done, %s cells embedded, %.0f cells/s, %s", self._rank,
                 f"{self._rows:,}", f"{self._total:,}", f"{self._cells:,}", rate, eta)  # fmt: skip
