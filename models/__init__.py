"""scPRINT-2 for inference: the network, checkpoint loading and named presets.

Knows nothing about files of cells or clusters (that is ``pipeline``)::

    from models import build_model
    model = build_model("tiny")                 # or build_model("medium", checkpoint="v2-medium.ckpt")
    out = model.predict(genes, counts, knn_counts, knn_dists)   # embs, top_ids, top_scores
"""

from models.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from models.network import ScPrint2, ScPrint2Config
from models.presets import PRESETS, build_model, preset_config, random_model

__all__ = [
    "PRESETS",
    "CheckpointError",
    "ScPrint2",
    "ScPrint2Config",
    "build_model",
    "load_checkpoint",
    "preset_config",
    "random_model",
    "save_checkpoint",
]
