"""pipeline.tokens.neighbors on the shipped real datasets."""

from pathlib import Path

import anndata as ad
import numpy as np
import pytest
from sklearn.decomposition import PCA

import pipeline.tokens.neighbors as neighbors
from pipeline.io.formats import open_counts
from pipeline.tokens.neighbors import fit_pca, load_neighbors, neighbor_chunks, project, save_neighbors

pytestmark = pytest.mark.filterwarnings("ignore::anndata.OldFormatWarning")


def compute_neighbors(matrix, **settings):
    """The whole graph of a dataset: its chunks joined."""
    chunks = list(neighbor_chunks(matrix, **settings))
    return np.concatenate([c[1] for c in chunks]), np.concatenate([c[2] for c in chunks])


DATA = Path(__file__).parent / "data"
BMMC = DATA / "neurips2021_human_bmmc_cite_rna_600x1000.h5ad"
BRAIN = DATA / "tenx_mouse_brain_e18_10000x1000.h5ad"
K = 6


@pytest.fixture(scope="module")
def brain_neighbors():
    with open_counts(BRAIN) as matrix:
        return compute_neighbors(matrix, n_neighbors=K, block_size=4000)


def check_graph(indices, distances, n_cells):
    assert indices.shape == distances.shape == (n_cells, K)
    assert indices.dtype == np.int64 and distances.dtype == np.float32
    assert ((indices >= 0) & (indices < n_cells)).all()
    assert not (indices == np.arange(n_cells)[:, None]).any()
    assert all(len(set(row)) == K for row in indices)
    assert np.isfinite(distances).all() and (distances >= 0).all()
    assert (np.diff(distances, axis=1) >= 0).all()


def test_brain_graph(brain_neighbors):
    indices, distances = brain_neighbors
    check_graph(indices, distances, 10000)
    with open_counts(BRAIN) as matrix:
        # deterministic, and the same whatever the block size
        again = compute_neighbors(matrix, n_neighbors=K, block_size=10_000)
        empty_cells = np.flatnonzero(matrix.read_rows(0, matrix.n_cells).sum(axis=1).A1 == 0)
    np.testing.assert_array_equal(again[0], indices)
    np.testing.assert_array_equal(again[1], distances)
    # the one all-zero cell still gets neighbours
    assert empty_cells.tolist() == [1520]
    assert (indices[1520] >= 0).all() and (distances[1520] > 0).all()


def test_bmmc_neighbours_share_the_cell_type():
    with open_counts(BMMC) as matrix:
        indices, distances = compute_neighbors(matrix, n_neighbors=K, block_size=256)
        cell_types = matrix.obs["cell_type"].to_numpy()
        frequencies = matrix.obs["cell_type"].value_counts(normalize=True).to_numpy()
    check_graph(indices, distances, 600)
    same_type = np.mean(cell_types[indices] == cell_types[:, None])
    chance = np.sum(frequencies**2)
    # measured: 52% of neighbours share the annotated type (41 types), chance is 6.5%
    assert same_type > 0.45
    assert same_type > 6 * chance


def test_streamed_pca_matches_a_full_pca():
    with open_counts(BMMC) as matrix:
        coordinates = project(matrix, fit_pca(matrix, block_size=128), 0, matrix.n_cells, block_size=128)
        log_normalised = neighbors._log_normalised(matrix.read_rows(0, matrix.n_cells)).toarray()
    assert coordinates.shape == (600, 30)  # n_cells // 20 components for <= 1000 cells
    # 1000 genes < 2000: every gene is used, so this is the plain PCA of log1p(normalised counts)
    reference = PCA(n_components=30, svd_solver="full").fit_transform(log_normalised)
    np.testing.assert_allclose(np.abs(coordinates), np.abs(reference), atol=1e-4)


def test_approximate_search_beyond_the_exact_limit(brain_neighbors, monkeypatch):
    # 40 lists of about 250 cells, 6 probed per cell: each cell compared with 15% of the dataset
    monkeypatch.setattr(neighbors, "EXACT_KNN_MAX_CELLS", 1000)
    monkeypatch.setattr(neighbors, "CELLS_PER_LIST", 250)
    with open_counts(BRAIN) as matrix:
        indices, distances = compute_neighbors(matrix, n_neighbors=K, seed=0)
        again = compute_neighbors(matrix, n_neighbors=K, seed=0)
    check_graph(indices, distances, 10000)
    np.testing.assert_array_equal(again[0], indices)
    exact_indices, exact_distances = brain_neighbors
    # measured: recall 0.80 of the exact neighbours, mean distance 0.8% above the exact one
    recall = np.mean([len(set(found) & set(exact)) / K for found, exact in zip(indices, exact_indices)])
    assert recall > 0.75
    assert (distances >= exact_distances - 1e-5).all()
    assert distances.mean() < 1.01 * exact_distances.mean()


def test_huge_datasets_are_searched_in_row_chunks(brain_neighbors, monkeypatch):
    monkeypatch.setattr(neighbors, "GRAPH_CHUNK_CELLS", 4000)
    with open_counts(BRAIN) as matrix:
        chunks = list(neighbors.neighbor_chunks(matrix, n_neighbors=K))
    assert [(start, len(indices)) for start, indices, _ in chunks] == [(0, 4000), (4000, 4000), (8000, 2000)]
    indices, distances = np.concatenate([c[1] for c in chunks]), np.concatenate([c[2] for c in chunks])
    check_graph(indices, distances, 10000)
    for start, chunk_indices, _ in chunks:  # neighbours come from the cell's own chunk
        assert ((chunk_indices >= start) & (chunk_indices < start + len(chunk_indices))).all()
    _, exact_distances = brain_neighbors
    # same PCA, fewer cells to choose from: a little farther (measured: mean distance 4% above)
    assert (distances >= exact_distances - 1e-5).all()
    assert distances.mean() < 1.1 * exact_distances.mean()


@pytest.mark.parametrize("n_cells", [1, 2, 5])
def test_tiny_dataset_pads_missing_neighbours(tmp_path, n_cells):
    path = tmp_path / "tiny.h5ad"
    ad.read_h5ad(BMMC)[:n_cells].copy().write_h5ad(path)
    with open_counts(path) as matrix:
        indices, distances = compute_neighbors(matrix, n_neighbors=K)
    n_real = n_cells - 1
    assert indices.shape == distances.shape == (n_cells, K)
    assert (indices[:, n_real:] == -1).all() and (distances[:, n_real:] == 0).all()
    for cell in range(n_cells):
        assert sorted(indices[cell, :n_real]) == [other for other in range(n_cells) if other != cell]
    assert (np.diff(distances[:, :n_real], axis=1) >= 0).all()


def test_save_and_load_round_trip(tmp_path, brain_neighbors):
    indices, distances = brain_neighbors
    path = tmp_path / "neighbors.npz"
    save_neighbors(path, [(0, indices, distances)])
    save_neighbors(
        path, [(0, indices[:4000], distances[:4000]), (4000, indices[4000:], distances[4000:])]
    )  # overwrites
    loaded_indices, loaded_distances = load_neighbors(path)
    assert isinstance(loaded_indices, np.memmap) and isinstance(loaded_distances, np.memmap)  # read when indexed
    np.testing.assert_array_equal(loaded_indices, indices)
    np.testing.assert_array_equal(loaded_distances, distances)
    assert loaded_indices.dtype == np.int64 and loaded_distances.dtype == np.float32
    with np.load(path) as plain:  # an ordinary .npz too
        np.testing.assert_array_equal(plain["indices"], indices)
    assert [entry.name for entry in tmp_path.iterdir()] == ["neighbors.npz"]  # no temporary left


def test_save_refuses_mismatched_arrays_and_load_refuses_other_files(tmp_path):
    with pytest.raises(ValueError, match=r"chunk at row 0 has indices \(3, 6\) and distances \(3, 5\)"):
        save_neighbors(
            tmp_path / "bad.npz", [(0, np.zeros((3, 6), dtype=np.int64), np.zeros((3, 5), dtype=np.float32))]
        )
    assert list(tmp_path.iterdir()) == []
    np.savez(tmp_path / "other.npz", embeddings=np.zeros((3, 4)))
    with pytest.raises(ValueError, match="not a neighbour graph"):
        load_neighbors(tmp_path / "other.npz")


@pytest.mark.parametrize("path", [BRAIN, DATA / "tenx_human_pbmc10k_protein_v3_200x16727.h5ad"])
def test_gram_of_the_variable_genes_is_the_same_by_the_sparse_or_the_dense_product(monkeypatch, path):
    with open_counts(path) as matrix:
        rows = neighbors._log_normalised(matrix.read_rows(0, min(matrix.n_cells, 3000)))
    # as in the graph, a Gram of N_VARIABLE_GENES genes (here the most often expressed), not of
    # the whole transcriptome: 16,727 PBMC genes would make three 2.2 GB arrays
    n_genes = min(rows.shape[1], neighbors.N_VARIABLE_GENES)
    rows = rows[:, np.sort(np.argsort(-rows.getnnz(axis=0), kind="stable")[:n_genes])]
    exact = (rows.T @ rows).toarray()
    chosen = neighbors._gram(rows, rows_per_product=256)  # the brain panel takes the sparse product, PBMC the dense
    monkeypatch.setattr(neighbors, "GRAM_SPARSE_COST", 0.0)  # the dense product, in slices of 256 rows
    dense = neighbors._gram(rows, rows_per_product=256)
    assert exact.shape == (n_genes, n_genes) and np.abs(exact).max() > 1
    np.testing.assert_allclose(chosen, exact, rtol=1e-12, atol=1e-9)
    np.testing.assert_allclose(dense, exact, rtol=1e-12, atol=1e-9)
