"""Turn rows of raw counts into scPRINT-2 inputs: QC, gene selection, neighbour counts.

Gene selection follows upstream's ``"random expr"`` at predict time: a cell
with more than ``max_len`` expressed vocabulary genes shows the model a random
``max_len`` of them; a cell with fewer shows all of them, filled up to exactly
``max_len`` tokens with genes it does not express, ranked by how much its
neighbours express them (metacell models), then at random. So batches never
hold padding. The token order does not matter to the network (no sequence
position), so tokens are given in ascending vocabulary order.

Randomness comes from a counter-based hash of (seed, dataset, row, gene or
draw), not from a random generator's state: a cell gets the same genes whatever
batch, unit, worker, rank or restart it is processed in.

Everything is vectorised over sparse entries: the work per cell is about
``nnz + max_len``, not the vocabulary size.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp

_MASK = np.uint64(0xFFFFFFFFFFFFFFFF)
_GENE_STRIDE = np.uint64(0xD1B54A32D192ED03)
_DRAW_STRIDE = np.uint64(0x8CB92BA72F3D8DD7)
EXTRA_DRAWS = 64  # random fill candidates beyond max_len, to absorb collisions


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


def _hash(keys: np.ndarray, values: np.ndarray, stride: np.uint64) -> np.ndarray:
    with np.errstate(over="ignore"):
        return _mix(keys ^ (values.astype(np.uint64) * stride))


def _uniform(keys: np.ndarray, genes: np.ndarray) -> np.ndarray:
    """A float in [0, 1) per (cell key, gene) pair, elementwise."""
    return (_hash(keys, genes, _GENE_STRIDE) >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


def select_genes(
    counts: sp.csr_matrix,
    keys: np.ndarray,
    max_len: int,
    neighbor_sums: sp.csr_matrix | None = None,
) -> np.ndarray:
    """Choose each cell's ``min(max_len, n_vocabulary)`` vocabulary genes.

    Parameters
    ----------
    counts
        [n_cells, n_vocabulary] raw counts over one organism's vocabulary.
    keys
        [n_cells] uint64 cell keys (:func:`cell_keys`).
    max_len
        Tokens per cell.
    neighbor_sums
        [n_cells, n_vocabulary] summed counts of each cell's neighbours, or None.

    Returns
    -------
    int64 [n_cells, length] local vocabulary indices, ascending per row.

    Notes
    -----
    Every candidate gets a rank key (class, value, tie-break): class 0 for the
    cell's expressed genes (random order), class 1 for genes only its
    neighbours express (by summed neighbour counts, descending), class 2 for
    random draws over the whole vocabulary. A gene keeps its best key, and the
    first ``length`` genes of each cell are taken.
    """
    n_cells, n_vocab = counts.shape
    length = min(max_len, n_vocab)
    rows, genes, klass, value = [], [], [], []

    def add(r, g, c, v):
        rows.append(r)
        genes.append(g.astype(np.int64))
        klass.append(np.full(len(r), c, dtype=np.int8))
        value.append(v)

    counts = counts.tocsr()
    r, g, _ = _entries(counts)
    add(r, g, 0, _uniform(keys[r], g))
    short = np.flatnonzero(np.bincount(r, minlength=n_cells) < length)  # only these need filling
    if neighbor_sums is not None:
        r, g, s = _entries(neighbor_sums.tocsr()[short])
        add(short[r], g, 1, -s.astype(np.float64))
    n_draws = length + EXTRA_DRAWS
    r = np.repeat(short, n_draws)
    draw = np.tile(np.arange(n_draws, dtype=np.uint64), len(short))
    g = (_hash(keys[r], draw, _DRAW_STRIDE) % np.uint64(n_vocab)).astype(np.int64)
    add(r, g, 2, draw.astype(np.float64))

    rows, genes, klass, value = map(np.concatenate, (rows, genes, klass, value))
    tie = _uniform(keys[rows], genes)
    order = np.lexsort((tie, value, klass, rows))
    # keep each (cell, gene) once, at its best rank key
    pair = rows[order] * n_vocab + genes[order]
    _, first = np.unique(pair, return_index=True)
    kept = order[np.sort(first)]
    kept_rows = rows[kept]
    starts = np.searchsorted(kept_rows, np.arange(n_cells))
    rank = np.arange(len(kept)) - starts[kept_rows]
    take = rank < length
    chosen = np.zeros((n_cells, length), dtype=np.int64)
    filled = np.zeros(n_cells, dtype=np.int64)
    chosen[kept_rows[take], rank[take]] = genes[kept][take]
    np.add.at(filled, kept_rows[take], 1)
    for row in np.flatnonzero(filled < length):  # vocabulary barely larger than max_len: rare
        chosen[row] = _select_densely(counts[row], keys[row], length, None if neighbor_sums is None
                                      else neighbor_sums[row])  # fmt: skip
    return np.sort(chosen, axis=1)


def _entries(matrix: sp.csr_matrix) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(row, column, value) of the positive stored entries of a CSR matrix."""
    rows = np.repeat(np.arange(matrix.shape[0]), np.diff(matrix.indptr))
    positive = matrix.data > 0
    return rows[positive], matrix.indices[positive], matrix.data[positive]


def _select_densely(counts: sp.csr_matrix, key: np.uint64, length: int, neighbor_sums) -> np.ndarray:
    """One cell, every vocabulary gene ranked with the same rank keys (used when draws run short)."""
    n_vocab = counts.shape[1]
    genes = np.arange(n_vocab)
    keys = np.full(n_vocab, key, dtype=np.uint64)
    expressed = counts.toarray().ravel() > 0
    nsum = np.zeros(n_vocab) if neighbor_sums is None else neighbor_sums.toarray().ravel()
    klass = np.where(expressed, 0, np.where(nsum > 0, 1, 2))
    value = np.where(expressed, _uniform(keys, genes), -nsum)
    order = np.lexsort((_uniform(keys, genes), value, klass))
    return order[:length]


def lookup(matrix: sp.csr_matrix, rows: np.ndarray, genes: np.ndarray) -> np.ndarray:
    """``matrix[rows[i], genes[i, j]]`` as a float32 [len(rows), n_tokens] array, without densifying.

    Every stored entry gets the key ``row * n_columns + column`` (sorted, as the
    CSR is), and each query is a binary search for its key.
    """
    matrix = matrix.tocsr()
    matrix.sort_indices()
    n_columns = matrix.shape[1]
    entry_rows = np.repeat(np.arange(matrix.shape[0], dtype=np.int64), np.diff(matrix.indptr))
    entry_keys = entry_rows * n_columns + matrix.indices
    query = (np.asarray(rows, dtype=np.int64)[:, None] * n_columns + genes).ravel()
    at = np.minimum(np.searchsorted(entry_keys, query), max(len(entry_keys) - 1, 0))
    found = entry_keys[at] == query if len(entry_keys) else np.zeros(len(query), dtype=bool)
    values = np.where(found, matrix.data[at] if len(entry_keys) else 0, 0)
    return values.reshape(genes.shape).astype(np.float32)


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
