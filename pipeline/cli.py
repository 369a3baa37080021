"""The ``scatlas`` command.

scatlas predict [key=value ...]   embed datasets (a Hydra app: configs/predict.yaml; --help lists the groups)
scatlas status ATLAS_DIR          units and cells done, failures, per-rank throughput, ETA
scatlas validate ATLAS_DIR        exit 0 only if the atlas is complete and consistent (1 invalid, 3 incomplete)
scatlas bench [--help]            data path, memory, forward and end-to-end throughput figures
scatlas summarize ATLAS_DIR       tables of predicted labels per dataset, cell type x tissue/..., scores
scatlas plot ATLAS_DIR            PNGs: PCA/UMAP of a cell sample, score histograms, cell type x tissue
scatlas probe ATLAS_DIR --label COLUMN   linear probe of the embeddings against a source obs column
scatlas train-demo [--out-dir DIR]      re-train the shipped tiny demo checkpoint (CPU, minutes, deterministic)
"""

from __future__ import annotations

import argparse
import atexit
import logging
import os
import sys
import threading
import traceback
import warnings
from pathlib import Path

from configs import CONFIG_DIR

USAGE = __doc__


def predict(argv: list[str]) -> int:
    """Run the Hydra app ``predict`` with ``argv`` as its command line."""
    import hydra
    from omegaconf import DictConfig

    from models import CheckpointError
    from pipeline.analysis.heldout import heldout_report
    from pipeline.run.predict import run_predict

    exit_code = {"code": 0}

    @hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="predict")
    def app(cfg: DictConfig) -> None:
        try:
            exit_code["code"] = run_predict(cfg, extra_lines=heldout_report)
        except (FileNotFoundError, ValueError, CheckpointError) as err:
            print(f"scatlas predict: error: {err}", file=sys.stderr)
            exit_code["code"] = 2
        if exit_code["code"]:  # also what a Hydra launcher (submitit) sees as the job's status
            sys.exit(exit_code["code"])

    sys.argv = [str(Path(__file__).with_name("__main__.py")), *argv]  # DDP re-launches this file on each rank
    app()
    return exit_code["code"]


def status(argv: list[str]) -> int:
    from pipeline.atlas.state import load_state, status_report

    args = _atlas_args("status", argv)
    print("\n\n".join(status_report(load_state(d, args.run)) for d in args.atlas_dirs))
    return 0


#: Exit codes of ``scatlas validate`` (README, "Exit codes of validate").
VALID, INVALID, INCOMPLETE = 0, 1, 3


def validate(argv: list[str]) -> int:
    from pipeline.atlas.state import incomplete_datasets, load_state
    from pipeline.atlas.state import validate as check

    args = _atlas_args("validate", argv)
    codes = []
    for atlas_dir in args.atlas_dirs:
        problems = check(atlas_dir, args.run)
        state = load_state(atlas_dir, args.run)
        missing = incomplete_datasets(state)
        for line in missing:
            print(f"incomplete: {line}")
        for problem in problems:
            print(f"invalid: {problem}")
        n_cells = sum(r["n_cells"] for r in state.done.values())
        n_dropped = sum(r["n_dropped"] for r in state.done.values())
        done = f"{len(state.done)} parts, {n_cells:,} cells embedded, {n_dropped:,} dropped"
        if problems:
            print(f"{atlas_dir}: INVALID ({len(problems)} problems)")
            codes.append(INVALID)
        elif missing:
            print(f"{atlas_dir}: consistent but INCOMPLETE: {len(missing)} of {len(state.datasets)} datasets not "
                  f"(all) in it; {done}")  # fmt: skip
            codes.append(INCOMPLETE)
        else:
            print(f"{atlas_dir}: valid: {done}")
            codes.append(VALID)
    return INVALID if INVALID in codes else max(codes)


def _atlas_args(command: str, argv: list[str]) -> argparse.Namespace:
    descriptions = {
        "status": "Units and cells done, failures, per-rank throughput and ETA of atlas directories.",
        "validate": "Check atlas directories are complete and consistent; exit 0 only if all are, 1 if one is "
        "inconsistent (missing, changed or stray files, lost or repeated cells), else 3 if a dataset "
        "failed or is not done yet (each named on an 'incomplete:' line).",
    }
    parser = argparse.ArgumentParser(prog=f"scatlas {command}", description=descriptions[command])
    parser.add_argument("atlas_dirs", nargs="+", metavar="ATLAS_DIR", help="out_dir of a scatlas predict run")
    parser.add_argument("--run", type=int, default=None, help="run counter (default: the latest run)")
    return parser.parse_args(argv)


def train_demo(argv: list[str]) -> int:
    from pipeline.tools.train_demo import main as run_train_demo

    return run_train_demo(argv)


def bench(argv: list[str]) -> int:
    from pipeline.tools.bench import main as run_bench

    return run_bench(argv)


def summarize(argv: list[str]) -> int:
    from pipeline.analysis.summary import summary_report, summary_tables, write_tables

    parser = _analysis_parser("summarize", "Count predicted labels per dataset (cell type x tissue, disease, age, "
                              "assay, organism, ...), compare the top-1/2/3 labels and their scores per class; "
                              "writes CSV and parquet tables and prints a short report.", "summary")  # fmt: skip
    args, atlas = _open(parser, argv)
    tables = summary_tables(atlas)
    written = write_tables(tables, args.out or atlas.out_dir / "summary")
    print(summary_report(atlas, tables))
    print(f"tables: {written[0].parent}/{{{','.join(p.stem for p in written)}}}.csv (and .parquet)")
    return 0


def plot(argv: list[str]) -> int:
    from pipeline.analysis.plots import plot_atlas

    parser = _analysis_parser("plot", "Write PNGs: a PCA (or UMAP) of a random sample of cells coloured by "
                              "predicted cell type and by dataset, the top-1/2/3 score histograms of every "
                              "class, and a predicted cell type x tissue heatmap.", "plots")  # fmt: skip
    parser.add_argument("--cells", type=int, default=5000, help="cells drawn for the PCA/UMAP (default 5000)")
    parser.add_argument("--umap", action="store_true", help="UMAP instead of PCA (umap-learn; ~30 s more to compile)")
    args, atlas = _open(parser, argv)
    paths = plot_atlas(atlas, args.out or atlas.out_dir / "plots", n_cells=args.cells,
                       method="umap" if args.umap else "pca")  # fmt: skip
    print("\n".join(map(str, paths)))
    return 0


def probe(argv: list[str]) -> int:
    from pipeline.analysis.probe import linear_probe, probe_report, write_probe

    parser = _analysis_parser("probe", "Train a linear probe (logistic regression on standardized embeddings) "
                              "against a label column of the source datasets' obs, joined cell by cell; report "
                              "held-out accuracy and macro-F1 next to the majority-class baseline.", "summary")  # fmt: skip
    parser.add_argument("--label", required=True, help="obs column of the source datasets, e.g. cell_type")
    parser.add_argument("--block", default=None, help="embedding block to use, e.g. cell_type or other (default: all)")
    parser.add_argument("--max-cells", type=int, default=100_000, help="cells drawn at random (default 100000)")
    args, atlas = _open(parser, argv)
    result = linear_probe(atlas, args.label, block=args.block, max_cells=args.max_cells)
    path = write_probe(result, args.out or atlas.out_dir / "summary")
    print(probe_report(result))
    print(f"written: {path}")
    return 0


def _analysis_parser(command: str, description: str, default_out: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=f"scatlas {command}", description=description + " Reads only the parts "
                                     "that are done, so it works on an atlas still being written.")  # fmt: skip
    parser.add_argument("atlas_dir", metavar="ATLAS_DIR", help="out_dir of a scatlas predict run")
    parser.add_argument("--out", type=Path, default=None, help=f"output directory (default: ATLAS_DIR/{default_out})")
    parser.add_argument("--run", type=int, default=None, help="run counter (default: the latest run)")
    return parser


def _open(parser: argparse.ArgumentParser, argv: list[str]):
    from pipeline.atlas.reader import open_atlas

    args = parser.parse_args(argv)
    return args, open_atlas(args.atlas_dir, args.run)


COMMANDS = {"predict": predict, "status": status, "validate": validate, "bench": bench, "summarize": summarize,
            "plot": plot, "probe": probe, "train-demo": train_demo}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    logging.getLogger("lightning.pytorch.utilities.rank_zero").setLevel(logging.WARNING)
    for noise in (".*does not have many workers.*", ".*infer the batch indices.*", ".*LeafSpec.*"):
        warnings.filterwarnings("ignore", message=noise)
    if argv and argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0
    if not argv or argv[0] not in COMMANDS:
        if argv and "=" not in argv[0] and not argv[0].startswith("-"):
            print(f"scatlas: unknown command {argv[0]!r}\n{USAGE}", file=sys.stderr)
            return 2
        argv = ["predict", *argv]  # `scatlas` alone, or with overrides, is `scatlas predict`
    try:
        return COMMANDS[argv[0]](argv[1:])
    except (FileNotFoundError, ValueError) as err:
        print(f"scatlas {argv[0]}: error: {err}", file=sys.stderr)
        return 2


def run() -> None:
    """The ``scatlas`` command: :func:`main`, then :func:`exit_process` with its code, whatever happens."""
    try:
        code = main()
    except SystemExit as stop:  # sys.exit inside a command (the Hydra app does it for its launchers)
        code = stop.code if isinstance(stop.code, int) else 0 if stop.code is None else 1
        if isinstance(stop.code, str):
            print(stop.code, file=sys.stderr)
    except KeyboardInterrupt:
        code = 130
    except BaseException:  # noqa: BLE001 - a crash still ends the process the same way
        traceback.print_exc()
        code = 1
    exit_process(code)


def exit_process(code: int) -> None:
    """End the process with ``code`` once every thread it started is joined and Python's exit handlers have run.

    Then ``os._exit``: the C++ destructors that run at a normal interpreter exit
    would tear down native thread pools (Arrow's parquet threads, OpenMP) while
    a worker may still be alive, and ``std::terminate`` turns the run's exit code
    into 134 after its work is done.
    """
    for thread in threading.enumerate():
        if thread is not threading.main_thread() and not thread.daemon:
            thread.join()
    atexit._run_exitfuncs()  # logging's flush, multiprocessing's worker clean-up, Hydra's
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed or broken pipe: nothing more can be said there
            pass
    os._exit(code)


if __name__ == "__main__":
    run()
