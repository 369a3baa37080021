"""The shipped demo checkpoint (models/data/tiny-demo.ckpt): it loads strictly and predicts real labels."""

import json
import sys

import pandas as pd
import pytest
import torch
from conftest import DATA, cells_and_outputs, run

from configs import compose_predict
from models import build_model, load_checkpoint
from models.checkpoint import file_sha256, read_checkpoint
from models.presets import DEMO_CHECKPOINT
from pipeline.analysis.heldout import CELL_TYPE, ORGANISM, accuracy, cell_type_table
from pipeline.tools.train_demo import TRAINING_FILES

METRICS = json.loads(DEMO_CHECKPOINT.with_suffix(".metrics.json").read_text())
HELD_OUT = pd.read_csv(DEMO_CHECKPOINT.with_suffix(".heldout.csv"), keep_default_na=False)
# measured on the held-out cells (see tiny-demo.metrics.json), less a margin for other CPUs / torch builds
MIN_TOP3, MIN_TOP1 = 0.65, 0.40


def test_shipped_checkpoint_loads_strictly_with_the_labels_it_was_trained_on():
    assert DEMO_CHECKPOINT.stat().st_size < 8 * 2**20
    assert file_sha256(DEMO_CHECKPOINT) == METRICS["checkpoint_sha256"]
    raw = read_checkpoint(DEMO_CHECKPOINT)
    assert {"state_dict", "hyper_parameters", "pytorch-lightning_version"} <= set(raw)
    model = load_checkpoint(DEMO_CHECKPOINT)  # strict: any missing or unexpected key raises
    config = model.config
    assert list(config.classes) == [CELL_TYPE, ORGANISM]
    assert config.label_decoders[ORGANISM] == {0: "NCBITaxon:9606", 1: "NCBITaxon:10090"}
    assert set(config.label_decoders[CELL_TYPE].values()) == set(cell_type_table().term)
    assert config.classes[CELL_TYPE] == METRICS["n_cell_type_labels"]
    stored = {v.dtype for v in raw["state_dict"].values() if v.is_floating_point()}
    assert stored == {torch.float16} and {p.dtype for p in model.parameters()} == {torch.float32}
    assert build_model("tiny", "demo").checkpoint_sha256 == METRICS["checkpoint_sha256"]
    assert compose_predict().model.checkpoint == "demo"  # the default of model=tiny


def test_cell_type_table_names_real_cell_ontology_terms():
    parser = pytest.importorskip("cellxgene_ontology_guide.ontology_parser").OntologyParser()
    table = cell_type_table()
    mapped = table[table.cl_id != ""]
    for row in mapped.itertuples():
        assert parser.get_term_label(row.cl_id) == row.cl_name, row
        assert not parser.is_term_deprecated(row.cl_id), row
    # only doublets and the mixed cycling population keep their original name
    assert set(table[table.cl_id == ""].match) == {"none"}
    assert len(table) - len(mapped) == 6


def test_predict_with_the_demo_model_gets_held_out_cells_right(tmp_path):
    out = tmp_path / "atlas"
    inputs = [DATA / path.name for path in TRAINING_FILES]  # the two training files
    proc = run([sys.executable, "-m", "pipeline", "predict", f"input=[{','.join(map(str, inputs))}]",
                f"out_dir={out}", "data.num_workers=0"])  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    state, cells, dropped, _, top3 = cells_and_outputs(out)
    assert len(dropped) == 0
    description = state.description
    classes = {c["name"]: c for c in description["classes"]}
    files = dict(zip(state.datasets.dataset, state.datasets.path.map(lambda p: p.rsplit("/", 1)[-1])))
    cells["file"] = cells.dataset.map(files)
    cells["position"] = range(len(cells))
    test = cells.merge(HELD_OUT, on=["file", "row", "obs_name"])
    assert len(test) == len(HELD_OUT) == METRICS["n_held_out_cells"]
    top = {c: top3[test.position][:, classes[c]["start"] : classes[c]["start"] + classes[c]["k"]]
           for c in (CELL_TYPE, ORGANISM)}  # fmt: skip
    decoders = {c: {int(k): v for k, v in description["labels"][c].items()} for c in top}
    measured = accuracy(test, top, decoders)
    expected = METRICS["held_out"]["all"]
    # measured on the training run's gene draws (seeded by file position); predict's draws (seeded by the dataset
    # identity) give 0.508 / 0.730 / 1.0
    for key in ("cell_type_top1", "cell_type_top3", "organism_top1"):
        assert measured[key] == pytest.approx(expected[key], abs=0.02), key
    assert measured["cell_type_top3"] >= MIN_TOP3 > 2 * measured["cell_type_top3_chance"]
    assert measured["cell_type_top1"] >= MIN_TOP1 > 3 * measured["cell_type_top1_chance"]
    assert measured["organism_top1"] == 1.0
    assert "held-out cells" in proc.stdout and "cell type top-1" in proc.stdout
    # the demo model has no tissue class: its heatmap crosses cell type with organism, human and mouse here
    plot = run([sys.executable, "-m", "pipeline", "plot", str(out), "--cells", "200"])
    heatmap = out / "plots" / "cell_type_by_organism.png"
    assert plot.returncode == 0 and str(heatmap) in plot.stdout.split(), plot.stderr[-3000:]
    assert heatmap.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
