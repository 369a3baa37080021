"""Nearest-neighbour cells of a dataset, for scPRINT-2's "metacell" expression encoder.

That encoder gives each cell the counts of its K nearest cells in the same
dataset and their distances. The graph is computed once per dataset, streaming
the count matrix in row blocks, and stored next to the run's outputs.
"""

import logging
import shutil
import zipfile
from pathlib import Path

import numpy as np
import scipy.linalg
import scipy.sparse as sp
import torch
from sklearn.neighbors import NearestNeighbors

from pipeline.io.files import atomic_write, memmap_npz

log = logging.getLogger(__name__)

#: Per-cell library size that counts are normalised to before log1p.
TARGET_SUM = 1e4
#: Genes with the highest variance of log-normalised counts used for the PCA.
N_VARIABLE_GENES = 2000
#: Exact kNN up to this many cells, approximate (inverted lists) beyond.
EXACT_KNN_MAX_CELLS = 50_000
#: Up to this many cells, candidates come from one numpy distance matrix (32 MiB at most), not sklearn's search.
SMALL_KNN_MAX_CELLS = 2048
#: Approximate search: about this many cells per inverted list (k-means cluster of PCA coordinates) ...
CELLS_PER_LIST = 1_000
#: ... the cells of a list compared exactly with those of its nearest lists ...
N_PROBE = 6
#: ... k-means on this many sampled cells per list, for this many iterations.
KMEANS_SAMPLE_PER_LIST = 40
KMEANS_ITERATIONS = 10
#: ... then each cell's neighbours' neighbours are compared, this many times.
REFINE_ROUNDS = 2
#: Neighbours are searched within row chunks of at most this many cells (bounds memory on huge datasets).
GRAPH_CHUNK_CELLS = 1_000_000
#: Largest [queries, points] distance matrix of the approximate search (64 MiB of float32); also the bytes of
#: float64 coordinate differences when the kept candidates' distances are recomputed exactly.
DISTANCE_BLOCK_VALUES = 16_000_000


def neighbor_chunks(matrix, n_neighbors=6, block_size=10_000, seed=0):
    """The K nearest other cells of every cell of a dataset, in row chunks: yields ``(start, indices, distances)``.

    ``indices`` (int64 ``[n, K]``) are rows of the same dataset, nearest first,
    never the cell itself; slots beyond the chunk's size hold -1 (callers give
    those neighbours zero counts). ``distances`` (float32) are euclidean in PCA
    space, ascending, 0 in the -1 slots.

    As upstream (scDataLoader's preprocessing, then ``sc.pp.neighbors``): a PCA
    of ``log1p(normalize_total(counts, 1e4))``, 50 components (``n_cells // 20``
    up to 1000 cells). Unlike it, so that memory is bounded and the result is
    the same on every call and machine: the PCA uses the ``N_VARIABLE_GENES``
    most variable genes (streamed passes, axes from every cell); neighbours are
    searched within chunks of ``GRAPH_CHUNK_CELLS`` rows, exactly up to
    ``EXACT_KNN_MAX_CELLS`` cells and by a seeded inverted-list search above;
    distances are recomputed exactly and ties broken by row; identical cells
    are neighbours at distance 0; every cell takes part, QC comes later.
    """
    n_cells = matrix.n_cells
    pca = fit_pca(matrix, block_size) if n_cells > 1 else None
    for start in range(0, n_cells, GRAPH_CHUNK_CELLS):
        stop = min(start + GRAPH_CHUNK_CELLS, n_cells)
        n_real = min(n_neighbors, stop - start - 1)
        indices = np.full((stop - start, n_neighbors), -1, dtype=np.int64)
        distances = np.zeros((stop - start, n_neighbors), dtype=np.float32)
        if n_real > 0:
            coordinates = project(matrix, pca, start, stop, block_size)
            found, distances[:, :n_real] = _nearest_other_cells(coordinates, n_real, seed)
            indices[:, :n_real] = found + start
            del coordinates
        yield start, indices, distances


def fit_pca(matrix, block_size=10_000):
    """Principal axes of log1p(normalised counts) of the most variable genes, from two streamed passes.

    Returns
    -------
    dict
        ``genes`` (the ``N_VARIABLE_GENES`` most variable, by position),
        ``axes`` ([n_genes_used, n_components], largest variance first, each
        axis' largest loading positive) and ``offset`` (the mean projected).
        ``n_components`` is 50, ``n_cells // 20`` for at most 1000 cells, at
        least 2, at most the number of genes or cells.
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

    variable_mean = mean[variable_genes]
    n_components = 50 if n_cells > 1000 else max(n_cells // 20, 2)
    n_components = min(n_components, variable_genes.size, n_cells)
    n_variable = variable_genes.size
    if n_cells < n_variable:
        axes = _axes_from_cells(matrix, variable_genes, variable_mean, n_components)
    else:
        gram = np.zeros((n_variable, n_variable))
        for start, stop in blocks:
            gram += _gram(_log_normalised(matrix.read_rows(start, stop))[:, variable_genes])
        covariance = (gram - n_cells * np.outer(variable_mean, variable_mean)) / max(n_cells - 1, 1)
        _, eigenvectors = scipy.linalg.eigh(covariance, subset_by_index=[n_variable - n_components, n_variable - 1])
        axes = eigenvectors[:, ::-1]
    # fix each axis' sign: its largest loading is positive
    axes *= np.sign(axes[np.abs(axes).argmax(axis=0), np.arange(n_components)])
    log.info("%s: PCA of %d cells on %d genes, %d components", matrix.path, n_cells, variable_genes.size, n_components)
    return {"genes": variable_genes, "axes": axes, "offset": variable_mean @ axes}


def _axes_from_cells(matrix, genes: np.ndarray, mean: np.ndarray, n_components: int) -> np.ndarray:
    """The top principal axes of a dataset with fewer cells than genes, from its cells x cells Gram matrix.

    The same axes as the genes x genes covariance gives (the centred data's
    right singular vectors), but the eigenproblem is ``n_cells`` wide, not
    ``n_genes``: a small dataset (most of an atlas's 20,000) costs
    milliseconds instead of a 2,000 x 2,000 decomposition. The cells, fewer
    than ``N_VARIABLE_GENES``, are held at once.
    """
    centred = _log_normalised(matrix.read_rows(0, matrix.n_cells))[:, genes].toarray() - mean
    n_cells = centred.shape[0]
    values, vectors = scipy.linalg.eigh(centred @ centred.T, subset_by_index=[n_cells - n_components, n_cells - 1])
    axes = centred.T @ vectors[:, ::-1]
    return axes / np.maximum(np.linalg.norm(axes, axis=0), np.finfo(float).tiny)


def project(matrix, pca, start, stop, block_size=10_000):
    """float32 ``[stop - start, n_components]`` PCA coordinates of rows ``[start, stop)`` (``pca`` from :func:`fit_pca`)."""
    coordinates = np.empty((stop - start, pca["axes"].shape[1]), dtype=np.float32)
    for first in range(start, stop, block_size):
        last = min(first + block_size, stop)
        normalised = _log_normalised(matrix.read_rows(first, last))[:, pca["genes"]]
        coordinates[first - start : last - start] = normalised @ pca["axes"] - pca["offset"]
    return coordinates


GRAM_SPARSE_COST = 0.02  # a sparse multiply-add costs about 50x one of BLAS on dense rows (measured)


def _gram(rows: sp.csr_matrix, rows_per_product: int = 2048) -> np.ndarray:
    """``rows.T @ rows`` as a dense array, by whichever product is cheaper.

    The sparse product does one scalar multiply-add per pair of non-zeros of a
    row; BLAS on dense slices of ``rows_per_product`` rows does ``n_columns**2``
    per row, about 50x faster each. Full transcriptomes, whose most variable
    genes are mostly expressed, take the dense product (a 10,000-cell PBMC
    file: 11 s -> 0.5 s); a sparse 1,000-gene panel keeps the sparse one.
    """
    nnz_per_row = np.diff(rows.indptr).astype(np.float64)
    if (nnz_per_row**2).sum() <= GRAM_SPARSE_COST * rows.shape[0] * rows.shape[1] ** 2:
        return (rows.T @ rows).toarray()
    gram = np.zeros((rows.shape[1], rows.shape[1]))
    for first in range(0, rows.shape[0], rows_per_product):
        part = rows[first : first + rows_per_product].toarray()
        gram += part.T @ part
    return gram


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
    if n_cells > EXACT_KNN_MAX_CELLS:
        return _inverted_list_search(coordinates, n_neighbors, seed)
    n_candidates = min(n_cells, n_neighbors + 1)
    if n_cells <= SMALL_KNN_MAX_CELLS:  # one distance matrix: no thread pool to start for a few cells
        points = coordinates.astype(np.float64)
        squared = (points**2).sum(1)
        distances = squared[:, None] + squared[None, :] - 2 * points @ points.T
        candidates = np.argsort(distances, axis=1, kind="stable")[:, :n_candidates]
        return _nearest_candidates(coordinates, candidates.__getitem__, n_candidates, n_neighbors)
    search = NearestNeighbors(n_neighbors=n_candidates, algorithm="brute").fit(coordinates)
    candidates = search.kneighbors(coordinates, return_distance=False)
    return _nearest_candidates(coordinates, candidates.__getitem__, n_candidates, n_neighbors)


def _inverted_list_search(coordinates, n_neighbors, seed):
    """Approximate kNN in bounded memory: k-means lists; each list's cells searched exactly in its nearest lists.

    The cells of a list are compared with those of the ``N_PROBE`` lists whose
    centroids are nearest its own (itself included), then with their
    neighbours' neighbours. The working memory is a few lists, not the dataset.
    """
    n_cells = coordinates.shape[0]
    n_lists = max(1, n_cells // CELLS_PER_LIST)
    centroids = torch.from_numpy(_kmeans(coordinates, n_lists, seed))
    n_probe = min(N_PROBE, n_lists)
    probes = np.empty((n_cells, n_probe), dtype=np.int64)  # each cell's nearest lists, its own first
    step = max(1, DISTANCE_BLOCK_VALUES // n_lists)
    for start in range(0, n_cells, step):
        probes[start : start + step] = _nearest(torch.from_numpy(coordinates[start : start + step]), centroids,
                                                n_probe).indices  # fmt: skip
    # list by list: every cell probing it against its members (one matrix product), merged into its nearest so far
    n_candidates = n_neighbors + 1  # the cell itself is among them
    best = torch.full((n_cells, n_candidates), -1, dtype=torch.int64)
    best_score = torch.full((n_cells, n_candidates), float("inf"))  # squared distance less the query's own norm
    pairs = np.argsort(probes.ravel(), kind="stable")  # (cell, slot) pairs grouped by probed list
    pair_starts = np.searchsorted(probes.ravel()[pairs], np.arange(n_lists + 1))
    members_of = np.argsort(probes[:, 0], kind="stable")
    member_starts = np.searchsorted(probes[members_of, 0], np.arange(n_lists + 1))
    for list_id in range(n_lists):
        members = torch.from_numpy(members_of[member_starts[list_id] : member_starts[list_id + 1]])
        if members.numel() == 0:
            continue
        points = torch.from_numpy(coordinates[members.numpy()])
        probing = pairs[pair_starts[list_id] : pair_starts[list_id + 1]] // n_probe
        step = max(1, DISTANCE_BLOCK_VALUES // members.numel())
        for start in range(0, probing.size, step):
            cells = probing[start : start + step]
            score, nearest = _nearest(torch.from_numpy(coordinates[cells]), points, min(n_candidates, len(members)))
            score, at = torch.cat([best_score[cells], score], 1), torch.cat([best[cells], members[nearest]], 1)
            score, keep = torch.topk(score, n_candidates, dim=1, largest=False)
            best_score[cells], best[cells] = score, at.gather(1, keep)
    best = best.numpy()
    del best_score
    indices, distances = _nearest_candidates(coordinates, best.__getitem__, n_candidates, n_neighbors)
    del best

    def neighbours_of_neighbours(rows):
        found = indices[rows]
        return _first_of_repeats(np.concatenate([found, indices[found].reshape(rows.size, -1)], axis=1))

    for _ in range(REFINE_ROUNDS):  # a neighbour's neighbour may be nearer: what a list boundary hid
        _nearest_candidates(coordinates, neighbours_of_neighbours, n_neighbors * (n_neighbors + 1), n_neighbors,
                            out=(indices, distances))  # fmt: skip
    log.info("approximate kNN (%d k-means lists, %d probed, seed %d) of %d cells", n_lists, n_probe, seed,
             n_cells)  # fmt: skip
    return indices, distances


def _first_of_repeats(candidates):
    """Each row's candidates with repeats replaced by -1 (sorted per row)."""
    candidates = np.sort(candidates, axis=1)
    repeated = np.zeros(candidates.shape, dtype=bool)
    repeated[:, 1:] = candidates[:, 1:] == candidates[:, :-1]
    return np.where(repeated, -1, candidates)


def _nearest(queries, points, k):
    """Each query's k nearest points: ([n_queries, k] squared distance less the query's norm, [n_queries, k] index)."""
    score = (points * points).sum(1)[None, :] - 2 * queries @ points.T
    return torch.topk(score, k, dim=1, largest=False, sorted=True)


def _kmeans(coordinates, n_lists, seed):
    """Centroids of ``n_lists`` k-means clusters (Lloyd) of a seeded sample of the cells."""
    rng = np.random.default_rng(seed)
    n_sample = min(coordinates.shape[0], n_lists * KMEANS_SAMPLE_PER_LIST)
    sample = torch.from_numpy(coordinates[np.sort(rng.choice(coordinates.shape[0], n_sample, replace=False))])
    centroids = sample[torch.from_numpy(rng.choice(n_sample, n_lists, replace=False))].clone()
    for _ in range(KMEANS_ITERATIONS):
        nearest = _nearest(sample, centroids, 1).indices[:, 0]
        sums = torch.zeros_like(centroids).index_add_(0, nearest, sample)
        sizes = torch.bincount(nearest, minlength=n_lists)
        filled = sizes > 0  # an emptied list keeps its centroid
        centroids[filled] = sums[filled] / sizes[filled, None].to(sums.dtype)
    return centroids.numpy()


def _nearest_candidates(coordinates, candidates_of, n_candidates, n_neighbors, out=None):
    """Each cell's ``n_neighbors`` nearest among ``candidates_of(rows)`` ([rows, n_candidates], -1 for none).

    Rows go in chunks that bound the distance computation's memory, in order,
    each written to ``out`` (``(indices, distances)``, new arrays if None)
    before the next chunk's candidates are asked for.
    """
    n_cells = coordinates.shape[0]
    if out is None:
        out = (np.empty((n_cells, n_neighbors), dtype=np.int64), np.empty((n_cells, n_neighbors), dtype=np.float32))
    indices, distances = out
    step = max(1, DISTANCE_BLOCK_VALUES // (8 * n_candidates * coordinates.shape[1]))
    for start in range(0, n_cells, step):
        rows = np.arange(start, min(start + step, n_cells))
        indices[rows], distances[rows] = _sort_candidates(coordinates, rows, candidates_of(rows), n_neighbors)
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


def save_neighbors(path, chunks):
    """Write a neighbour graph to an uncompressed .npz (arrays ``indices``, ``distances``) atomically, chunk by chunk.

    Parameters
    ----------
    path : str or os.PathLike
        Destination; written under a temporary name in the same directory,
        then renamed, so readers never see a partial file.
    chunks : iterable of (start, indices, distances)
        Consecutive row chunks (:func:`neighbor_chunks`, or one
        ``(0, indices, distances)`` for arrays in memory): int64 and float32
        ``[rows, K]``. Each is written as it comes, so the whole graph is never
        in memory.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)

    def write(temporary):
        parts = {name: Path(f"{temporary}.{name}") for name in ("indices", "distances")}
        try:
            with open(parts["indices"], "wb") as indices_file, open(parts["distances"], "wb") as distances_file:
                n_rows, width = 0, None
                for start, indices, distances in chunks:
                    if indices.shape != distances.shape or start != n_rows or width not in (None, indices.shape[1]):
                        raise ValueError(f"{path}: chunk at row {start} has indices {indices.shape} and distances "
                                         f"{distances.shape} (expected rows from {n_rows}, width {width})")  # fmt: skip
                    n_rows, width = n_rows + len(indices), indices.shape[1]
                    indices_file.write(np.ascontiguousarray(indices, dtype=np.int64).tobytes())
                    distances_file.write(np.ascontiguousarray(distances, dtype=np.float32).tobytes())
            with zipfile.ZipFile(temporary, "w", zipfile.ZIP_STORED, allowZip64=True) as archive:
                for name, dtype in (("indices", np.int64), ("distances", np.float32)):
                    with archive.open(f"{name}.npy", "w", force_zip64=True) as member, open(parts[name], "rb") as raw:
                        header = {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)), "fortran_order": False,
                                  "shape": (n_rows, width or 0)}  # fmt: skip
                        np.lib.format.write_array_header_2_0(member, header)
                        shutil.copyfileobj(raw, member, 1 << 22)
        finally:
            for part in parts.values():
                part.unlink(missing_ok=True)

    atomic_write(path, write)


def load_neighbors(path):
    """Memory-map a neighbour graph written by :func:`save_neighbors` (rows are read when indexed).

    Parameters
    ----------
    path : str or os.PathLike

    Returns
    -------
    indices : np.ndarray
        int64 ``[n_cells, K]``, read-only.
    distances : np.ndarray
        float32 ``[n_cells, K]``, read-only.

    Raises
    ------
    ValueError
        The file is not a neighbour graph.
    """
    try:
        with zipfile.ZipFile(path) as archive:
            names = set(archive.namelist())
    except (OSError, zipfile.BadZipFile) as err:
        raise ValueError(f"{path}: not a neighbour graph ({err})") from err
    if not {"indices.npy", "distances.npy"} <= names:
        raise ValueError(f"{path}: not a neighbour graph (needs arrays 'indices' and 'distances')")
    indices, distances = memmap_npz(path, "indices"), memmap_npz(path, "distances")
    if indices.shape != distances.shape or indices.ndim != 2:
        raise ValueError(f"{path}: indices {indices.shape} and distances {distances.shape} do not match")
    return indices, distances
