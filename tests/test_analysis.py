"""Using an atlas: the Python API (open_atlas) and `scatlas summarize|plot|probe`, on an atlas of real datasets."""

import json
import shutil
import sys

import anndata
import matplotlib.image
import numpy as np
import pandas as pd
import pytest
from conftest import DATA, run

from pipeline.atlas import load_state, open_atlas, read_part
from pipeline.atlas.labels import ONTOLOGY_TERM

BMMC = DATA / "neurips2021_human_bmmc_cite_rna_600x1000.h5ad"
INPUTS = [
    BMMC,
    DATA / "cxg_schema5_human_heart_fixture_320x136.h5ad",
    DATA / "tenx_human_pbmc10k_protein_v3_200x16727.h5ad",
]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def scatlas(*args):
    return run([sys.executable, "-m", "pipeline", *map(str, args)])


@pytest.fixture(scope="session")
def atlas_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("analysis") / "atlas"
    # random weights (model.checkpoint=null): the tiny preset with all nine classes, not the two-class demo model
    proc = scatlas("predict", f"input=[{','.join(map(str, INPUTS))}]", f"out_dir={out}", "model.max_len=64",
                   "model.checkpoint=null", "data.num_workers=0", "data.cells_per_unit=300")  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


@pytest.fixture(scope="session")
def parts(atlas_dir):
    """Every done part read whole with read_part, in part order: the reference the lazy reader must match."""
    state = load_state(atlas_dir)
    return [read_part(atlas_dir, state.done[p]) for p in sorted(state.done)]


def test_open_atlas_lists_done_parts_and_reads_them_lazily(atlas_dir, parts):
    atlas = open_atlas(atlas_dir)
    markers = sorted((atlas_dir / "manifest" / "run_0").glob("part_*.done.json"))
    assert len(atlas.parts) == len(markers) == atlas.n_planned_parts == 5  # 600 + 320 + 200 cells, 300 a unit
    assert atlas.n_cells == sum(json.loads(m.read_text())["n_cells"] for m in markers) == 1118  # 2 heart cells dropped
    assert list(atlas.parts["first"]) == list(np.cumsum([0] + [len(p["cells"]) for p in parts])[:-1])
    first = int(atlas.parts["part"].iloc[0])
    assert isinstance(atlas.array(first, "embs"), np.memmap)
    for kind in ("embs", "top3", "scores"):
        assert np.array_equal(atlas.array(first, kind), parts[0][kind])
    assert np.array_equal(atlas.embedding(), np.concatenate([p["embs"] for p in parts]))


def test_named_blocks_and_top_columns_follow_atlas_json(atlas_dir, parts):
    atlas = open_atlas(atlas_dir)
    meta = json.loads((atlas_dir / "atlas.json").read_text())
    embs, top3 = np.concatenate([p["embs"] for p in parts]), np.concatenate([p["top3"] for p in parts])
    for short, full in [("cell_type", "cell_type_ontology_term_id"), ("age", "age_group"),
                        ("ethnicity", "self_reported_ethnicity_ontology_term_id"), ("organism", "organism_ontology_term_id")]:  # fmt: skip
        block = next(b for b in meta["embedding_blocks"] if b["name"] == full)
        assert np.array_equal(atlas.embedding(short), embs[:, block["start"] : block["start"] + block["width"]])
        info = next(c for c in meta["classes"] if c["name"] == full)
        assert np.array_equal(atlas.top(short, k=1), top3[:, info["start"] : info["start"] + 1])
        assert atlas.top(full).shape == (atlas.n_cells, info["k"])
    rows = np.array([1000, 3, 650, 3])  # any order, repeats allowed
    assert np.array_equal(atlas.scores("tissue", k=2, rows=rows), atlas.scores("tissue", k=2)[rows])
    with pytest.raises(ValueError, match="no class 'colour'"):
        atlas.top("colour")


def test_decoded_labels_match_the_vocabulary_of_atlas_json(atlas_dir, parts):
    from cellxgene_ontology_guide.ontology_parser import OntologyParser

    atlas = open_atlas(atlas_dir)
    meta = json.loads((atlas_dir / "atlas.json").read_text())
    top3 = np.concatenate([p["top3"] for p in parts])
    parser = OntologyParser()
    for info in meta["classes"]:
        vocabulary = meta["labels"][info["name"]]
        labels = atlas.labels(info["name"])
        assert list(labels["term"]) == [vocabulary[str(i)] for i in range(len(vocabulary))]
        for term, name in zip(labels["term"], labels["name"]):
            if not ONTOLOGY_TERM.match(term):
                assert name == term
            elif not term.startswith("NCBITaxon:"):  # loading NCBITaxon takes ~15 s; its names are checked below
                assert name == parser.get_term_label(term)
        ids = top3[:, info["start"] : info["start"] + info["k"]]
        assert (atlas.decode(info["name"], ids) == np.vectorize(vocabulary.__getitem__)(ids.astype(str))).all()
    assert set(atlas.predictions()["cell_type_top1"]) <= set(meta["labels"]["cell_type_ontology_term_id"].values())
    organisms = atlas.labels("organism").set_index("term")["name"]
    assert organisms.get("NCBITaxon:9606", "Homo sapiens") == "Homo sapiens"
    assert organisms.get("NCBITaxon:10090", "Mus musculus") == "Mus musculus"


def test_to_anndata_rows_are_the_source_cells(atlas_dir, parts):
    atlas = open_atlas(atlas_dir)
    cells = atlas.cells()
    bmmc = cells.index[cells["dataset"] == 0].to_numpy()
    rows = np.random.default_rng(0).permutation(bmmc)[:250]
    adata = atlas.to_anndata(rows)
    source = anndata.read_h5ad(BMMC, backed="r")
    assert adata.n_obs == 250
    assert list(adata.obs_names) == list(source.obs_names[adata.obs["row"].to_numpy()])
    assert np.array_equal(adata.obsm["X_scprint2"], np.concatenate([p["embs"] for p in parts])[rows])
    assert np.array_equal(
        adata.obs["cell_type_top1"].to_numpy(str), atlas.decode("cell_type", atlas.top("cell_type", 1, rows)[:, 0])
    )
    assert np.array_equal(adata.obs["cell_type_top2_score"], atlas.scores("cell_type", 2, rows)[:, 1])
    joined = atlas.source_obs("cell_type", rows)["cell_type"].to_numpy(str)
    assert np.array_equal(joined, source.obs["cell_type"].to_numpy(str)[adata.obs["row"].to_numpy()])
    adata.write_h5ad(atlas_dir.parent / "selection.h5ad")
    assert anndata.read_h5ad(atlas_dir.parent / "selection.h5ad").obsm["X_scprint2"].shape == (
        250,
        atlas.embedding_width,
    )


def test_summarize_counts_add_up_to_the_embedded_cells(atlas_dir):
    proc = scatlas("summarize", atlas_dir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "1,118 cells embedded" in proc.stdout and "cell_type" in proc.stdout
    state = load_state(atlas_dir)
    embedded = pd.Series({d: sum(r["n_cells"] for r in state.done.values() if r["dataset"] == d) for d in (0, 1, 2)})
    summary = atlas_dir / "summary"
    by_dataset = pd.read_csv(summary / "predicted_by_dataset.csv")
    assert (summary / "predicted_by_dataset.parquet").exists()
    for _, table in by_dataset.groupby("class"):
        assert table.groupby("dataset")["n_cells"].sum().equals(embedded)
    crossed = pd.read_csv(summary / "cell_type_by_class.csv")
    assert set(crossed["class"]) == {
        "tissue",
        "disease",
        "age",
        "assay",
        "ethnicity",
        "sex",
        "organism",
        "cell_culture",
    }
    assert (crossed.groupby("class")["n_cells"].sum() == 1118).all()
    labels = pd.read_csv(summary / "labels.csv")
    assert (labels.groupby("class")["n_top1"].sum() == 1118).all()
    assert labels.loc[labels["class"] == "cell_type", "n_top3"].sum() == 1118
    histograms = pd.read_csv(summary / "score_histograms.csv")
    assert (histograms.groupby(["class", "rank"])["n_cells"].sum() == 1118).all()
    assert pd.read_csv(summary / "datasets.csv")["n_embedded"].tolist() == embedded.tolist()


def test_commands_read_only_done_parts_of_an_atlas_being_written(atlas_dir, tmp_path):
    partial = tmp_path / "atlas"
    shutil.copytree(atlas_dir, partial, ignore=shutil.ignore_patterns("summary", "plots"))
    last = max(
        (partial / "manifest" / "run_0").glob("part_*.done.json"), key=lambda p: int(p.stem.split("_")[1].split(".")[0])
    )
    n_last = json.loads(last.read_text())["n_cells"]
    last.unlink()  # its files are written, its marker not yet: not part of the atlas
    atlas = open_atlas(partial)
    assert (len(atlas.parts), atlas.n_planned_parts, atlas.n_cells) == (4, 5, 1118 - n_last)
    proc = scatlas("summarize", partial)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"4/5 parts done, {1118 - n_last:,} cells embedded" in proc.stdout
    assert (pd.read_csv(partial / "summary" / "labels.csv").groupby("class")["n_top1"].sum() == 1118 - n_last).all()


def test_plot_writes_valid_pngs(atlas_dir):
    proc = scatlas("plot", atlas_dir, "--cells", 800)
    assert proc.returncode == 0, proc.stderr[-3000:]
    names = ["embedding_pca.png", "score_histograms.png"]
    assert proc.stdout.split() == [str(atlas_dir / "plots" / n) for n in names]
    # random weights put every cell in one tissue: a cell type x tissue heatmap would only repeat the cell types
    assert "cell_type_by_tissue.png: not plotted, every cell has the same top-1 tissue (" in proc.stderr
    for name in names:
        path = atlas_dir / "plots" / name
        assert path.read_bytes()[:8] == PNG_SIGNATURE
        height, width, channels = matplotlib.image.imread(path).shape
        assert height >= 300 and width >= 500 and channels == 4


def test_probe_on_bmmc_cell_types_beats_the_majority_baseline(atlas_dir):
    proc = scatlas("probe", atlas_dir, "--label", "cell_type")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "accuracy" in proc.stdout and "macro-F1" in proc.stdout
    result = json.loads((atlas_dir / "summary" / "probe_cell_type.json").read_text())
    assert result["datasets"] == [0]  # only the BMMC file has obs['cell_type']
    per_type = anndata.read_h5ad(BMMC, backed="r").obs["cell_type"].value_counts()
    assert (result["n_cells"], result["n_labels"]) == (per_type[per_type >= 2].sum(), (per_type >= 2).sum())  # 596, 37
    assert result["n_test"] == round(0.25 * result["n_cells"])
    # measured with the seeded random-weight tiny model: accuracy 0.289 (macro-F1 0.125) against a majority
    # baseline of 0.148 (0.007); the bounds keep half of that gap
    assert result["accuracy"] > result["baseline_accuracy"] + 0.07
    assert result["macro_f1"] > 5 * result["baseline_macro_f1"]
