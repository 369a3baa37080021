"""``scatlas bench --scale`` at tiny sizes: every figure is measured, sane and consistent with the atlas it made."""

import subprocess
import sys

import pytest

from pipeline.atlas.reader import open_atlas
from pipeline.atlas.state import validate
from pipeline.tools.scale import planned_atlas, print_scale_report, scale_bench


def test_scale_bench_measures_every_figure(tmp_path, capsys):
    report = scale_bench([3, 6], tmp_path, cells=30, cells_per_unit=15, planned=(8, 12), fresh_process=False)
    small, large = report["sizes"]
    for row, n in ((small, 3), (large, 6)):
        assert row["datasets"] == n and row["units"] == 2 * n and row["cells"] == 30 * n
        assert row["exit_code"] == 0
        assert 0 < row["forward_s"] < row["predict_s"] and 0 < row["first_forward_s"] < row["predict_s"]
        assert row["noop_resume_batches"] == 0 and row["noop_resume_s"] > 0  # nothing embedded again
        assert row["validate_problems"] == 0 and row["validate_quick_problems"] == 0
        assert row["n_parts"] == 2 * n and row["to_anndata_cells"] == row["n_cells"] > 0.9 * 30 * n
        timed = ("status_s", "validate_s", "validate_quick_s", "summarize_s", "open_atlas_s", "to_anndata_s", "merge_s")
        for key in timed:
            assert row[key] > 0
        assert row["merge_parts"] == row["n_parts"] and not (tmp_path / f"atlas_{n}_merged").exists()
        assert 100 < row["predict_peak_rss_mib"] < 24 * 1024  # the machine's memory: measured, not a target
        assert open_atlas(tmp_path / f"atlas_{n}", progress=False).n_cells == row["n_cells"]
    assert large["marginal_overhead_per_unit_s"] * 2 == pytest.approx(large["marginal_overhead_per_dataset_s"])
    (growth,) = report["growth"]
    assert growth["from"] == 3 and growth["to"] == 6
    assert all(isinstance(v, float) and abs(v) < 20 for k, v in growth.items() if k not in ("from", "to"))
    planned = report["planned"]
    assert planned["n_parts"] == 12 and planned["validate_quick_problems"] == 0 and planned["status_s"] > 0
    # the planned atlas's parts are copies of one real part: a full validate finds their rows are not the plan's
    assert any("not exactly rows" in p or "another dataset" in p for p in validate(tmp_path / "planned"))
    assert {t["target"].split(" ")[0] for t in report["targets"]} >= {"main-process", "every", "status", "quick"}
    assert all(isinstance(t["met"], bool) for t in report["targets"])
    print_scale_report(report)
    printed = capsys.readouterr().out
    assert "growth exponent 3 -> 6 datasets" in printed and "planned atlas, 8 datasets / 12 units" in printed
    # every array of 150 parts read into one AnnData under a limit of 100 open files (a part's file is not kept
    # mapped once read: the 10,000-dataset atlas of the benchmark hit a 20,000-file limit that way)
    many = planned_atlas(tmp_path / "atlas_3", tmp_path / "many", 100, 150)
    read_all = (
        "import resource, sys; resource.setrlimit(resource.RLIMIT_NOFILE, (100, resource.getrlimit("
        "resource.RLIMIT_NOFILE)[1])); from pipeline.atlas.reader import open_atlas; "
        "a = open_atlas(sys.argv[1], progress=False).to_anndata(); print(a.n_obs, a.obsm['X_scprint2'].shape[1])"
    )
    proc = subprocess.run([sys.executable, "-c", read_all, str(many)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    source = open_atlas(tmp_path / "atlas_3", progress=False)
    n_part_cells = source.parts["n_cells"].iloc[0]
    assert proc.stdout.split() == [str(150 * n_part_cells), str(source.embedding_width)]


def test_neighbors_step_then_predict_reads_line_logs_and_resumes_without_opening_done_files(tmp_path):
    """``scatlas neighbors`` builds the graphs a later predict only loads; predict's log reads line by line;
    the marker index agrees with the markers; a resume of a finished atlas does not open its inputs."""
    import os
    import shutil
    import sys

    from conftest import HEART, SPLEEN, predict_args, run

    from pipeline.atlas import layout, load_state
    from pipeline.atlas.manifest import done_parts
    from pipeline.io.files import read_json, write_json

    inputs = [tmp_path / "spleen.h5ad", tmp_path / "heart.h5ad"]
    for source, copy in zip((SPLEEN, HEART), inputs):
        shutil.copyfile(source, copy)
    out = tmp_path / "atlas"
    args = predict_args(out, inputs)
    proc = run([sys.executable, "-m", "pipeline", "neighbors", *args[4:]])
    assert proc.returncode == 0, proc.stderr[-3000:]
    graphs = [layout.neighbors_path(out, d) for d in (0, 1)]
    built = [g.stat().st_mtime_ns for g in graphs]
    assert "task 0/1: 2 graphs ready, 0 failed" in proc.stdout

    proc = run(args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert [g.stat().st_mtime_ns for g in graphs] == built  # loaded, not built again
    logged = proc.stdout + proc.stderr  # pipes: lines, no bar
    assert "Predicting DataLoader" not in logged and "rank 0: 660 of 660 rows done, 658 cells embedded" in logged
    assert validate(out) == [] and validate(out, quick=True) == []

    state = load_state(out)
    markers = sorted(layout.run_dir(out, 0).glob("part_*.done.json"))
    assert len(markers) == len(state.units) == len(state.done)
    assert {read_json(m)["part"]: read_json(m) for m in markers} == state.done
    assert layout.marker_index_path(out, 0, "done").is_file()
    record = read_json(markers[0])  # a marker rewritten after the index: its new record is read, not the index's
    write_json(markers[0], {**record, "seconds": 123.0})
    assert done_parts(out, 0)[record["part"]]["seconds"] == 123.0

    # a finished dataset whose file keeps its size and modification time is not opened on resume: junk of the
    # same size in its place goes unread (a file whose size or time changed is opened and checked: test_faults)
    stat = inputs[0].stat()
    inputs[0].write_bytes(b"\0" * stat.st_size)
    os.utime(inputs[0], ns=(stat.st_atime_ns, stat.st_mtime_ns))
    proc = run(args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "is complete, nothing to do: 658 cells embedded" in proc.stdout and validate(out) == []


def test_a_neighbors_array_task_opens_its_own_datasets_only(tmp_path):
    """Task k of n builds the graphs of datasets k, k + n, ... and opens no other input: a file cut short is
    reported by its own task, and the other task never reads it."""
    import os

    from conftest import HEART, SPLEEN, predict_args

    from pipeline.atlas import layout

    cut = tmp_path / "cut.h5ad"
    cut.write_bytes(SPLEEN.read_bytes()[:5000])
    out = tmp_path / "atlas"
    args = predict_args(out, [SPLEEN, cut, HEART])

    def task(k: int) -> subprocess.CompletedProcess:
        env = {**os.environ, "OMP_NUM_THREADS": "1", "SLURM_ARRAY_TASK_ID": str(k), "SLURM_ARRAY_TASK_COUNT": "2"}
        command = [sys.executable, "-m", "pipeline", "neighbors", *args[4:]]
        return subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)

    first = task(0)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "task 0/2: 2 graphs ready, 0 failed" in first.stdout
    assert str(cut) not in first.stdout + first.stderr  # dataset 1 is task 1's: not opened here
    assert [layout.neighbors_path(out, d).is_file() for d in (0, 1, 2)] == [True, False, True]
    second = task(1)
    assert second.returncode == 3 and "task 1/2: 0 graphs ready, 1 failed" in second.stdout
    assert f"{cut}: is a truncated or corrupt HDF5 file" in second.stdout + second.stderr
    assert not layout.neighbors_path(out, 1).exists()
