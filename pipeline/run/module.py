"""The scPRINT-2 network as a LightningModule: batches of tokens -> embeddings, top labels and scores."""

from __future__ import annotations

import lightning as L
import numpy as np
import torch

from models import build_model
from pipeline.run.cpu import fast_fp32_matmul, fp32_matmul_precision, keep_freed_memory
from pipeline.tokens.batches import batch_tensors


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
        out = self.model.predict(*batch_tensors(batch, self.device))
        if not out["embs"].is_cuda:
            return out
        # copy to pinned host memory without waiting: the GPU goes on with the next batch, and the writer
        # waits for the copies (host_outputs) only when the unit's files are written
        host = {k: torch.empty(v.shape, dtype=v.dtype, pin_memory=True).copy_(v, non_blocking=True)
                for k, v in out.items()}  # fmt: skip
        host["copied"] = torch.cuda.Event()
        host["copied"].record()
        return host


def forward_numerics(device: torch.device, precision: str) -> dict:
    """What decides how exact a run's outputs are: the device, Lightning's precision and the fp32 matmul mode.

    ``fp32_matmul`` is oneDNN's ``fp32_precision`` on a CPU (``bf16``: the bf16
    units, kept only where measured as exact as fp32; ``ieee``: the fp32 units)
    and torch's ``float32_matmul_precision`` on a GPU (``high``/``medium`` allow TF32).
    """
    if device.type == "cuda":
        fp32_matmul = torch.get_float32_matmul_precision()
    else:
        fp32_matmul = {None: "ieee", "none": "ieee"}.get(
            fp32_matmul_precision(), fp32_matmul_precision()
        )  # torch's default
    return {"device": str(device), "precision": str(precision), "fp32_matmul": fp32_matmul}


def precision_warning(numerics: dict) -> str | None:
    """Why a CPU run under 16-bit autocast is a poor choice, or None for any other run."""
    if not numerics["device"].startswith("cpu") or not numerics["precision"].startswith(("bf16", "16")):
        return None
    return (f"trainer.precision={numerics['precision']} on a CPU: 16-bit autocast is usually slower there than fp32 "
            "(which already uses the bf16 units where they are as exact) and its outputs are not fp32-exact; "
            "pass trainer.precision=32-true")  # fmt: skip


def host_outputs(prediction: dict) -> dict[str, np.ndarray]:
    """A predict step's outputs as numpy arrays, once their copy from the GPU (if any) is complete."""
    if "copied" in prediction:
        prediction["copied"].synchronize()
    return {k: v.numpy() for k, v in prediction.items() if k != "copied"}
