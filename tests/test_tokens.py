"""Gene selection (upstream's "random expr") on real cells."""

import os
import shutil

import anndata
import h5py
import numpy as np
import pytest
import scipy.sparse as sp
from conftest import DATA

from pipeline.tokens import select as tokens
from pipeline.tokens.select import cell_keys, lookup, select_genes

PBMC = DATA / "tenx_human_pbmc10k_protein_v3_200x16727.h5ad"


def pbmc_counts():
    return sp.csr_matrix(anndata.read_h5ad(PBMC).X.astype(np.float32))


def test_long_cells_show_a_random_subset_of_their_expressed_genes():
    counts = pbmc_counts()
    keys = cell_keys(0, 3, np.arange(counts.shape[0]))
    genes = select_genes(counts, keys, 256)
    nnz = np.diff(counts.indptr)
    assert (nnz > 256).sum() > 150  # most PBMC cells express more genes than that
    for row in np.flatnonzero(nnz > 256)[:50]:
        chosen = genes[row]
        assert len(np.unique(chosen)) == 256
        assert (counts[row].toarray().ravel()[chosen] > 0).all()
    # every expressed gene of a cell is about equally likely: over the cells, the chance to be
    # chosen is 256 / nnz; compare observed and expected totals for the most expressed genes
    expected = observed = 0.0
    for row in np.flatnonzero(nnz > 256):
        top = counts[row].indices[np.argsort(-counts[row].data)[:20]]
        expected += 20 * 256 / nnz[row]
        observed += np.isin(top, genes[row]).sum()
    assert abs(observed - expected) < 0.1 * expected  # not biased towards highly expressed genes


def test_short_cells_show_all_genes_then_neighbour_genes_then_random_ones():
    counts = pbmc_counts()[:40]
    n_cells, n_vocab = counts.shape
    keys = cell_keys(0, 0, np.arange(n_cells))
    length = 4000  # longer than any cell's expressed genes
    rng = np.random.default_rng(0)
    neighbour_sums = counts[rng.integers(0, n_cells, n_cells)] + counts[rng.integers(0, n_cells, n_cells)]
    genes = select_genes(counts, keys, length, sp.csr_matrix(neighbour_sums))
    assert genes.shape == (n_cells, length)
    for row in range(n_cells):
        chosen = set(genes[row])
        assert len(chosen) == length
        expressed = set(counts[row].indices[counts[row].data > 0])
        assert expressed <= chosen
        by_neighbours = neighbour_sums[row].toarray().ravel()
        by_neighbours[list(expressed)] = 0
        ranked = np.argsort(-by_neighbours, kind="stable")
        n_slots = length - len(expressed)
        n_neighbour_genes = int((by_neighbours > 0).sum())
        if n_neighbour_genes <= n_slots:  # all of them fit, the rest is random
            assert set(ranked[:n_neighbour_genes]) <= chosen
        else:  # the most expressed by neighbours win
            threshold = by_neighbours[ranked[n_slots - 1]]
            assert all(g in chosen for g in ranked[:n_slots] if by_neighbours[g] > threshold)


def test_a_cells_genes_depend_only_on_its_key():
    counts = pbmc_counts()
    keys = cell_keys(7, 1, np.arange(counts.shape[0]))
    together = select_genes(counts, keys, 300)
    alone = np.concatenate([select_genes(counts[i : i + 7], keys[i : i + 7], 300) for i in range(0, 200, 7)])
    np.testing.assert_array_equal(together, alone)
    other_seed = select_genes(counts, cell_keys(8, 1, np.arange(counts.shape[0])), 300)
    assert (other_seed != together).any(axis=1).mean() > 0.9
    values = lookup(counts, np.arange(counts.shape[0]), together)
    np.testing.assert_array_equal(values, np.take_along_axis(counts.toarray(), together, axis=1))


@pytest.mark.parametrize(("table_values", "table_ratio", "searched"),
                         [(1 << 30, 1e9, False), (1 << 30, 0, True), (1000, 1e9, True)])  # fmt: skip
def test_lookup_reads_repeated_and_shuffled_rows_like_a_dense_matrix(monkeypatch, table_values, table_ratio, searched):
    """As the neighbour lookup asks: each row several times, in any order, at genes some rows do not express.

    By the dense table, and by binary search (chosen by cost, or because the table would be too large)."""
    monkeypatch.setattr(tokens, "LOOKUP_TABLE_VALUES", table_values)
    monkeypatch.setattr(tokens, "LOOKUP_TABLE_RATIO", table_ratio)
    searches = []
    search = tokens._lookup_by_search
    monkeypatch.setattr(tokens, "_lookup_by_search", lambda *args: searches.append(1) or search(*args))
    counts = pbmc_counts()
    rows = np.random.default_rng(0).permutation(np.repeat(np.arange(counts.shape[0]), 3))
    genes = np.sort(np.random.default_rng(1).choice(counts.shape[1], size=(len(rows), 500)), axis=1)
    values = lookup(counts, rows, genes)
    dense = counts.toarray()
    assert values.dtype == np.float32 and (values > 0).mean() > 0.05  # the test reads real expressed entries
    np.testing.assert_array_equal(values, dense[rows[:, None], genes])
    assert bool(searches) == searched
    assert lookup(counts, rows[:0], genes[:0]).shape == (0, 500)


def test_vocabulary_barely_larger_than_max_len():
    counts = pbmc_counts()[:20, :300]
    keys = cell_keys(0, 0, np.arange(20))
    genes = select_genes(counts, keys, 290)
    assert genes.shape == (20, 290)
    assert all(len(np.unique(row)) == 290 for row in genes)
    everything = select_genes(counts, keys, 1000)  # max_len above the vocabulary: every gene once
    assert (everything == np.arange(300)).all()


@pytest.mark.parametrize(
    "name", ["tenx_mouse_brain_e18_10000x1000.h5ad", "tenx_human_pbmc10k_protein_v3_200x16727.h5ad"]
)
def test_held_dataset_gives_the_tokens_of_reads_from_the_file(tmp_path, monkeypatch, name):
    """A worker holding a small dataset in memory feeds the model exactly what per-batch file reads give."""
    from models import build_model
    from pipeline.atlas import layout
    from pipeline.plan.datasets import plan_dataset
    from pipeline.plan.units import Unit
    from pipeline.run.datamodule import neighbor_files
    from pipeline.tokens import batches as data
    from pipeline.tokens.neighbors import neighbor_chunks, save_neighbors

    config = build_model("tiny").config
    plan = plan_dataset(
        0, str(DATA / name), config.genes, {"counts": "auto", "organism": None, "min_gene_coverage": 0, "max_len": 256}
    )
    save_neighbors(layout.neighbors_path(tmp_path, 0), neighbor_chunks(plan.matrix))
    unit = Unit(0, 0, 0, min(plan.n_cells, 2000))

    def batches():
        items = data.UnitBatches([unit], {0: plan}, vocabulary_offsets=config.organism_offsets, max_len=256,
                                 batch_size=64, min_counts=1, min_genes=1, seed=0,
                                 neighbor_files={0: neighbor_files(tmp_path, 0)})  # fmt: skip
        return items, [items[i] for i in range(len(items))]

    held, held_items = batches()
    monkeypatch.setattr(data, "HELD_VALUES", 0)
    read, read_items = batches()
    assert held._held[1] is not None and read._held[1] is None
    for a, b in zip(held_items, read_items, strict=True):
        assert a["error"] == b["error"] == ""
        for key in ("genes", "counts", "knn_counts", "knn_dists"):
            np.testing.assert_array_equal(a[key], b[key], err_msg=key)
        np.testing.assert_array_equal(a["cells"]["n_counts"], b["cells"]["n_counts"])
    n_cells = sum(len(item["genes"]) for item in held_items)
    assert n_cells + sum(len(item["dropped"]["row"]) for item in held_items) == unit.stop
    assert (np.concatenate([item["knn_counts"] for item in held_items]).sum((1, 2)) > 0).mean() > 0.9


def test_a_large_dense_dataset_is_read_from_a_sparse_copy_with_the_same_tokens(tmp_path, monkeypatch):
    """Neighbour rows from a dense file cost whole chunks each; a large one is copied once to CSR and read from it."""
    from models import build_model
    from pipeline.atlas import layout
    from pipeline.plan.datasets import plan_dataset
    from pipeline.plan.units import Unit
    from pipeline.run.datamodule import neighbor_files
    from pipeline.tokens import batches as data
    from pipeline.tokens.neighbors import neighbor_chunks, save_neighbors

    config = build_model("tiny").config
    path = tmp_path / "pbmc.h5ad"  # dense X, 200 x 16,727: 3.3M stored values; a copy, as its time is changed below
    shutil.copyfile(DATA / "tenx_human_pbmc10k_protein_v3_200x16727.h5ad", path)

    def plan_and_batches(out):
        plan = plan_dataset(
            0, str(path), config.genes, {"counts": "auto", "organism": None, "min_gene_coverage": 0, "max_len": 256}
        )
        copied = data.ensure_sparse_copy(plan, layout.sparse_copy_path(out, 0))
        save_neighbors(layout.neighbors_path(out, 0), neighbor_chunks(plan.matrix))
        items = data.UnitBatches([Unit(0, 0, 0, 200)], {0: plan}, vocabulary_offsets=config.organism_offsets,
                                 max_len=256, batch_size=64, min_counts=1, min_genes=1, seed=0,
                                 neighbor_files={0: neighbor_files(out, 0)})  # fmt: skip
        return plan, copied, [items[i] for i in range(len(items))], items

    plan, copied, dense_items, _ = plan_and_batches(tmp_path / "dense")
    assert not copied and plan.matrix.n_stored == 200 * 16_727  # small: held in memory from the file itself
    monkeypatch.setattr(data, "HELD_VALUES", 100_000)  # below the dense 3.3M values and the 300k-odd non-zeros
    plan, copied, copy_items, items = plan_and_batches(tmp_path / "copy")
    copy_file = layout.sparse_copy_path(tmp_path / "copy", 0)
    assert copied and copy_file.is_file()
    assert 100_000 < plan.matrix.n_stored < 1_000_000  # the copy's stored values are the non-zeros
    assert items._held[1] is None  # neighbour rows came from the copy, as runs
    for a, b in zip(dense_items, copy_items, strict=True):
        for key in ("genes", "counts", "knn_counts", "knn_dists"):
            np.testing.assert_array_equal(a[key], b[key], err_msg=key)
        np.testing.assert_array_equal(a["cells"]["n_counts"], b["cells"]["n_counts"])
    # a resumed run finds the copy and reads it as it is
    written = copy_file.stat().st_mtime_ns
    again = plan_and_batches(tmp_path / "copy")
    assert again[1] and copy_file.stat().st_mtime_ns == written
    # a copy that is not an HDF5 file, or was made from the file before it changed, is written again
    plan.matrix.close(), again[0].matrix.close()
    copy_file.write_bytes(b"not an hdf5 file")
    latest = plan_and_batches(tmp_path / "copy")
    assert latest[1] and copy_file.stat().st_size > 1000
    latest[0].matrix.close()
    written = copy_file.stat().st_mtime_ns
    source = path.stat()
    os.utime(path, ns=(source.st_atime_ns, source.st_mtime_ns + 1_000_000_000))
    latest = plan_and_batches(tmp_path / "copy")
    assert latest[1] and copy_file.stat().st_mtime_ns != written
    # ... or of another matrix of the same file (data.counts changed between runs)
    latest[0].matrix.close()
    with h5py.File(copy_file, "r+") as copy:
        assert copy.attrs["counts_location"] == "X"
        copy.attrs["counts_location"] = "layers/counts"
    written = copy_file.stat().st_mtime_ns
    assert plan_and_batches(tmp_path / "copy")[1] and copy_file.stat().st_mtime_ns != written
