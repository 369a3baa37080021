"""End to end: `scatlas predict` on the six real datasets, as a user runs it."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import anndata
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch
from conftest import PBMC, TRAINER, cells_and_outputs, predict_args, run

from models import load_checkpoint
from models.checkpoint import file_sha256
from models.presets import DEMO_CHECKPOINT
from pipeline.atlas import load_state, manifest, read_part, validate
from pipeline.run.cpu import FP32_MATMUL_RTOL, fp32_matmul_probe
from pipeline.run.datamodule import resolve_num_workers
from pipeline.run.module import AtlasPredictor

DATA = Path(__file__).parent / "data"
DATASETS = sorted(DATA.glob("*.h5ad"))
HEART = DATA / "cxg_schema5_human_heart_fixture_320x136.h5ad"
BMMC = DATA / "neurips2021_human_bmmc_cite_rna_600x1000.h5ad"
MOUSE_BRAIN = DATA / "tenx_mouse_brain_e18_10000x1000.h5ad"


def scatlas(*args, cwd=None, check=True):
    """Run the installed command line exactly as a user would."""
    trainer = TRAINER if args[0] == "predict" else []  # SCATLAS_TEST_TRAINER (conftest)
    proc = subprocess.run(
        [sys.executable, "-m", "pipeline", *map(str, args), *trainer], capture_output=True, text=True, cwd=cwd,
        env={**os.environ, "OMP_NUM_THREADS": "2"},
    )  # fmt: skip
    if check and proc.returncode != 0:
        raise AssertionError(f"scatlas {args} exited {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def all_parts(out_dir):
    state = load_state(out_dir)
    return state, {part: read_part(out_dir, record) for part, record in state.done.items()}


@pytest.fixture(scope="session")
def atlas_all(tmp_path_factory):
    out = tmp_path_factory.mktemp("atlas") / "all"
    proc = scatlas(
        "predict",
        f"input={DATA}",
        f"out_dir={out}",
        "data.num_workers=1",
        "data.cells_per_unit=4000",
        "model.max_len=128",
    )
    return out, proc


def test_all_six_datasets_give_a_valid_complete_atlas(atlas_all):
    out, proc = atlas_all
    assert "units done 8/8" in proc.stdout
    assert validate(out) == []
    check = scatlas("validate", out)
    assert "valid: 8 parts" in check.stdout
    state, parts = all_parts(out)
    description = json.loads((out / "atlas.json").read_text())
    config = load_checkpoint(DEMO_CHECKPOINT).config  # model=tiny is the shipped demo checkpoint
    width, n_top = sum(w for _, w in config.embedding_blocks), sum(config.topk.values())
    assert description["model"]["checkpoint_sha256"] == file_sha256(DEMO_CHECKPOINT)
    assert description["embedding_width"] == width and description["top_columns"] == n_top
    assert [b["name"] for b in description["embedding_blocks"]] == ["other", *config.classes]
    assert description["labels"]["organism_ontology_term_id"] == {"0": "NCBITaxon:9606", "1": "NCBITaxon:10090"}
    datasets = pd.read_parquet(out / "datasets.parquet")
    assert list(datasets.status) == ["done"] * 6
    assert [Path(p).name for p in datasets.path] == [p.name for p in DATASETS]
    for part in parts.values():
        n = len(part["cells"])
        assert part["embs"].shape == (n, width) and part["top3"].shape == part["scores"].shape == (n, n_top)
        assert np.isfinite(part["embs"]).all() and ((part["scores"] >= 0) & (part["scores"] <= 1)).all()
        assert part["top3"].min() >= 0
    # every input cell exactly once, embedded or dropped, and mapped back to its source row and name
    for row in datasets.itertuples():
        adata = anndata.read_h5ad(row.path, backed="r")
        assert row.n_cells == adata.n_obs
        cells = pd.concat([p["cells"] for p in parts.values() if (p["cells"].dataset == row.dataset).any()])
        dropped = pd.concat([p["dropped"] for p in parts.values()])
        dropped = dropped[dropped.dataset == row.dataset]
        rows = np.concatenate([cells.row, dropped.row])
        assert np.array_equal(np.sort(rows), np.arange(adata.n_obs)), row.path
        assert (cells.obs_name.to_numpy() == adata.obs_names[cells.row.to_numpy()]).all()
        assert (dropped.obs_name.to_numpy() == adata.obs_names[dropped.row.to_numpy()]).all()
        assert row.n_embedded == len(cells) and row.n_dropped == len(dropped)
    bmmc = datasets.set_index("dataset").loc[datasets.path.str.endswith(BMMC.name).to_numpy().nonzero()[0][0]]
    assert bmmc.counts_location == "layers/counts"


def test_zero_count_cell_and_heart_organism_edge_cases_are_dropped_with_reasons(atlas_all):
    out, _ = atlas_all
    state, parts = all_parts(out)
    dropped = pd.concat([p["dropped"] for p in parts.values()])
    datasets = pd.read_parquet(out / "datasets.parquet").set_index("path")
    brain = datasets.loc[str(MOUSE_BRAIN), "dataset"]
    adata = anndata.read_h5ad(MOUSE_BRAIN)
    zero = np.flatnonzero(np.asarray(adata.X.sum(1)).ravel() == 0)
    assert len(zero) == 1
    brain_dropped = dropped[dropped.dataset == brain].set_index("row")
    assert brain_dropped.loc[zero[0], "reason"] == "no_counts"
    heart = datasets.loc[str(HEART), "dataset"]
    heart_dropped = dropped[dropped.dataset == heart].set_index("obs_name")
    assert (
        heart_dropped.loc["CTACTATCATGTGACT-1-H0025_LV-0", "reason"] == "organism_mismatch"
    )  # mouse cell, human genes
    assert heart_dropped.loc["CAGAGCCGTTCCTAAG-1-H0026_LV_V3-0", "reason"] == "organism_unsupported"  # macaque
    heart_cells = pd.concat([p["cells"] for p in parts.values()])
    heart_cells = heart_cells[heart_cells.dataset == heart].set_index("obs_name")
    for name in ("AAACCCAGTTTCGTTT-1-H0025_LV-0", "TTACCGCTCGTGACTA-1-H0026_LV_V3-0", "GTCTAGATCCTCTTTC-1-H0025_LV-0"):
        assert name in heart_cells.index or heart_dropped.loc[name, "reason"] in ("min_genes", "min_counts")
    assert set(heart_cells.organism) == {"NCBITaxon:9606"}
    assert set(dropped.reason) <= {"no_counts", "min_counts", "min_genes", "no_vocabulary_genes",
                                   "organism_mismatch", "organism_unsupported"}  # fmt: skip


def test_validate_catches_deleted_and_truncated_part_files(atlas_all, tmp_path):
    out, _ = atlas_all
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    state = load_state(copy)
    first, second = sorted(state.done.values(), key=lambda r: r["part"])[:2]
    (copy / f"{first['stem']}_scores.npz").unlink()
    path = copy / f"{second['stem']}_embs.npz"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    problems = validate(copy)
    assert any(f"part {first['part']}: missing files" in p for p in problems)
    assert any(f"part {second['part']}: files changed" in p for p in problems)
    proc = scatlas("validate", copy, check=False)
    assert proc.returncode == 1 and "INVALID" in proc.stdout


def test_outputs_of_a_cell_do_not_depend_on_units_or_batches(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    scatlas("predict", f"input={BMMC}", f"out_dir={a}", "data.num_workers=0")
    scatlas("predict", f"input={BMMC}", f"out_dir={b}", "data.num_workers=0", "data.cells_per_unit=250",
            "data.batch_size=17")  # fmt: skip
    _, parts_a = all_parts(a)
    _, parts_b = all_parts(b)
    assert len(parts_a) == 1 and len(parts_b) == 3

    def by_row(parts, key):
        cells = np.concatenate([p["cells"].row for p in parts.values()])
        values = np.concatenate([p[key] for p in parts.values()])
        return values[np.argsort(cells)]

    np.testing.assert_allclose(by_row(parts_a, "embs"), by_row(parts_b, "embs"), atol=1e-5)
    np.testing.assert_array_equal(by_row(parts_a, "top3"), by_row(parts_b, "top3"))
    # the embeddings carry the data: cells of one annotated type are closer than cells of different types
    adata = anndata.read_h5ad(BMMC)
    embs = by_row(parts_a, "embs")
    labels = adata.obs.cell_type.to_numpy()
    dist = np.linalg.norm(embs[:, None] - embs[None], axis=-1)
    same = labels[:, None] == labels[None]
    assert dist[same & ~np.eye(len(labels), dtype=bool)].mean() < 0.9 * dist[~same].mean()


def test_resume_skips_done_units_and_keeps_part_ids(tmp_path):
    out = tmp_path / "atlas"
    scatlas("predict", f"input={BMMC}", f"out_dir={out}", "data.num_workers=0", "data.cells_per_unit=200")
    first = load_state(out)
    digests = {p: r["files"] for p, r in first.done.items()}
    again = scatlas("predict", f"input={BMMC}", f"out_dir={out}", "data.num_workers=0", "data.cells_per_unit=200")
    assert again.stdout.splitlines() == [f"atlas {out} is complete, nothing to do: 600 cells embedded (run 0, 3 units)"]
    assert "DataLoader" not in again.stderr
    assert {p: r["files"] for p, r in load_state(out).done.items()} == digests
    changed = scatlas("predict", f"input={BMMC}", f"out_dir={out}", "model.max_len=128", check=False)
    assert changed.returncode == 2 and "other settings (max_len)" in changed.stderr


def test_bad_dataset_is_recorded_and_the_others_are_embedded(tmp_path):
    logged = tmp_path / "lognorm.h5ad"
    adata = anndata.read_h5ad(DATA / "neurips2021_mouse_spleen_lymphnode_cite_rna_340x992.h5ad")
    adata.X = np.log1p(adata.X.toarray())
    adata.write_h5ad(logged)
    out = tmp_path / "atlas"
    proc = scatlas("predict", f"input=[{logged},{BMMC},{tmp_path / 'missing.h5ad'}]", f"out_dir={out}",
                   "data.num_workers=0", check=False)  # fmt: skip
    assert proc.returncode == 3, proc.stderr[-2000:]
    datasets = pd.read_parquet(out / "datasets.parquet")
    assert list(datasets.status) == ["failed", "done", "failed"]
    assert "lognorm.h5ad" in datasets.error[0] and "log" in datasets.error[0]
    assert "missing.h5ad" in datasets.error[2] and "does not exist" in datasets.error[2]
    assert validate(out) == []
    status = scatlas("status", out).stdout
    assert "1/3 done, 2 failed" in status and "lognorm.h5ad" in status


def test_validate_catches_duplicated_and_missing_cells_even_with_matching_checksums(atlas_all, tmp_path):
    out, _ = atlas_all
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    state = load_state(copy)
    record = min(state.done.values(), key=lambda r: r["part"])
    cells_path = copy / f"{record['stem']}_cells.parquet"
    cells = pd.read_parquet(cells_path)
    cells.loc[1, "row"] = cells.loc[0, "row"]  # one cell twice, another missing
    cells.to_parquet(cells_path, index=False)
    record["files"][cells_path.name] = file_sha256(cells_path)  # a consistent-looking marker
    manifest.mark_done(copy, state.run, record)
    problems = validate(copy)
    assert any(f"part {record['part']}: cells embedded + dropped" in p for p in problems), problems
    embs_path = copy / f"{record['stem']}_embs.npz"
    with np.load(embs_path) as npz:
        np.savez(embs_path.with_suffix(".tmp.npz"), embs=npz["embs"][:-1])
    embs_path.with_suffix(".tmp.npz").replace(embs_path)
    record["files"][embs_path.name] = file_sha256(embs_path)
    manifest.mark_done(copy, state.run, record)
    assert any(f"part {record['part']}: row counts disagree" in p for p in validate(copy))


PAGE_FAULTS = """
import resource, sys
import numpy as np
from pipeline.run.cpu import keep_freed_memory
if sys.argv[1] == "keep":
    assert keep_freed_memory()
faults = []
for _ in range(4):  # what a CPU forward does batch after batch: a large activation written, then freed
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    block = np.ones(100 * 2**20 // 8)
    del block
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(faults)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc settings")
def test_predict_processes_reuse_freed_large_blocks_instead_of_faulting_them_in_again():
    def faults(mode):
        proc = subprocess.run([sys.executable, "-c", PAGE_FAULTS, mode], capture_output=True, text=True, check=True)
        return json.loads(proc.stdout)

    kept, default = faults("keep"), faults("default")
    # glibc's default unmaps a freed 100 MiB block, so each new one faults in again (at least its 50 huge pages)
    assert min(default) >= 40, default
    # kept: the first block faults in once, later ones reuse its pages
    assert kept[0] >= 40 and max(kept[1:]) < 10, kept


def test_fp32_matmul_probe_tells_fp32_exact_products_from_one_bf16_pass():
    previous = torch.backends.mkldnn.matmul.fp32_precision
    torch.backends.mkldnn.matmul.fp32_precision = "ieee"
    try:
        # fp32 instructions at the small model's shapes: about 1e-6 from float64, well inside the tolerance
        error, seconds = fp32_matmul_probe(256, 4, 3200)
        assert error < FP32_MATMUL_RTOL / 4 and seconds > 0
        # the same probe with its inputs rounded once to bf16 (autocast), as kernels with one bf16 pass compute it
        with torch.autocast("cpu", dtype=torch.bfloat16):
            rounded, _ = fp32_matmul_probe(256, 4, 3200)
        assert rounded > 100 * FP32_MATMUL_RTOL
    finally:
        torch.backends.mkldnn.matmul.fp32_precision = previous


@pytest.mark.parametrize("name", ["tiny", "small"])
def test_predictor_uses_bf16_units_for_fp32_matmuls_only_as_measured_and_puts_the_setting_back(name):
    predictor = AtlasPredictor(name, max_len=256)
    previous = torch.backends.mkldnn.matmul.fp32_precision
    predictor.on_predict_start()
    chosen = torch.backends.mkldnn.matmul.fp32_precision
    if chosen == "bf16":  # kept only where it is as exact as fp32: measured again under the setting
        assert (
            fp32_matmul_probe(predictor.model.config.d_model, predictor.model.config.nhead, 256)[0] <= FP32_MATMUL_RTOL
        )
    else:
        assert chosen == previous
    predictor.on_predict_end()
    assert torch.backends.mkldnn.matmul.fp32_precision == previous


def test_num_workers_auto_tokenizes_in_the_predict_process_on_cpu_and_in_two_workers_with_a_gpu():
    assert resolve_num_workers("auto", "cpu") == 0
    assert resolve_num_workers("auto", "cuda") == 2
    assert resolve_num_workers(3, "cpu") == 3 and resolve_num_workers(0, "cuda") == 0
    for bad in (-1, "two", 1.5, True):
        with pytest.raises(ValueError, match="data.num_workers must be auto or a number of processes >= 0"):
            resolve_num_workers(bad, "cpu")


def test_atlas_files_get_the_permissions_of_any_file_the_user_creates(atlas_all):
    """Written through temp files (mkstemp: 0600) and renamed, yet readable by whom the umask allows."""
    out, _ = atlas_all
    umask = os.umask(0)
    os.umask(umask)
    files = [p for p in out.rglob("*") if p.is_file() and "logs" not in p.parts]
    assert len(files) > 20 and any(p.parent.name == "neighbors" for p in files)
    modes = {p.relative_to(out).as_posix(): p.stat().st_mode & 0o777 for p in files}
    assert set(modes.values()) == {0o666 & ~umask}, modes


def test_a_large_dense_file_is_embedded_from_a_sparse_copy_as_its_sparse_twin_is(tmp_path):
    """1,000 real PBMC cells (16.7M dense values): copied to CSR once, embedded exactly as the same cells stored
    sparse, and the copy removed when the dataset is done."""
    cells = anndata.read_h5ad(PBMC)
    cells = anndata.concat([cells] * 5, index_unique="-")
    dense, sparse = tmp_path / "dense.h5ad", tmp_path / "sparse.h5ad"
    cells.write_h5ad(dense)
    cells.X = sp.csr_matrix(cells.X)
    cells.write_h5ad(sparse)
    runs = {}
    for name, path in (("dense", dense), ("sparse", sparse)):
        out = tmp_path / f"atlas_{name}"
        proc = run(predict_args(out, [path]), check=True)
        assert ("writing a sparse copy of its 1000 cells" in proc.stdout + proc.stderr) == (name == "dense")
        assert not list((out / "neighbors").glob("*.counts.h5")) and (out / "neighbors" / "dataset_0.npz").is_file()
        assert validate(out) == []
        runs[name] = cells_and_outputs(out)
    (_, dense_cells, _, dense_embs, dense_top3), (_, sparse_cells, _, sparse_embs, sparse_top3) = runs.values()
    assert len(dense_cells) == 1000
    pd.testing.assert_frame_equal(dense_cells, sparse_cells)
    np.testing.assert_allclose(dense_embs, sparse_embs, atol=1e-5)  # each run picks its own fp32 matmul units
    np.testing.assert_array_equal(dense_top3, sparse_top3)
