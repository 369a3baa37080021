"""TileDB-SOMA experiments as input: built from a shipped h5ad with tiledbsoma.io.from_h5ad, embedded with
`scatlas predict` as a user would, they must give the cells and embeddings of the h5ad itself; an obs value
filter keeps exactly the cells it names, and each cell maps back by its soma_joinid."""

import pickle
import sys

import anndata as ad
import numpy as np
import pytest
from conftest import BMMC, cells_and_outputs, predict_args, run

from pipeline.atlas import open_atlas, validate
from pipeline.io.formats import detect_format, open_counts
from pipeline.io.matrix import DatasetError
from pipeline.plan.inputs import resolve_inputs

tiledbsoma_io = pytest.importorskip("tiledbsoma.io")

MONOCYTES = "cell_type == 'CD14+ Mono'"


@pytest.fixture(scope="module")
def experiment(tmp_path_factory):
    """The BMMC h5ad as a SOMA experiment: X (normalised) as layer 'data', layers['counts'] as layer 'counts'."""
    path = tmp_path_factory.mktemp("soma") / "bmmc"
    tiledbsoma_io.from_h5ad(str(path), str(BMMC), "RNA")
    return path


def test_an_experiment_made_from_an_h5ad_embeds_like_the_h5ad(experiment, reference, tmp_path):
    """``reference`` embeds the h5ad as dataset 0 with the same settings: the same per-cell seeds."""
    _, cells, dropped, embs, top3 = reference
    of_bmmc = (cells["dataset"] == 0).to_numpy()
    cells, embs, top3 = cells[of_bmmc].reset_index(drop=True), embs[of_bmmc], top3[of_bmmc]
    proc = run(predict_args(tmp_path / "soma", inputs=[experiment]))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert validate(tmp_path / "soma") == []
    _, soma_cells, soma_dropped, soma_embs, soma_top3 = cells_and_outputs(tmp_path / "soma")
    assert len(soma_cells) == len(cells) == 600 and len(soma_dropped) == (dropped["dataset"] == 0).sum() == 0
    assert np.array_equal(soma_cells["row"], cells["row"])
    assert np.array_equal(soma_cells["obs_name"], cells["obs_name"])
    assert np.array_equal(soma_cells["soma_joinid"], soma_cells["row"])  # no filter: the row is the soma_joinid
    assert np.abs(soma_embs - embs).max() <= 1e-5
    assert np.array_equal(soma_top3, top3)
    datasets = open_atlas(tmp_path / "soma").datasets
    assert datasets["counts_location"].tolist() == ["ms/RNA/X/counts"]  # auto: the layer of raw counts, not X


def test_an_obs_filter_keeps_the_cells_it_names_and_each_maps_back_by_soma_joinid(experiment, tmp_path):
    adata = ad.read_h5ad(BMMC)
    kept = np.flatnonzero(adata.obs["cell_type"] == "CD14+ Mono")
    matrix = open_counts(experiment, obs_filter=MONOCYTES)
    assert matrix.n_cells == len(kept) == 90
    assert np.array_equal(matrix.obs["soma_joinid"], kept)
    assert np.array_equal(matrix.obs_names, adata.obs_names[kept])
    assert abs(matrix.read_rows(0, matrix.n_cells) - adata.layers["counts"][kept]).max() == 0
    copy = pickle.loads(pickle.dumps(matrix))  # a data-loader worker reopens the same filtered cells
    assert copy.n_cells == 90 and abs(copy.read_rows_at([7, 2, 7]) - adata.layers["counts"][kept[[7, 2, 7]]]).max() == 0

    out = tmp_path / "atlas"
    proc = run(predict_args(out, inputs=[experiment], extra=[f'data.soma_filter="{MONOCYTES}"']))
    assert proc.returncode == 0, proc.stderr[-3000:]
    atlas = open_atlas(out)
    cells = atlas.cells()
    assert np.array_equal(np.sort(cells["soma_joinid"]), kept)
    assert np.array_equal(adata.obs_names[cells["soma_joinid"]], cells["obs_name"])
    assert set(atlas.source_obs("cell_type")["cell_type"]) == {"CD14+ Mono"}  # reopened with the recorded filter
    assert atlas.datasets["soma_filter"].tolist() == [MONOCYTES]


def test_an_experiment_directory_is_one_dataset(experiment):
    assert detect_format(str(experiment)) == "soma"
    assert resolve_inputs(str(experiment)) == [(str(experiment), {})]
    assert resolve_inputs(str(experiment.parent)) == [(str(experiment), {})]  # a folder of experiments lists it


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"counts": "raw"}, r"has no X layer 'raw' in measurement 'RNA' \(it has \['counts', 'data'\]\); pass"),
        ({"counts": "data"}, r"X layer 'data' holds non-integer values .* looks log-normalised"),
        ({"obs_filter": "colour == 'red'"}, r"cannot filter obs: .*colour.* \(obs columns: soma_joinid, obs_id"),
        ({"obs_filter": "cell_type == 'astrocyte'"}, r"keeps no cell"),
    ],
)
def test_a_bad_layer_or_filter_is_refused_in_one_line(experiment, options, message):
    with pytest.raises(DatasetError, match=message) as refused:
        open_counts(experiment, **options)
    assert "\n" not in str(refused.value) and str(refused.value).startswith(str(experiment))


def test_a_filter_on_another_format_is_reported_not_applied():
    with open_counts(BMMC, obs_filter=MONOCYTES) as matrix:
        assert matrix.n_cells == 600
        assert any("soma_filter" in warning and "ignored" in warning for warning in matrix.warnings)


def test_without_tiledbsoma_the_error_names_the_extra(experiment):
    code = ("import sys; sys.modules['tiledbsoma'] = None\n"
            "from pipeline.io.formats import open_counts\n"
            f"open_counts({str(experiment)!r})")  # fmt: skip
    proc = run([sys.executable, "-c", code])
    assert proc.returncode == 1
    assert "pip install -e '.[soma]'" in proc.stderr.strip().splitlines()[-1]
