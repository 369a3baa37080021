"""`scatlas merge`: the shard atlases of a job array (slurm/predict_array.sbatch) read as one atlas."""

import errno
import json
import os
import shutil

import numpy as np
import pandas as pd
import pytest
from conftest import HEART, PBMC, SPLEEN, predict_args, run

from pipeline.atlas import load_state, open_atlas, read_part
from pipeline.atlas.layout import part_file
from pipeline.cli import main

#: As the array script cuts a catalog: shard 0 gets two inputs, shard 1 one; each numbers its datasets from 0.
SHARD_INPUTS = {0: [HEART, PBMC], 1: [SPLEEN]}
SETTINGS = ["model.max_len=64", "data.num_workers=0", "data.cells_per_unit=150"]


@pytest.fixture(scope="module")
def array_dir(tmp_path_factory):
    """OUT_DIR of a two-task array: shard_0 (heart 320 cells, 2 dropped; PBMC 200) and shard_1 (spleen 340)."""
    out = tmp_path_factory.mktemp("array")
    for shard, inputs in SHARD_INPUTS.items():
        proc = run(predict_args(out / f"shard_{shard}", inputs)[:6] + SETTINGS)
        assert proc.returncode == 0, proc.stderr[-3000:]
    (out / "array_tasks.txt").write_text("2\n")
    return out


@pytest.fixture(scope="module")
def merged(array_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("merged") / "atlas"
    # shards given out of order: shard_<i> directories are merged in the order of i
    proc = run([*predict_args(out)[:3], "merge", str(out), str(array_dir / "shard_1"), str(array_dir / "shard_0")])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "merged 2 shards (0, 1)" in proc.stdout
    assert "3 datasets, 8 parts, 858 cells embedded, 2 dropped" in proc.stdout
    assert "24 hard links" in proc.stdout
    return out


def shard_parts(shard_dir):
    """The done parts of a shard atlas, read whole, in part order."""
    state = load_state(shard_dir)
    return [read_part(shard_dir, state.done[p]) for p in sorted(state.done)]


def test_every_source_cell_is_in_the_merged_atlas_once_with_the_shards_arrays(array_dir, merged):
    atlas = open_atlas(merged, progress=False)
    parts = [part for shard in SHARD_INPUTS for part in shard_parts(array_dir / f"shard_{shard}")]
    # atlas rows: shard 0's parts in order, then shard 1's, with the very numbers the shards wrote
    for kind in ("embs", "top3", "scores"):
        expected = np.concatenate([p[kind] for p in parts])
        got = np.concatenate([np.asarray(atlas.array(p, kind)) for p in atlas.parts["part"]])
        assert np.array_equal(got, expected), kind
    assert np.array_equal(atlas.embedding(), np.concatenate([p["embs"] for p in parts]))
    cells = atlas.cells()
    shard_cells = pd.concat([p["cells"] for p in parts], ignore_index=True)
    assert np.array_equal(cells["row"], shard_cells["row"]) and list(cells["obs_name"]) == list(shard_cells["obs_name"])
    assert np.array_equal(cells["shard_dataset"], shard_cells["dataset"])
    assert cells.groupby("shard").size().to_dict() == {0: 318 + 200, 1: 340}

    # datasets: shard 0's first, renumbered into one space, each with its shard, id there and source
    datasets = atlas.datasets.set_index("dataset")
    assert datasets["shard"].to_dict() == {0: 0, 1: 0, 2: 1}
    assert datasets["shard_dataset"].to_dict() == {0: 0, 1: 1, 2: 0}
    assert list(datasets["path"]) == [os.path.abspath(p) for p in [HEART, PBMC, SPLEEN]]
    assert set(datasets["shard_dir"]) == {str((array_dir / f"shard_{i}").resolve()) for i in SHARD_INPUTS}

    # every (source path, row), embedded or dropped, exactly once: all rows of the three inputs
    dropped = pd.concat([read_part(merged, r)["dropped"] for r in load_state(merged).done.values()])
    both = pd.concat([cells[["dataset", "row"]], dropped[["dataset", "row"]]], ignore_index=True)
    both["path"] = both["dataset"].map(datasets["path"])
    assert not both.duplicated(["path", "row"]).any()
    assert both.groupby("path").size().to_dict() == {os.path.abspath(HEART): 320, os.path.abspath(PBMC): 200,
                                                     os.path.abspath(SPLEEN): 340}  # fmt: skip
    assert set(dropped["shard"]) == {0} and len(dropped) == 2

    # the arrays are the shards' files (hard links), not copies
    first = load_state(merged).done[0]
    shard_first = load_state(array_dir / "shard_0").done[0]
    assert os.path.samefile(merged / part_file(first["stem"], "embs"), array_dir / "shard_0" / part_file(
        shard_first["stem"], "embs"))  # fmt: skip

    adata = atlas.to_anndata()
    assert adata.n_obs == 858 and adata.obsm["X_scprint2"].shape == (858, atlas.embedding_width)
    assert (adata.obs["shard"].to_numpy() == cells["shard"].to_numpy()).all()


def test_status_and_full_validate_pass_on_the_merged_atlas(merged, capsys):
    assert main(["validate", str(merged)]) == 0
    assert main(["status", str(merged)]) == 0
    out = capsys.readouterr().out
    assert f"{merged}: valid: 8 parts, 858 cells embedded, 2 dropped" in out
    assert "units     8/8 done, 0 pending" in out and "datasets  3/3 done, 0 failed" in out
    description = json.loads((merged / "atlas.json").read_text())
    assert [(s["shard"], s["first_dataset"], s["n_datasets"], s["first_part"], s["n_parts"])
            for s in description["shards"]] == [(0, 0, 2, 0, 5), (1, 2, 1, 5, 3)]  # fmt: skip


def test_the_array_out_dir_stands_for_its_shards_and_symlinks_replace_hard_links_across_file_systems(
    array_dir, tmp_path, monkeypatch, capsys
):
    def no_hard_link(source, target):
        raise OSError(errno.EXDEV, "Invalid cross-device link", str(source))

    monkeypatch.setattr("pipeline.atlas.merge.os.link", no_hard_link)
    (tmp_path / "merged").mkdir()  # an empty directory is fine
    assert main(["merge", str(tmp_path / "merged"), str(array_dir)]) == 0
    assert "0 hard links, 24 symbolic links" in capsys.readouterr().out
    assert (tmp_path / "merged" / "step_0__predict_part_7_0_embs.npz").is_symlink()
    assert main(["validate", str(tmp_path / "merged")]) == 0
    assert open_atlas(tmp_path / "merged", progress=False).n_cells == 858


def refusal(capsys, *argv):
    code = main(["merge", *map(str, argv)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    return err


def test_merge_refuses_unfinished_shards_other_settings_shared_inputs_and_a_used_out(array_dir, tmp_path, capsys):
    shard_0, shard_1 = array_dir / "shard_0", array_dir / "shard_1"
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "x").write_text("")
    assert "used exists and is not an empty directory" in refusal(capsys, tmp_path / "used", shard_0, shard_1)

    unfinished = tmp_path / "shard_2"
    shutil.copytree(shard_1, unfinished)
    (unfinished / "manifest" / "run_0" / "part_1.done.json").unlink()
    (unfinished / "manifest" / "run_0" / "done_index.json").unlink()
    err = refusal(capsys, tmp_path / "out", shard_0, unfinished)
    assert f"shard {unfinished} is not finished: 1 of 3 parts still to do; see scatlas status {unfinished}" in err

    other = tmp_path / "other"
    shutil.copytree(shard_1, other)
    description = json.loads((other / "atlas.json").read_text())
    description["runs"][-1]["settings"]["max_len"] = 256
    (other / "atlas.json").write_text(json.dumps(description))
    assert "(max_len); merge only shards of one model" in refusal(capsys, tmp_path / "out", shard_0, other)

    again = tmp_path / "again"
    shutil.copytree(shard_1, again)
    shared = refusal(capsys, tmp_path / "out", shard_1, again)
    assert f"{os.path.abspath(SPLEEN)} is in both {shard_1} and {again}" in shared
    assert "is not an atlas directory" in refusal(capsys, tmp_path / "out", shard_0, tmp_path / "used")
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.merge-*"))


def test_a_failed_dataset_of_a_shard_stays_failed_in_the_merged_atlas(array_dir, tmp_path, capsys):
    shard = tmp_path / "shard_2"
    missing = tmp_path / "gone.h5ad"
    proc = run(predict_args(shard, [PBMC, missing])[:6] + SETTINGS)
    assert proc.returncode == 3, proc.stderr[-3000:]
    assert main(["merge", str(tmp_path / "merged"), str(array_dir / "shard_1"), str(shard)]) == 0
    datasets = open_atlas(tmp_path / "merged", progress=False).datasets
    assert list(datasets["status"]) == ["done", "done", "failed"] and list(datasets["shard"]) == [1, 2, 2]
    capsys.readouterr()
    assert main(["validate", str(tmp_path / "merged")]) == 3  # consistent, incomplete: as the shard itself
    out = capsys.readouterr().out
    assert f"incomplete: dataset 2 failed and is not in the atlas: {missing}" in out
    assert "consistent but INCOMPLETE: 1 of 3 datasets" in out


def test_a_merge_on_a_terminal_shows_its_progress_and_a_log_gets_no_bar(array_dir, tmp_path):
    """Merging 34,000 parts takes minutes: on a terminal each shard's parts get a bar; piped to a log, none."""
    import shlex
    import subprocess

    command = [*predict_args(tmp_path)[:3], "merge"]
    on_terminal = " ".join(map(shlex.quote, [*command, str(tmp_path / "seen"), str(array_dir)]))
    proc = subprocess.run(["script", "-qec", on_terminal, "/dev/null"], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "COLUMNS": "120", "TERM": "xterm"})  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert "shard 0: linking 5 parts" in proc.stdout and "shard 1: linking 3 parts" in proc.stdout
    logged = run([*command, str(tmp_path / "logged"), str(array_dir)])
    assert logged.returncode == 0 and "linking" not in logged.stdout + logged.stderr
