"""`scatlas export --to parquet|zarr|soma` on an atlas of real datasets: each export, read back with its own
ecosystem's reader (pandas/duckdb, anndata/zarr, tiledbsoma), has the cells, embeddings and labels that
open_atlas reads, and the atlas's provenance; an export is written whole or not at all."""

import json
import sys

import anndata
import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import zarr
from conftest import DATA, run

from pipeline.atlas import open_atlas
from pipeline.export.anndata_zarr import export_zarr
from pipeline.export.parquet import read_embeddings

BMMC = DATA / "neurips2021_human_bmmc_cite_rna_600x1000.h5ad"
HEART = DATA / "cxg_schema5_human_heart_fixture_320x136.h5ad"


def scatlas(*args):
    return run([sys.executable, "-m", "pipeline", *map(str, args)])


@pytest.fixture(scope="module")
def atlas_dir(tmp_path_factory):
    """Heart and BMMC cells (5 parts, 2 heart cells dropped), the tiny preset with random weights (all nine classes);
    a metadata column (batch) for the BMMC cells only, so the exports meet a column the first parts lack."""
    folder = tmp_path_factory.mktemp("export")
    bmmc = anndata.read_h5ad(BMMC)
    pd.DataFrame({"cell_id": bmmc.obs_names, "batch": bmmc.obs["batch"].astype(str)}).to_csv(
        folder / "batch.csv", index=False
    )
    pd.DataFrame({"path": [HEART, BMMC], "metadata": ["", folder / "batch.csv"]}).to_csv(
        folder / "catalog.csv", index=False
    )
    out = folder / "atlas"
    proc = scatlas("predict", f"input={folder / 'catalog.csv'}", f"out_dir={out}", "model.max_len=64",
                   "model.checkpoint=null", "data.num_workers=0", "data.cells_per_unit=250")  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def expected(atlas_dir):
    """What open_atlas reads: cells with predictions, in atlas row order, and the embedding."""
    atlas = open_atlas(atlas_dir, progress=False)
    return atlas, pd.concat([atlas.cells(), atlas.predictions()], axis=1), atlas.embedding()


def same_columns(got: pd.DataFrame, want: pd.DataFrame, columns):
    for name in columns:
        if want[name].dtype.kind in "fiu":
            assert np.array_equal(got[name].to_numpy(np.float64), want[name].to_numpy(np.float64), equal_nan=True), name
        else:
            as_text = [
                values.astype(object).where(values.notna(), "").astype(str).to_numpy()
                for values in (got[name], want[name])
            ]
            assert np.array_equal(*as_text), name  # a missing value is null in one library, NaN or '' in another


def checked_provenance(text: str, atlas):
    provenance = json.loads(text)
    assert provenance["model"]["checkpoint_sha256"] == atlas.description["model"]["checkpoint_sha256"]
    assert provenance["settings"]["max_len"] == 64 and provenance["settings"]["seed"] == 0
    assert provenance["n_cells"] == atlas.n_cells and provenance["run"] == 0
    assert [b["name"] for b in provenance["embedding_blocks"]] == atlas.blocks


def test_parquet_export_reads_back_with_pandas_and_duckdb(atlas_dir, expected, tmp_path):
    atlas, want, embedding = expected
    out = tmp_path / "parquet"
    proc = scatlas("export", atlas_dir, "--to", "parquet", out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"exported {atlas.n_cells:,} cells of 5 parts" in proc.stdout
    assert len(list((out / "cells").glob("*.parquet"))) == len(list((out / "embeddings").glob("*.parquet"))) == 5

    cells = pd.read_parquet(out / "cells").sort_values("atlas_row").reset_index(drop=True)
    assert len(cells) == atlas.n_cells == 918 and np.array_equal(cells["atlas_row"], np.arange(918))
    same_columns(cells, want.reset_index(drop=True), want.columns)
    assert cells.loc[cells["dataset"] == 0, "batch"].isna().all()  # the heart file has no metadata table
    assert cells.loc[cells["dataset"] == 1, "batch"].notna().all()
    embeddings = pq.read_table(out / "embeddings").to_pandas().sort_values("atlas_row")
    assert np.array_equal(read_embeddings(out / "embeddings")[np.argsort(embeddings.index)], embedding)
    checked_provenance(pq.read_schema(next((out / "cells").glob("*.parquet"))).metadata[b"scprint_atlas"], atlas)
    assert pd.read_parquet(out / "datasets.parquet")["path"].tolist() == atlas.datasets["path"].tolist()

    duckdb = pytest.importorskip("duckdb")
    per_tissue = duckdb.sql(f"""
        SELECT dataset, tissue_top1_name AS tissue, cell_type_top1_name AS cell_type, count(*) AS n_cells
        FROM '{out}/cells/*.parquet' GROUP BY ALL ORDER BY dataset, tissue, cell_type""").df()  # fmt: skip
    by_pandas = (want.groupby(["dataset", "tissue_top1_name", "cell_type_top1_name"], observed=True).size()
                 .reset_index(name="n_cells").sort_values(["dataset", "tissue_top1_name", "cell_type_top1_name"]))  # fmt: skip
    assert per_tissue["n_cells"].tolist() == by_pandas["n_cells"].tolist()
    assert per_tissue["cell_type"].tolist() == by_pandas["cell_type_top1_name"].astype(str).tolist()
    assert per_tissue["n_cells"].sum() == 918


def test_zarr_export_is_the_anndata_of_open_atlas(atlas_dir, expected, tmp_path):
    atlas, want, embedding = expected
    out = tmp_path / "atlas.zarr"  # blocks of 2 parts of up to 250 cells: the later ones are appended
    export_zarr(atlas, out, block_rows=300)
    adata = anndata.read_zarr(out)
    reference = atlas.to_anndata()
    assert adata.n_obs == 918 and np.array_equal(adata.obs_names, reference.obs_names)
    assert np.array_equal(adata.obsm["X_scprint2"], reference.obsm["X_scprint2"])
    same_columns(adata.obs, reference.obs, [c for c in reference.obs.columns if c != "batch"])
    assert (adata.obs.loc[adata.obs["dataset"].to_numpy() == 0, "batch"] == "").all()
    assert (adata.obs["batch"] == reference.obs["batch"].fillna("")).all()
    checked_provenance(adata.uns["scprint2"]["scprint_atlas"], atlas)
    store = zarr.open_group(out, mode="r")  # slicing reads only the chunks of those rows
    assert np.array_equal(store["obsm/X_scprint2"][600:700], embedding[600:700])
    assert np.array_equal(anndata.io.read_elem(store["obs/dataset"])[600:700], want["dataset"].to_numpy()[600:700])


def test_soma_export_reads_back_with_tiledbsoma(atlas_dir, expected, tmp_path):
    soma = pytest.importorskip("tiledbsoma")
    import tiledbsoma.io

    atlas, want, embedding = expected
    out = tmp_path / "atlas.soma"
    assert scatlas("export", atlas_dir, "--to", "soma", out).returncode == 0
    reference = atlas.to_anndata()
    with soma.Experiment.open(str(out)) as experiment:
        checked_provenance(experiment.metadata["scprint_atlas"], atlas)
        heart = experiment.obs.read(value_filter="dataset == 1").concat().to_pandas()
        assert np.array_equal(np.sort(heart["soma_joinid"]), np.flatnonzero(want["dataset"] == 1))
        rows = experiment.ms["RNA"].obsm["X_scprint2"].read((slice(600, 699),)).to_numpy()
        assert np.array_equal(rows, embedding[600:700])
        cell_type = experiment.ms["RNA"].obsm["X_scprint2_cell_type"].read().to_numpy()
        assert np.array_equal(cell_type, atlas.embedding("cell_type"))
        adata = tiledbsoma.io.to_anndata(experiment, "RNA", X_layer_name=None, obs_id_name="obs_id")
    assert np.array_equal(adata.obs_names, reference.obs_names)
    assert np.array_equal(adata.obsm["X_scprint2"], reference.obsm["X_scprint2"])
    assert np.array_equal(adata.obsm["X_scprint2_other"], atlas.embedding("other"))
    same_columns(adata.obs, reference.obs, reference.obs.columns)


def test_an_export_is_written_whole_or_not_at_all(atlas_dir, tmp_path):
    out = tmp_path / "cells"
    out.mkdir()
    proc = scatlas("export", atlas_dir, "--to", "parquet", out)
    assert (
        proc.returncode == 2
        and proc.stderr.strip() == f"scatlas export: error: {out} exists; remove it or export to another path"
    )

    broken = tmp_path / "broken"  # an atlas whose last part lost its embedding file after being marked done
    import shutil

    shutil.copytree(atlas_dir, broken)
    last = open_atlas(broken, progress=False).parts["stem"].iloc[-1]
    (broken / f"{last}_embs.npz").unlink()
    proc = scatlas("export", broken, "--to", "zarr", tmp_path / "broken.zarr")
    assert proc.returncode != 0
    assert not (tmp_path / "broken.zarr").exists() and not list(tmp_path.glob(".broken.zarr.tmp-*"))


def test_without_tiledbsoma_the_export_names_the_extra(atlas_dir, tmp_path):
    code = ("import sys; sys.modules['tiledbsoma'] = None\n"
            "from pipeline.cli import main\n"
            f"sys.exit(main(['export', {str(atlas_dir)!r}, '--to', 'soma', {str(tmp_path / 'x.soma')!r}]))")  # fmt: skip
    proc = run([sys.executable, "-c", code])
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "scatlas export: error: scatlas export --to soma needs tiledbsoma, which is not installed: "
        "pip install -e '.[soma]' (or pip install 'scprint-atlas[soma]')"
    ]
    assert not (tmp_path / "x.soma").exists()
