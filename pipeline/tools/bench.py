"""``scatlas bench``: figures for the data path, memory, the forward pass and end-to-end predict.

Prints a table and writes the same figures as JSON. Nothing here asserts a
speed: targets are compared in the README's performance section.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

from configs import compose_predict
from models import build_model
from pipeline import DATA_DIR
from pipeline.atlas.state import load_state
from pipeline.run.cpu import fast_fp32_matmul, fp32_matmul_precision, keep_freed_memory
from pipeline.run.datamodule import resolve_num_workers
from pipeline.run.predict import run_predict
from pipeline.tokens.batches import batch_tensors
from pipeline.tools.inputs import plan_files, predict_config, prepare, whole_file_batches
from pipeline.tools.process import in_fresh_process, peak_rss_mib

REPO_DATA = Path(__file__).resolve().parents[2] / "tests" / "data"  # in a checkout
PACKAGE_DATA = DATA_DIR
TILE_SOURCE = "tenx_mouse_brain_e18_10000x1000.h5ad"
DEMO = "neurips2021_human_bmmc_cite_rna_600x1000.h5ad"
#: --precision -> autocast dtype of the timed forward (none: fp32), and the same for Lightning in end-to-end
AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "16": torch.float16}
TRAINER_PRECISION = {"bf16": "bf16-mixed", "16": "16-mixed", "32": "32-true"}
#: what `scatlas bench` measures, in order (--only picks some)
SECTIONS = ("data_path", "streaming", "forward", "end_to_end")
# dense bf16 peak FLOP/s of common accelerators, for MFU (vendor figures, without sparsity)
GPU_PEAK_BF16 = {"H100 SXM": 989e12, "H100 PCIe": 756e12, "H100": 989e12, "H200": 989e12, "A100": 312e12,
                 "L40S": 362e12, "A10": 125e12, "V100": 125e12}  # fmt: skip


def shared_datasets() -> list[Path]:
    """The datasets the repository ships (tests/data in a checkout, else the bundled demo)."""
    found = sorted(REPO_DATA.glob("*.h5ad")) if REPO_DATA.is_dir() else []
    return found or sorted(PACKAGE_DATA.glob("*.h5ad"))


# ----------------------------------------------------------------------------- data path


def data_path(path: Path, model, max_len: int, batch_size: int, work_dir: Path, dataset: int = 0) -> dict:
    """Read + QC + gene mapping + neighbours + tokenization of every cell of one file, in this process."""
    config = model.config
    cfg = predict_config("tiny", [f"model.max_len={max_len}"])  # the data settings of every model, at this max_len
    try:
        (plan,) = plan_files([path], config.genes, cfg, first_id=dataset)
    except ValueError as err:
        return {"dataset": path.name, "error": str(err)}
    uses_neighbors = config.expr_emb_style == "metacell"
    t0 = time.perf_counter()
    if uses_neighbors:  # as the data module's setup does, once per dataset
        prepare([plan], cfg, work_dir)
    t1 = time.perf_counter()
    batches = whole_file_batches(
        [plan], config.organism_offsets, cfg, work_dir if uses_neighbors else None, batch_size=batch_size
    )
    seconds = []
    for _ in range(2):  # the first pass opens the dataset (and holds it, when small); the second is steady state
        start = time.perf_counter()
        for i in range(len(batches)):
            item = batches[i]
            if item["error"]:
                raise RuntimeError(item["error"])
        seconds.append(time.perf_counter() - start)
        if plan.n_cells >= 100_000:  # large files: one pass is steady state already
            break
    return {
        "dataset": path.name,
        "cells": plan.n_cells,
        "neighbors_s": round(t1 - t0, 3),
        "tokenize_cells_per_s": round(plan.n_cells / seconds[0], 1),
        "tokenize_warm_cells_per_s": round(plan.n_cells / seconds[-1], 1),
        "cells_per_s": round(plan.n_cells / (seconds[0] + t1 - t0), 1),
    }


def tile_dataset(n_cells: int, path: Path) -> Path:
    """A file of ``n_cells`` real mouse-brain cells (the 10,000 shipped ones, repeated), written once."""
    import anndata
    import scipy.sparse as sp

    if path.exists():
        return path
    source = anndata.read_h5ad(REPO_DATA / TILE_SOURCE if REPO_DATA.is_dir() else PACKAGE_DATA / TILE_SOURCE)
    X = sp.csr_matrix(source.X)
    reps = -(-n_cells // X.shape[0])
    tiled = sp.vstack([X] * reps, format="csr")[:n_cells]
    adata = anndata.AnnData(X=tiled, var=source.var)
    adata.obs_names = [f"cell{i}" for i in range(n_cells)]
    path.parent.mkdir(parents=True, exist_ok=True)
    adata.write_h5ad(path.with_suffix(".tmp.h5ad"))
    path.with_suffix(".tmp.h5ad").rename(path)
    return path


def streaming_peak_rss(path: Path, model_name: str, max_len: int, batch_size: int, work_dir: Path) -> dict:
    """Run :func:`data_path` on ``path`` in a fresh process and report its peak resident memory."""
    return in_fresh_process(
        f"bench.data_path(Path({str(path)!r}), bench.build_model({model_name!r}), {max_len}, "
        f"{batch_size}, Path({str(work_dir)!r}))"
    )


# ----------------------------------------------------------------------------- forward


def peak_flops(device: torch.device, dtype: torch.dtype) -> tuple[float, str]:
    """The device's peak FLOP/s: a vendor figure for known GPUs, else a measured large matmul."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, value in GPU_PEAK_BF16.items():
            if key in name:
                return value, f"{name} bf16 dense (vendor)"
    n = 2048
    a = torch.randn(n, n, device=device, dtype=dtype)
    a @ a
    _sync(device)
    t0, reps = time.perf_counter(), 5
    for _ in range(reps):
        a @ a
    _sync(device)
    source = f"measured {n}x{n} {str(dtype).replace('torch.', '')} matmul"
    if device.type == "cpu" and dtype == torch.float32 and fp32_matmul_precision() == "bf16":
        source += " on bf16 units"  # see pipeline.run.cpu.fast_fp32_matmul
    return 2 * n**3 * reps / (time.perf_counter() - t0), source


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def forward_rate(model, max_len: int, batch_size: int, precision: str, device: torch.device, seconds: float) -> dict:
    """Cells/s, FLOP/s and MFU of the model's forward on random inputs of the real shape."""
    config = model.config
    model = model.to(device).eval()
    n_vocab, k = len(config.vocabulary), 6
    gen = torch.Generator().manual_seed(0)
    genes = torch.stack([torch.randperm(n_vocab, generator=gen)[:max_len] for _ in range(batch_size)])
    counts = torch.poisson(torch.full((batch_size, max_len), 2.0), generator=gen)
    knn = torch.poisson(torch.full((batch_size, k, max_len), 2.0), generator=gen)
    dists = torch.rand(batch_size, k, generator=gen)
    inputs = [t.to(device) for t in (genes, counts, knn, dists)]
    dtype = AUTOCAST_DTYPES.get(precision)
    if device.type == "cpu":  # as scatlas predict runs
        fast_fp32_matmul(config.d_model, config.nhead, max_len)
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)
    with torch.inference_mode(), autocast:
        model.predict(*inputs)  # warm-up
        _sync(device)
        n, t0 = 0, time.perf_counter()
        while n == 0 or time.perf_counter() - t0 < seconds:
            model.predict(*inputs)
            n += 1
        _sync(device)
        elapsed = time.perf_counter() - t0
    cells_per_s = n * batch_size / elapsed
    flops = config.flops_per_cell(max_len, k)
    peak, peak_source = peak_flops(device, dtype or torch.float32)
    return {
        "model": model.config_name if hasattr(model, "config_name") else None,
        "max_len": max_len,
        "batch_size": batch_size,
        "precision": precision,
        "device": str(device),
        "cells_per_s": round(cells_per_s, 2),
        "flops_per_cell": flops,
        "flop_per_s": cells_per_s * flops,
        "mfu": cells_per_s * flops / peak,
        "peak_flop_per_s": peak,
        "peak_source": peak_source,
    }


# ----------------------------------------------------------------------------- end to end


def end_to_end(path: Path, model_name: str, checkpoint: str | None, max_len: int, batch_size: int, workers: int | str,
               precision: str, work_dir: Path) -> dict:  # fmt: skip
    """``scatlas predict`` in this process, between two timings of the model's forward alone on the same batches.

    ``scatlas bench`` runs it in a fresh process (:func:`in_fresh_process`), as a user runs predict.

    Returns the predict loop's rate (embedded cells over the parts' seconds,
    reading, tokenizing and writing included), the overall rate (start-up and
    the kNN graph included), and the pure forward rate on the very batches the
    run fed the model, tokenized beforehand, timed just before and just after
    the run (their mean is the comparison the pipeline is judged by: a shared
    machine's speed drifts between runs).
    """
    keep_freed_memory()  # for the forward alone too, as predict's forward runs
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = build_model(model_name, checkpoint)
    out = work_dir / f"e2e_{model_name}_{max_len}"
    trainer = "gpu" if device.type == "cuda" else "cpu"
    overrides = [f"input={path}", f"out_dir={out}", f"model={model_name}", f"model.max_len={max_len}",
                 f"data.batch_size={batch_size}", f"data.num_workers={workers}", f"trainer={trainer}"]  # fmt: skip
    overrides.append(f"trainer.precision={TRAINER_PRECISION[precision]}")  # as the forward timed below
    if checkpoint:
        overrides.append(f"model.checkpoint={checkpoint}")
    cfg = compose_predict(overrides)

    # the run's neighbour graph (the run finds it and does not compute it again) and its batches, tokenized up front
    (plan,) = plan_files([path], model.config.genes, cfg)
    uses_neighbors = model.config.expr_emb_style == "metacell"
    t0 = time.perf_counter()
    if uses_neighbors:
        prepare([plan], cfg, out)
    graph_seconds = time.perf_counter() - t0
    batches = whole_file_batches(
        [plan], model.config.organism_offsets, cfg, out if uses_neighbors else None, batch_size=batch_size
    )
    inputs = []
    for i in range(len(batches)):
        batch = batches[i]
        if len(batch["genes"]):
            inputs.append(batch_tensors(batch, device))
    n_forward = sum(len(args[0]) for args in inputs)
    dtype = AUTOCAST_DTYPES.get(precision)
    if device.type == "cpu":  # as predict does, for the forward alone too
        fast_fp32_matmul(model.config.d_model, model.config.nhead, max_len)
    model = model.to(device).eval()

    def forward_alone() -> float:
        with torch.inference_mode(), torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            model.predict(*inputs[0])  # warm-up
            _sync(device)
            start = time.perf_counter()
            for args in inputs:
                model.predict(*args)
            _sync(device)
            return time.perf_counter() - start

    before = forward_alone()
    t0 = time.perf_counter()
    code = run_predict(cfg)
    total = time.perf_counter() - t0 + graph_seconds
    after = forward_alone()
    state = load_state(out)
    embedded = sum(r["n_cells"] for r in state.done.values())
    loop = sum(r["seconds"] for r in state.done.values())
    return {"dataset": path.name, "exit_code": code, "cells_embedded": embedded,
            "workers": resolve_num_workers(workers, device.type),
            "predict_loop_cells_per_s": round(embedded / loop, 1), "overall_cells_per_s": round(embedded / total, 1),
            "forward_same_batches_cells_per_s": round(2 * n_forward / (before + after), 1),
            "forward_before_after_cells_per_s": [round(n_forward / before, 1), round(n_forward / after, 1)],
            "forward_cells": n_forward, "forward_before_after_s": [before, after]}  # fmt: skip


# ----------------------------------------------------------------------------- command


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="scatlas bench",
        description="Measure the data path (cells/s per worker), peak memory while streaming a large tiled file, "
        "the forward pass (cells/s, FLOP/s, MFU) and end-to-end predict. Prints a table and writes JSON.",
    )
    parser.add_argument("--model", default="tiny", help="preset for data path and end-to-end (default tiny)")
    parser.add_argument("--forward-models", default="tiny,small,medium",
                        help="presets whose forward is timed (random weights unless --checkpoint)")  # fmt: skip
    parser.add_argument("--checkpoint", default=None, help="published checkpoint for --model")
    parser.add_argument("--max-len", type=int, default=None, help="tokens per cell (default: each preset's)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--precision", choices=["32", "bf16", "16"], default=None,
                        help="forward precision (default 32 on CPU, bf16 on GPU)")  # fmt: skip
    parser.add_argument("--workers", type=lambda v: v if v == "auto" else int(v), default="auto",
                        help="DataLoader workers for end-to-end (default auto: 0 on CPU, 2 with a GPU)")  # fmt: skip
    parser.add_argument("--large-cells", default="100000,1000000",
                        help="sizes of the tiled mouse-brain files streamed for peak memory ('' to skip)")  # fmt: skip
    parser.add_argument("--seconds", type=float, default=10.0, help="time spent per forward measurement")
    parser.add_argument("--work-dir", default=None, help="where tiled files and atlases go (default: a temp dir)")
    parser.add_argument("--json", default="bench.json", help="where to write the figures")
    parser.add_argument("--only", default=",".join(SECTIONS),
                        help=f"the sections to measure, of {','.join(SECTIONS)} (default all; slurm/gpu_check.sh "
                        "takes forward,end_to_end)")  # fmt: skip
    parser.add_argument("--compare-upstream", action="store_true",
                        help="also time upstream scprint2's forward on the same shape and weights")  # fmt: skip
    parser.add_argument("--scale", action="store_true", help="instead: the scale figures, an atlas of many small "
                        "datasets (see --scale-sizes, --planned)")  # fmt: skip
    parser.add_argument("--scale-sizes", default="100,1000", help="--scale: numbers of 30-cell datasets embedded "
                        "(default 100,1000; add 10000 for the full figures, about an hour on 2 cores)")  # fmt: skip
    parser.add_argument("--planned", default="20000,34000", help="--scale: datasets,units of the planned, not "
                        "embedded, atlas whose bookkeeping is timed ('' to skip)")  # fmt: skip
    parser.add_argument("--threads", type=int, default=None, help="--scale: torch threads of the predict processes "
                        "(default torch's); 1 on a crowded machine, where a forward's threads wait for each other")  # fmt: skip
    parser.add_argument("--scale-workers", default="1", help="--scale: data.num_workers of the predict processes "
                        "(default 1: a worker tokenizes while the main process runs the forward, as with a GPU)")  # fmt: skip
    args = parser.parse_args(argv)
    if args.scale:
        return scale_main(args)
    only = set(args.only.split(","))
    if not only <= set(SECTIONS):
        parser.error(f"--only: unknown sections {sorted(only - set(SECTIONS))}; known: {','.join(SECTIONS)}")
    keep_freed_memory()  # the forward runs as in scatlas predict
    warnings.filterwarnings("ignore", message=".*random weights.*")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    precision = args.precision or ("bf16" if device.type == "cuda" else "32")
    work_dir = Path(args.work_dir or tempfile.mkdtemp(prefix="scatlas-bench-"))
    work_dir.mkdir(parents=True, exist_ok=True)
    model = build_model(args.model, args.checkpoint)
    max_len = args.max_len or _preset_max_len(args.model)
    report = {"machine": _machine(device), "torch_threads": torch.get_num_threads()}

    report["data_path"], report["streaming"], report["forward"] = [], [], []
    if "data_path" in only:
        print(f"[1/4] data path, one worker, {args.model} max_len {max_len}")
        report["data_path"] = [data_path(p, model, max_len, args.batch_size, work_dir / "data", i)
                               for i, p in enumerate(shared_datasets())]  # fmt: skip
    large_cells = [int(x) for x in args.large_cells.split(",") if x] if "streaming" in only else []
    if large_cells:
        print(f"[2/4] peak memory streaming tiled files of {args.large_cells} cells")
    for n in large_cells:
        tiled = tile_dataset(n, work_dir / f"tiled_{n}.h5ad")
        report["streaming"].append(streaming_peak_rss(tiled, args.model, max_len, args.batch_size,
                                                      work_dir / f"stream_{n}"))  # fmt: skip
    if "forward" in only:
        print(f"[3/4] forward on {device} ({precision})")
    for name in args.forward_models.split(",") if "forward" in only else []:
        m = model if name == args.model else build_model(name)
        length = args.max_len or _preset_max_len(name)
        batch = args.batch_size if device.type == "cuda" or name == "tiny" else 2
        row = forward_rate(m, length, batch, precision, device, args.seconds)
        row["model"] = name
        report["forward"].append(row)
    if "end_to_end" in only:
        print("[4/4] end-to-end predict")
        # the 10,000-cell file of a checkout, else the bundled demo (600 cells: start-up weighs more)
        e2e_input = next(
            p for p in (REPO_DATA / TILE_SOURCE, PACKAGE_DATA / TILE_SOURCE, PACKAGE_DATA / DEMO) if p.is_file()
        )
        report["end_to_end"] = in_fresh_process(
            f"bench.end_to_end(Path({str(e2e_input)!r}), {args.model!r}, {args.checkpoint!r}, {max_len}, "
            f"{args.batch_size}, {args.workers!r}, {precision!r}, Path({str(work_dir)!r}))"
        )
    if args.compare_upstream:
        from pipeline.tools.bench_upstream import compare_upstream

        report["upstream"] = compare_upstream(work_dir=work_dir / "upstream")
    Path(args.json).write_text(json.dumps(report, indent=1, default=float))
    print_report(report)
    print(f"figures written to {args.json}")
    return 0


def scale_main(args: argparse.Namespace) -> int:
    """``scatlas bench --scale``: figures of :func:`pipeline.tools.scale.scale_bench`, printed and written as JSON."""
    from pipeline.tools.scale import print_scale_report, scale_bench

    work_dir = Path(args.work_dir or tempfile.mkdtemp(prefix="scatlas-scale-"))
    sizes = [int(x) for x in args.scale_sizes.split(",")]
    planned = tuple(int(x) for x in args.planned.split(",")) if args.planned else None
    workers = int(args.scale_workers) if args.scale_workers.isdigit() else args.scale_workers
    report = scale_bench(sizes, work_dir, planned=planned, threads=args.threads, workers=workers)
    report["machine"] = _machine(torch.device("cpu"))
    report["load_average"] = os.getloadavg()
    Path(args.json).write_text(json.dumps(report, indent=1, default=float))
    print_scale_report(report)
    print(f"figures written to {args.json}")
    return 0


def _preset_max_len(name: str) -> int:
    return int(predict_config(name).model.max_len)


def _machine(device: torch.device) -> dict:
    info = {"platform": platform.platform(), "cpu": platform.processor() or platform.machine(),
            "cores": os.cpu_count(), "torch": torch.__version__}  # fmt: skip
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def print_report(report: dict) -> None:
    from rich.console import Console

    console = Console(width=None if sys.stdout.isatty() else 200)  # logs and pipes: whole names, no wrapping
    if report["data_path"] or report["streaming"]:
        _print_data_path(console, report)
    if report["forward"]:
        _print_forward(console, report)
    if "end_to_end" in report:
        _print_end_to_end(console, report)
    if "upstream" in report:
        _print_upstream(console, report)
    console.print(f"peak RSS of this process: {peak_rss_mib():,.0f} MiB")


def _print_data_path(console, report: dict) -> None:
    from rich.table import Table

    table = Table(
        title="data path, one worker (kNN graph, and a large dense file's sparse copy: once per dataset, "
        "before; data path: read + QC + genes + "
        "neighbour counts + tokens, what each DataLoader worker does)"
    )
    for col in ("dataset", "cells", "kNN graph s", "data path cells/s", "2nd pass cells/s", "incl. kNN graph cells/s"):
        table.add_column(col, justify="right")
    for r in report["data_path"]:
        if "error" in r:
            table.add_row(r["dataset"], "failed", r["error"], "", "", "")
        else:
            table.add_row(r["dataset"], f"{r['cells']:,}", f"{r['neighbors_s']}", f"{r['tokenize_cells_per_s']:,.0f}",
                          f"{r['tokenize_warm_cells_per_s']:,.0f}", f"{r['cells_per_s']:,.0f}")  # fmt: skip
    for r in report["streaming"]:
        table.add_row(r["dataset"], f"{r['cells']:,}", f"{r['neighbors_s']}", f"{r['tokenize_cells_per_s']:,.0f}",
                      "", f"{r['cells_per_s']:,.0f}  peak RSS {r['peak_rss_mib']:,.0f} MiB")  # fmt: skip
    console.print(table)


def _print_forward(console, report: dict) -> None:
    from rich.table import Table

    table = Table(title="forward")
    for col in ("model", "max_len", "batch", "precision", "cells/s", "GFLOP/cell", "TFLOP/s", "MFU", "peak"):
        table.add_column(col, justify="right")
    for r in report["forward"]:
        table.add_row(r["model"], str(r["max_len"]), str(r["batch_size"]), r["precision"], f"{r['cells_per_s']:,.2f}",
                      f"{r['flops_per_cell'] / 1e9:,.1f}", f"{r['flop_per_s'] / 1e12:.3f}", f"{r['mfu']:.1%}",
                      r["peak_source"])  # fmt: skip
    console.print(table)


def _print_end_to_end(console, report: dict) -> None:
    e2e = report["end_to_end"]
    console.print(f"end-to-end predict ({e2e['dataset']}, {e2e['cells_embedded']:,} cells embedded, "
                  f"{e2e['workers']} DataLoader workers): predict loop "
                  f"{e2e['predict_loop_cells_per_s']:,.0f} cells/s incl. reading, tokenizing and writing "
                  f"({e2e['predict_loop_cells_per_s'] / e2e['forward_same_batches_cells_per_s']:.0%} of the forward alone on "
                  f"the same batches, {e2e['forward_same_batches_cells_per_s']:,.0f} cells/s: the mean of "
                  f"{e2e['forward_before_after_cells_per_s'][0]:,.0f} before and "
                  f"{e2e['forward_before_after_cells_per_s'][1]:,.0f} after the run); overall "
                  f"{e2e['overall_cells_per_s']:,.0f} cells/s incl. start-up and the kNN graph; peak RSS of that "
                  f"process {e2e['peak_rss_mib']:,.0f} MiB")  # fmt: skip


def _print_upstream(console, report: dict) -> None:
    from rich.table import Table

    up = report["upstream"]
    shape = up["shape"]
    table = Table(title=f"forward vs upstream {up['upstream']}: d_model {shape['d_model']}, {shape['nlayers']} + "
                        f"{shape['nlayers_cell']} layers, max_len {shape['max_len']}, batch {shape['batch_size']}, "
                        f"{up['threads']} threads, {up['inputs']}, max diff {up['max_abs_diff']:.1e}")  # fmt: skip
    for col in ("forward", "cells/s", "ours / it"):
        table.add_column(col, justify="right")
    table.add_row(f"ours, cells side by side (as scatlas runs it; fp32 matmul {up['fp32_matmul']})",
                  f"{up['cells_per_s_ours']:.2f}", "")  # fmt: skip
    table.add_row("ours, one forward over all threads", f"{up['cells_per_s_ours_one_forward']:.2f}", "")
    table.add_row("upstream, attention dropout 0 (equal outputs)", f"{up['cells_per_s_upstream']:.2f}",
                  f"{up['ratio']:.2f}x")  # fmt: skip
    table.add_row(f"upstream, dropout 0, with our settings (malloc, fp32 matmul {up['fp32_matmul']})",
                  f"{up['cells_per_s_upstream_our_settings']:.2f}", f"{up['ratio_our_settings']:.2f}x")  # fmt: skip
    table.add_row(f"upstream as shipped (dropout {up['upstream_shipped_dropout']} in eval)",
                  f"{up['cells_per_s_upstream_shipped']:.2f}", f"{up['ratio_shipped']:.2f}x")  # fmt: skip
    console.print(table)
    console.print(f"load average before / after the comparison: {up['load_average']}")
