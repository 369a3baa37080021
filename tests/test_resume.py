"""Crash safety: kill -9, SIGTERM, bad inputs and failing writes never lose or duplicate a cell."""

import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import anndata
import numpy as np
import pandas as pd
import scipy.sparse as sp
from conftest import DATA, SMALL, cells_and_outputs, interrupt, predict_args, run, scprint1_style_config

from pipeline.atlas import load_state, validate
from pipeline.atlas.state import incomplete_datasets


def assert_same_atlas(out, reference):
    assert validate(out) == []
    state, cells, dropped, embs, top3 = cells_and_outputs(out)
    _, ref_cells, ref_dropped, ref_embs, ref_top3 = reference
    n_inputs = sum(anndata.read_h5ad(p, backed="r").n_obs for p in SMALL)
    assert len(cells) + len(dropped) == n_inputs
    assert not cells.duplicated(["dataset", "row"]).any() and not dropped.duplicated(["dataset", "row"]).any()
    pd.testing.assert_frame_equal(cells, ref_cells)
    np.testing.assert_allclose(embs, ref_embs, atol=1e-5)
    np.testing.assert_array_equal(top3, ref_top3)
    return state


def test_kill_9_then_resume_loses_and_duplicates_nothing(tmp_path, reference):
    out = tmp_path / "atlas"
    code, _, _ = interrupt(predict_args(out), out, signal.SIGKILL, n_done=3)
    assert code == -signal.SIGKILL
    n_units = len(load_state(out).units)
    done_before = load_state(out).done
    assert 3 <= len(done_before) < n_units, "the kill came too late to test anything"
    proc = run(predict_args(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    state = assert_same_atlas(out, reference)
    for part, record in done_before.items():  # done parts were not redone
        assert state.done[part]["files"] == record["files"]
    assert not list(out.rglob(".*.tmp"))


def test_sigterm_stops_cleanly_with_requeue_code_and_resumes(tmp_path, reference):
    out = tmp_path / "atlas"
    code, _, stderr = interrupt(predict_args(out), out, signal.SIGTERM, n_done=2)
    assert code == 75, stderr[-3000:]
    state = load_state(out)
    assert 2 <= len(state.done) < len(state.units)
    assert validate(out) == []  # consistent, but incomplete: the dataset with pending parts is named
    pending = incomplete_datasets(load_state(out))
    assert len(pending) == len(SMALL) and all("parts not done yet" in line for line in pending)
    assert str(SMALL[0]) in pending[0]
    proc = run(predict_args(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_same_atlas(out, reference)


def test_signals_to_every_process_leave_the_workers_alone(tmp_path):
    """As SLURM does at a requeue, signal each process of the run, its DataLoader workers first: the workers
    ignore SIGTERM/SIGUSR1, so the run stops cleanly at the next batch (75) with one line and no traceback."""
    out = tmp_path / "atlas"
    args = predict_args(out, extra=["data.num_workers=1"])
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True, env={**os.environ, "OMP_NUM_THREADS": "1"})  # fmt: skip
    deadline, workers = time.time() + 300, []
    while time.time() < deadline and proc.poll() is None:
        if len(list((out / "manifest" / "run_0").glob("part_*.done.json"))) >= 2:
            workers = [int(p) for p in Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()]
            for pid in workers:
                os.kill(pid, signal.SIGUSR1)
                os.kill(pid, signal.SIGTERM)
            time.sleep(0.3)  # a worker killed by these would be reported before the main process hears of them
            proc.send_signal(signal.SIGTERM)
            break
        time.sleep(0.02)
    output = proc.communicate(timeout=300)[0]
    assert workers, "no DataLoader worker was running"
    assert proc.returncode == 75, output[-3000:]
    assert "Traceback" not in output and "killed by signal" not in output, output[-3000:]
    assert output.count("stopped by SIGTERM at a batch boundary") == 1


def test_a_failing_write_marks_nothing_done_and_leaves_no_corrupt_file(tmp_path, reference):
    out = tmp_path / "atlas"

    def limit_file_size():  # every write past 60 kB fails with EFBIG, like a full disk
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (60_000, 60_000))

    big_parts = ["data.cells_per_unit=400"]  # parts of 400 cells need writes larger than the limit
    proc = subprocess.run(predict_args(out, extra=big_parts), capture_output=True, text=True,
                          preexec_fn=limit_file_size)  # fmt: skip
    assert proc.returncode == 4, proc.stderr[-3000:]  # one line naming the file, the cause and the remedy
    (line,) = [line for line in proc.stderr.splitlines() if line.startswith("scatlas")]
    assert line.startswith(f"scatlas predict: error: {out}/") and "File too large" in line and "re-run" in line
    assert "Traceback" not in proc.stderr
    assert not list((out / "manifest" / "run_0").glob("part_*.done.json"))
    assert not list(out.glob("step_*_embs.npz"))  # the failed write left nothing under a final name
    assert not list(out.rglob(".*.tmp"))
    proc = run(predict_args(out, extra=big_parts))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_same_atlas(out, reference)


def _bad_inputs(tmp_path):
    heart = DATA / "cxg_schema5_human_heart_fixture_320x136.h5ad"
    spleen = anndata.read_h5ad(DATA / "neurips2021_mouse_spleen_lymphnode_cite_rna_340x992.h5ad")
    files = {}
    files["truncated"] = tmp_path / "truncated.h5ad"
    files["truncated"].write_bytes(heart.read_bytes()[:300_000])
    files["not_h5ad"] = tmp_path / "notes.h5ad"
    files["not_h5ad"].write_text("cell,gene,count\nA,B,1\n")
    files["no_cells"] = tmp_path / "no_cells.h5ad"
    spleen[:0].copy().write_h5ad(files["no_cells"])
    fake = spleen.copy()
    fake.var_names = [f"NOT_A_GENE_{i}" for i in range(fake.n_vars)]
    fake.var = fake.var[[]]
    files["no_known_genes"] = tmp_path / "no_known_genes.h5ad"
    fake.write_h5ad(files["no_known_genes"])
    lognorm = spleen.copy()
    lognorm.X = np.log1p(lognorm.X.toarray())
    files["log_normalised"] = tmp_path / "log_normalised.h5ad"
    lognorm.write_h5ad(files["log_normalised"])
    for name, value in (("negative", -3.0), ("nan", np.nan), ("inf", np.inf)):
        bad = spleen.copy()
        X = bad.X.toarray()
        X[5, 7] = value
        bad.X = sp.csr_matrix(X)
        files[name] = tmp_path / f"{name}.h5ad"
        bad.write_h5ad(files[name])
    files["missing"] = tmp_path / "does_not_exist.h5ad"
    # a bad value after the rows sampled when the file is opened (2000): found while streaming
    late = anndata.read_h5ad(DATA / "tenx_mouse_brain_e18_10000x1000.h5ad")[:2400].copy()
    X = late.X.toarray()
    X[2300, 3] = -1
    late.X = sp.csr_matrix(X)
    files["late_negative"] = tmp_path / "late_negative.h5ad"
    late.write_h5ad(files["late_negative"])
    return files


EXPECTED_ERRORS = {
    "truncated": "truncated or corrupt",
    "not_h5ad": "not an h5ad file",
    "no_cells": "no cells",
    "no_known_genes": "in the model vocabulary",
    "log_normalised": "log-normalised",
    "negative": "negative",
    "nan": "NaN",
    "inf": "inf",
    "missing": "does not exist",
    "late_negative": "negative",
}


def test_bad_inputs_are_recorded_by_name_and_the_rest_is_embedded(tmp_path):
    files = _bad_inputs(tmp_path)
    duplicated = anndata.read_h5ad(DATA / "tenx_human_pbmc10k_protein_v3_200x16727.h5ad")
    duplicated.obs_names = ["same"] * 100 + list(duplicated.obs_names[100:])
    files["duplicated_obs_names"] = tmp_path / "duplicated_obs_names.h5ad"
    duplicated.write_h5ad(files["duplicated_obs_names"])
    good = DATA / "neurips2021_human_bmmc_cite_rna_600x1000.h5ad"
    inputs = [*files.values(), good]
    out = tmp_path / "atlas"
    proc = run(predict_args(out, inputs, ["data.cells_per_unit=200"]))
    assert proc.returncode == 3, proc.stderr[-3000:]
    table = pd.read_parquet(out / "datasets.parquet").set_index("path")
    for name, needle in EXPECTED_ERRORS.items():
        row = table.loc[str(files[name])]
        assert row.status == "failed", name
        assert str(files[name]) in row.error and needle in row.error, (name, row.error)
        assert "\n" not in row.error
        assert row.error in proc.stdout  # the summary names every failure
    # duplicated obs names are not an error: cells are mapped back by row; a warning is recorded
    dup = table.loc[str(files["duplicated_obs_names"])]
    assert dup.status == "done" and "duplicated" in dup.warnings
    assert table.loc[str(good)].status == "done" and table.loc[str(good)].n_embedded == 600
    late = table.loc[str(files["late_negative"])]
    assert "row 2300" in late.error
    assert validate(out) == []  # what is there is consistent; failures are reported, not hidden
    status = run([sys.executable, "-m", "pipeline", "status", str(out)]).stdout
    assert "10 failed" in status and "late_negative.h5ad" in status
    # a re-run retries only what failed: done parts are untouched
    before = {p: r["files"] for p, r in load_state(out).done.items()}
    again = run(predict_args(out, inputs, ["data.cells_per_unit=200"]))
    assert again.returncode == 3
    assert {p: r["files"] for p, r in load_state(out).done.items()} == before


def test_a_unit_that_cannot_be_read_fails_alone_and_is_retried(tmp_path):
    """A corrupt chunk past the rows checked at planning, with no neighbour pass to find it first (a
    continuous-expression, scPRINT-1 style model): only the unit holding it fails, by name; the rest is embedded."""
    import h5py
    import torch

    from models import random_model, save_checkpoint

    config = scprint1_style_config()
    checkpoint = save_checkpoint(random_model(config, seed=2), tmp_path / "continuous.ckpt")
    brain = anndata.read_h5ad(DATA / "tenx_mouse_brain_e18_10000x1000.h5ad")[:3000].copy()
    brain.X = sp.csr_matrix(brain.X)
    path = tmp_path / "corrupt_chunk.h5ad"
    brain.write_h5ad(path, compression="gzip")
    with h5py.File(path, "r") as h5:  # the compressed chunk holding row 2500's counts
        data, at = h5["X/data"], int(h5["X/indptr"][2500])
        chunk = data.id.get_chunk_info_by_coord((at // data.chunks[0] * data.chunks[0],))
    with open(path, "r+b") as raw:
        raw.seek(chunk.byte_offset + 8)
        raw.write(b"\xff" * 64)
    out = tmp_path / "atlas"
    args = predict_args(out, [path], ["data.cells_per_unit=1000", f"model.checkpoint={checkpoint}"])
    proc = run(args)
    assert proc.returncode == 3, proc.stderr[-3000:]
    state = load_state(out)
    assert sorted(state.done) == [0, 1] and sorted(state.failed) == [2]
    error = state.failed[2]["error"]
    assert error.startswith(f"{path}: cannot read rows [2") and "filter returned failure" in error and "\n" not in error
    assert error in proc.stdout  # the summary names it
    cells = pd.concat(pd.read_parquet(out / f"{r['stem']}_cells.parquet") for r in state.done.values())
    dropped = pd.concat(pd.read_parquet(out / f"{r['stem']}_dropped.parquet") for r in state.done.values())
    assert sorted([*cells["row"], *dropped["row"]]) == list(range(2000))  # every cell of the readable units
    assert validate(out) == []
    status = run([sys.executable, "-m", "pipeline", "status", str(out)]).stdout
    assert "1 failed" in status and "corrupt_chunk.h5ad" in status
    # a re-run retries the failed unit only, and it fails again the same way; done parts are untouched
    before = {p: r["files"] for p, r in state.done.items()}
    again = run(args)
    assert again.returncode == 3 and error in again.stdout
    assert {p: r["files"] for p, r in load_state(out).done.items()} == before
    assert torch.load(checkpoint, weights_only=True)["hyper_parameters"]["expr_emb_style"] == "continuous"
