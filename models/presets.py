"""Named scPRINT-2 configurations, and building a model from a name or a checkpoint.

- ``small`` is upstream's ``base_v3`` (the published ``small-v2.ckpt`` shape),
  ``medium`` adds ``pretrain_medium`` (``v2-medium.ckpt``), ``large`` adds
  ``pretrain_large``.
- ``tiny`` is the same architecture with small widths and two layers, for tests
  and the demo. The package ships one trained ``tiny`` network,
  :data:`DEMO_CHECKPOINT` (``checkpoint="demo"``), made by ``scatlas
  train-demo`` from real labelled cells: it predicts cell types and organism.

Without a checkpoint, a preset gets random weights (for benchmarks and tests),
its vocabulary is the human + mouse protein-coding genes of GENCODE (human v48,
mouse M37) and its label vocabularies are the small sets of real ontology terms
in :data:`DEMO_LABELS`. Predictions of such a model are meaningless.
"""

from __future__ import annotations

import gzip
import warnings
from importlib import resources
from pathlib import Path

import torch

from models.checkpoint import load_checkpoint
from models.network import ScPrint2, ScPrint2Config, sinusoidal_positions

BASE_V3_COMPRESS = {
    "cell_type_ontology_term_id": 64,
    "tissue_ontology_term_id": 32,
    "disease_ontology_term_id": 32,
    "age_group": 8,
    "assay_ontology_term_id": 12,
    "self_reported_ethnicity_ontology_term_id": 8,
    "sex_ontology_term_id": 2,
    "organism_ontology_term_id": 8,
    "cell_culture": 2,
}

# Real ontology terms (checked with cellxgene-ontology-guide), in class order.
DEMO_LABELS = {
    "cell_type_ontology_term_id": [
        "CL:0000084", "CL:0000236", "CL:0000623", "CL:0000576", "CL:0000451", "CL:0000232", "CL:0000233",
        "CL:0000037", "CL:0000540", "CL:0000127", "CL:0000128", "CL:0000129", "CL:0000681", "CL:0000746",
        "CL:0000057", "CL:0000115", "CL:0000235", "CL:0000624", "CL:0000625", "CL:0000786",
    ],
    "tissue_ontology_term_id": [
        "UBERON:0000178", "UBERON:0002371", "UBERON:0000955", "UBERON:0002084", "UBERON:0002106",
        "UBERON:0000029", "UBERON:0002048", "UBERON:0002107",
    ],
    "disease_ontology_term_id": ["PATO:0000461", "MONDO:0100096", "MONDO:0005148", "MONDO:0005061"],
    "age_group": ["HsapDv:0000264", "HsapDv:0000258", "HsapDv:0000227", "MmusDv:0000092", "MmusDv:0000110"],
    "assay_ontology_term_id": ["EFO:0009922", "EFO:0009899", "EFO:0008931", "EFO:0011025", "EFO:0022606"],
    "self_reported_ethnicity_ontology_term_id": [
        "HANCESTRO:0005", "HANCESTRO:0008", "HANCESTRO:0010", "HANCESTRO:0014", "unknown",
    ],
    "sex_ontology_term_id": ["PATO:0000384", "PATO:0000383"],
    "organism_ontology_term_id": ["NCBITaxon:9606", "NCBITaxon:10090", "NCBITaxon:9541"],
    "cell_culture": ["False", "True"],
}  # fmt: skip

#: The trained ``tiny`` network the package ships (``build_model("tiny", checkpoint="demo")``).
DEMO_CHECKPOINT = Path(__file__).parent / "data" / "tiny-demo.ckpt"

PRESETS = {
    "tiny": dict(d_model=32, nhead=4, num_heads_kv=2, nlayers=2, d_model_cell=32, nhead_cell=4,
                 num_heads_kv_cell=2, nlayers_cell=2, layers_cls=[32],
                 compress_class_dim={k: min(v, 16) for k, v in BASE_V3_COMPRESS.items()}),
    "small": dict(d_model=256, nhead=4, num_heads_kv=4, nlayers=8, d_model_cell=256, nhead_cell=4,
                  num_heads_kv_cell=4, nlayers_cell=6, layers_cls=[256], compress_class_dim=BASE_V3_COMPRESS),
    "medium": dict(d_model=512, nhead=8, num_heads_kv=4, nlayers=16, d_model_cell=256, nhead_cell=4,
                   num_heads_kv_cell=4, nlayers_cell=6, layers_cls=[256], compress_class_dim=BASE_V3_COMPRESS),
    "large": dict(d_model=1280, nhead=20, num_heads_kv=5, nlayers=30, d_model_cell=512, nhead_cell=8,
                  num_heads_kv_cell=4, nlayers_cell=6, layers_cls=[256], compress_class_dim=BASE_V3_COMPRESS),
}  # fmt: skip


def demo_vocabulary() -> dict[str, list[str]]:
    """Human and mouse protein-coding Ensembl ids (GENCODE v48 / M37), sorted, per organism."""
    genes: dict[str, list[str]] = {}
    with resources.files("models").joinpath("data/tiny_genes.tsv.gz").open("rb") as raw, gzip.open(raw, "rt") as fh:
        next(fh)
        for line in fh:
            organism, gene = line.rstrip("\n").split("\t")
            genes.setdefault(organism, []).append(gene)
    return genes


def preset_config(name: str) -> ScPrint2Config:
    """The configuration of a named preset, with the demo vocabulary and labels."""
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; choose one of {sorted(PRESETS)}")
    genes = demo_vocabulary()
    return ScPrint2Config(
        genes=genes,
        organisms=sorted(genes),
        classes={c: len(v) for c, v in DEMO_LABELS.items()},
        label_decoders={c: dict(enumerate(v)) for c, v in DEMO_LABELS.items()},
        **PRESETS[name],
    )


def random_model(config: ScPrint2Config, seed: int = 0) -> ScPrint2:
    """A network with weights drawn from ``seed`` (same weights on every machine for a torch version).

    Gene embeddings are N(0, 1); the positional buffer is the sinusoid of each
    gene's rank within its organism block; all other parameters keep torch's
    default initialisation, drawn in registration order from ``seed``.
    """
    fork = torch.random.fork_rng(devices=[])
    with fork:
        torch.manual_seed(seed)
        model = ScPrint2(config)
    if model.pos_encoder is not None:
        ranks = torch.cat([torch.arange(1, len(config.genes[o]) + 1) for o in config.organisms])
        model.pos_encoder.pe.copy_(sinusoidal_positions(ranks, config.d_model))
    return model.eval()


def build_model(name: str = "tiny", checkpoint: str | Path | None = None, seed: int = 0) -> ScPrint2:
    """The model a run uses: a checkpoint when given, else the preset with seeded weights.

    Parameters
    ----------
    name
        Preset name (``tiny``, ``small``, ``medium``, ``large``); with a
        checkpoint, only used to check that the shapes agree (a warning).
    checkpoint
        Path of a published-layout checkpoint (``small-v2.ckpt``, ``v2-medium.ckpt``...),
        or ``"demo"``: the trained ``tiny`` network shipped in the package
        (:data:`DEMO_CHECKPOINT`, the default of ``model=tiny``).
    seed
        Seed of the random weights when there is no checkpoint.
    """
    if checkpoint == "demo":
        checkpoint = DEMO_CHECKPOINT
    if checkpoint:
        model = load_checkpoint(checkpoint)
        expected = PRESETS.get(name, {})
        got = {k: getattr(model.config, k) for k in ("d_model", "nlayers")}
        if expected and any(expected[k] != v for k, v in got.items()):
            warnings.warn(f"checkpoint {checkpoint} has {got}, not the {name!r} preset's shape", stacklevel=2)
        return model
    config = preset_config(name)
    warnings.warn(
        f"model={name} without model.checkpoint: seeded random weights, the predicted labels are meaningless",
        stacklevel=2,
    )
    model = random_model(config, seed)
    model.checkpoint_path, model.checkpoint_sha256 = None, None
    return model
