"""Shared helpers: run `scatlas` as a user would, on copies of the real datasets in tests/data."""

import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from pipeline.atlas import load_state, read_part

DATA = Path(__file__).parent / "data"
HEART = DATA / "cxg_schema5_human_heart_fixture_320x136.h5ad"
CD4T = DATA / "cxg_schema7_human_cd4t_perturbseq_500x2000.h5ad"
BMMC = DATA / "neurips2021_human_bmmc_cite_rna_600x1000.h5ad"
SPLEEN = DATA / "neurips2021_mouse_spleen_lymphnode_cite_rna_340x992.h5ad"
PBMC = DATA / "tenx_human_pbmc10k_protein_v3_200x16727.h5ad"
BRAIN = DATA / "tenx_mouse_brain_e18_10000x1000.h5ad"
SMALL = [BMMC, SPLEEN, HEART, PBMC]
FAST = ["data.num_workers=0", "data.cells_per_unit=100", "data.batch_size=50", "model.max_len=64"]
#: the trainer preset of the predicts the tests start (predict_args, test_pipeline's scatlas): SCATLAS_TEST_TRAINER=gpu
#: runs them on a GPU in bf16, as slurm/gpu_check.sh does; unset, each run takes the default (cpu, fp32)
TRAINER = [f"trainer={os.environ['SCATLAS_TEST_TRAINER']}"] if os.environ.get("SCATLAS_TEST_TRAINER") else []


def predict_args(out, inputs=SMALL, extra=()):
    return [sys.executable, "-m", "pipeline", "predict", f"input=[{','.join(map(str, inputs))}]", f"out_dir={out}",
            *FAST, *TRAINER, *extra]  # fmt: skip


def run(args, **kwargs):
    return subprocess.run(args, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, **kwargs)


def interrupt(args, out, sig, n_done):
    """Start ``args`` (a predict into ``out``), send ``sig`` to its process group once ``n_done`` parts are done."""
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, env={**os.environ, "OMP_NUM_THREADS": "1"})  # fmt: skip
    markers = Path(out) / "manifest" / "run_0"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if len(list(markers.glob("part_*.done.json"))) >= n_done:
            os.killpg(proc.pid, sig)
            break
        time.sleep(0.02)
    stdout, stderr = proc.communicate(timeout=300)
    return proc.returncode, stdout, stderr


def cells_and_outputs(out):
    state = load_state(out)
    parts = [read_part(out, r) for r in state.done.values()]
    cells = pd.concat([p["cells"] for p in parts], ignore_index=True)
    dropped = pd.concat([p["dropped"] for p in parts], ignore_index=True)
    embs = np.concatenate([p["embs"] for p in parts])
    top3 = np.concatenate([p["top3"] for p in parts])
    order = np.lexsort((cells.row, cells.dataset))
    return state, cells.iloc[order].reset_index(drop=True), dropped, embs[order], top3[order]


@pytest.fixture(scope="session")
def reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("reference") / "atlas"
    proc = run(predict_args(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return cells_and_outputs(out)


def scprint1_style_config():
    """A small scPRINT-1 style network over the tiny preset's genes and classes: no cell transformer (class
    tokens prepended to the genes), continuous expression encoder (no neighbours), no compressors."""
    from models import ScPrint2Config
    from models.presets import preset_config

    base = preset_config("tiny")
    return ScPrint2Config(
        genes=base.genes, organisms=base.organisms, classes=base.classes, label_decoders=base.label_decoders,
        d_model=32, nhead=4, num_heads_kv=4, nlayers=2, cell_specific_blocks=False, expr_emb_style="continuous",
        expr_encoder_layers=2, normalization="sum", finetune_gene_emb=False, layers_cls=[16],
        compress_class_dim=None, has_pos_encoder=False,
    )  # fmt: skip


README = Path(__file__).resolve().parents[1] / "README.md"


def readme_submissions() -> list[dict]:
    """The ``sbatch ... slurm/*.sbatch`` commands of the README's bash blocks, parsed.

    Each is ``{"variables": {NAME: value}, "options": [sbatch options], "script": name, "args": [after it]}``;
    the SLURM tests submit exactly these options and variable names (with their own values).
    """
    import re
    import shlex

    found = []
    for block in re.findall(r"```bash\n(.*?)```", README.read_text(), flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            tokens = shlex.split(line, comments=True)
            if "sbatch" not in tokens:
                continue
            at = tokens.index("sbatch")
            script = next(k for k, t in enumerate(tokens) if t.endswith(".sbatch"))
            found.append({
                "variables": dict(t.split("=", 1) for t in tokens[:at]),
                "options": tokens[at + 1:script],
                "script": Path(tokens[script]).name,
                "args": tokens[script + 1:],
            })  # fmt: skip
    return found
