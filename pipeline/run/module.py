"""The scPRINT-2 network as a LightningModule: batches of tokens -> embeddings, top labels and scores."""

from __future__ import annotations

import lightning as L
import numpy as np
import torch

from models import build_model
from pipeline.run.cpu import fast_fp32_matmul, fp32_matmul_precision, keep_freed_memory


class AtlasPredictor(L.LightningModule):
    """The scPRINT-2 network as a LightningModule: batch of tokens -> (embs, top ids, scores) on CPU."""

    def __init__(self, name: str = "tiny", checkpoint: str | None = None, max_len: int = 256, seed: int = 0):
        super().__init__()
        self.model = build_model(name, checkpoint, seed)
        self.name, self.max_len = name, max_len

    def on_predict_start(self) -> None:
        keep_freed_memory()
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
