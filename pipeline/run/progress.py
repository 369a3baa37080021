"""The progress bar of a predict run: Lightning's, with cells embedded and cells/s."""

from __future__ import annotations

import time

from lightning.pytorch.callbacks import TQDMProgressBar


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
