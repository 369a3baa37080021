"""Turn rows of raw counts into scPRINT-2 inputs: QC, gene selection, neighbour counts.

Gene selection follows upstream's ``"random expr"`` at predict time: a cell
with more than ``max_len`` expressed vocabulary genes shows the model a random
``max_len`` of them; a cell with fewer shows all of them, filled up to exactly
``max_len`` tokens with genes it does not express, chosen by how much its
neighbours express them (metacell models) or at random. So batches never hold
padding. The token order does not matter to the network (no sequence position),
so tokens are given in ascending vocabulary order.

Randomness comes from a counter-based hash of (seed, dataset, row, gene), not
from a random generator's state: a cell gets the same genes whatever batch,
unit, worker, rank or restart it is processed in.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp

_MASK = np.uint64(0xFFFFFFFFFFFFFFFF)


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser, vectorised over uint64 arrays (wrapping arithmetic)."""
    with np.errstate(over="ignore"):
        x = (x + np.uint64(0x9E3779B97F4A7C15)) & _MASK
        x = ((x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)) & _MASK
        x = ((x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)) & _MASK
        return x ^ (x >> np.uint64(31))


def cell_keys(seed: int, dataset: int, rows: np.ndarray) -> np.ndarray:
    """One uint64 key per cell from (seed, dataset id, row in the source matrix)."""
    base = _mix(np.array([seed], dtype=np.uint64))
    base = _mix(base ^ np.uint64(dataset))
    return _mix(base ^ np.asarray(rows, dtype=np.uint64))


def uniform(keys: np.ndarray, n_genes: int) -> np.ndarray:
    """[n_cells, n_genes] floats in [0, 1), a pure function of each cell's key and the gene index."""
    genes = np.arange(n_genes, dtype=np.uint64) * np.uint64(0xD1B54A32D192ED03)
    with np.errstate(over="ignore"):
        bits = _mix(keys[:, None] ^ genes[None, :])
    return (bits >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


def select_genes(
    counts: sp.csr_matrix,
    keys: np.ndarray,
    max_len: int,
    neighbor_sums: np.ndarray | None = None,
) -> np.ndarray:
    """Choose each cell's ``max_len`` vocabulary genes.

    Parameters
    ----------
    counts
        [n_cells, n_vocabulary] raw counts over one organism's vocabulary.
    keys
        [n_cells] uint64 cell keys (:func:`cell_keys`).
    max_len
        Tokens per cell; capped at the vocabulary size.
    neighbor_sums
        [n_cells, n_vocabulary] summed counts of each cell's neighbours, or None.

    Returns
    -------
    int64 [n_cells, min(max_len, n_vocabulary)] local vocabulary indices, ascending per row.
    """
    n_cells, n_vocab = counts.shape
    length = min(max_len, n_vocab)
    # priority: expressed genes first (random order among them), then unexpressed
    # genes by neighbour expression (descending), ties and the rest at random
    u = uniform(keys, n_vocab)
    expressed = counts.toarray() > 0
    if neighbor_sums is None:
        rest = 2.0 + u
    else:
        rest = 1.0 + 1.0 / (1.0 + neighbor_sums) + u * 1e-12
    priority = np.where(expressed, u, rest)
    if length < n_vocab:
        chosen = np.argpartition(priority, length - 1, axis=1)[:, :length]
    else:
        chosen = np.broadcast_to(np.arange(n_vocab), (n_cells, n_vocab))
    return np.sort(chosen, axis=1).astype(np.int64)


def gather(matrix: sp.csr_matrix, rows: np.ndarray, genes: np.ndarray) -> np.ndarray:
    """``matrix[rows[i], genes[i, j]]`` as a dense float32 [len(rows), n_tokens] array."""
    dense = matrix[rows].toarray()
    return np.take_along_axis(dense, genes, axis=1).astype(np.float32)


def qc_reasons(
    n_counts: np.ndarray,
    n_vocab_genes: np.ndarray,
    min_counts: int,
    min_genes: int,
) -> np.ndarray:
    """Per cell, '' when kept, else why it is dropped (``no_counts``, ``min_counts``, ``no_vocabulary_genes``, ``min_genes``)."""
    reasons = np.full(len(n_counts), "", dtype=object)
    reasons[n_vocab_genes < min_genes] = "min_genes"
    reasons[n_vocab_genes == 0] = "no_vocabulary_genes"
    reasons[n_counts < min_counts] = "min_counts"
    reasons[n_counts == 0] = "no_counts"
    return reasons
