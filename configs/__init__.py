"""The Hydra configuration tree of ``scatlas predict``: ``predict.yaml`` and its groups (model, data, trainer)."""

from pathlib import Path

from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

CONFIG_DIR = str(Path(__file__).parent)


def compose_predict(overrides: list[str] = ()) -> DictConfig:
    """The config ``scatlas predict`` runs with these overrides (``["model=tiny", "data.batch_size=32"]``)."""
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose(config_name="predict", overrides=list(overrides))
