"""Planning at atlas scale: parallel planning gives the plans a single process gives, and a run keeps light plans."""

import json
import shutil
import subprocess
import sys

import anndata
import pytest
from conftest import BMMC, HEART, PBMC, SPLEEN

from models import build_model
from pipeline.io.matrix import DatasetError
from pipeline.plan.datasets import load_dataset, plan_datasets, plan_from_record

SETTINGS = {"counts": "auto", "organism": None, "metadata": None, "min_gene_coverage": 0.002, "max_len": 64}

# In a fresh process with the run's stop handlers installed (they catch SIGTERM, which ends a pool's workers):
# plan the shipped datasets and a missing file in 1 and in 2 processes, print both sets of records.
PARALLEL_PLANNING = """
import json, sys, warnings
warnings.simplefilter("ignore")
from models import build_model
from pipeline.plan.datasets import plan_datasets
from pipeline.run.signals import install_stop_handlers
install_stop_handlers()
paths, settings = json.loads(sys.argv[1]), json.loads(sys.argv[2])
jobs = [(i, path, settings, None) for i, path in enumerate(paths)]
genes = build_model("tiny").config.genes
out = {}
for processes in (1, 2):
    plans = plan_datasets(jobs, genes, processes)
    assert all(p.matrix is None and p.gene_columns is None for p in plans)  # light: nothing open is kept
    out[processes] = [{**p.record(), "size": p.size, "fingerprint": p.fingerprint} for p in plans]
print(json.dumps(out))
"""


def test_parallel_planning_gives_the_plans_of_one_process_and_ends_its_workers(tmp_path):
    paths = [str(p) for p in (BMMC, SPLEEN, HEART, PBMC)] + [str(tmp_path / "missing.h5ad")]
    proc = subprocess.run([sys.executable, "-c", PARALLEL_PLANNING, json.dumps(paths), json.dumps(SETTINGS)],
                          capture_output=True, text=True, timeout=240)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    one, two = out["1"], out["2"]
    assert one == two
    assert [r["dataset"] for r in two] == [0, 1, 2, 3, 4]
    assert [r["n_cells"] for r in two[:4]] == [600, 340, 320, 200]
    assert [r["organism"] for r in two[:4]] == ["NCBITaxon:9606", "NCBITaxon:10090", "NCBITaxon:9606", "NCBITaxon:9606"]
    assert all(r["identity"].startswith("counts:") and r["fingerprint"] for r in two[:4])
    assert two[4]["status"] == "failed" and "missing.h5ad" in two[4]["error"]


def test_a_light_plan_is_stored_read_back_and_loaded_as_planned(tmp_path):
    genes = build_model("tiny").config.genes
    path = shutil.copyfile(SPLEEN, tmp_path / "spleen.h5ad")
    (light,) = plan_datasets([(7, str(path), SETTINGS, None)], genes, processes=1)
    # what the other ranks rebuild from datasets.parquet (with n_units, as the stored table has it)
    again = plan_from_record({**light.record(), "n_units": 4})
    assert again.read_settings == light.read_settings == {"counts": "auto", "min_gene_coverage": 0.002, "max_len": 64}
    loaded = load_dataset(again, genes)
    assert loaded.loaded and loaded.n_cells == 340 and loaded.gene_organism == "NCBITaxon:10090"
    assert loaded.gene_columns.shape == (992,) and (loaded.gene_columns >= 0).sum() == light.n_vocab_genes
    assert loaded.identity == light.identity and list(loaded.cell_organisms[:2]) == ["NCBITaxon:10090"] * 2
    assert loaded.matrix.read_rows(0, 5).shape == (5, 992)
    loaded.matrix.close()
    # the file is cut to fewer cells after planning: loading it fails its units by name, it never mis-reads rows
    adata = anndata.read_h5ad(SPLEEN)
    adata[:300].copy().write_h5ad(path)
    with pytest.raises(DatasetError, match="now has 300 cells x 992 genes .* planned with 340 x 992"):
        load_dataset(again, genes)


def test_ranks_get_contiguous_runs_of_units_so_a_dataset_stays_on_one_rank():
    from pipeline.plan.units import Unit, assign_units, make_units

    # 1,000 datasets of 30 cells in units of 15 (the scale benchmark's catalog), and the shipped files' sizes
    plans = [plan_from_record({"dataset": d, "path": f"ds_{d}.h5ad", "n_cells": 30}) for d in range(1000)]
    units = make_units(plans, 15)
    for world in (1, 2, 3, 4, 7):
        ranks = assign_units(units, world)
        assert sorted(u.part for r in ranks for u in r) == [u.part for u in units]  # every unit once
        assert max(sum(u.n_cells for u in r) for r in ranks) - min(sum(u.n_cells for u in r) for r in ranks) <= 15
        datasets = [{u.dataset for u in r} for r in ranks]
        assert sum(len(d) for d in datasets) <= 1000 + world - 1  # only where a rank's run ends
    sizes = [10_000, 600, 340, 320, 200]
    units = make_units([plan_from_record({"dataset": d, "path": "x", "n_cells": n}) for d, n in enumerate(sizes)], 4096)
    ranks = assign_units(units, 2)
    cells = [sum(u.n_cells for u in r) for r in ranks]
    assert sum(cells) == 11_460 and abs(cells[0] - cells[1]) <= 4096 and all(ranks)
    assert sum(map(len, assign_units([Unit(0, 0, 0, 5)], 3))) == 1


def test_a_requeued_run_takes_its_stored_plan_and_opens_no_unchanged_input(tmp_path, monkeypatch):
    """A run stopped by SLURM resumes from the plan it stored: an input still to embed, unchanged on disk, is not
    opened to plan it again (junk of its size and time in its place goes unread); new read settings re-plan it."""
    import os
    import signal

    from conftest import interrupt, predict_args

    from configs import compose_predict
    from pipeline.atlas.manifest import damaged_parts, done_parts
    from pipeline.run import predict
    from pipeline.run.predict import plan_run

    inputs = [tmp_path / "spleen.h5ad", tmp_path / "heart.h5ad"]
    for source, copy in zip((SPLEEN, HEART), inputs):
        shutil.copyfile(source, copy)
    out = tmp_path / "atlas"
    args = predict_args(out, inputs, ["data.cells_per_unit=50"])
    code, _, stderr = interrupt(args, out, signal.SIGTERM, 1)
    assert code == 75, stderr[-3000:]
    assert len([r for r in done_parts(out, 0).values() if r["dataset"] == 1]) < 7  # heart: units still to embed
    stat = inputs[1].stat()
    inputs[1].write_bytes(b"\0" * stat.st_size)
    os.utime(inputs[1], ns=(stat.st_atime_ns, stat.st_mtime_ns))
    overrides = [f"input=[{','.join(map(str, inputs))}]", f"out_dir={out}", *args[6:]]
    genes = build_model("tiny").config.genes
    checks = []  # the done parts' files are checked once per plan, not once per unit (units x parts stats)
    monkeypatch.setattr(predict, "damaged_parts", lambda *a: checks.append(a) or damaged_parts(*a))
    datasets, units, replaced = plan_run(compose_predict(overrides), genes, 0)
    assert len(checks) == 1 and len(units) == 14
    heart = datasets[1]
    assert heart.status == "pending" and heart.n_cells == 320 and heart.gene_organism == "NCBITaxon:9606"
    assert heart.read_settings["counts"] == "auto" and not heart.loaded and replaced == []
    assert sum(u.n_cells for u in units if u.dataset == 1) == 320
    # another read setting (a gene coverage floor): the stored plan does not hold, the file is opened and refused
    datasets, _, _ = plan_run(compose_predict([*overrides, "data.min_gene_coverage=0.003"]), genes, 0)
    assert datasets[1].status == "failed" and str(inputs[1]) in datasets[1].error
