"""The scPRINT-2 network, read top to bottom.

A cell is shown to the model as ``L`` tokens, one per gene: the gene's identity
(a frozen protein-language-model embedding plus a small adapter, plus a per-gene
positional vector from its locus), and its expression together with the
expression of the same gene in the cell's nearest neighbours ("metacell"
encoder). A main transformer mixes the gene tokens; a small cell transformer then
lets one learnt token per class (plus an "other" token) cross-attend to them.
Each class token is compressed (VAE mean or FSQ projection) into that class's
embedding block and classified by a small MLP head over the class's leaf labels.

Module and parameter names follow the published checkpoints exactly, so their
``state_dict`` loads into this network as is (see ``models/checkpoint.py``).

Differences from upstream, on purpose:

- attention dropout is never applied at inference (upstream passes its dropout
  rate to SDPA even in ``eval()``, which makes its predictions stochastic);
- embeddings and logits come from the deterministic parts only (VAE mean, FSQ
  projection): no sampling anywhere.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

TRANSFORMER_LN_EPS = 1e-6  # transformer blocks and their final norm; elsewhere torch's 1e-5


@dataclass
class ScPrint2Config:
    """Hyper-parameters of a scPRINT-2 network, named as in ``ckpt["hyper_parameters"]``."""

    genes: dict[str, list[str]]  # organism id -> Ensembl ids, concatenated in `organisms` order
    organisms: list[str]
    classes: dict[str, int]  # class name -> number of leaf labels, in model order
    label_decoders: dict[str, dict[int, str]]  # class -> code -> ontology term id
    labels_hierarchy: dict[str, dict[int, list[int]]] = field(default_factory=dict)
    compress_class_dim: dict[str, int] | None = None
    d_model: int = 256
    nhead: int = 4
    num_heads_kv: int = 4
    nlayers: int = 8
    cell_specific_blocks: bool = True
    d_model_cell: int = 256
    nhead_cell: int = 4
    num_heads_kv_cell: int = 4
    nlayers_cell: int = 6
    expr_emb_style: str = "metacell"  # "metacell" or "continuous"
    expr_encoder_layers: int = 1
    normalization: str = "log"  # "log", "sum", "both" or "raw"
    finetune_gene_emb: bool = True
    layers_cls: list[int] = field(default_factory=lambda: [256])
    zinb: bool = True
    use_metacell_token: bool = False
    dropout: float = 0.0  # training only; nothing is dropped at inference
    has_pos_encoder: bool = True  # whether the checkpoint has `pos_encoder.pe`

    @property
    def vocabulary(self) -> list[str]:
        """All gene ids in model order (organism blocks one after the other)."""
        return [g for o in self.organisms for g in self.genes[o]]

    @property
    def organism_offsets(self) -> dict[str, int]:
        """Index of each organism's first gene in :attr:`vocabulary`."""
        offsets, start = {}, 0
        for o in self.organisms:
            offsets[o] = start
            start += len(self.genes[o])
        return offsets

    @property
    def cell_dim(self) -> int:
        """Width of the class tokens."""
        return self.d_model_cell if self.cell_specific_blocks else self.d_model

    @property
    def embedding_blocks(self) -> list[tuple[str, int]]:
        """(name, width) of each block of the cell embedding, in output order."""
        widths = self.compress_class_dim or {}
        return [("other", self.cell_dim)] + [(c, widths.get(c, self.cell_dim)) for c in self.classes]

    @property
    def topk(self) -> dict[str, int]:
        """How many labels are reported per class: 3, or 1 for two-label classes."""
        return {c: 1 if n <= 2 else min(3, n) for c, n in self.classes.items()}

    def flops_per_cell(self, max_len: int, n_neighbors: int = 6) -> float:
        """Forward FLOPs for one cell of ``max_len`` gene tokens (multiply-add = 2), for MFU.

        Counted for the network as upstream computes it (key/value projections
        of every gene token in each cross-attention layer, neighbour encoder's
        last layer per neighbour), so MFU figures compare with upstream's;
        this implementation skips part of that work (see
        :class:`CrossAttention` and :class:`MetacellExpressionEncoder`).
        """
        L, D, Dc = max_len, self.d_model, self.cell_dim
        C1 = len(self.classes) + 1
        hd, hdc = D // self.nhead, Dc // self.nhead_cell
        flops = 2 * L * 2 * D * D if self.finetune_gene_emb else 0  # gene adapter
        if self.expr_emb_style == "metacell":
            flops += 2 * L * (D + D * D) * (1 + n_neighbors) + 2 * L * 2 * D * D
        else:
            flops += 2 * L * D
        n_main = L + (0 if self.cell_specific_blocks else C1)
        per_block = D * hd * (self.nhead + 2 * self.num_heads_kv) + D * D + 8 * D * D
        flops += self.nlayers * (2 * n_main * per_block + 4 * n_main * n_main * D)
        if self.cell_specific_blocks:
            self_part = Dc * hdc * (self.nhead_cell + 2 * self.num_heads_kv_cell) + Dc * Dc + 8 * Dc * Dc
            cross_q = 2 * Dc * Dc  # Wq and out_proj on the class tokens
            cross_kv = 2 * L * D * 2 * hdc * self.num_heads_kv_cell  # Wkv on every gene token
            flops += self.nlayers_cell * (
                2 * C1 * (self_part + cross_q) + cross_kv + 4 * C1 * C1 * Dc + 4 * C1 * L * Dc
            )
        return float(flops)


# ----------------------------------------------------------------------------- encoders


class GeneEncoder(nn.Module):
    """Frozen gene-identity embedding (one row per vocabulary gene)."""

    def __init__(self, n_genes: int, dim: int):
        super().__init__()
        self.embeddings = nn.Embedding(n_genes, dim)
        self.embeddings.weight.requires_grad_(False)

    def forward(self, genes: Tensor) -> Tensor:
        return self.embeddings(genes)


class PositionalEncoding(nn.Module):
    """Per-gene sinusoidal vector of the gene's locus rank, stored as a buffer [G, 1, D]."""

    def __init__(self, n_genes: int, dim: int):
        super().__init__()
        self.register_buffer("pe", torch.zeros(n_genes, 1, dim))

    def forward(self, genes: Tensor) -> Tensor:
        return self.pe[genes.reshape(-1), 0].reshape(*genes.shape, -1)


def sinusoidal_positions(positions: Tensor, dim: int) -> Tensor:
    """[G] 1-based locus ranks -> [G, 1, dim] sin (even dims) / cos (odd dims), base 10000."""
    freq = torch.exp(torch.arange(0, dim, 2) * (-math.log(10_000.0) / dim))
    angle = (positions.float() - 1)[:, None] * freq[None]
    pe = torch.zeros(len(positions), 1, dim)
    pe[:, 0, 0::2] = torch.sin(angle)
    pe[:, 0, 1::2] = torch.cos(angle)
    return pe


def mlp_stack(sizes: list[int], final_linear: int | None = None) -> nn.Sequential:
    """[Linear, LayerNorm, ReLU, Dropout] per step of ``sizes``, then an optional Linear.

    This is the layout (hence the parameter indices 0, 1, 4, 5, ...) that all
    upstream small MLPs share.
    """
    layers = nn.Sequential()
    for d_in, d_out in zip(sizes[:-1], sizes[1:]):
        layers.extend([nn.Linear(d_in, d_out), nn.LayerNorm(d_out), nn.ReLU(), nn.Dropout(0.0)])
    if final_linear is not None:
        layers.append(nn.Linear(sizes[-1], final_linear))
    return layers


class MetacellExpressionEncoder(nn.Module):
    """Expression of a gene in the cell and in its K neighbours -> one D vector (upstream `EasyExprGNN`).

    self branch:      x [B, L]                          -> [B, L, D]
    neighbour branch: (count, distance) [B, L, K, 2]    -> [B, L, K, D] -> sum over K
    shared:           cat(self, neighbours) [B, L, 2D]  -> [B, L, D]
    """

    def __init__(self, dim: int, n_shared_layers: int):
        super().__init__()
        self.dim = dim
        self.neighbors_layers = mlp_stack([2, dim], final_linear=dim)
        self.self_layers = mlp_stack([1, dim], final_linear=dim)
        self.shared_layers = mlp_stack([2 * dim] * n_shared_layers, final_linear=dim)

    def forward(self, x: Tensor, neighbors: Tensor | None, distances: Tensor | None) -> Tensor:
        own = self.self_layers(x.unsqueeze(-1))
        if neighbors is None:
            neigh = torch.zeros_like(own)
        else:
            pairs = torch.stack([neighbors.transpose(1, 2), distances.unsqueeze(1).expand(-1, x.shape[1], -1)], -1)
            # sum over neighbours before the last (linear) layer: the same value, K times fewer FLOPs
            hidden = self.neighbors_layers[:-1](pairs).sum(-2)
            last = self.neighbors_layers[-1]
            neigh = F.linear(hidden, last.weight) + pairs.shape[2] * last.bias
        return self.shared_layers(torch.cat([own, neigh], -1))


class ContinuousExpressionEncoder(nn.Module):
    """scPRINT-1 style: the clamped expression value alone through a small MLP."""

    def __init__(self, dim: int, n_layers: int):
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(1, dim))
        for _ in range(n_layers - 1):
            self.encoder.extend([nn.LayerNorm(dim), nn.ReLU(), nn.Dropout(0.0), nn.Linear(dim, dim)])

    def forward(self, x: Tensor, neighbors: Tensor | None = None, distances: Tensor | None = None) -> Tensor:
        return self.encoder(x.clamp(0, 100_000).unsqueeze(-1))


class ClassEmbedding(nn.Module):
    """One learnt token per class, plus token 0 for "other"."""

    def __init__(self, n_tokens: int, dim: int):
        super().__init__()
        self.embedding = nn.Embedding(n_tokens, dim)


# ----------------------------------------------------------------------------- transformer


def attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """q [B, Lq, H, hd], k/v [B, Lk, Hkv, hd] -> [B, Lq, H*hd]; query head j reads kv head j // (H/Hkv)."""
    n_heads, n_kv = q.shape[2], k.shape[2]
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), enable_gqa=n_kv != n_heads
    )
    return out.transpose(1, 2).flatten(2)


class SelfAttention(nn.Module):
    """Grouped-query self-attention; ``Wqkv`` rows are q heads, then k heads, then v heads."""

    def __init__(self, dim: int, n_heads: int, n_kv_heads: int):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = n_heads, n_kv_heads, dim // n_heads
        self.Wqkv = nn.Linear(dim, self.head_dim * (n_heads + 2 * n_kv_heads))
        self.out_proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        B, L, _ = x.shape
        q, k, v = self.Wqkv(x).split(
            [self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim, self.n_kv_heads * self.head_dim], -1
        )
        q = q.view(B, L, self.n_heads, self.head_dim)
        k = k.view(B, L, self.n_kv_heads, self.head_dim)
        v = v.view(B, L, self.n_kv_heads, self.head_dim)
        return self.out_proj(attention(q, k, v))


class CrossAttention(nn.Module):
    """Queries from ``x``, keys/values from ``x_kv`` (of width ``kv_dim``); ``Wkv`` rows: k heads then v heads.

    The few class tokens attend to thousands of gene tokens, so the key and
    value projections are moved to the query side instead of being applied to
    every gene token (the same attention, far fewer FLOPs):

    - scores: ``q . (Wk x + bk) = (Wk^T q) . x + q . bk``; the last term is the
      same for every key and cancels in the softmax;
    - output: ``sum_j p_j (Wv x_j + bv) = Wv (sum_j p_j x_j) + bv``, as the
      attention weights ``p`` sum to 1.
    """

    def __init__(self, dim: int, kv_dim: int, n_heads: int, n_kv_heads: int):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = n_heads, n_kv_heads, dim // n_heads
        self.Wq = nn.Linear(dim, dim)
        self.Wkv = nn.Linear(kv_dim, 2 * self.head_dim * n_kv_heads)
        self.out_proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor, x_kv: Tensor) -> Tensor:
        B, Lq, _ = x.shape
        H, hd, group = self.n_heads, self.head_dim, self.n_heads // self.n_kv_heads
        q = self.Wq(x).view(B, Lq, H, hd)
        # per query head: its kv head's key and value weights [H, hd, kv_dim] and value bias [H, hd]
        w_k, w_v = self.Wkv.weight.view(2, self.n_kv_heads, hd, -1).repeat_interleave(group, 1).unbind(0)
        b_v = self.Wkv.bias.view(2, self.n_kv_heads, hd)[1].repeat_interleave(group, 0)
        q_kv = torch.einsum("bqhd,hde->bhqe", q, w_k).reshape(B, H * Lq, -1)  # queries in x_kv's space
        p = torch.softmax(q_kv @ x_kv.transpose(1, 2) * hd**-0.5, dim=-1)  # [B, H * Lq, Lk]
        mixed = (p.to(x_kv.dtype) @ x_kv).view(B, H, Lq, -1)  # attention-weighted gene tokens
        out = torch.einsum("bhqe,hde->bqhd", mixed, w_v.to(mixed.dtype)) + b_v
        return self.out_proj(out.flatten(2))


class MLP(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, 4 * dim)
        self.fc2 = nn.Linear(4 * dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class Block(nn.Module):
    """Pre-LayerNorm block: [cross-attention], self-attention, MLP, each added to an fp32 residual."""

    def __init__(self, dim: int, n_heads: int, n_kv_heads: int, cross_dim: int | None):
        super().__init__()
        self.mixer = SelfAttention(dim, n_heads, n_kv_heads)
        self.norm1 = nn.LayerNorm(dim, eps=TRANSFORMER_LN_EPS)
        self.norm2 = nn.LayerNorm(dim, eps=TRANSFORMER_LN_EPS)
        self.mlp = MLP(dim)
        if cross_dim is not None:
            self.cross_attn = CrossAttention(dim, cross_dim, n_heads, n_kv_heads)
            self.norm3 = nn.LayerNorm(dim, eps=TRANSFORMER_LN_EPS)

    def forward(self, residual: Tensor, x_kv: Tensor | None) -> Tensor:
        h = self.norm1(residual)
        if x_kv is not None:  # cross-attention comes first, then norm3 feeds self-attention
            residual = residual + self.cross_attn(h, x_kv).float()
            h = self.norm3(residual)
        residual = residual + self.mixer(h).float()
        return residual + self.mlp(self.norm2(residual)).float()


class Transformer(nn.Module):
    def __init__(self, dim: int, n_heads: int, n_kv_heads: int, n_layers: int, cross_dim: int | None = None):
        super().__init__()
        self.blocks = nn.ModuleList(Block(dim, n_heads, n_kv_heads, cross_dim) for _ in range(n_layers))
        self.norm = nn.LayerNorm(dim, eps=TRANSFORMER_LN_EPS)

    def forward(self, x: Tensor, x_kv: Tensor | None = None) -> Tensor:
        residual = x.float()
        for block in self.blocks:
            residual = block(residual, x_kv)
        return self.norm(residual)


# ----------------------------------------------------------------------------- heads


class ExpressionDecoder(nn.Module):
    """Upstream's expression (ZINB) decoder. Kept so checkpoints load strictly; not used for embeddings."""

    def __init__(self, dim: int, zinb: bool):
        super().__init__()
        self.fc = nn.Sequential(
            nn.Linear(dim + 1, dim), nn.LayerNorm(dim), nn.LeakyReLU(), nn.Dropout(0.0),
            nn.Linear(dim, dim), nn.LayerNorm(dim), nn.LeakyReLU(),
        )  # fmt: skip
        self.pred_var_zero = nn.Linear(dim, 3 if zinb else 1)


class Classifier(nn.Module):
    """Class embedding -> logits over the class's leaf labels."""

    def __init__(self, dim: int, hidden: list[int], n_labels: int):
        super().__init__()
        self.decoder = mlp_stack([dim] + hidden)
        self.out_layer = nn.Linear(([dim] + hidden)[-1], n_labels)

    def forward(self, z: Tensor) -> Tensor:
        return self.out_layer(self.decoder(z))


class VAECompressor(nn.Module):
    """Class token -> ``width`` latent; the embedding is the mean ``fc_mu`` (no sampling)."""

    def __init__(self, dim: int, width: int, hidden: int = 128):
        super().__init__()
        self.encoder = mlp_stack([dim, hidden, width])
        self.fc_mu = nn.Linear(width, width)
        self.fc_var = nn.Linear(width, width)
        self.decoder = mlp_stack([width, hidden], final_linear=dim)

    def forward(self, token: Tensor) -> Tensor:
        return self.fc_mu(self.encoder(token))


class FSQCompressor(nn.Module):
    """Class token -> ``width`` linear projection (the un-quantized FSQ input)."""

    def __init__(self, dim: int, width: int):
        super().__init__()
        self.project_in = nn.Linear(dim, width)
        self.project_out = nn.Linear(width, dim)

    def forward(self, token: Tensor) -> Tensor:
        return self.project_in(token)


# ----------------------------------------------------------------------------- model


class ScPrint2(nn.Module):
    """scPRINT-2 for inference: gene tokens in, cell embedding and per-class logits out."""

    def __init__(self, config: ScPrint2Config):
        super().__init__()
        self.config = cfg = config
        D, Dc, G = cfg.d_model, cfg.cell_dim, len(cfg.vocabulary)
        if cfg.finetune_gene_emb:
            self.gene_encoder = nn.Sequential(GeneEncoder(G, D), nn.Linear(D, D), nn.ReLU(), nn.Linear(D, D))
        else:
            self.gene_encoder = GeneEncoder(G, D)
        self.pos_encoder = PositionalEncoding(G, D) if cfg.has_pos_encoder else None
        if cfg.expr_emb_style == "metacell":
            self.expr_encoder = MetacellExpressionEncoder(D, cfg.expr_encoder_layers)
        elif cfg.expr_emb_style == "continuous":
            self.expr_encoder = ContinuousExpressionEncoder(D, cfg.expr_encoder_layers)
        else:
            raise ValueError(f"expr_emb_style {cfg.expr_emb_style!r} is not supported (metacell, continuous)")
        self.class_encoder = ClassEmbedding(len(cfg.classes) + 1, Dc)
        if cfg.use_metacell_token:
            self.metacell_encoder = ClassEmbedding(2, D)
        cross = Dc if cfg.cell_specific_blocks else None
        self.transformer = Transformer(D, cfg.nhead, cfg.num_heads_kv, cfg.nlayers, cross)
        if cfg.cell_specific_blocks:
            self.cell_transformer = Transformer(Dc, cfg.nhead_cell, cfg.num_heads_kv_cell, cfg.nlayers_cell, D)
        self.expr_decoder = ExpressionDecoder(D, cfg.zinb)
        widths = dict(cfg.embedding_blocks)
        self.cls_decoders = nn.ModuleDict(
            {c: Classifier(widths[c], list(cfg.layers_cls), n) for c, n in cfg.classes.items()}
        )
        if cfg.compress_class_dim:
            self.compressor = nn.ModuleDict(
                {c: VAECompressor(Dc, w) if w >= 8 else FSQCompressor(Dc, w) for c, w in cfg.compress_class_dim.items()}
            )
        else:
            self.compressor = None

    def forward(
        self,
        genes: Tensor,
        counts: Tensor,
        knn_counts: Tensor | None = None,
        knn_dists: Tensor | None = None,
    ) -> dict:
        """Embed a batch of cells.

        Parameters
        ----------
        genes
            int64 [B, L] vocabulary indices (see :attr:`ScPrint2Config.vocabulary`).
        counts
            float [B, L] raw counts of those genes.
        knn_counts, knn_dists
            float [B, K, L] raw counts of the same genes in the K nearest
            neighbours, and float [B, K] their distances (metacell models).

        Returns
        -------
        dict with ``embs`` float [B, E] (``other`` then one block per class)
        and ``logits``: class name -> float [B, n_labels].
        """
        cfg = self.config
        x, neighbors = self._normalize(counts), None
        if knn_counts is not None:
            neighbors = self._normalize(knn_counts, dim=2)
        tokens = self.gene_encoder(genes) + self.expr_encoder(x, neighbors, knn_dists)
        if self.pos_encoder is not None:
            tokens = tokens + self.pos_encoder(genes)
        if cfg.use_metacell_token:
            meta = self.metacell_encoder.embedding.weight[0].expand(len(genes), 1, -1)
            tokens = torch.cat([meta.to(tokens.dtype), tokens], 1)
        cells = self.class_encoder.embedding.weight.expand(len(genes), -1, -1)  # [B, C+1, Dc]
        if cfg.cell_specific_blocks:
            cells = self.cell_transformer(cells, x_kv=self.transformer(tokens))
        else:
            cells = self.transformer(torch.cat([cells.to(tokens.dtype), tokens], 1))[:, : len(cfg.classes) + 1]
        blocks, logits = [cells[:, 0]], {}
        for i, name in enumerate(cfg.classes):
            z = self.compressor[name](cells[:, i + 1]) if self.compressor is not None else cells[:, i + 1]
            blocks.append(z)
            logits[name] = self.cls_decoders[name](z)
        return {"embs": torch.cat([b.float() for b in blocks], 1), "logits": logits}

    def _normalize(self, counts: Tensor, dim: int = 1) -> Tensor:
        norm = self.config.normalization
        if norm in ("sum", "both"):
            return counts / counts.sum(dim, keepdim=True)
        if norm == "log":
            return torch.log2(1 + counts)
        if norm == "raw":
            return counts
        raise ValueError(f"unknown normalization {norm!r}")

    @torch.no_grad()
    def predict(
        self,
        genes: Tensor,
        counts: Tensor,
        knn_counts: Tensor | None = None,
        knn_dists: Tensor | None = None,
    ) -> dict[str, Tensor]:
        """Embeddings plus the top-k labels of every class and their scores.

        Returns ``embs`` float32 [B, E], ``top_ids`` int64 [B, T] (leaf label
        codes, class after class, k per class as in :attr:`ScPrint2Config.topk`)
        and ``top_scores`` float32 [B, T]: ``sigmoid(logit)``, the per-label
        probability the heads were trained for (binary cross-entropy per label),
        so the scores of one class do not sum to 1.
        """
        out = self(genes, counts, knn_counts, knn_dists)
        ids, scores = [], []
        for name, k in self.config.topk.items():
            top = out["logits"][name].float().topk(k, dim=1)
            ids.append(top.indices)
            scores.append(torch.sigmoid(top.values))
        return {"embs": out["embs"].float(), "top_ids": torch.cat(ids, 1), "top_scores": torch.cat(scores, 1)}
