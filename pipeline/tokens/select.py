"""Turn rows of raw counts into scPRINT-2 inputs: QC, gene selection, neighbour counts.

Gene selection follows upstream's ``"random expr"`` at predict time: a cell
with more than ``max_len`` expressed vocabulary genes shows the model a random
``max_len`` of them; a cell with fewer shows all of them, filled up to exactly
``max_len`` tokens with genes it does not express, ranked by how much its
neighbours express them (metacell models), then at random. So batches never
hold padding. The token order does not matter to the network (no sequence
position), so tokens are given in ascending vocabulary order.

Randomness comes from a counter-based hash of (seed, dataset identity, row,
gene or draw), not from a random generator's state: a cell gets the same genes
whatever batch, unit, worker, rank or restart it is processed in, and wherever
its dataset sits in the input list (the identity is the catalog's dataset_id or
a fingerprint of the counts, :func:`pipeline.plan.datasets.dataset_identity`).

Everything is vectorised over sparse entries: the work per cell is about
``nnz + max_len``, not the vocabulary size.
"""

from __future__ import annotations

import hashlib

import numpy as np
import scipy.sparse as sp

_MASK = np.uint64(0xFFFFFFFFFFFFFFFF)
_GENE_STRIDE = np.uint64(0xD1B54A32D192ED03)
_DRAW_STRIDE = np.uint64(0x8CB92BA72F3D8DD7)
EXTRA_DRAWS = 64  # random fill candidates beyond max_len, to absorb collisions
ROW_BITS = 24  # rank keys: a batch has fewer than 2^24 cells
COUNT_BITS = 20  # neighbour counts order genes up to 2^20 - 1
COUNT_MAX = (1 << COUNT_BITS) - 1
LOOKUP_TABLE_VALUES = 1 << 23  # lookup's dense table: at most 8M float32 values, 32 MiB
LOOKUP_TABLE_RATIO = 16  # lookup's table when entries + table are at most this many times the queries


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser, vectorised over uint64 arrays (wrapping arithmetic)."""
    with np.errstate(over="ignore"):
        x = (x + np.uint64(0x9E3779B97F4A7C15)) & _MASK
        x = ((x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)) & _MASK
        x = ((x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)) & _MASK
        return x ^ (x >> np.uint64(31))


def identity_key(identity: str) -> int:
    """A dataset identity (any string) as the 64-bit integer :func:`cell_keys` takes: the first 8 bytes of its sha256."""
    return int.from_bytes(hashlib.sha256(identity.encode()).digest()[:8], "little")


def cell_keys(seed: int, dataset_key: int, rows: np.ndarray) -> np.ndarray:
    """One uint64 key per cell from (seed, a 64-bit key of its dataset, row in the source matrix)."""
    base = _mix(np.array([seed], dtype=np.uint64))
    base = _mix(base ^ np.uint64(dataset_key))
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
    Slots are filled in three rounds, each only for the cells the previous
    rounds left short: the cell's expressed genes (a random ``length`` of them
    when it has more), then genes only its neighbours express (most summed
    neighbour counts first, random tie-break), then random draws over the whole
    vocabulary in draw order. A gene is never taken twice: a per-batch mark of
    taken (cell, gene) pairs filters each round's candidates.
    """
    n_cells, n_vocab = counts.shape
    length = min(max_len, n_vocab)
    counts = counts.tocsr()
    taken_rows, taken_genes = [], []

    # round 1: expressed genes; cells with more than `length` keep a random `length` of them
    r, g, _ = _entries(counts)
    n_expressed = np.bincount(r, minlength=n_cells)
    too_many = (n_expressed > length)[r]
    if too_many.any():
        rank = _rank_in_row(r[too_many], _hash(keys[r[too_many]], g[too_many], _GENE_STRIDE))
        taken_rows.append(r[too_many][rank < length])
        taken_genes.append(g[too_many][rank < length])
    taken_rows.append(r[~too_many])
    taken_genes.append(g[~too_many])
    need = length - np.minimum(n_expressed, length)
    short = np.flatnonzero(need > 0)

    if short.size:
        # taken[i * n_vocab + gene] for the i-th short cell (calloc'd: untouched pages cost nothing)
        taken = np.zeros(short.size * n_vocab, dtype=bool)
        local = np.full(n_cells, -1, dtype=np.int64)
        local[short] = np.arange(short.size)
        expressed_short = ~too_many & (need[r] > 0)
        taken[local[r[expressed_short]] * n_vocab + g[expressed_short]] = True

        def take(rows, genes, rank):
            keep = rank < need[rows]
            rows, genes = rows[keep], genes[keep]
            taken[local[rows] * n_vocab + genes] = True
            need[:] -= np.bincount(rows, minlength=n_cells)
            taken_rows.append(rows)
            taken_genes.append(genes)

        # round 2: genes the neighbours express, most summed counts first
        if neighbor_sums is not None:
            nr, ng, ns = _entries(neighbor_sums.tocsr()[short])
            nr = short[nr]
            new = ~taken[local[nr] * n_vocab + ng]
            nr, ng, ns = nr[new], ng[new], ns[new]
            # most counts first (saturating at 2^20 - 1), then the random tie-break
            most_first = np.uint64(COUNT_MAX) - np.minimum(ns, COUNT_MAX).astype(np.uint64)
            tie = _hash(keys[nr], ng, _GENE_STRIDE) >> np.uint64(ROW_BITS + COUNT_BITS)  # its top bits
            take(nr, ng, _rank_in_row(nr, (most_first << np.uint64(64 - COUNT_BITS)) | (tie << np.uint64(ROW_BITS))))

        # round 3: random draws over the vocabulary, in draw order
        short = np.flatnonzero(need > 0)
        if short.size:
            n_draws = length + EXTRA_DRAWS
            dr = np.repeat(short, n_draws)
            draw = np.tile(np.arange(n_draws, dtype=np.uint64), short.size)
            dg = (_hash(keys[dr], draw, _DRAW_STRIDE) % np.uint64(n_vocab)).astype(np.int64)
            new = ~taken[local[dr] * n_vocab + dg]
            dr, dg = dr[new], dg[new]
            _, first = np.unique(dr * n_vocab + dg, return_index=True)  # a gene drawn twice counts once
            first.sort()  # back to (row, draw) order
            dr, dg = dr[first], dg[first]
            take(dr, dg, _rank_in_row(dr, None))

    rows, genes = np.concatenate(taken_rows), np.concatenate(taken_genes)
    chosen = np.zeros((n_cells, length), dtype=np.int64)
    order = np.argsort(rows)  # by cell; the genes of a cell are sorted at the end
    rows, genes = rows[order], genes[order]
    filled = np.bincount(rows, minlength=n_cells)
    complete = filled == length
    at = np.flatnonzero(complete[rows])
    chosen[complete] = genes[at].reshape(-1, length)
    for row in np.flatnonzero(~complete):  # vocabulary barely larger than max_len: rare
        chosen[row] = _select_densely(counts[row], keys[row], length, None if neighbor_sums is None
                                      else neighbor_sums[row])  # fmt: skip
    return np.sort(chosen, axis=1)


def _rank_in_row(rows: np.ndarray, order_keys: np.ndarray | None) -> np.ndarray:
    """Rank of each entry within its row (``rows`` ascending) by ascending ``order_keys`` (uint64; None: as given)."""
    if rows.size == 0:
        return np.zeros(0, dtype=np.int64)
    if order_keys is None:
        order = np.arange(rows.size)
    else:  # rows take the top bits, so one sort orders by row, then key
        order = np.argsort((rows.astype(np.uint64) << np.uint64(64 - ROW_BITS)) | (order_keys >> np.uint64(ROW_BITS)))
    n_per_row = np.bincount(rows)
    starts = np.cumsum(n_per_row) - n_per_row
    rank = np.empty(rows.size, dtype=np.int64)
    rank[order] = np.arange(rows.size) - starts[rows[order]]
    return rank


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
    """``matrix[rows[i], genes[i, j]]`` as a float32 [len(rows), n_tokens] array, without densifying the matrix.

    Two ways, whichever is cheaper for the batch:

    - a dense table: the genes that are both asked for and stored in
      ``matrix`` are numbered, the matrix's entries at those genes are
      scattered into a [matrix rows, genes] table, and the table is read at the
      queries (genes stored nowhere read 0). No search. Used when the stored
      entries plus the table are at most :data:`LOOKUP_TABLE_RATIO` times the
      queries and the table holds at most :data:`LOOKUP_TABLE_VALUES` values:
      narrow panels, or long ``max_len``;
    - else a binary search: every stored entry gets the key
      ``row * n_columns + column`` (sorted, as the CSR is), and each query
      looks its key up (many expressed genes, few of them asked for).
    """
    matrix = matrix.tocsr()
    rows, genes = np.asarray(rows, dtype=np.int64), np.asarray(genes, dtype=np.int64)
    if genes.size == 0 or matrix.nnz == 0:
        return np.zeros(genes.shape, dtype=np.float32)
    useful = np.zeros(matrix.shape[1], dtype=bool)
    useful[genes.ravel()] = True
    stored = np.zeros(matrix.shape[1], dtype=bool)
    stored[matrix.indices] = True
    useful &= stored
    n_useful = int(useful.sum())
    table_size = matrix.shape[0] * (n_useful + 1)
    if table_size > LOOKUP_TABLE_VALUES or matrix.nnz + table_size > LOOKUP_TABLE_RATIO * genes.size:
        return _lookup_by_search(matrix, rows, genes)
    column = np.full(matrix.shape[1], n_useful, dtype=np.int64)  # gene -> table column; the last one stays 0
    column[useful] = np.arange(n_useful)
    table = np.zeros((matrix.shape[0], n_useful + 1), dtype=np.float32)
    entry_rows = np.repeat(np.arange(matrix.shape[0]), np.diff(matrix.indptr))
    table[entry_rows, column[matrix.indices]] = matrix.data  # entries at genes nobody asked for land in the last
    table[:, n_useful] = 0
    return table[rows[:, None], column[genes]]


def _lookup_by_search(matrix: sp.csr_matrix, rows: np.ndarray, genes: np.ndarray) -> np.ndarray:
    matrix.sort_indices()
    n_columns = matrix.shape[1]
    entry_keys = np.repeat(np.arange(matrix.shape[0], dtype=np.int64), np.diff(matrix.indptr)) * n_columns
    entry_keys += matrix.indices
    query = (rows[:, None] * n_columns + genes).ravel()
    if len(entry_keys) == 0:
        return np.zeros(genes.shape, dtype=np.float32)
    at = np.minimum(np.searchsorted(entry_keys, query), len(entry_keys) - 1)
    values = np.where(entry_keys[at] == query, matrix.data[at], 0)
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
