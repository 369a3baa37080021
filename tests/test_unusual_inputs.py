"""Real files in unusual shapes, as users have them: an old AnnData layout, a file written by a newer anndata,
a mouse file labelled human, paths with spaces and commas, 16-bit autocast on a CPU."""

import json
import shutil
import sys

import anndata
import h5py
import numpy as np
import pandas as pd
import pytest
from conftest import FAST, HEART, SPLEEN, cells_and_outputs, predict_args, run

from configs import compose_predict
from models.presets import preset_config
from pipeline.atlas import validate
from pipeline.cli import quote_paths
from pipeline.io.formats import open_counts
from pipeline.plan.datasets import plan_dataset

VLEN_STR = h5py.special_dtype(vlen=str)
MOUSE, HUMAN = "NCBITaxon:10090", "NCBITaxon:9606"


def write_records(f, key, table, uns):
    """A table as anndata < 0.7 stored it: one record array, the index first, categorical codes with their
    categories in ``uns/<column>_categories`` (one set per name: old anndata kept one when obs and var shared it)."""
    fields, values = [("index", VLEN_STR)], [table.index.astype(str).to_numpy(dtype=object)]
    for name, column in table.items():
        if isinstance(column.dtype, pd.CategoricalDtype) and f"{name}_categories" not in uns:
            uns.create_dataset(f"{name}_categories", data=column.cat.categories.astype(str).to_numpy(object),
                               dtype=VLEN_STR)  # fmt: skip
            column = column.cat.codes
        elif isinstance(column.dtype, pd.CategoricalDtype) or column.dtype == object:
            column = column.astype(str).astype(object)
        fields.append((str(name), VLEN_STR if column.dtype == object else column.dtype))
        values.append(column.to_numpy())
    records = np.empty(len(table), dtype=fields)
    for (name, _), column in zip(fields, values):
        records[name] = column
    f.create_dataset(key, data=records)


def write_csr(f, key, matrix):
    """A CSR matrix as anndata < 0.7 stored it (h5sparse attributes)."""
    group = f.create_group(key)
    group.attrs["h5sparse_format"], group.attrs["h5sparse_shape"] = "csr", np.array(matrix.shape)
    for name in ("data", "indices", "indptr"):
        group.create_dataset(name, data=getattr(matrix, name))


def write_old_h5ad(path, source):
    """``source`` in the on-disk layout of anndata < 0.7: record-array obs/var, raw as ``raw.X``/``raw.var``."""
    adata = anndata.read_h5ad(source)
    with h5py.File(path, "w") as f:
        uns = f.create_group("uns")
        write_csr(f, "X", adata.X)
        write_records(f, "obs", adata.obs, uns)
        write_records(f, "var", adata.var, uns)
        write_csr(f, "raw.X", adata.raw.X)
        write_records(f, "raw.var", adata.raw.var, uns)
    return path


def write_h5ad_0_7(path, source):
    """``source`` with obs in the layout of anndata 0.7: columns as datasets, a categorical's codes referring to
    its categories in ``obs/__categories`` (an HDF5 object reference in the ``categories`` attribute)."""
    shutil.copy(source, path)
    obs = anndata.read_h5ad(source).obs
    with h5py.File(path, "r+") as f:
        del f["obs"]
        group = f.create_group("obs")
        group.attrs.update({"encoding-type": "dataframe", "encoding-version": "0.1.0", "_index": "_index",
                            "column-order": list(obs.columns)})  # fmt: skip
        group.create_dataset("_index", data=obs.index.to_numpy(object), dtype=VLEN_STR)
        categories = group.create_group("__categories")
        for name, column in obs.items():
            if isinstance(column.dtype, pd.CategoricalDtype):
                categories.create_dataset(name, data=column.cat.categories.astype(str).to_numpy(object),
                                          dtype=VLEN_STR)  # fmt: skip
                group.create_dataset(name, data=column.cat.codes.to_numpy()).attrs["categories"] = categories[name].ref
            else:
                group.create_dataset(name, data=column.to_numpy())
    return path


def write_relabelled(path, source, organism, symbols_only):
    """``source`` with every cell's obs organism set to ``organism`` (and its Ensembl id column dropped)."""
    adata = anndata.read_h5ad(source)
    adata.obs["organism_ontology_term_id"] = organism
    if symbols_only:
        adata.var = adata.var.drop(columns="gene_ids")
    adata.write_h5ad(path)
    return path


@pytest.mark.parametrize("write", [write_old_h5ad, write_h5ad_0_7])
def test_old_anndata_layouts_read_as_anndata_reads_them(tmp_path, write):
    old = write(tmp_path / "old.h5ad", HEART)
    expected = anndata.read_h5ad(old)  # anndata still reads these layouts, categories included
    with open_counts(old) as matrix, open_counts(HEART) as modern:
        assert matrix.counts_location == "raw/X"  # raw.X in the layout of anndata < 0.7; X is normalised
        assert (matrix.read_rows(0, matrix.n_cells) != modern.read_rows(0, modern.n_cells)).nnz == 0
        pd.testing.assert_frame_equal(matrix.obs, expected.obs, check_index_type=False)
        assert matrix.obs.organism_ontology_term_id.value_counts().to_dict() == {HUMAN: 318, "NCBITaxon:9541": 1,
                                                                                 MOUSE: 1}  # fmt: skip
        assert list(matrix.var.index) == list(modern.var.index)


@pytest.fixture(scope="module")
def unusual(tmp_path_factory):
    """One run over a folder named like a shared drive's, listed by a catalog: a modern and an old-layout heart, a
    file from a newer anndata, a mouse file labelled human, and the same file with its organism in the catalog."""
    folder = tmp_path_factory.mktemp("drive") / "my run, v2"
    folder.mkdir()
    heart = folder / "heart.h5ad"
    heart.write_bytes(HEART.read_bytes())
    old = write_old_h5ad(folder / "old heart.h5ad", HEART)
    newer = folder / "newer anndata.h5ad"
    newer.write_bytes(SPLEEN.read_bytes())
    with h5py.File(newer, "r+") as f:
        f["obs"].attrs["encoding-version"] = "9.9.9"
    mislabelled = write_relabelled(folder / "spleen, as human.h5ad", SPLEEN, HUMAN, symbols_only=True)
    inputs = [heart, old, newer, mislabelled, mislabelled]
    catalog = folder / "catalog.csv"
    pd.DataFrame({"path": [p.name for p in inputs], "organism": ["", "", "", "", "mouse"]}).to_csv(catalog, index=False)
    out = folder / "atlas"
    # an existing path needs no Hydra quotes; out_dir, which does not exist yet, is in Hydra's double quotes
    proc = run([sys.executable, "-m", "pipeline", "predict", f"input={catalog}", f'out_dir="{out}"', *FAST])
    return proc, out, inputs


def test_paths_with_spaces_and_commas(unusual):
    proc, out, inputs = unusual
    assert proc.returncode == 3, proc.stderr[-3000:]  # two datasets fail, below
    datasets = pd.read_parquet(out / "datasets.parquet")
    assert list(datasets.path) == list(map(str, inputs))
    assert list(datasets.status) == ["done", "done", "failed", "failed", "done"]
    assert validate(out) == []


def test_an_existing_path_is_one_value_whatever_its_characters(tmp_path, monkeypatch):
    folder = tmp_path / "my run, v2"
    folder.mkdir()
    path = folder / 'x [1] "q", y=z.h5ad'
    path.write_bytes(HEART.read_bytes())
    for value in (path, folder):
        assert compose_predict(quote_paths([f"input={value}"])).input == str(value)
    (tmp_path / "64").mkdir()
    others = ["input=[a.h5ad,b.h5ad]", "model=tiny", f"out_dir={tmp_path}"]  # values Hydra reads as meant
    assert quote_paths(others) == others
    monkeypatch.chdir(tmp_path)
    assert quote_paths(["data.batch_size=64"]) == ["data.batch_size=64"]  # a number, even where a file has its name


def test_old_layout_is_embedded_like_the_modern_file_beside_a_failed_one(unusual):
    _, out, _ = unusual
    _, cells, dropped, embs, _ = cells_and_outputs(out)
    modern, old = (cells[cells.dataset == d].drop(columns="dataset").reset_index(drop=True) for d in (0, 1))
    assert len(old) == 318 and np.isfinite(embs).all()
    pd.testing.assert_frame_equal(old, modern)  # rows, names, organisms, counts
    reasons = [dropped[dropped.dataset == d][["row", "reason"]].reset_index(drop=True) for d in (0, 1)]
    pd.testing.assert_frame_equal(reasons[1], reasons[0])
    assert set(reasons[1].reason) == {"organism_unsupported", "organism_mismatch"}  # macaque and mouse cells


def test_an_unexpected_reader_error_fails_only_its_dataset_with_its_type(unusual):
    _, out, inputs = unusual
    error = pd.read_parquet(out / "datasets.parquet").error[2]
    assert error.startswith(f"{inputs[2]}: IORegistryError: No read method registered for IOSpec(")
    assert "9.9.9" in error and "update your installation of anndata" in error and "\n" not in error


def test_mouse_genes_labelled_human_fail_with_the_remedy_and_a_catalog_organism_embeds_them(unusual):
    proc, out, inputs = unusual
    datasets = pd.read_parquet(out / "datasets.parquet")
    expected = ("obs organism_ontology_term_id says human (NCBITaxon:9606) but its genes are mouse: 941 of 992 "
                "gene symbols match mouse, 1 human")  # fmt: skip
    assert (
        datasets.error[3] == f"{inputs[3]}: {expected}; correct the file's organism, or set data.organism=mouse "
        "(a catalog's organism column for one dataset) to embed it as that organism"
    )
    assert expected + "; its cells are taken as mouse (data.organism)" in datasets.warnings[4]
    assert expected in proc.stderr + proc.stdout  # logged as well
    _, cells, dropped, _, _ = cells_and_outputs(out)
    embedded = cells[cells.dataset == 4]
    assert datasets.organism[4] == MOUSE and set(embedded.organism) == {MOUSE}
    assert len(embedded) + (dropped.dataset == 4).sum() == 340


@pytest.mark.parametrize("symbols_only", [True, False])
def test_declared_organism_is_checked_against_the_genes(tmp_path, symbols_only):
    vocabulary = preset_config("tiny").genes
    settings = {"counts": "auto", "min_gene_coverage": 0.002}
    mislabelled = write_relabelled(tmp_path / "spleen.h5ad", SPLEEN, HUMAN, symbols_only)
    plan = plan_dataset(0, str(mislabelled), vocabulary, settings)
    evidence = "941 of 992 gene symbols match mouse, 1 human" if symbols_only else "992 of 992 Ensembl ids are mouse"
    assert plan.status == "failed" and evidence in plan.error and "data.organism=mouse" in plan.error
    forced = plan_dataset(0, str(mislabelled), vocabulary, {**settings, "organism": "mouse"})
    assert forced.status == "pending" and forced.gene_organism == MOUSE and set(forced.cell_organisms) == {MOUSE}
    # a file whose label agrees with its genes, and one with a few cells of other organisms, plan as before
    for path in (write_relabelled(tmp_path / "mouse.h5ad", SPLEEN, MOUSE, symbols_only), HEART):
        agreed = plan_dataset(0, str(path), vocabulary, settings)
        assert agreed.status == "pending" and not any("genes are" in warning for warning in agreed.warnings)


def test_a_cpu_run_under_16_bit_autocast_warns_and_atlas_json_records_the_numerics(tmp_path, unusual):
    out = tmp_path / "atlas"
    proc = run(predict_args(out, [HEART], ["trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=1"]))
    assert proc.returncode == 0, proc.stderr[-3000:]
    (attempt,) = json.loads((out / "atlas.json").read_text())["runs"][0]["attempts"]
    assert (attempt["device"], attempt["precision"]) == ("cpu", "bf16-mixed")
    assert attempt["fp32_matmul"] in ("ieee", "bf16") and "pass trainer.precision=32-true" in attempt["warning"]
    log = proc.stderr + proc.stdout
    assert "forward on cpu, precision bf16-mixed, fp32 matmul mode" in log
    assert "trainer.precision=bf16-mixed on a CPU: 16-bit autocast is usually slower" in log
    # the default CPU run: fp32, no warning
    (attempt,) = json.loads((unusual[1] / "atlas.json").read_text())["runs"][0]["attempts"]
    assert (attempt["device"], attempt["precision"]) == ("cpu", "32-true") and "warning" not in attempt
