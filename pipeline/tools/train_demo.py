"""``scatlas train-demo``: train the ``tiny`` network on the labelled cells the package ships.

The result is the demo checkpoint (``models/data/tiny-demo.ckpt``, the default of
``model=tiny``): a network of the published architecture that predicts real
cell types and organisms, so that the out-of-the-box demo shows real labels.

Training data: the two labelled CITE-seq RNA files in ``pipeline/data/`` (human
bone marrow, 600 cells, 41 annotated types; mouse spleen and lymph nodes, 340
cells, 26 types). Their cell-type names are mapped to Cell Ontology terms by the
reviewed table ``models/data/demo_cell_types.csv``. The checkpoint carries only
the classes these files really label: cell type and organism.

Everything the model sees comes from the pipeline's own code, exactly as
``scatlas predict`` prepares it: the readers and gene mapping of
:mod:`pipeline.plan`, the neighbour graph of :mod:`pipeline.tokens.neighbors` and the
tokens of :class:`pipeline.tokens.batches.UnitBatches`, with the settings of
``scatlas predict model=tiny`` (``max_len`` 256, 6 neighbours).
Gene draws are seeded by each file's identity (a fingerprint of its counts),
as in any predict run, so held-out cells get the very tokens at evaluation that
a predict run gives them (``seed=0``). Each training
epoch draws other genes per cell (``seed = epoch + 1``).

Training (deterministic: fixed seeds, fixed batch order, one CPU thread,
``torch.use_deterministic_algorithms``): 80/20 split by cell, stratified by
(dataset, annotated type); AdamW; per-label binary cross-entropy with logits on
one-hot targets, as upstream trains its classifier heads (so scores are
``sigmoid(logit)``). All weights are trained, the gene embedding included
(upstream keeps its protein-language gene embedding frozen; ours starts from
seeded random vectors, which carry no knowledge to keep). Only the ~2,000 genes
of the two files' panels are trained; the other genes of the vocabulary keep
their seeded random embeddings, so the model means little on other gene panels.
Parts of the network that no class loss reaches (the VAE decoders and
variances, the expression decoder) keep their seeded initial values.

Outputs, in ``--out-dir``: ``tiny-demo.ckpt`` (published layout, float16
tensors), ``tiny-demo.metrics.json`` (held-out accuracies, chance levels,
settings) and ``tiny-demo.heldout.csv`` (the held-out cells: file, row,
obs_name and true labels), which ``scatlas predict`` uses to report accuracy
when it embeds those files with that checkpoint.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from models import load_checkpoint, random_model, save_checkpoint
from models.network import ScPrint2Config
from models.presets import DEMO_CHECKPOINT, PRESETS, demo_vocabulary
from pipeline.analysis.heldout import CELL_TYPE, ORGANISM, accuracy, cell_type_table, describe
from pipeline.atlas.manifest import column_blocks
from pipeline.io.files import file_sha256
from pipeline.tokens.batches import TOKEN_ARRAYS
from pipeline.tools.inputs import plan_files, predict_config, prepare, whole_file_batches

log = logging.getLogger(__name__)


DATA = Path(__file__).parent / "data"


#: Training files, in dataset-id order.
TRAINING_FILES = [
    DATA / "neurips2021_human_bmmc_cite_rna_600x1000.h5ad",
    DATA / "neurips2021_mouse_spleen_lymphnode_cite_rna_340x992.h5ad",
]


HELD_OUT_FRACTION = 0.2


SPLIT_SEED = 0


WEIGHT_SEED = 0


EPOCHS = 60


BATCH_SIZE = 32


LEARNING_RATE = 3e-3


#: The gene embedding learns faster: each gene's row is updated only by the batches that hold it.
GENE_EMBEDDING_LEARNING_RATE = 3e-2


WEIGHT_DECAY = 0.01


GRADIENT_CLIP = 1.0


STEM = "tiny-demo"
#: The predict config the demo model is trained for: its cells are prepared with these data settings.
PREDICT = predict_config("tiny")


def predict_settings() -> dict:
    """The settings of :data:`PREDICT` that shape what the model sees, as recorded in the metrics file."""
    data = PREDICT.data
    return {"max_len": int(PREDICT.model.max_len), "n_neighbors": int(data.n_neighbors), "min_counts": int(data.min_counts),
            "min_genes": int(data.min_genes), "seed": int(PREDICT.seed), "counts": str(data.counts),
            "organism": data.organism, "min_gene_coverage": float(data.min_gene_coverage)}  # fmt: skip


def labelled_cells(plans) -> pd.DataFrame:
    """One row per cell of the training files: dataset, file, row, obs_name, dataset_label and the two labels."""
    table = cell_type_table().set_index(["dataset", "dataset_label"])
    frames = []
    for plan in plans:
        path = Path(plan.path)
        labels = plan.matrix.obs["cell_type"].astype(str).to_numpy()
        unknown = sorted(set(labels) - set(table.loc[path.name].index))
        if unknown:
            raise ValueError(f"{path}: cell types {unknown} are not in models/data/demo_cell_types.csv")
        frames.append(pd.DataFrame({
            "dataset": plan.dataset, "file": path.name, "row": np.arange(plan.n_cells),
            "obs_name": plan.matrix.obs_names.astype(str), "dataset_label": labels,
            CELL_TYPE: table.loc[[(path.name, label) for label in labels], "term"].to_numpy(),
            ORGANISM: plan.cell_organisms.astype(str),
        }))  # fmt: skip
    return pd.concat(frames, ignore_index=True)


def held_out_mask(cells: pd.DataFrame, fraction: float = HELD_OUT_FRACTION, seed: int = SPLIT_SEED) -> np.ndarray:
    """Stratified split by cell: ``round(fraction * n)`` random cells of each (dataset, annotated type).

    Types with one or two cells stay wholly in training.
    """
    rng = np.random.default_rng(seed)
    held_out = np.zeros(len(cells), dtype=bool)
    for _, group in cells.groupby(["dataset", "dataset_label"], sort=True):
        n_out = int(np.floor(fraction * len(group) + 0.5))
        held_out[rng.permutation(group.index.to_numpy())[:n_out]] = True
    return held_out


# ----------------------------------------------------------------------------- model inputs


def demo_config(cell_types: list[str], organisms: list[str]) -> ScPrint2Config:
    """The ``tiny`` architecture with the demo vocabulary and the two classes the training files label."""
    genes = demo_vocabulary()
    classes = {CELL_TYPE: cell_types, ORGANISM: organisms}
    preset = dict(PRESETS["tiny"])
    preset["compress_class_dim"] = {c: preset["compress_class_dim"][c] for c in classes}
    return ScPrint2Config(
        genes=genes,
        organisms=sorted(genes),
        classes={c: len(v) for c, v in classes.items()},
        label_decoders={c: dict(enumerate(v)) for c, v in classes.items()},
        **preset,
    )


def plan_training_files(config: ScPrint2Config, work_dir: Path) -> list:
    """Plan the training files as ``scatlas predict model=tiny`` does, and store their neighbour graphs under ``work_dir``."""
    plans = plan_files(TRAINING_FILES, config.genes, PREDICT)
    prepare(plans, PREDICT, work_dir)
    return plans


def model_inputs(plans, config: ScPrint2Config, work_dir: Path, seed: int) -> dict:
    """Tokens of every cell that passes QC, as ``scatlas predict`` tokenizes them, with gene-sampling ``seed``.

    Returns ``dataset`` and ``row`` (numpy) and the ``genes``, ``counts``,
    ``knn_counts``, ``knn_dists`` tensors, cells in dataset then row order.
    """
    batches = whole_file_batches(
        plans, config.organism_offsets, PREDICT, work_dir, batch_size=max(p.n_cells for p in plans), seed=seed
    )
    items = [batches[i] for i in range(len(batches))]
    for item in items:
        if item["error"]:
            raise ValueError(item["error"])
    out = {k: np.concatenate([item["cells"][k] for item in items]) for k in ("dataset", "row")}
    out.update({k: torch.from_numpy(np.concatenate([item[k] for item in items])) for k in TOKEN_ARRAYS})
    return out


def cell_index(cells: pd.DataFrame, inputs: dict) -> np.ndarray:
    """Position in ``cells`` of each cell of ``inputs``."""
    position = pd.Series(np.arange(len(cells)), index=pd.MultiIndex.from_frame(cells[["dataset", "row"]]))
    return position.loc[list(zip(inputs["dataset"], inputs["row"]))].to_numpy()


# ----------------------------------------------------------------------------- training


def train(model, plans, cells: pd.DataFrame, train_mask: np.ndarray, work_dir: Path) -> list[float]:
    """Train ``model`` in place on the cells of ``train_mask``; returns the mean loss of each epoch.

    The heads' output biases start at the log prior odds of each label in the
    training cells (so the per-label BCE starts near its floor rather than at
    ``n_labels * log 2``); AdamW with a one-cycle schedule and gradient clipping.
    """
    config = model.config
    codes = {c: {term: code for code, term in config.label_decoders[c].items()} for c in config.classes}
    targets = {c: torch.tensor(cells[c].map(codes[c]).to_numpy()) for c in config.classes}
    with torch.no_grad():
        for c, n_labels in config.classes.items():
            frequency = (np.bincount(targets[c].numpy()[train_mask], minlength=n_labels) + 0.5) / (train_mask.sum() + 1)
            model.cls_decoders[c].out_layer.bias.copy_(torch.from_numpy(np.log(frequency / (1 - frequency))))
    embedding = model.gene_encoder[0].embeddings.weight
    embedding.requires_grad_(True)
    groups = [
        {"params": [p for p in model.parameters() if p.requires_grad and p is not embedding], "lr": LEARNING_RATE},
        {"params": [embedding], "lr": GENE_EMBEDDING_LEARNING_RATE, "weight_decay": 0.0},
    ]
    optimizer = torch.optim.AdamW(groups, weight_decay=WEIGHT_DECAY)
    generator = torch.Generator().manual_seed(WEIGHT_SEED)
    inputs = model_inputs(plans, config, work_dir, seed=1)
    index = cell_index(cells, inputs)
    trainable = np.flatnonzero(train_mask[index])
    n_steps = EPOCHS * int(np.ceil(len(trainable) / BATCH_SIZE))
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, [g["lr"] for g in groups], total_steps=n_steps,
                                                   pct_start=0.1)  # fmt: skip
    losses = []
    model.train()
    for epoch in range(EPOCHS):
        if epoch:
            inputs = model_inputs(plans, config, work_dir, seed=epoch + 1)
        order = trainable[torch.randperm(len(trainable), generator=generator).numpy()]
        total = 0.0
        for start in range(0, len(order), BATCH_SIZE):
            batch = order[start : start + BATCH_SIZE]
            out = model(*(inputs[k][batch] for k in ("genes", "counts", "knn_counts", "knn_dists")))
            loss = sum(
                F.binary_cross_entropy_with_logits(
                    out["logits"][c], F.one_hot(targets[c][index[batch]], config.classes[c]).float(), reduction="sum"
                )
                for c in config.classes
            ) / len(batch)
            optimizer.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), GRADIENT_CLIP)
            optimizer.step()
            schedule.step()
            total += loss.item() * len(batch)
        losses.append(total / len(order))
        log.info("epoch %d/%d: loss %.4f", epoch + 1, EPOCHS, losses[-1])
    embedding.requires_grad_(False)
    model.eval()
    return losses


def predict_top(model, inputs: dict) -> dict[str, np.ndarray]:
    """Top label codes per class, as ``scatlas predict`` writes them."""
    with torch.no_grad():
        out = model.predict(*(inputs[k] for k in ("genes", "counts", "knn_counts", "knn_dists")))
    _, classes = column_blocks(model.config)
    return {c["name"]: out["top_ids"][:, c["start"] : c["start"] + c["k"]].numpy() for c in classes}


def evaluate(model, plans, cells: pd.DataFrame, held_out: np.ndarray, work_dir: Path) -> dict:
    """Metrics of ``model`` on the held-out cells, with the tokens of a ``scatlas predict`` run (seed 0)."""
    inputs = model_inputs(plans, model.config, work_dir, seed=int(PREDICT.seed))
    index = cell_index(cells, inputs)
    top = predict_top(model, inputs)
    keep = held_out[index]
    test = cells.iloc[index[keep]].reset_index(drop=True)
    metrics = {"all": accuracy(test, {c: v[keep] for c, v in top.items()}, model.config.label_decoders)}
    for dataset, file in enumerate(TRAINING_FILES):
        mine = (test.dataset == dataset).to_numpy()
        metrics[file.name] = accuracy(test[mine].reset_index(drop=True), {c: v[keep][mine] for c, v in top.items()},
                                      model.config.label_decoders)  # fmt: skip
    return metrics


# ----------------------------------------------------------------------------- command


def train_demo(out_dir: Path) -> dict:
    """Train, save and evaluate the demo checkpoint; returns the metrics written next to it."""
    torch.manual_seed(WEIGHT_SEED)
    torch.use_deterministic_algorithms(True)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the same sums in the same order on every run
    try:
        with tempfile.TemporaryDirectory() as tmp:
            work_dir = Path(tmp)
            table = cell_type_table()
            cell_types = sorted(table.term.unique())
            config = demo_config(cell_types, ["NCBITaxon:9606", "NCBITaxon:10090"])
            plans = plan_training_files(config, work_dir)
            cells = labelled_cells(plans)
            held_out = held_out_mask(cells)
            model = random_model(config, seed=WEIGHT_SEED)
            losses = train(model, plans, cells, ~held_out, work_dir)
            out_dir.mkdir(parents=True, exist_ok=True)
            checkpoint = save_checkpoint(model, out_dir / f"{STEM}.ckpt", dtype=torch.float16)
            shipped = load_checkpoint(checkpoint)  # what users get: float16 weights in a float32 network
            metrics = evaluate(shipped, plans, cells, held_out, work_dir)
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(False)
    split = cells[held_out][["file", "row", "obs_name", "dataset_label", CELL_TYPE, ORGANISM]]
    split.to_csv(out_dir / f"{STEM}.heldout.csv", index=False)
    record = {
        "checkpoint": checkpoint.name,
        "checkpoint_sha256": file_sha256(checkpoint),
        "held_out": metrics,
        "n_train_cells": int((~held_out).sum()),
        "n_held_out_cells": int(held_out.sum()),
        "n_cell_type_labels": len(cell_types),
        "training": {
            "files": [p.name for p in TRAINING_FILES], "epochs": EPOCHS, "batch_size": BATCH_SIZE,
            "learning_rate": LEARNING_RATE,
            "gene_embedding_learning_rate": GENE_EMBEDDING_LEARNING_RATE, "weight_decay": WEIGHT_DECAY,
            "gradient_clip": GRADIENT_CLIP, "held_out_fraction": HELD_OUT_FRACTION,
            "split_seed": SPLIT_SEED, "weight_seed": WEIGHT_SEED, "loss_per_epoch": [round(x, 5) for x in losses],
            "predict_settings": predict_settings(), "torch": torch.__version__,
        },
    }  # fmt: skip
    (out_dir / f"{STEM}.metrics.json").write_text(json.dumps(record, indent=1) + "\n")
    return record


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="scatlas train-demo",
        description="Train the tiny demo checkpoint on the labelled cells the package ships (CPU, a few minutes, "
        "deterministic), and write it with its held-out metrics and split.",
    )
    parser.add_argument("--out-dir", type=Path, default=Path("tiny-demo"), help="where tiny-demo.ckpt, "
                        ".metrics.json and .heldout.csv are written (default: ./tiny-demo)")  # fmt: skip
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    started = time.time()
    record = train_demo(args.out_dir)
    print(f"trained in {time.time() - started:.0f} s; wrote {args.out_dir / record['checkpoint']} "
          f"(sha256 {record['checkpoint_sha256'][:12]}...), its metrics and its held-out split")  # fmt: skip
    print(f"held-out ({record['n_held_out_cells']} cells): {describe(record['held_out']['all'])}")
    shipped = DEMO_CHECKPOINT.with_suffix(".metrics.json")
    if shipped.is_file():
        print(f"shipped checkpoint:  {describe(json.loads(shipped.read_text())['held_out']['all'])}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
