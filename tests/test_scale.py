"""``scatlas bench --scale`` at tiny sizes: every figure is measured, sane and consistent with the atlas it made."""

from pipeline.atlas.reader import open_atlas
from pipeline.atlas.state import validate
from pipeline.tools.scale import print_scale_report, scale_bench


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
        for key in ("status_s", "validate_s", "validate_quick_s", "summarize_s", "open_atlas_s", "to_anndata_s"):
            assert row[key] > 0
        assert 100 < row["predict_peak_rss_mib"] < 4096
        assert open_atlas(tmp_path / f"atlas_{n}", progress=False).n_cells == row["n_cells"]
    assert large["marginal_overhead_per_unit_s"] * 2 == large["marginal_overhead_per_dataset_s"]
    (growth,) = report["growth"]
    assert growth["from"] == 3 and growth["to"] == 6 and all(isinstance(v, float) for v in growth.values())
    planned = report["planned"]
    assert planned["n_parts"] == 12 and planned["validate_quick_problems"] == 0 and planned["status_s"] > 0
    # the planned atlas's parts are copies of one real part: a full validate finds their rows are not the plan's
    assert any("not exactly rows" in p or "another dataset" in p for p in validate(tmp_path / "planned"))
    assert {t["target"].split(" ")[0] for t in report["targets"]} >= {"main-process", "every", "status", "quick"}
    assert all(isinstance(t["met"], bool) for t in report["targets"])
    print_scale_report(report)
    printed = capsys.readouterr().out
    assert "growth exponent 3 -> 6 datasets" in printed and "planned atlas, 8 datasets / 12 units" in printed
