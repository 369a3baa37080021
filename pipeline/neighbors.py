"""Nearest-neighbour cells of a dataset, for scPRINT-2's "metacell" expression encoder.

That encoder gives each cell the counts of its K nearest cells in the same
dataset and their distances. The graph is computed once per dataset, streaming
the count matrix in row blocks, and stored next to the run's outputs.
"""

import logging
from pathlib import Path

import numpy as np
import scipy.linalg
from sklearn.neighbors import NearestNeighbors

from pipeline.manifest import atomic_write

log = logging.getLogger(__name__)

#: Per-cell library size that counts are normalised to before log1p.
TARGET_SUM = 1e4
#: Genes with the highest variance of log-normalised counts used for the PCA.
N_VARIABLE_GENES = 2000
#: Exact kNN up to this many cells, approximate (pynndescent) beyond.
EXACT_KNN_MAX_CELLS = 50_000
#: Neighbours pynndescent searches for (scanpy's default), of which the K nearest are kept.
APPROXIMATE_KNN_CANDIDATES = 15
#: Cells whose candidate distances are recomputed at a time.
DISTANCE_CHUNK_CELLS = 50_000


def compute_neighbors(matrix, n_neighbors=6, block_size=10_000, seed=0):
    """The K nearest other cells of every cell of a dataset.

    Parameters
    ----------
    matrix : pipeline.readers.CountMatrix
        The dataset's raw counts.
    n_neighbors : int
        K, neighbours per cell.
    block_size : int
        Rows read at a time.
    seed : int
        Seed of the approximate search (datasets above ``EXACT_KNN_MAX_CELLS``).

    Returns
    -------
    indices : np.ndarray
        int64 ``[n_cells, K]``: rows of the same dataset, nearest first, never
        the cell itself. Slots beyond ``n_cells - 1`` (datasets of at most K
        cells) hold -1: callers give those neighbours zero counts.
    distances : np.ndarray
        float32 ``[n_cells, K]``: euclidean distances in PCA space, ascending;
        0 in the -1 slots.

    Notes
    -----
    Upstream (scdataloader's Preprocessor, then ``sc.pp.neighbors``) computes
    ``log1p(normalize_total(counts, 1e4))``, a PCA of 50 components (``n_cells
    // 20`` for at most 1000 cells), a 15-neighbour graph, and keeps the 6
    nearest non-zero distances. Here, to bound memory by one block plus
    ``n_cells x n_components`` whatever the dataset size:

    - three streamed passes: per-gene variance of the log-normalised counts;
      covariance of the ``N_VARIABLE_GENES`` (2000) most variable genes; their
      projection. The PCA is exact on those genes, where upstream uses every
      gene (sparse top-variance genes carry little of the leading components).
    - at least 2 components (upstream's ``n_cells // 20`` is 0 below 20 cells).
    - exact kNN up to ``EXACT_KNN_MAX_CELLS`` cells; beyond, pynndescent with
      ``random_state=seed`` on one thread (its results change with the thread
      count), where upstream uses scanpy's (umap's) nndescent.
    - distances are recomputed exactly for the kept pairs, and ties broken by
      row index, so the result is the same on every call and machine.
    - cells with identical profiles (e.g. several all-zero cells) are
      neighbours at distance 0; upstream's sparse graph cannot store a zero
      distance and skips them.
    - every cell takes part, also those that QC drops later (upstream drops
      cells with fewer than 200 genes first), so a neighbour may be a dropped
      cell; its counts are real.

    Upstream's eval-time randomness does not touch this step.
    """
    n_cells = matrix.n_cells
    n_real = min(n_neighbors, n_cells - 1)
    indices = np.full((n_cells, n_neighbors), -1, dtype=np.int64)
    distances = np.zeros((n_cells, n_neighbors), dtype=np.float32)
    if n_real <= 0:
        return indices, distances
    coordinates = pca_coordinates(matrix, block_size)
    indices[:, :n_real], distances[:, :n_real] = _nearest_other_cells(coordinates, n_real, seed)
    return indices, distances


def pca_coordinates(matrix, block_size=10_000):
    """PCA coordinates of every cell, computed from streamed row blocks.

    Parameters
    ----------
    matrix : pipeline.readers.CountMatrix
        The dataset's raw counts.
    block_size : int
        Rows read at a time.

    Returns
    -------
    np.ndarray
        float32 ``[n_cells, n_components]``: log1p(normalised counts) of the
        most variable genes, centred and projected on their principal axes,
        largest variance first. ``n_components`` is 50, ``n_cells // 20`` for
        at most 1000 cells, at least 2, at most the number of genes or cells.
    """
    n_cells = matrix.n_cells
    blocks = [(start, min(start + block_size, n_cells)) for start in range(0, n_cells, block_size)]

    gene_sum = np.zeros(matrix.n_genes)
    gene_sum_of_squares = np.zeros(matrix.n_genes)
    for start, stop in blocks:
        normalised = _log_normalised(matrix.read_rows(start, stop))
        gene_sum += normalised.sum(axis=0).A1
        gene_sum_of_squares += normalised.multiply(normalised).sum(axis=0).A1
    mean = gene_sum / n_cells
    variance = gene_sum_of_squares / n_cells - mean**2
    # most variable first; ties by gene position
    variable_genes = np.sort(np.argsort(-variance, kind="stable")[:N_VARIABLE_GENES])

    gram = np.zeros((variable_genes.size, variable_genes.size))
    for start, stop in blocks:
        normalised = _log_normalised(matrix.read_rows(start, stop))[:, variable_genes]
        gram += (normalised.T @ normalised).toarray()
    variable_mean = mean[variable_genes]
    covariance = (gram - n_cells * np.outer(variable_mean, variable_mean)) / max(n_cells - 1, 1)

    n_components = 50 if n_cells > 1000 else max(n_cells // 20, 2)
    n_components = min(n_components, variable_genes.size, n_cells)
    n_variable = variable_genes.size
    _, eigenvectors = scipy.linalg.eigh(covariance, subset_by_index=[n_variable - n_components, n_variable - 1])
    axes = eigenvectors[:, ::-1]
    # fix each axis' sign: its largest loading is positive
    axes *= np.sign(axes[np.abs(axes).argmax(axis=0), np.arange(n_components)])

    coordinates = np.empty((n_cells, n_components), dtype=np.float32)
    offset = variable_mean @ axes
    for start, stop in blocks:
        normalised = _log_normalised(matrix.read_rows(start, stop))[:, variable_genes]
        coordinates[start:stop] = normalised @ axes - offset
    log.info("%s: PCA of %d cells on %d genes, %d components", matrix.path, n_cells, variable_genes.size, n_components)
    return coordinates


def _log_normalised(counts):
    """log1p of counts scaled to TARGET_SUM per cell (all-zero cells stay zero), float64 CSR."""
    counts = counts.astype(np.float64)
    totals = counts.sum(axis=1).A1
    scale = np.divide(TARGET_SUM, totals, out=np.zeros_like(totals), where=totals > 0)
    normalised = counts.multiply(scale[:, None]).tocsr()
    normalised.data = np.log1p(normalised.data)
    return normalised


def _nearest_other_cells(coordinates, n_neighbors, seed):
    """Indices and exact distances of each cell's nearest other cells, nearest first."""
    n_cells = coordinates.shape[0]
    n_candidates = min(n_cells, n_neighbors + 1)
    if n_cells <= EXACT_KNN_MAX_CELLS:
        search = NearestNeighbors(n_neighbors=n_candidates, algorithm="brute").fit(coordinates)
        candidates = search.kneighbors(coordinates, return_distance=False)
    else:
        from pynndescent import NNDescent

        n_candidates = min(n_cells, max(n_candidates, APPROXIMATE_KNN_CANDIDATES))
        index = NNDescent(coordinates, n_neighbors=n_candidates, random_state=seed, n_jobs=1)
        candidates = index.neighbor_graph[0]
        log.info("approximate kNN (pynndescent, seed %d) of %d cells", seed, n_cells)

    indices = np.empty((n_cells, n_neighbors), dtype=np.int64)
    distances = np.empty((n_cells, n_neighbors), dtype=np.float32)
    for start in range(0, n_cells, DISTANCE_CHUNK_CELLS):
        stop = min(start + DISTANCE_CHUNK_CELLS, n_cells)
        indices[start:stop], distances[start:stop] = _sort_candidates(
            coordinates, np.arange(start, stop), candidates[start:stop], n_neighbors
        )
    return indices, distances


def _sort_candidates(coordinates, rows, candidates, n_neighbors):
    """The n_neighbors nearest candidates of each row other than itself, by exact distance then index."""
    # the cell itself and missing candidates (-1) go last
    is_self_or_missing = (candidates == rows[:, None]) | (candidates < 0)
    candidates = np.where(candidates < 0, 0, candidates)
    differences = coordinates[candidates].astype(np.float64) - coordinates[rows][:, None, :]
    candidate_distances = np.sqrt(np.square(differences).sum(axis=2))
    candidate_distances[is_self_or_missing] = np.inf
    order = np.lexsort((candidates, candidate_distances), axis=1)[:, :n_neighbors]
    return np.take_along_axis(candidates, order, axis=1), np.take_along_axis(candidate_distances, order, axis=1)


def save_neighbors(path, indices, distances):
    """Write a neighbour graph to an .npz file atomically.

    Parameters
    ----------
    path : str or os.PathLike
        Destination; written under a temporary name in the same directory,
        then renamed, so readers never see a partial file.
    indices : np.ndarray
        int64 ``[n_cells, K]``, from :func:`compute_neighbors`.
    distances : np.ndarray
        float32 ``[n_cells, K]``.
    """
    path = Path(path)
    if indices.shape != distances.shape:
        raise ValueError(f"{path}: indices {indices.shape} and distances {distances.shape} differ in shape")
    path.parent.mkdir(parents=True, exist_ok=True)

    def write(temporary):
        with open(temporary, "wb") as file:
            np.savez(file, indices=indices.astype(np.int64), distances=distances.astype(np.float32))

    atomic_write(path, write)


def load_neighbors(path):
    """Read a neighbour graph written by :func:`save_neighbors`.

    Parameters
    ----------
    path : str or os.PathLike

    Returns
    -------
    indices : np.ndarray
        int64 ``[n_cells, K]``.
    distances : np.ndarray
        float32 ``[n_cells, K]``.

    Raises
    ------
    ValueError
        The file is not a neighbour graph.
    """
    with np.load(path) as stored:
        if "indices" not in stored or "distances" not in stored:
            raise ValueError(f"{path}: not a neighbour graph (needs arrays 'indices' and 'distances')")
        indices, distances = stored["indices"], stored["distances"]
    if indices.shape != distances.shape or indices.ndim != 2:
        raise ValueError(f"{path}: indices {indices.shape} and distances {distances.shape} do not match")
    return indices, distances
