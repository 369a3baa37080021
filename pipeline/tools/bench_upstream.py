"""``scatlas bench --compare-upstream``: our forward and upstream scPRINT-2's, side by side.

Both run in the same run, at the same shape, with the same weights (a checkpoint
written by upstream ``scprint2`` and loaded by :func:`models.load_checkpoint`), on
the same inputs (real cells tokenized by the pipeline) and with the same number
of CPU threads. Upstream runs in its own virtual environment
(``tests/upstream/install.sh``) through ``pipeline/tools/upstream_forward.py``; its
outputs with attention dropout 0 must equal ours, so both do the same work.
"""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from importlib import resources
from pathlib import Path

import numpy as np
import torch

from models import load_checkpoint
from models.presets import demo_vocabulary
from pipeline import DATA_DIR
from pipeline.run.cpu import fast_fp32_matmul, keep_freed_memory
from pipeline.tokens.batches import TOKEN_ARRAYS
from pipeline.tools.inputs import plan_files, predict_config, prepare, whole_file_batches
from pipeline.tools.upstream_forward import SMALL_SHAPE

REPO = Path(__file__).resolve().parents[2]  # the checkout: upstream is installed under its .cache/
UPSTREAM_VENV = REPO / ".cache" / "upstream-venv"
INSTALL_SCRIPT = REPO / "tests" / "upstream" / "install.sh"
UPSTREAM_SCRIPT = Path(__file__).with_name("upstream_forward.py")
GENES_TABLE = Path(str(resources.files("models").joinpath("data/tiny_genes.tsv.gz")))  # what demo_vocabulary reads
HUMAN = "NCBITaxon:9606"
# Human cells to tokenize, first found wins: a near-full transcriptome (tests/data), else the bundled demo.
INPUT_DATASETS = (
    REPO / "tests" / "data" / "tenx_human_pbmc10k_protein_v3_200x16727.h5ad",
    DATA_DIR / "neurips2021_human_bmmc_cite_rna_600x1000.h5ad",
)
ATOL = 1e-4  # fp32: both sides do the same math in a different order


def find_upstream_python(python: str | Path | None = None) -> Path:
    """The python of the upstream virtual environment; installs it with ``tests/upstream/install.sh`` if absent.

    Raises
    ------
    FileNotFoundError
        ``python`` (or the default venv) does not exist and there is no install script to make it.
    """
    if python is not None:
        if not Path(python).is_file():
            raise FileNotFoundError(f"{python}: no such upstream python")
        return Path(python)
    python = UPSTREAM_VENV / "bin" / "python"
    if INSTALL_SCRIPT.is_file():  # a checkout: the script returns at once when the environment is complete, and
        # waits for another process installing it (a parallel test worker): a python alone may be half installed
        if not python.is_file():
            print(f"installing upstream scprint2 into {UPSTREAM_VENV} (tests/upstream/install.sh, about a minute)")
        subprocess.run(["bash", str(INSTALL_SCRIPT), str(UPSTREAM_VENV)], check=True)
    elif not python.is_file():
        raise FileNotFoundError(
            f"{python}: upstream scPRINT-2 is not installed; run tests/upstream/install.sh from a "
            "checkout of this repository (or pass the python of an environment with scprint2 1.0.3)"
        )
    return python


def real_inputs(genes: list[str], max_len: int, batch_size: int, work_dir: Path) -> tuple[dict, str]:
    """The first ``batch_size`` cells of a shipped human dataset, as the pipeline feeds them to the model.

    Returns the arrays ``upstream_forward.py`` reads (genes, counts, knn_counts,
    knn_dists, depth) and the dataset's file name.
    """
    path = next(p for p in INPUT_DATASETS if p.is_file())
    cfg = predict_config("tiny", [f"model.max_len={max_len}"])  # the data settings of a predict run
    plans = plan_files([path], {HUMAN: genes}, cfg)
    prepare(plans, cfg, work_dir)
    batches = whole_file_batches(plans, {HUMAN: 0}, cfg, work_dir, batch_size=batch_size)
    batch = batches[0]
    if batch["error"]:
        raise RuntimeError(batch["error"])
    inputs = {k: batch[k] for k in TOKEN_ARRAYS}
    inputs["depth"] = batch["cells"]["n_counts"].astype(np.float32)
    return inputs, path.name


def _forward(model, args: list[torch.Tensor]) -> dict:
    with torch.inference_mode():  # thread-local: entered by each thread that runs a forward
        return model(*args)


def forward_side_by_side(model, args: list[torch.Tensor], pool: ThreadPoolExecutor, shards: int) -> dict:
    """The batch's cells in ``shards`` parts, each part's forward on a thread of ``pool``; outputs joined."""
    parts = list(pool.map(lambda part: _forward(model, list(part)), zip(*(a.tensor_split(shards) for a in args))))
    logits = {c: torch.cat([p["logits"][c] for p in parts]) for c in parts[0]["logits"]}
    return {"embs": torch.cat([p["embs"] for p in parts]), "logits": logits}


def time_forward(model, inputs: dict, threads: int, cell_parallel: bool, warmup: int = 1, repeats: int = 2):
    """Seconds of each of ``repeats`` forwards of the batch after ``warmup`` untimed ones, and the last outputs.

    With ``cell_parallel``, the cells of the batch are split into ``threads``
    parts that run side by side, each in its own Python thread on one intra-op
    thread (torch releases the GIL inside its ops); otherwise one forward runs
    with its ops split over ``threads`` intra-op threads, as upstream does. On a
    CPU the first is faster: the threads never wait for each other inside an op.
    """
    args = [torch.from_numpy(inputs[k]) for k in ("genes", "counts", "knn_counts", "knn_dists")]
    shards = min(threads, len(args[0])) if cell_parallel else 1
    previous = torch.get_num_threads()
    torch.set_num_threads(max(1, threads // shards))
    try:
        with ThreadPoolExecutor(shards) as pool:
            for _ in range(warmup):
                forward_side_by_side(model, args, pool, shards)
            seconds = []
            for _ in range(repeats):
                start = time.perf_counter()
                out = forward_side_by_side(model, args, pool, shards)
                seconds.append(time.perf_counter() - start)
    finally:
        torch.set_num_threads(previous)
    return seconds, out


def max_abs_diff(out: dict, reference: dict) -> float:
    """Largest difference of the embeddings and logits from upstream's (``upstream_outputs.npz``)."""
    diffs = [np.abs(out["embs"].numpy() - reference["embs"]).max()]
    diffs += [np.abs(logits.numpy() - reference[f"logits_{c}"]).max() for c, logits in out["logits"].items()]
    return float(max(diffs))


def compare_upstream(
    max_len: int = 3200,
    batch_size: int = 2,
    repeats: int = 2,
    threads: int = 2,
    upstream_python: str | Path | None = None,
    work_dir: str | Path | None = None,
    shape: dict | None = None,
) -> dict:
    """Time our forward and upstream's on the same checkpoint, inputs and threads; check equal outputs.

    Parameters
    ----------
    max_len, batch_size
        Gene tokens per cell and cells per forward.
    repeats
        Timed forwards per side and way of running, after one untimed warm-up.
    threads
        CPU threads on both sides.
    upstream_python
        Python of an environment with upstream scprint2 1.0.3; default
        ``<repo>/.cache/upstream-venv/bin/python``, installed if missing.
    work_dir
        Where the checkpoint, inputs and upstream outputs go (a temporary folder if None).
    shape
        Overrides of the base_v3 sizes (``d_model``, ``nlayers``, ... see
        ``upstream_forward.SMALL_SHAPE``); default the published small model.

    Returns
    -------
    dict with

    - ``shape``, ``threads``, ``inputs`` (the dataset the cells come from), ``upstream`` (versions);
    - ``cells_per_s_ours``: our forward with the batch's cells run side by side,
      one per thread (see :func:`time_forward`); ``cells_per_s_ours_one_forward``:
      one forward with its ops split over the threads, as upstream runs;
    - ``cells_per_s_upstream`` (attention dropout 0: equal outputs) and
      ``cells_per_s_upstream_shipped`` (its shipped attention dropout, applied in
      eval: stochastic outputs, ``upstream_shipped_max_abs_diff`` away);
    - ``fp32_matmul``: the fp32 matmul precision ours ran with (``bf16`` where
      :func:`pipeline.run.cpu.fast_fp32_matmul` found bf16 units as exact and faster, else ``ieee``);
    - ``cells_per_s_upstream_our_settings``: upstream (dropout 0) again, with the process settings ours
      runs with (:func:`pipeline.run.cpu.keep_freed_memory` and that fp32 matmul precision), and
      ``upstream_our_settings_max_abs_diff``, how far that moved upstream's outputs;
    - ``ratio`` = ours / upstream, ``ratio_one_forward``, ``ratio_shipped`` (ours / upstream as shipped),
      ``ratio_our_settings`` (ours / upstream with the same process settings);
    - ``max_abs_diff`` (embeddings and logits, both ways of running ours), ``flops_per_cell``;
    - the seconds of every timed batch, and the 1-minute load average before the run and at its end
      (which counts this run itself): other processes on the CPU skew every figure.

    Raises
    ------
    RuntimeError
        Upstream failed, or the outputs differ by more than 1e-4.
    """
    python = find_upstream_python(upstream_python)
    keep_freed_memory()  # as scatlas predict runs
    dims = {**SMALL_SHAPE, **(shape or {})}
    fp32_matmul = "bf16" if fast_fp32_matmul(dims["d_model"], dims["nhead"], max_len) else "ieee"
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(work_dir) if work_dir is not None else Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        genes = demo_vocabulary()[HUMAN]
        inputs, dataset = real_inputs(genes, max_len, batch_size, work)
        np.savez(work / "inputs.npz", **inputs)
        command = [
            str(python), str(UPSTREAM_SCRIPT), str(work), "--genes", str(GENES_TABLE), "--organism", HUMAN,
            "--inputs", str(work / "inputs.npz"), "--shape", json.dumps(shape or {}), "--threads", str(threads),
            "--warmup", "1", "--repeats", str(repeats), "--fp32-matmul", fp32_matmul,
        ]  # fmt: skip
        env = {**os.environ, "PYTHONWARNINGS": "ignore"}
        proc = subprocess.run(command, check=False, capture_output=True, text=True, env=env)
        if proc.returncode != 0:
            tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-30:])
            raise RuntimeError(f"{UPSTREAM_SCRIPT.name} failed (exit {proc.returncode}):\n{tail}")
        upstream = json.loads((work / "upstream_timing.json").read_text())
        with np.load(work / "upstream_outputs.npz") as saved:
            reference = dict(saved)
        model = load_checkpoint(work / "upstream.ckpt")
        if model.config.vocabulary != genes:
            raise RuntimeError(f"{work / 'upstream.ckpt'}: its vocabulary is not the human genes of {GENES_TABLE}")
    one_forward, out = time_forward(model, inputs, threads, cell_parallel=False, repeats=repeats)
    diff = max_abs_diff(out, reference)
    side_by_side, out = time_forward(model, inputs, threads, cell_parallel=True, repeats=repeats)
    diff = max(diff, max_abs_diff(out, reference))
    if not diff <= ATOL:
        raise RuntimeError(f"our outputs differ from upstream's (attention dropout 0) by {diff:.3g} > {ATOL}")

    def rate(seconds: list[float]) -> float:
        return batch_size * len(seconds) / sum(seconds)

    shape = {**upstream["shape"], "max_len": max_len, "batch_size": batch_size}
    shape.update(neighbors=upstream["neighbors"], n_genes=upstream["n_genes"])
    ours, theirs, shipped = rate(side_by_side), rate(upstream["seconds_dropout0"]), rate(upstream["seconds_shipped"])
    same_settings = rate(upstream["seconds_dropout0_our_settings"])
    return {
        "shape": shape,
        "threads": threads,
        "inputs": dataset,
        "upstream": f"scprint2 {upstream['scprint2']}, torch {upstream['torch']}",
        "cells_per_s_ours": ours,
        "cells_per_s_ours_one_forward": rate(one_forward),
        "cells_per_s_upstream": theirs,
        "cells_per_s_upstream_shipped": shipped,
        "upstream_shipped_dropout": upstream["shipped_dropout"],
        "upstream_shipped_max_abs_diff": upstream["shipped_vs_dropout0_max_abs_diff"],
        "fp32_matmul": fp32_matmul,
        "cells_per_s_upstream_our_settings": same_settings,
        "upstream_our_settings_max_abs_diff": upstream["our_settings_vs_dropout0_max_abs_diff"],
        "ratio": ours / theirs,
        "ratio_our_settings": ours / same_settings,
        "ratio_one_forward": rate(one_forward) / theirs,
        "ratio_shipped": ours / shipped,
        "max_abs_diff": diff,
        "flops_per_cell": model.config.flops_per_cell(max_len, upstream["neighbors"]),
        "seconds_ours": side_by_side,
        "seconds_ours_one_forward": one_forward,
        "seconds_upstream": upstream["seconds_dropout0"],
        "seconds_upstream_shipped": upstream["seconds_shipped"],
        "seconds_upstream_our_settings": upstream["seconds_dropout0_our_settings"],
        "load_average": [round(load_before[0], 2), round(os.getloadavg()[0], 2)],
    }
