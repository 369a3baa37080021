"""Files as other projects write them: a cell's outputs whatever its dataset's place in the inputs, multi-genome
and probe-level 10x h5, an atlas whose datasets failed, and the messages of files that cannot be embedded.

The 10x files are written from the real matrices of tests/data, as tests/test_formats.py does.
"""

import json
import sys

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from conftest import BMMC, PBMC, SPLEEN, cells_and_outputs, predict_args, run
from test_formats import tenx_features, write_10x_h5

from models import build_model
from pipeline.io.formats import open_counts
from pipeline.io.matrix import DatasetError
from pipeline.plan.datasets import dataset_identity, plan_dataset

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")
PLAN_SETTINGS = {"counts": "auto", "organism": None, "min_gene_coverage": 0.002}


def predict(out, inputs, *extra):
    proc = run(predict_args(out, inputs, extra))
    return proc, cells_and_outputs(out) if (out / "atlas.json").exists() else None


def outputs_of(atlas, path):
    """Rows, embeddings and top labels of the cells of ``path`` in an atlas, in row order."""
    state, cells, _, embs, top3 = atlas
    dataset = state.datasets.dataset[state.datasets.path == str(path)].item()
    mine = (cells.dataset == dataset).to_numpy()
    return cells.row[mine].to_numpy(), embs[mine], top3[mine]


def test_a_cells_outputs_do_not_depend_on_where_its_dataset_is_in_the_inputs(tmp_path):
    failing = tmp_path / "missing.h5ad"
    runs = {
        "alone": [BMMC],
        "after another": [SPLEEN, BMMC],
        "after a failing one": [failing, BMMC],
        "reversed": [BMMC, SPLEEN],
    }
    atlases = {}
    for name, inputs in runs.items():
        proc, atlases[name] = predict(tmp_path / name.replace(" ", "_"), inputs)
        assert proc.returncode == (3 if failing in inputs else 0), proc.stderr[-3000:]
    rows, embs, top3 = outputs_of(atlases["alone"], BMMC)
    assert len(rows) == 600
    for name in runs:
        other_rows, other_embs, other_top3 = outputs_of(atlases[name], BMMC)
        np.testing.assert_array_equal(other_rows, rows)
        np.testing.assert_array_equal(other_top3, top3, err_msg=name)
        # fp32 matmuls may run on the bf16 units in one run and not another (~1e-6); another gene draw moves >1e-2
        np.testing.assert_allclose(other_embs, embs, atol=1e-4, err_msg=name)
    spleen = [outputs_of(atlases[name], SPLEEN) for name in ("after another", "reversed")]
    np.testing.assert_allclose(spleen[0][1], spleen[1][1], atol=1e-4)
    np.testing.assert_array_equal(spleen[0][2], spleen[1][2])
    # the identity that seeds the draw is recorded: a fingerprint of the counts, the same in every run
    identities = {name: atlas[0].datasets.set_index("path").identity.to_dict() for name, atlas in atlases.items()}
    assert {ids[str(BMMC)] for ids in identities.values()} == {identities["alone"][str(BMMC)]}
    assert identities["alone"][str(BMMC)].startswith("counts:")
    assert identities["after another"][str(SPLEEN)] != identities["alone"][str(BMMC)]


def test_the_identity_is_the_catalogs_dataset_id_else_the_same_for_the_same_counts_in_any_format(tmp_path):
    pbmc = ad.read_h5ad(PBMC)
    write_10x_h5(tmp_path / "pbmc.h5", pbmc.obs_names, tenx_features(pbmc).iloc[: pbmc.n_vars], pbmc.X)
    with open_counts(PBMC) as h5ad_matrix, open_counts(tmp_path / "pbmc.h5") as tenx_matrix, open_counts(BMMC) as other:
        assert dataset_identity(h5ad_matrix) == dataset_identity(tenx_matrix)
        assert dataset_identity(tenx_matrix, "pbmc_10k") == "dataset_id:pbmc_10k"
        assert dataset_identity(other) != dataset_identity(h5ad_matrix)


def write_10x_v2_h5(path, genomes):
    """A Cell Ranger 1/2 filtered_gene_bc_matrices_h5.h5: one group per genome, each CSC genes x barcodes. A
    multi-genome reference prefixes every gene id and name with its genome (``hg19_ENSG...``), as Cell Ranger does."""
    with h5py.File(path, "w") as h5_file:
        for genome, (barcodes, ids, names, counts) in genomes.items():
            counts = sp.csr_matrix(counts).astype(np.int32)
            prefix = f"{genome}_" if len(genomes) > 1 else ""
            group = h5_file.create_group(genome)
            group["data"], group["indices"], group["indptr"] = (
                counts.data,
                counts.indices.astype(np.int64),
                counts.indptr,
            )
            group["shape"] = np.array([counts.shape[1], counts.shape[0]], dtype=np.int32)
            group["barcodes"] = np.array(barcodes, dtype="S")
            group["genes"] = np.array([prefix + str(i) for i in ids], dtype="S")
            group["gene_names"] = np.array([prefix + str(n) for n in names], dtype="S")


@pytest.fixture(scope="module")
def barnyard(tmp_path_factory):
    """A human + mouse barnyard run: the same 200 barcodes, PBMC's counts on hg19 genes, the spleen's on mm10's."""
    pbmc, spleen = ad.read_h5ad(PBMC), ad.read_h5ad(SPLEEN)[:200]
    features = tenx_features(pbmc).iloc[: pbmc.n_vars]
    path = tmp_path_factory.mktemp("barnyard") / "filtered_gene_bc_matrices_h5.h5"
    write_10x_v2_h5(path, {
        "hg19": (pbmc.obs_names, features.id, features.name, pbmc.X),
        "mm10": (pbmc.obs_names, spleen.var["gene_ids"] if "gene_ids" in spleen.var else spleen.var_names,
                 spleen.var_names, spleen.layers["counts"] if "counts" in spleen.layers else spleen.X),
    })  # fmt: skip
    return path


def test_a_multi_genome_h5_is_read_as_one_dataset_per_genome(barnyard, tmp_path):
    proc, atlas = predict(tmp_path / "atlas", [barnyard, BMMC])
    assert proc.returncode == 0, proc.stderr[-3000:]
    datasets = atlas[0].datasets
    assert datasets.path.tolist() == [str(barnyard), str(barnyard), str(BMMC)]
    assert datasets.counts_location[:2].tolist() == ["hg19", "mm10"]
    assert datasets.organism[:2].tolist() == ["NCBITaxon:9606", "NCBITaxon:10090"]
    assert datasets.status.tolist() == ["done"] * 3 and datasets.n_embedded[:2].sum() > 300
    assert datasets.n_vocab_genes[0] > 10_000 and datasets.n_vocab_genes[1] > 900  # genome prefixes removed
    # the human genome's cells are PBMC's cells: the same counts give the same outputs as from PBMC's h5ad
    _, reference = predict(tmp_path / "pbmc", [PBMC])
    rows, embs, top3 = outputs_of(reference, PBMC)
    mine = (atlas[1].dataset == 0).to_numpy()
    np.testing.assert_array_equal(atlas[1].row[mine], rows)
    np.testing.assert_allclose(atlas[3][mine], embs, atol=1e-4)
    np.testing.assert_array_equal(atlas[4][mine], top3)
    # one genome by name; a genome the file does not have is refused naming the ones it has
    proc, atlas = predict(tmp_path / "mouse", [barnyard], "data.counts=mm10")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert atlas[0].datasets.counts_location.tolist() == ["mm10"]
    with pytest.raises(DatasetError, match="no genome 'GRCh38'.*genomes hg19, mm10"):
        open_counts(barnyard, counts="GRCh38")
    with pytest.raises(DatasetError, match="multi-genome 10x HDF5 file .genomes hg19, mm10.*data.counts=<genome>"):
        open_counts(barnyard)


def test_a_probe_level_h5_is_read_per_gene_with_its_probes_summed(tmp_path):
    """Visium / Flex raw_probe_bc_matrix.h5: features/id is ``ENSG...|SYMBOL|probe``, features/gene_id the gene."""
    pbmc = ad.read_h5ad(PBMC)
    features = tenx_features(pbmc).iloc[: pbmc.n_vars]
    unique = ~features.id.duplicated(keep=False).to_numpy()  # a gene-level file names each gene once
    features, counts = features[unique].reset_index(drop=True), sp.csc_matrix(pbmc.X)[:, unique].astype(np.int64)
    write_10x_h5(tmp_path / "genes.h5", pbmc.obs_names, features, counts)
    # every other gene has two probes, which share its counts
    split = np.arange(len(features)) % 2 == 0
    half = counts[:, split].multiply(0.5).floor()
    probe_counts = sp.hstack([counts[:, ~split], half, counts[:, split] - half]).tocsr()
    order = np.r_[np.flatnonzero(~split), np.flatnonzero(split), np.flatnonzero(split)]
    probes = features.iloc[order].reset_index(drop=True)
    probes["gene_id"] = probes.id
    probes["id"] = [f"{gene}|{name}|{i:08x}" for i, (gene, name) in enumerate(zip(probes.gene_id, probes.name))]
    path = tmp_path / "raw_probe_bc_matrix.h5"
    write_10x_h5(path, pbmc.obs_names, probes, probe_counts)
    with h5py.File(path, "a") as h5_file:
        h5_file["matrix/features/gene_id"] = probes.gene_id.to_numpy(dtype="S")
    with open_counts(path) as probe_level, open_counts(tmp_path / "genes.h5") as gene_level:
        assert probe_level.n_genes == gene_level.n_genes == len(features) < len(probes)
        assert sorted(probe_level.var.index) == sorted(gene_level.var.index)
        position = pd.Index(probe_level.var.index).get_indexer(gene_level.var.index)
        summed = probe_level.read_rows(0, probe_level.n_cells)[:, position]
        assert (summed != gene_level.read_rows(0, gene_level.n_cells)).nnz == 0
        assert any("probes summed into" in warning for warning in probe_level.warnings)
    plan = plan_dataset(0, str(path), build_model("tiny").config.genes, PLAN_SETTINGS)
    assert plan.status == "pending" and plan.gene_organism == "NCBITaxon:9606" and plan.n_vocab_genes > 10_000


def lognormalised_with_old_raw(path):
    """A processed file as anndata < 0.7 wrote them (scanpy's tutorials): X and a top-level raw.X, both log1p."""
    spleen = ad.read_h5ad(SPLEEN)
    spleen.X = sp.csr_matrix(np.log1p(spleen.X.toarray()))
    spleen.raw = spleen
    spleen.write_h5ad(path)
    with h5py.File(path, "a") as h5_file:
        h5_file.move("raw/X", "raw.X")
        h5_file.move("raw/var", "raw.var")
        del h5_file["raw"]
    return path


def test_validate_exits_3_naming_datasets_that_failed_and_1_only_when_inconsistent(tmp_path):
    bad = lognormalised_with_old_raw(tmp_path / "processed.h5ad")
    out = tmp_path / "atlas"
    proc = run(predict_args(out, [bad]))
    assert proc.returncode == 3, proc.stderr[-3000:]
    check = run([sys.executable, "-m", "pipeline", "validate", str(out)])
    assert check.returncode == 3, check.stdout
    assert (
        f"incomplete: dataset 0 failed and is not in the atlas: {bad}: raw.X holds non-integer values" in check.stdout
    )
    assert "consistent but INCOMPLETE: 1 of 1 datasets" in check.stdout and "valid:" not in check.stdout
    (out / "datasets.parquet").unlink()  # an atlas that cannot be read at all is still reported, not "valid"
    assert run([sys.executable, "-m", "pipeline", "validate", str(out)]).returncode not in (0, 3)


def test_messages_say_what_the_file_covers_and_what_it_would_need(tmp_path):
    few_genes = tmp_path / "panel.h5ad"
    ad.read_h5ad(BMMC)[:, :14].copy().write_h5ad(few_genes)
    config = build_model("tiny").config
    plan = plan_dataset(0, str(few_genes), config.genes, PLAN_SETTINGS)
    n_human = len(config.genes["NCBITaxon:9606"])
    assert plan.status == "failed"
    n = plan.n_vocab_genes
    assert 0 < n <= 14
    assert f"{n} of its 14 genes are in the model vocabulary: they cover {n / n_human:.2%} of the model's {n_human} " \
        f"NCBITaxon:9606 genes, and at least {int(np.ceil(0.002 * n_human))} (0.20%, data.min_gene_coverage) are " \
        "needed" in plan.error  # fmt: skip


def test_a_zarr_v3_store_the_installed_anndata_cannot_read_is_refused_in_one_short_line(tmp_path):
    store = tmp_path / "spleen.zarr"
    with ad.settings.override(zarr_write_format=3):
        ad.read_h5ad(SPLEEN).write_zarr(store)
    root = json.loads((store / "zarr.json").read_text())  # a data type of a newer zarr, in the consolidated metadata
    root["consolidated_metadata"]["metadata"]["obs/_index"]["data_type"] = {
        "name": "fixed_length_utf32_v9", "configuration": {"length_bytes": 64, "endianness": "little"}}  # fmt: skip
    (store / "zarr.json").write_text(json.dumps(root))
    with pytest.raises(DatasetError) as refusal:
        open_counts(store)
    message = str(refusal.value)
    assert message.startswith(f"{store}: is a zarr format 3 store that the installed anndata ")
    assert "pip install -U anndata zarr, or write it as h5ad" in message and "\n" not in message
    assert len(message) < 300 + len(str(store))


def test_raw_x_that_is_log_data_too_is_named_as_not_counts(tmp_path):
    with pytest.raises(
        DatasetError, match=r"raw.X holds non-integer values .*looks log-normalised; X holds"
    ) as refusal:
        open_counts(lognormalised_with_old_raw(tmp_path / "processed.h5ad"))
    assert "no layers['counts'];" in str(refusal.value) and "raw.X;" not in str(refusal.value)


def test_the_command_ends_with_its_exit_code_after_joining_threads_and_running_exit_handlers(tmp_path):
    """What `scatlas` does after a command: join the threads it started, run Python's exit handlers, os._exit(code)
    (tests/stress_predict.py runs whole predicts many times, in a row and two at once, to check the codes)."""
    script = (
        "import atexit, sys, threading, time\n"
        "from pipeline import cli\n"
        "atexit.register(lambda: print('exit handlers ran', flush=True))\n"
        "worker = threading.Thread(target=lambda: (time.sleep(0.5), print('thread joined', flush=True)))\n"
        "worker.start()\n"
        f"sys.argv = ['scatlas', 'validate', {str(tmp_path)!r}]\n"
        "cli.run()\n"
        "print('never here')\n"
    )
    proc = run([sys.executable, "-c", script])
    assert proc.returncode == 2, proc.stderr  # not an atlas directory: the one-line error of a bad argument
    assert "is not an atlas directory" in proc.stderr
    assert proc.stdout.splitlines() == ["thread joined", "exit handlers ran"]
