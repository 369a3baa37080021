"""Two-process CPU DDP (gloo): same cells and numbers as one process, each unit written by one rank."""

import signal
import sys

import numpy as np
import pandas as pd
from conftest import cells_and_outputs, interrupt, predict_args, run

from pipeline.atlas import validate

DDP = ["trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2", "trainer.precision=32-true"]


def assert_matches_reference(out, reference):
    assert validate(out) == []
    state, cells, dropped, embs, top3 = cells_and_outputs(out)
    _, ref_cells, ref_dropped, ref_embs, ref_top3 = reference
    pd.testing.assert_frame_equal(cells, ref_cells)
    assert len(dropped) == len(ref_dropped)
    np.testing.assert_allclose(embs, ref_embs, atol=1e-5)
    np.testing.assert_array_equal(top3, ref_top3)
    return state


def test_two_cpu_processes_give_the_single_process_atlas(tmp_path, reference):
    out = tmp_path / "atlas"
    proc = run(predict_args(out, extra=DDP))
    assert proc.returncode == 0, proc.stderr[-3000:]
    state = assert_matches_reference(out, reference)
    ranks = {r["rank"] for r in state.done.values()}
    assert ranks == {0, 1}
    for part, record in state.done.items():  # each unit written once, by the rank in its file names
        files = sorted(p.name for p in out.glob(f"step_0__predict_part_{part}_*"))
        assert len(files) == 5 and all(f.startswith(f"step_0__predict_part_{part}_{record['rank']}_") for f in files)
    cells_by_rank = {
        r: sum(x["n_cells"] + x["n_dropped"] for x in state.done.values() if x["rank"] == r) for r in ranks
    }
    assert abs(cells_by_rank[0] - cells_by_rank[1]) <= 100  # balanced by cells (units of at most 100 cells)
    status = run([sys.executable, "-m", "pipeline", "status", str(out)]).stdout
    assert "rank    0" in status and "rank    1" in status


def test_a_single_process_run_resumes_on_two_processes(tmp_path, reference):
    out = tmp_path / "atlas"
    code, _, stderr = interrupt(predict_args(out), out, signal.SIGTERM, n_done=3)
    assert code == 75, stderr[-2000:]
    proc = run(predict_args(out, extra=DDP))
    assert proc.returncode == 0, proc.stderr[-3000:]
    state = assert_matches_reference(out, reference)
    assert {r["rank"] for r in state.done.values()} == {0, 1}
