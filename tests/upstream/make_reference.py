"""Build a toy upstream scPRINT-2 checkpoint and its reference outputs on real cells.

Run with the python of the upstream virtual environment (tests/upstream/install.sh):

    .cache/upstream-venv/bin/python tests/upstream/make_reference.py OUT_DIR

Writes
- ``OUT_DIR/upstream_toy.ckpt``: a Lightning checkpoint of upstream ``scPRINT2`` (scprint2 1.0.3)
  in the v2 layout (metacell expression encoder, gene-embedding adapter, ``pos_encoder.pe``,
  cell transformer, grouped-query attention, VAE and FSQ compressors), re-loaded here with
  upstream's own ``scPRINT2.load_from_checkpoint`` to prove it is complete;
- ``OUT_DIR/reference.npz``: inputs built from real cells of tests/data (human BMMC, mouse
  E18 brain) and upstream's fp32 eval outputs for them (see ``save_reference``).

The weights are re-drawn with a wide spread and a fixed seed so that a wrong layer, index or
constant in a reimplementation shows up as a large difference. Upstream applies attention
dropout even in eval (the rate goes to ``scaled_dot_product_attention`` unconditionally,
simpler_flash/mha.py ``SelfAttention.forward``/``CrossAttention.forward``): the checkpoint keeps
the realistic ``dropout=0.02`` hyper-parameter and the reference run sets those rates to 0.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import tempfile
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch
from torch import nn

REPO = Path(__file__).resolve().parents[2]
DATA_DIRS = (REPO / "tests" / "data", REPO / "pipeline" / "data")  # shipped datasets
HUMAN_FILE = "neurips2021_human_bmmc_cite_rna_600x1000.h5ad"
MOUSE_FILE = "tenx_mouse_brain_e18_10000x1000.h5ad"
HUMAN, MOUSE = "NCBITaxon:9606", "NCBITaxon:10090"

# Stand-ins for the modules scprint2 imports but never uses here, and the import itself, are
# shared with the upstream benchmark script (which ships in the package and runs under this venv).
_spec = importlib.util.spec_from_file_location("upstream_forward", REPO / "pipeline" / "tools" / "upstream_forward.py")
upstream_forward = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(upstream_forward)
import_upstream = upstream_forward.import_upstream
zero_attention_dropout = upstream_forward.zero_attention_dropout
save_checkpoint = upstream_forward.save_checkpoint


# ---------------------------------------------------------------------------------------------
# Real cells (h5py only: anndata is one of the stand-ins).


def _strings(values) -> np.ndarray:
    return np.array([v.decode() if isinstance(v, bytes) else str(v) for v in values])


def _column(h5: h5py.File, group: str, name: str) -> np.ndarray:
    """A dataframe column of an h5ad file: plain, categorical, or legacy categorical."""
    node = h5[f"{group}/{name}"]
    if isinstance(node, h5py.Group):  # anndata >= 0.8 categorical
        return _strings(node["categories"][()])[node["codes"][()]]
    if "categories" in node.attrs:  # anndata < 0.8 categorical
        return _strings(h5[node.attrs["categories"]][()])[node[()]]
    return _strings(node[()])


def _matrix(h5: h5py.File, key: str) -> sp.csr_matrix:
    node = h5[key]
    if isinstance(node, h5py.Dataset):
        return sp.csr_matrix(node[()])
    kind = node.attrs["encoding-type"]
    if isinstance(kind, bytes):
        kind = kind.decode()
    cls = {"csr_matrix": sp.csr_matrix, "csc_matrix": sp.csc_matrix}[kind]
    shape = tuple(node.attrs["shape"])
    return cls((node["data"][()], node["indices"][()], node["indptr"][()]), shape=shape).tocsr()


def read_counts(name: str, layer: str | None, gene_column: str | None):
    """Raw counts (cells x genes, CSR float32) and the Ensembl ids of the genes."""
    paths = [d / name for d in DATA_DIRS if (d / name).is_file()]
    if not paths:
        raise FileNotFoundError(f"{name} is in none of {[str(d) for d in DATA_DIRS]}")
    with h5py.File(paths[0], "r") as h5:
        counts = _matrix(h5, f"layers/{layer}" if layer else "X").astype(np.float32)
        if gene_column is None:
            gene_column = h5["var"].attrs["_index"]
        genes = _column(h5, "var", gene_column)
    return counts, genes


def pca_neighbours(counts: sp.csr_matrix, cells: np.ndarray, pool: np.ndarray, k: int):
    """k nearest other cells of the pool in a 20-component PCA of log1p(CP10k) restricted
    to the 200 most variable genes."""
    x = counts[pool].toarray()
    x = np.log1p(x / np.maximum(x.sum(1, keepdims=True), 1) * 1e4)
    x = x[:, np.argsort(-x.var(0))[:200]]
    x -= x.mean(0)
    u, s, _ = np.linalg.svd(x, full_matrices=False)
    emb = u[:, :20] * s[:20]
    where = {c: i for i, c in enumerate(pool)}
    dist = np.linalg.norm(emb[[where[c] for c in cells]][:, None] - emb[None], axis=-1)
    dist[np.arange(len(cells)), [where[c] for c in cells]] = np.inf  # not itself
    order = np.argsort(dist, axis=1)[:, :k]
    return pool[order], np.take_along_axis(dist, order, 1).astype(np.float32)


def build_inputs(rng, vocab_index, counts, genes, n_cells, n_tokens, k, pool_size):
    """Per cell: n_tokens vocabulary genes (its expressed genes, a random subset if more,
    filled with unexpressed ones), their counts, and those of its k nearest cells."""
    n_obs = counts.shape[0]
    column_vocab = np.array([vocab_index[g] for g in genes])
    pool = np.sort(rng.choice(n_obs, min(pool_size, n_obs), replace=False))
    nnz = np.diff(counts[pool].indptr)
    cells = np.sort(rng.choice(pool[nnz >= 5], n_cells, replace=False))
    neighbours, dists = pca_neighbours(counts, cells, pool, k)
    out = {"genes": [], "counts": [], "knn_counts": [], "knn_dists": dists, "depth": []}
    for cell, nbrs in zip(cells, neighbours):
        row = counts[cell].toarray()[0]
        expressed = np.flatnonzero(row)
        if len(expressed) >= n_tokens:
            cols = rng.choice(expressed, n_tokens, replace=False)
        else:
            zeros = np.setdiff1d(np.arange(len(row)), expressed)
            fill = rng.choice(zeros, n_tokens - len(expressed), replace=False)
            cols = np.concatenate([expressed, fill])
        out["genes"].append(column_vocab[cols])
        out["counts"].append(row[cols])
        out["knn_counts"].append(counts[nbrs][:, cols].toarray())
        out["depth"].append(row.sum())
    return cells, {key: np.asarray(v) for key, v in out.items()}


# ---------------------------------------------------------------------------------------------
# The toy upstream model.

CLASSES = {  # name -> number of leaf labels (class order = token order)
    "cell_type_ontology_term_id": 7,
    "tissue_ontology_term_id": 5,
    "sex_ontology_term_id": 3,
    "organism_ontology_term_id": 2,
}
COMPRESS = {  # >= 8: VAE, < 8: FSQ
    "cell_type_ontology_term_id": 12,
    "tissue_ontology_term_id": 8,
    "sex_ontology_term_id": 2,
    "organism_ontology_term_id": 4,
}
PREFIX = {"cell_type": "CL", "tissue": "UBERON", "sex": "PATO", "organism": "NCBITaxon"}


def label_tables():
    """Leaves 0..n-1; the hierarchical classes also get two parent codes n, n+1."""
    decoders, hierarchy = {}, {}
    for name, n in CLASSES.items():
        prefix = PREFIX[name.split("_ontology")[0]]
        hierarchical = name in ("cell_type_ontology_term_id", "tissue_ontology_term_id")
        decoders[name] = {i: f"{prefix}:{i:07d}" for i in range(n + 2 * hierarchical)}
        if hierarchical:
            hierarchy[name] = {n: [0, 1, 2], n + 1: list(range(3, n))}
    return decoders, hierarchy


def write_gene_tables(tmp: Path, rng, genes: dict[str, list[str]]):
    """Parquet inputs the constructor reads: gene locations and protein embeddings."""
    locs, embs = [], []
    for ids in genes.values():
        # locus rank as in genelocs.ipynb: +100 per chromosome, +1 per distant gene
        steps = rng.choice([0, 1], size=len(ids), p=[0.3, 0.7])
        steps[rng.choice(len(ids), 20, replace=False)] = 100
        locs.append(pd.DataFrame({"pos": 1 + np.cumsum(steps)}, index=ids))
        embs.append(pd.DataFrame(rng.normal(size=(len(ids), 96)).astype(np.float32), index=ids))
    loc_file, emb_file = tmp / "gene_locs.parquet", tmp / "gene_embs.parquet"
    pd.concat(locs).to_parquet(loc_file)
    emb = pd.concat(embs)
    emb.columns = [str(c) for c in emb.columns]
    emb.to_parquet(emb_file)
    return loc_file, emb_file


def build_model(scPRINT2, genes, organisms, loc_file, emb_file):
    decoders, hierarchy = label_tables()
    return scPRINT2(
        genes=genes,
        organisms=organisms,
        d_model=64,
        nhead=4,
        num_heads_kv=2,
        nlayers=3,
        precpt_gene_emb=str(emb_file),
        finetune_gene_emb=True,
        freeze_embeddings=True,
        gene_pos_file=str(loc_file),
        normalization="log",
        expr_encoder_layers=1,
        attention="normal",
        expr_emb_style="metacell",
        pred_embedding=["cell_type_ontology_term_id"],
        layers_cls=[32],
        classes=dict(CLASSES),
        labels_hierarchy=hierarchy,
        label_decoders=decoders,
        compress_class_dim=dict(COMPRESS),
        cell_specific_blocks=True,
        d_model_cell=32,
        nhead_cell=4,
        nlayers_cell=2,
        num_heads_kv_cell=2,
        zinb=True,
        dropout=0.02,
    )


@torch.no_grad()
def redraw_weights(model: nn.Module, seed: int) -> None:
    """Wide, seeded weights: N(0, 0.2) matrices, biases and class tokens, N(0, 1) gene
    embeddings, LayerNorm weights 1 + N(0, 0.2). Buffers (pos_encoder.pe) are kept.

    Small class tokens let the cross-attended gene tokens, hence the cell, weigh in the
    cell outputs."""
    gen = torch.Generator().manual_seed(seed)
    gene_table = model.gene_encoder[0].embeddings
    for module in model.modules():
        for name, param in module.named_parameters(recurse=False):
            noise = torch.randn(param.shape, generator=gen)
            if isinstance(module, nn.LayerNorm) and name == "weight":
                param.copy_(1 + 0.2 * noise)
            elif module is gene_table:
                param.copy_(noise)
            else:
                param.copy_(0.2 * noise)


INTERMEDIATES = {  # module -> npz key: the pieces to compare when parity fails
    "gene_encoder": "inter_gene_encoder",  # [B, L, D] adapter output
    "expr_encoder": "inter_expr_encoder",  # [B, L, D] EasyExprGNN output
    "pos_encoder": "inter_pos_encoder",  # [B, L, D] pe rows
    "transformer": "inter_transformer",  # [B, L, D] gene tokens after the main transformer
    "cell_transformer": "inter_cell_transformer",  # [B, C+1, Dc] cell tokens
}


@torch.no_grad()
def run_upstream(model, inputs):
    captured, hooks = {}, []
    for name, key in INTERMEDIATES.items():
        module = getattr(model, name)

        def hook(_module, _args, output, key=key):
            captured[key] = output.detach().clone()

        hooks.append(module.register_forward_hook(hook))
    try:
        out = model(
            torch.from_numpy(inputs["genes"]),
            torch.from_numpy(inputs["counts"]),
            neighbors=torch.from_numpy(inputs["knn_counts"]),
            neighbors_info=torch.from_numpy(inputs["knn_dists"]),
            req_depth=torch.from_numpy(inputs["depth"]),
            do_class=True,
        )
    finally:
        for h in hooks:
            h.remove()
    result = {"output_cell_emb": out["output_cell_emb"]}
    for name in model.classes:
        result[f"cls_output_{name}"] = out[f"cls_output_{name}"]
    for key in ("mean", "disp", "zero_logits"):
        result[f"expr_{key}"] = out[key]
    result.update(captured)
    return {k: v.float().numpy() for k, v in result.items()}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cells", type=int, default=32, help="cells per organism")
    parser.add_argument("--tokens", type=int, default=96, help="genes per cell")
    parser.add_argument("--knn", type=int, default=6)
    args = parser.parse_args(argv)
    args.out_dir.mkdir(parents=True, exist_ok=True)

    scprint2, scPRINT2 = import_upstream()

    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    torch.set_num_threads(min(torch.get_num_threads(), 8))

    human_counts, human_genes = read_counts(HUMAN_FILE, "counts", "gene_ids")
    mouse_counts, mouse_genes = read_counts(MOUSE_FILE, None, None)
    # `genes` is keyed by organism in human-first order, but `organisms` is alphabetical (as
    # scdataloader sorts it) so mouse comes first: upstream concatenates the vocabulary in
    # `organisms` order (scPRINT2.genes), not in dict order.
    genes = {HUMAN: sorted(set(human_genes.tolist())), MOUSE: sorted(set(mouse_genes.tolist()))}
    organisms = sorted(genes)

    ckpt_path = args.out_dir / "upstream_toy.ckpt"
    with tempfile.TemporaryDirectory() as tmp:  # the parquet paths in hparams then dangle,
        loc_file, emb_file = write_gene_tables(Path(tmp), rng, genes)  # as in real checkpoints
        built = build_model(scPRINT2, genes, organisms, loc_file, emb_file)
    redraw_weights(built, args.seed)
    built.eval()
    save_checkpoint(built, ckpt_path)
    # Hyper-parameters are plain containers: a weights_only torch.load can read the file.
    torch.load(ckpt_path, map_location="cpu", weights_only=True)

    model = (
        scPRINT2.load_from_checkpoint(
            ckpt_path,
            map_location="cpu",
            precpt_gene_emb=None,
            gene_pos_file=None,
            weights_only=False,
        )
        .eval()
        .float()
    )
    assert model.pos_encoder is not None and model.pos_encoder.pe.shape == (len(model.genes), 1, 64), (
        "pos_encoder.pe not restored"
    )
    loaded = model.state_dict()
    for key, value in built.state_dict().items():
        assert torch.equal(loaded[key], value), f"{key} differs after load_from_checkpoint"
    assert set(loaded) == set(built.state_dict())
    assert zero_attention_dropout(model) > 0 and zero_attention_dropout(built) > 0

    vocab = list(model.genes)
    assert vocab == genes[MOUSE] + genes[HUMAN]
    vocab_index = {g: i for i, g in enumerate(vocab)}
    parts = []
    for org, counts, gene_ids, pool in (
        (HUMAN, human_counts, human_genes, 600),
        (MOUSE, mouse_counts, mouse_genes, 2000),
    ):
        cells, inputs = build_inputs(rng, vocab_index, counts, gene_ids, args.cells, args.tokens, args.knn, pool)
        inputs["cell_index"], inputs["organism"] = cells, np.array([org] * len(cells))
        parts.append(inputs)
    inputs = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    inputs["genes"] = inputs["genes"].astype(np.int64)
    for key in ("counts", "knn_counts", "knn_dists", "depth"):
        inputs[key] = inputs[key].astype(np.float32)

    first = run_upstream(model, inputs)
    second = run_upstream(model, inputs)
    from_built = run_upstream(built, inputs)
    for key in first:
        assert np.array_equal(first[key], second[key]), f"upstream not deterministic: {key}"
        assert np.array_equal(first[key], from_built[key]), f"loaded != built model: {key}"

    classes = list(model.classes)
    np.savez(
        args.out_dir / "reference.npz",
        **inputs,
        **first,
        classes=np.array(classes),
        class_sizes=np.array([CLASSES[c] for c in classes]),
        compress_dims=np.array([COMPRESS[c] for c in classes]),
        vocab=np.array(vocab),
        organisms=np.array(organisms),
    )
    summary = {
        "scprint2": scprint2.__version__,
        "torch": torch.__version__,
        "checkpoint": str(ckpt_path),
        "reference": str(args.out_dir / "reference.npz"),
        "n_genes": len(vocab),
        "batch": int(inputs["genes"].shape[0]),
        "tokens": args.tokens,
        "classes": classes,
        "emb_width": int(first["output_cell_emb"].shape[1]),
        "n_params": sum(p.numel() for p in model.parameters()),
        "emb_std": float(first["output_cell_emb"].std()),
        "expressed_fraction": float((inputs["counts"] > 0).mean()),
    }
    print(json.dumps(summary, indent=1))
    return summary


if __name__ == "__main__":
    main()
