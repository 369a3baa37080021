"""pipeline.io readers on the shipped real datasets and on broken copies of them."""

import os
import pickle
import shutil

import anndata as ad
import h5py
import numpy as np
import pytest
import scipy.sparse as sp
from conftest import BMMC, BRAIN, CD4T, HEART, PBMC, SPLEEN

import pipeline.io.matrix as readers
from pipeline.io.formats import open_counts
from pipeline.io.matrix import CountMatrix, DatasetError

pytestmark = pytest.mark.filterwarnings("ignore::anndata.OldFormatWarning")


# file, cells, genes, where the raw counts are, storage of that matrix in the file
EXPECTED = [
    (HEART, 320, 136, "raw/X", "csr"),
    (CD4T, 500, 2000, "X", "csr"),
    (BMMC, 600, 1000, "layers/counts", "csc"),
    (SPLEEN, 340, 992, "X", "csc"),
    (PBMC, 200, 16727, "X", "dense"),
    (BRAIN, 10000, 1000, "X", "csr"),
]


def anndata_counts(path, location):
    adata = ad.read_h5ad(path)
    matrix = {"X": adata.X, "raw/X": adata.raw.X if adata.raw is not None else None}.get(location)
    if location.startswith("layers/"):
        matrix = adata.layers[location[len("layers/") :]]
    return sp.csr_matrix(matrix, dtype=np.float32)


@pytest.mark.parametrize("path, n_cells, n_genes, location, storage", EXPECTED, ids=lambda v: getattr(v, "stem", None))
def test_real_dataset_rows_match_anndata(path, n_cells, n_genes, location, storage):
    with open_counts(path) as matrix:
        assert (matrix.n_cells, matrix.n_genes) == (n_cells, n_genes)
        assert matrix.counts_location == location
        assert len(matrix.obs) == len(matrix.obs_names) == n_cells
        assert len(matrix.var) == n_genes
        assert matrix.warnings == []
        expected = anndata_counts(path, location)
        blocks = [matrix.read_rows(start, min(start + 128, n_cells)) for start in range(0, n_cells, 128)]
        for block in blocks:
            assert isinstance(block, sp.csr_matrix) and block.dtype == np.float32
        assert abs(sp.vstack(blocks) - expected).max() == 0
        rows = np.array([n_cells - 1, 3, 3, 0, 17])
        assert abs(matrix.read_rows_at(rows) - expected[rows]).max() == 0
        assert matrix.read_rows_at(np.array([], dtype=int)).shape == (0, n_genes)
        assert matrix.read_rows(5, 5).shape == (0, n_genes)
    with h5py.File(path, "r") as h5_file:
        element = h5_file[location]
        stored_as = "dense" if isinstance(element, h5py.Dataset) else element.attrs["encoding-type"][: -len("_matrix")]
    assert stored_as == storage


def test_scattered_rows_are_read_in_runs(monkeypatch):
    """Rows far apart in the file: each run of nearby rows is one read, and the rows come back exact."""
    from pipeline.io import matrix as readers

    expected = anndata_counts(BRAIN, "X")
    rng = np.random.default_rng(0)
    rows = np.concatenate([rng.choice(10_000, 300, replace=False), [0, 1, 2, 9_999, 5_000, 5_000]])
    calls = []
    with open_counts(BRAIN) as matrix:
        assert matrix.n_stored == expected.nnz
        source = matrix._rows_source
        original = type(source.data).__getitem__
        monkeypatch.setattr(
            type(source.data), "__getitem__", lambda self, key: calls.append(key) or original(self, key)
        )
        got = matrix.read_rows_at(rows)
        n_runs = len(calls) // 2  # data and indices per run
        monkeypatch.setattr(readers, "RUN_GAP_VALUES", 0)  # every row its own run, unless adjacent in the file
        again = matrix.read_rows_at(rows)
    assert abs(got - expected[rows]).max() == 0 and abs(again - expected[rows]).max() == 0
    assert 1 < n_runs < 300  # rows closer than RUN_GAP_VALUES share a read; far ones do not
    assert len(calls) // 2 > n_runs


def test_dense_and_in_memory_matrices_count_stored_values():
    with open_counts(PBMC) as matrix:
        assert matrix.n_stored == 200 * 16727
    with open_counts(BMMC) as matrix:  # CSC, converted to CSR in memory
        assert matrix.n_stored == anndata_counts(BMMC, "layers/counts").nnz


def test_metadata_is_read():
    with open_counts(BMMC) as bmmc:
        assert bmmc.uns_organism == "human"
        assert bmmc.obs["cell_type"].dtype == "category"
        assert bmmc.obs["cell_type"].nunique() == 41
        assert bmmc.var["gene_ids"].iloc[0] == "ENSG00000237491"
    with open_counts(CD4T) as cd4t:
        assert cd4t.uns_organism == "NCBITaxon:9606"
        assert cd4t.obs_names[0] == ad.read_h5ad(CD4T).obs_names[0]
    with open_counts(HEART) as heart:
        assert heart.uns_organism is None
        assert heart.var.index[0] == "ERCC-00002"  # raw/var, matching raw/X
    with open_counts(BRAIN) as brain:
        assert brain.read_rows(0, brain.n_cells).sum(axis=1).A1.tolist().count(0) == 1


def test_explicit_counts_location():
    with open_counts(HEART, counts="X") as heart:
        assert heart.counts_location == "X"
    with pytest.raises(DatasetError, match=r"X holds non-integer values \(e\.g\. [0-9.]+\), looks log-normalised"):
        open_counts(BMMC, counts="X")
    with pytest.raises(DatasetError, match=r"has no count matrix at layers/spliced"):
        open_counts(BMMC, counts="layers/spliced")
    with pytest.raises(ValueError, match="counts must be"):
        open_counts(BMMC, counts="counts")


def test_pickled_matrix_reopens_the_file():
    with open_counts(BMMC) as matrix:
        copy = pickle.loads(pickle.dumps(matrix))
        with copy:
            assert copy.counts_location == "layers/counts"
            assert abs(copy.read_rows(10, 20) - matrix.read_rows(10, 20)).max() == 0
    error = pickle.loads(pickle.dumps(DatasetError("a.h5ad", "broken")))
    assert (error.path, error.problem, str(error)) == ("a.h5ad", "broken", "a.h5ad: broken")


def test_closed_matrix_cannot_be_read():
    matrix = open_counts(SPLEEN)
    matrix.close()
    with pytest.raises(ValueError, match="closed"):
        matrix.read_rows(0, 1)


def test_duplicated_obs_names_are_kept_with_a_warning(tmp_path):
    adata = ad.read_h5ad(SPLEEN)
    adata.obs_names = np.where(np.arange(adata.n_obs) % 2 == 0, adata.obs_names, adata.obs_names[0])
    adata.write_h5ad(tmp_path / "dup.h5ad")
    with open_counts(tmp_path / "dup.h5ad") as matrix:
        assert matrix.n_cells == 340
        assert matrix.warnings == ["170 duplicated obs names; cells are identified by their row"]


def error_of(path, **kwargs):
    with pytest.raises(DatasetError) as caught:
        open_counts(path, **kwargs)
    err = caught.value
    assert err.path == str(path)
    assert str(err) == f"{path}: {err.problem}"
    assert "\n" not in str(err)
    return err.problem


def test_missing_file(tmp_path):
    assert error_of(tmp_path / "nope.h5ad") == "file does not exist"


def test_text_file_is_not_h5ad(tmp_path):
    path = tmp_path / "notes.h5ad"
    path.write_text("cell,gene,count\nA,B,1\n")
    assert error_of(path) == "is not an h5ad file (not HDF5)"


def test_truncated_file(tmp_path):
    path = tmp_path / "truncated.h5ad"
    path.write_bytes(CD4T.read_bytes()[: CD4T.stat().st_size // 2])
    problem = error_of(path)
    assert problem.startswith("is a truncated or corrupt HDF5 file (")
    assert "truncated" in problem[len("is a truncated") :]


def test_unreadable_file(tmp_path):
    path = tmp_path / "locked.h5ad"
    shutil.copy(SPLEEN, path)
    path.chmod(0)
    try:
        if os.access(path, os.R_OK):
            pytest.skip("running as a user who can read mode-000 files (root)")
        assert error_of(path) == "is not readable (permission denied)"
    finally:
        path.chmod(0o644)


def test_log_normalised_without_counts(tmp_path):
    adata = ad.read_h5ad(BMMC)
    del adata.layers["counts"]
    adata.write_h5ad(tmp_path / "lognorm.h5ad")
    problem = error_of(tmp_path / "lognorm.h5ad")
    assert problem.startswith("X holds non-integer values (e.g. ")
    assert problem.endswith(
        "looks log-normalised; no layers['counts'] or raw.X; pass data.counts=... if raw counts are elsewhere"
    )


def test_other_layers_are_named_when_no_counts(tmp_path):
    adata = ad.read_h5ad(BMMC)
    adata.layers["spliced"] = adata.layers.pop("counts")
    adata.write_h5ad(tmp_path / "spliced.h5ad")
    assert "other layers: spliced" in error_of(tmp_path / "spliced.h5ad")
    with open_counts(tmp_path / "spliced.h5ad", counts="layers/spliced") as matrix:
        assert matrix.counts_location == "layers/spliced"


def write_with_value(path, source, row, value):
    adata = ad.read_h5ad(source)
    dense = adata.X.toarray() if sp.issparse(adata.X) else adata.X.copy()
    dense[row, 0] = value
    adata.X = sp.csr_matrix(dense)
    adata.write_h5ad(path)


@pytest.mark.parametrize("value, phrase", [(-1.0, "negative values (e.g. -1)"), (np.nan, "NaN/inf values (e.g. nan)")])
def test_bad_values_in_sampled_rows(tmp_path, value, phrase):
    write_with_value(tmp_path / "bad.h5ad", SPLEEN, 7, value)
    assert error_of(tmp_path / "bad.h5ad") == (
        f"X holds {phrase}; no layers['counts'] or raw.X; pass data.counts=... if raw counts are elsewhere"
    )


def test_bad_value_beyond_sampled_rows_fails_when_read(tmp_path):
    write_with_value(tmp_path / "late.h5ad", BRAIN, 5000, -3.0)
    with open_counts(tmp_path / "late.h5ad") as matrix:
        matrix.read_rows(0, 4000)
        with pytest.raises(DatasetError, match=r"X row 5000 \(in rows read \[4000, 6000\)\) holds negative values"):
            matrix.read_rows(4000, 6000)
        with pytest.raises(DatasetError, match=r"X row 5000 \(in rows read \[12, 5001\)\) holds negative"):
            matrix.read_rows_at(np.array([5000, 12]))


def test_zero_cells(tmp_path):
    ad.read_h5ad(SPLEEN)[:0].copy().write_h5ad(tmp_path / "empty.h5ad")
    assert error_of(tmp_path / "empty.h5ad") == "has no cells (X has 0 rows)"


def test_zero_genes(tmp_path):
    ad.read_h5ad(PBMC)[:, :0].copy().write_h5ad(tmp_path / "nogenes.h5ad")
    assert error_of(tmp_path / "nogenes.h5ad") == "has no genes (X has 0 columns)"


def test_hdf5_that_is_not_h5ad(tmp_path):
    with h5py.File(tmp_path / "other.h5ad", "w") as h5_file:
        h5_file["matrix"] = np.ones((3, 3))
    assert error_of(tmp_path / "other.h5ad") == "is not an h5ad file (no obs/var tables)"


def test_count_matrix_is_a_plain_object():
    with open_counts(PBMC) as matrix:
        assert isinstance(matrix, CountMatrix)
        assert matrix.path == str(PBMC)


def test_dense_rows_are_read_a_few_at_a_time(monkeypatch):
    monkeypatch.setattr(readers, "DENSE_READ_VALUES", 3 * 16727)  # three rows per read
    expected = anndata_counts(PBMC, "X")
    with open_counts(PBMC) as matrix:
        assert abs(matrix.read_rows(0, 200) - expected).max() == 0
        rows = np.array([199, 3, 4, 5, 3, 100, 0])
        assert abs(matrix.read_rows_at(rows) - expected[rows]).max() == 0
