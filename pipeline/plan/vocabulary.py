"""A dataset's genes -> the model's vocabulary: which column of the vocabulary each gene is, and counts in it."""

from __future__ import annotations

import numpy as np
import pandas as pd
import scipy.sparse as sp


def vocabulary_columns(ids, vocabulary):
    """Each dataset gene's column in the model's vocabulary.

    Parameters
    ----------
    ids : np.ndarray of str
        Ensembl ID per dataset gene (``''`` for unknown), from :func:`to_ensembl`.
    vocabulary : list of str
        The model's genes, unique.

    Returns
    -------
    columns : np.ndarray
        int64 ``[len(ids)]``: ``columns[i] = j`` when ``ids[i] == vocabulary[j]``,
        -1 for genes not in the vocabulary. Several dataset genes may share a
        column; :func:`to_vocabulary` sums them.
    n_covered : int
        Number of distinct vocabulary genes the dataset has.

    Raises
    ------
    ValueError
        The vocabulary has repeated genes.
    """
    vocabulary_index = _index_of(vocabulary)
    columns = vocabulary_index.get_indexer(pd.Index(np.asarray(ids, dtype=object))).astype(np.int64)
    return columns, int(np.unique(columns[columns >= 0]).size)


#: id of a vocabulary list -> (the list, its index): a run maps every dataset to the same few vocabularies
_INDEXES: dict[int, tuple[list, pd.Index]] = {}


def _index_of(vocabulary) -> pd.Index:
    """The model's genes as a unique pandas index, built once per vocabulary list (the list is kept alive with it)."""
    known = _INDEXES.get(id(vocabulary))
    if known is not None and known[0] is vocabulary:
        return known[1]
    index = pd.Index(vocabulary)
    if not index.is_unique:
        repeated = index[index.duplicated()][0]
        raise ValueError(f"the vocabulary repeats gene {repeated!r}")
    if len(_INDEXES) >= 64:
        _INDEXES.clear()
    _INDEXES[id(vocabulary)] = (vocabulary, index)
    return index


def to_vocabulary(counts, columns, n_vocab):
    """Counts over dataset genes -> counts over the vocabulary (genes sharing a column summed).

    Parameters
    ----------
    counts : scipy.sparse.csr_matrix
        ``[n_cells, len(columns)]``.
    columns : np.ndarray
        From :func:`vocabulary_columns`.
    n_vocab : int
        Vocabulary size.

    Returns
    -------
    scipy.sparse.csr_matrix
        ``[n_cells, n_vocab]``, same dtype, canonical (sorted columns, no repeats, no stored zeros).
    """
    counts = sp.csr_matrix(counts)
    n_cells = counts.shape[0]
    target = columns[counts.indices]
    keep = (target >= 0) & (counts.data != 0)  # explicit zeros stored by some writers are not expressed genes
    rows = np.repeat(np.arange(n_cells, dtype=np.int64), np.diff(counts.indptr))[keep]
    keys = rows * n_vocab + target[keep]
    data = counts.data[keep]
    if keys.size > 1 and not (keys[1:] > keys[:-1]).all():  # dataset order is not vocabulary order
        order = np.argsort(keys)  # repeats are summed: their order does not matter
        keys, data = keys[order], data[order]
        first = np.flatnonzero(np.r_[True, keys[1:] != keys[:-1]])
        if first.size < keys.size:  # dataset genes sharing a vocabulary gene
            keys, data = keys[first], np.add.reduceat(data, first)
    indptr = np.r_[0, np.cumsum(np.bincount(keys // n_vocab, minlength=n_cells))]
    matrix = sp.csr_matrix((data, (keys % n_vocab).astype(np.int32), indptr), shape=(n_cells, n_vocab))
    matrix.has_canonical_format = True
    return matrix
