"""Inputs besides h5ad: Kaggle pandas .h5, sparse pairs, 10x .h5 and mtx, zarr; catalogs; metadata joining.

Every format is written from the real matrices of tests/data (the BMMC CITE-seq RNA
counts, the PBMC 10k cells and their 14 antibody counts) the way its real producer
writes it, then read back, and embedded with `scatlas predict` as a user would run
it: the same cells must give the same embeddings as from the h5ad.
"""

import gzip
import os
import pickle
import shutil

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import pytest
import scipy.io
import scipy.sparse as sp
from conftest import DATA, cells_and_outputs, predict_args, run

from pipeline.atlas import validate
from pipeline.io.formats import detect_format, open_counts
from pipeline.io.genes import to_ensembl
from pipeline.io.matrix import DatasetError
from pipeline.plan.datasets import DatasetPlan, join_metadata
from pipeline.plan.inputs import resolve_inputs

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")  # anndata's zarr v2 notice

BMMC = DATA / "neurips2021_human_bmmc_cite_rna_600x1000.h5ad"
PBMC = DATA / "tenx_human_pbmc10k_protein_v3_200x16727.h5ad"


def kaggle_frame(adata, values):
    """Cells x genes as in the Kaggle Open Problems 2022 files: index cell_id, columns ENSG..._SYMBOL, float32."""
    columns = [f"{gene_id}_{symbol}" for gene_id, symbol in zip(adata.var["gene_ids"], adata.var_names)]
    return pd.DataFrame(np.asarray(values.todense(), dtype=np.float32), index=pd.Index(adata.obs_names, name="cell_id"),
                        columns=pd.Index(columns, name="gene_id"))  # fmt: skip


def write_sparse_pair(stem, frame):
    """As the popular Kaggle conversion does: save_npz(stem + '_values.sparse') (scipy adds .npz), np.savez of names."""
    sp.save_npz(f"{stem}_values.sparse", sp.csr_matrix(frame.to_numpy()))
    np.savez(f"{stem}_idxcol.npz", index=frame.index.to_numpy(), columns=frame.columns.to_numpy())


def tenx_features(adata):
    """Cell Ranger's features of the PBMC cells: Ensembl ids (symbols where GENCODE has none), then 14 antibodies."""
    ids = to_ensembl(adata.var, organism="human").ids
    antibodies = list(adata.uns["protein_names"])
    return pd.DataFrame({
        "id": np.concatenate([np.where(ids == "", adata.var_names, ids), antibodies]),
        "name": np.concatenate([adata.var_names, antibodies]),
        "feature_type": ["Gene Expression"] * adata.n_vars + ["Antibody Capture"] * len(antibodies),
    })  # fmt: skip


def write_10x_h5(path, barcodes, features, counts):
    """A Cell Ranger v3 filtered_feature_bc_matrix.h5: CSC features x barcodes (= CSR barcodes x features)."""
    counts = sp.csr_matrix(counts).astype(np.int32)
    with h5py.File(path, "w") as h5_file:
        matrix = h5_file.create_group("matrix")
        matrix["data"], matrix["indices"] = counts.data, counts.indices.astype(np.int64)
        matrix["indptr"] = counts.indptr
        matrix["shape"] = np.array([counts.shape[1], counts.shape[0]], dtype=np.int32)
        matrix["barcodes"] = np.array(barcodes, dtype="S")
        group = matrix.create_group("features")
        for column in ("id", "name", "feature_type"):
            group[column] = features[column].to_numpy(dtype="S")
        group["genome"] = np.full(len(features), b"GRCh38")


def write_10x_mtx(folder, barcodes, features, counts):
    """A Cell Ranger v3 filtered_feature_bc_matrix/ directory."""
    folder.mkdir()
    with gzip.open(folder / "matrix.mtx.gz", "wb") as fh:
        scipy.io.mmwrite(fh, sp.coo_matrix(counts.T).astype(np.int64))
    features.to_csv(folder / "features.tsv.gz", sep="\t", header=False, index=False)
    pd.Series(barcodes).to_csv(folder / "barcodes.tsv.gz", header=False, index=False)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("formats")
    bmmc, pbmc = ad.read_h5ad(BMMC), ad.read_h5ad(PBMC)
    counts = kaggle_frame(bmmc, bmmc.layers["counts"])
    counts.to_hdf(folder / "train_cite_inputs.h5", key="train_cite_inputs")  # fixed format, as Kaggle ships it
    counts.to_hdf(folder / "cite_table.h5", key="train_cite_inputs", format="table")
    kaggle_frame(bmmc, bmmc.X).to_hdf(folder / "cite_lognorm.h5", key="train_cite_inputs")  # BMMC's X is log1p
    write_sparse_pair(folder / "train_cite_inputs", counts)
    peaks = counts.iloc[:100].copy()
    peaks.columns = [f"chr{1 + i % 22}:{10_000 * i + 9776}-{10_000 * i + 10668}" for i in range(peaks.shape[1])]
    peaks.to_hdf(folder / "train_multi_inputs.h5", key="train_multi_inputs", format="table")
    antibodies = pd.DataFrame(pbmc.obsm["protein_expression"].astype(np.float32), index=pbmc.obs_names,
                              columns=[name.split("_")[0] for name in pbmc.uns["protein_names"]])  # fmt: skip
    antibodies.to_hdf(folder / "train_cite_targets.h5", key="train_cite_targets")
    features = tenx_features(pbmc)
    all_counts = sp.hstack([sp.csr_matrix(pbmc.X), sp.csr_matrix(pbmc.obsm["protein_expression"])]).tocsr()
    write_10x_h5(folder / "filtered_feature_bc_matrix.h5", pbmc.obs_names, features, all_counts)
    write_10x_mtx(folder / "filtered_feature_bc_matrix", pbmc.obs_names, features, all_counts)
    is_antibody = (features.feature_type == "Antibody Capture").to_numpy()
    write_10x_h5(folder / "antibodies_only.h5", pbmc.obs_names, features[is_antibody], all_counts[:, is_antibody])
    (folder / "zarr").mkdir()
    bmmc.write_zarr(folder / "zarr" / "bmmc.zarr")
    pbmc.write_zarr(folder / "zarr" / "pbmc.zarr")
    metadata = pd.DataFrame({"cell_id": bmmc.obs_names, "day": 2, "donor": bmmc.obs["batch"].astype(str),
                             "cell_type": bmmc.obs["cell_type"].astype(str), "technology": "citeseq"})  # fmt: skip
    metadata.iloc[:500].to_csv(folder / "metadata.csv", index=False)  # 100 BMMC cells have no row
    return folder


def counts_of(path):
    with open_counts(path) as matrix:
        return matrix.read_rows(0, matrix.n_cells), matrix.obs_names, to_ensembl(matrix.var).ids


# format file, the h5ad of the same cells, counts_location
SAME_CELLS = [
    ("train_cite_inputs.h5", BMMC, "train_cite_inputs"),
    ("cite_table.h5", BMMC, "train_cite_inputs"),
    ("train_cite_inputs_values.sparse", BMMC, "train_cite_inputs_values.sparse.npz"),
    ("train_cite_inputs_idxcol.npz", BMMC, "train_cite_inputs_values.sparse.npz"),
    ("zarr/bmmc.zarr", BMMC, "layers/counts"),
    ("filtered_feature_bc_matrix.h5", PBMC, "matrix"),
    ("filtered_feature_bc_matrix", PBMC, "matrix.mtx.gz"),
    ("zarr/pbmc.zarr", PBMC, "X"),
]


@pytest.mark.parametrize("name, h5ad, location", SAME_CELLS, ids=[s[0] for s in SAME_CELLS])
def test_each_format_reads_the_counts_of_its_h5ad(files, name, h5ad, location):
    expected, expected_names, expected_ids = counts_of(h5ad)
    with open_counts(files / name) as matrix:
        assert matrix.counts_location == location
        assert (matrix.n_cells, matrix.n_genes) == expected.shape
        np.testing.assert_array_equal(matrix.obs_names, expected_names)
        np.testing.assert_array_equal(to_ensembl(matrix.var).ids, expected_ids)
        blocks = [matrix.read_rows(start, min(start + 128, matrix.n_cells)) for start in range(0, matrix.n_cells, 128)]
        assert all(b.dtype == np.float32 for b in blocks) and abs(sp.vstack(blocks) - expected).max() == 0
        rows = np.array([matrix.n_cells - 1, 3, 3, 0, 17, 18])
        assert abs(matrix.read_rows_at(rows) - expected[rows]).max() == 0
        with pickle.loads(pickle.dumps(matrix)) as copy:  # as sent to a DataLoader worker
            assert abs(copy.read_rows(10, 20) - expected[10:20]).max() == 0


def test_kaggle_columns_and_10x_features(files):
    with open_counts(files / "train_cite_inputs.h5") as kaggle:
        assert kaggle.var.index[0] == "ENSG00000237491_LINC01409"
        assert (kaggle.var["gene_ids"].iloc[0], kaggle.var["gene_symbols"].iloc[0]) == ("ENSG00000237491", "LINC01409")
        assert to_ensembl(kaggle.var).source == "var['gene_ids']"
        assert kaggle.obs.index.name == "cell_id" and kaggle.uns_organism is None
    with open_counts(files / "filtered_feature_bc_matrix.h5") as tenx:
        assert tenx.warnings == ["kept the 16727 Gene Expression features; left out 14 Antibody Capture"]
        assert tenx.var["gene_symbols"].iloc[0] == ad.read_h5ad(PBMC).var_names[0]


def test_format_is_told_by_content_not_name(files, tmp_path):
    for source, kind in [("train_cite_inputs.h5", "pandas_h5"), ("filtered_feature_bc_matrix.h5", "10x_h5")]:
        shutil.copy(files / source, tmp_path / "counts.dat")
        assert detect_format(str(tmp_path / "counts.dat")) == kind
    shutil.copy(BMMC, tmp_path / "bmmc.h5")
    assert detect_format(str(tmp_path / "bmmc.h5")) == "h5ad"
    assert detect_format(str(files / "zarr" / "pbmc.zarr")) == "zarr"
    assert detect_format(str(files / "filtered_feature_bc_matrix")) == "10x_mtx"


def problem_of(path, **kwargs):
    with pytest.raises(DatasetError) as caught:
        open_counts(path, **kwargs)
    assert str(caught.value).startswith(f"{path}: ") and "\n" not in str(caught.value)
    return caught.value.problem


def test_non_rna_and_normalised_tables_are_refused(files):
    assert problem_of(files / "train_multi_inputs.h5") == (
        "looks like ATAC peaks, not RNA (1000 of 1000 features are genomic ranges, e.g. chr1:9776-10668): "
        "scPRINT-2 embeds gene expression"
    )
    assert problem_of(files / "train_cite_targets.h5") == (
        "looks like protein (antibody) names, not RNA: only 5 of its 14 columns are human or mouse gene symbols "
        "(not: CD3, CD15, CD16); scPRINT-2 embeds gene expression"
    )
    assert problem_of(files / "antibodies_only.h5") == (
        "has no Gene Expression features (only Antibody Capture): scPRINT-2 embeds gene expression"
    )
    problem = problem_of(files / "cite_lognorm.h5")
    assert problem.startswith("train_cite_inputs holds non-integer values (e.g. ")
    assert problem.endswith("looks log-normalised; scPRINT-2 needs raw counts")


def test_unknown_formats_are_refused_clearly(files, tmp_path):
    (tmp_path / "counts.csv").write_text("cell,A1BG\nc1,3\n")
    assert problem_of(tmp_path / "counts.csv") == (
        "is of no format scatlas reads (not HDF5; it reads h5ad, AnnData zarr, 10x .h5 or matrix.mtx directory, "
        "pandas .h5 table, _values.sparse + _idxcol.npz pair, TileDB-SOMA experiment)"
    )
    with h5py.File(tmp_path / "other.h5", "w") as h5_file:
        h5_file["values"] = np.ones((3, 3))
    assert problem_of(tmp_path / "other.h5") == (
        "is HDF5 of no layout scatlas reads (no obs/var of h5ad, no matrix group of 10x, no pandas table)"
    )
    (tmp_path / "folder").mkdir()
    assert problem_of(tmp_path / "folder").startswith("is a directory, but neither a zarr store")
    shutil.copy(files / "train_cite_inputs_idxcol.npz", tmp_path / "lonely_idxcol.npz")
    assert problem_of(tmp_path / "lonely_idxcol.npz").startswith("its partner lonely_values.sparse.npz does not exist")
    assert problem_of(files / "filtered_feature_bc_matrix.h5", counts="layers/counts") == (
        "has no count matrix at layers/counts: it is a 10x HDF5 file, whose counts are in matrix"
    )
    pd.DataFrame({"a": [1.0]}).to_hdf(tmp_path / "two.h5", key="one")
    pd.DataFrame({"a": [1.0]}).to_hdf(tmp_path / "two.h5", key="two")
    assert problem_of(tmp_path / "two.h5").startswith("holds 2 pandas tables (one, two); name one with data.counts=")


class Payload:
    def __reduce__(self):
        return (os.system, ("echo owned",))


def test_names_file_runs_no_code(files, tmp_path):
    shutil.copy(files / "train_cite_inputs_values.sparse.npz", tmp_path / "evil_values.sparse.npz")
    np.savez(tmp_path / "evil_idxcol.npz", index=np.array([Payload()] * 600, dtype=object),
             columns=np.load(files / "train_cite_inputs_idxcol.npz", allow_pickle=True)["columns"])  # fmt: skip
    with pytest.raises(DatasetError) as caught:
        open_counts(tmp_path / "evil_values.sparse.npz")
    assert str(caught.value) == (f"{tmp_path / 'evil_idxcol.npz'}: array 'index' cannot be read as names "
                                 "(posix.system is not allowed in a list of names)")  # fmt: skip


def test_directory_and_catalog_inputs(files, tmp_path):
    folder = tmp_path / "inputs"
    folder.mkdir()
    for name in ("train_cite_inputs.h5", "train_cite_inputs_values.sparse.npz", "train_cite_inputs_idxcol.npz",
                 "metadata.csv"):  # fmt: skip
        shutil.copy(files / name, folder / name)
    shutil.copytree(files / "filtered_feature_bc_matrix", folder / "filtered_feature_bc_matrix")
    shutil.copytree(files / "zarr" / "bmmc.zarr", folder / "bmmc.zarr")
    shutil.copy(BMMC, folder / "a.h5ad")
    (folder / "notes").mkdir()
    assert resolve_inputs(str(folder)) == [(str(folder / name), {}) for name in (
        "a.h5ad", "bmmc.zarr", "filtered_feature_bc_matrix", "train_cite_inputs.h5",
        "train_cite_inputs_values.sparse.npz")]  # fmt: skip
    assert resolve_inputs(str(folder / "bmmc.zarr")) == [(str(folder / "bmmc.zarr"), {})]

    (folder / "catalog.tsv").write_text(
        "path\torganism\tcounts\tmetadata\tdataset_id\tnotes\n"
        "train_cite_inputs.h5\t\ttrain_cite_inputs\tmetadata.csv\tcite_day2\tignored\n"
        f"{files / 'filtered_feature_bc_matrix'}\thuman\t\t\t\t\n"
    )
    assert resolve_inputs([str(folder / "catalog.tsv"), str(BMMC)]) == [
        (str(folder / "train_cite_inputs.h5"),
         {"counts": "train_cite_inputs", "metadata": str(folder / "metadata.csv"), "dataset_id": "cite_day2"}),
        (str(files / "filtered_feature_bc_matrix"), {"organism": "human"}),
        (str(BMMC), {}),
    ]  # fmt: skip
    (folder / "bad.csv").write_text("file\nx.h5ad\n")
    with pytest.raises(ValueError, match=r"catalog .*bad.csv has no 'path' column \(its columns: file\)"):
        resolve_inputs(str(folder / "bad.csv"))


def test_metadata_join(files, tmp_path):
    names = ad.read_h5ad(BMMC).obs_names.to_numpy()
    table = pd.read_csv(files / "metadata.csv").rename(columns={"technology": "organism"})
    table.iloc[::-1].to_parquet(tmp_path / "metadata.parquet", index=False)  # any row order
    plan = DatasetPlan(dataset=0, path="cite.h5", metadata=str(tmp_path / "metadata.parquet"))
    joined = join_metadata(plan, names)
    assert list(joined) == ["day", "donor", "cell_type", "meta_organism"]
    np.testing.assert_array_equal(joined["cell_type"][:500], ad.read_h5ad(BMMC).obs["cell_type"].astype(str)[:500])
    assert pd.isna(joined["cell_type"][500:]).all()
    assert plan.warnings == [f"metadata {plan.metadata}: 100 of 600 cells have no row (their columns are empty)"]
    pd.concat([table, table.iloc[:1]]).to_csv(tmp_path / "repeats.csv", index=False)
    with pytest.raises(DatasetError, match=f"cell id '{names[0]}' of cite.h5 is in 2 rows"):
        join_metadata(DatasetPlan(dataset=0, path="cite.h5", metadata=str(tmp_path / "repeats.csv")), names)


# ----------------------------------------------------------------------------- end to end, as a user runs it
# A cell's gene sampling is seeded by (seed, dataset identity, row), and the identity of a dataset without a
# catalog dataset_id is a fingerprint of its counts: the same cells in any format get the same genes.


def predict(out, inputs, *extra):
    proc = run(predict_args(out, inputs, extra))
    return proc, cells_and_outputs(out) if (out / "atlas.json").exists() else None


@pytest.fixture(scope="module")
def h5ad_atlas(tmp_path_factory):
    proc, atlas = predict(tmp_path_factory.mktemp("h5ad") / "atlas", [BMMC, PBMC, BMMC, PBMC])
    assert proc.returncode == 0, proc.stderr[-3000:]
    return atlas


def assert_same_embeddings(atlas, reference, datasets=(0, 1, 2, 3)):
    """The cells of ``datasets`` have the same rows, names, organism, QC numbers, embeddings and top labels."""
    _, cells, _, embs, top3 = atlas
    _, ref_cells, _, ref_embs, ref_top3 = reference
    for dataset in datasets:
        mine, ref = (cells.dataset == dataset).to_numpy(), (ref_cells.dataset == dataset).to_numpy()
        assert mine.sum() == ref.sum() > 0
        for column in ("row", "obs_name", "organism", "n_counts", "n_genes"):
            np.testing.assert_array_equal(cells[column][mine], ref_cells[column][ref])
        np.testing.assert_allclose(embs[mine], ref_embs[ref], atol=1e-5)
        np.testing.assert_array_equal(top3[mine], ref_top3[ref])


def test_directory_of_kaggle_10x_and_zarr_with_metadata_embeds_like_the_h5ad(files, tmp_path, h5ad_atlas):
    folder = tmp_path / "inputs"  # sorted: BMMC, PBMC, BMMC, PBMC, like the h5ad atlas
    folder.mkdir()
    shutil.copy(files / "train_cite_inputs.h5", folder / "1_train_cite_inputs.h5")
    shutil.copy(files / "filtered_feature_bc_matrix.h5", folder / "2_pbmc_filtered_feature_bc_matrix.h5")
    shutil.copytree(files / "zarr" / "bmmc.zarr", folder / "3_bmmc.zarr")
    shutil.copytree(files / "zarr" / "pbmc.zarr", folder / "4_pbmc.zarr")
    shutil.copy(files / "metadata.csv", folder / "metadata.csv")  # not a dataset: skipped
    proc, atlas = predict(tmp_path / "atlas", [folder], f"data.metadata={folder / 'metadata.csv'}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_same_embeddings(atlas, h5ad_atlas)
    state, cells = atlas[0], atlas[1]
    assert state.datasets.counts_location.tolist() == ["train_cite_inputs", "matrix", "layers/counts", "X"]
    expected = ad.read_h5ad(BMMC).obs["cell_type"].astype(str).to_numpy()
    for bmmc in (cells[cells.dataset == 0], cells[cells.dataset == 2]):
        np.testing.assert_array_equal(bmmc.cell_type[:500], expected[:500])
        assert bmmc.donor[:500].str.match(r"s1d[12]").all() and (bmmc.technology[:500] == "citeseq").all()
        assert (bmmc.day[:500] == 2).all() and bmmc.cell_type[500:].isna().all()
    assert cells[cells.dataset.isin([1, 3])].cell_type.isna().all()
    warnings = state.datasets.warnings
    assert "100 of 600 cells have no row" in warnings[0] and "200 of 200 cells have no row" in warnings[1]


def test_catalog_mixing_formats_in_one_run(files, tmp_path, h5ad_atlas):
    catalog = files / "catalog.csv"
    catalog.write_text(
        "path,organism,counts,metadata,dataset_id\n"
        "cite_table.h5,,train_cite_inputs,metadata.csv,cite_day2\n"
        "filtered_feature_bc_matrix,human,,,\n"
        "train_cite_inputs_values.sparse,,,,\n"
        "filtered_feature_bc_matrix.h5,,matrix,,\n"
        "train_multi_inputs.h5,,,,multiome_atac\n"
    )
    proc, atlas = predict(tmp_path / "atlas", [catalog])
    assert proc.returncode == 3, proc.stderr[-3000:]  # some datasets failed
    assert_same_embeddings(atlas, h5ad_atlas, datasets=(1, 2, 3))  # the same counts: the same gene draws
    datasets = pd.read_parquet(tmp_path / "atlas" / "datasets.parquet")
    assert datasets.dataset_id.tolist() == ["cite_day2", "", "", "", "multiome_atac"]
    assert datasets.identity[0] == "dataset_id:cite_day2"  # a catalog's id seeds the draws: other genes than the h5ad's
    assert (
        atlas[4][(atlas[1].dataset == 0).to_numpy()] != h5ad_atlas[4][(h5ad_atlas[1].dataset == 0).to_numpy()]
    ).any()
    assert datasets.status.tolist() == ["done", "done", "done", "done", "failed"]
    assert datasets.n_embedded.tolist() == [600, 200, 600, 200, 0]
    assert datasets.error[4] == (
        f"{files / 'train_multi_inputs.h5'}: looks like ATAC peaks, not RNA (1000 of 1000 features are genomic "
        "ranges, e.g. chr1:9776-10668): scPRINT-2 embeds gene expression"
    )
    cells = atlas[1]
    assert cells[cells.dataset == 0].cell_type.notna().sum() == 500
    assert cells[cells.dataset != 0].cell_type.isna().all()
    assert validate(tmp_path / "atlas") == []
