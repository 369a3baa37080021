"""``scatlas bench`` end to end, at small sizes: every section is measured and written."""

import json
import sys

import numpy as np
import pytest

from pipeline.tools import bench


def test_bench_prints_and_writes_every_figure(tmp_path, capsys):
    out = tmp_path / "bench.json"
    code = bench.main(["--forward-models", "tiny", "--max-len", "64", "--large-cells", "3000", "--seconds", "0.5",
                       "--work-dir", str(tmp_path / "work"), "--json", str(out)])  # fmt: skip
    assert code == 0
    report = json.loads(out.read_text())
    printed = capsys.readouterr().out
    # data path: every shipped dataset, all cells tokenized, rates measured
    names = {r["dataset"] for r in report["data_path"]}
    assert names == {p.name for p in bench.shared_datasets()} and len(names) == 6
    for row in report["data_path"]:
        assert row["cells"] > 0 and row["tokenize_cells_per_s"] > 0 and row["tokenize_warm_cells_per_s"] > 0
        assert row["dataset"] in printed
    # streaming a tiled file of real cells in a fresh process, with its peak memory
    (stream,) = report["streaming"]
    assert stream["cells"] == 3000 and 100 < stream["peak_rss_mib"] < 4096
    # forward: FLOPs from the config, MFU against a measured peak
    (forward,) = report["forward"]
    assert forward["model"] == "tiny" and forward["cells_per_s"] > 0
    assert abs(forward["flop_per_s"] / (forward["cells_per_s"] * forward["flops_per_cell"]) - 1) < 1e-3
    assert 0 < forward["mfu"] < 1.5
    # end to end: scatlas predict on the 10,000 mouse-brain cells, next to the forward alone on the same batches
    e2e = report["end_to_end"]
    assert e2e["exit_code"] == 0 and e2e["cells_embedded"] == 9_909  # 91 cells fail QC (min_genes 10)
    assert e2e["workers"] == 0  # data.num_workers=auto on a CPU run: tokenized in the predict process
    assert 0 < e2e["predict_loop_cells_per_s"] and 0 < e2e["forward_same_batches_cells_per_s"]
    assert e2e["overall_cells_per_s"] < e2e["predict_loop_cells_per_s"]
    assert 100 < e2e["peak_rss_mib"] < 4096  # measured in the fresh process that ran it
    # the forward alone ran on the very cells the run embedded, and its rates are those of its stored timings
    n, (before, after) = e2e["forward_cells"], e2e["forward_before_after_s"]
    assert n == e2e["cells_embedded"] and 0 < before and 0 < after
    assert e2e["forward_same_batches_cells_per_s"] == round(2 * n / (before + after), 1)
    assert e2e["forward_before_after_cells_per_s"] == [round(n / before, 1), round(n / after, 1)]
    assert "end-to-end predict" in printed and "figures written to" in printed


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="VmHWM and ru_maxrss inheritance are Linux's")
def test_peak_memory_of_a_fresh_process_does_not_count_its_large_parent():
    """ru_maxrss of a process started from a large one begins at the parent's size; the bench must not report that."""
    parent = np.ones(1500 * 2**20 // 8)  # 1.5 GiB, written, in this process
    child = bench.in_fresh_process('{"ru_maxrss_mib": __import__("resource").getrusage(0).ru_maxrss / 1024}')
    assert child["ru_maxrss_mib"] > 1500  # what the old figure would have been
    assert child["peak_rss_mib"] < 1000  # python, torch and lightning imported: about 500 MiB
    del parent
