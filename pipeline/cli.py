"""The ``scatlas`` command.

scatlas predict [key=value ...]   embed datasets (a Hydra app: configs/predict.yaml; --help lists the groups)
scatlas status ATLAS_DIR          units and cells done, failures, per-rank throughput, ETA
scatlas validate ATLAS_DIR        exit 0 only if the atlas is complete and consistent
scatlas bench [--help]            data path, memory, forward and end-to-end throughput figures
scatlas bench --search ATLAS_DIR  index build speed, memory per cell, search speed and recall per index type
scatlas summarize ATLAS_DIR       tables of predicted labels per dataset, cell type x tissue/..., scores
scatlas plot ATLAS_DIR            PNGs: PCA/UMAP of a cell sample, score histograms, cell type x tissue
scatlas probe ATLAS_DIR --label COLUMN   linear probe of the embeddings against a source obs column
scatlas index ATLAS_DIR           build (or extend) the nearest-neighbour index of an atlas (faiss)
scatlas query ATLAS_DIR QUERY...  embed query datasets with the atlas's model, find their nearest atlas cells,
                                  transfer labels by majority vote
scatlas train-demo [--out-dir DIR]      re-train the shipped tiny demo checkpoint (CPU, minutes, deterministic)
"""

from __future__ import annotations

import argparse
import logging
import sys
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


def validate(argv: list[str]) -> int:
    from pipeline.atlas.state import load_state
    from pipeline.atlas.state import validate as check

    args = _atlas_args("validate", argv)
    n_invalid = 0
    for atlas_dir in args.atlas_dirs:
        problems = check(atlas_dir, args.run)
        state = load_state(atlas_dir, args.run)
        for row in state.datasets[state.datasets.status == "failed"].itertuples():
            print(f"note: dataset {row.dataset} failed and is not in the atlas: {row.error}")
        for problem in problems:
            print(f"invalid: {problem}")
        if problems:
            print(f"{atlas_dir}: INVALID ({len(problems)} problems)")
            n_invalid += 1
            continue
        n_cells = sum(r["n_cells"] for r in state.done.values())
        n_dropped = sum(r["n_dropped"] for r in state.done.values())
        print(f"{atlas_dir}: valid: {len(state.done)} parts, {n_cells:,} cells embedded, {n_dropped:,} dropped")
    return 1 if n_invalid else 0


def _atlas_args(command: str, argv: list[str]) -> argparse.Namespace:
    descriptions = {
        "status": "Units and cells done, failures, per-rank throughput and ETA of atlas directories.",
        "validate": "Check atlas directories are complete and consistent; exit 0 only if all are.",
    }
    parser = argparse.ArgumentParser(prog=f"scatlas {command}", description=descriptions[command])
    parser.add_argument("atlas_dirs", nargs="+", metavar="ATLAS_DIR", help="out_dir of a scatlas predict run")
    parser.add_argument("--run", type=int, default=None, help="run counter (default: the latest run)")
    return parser.parse_args(argv)


def train_demo(argv: list[str]) -> int:
    from pipeline.tools.train_demo import main as run_train_demo

    return run_train_demo(argv)


def bench(argv: list[str]) -> int:
    if argv[:1] == ["--search"]:  # scatlas bench --search ATLAS_DIR: the index types of scatlas index
        from pipeline.tools.bench_search import main as run_search_bench

        return run_search_bench(argv[1:])
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


def index(argv: list[str]) -> int:
    from pipeline.analysis.search import INDEX_TYPES, METRICS, build_index, index_report

    parser = _analysis_parser("index", "Build a faiss nearest-neighbour index of the atlas's embeddings under "
                              "ATLAS_DIR/index/, or extend it with the parts done since it was built. Exact (flat) "
                              "for small atlases, IVF-Flat and then IVF-PQ for large ones (--type auto).", "index")  # fmt: skip
    parser.add_argument("--blocks", default=None, help="embedding blocks, comma-separated: all (default), cell_type, "
                        "other, cell_type,tissue, ...")  # fmt: skip
    parser.add_argument("--metric", choices=METRICS, default=None, help="cosine (default) or l2")
    parser.add_argument("--type", choices=INDEX_TYPES, default=None, help="index type (default auto: flat up to "
                        "100,000 cells, ivf up to 5,000,000, ivfpq beyond)")  # fmt: skip
    parser.add_argument("--nlist", type=int, default=None, help="IVF lists (default about 4 sqrt(cells))")
    parser.add_argument(
        "--rebuild", action="store_true", help="build a new index instead of extending the existing one"
    )
    args, atlas = _open(parser, argv)
    if args.out is not None:
        raise ValueError("scatlas index writes under ATLAS_DIR/index; --out is not supported")
    blocks = None if args.blocks is None else [b.strip() for b in args.blocks.split(",") if b.strip()]
    description = build_index(atlas, blocks=blocks, metric=args.metric, kind=args.type, nlist=args.nlist,
                              rebuild=args.rebuild)  # fmt: skip
    print(index_report(description, atlas.out_dir))
    return 0


def query(argv: list[str]) -> int:
    """Embed the query datasets with ``scatlas predict`` (the atlas's settings), then search them in the atlas."""
    import time

    from configs import compose_predict
    from pipeline.analysis.search import (
        check_index,
        load_index,
        query_atlas,
        query_overrides,
        query_report,
        write_query,
    )
    from pipeline.atlas.layout import query_dir
    from pipeline.atlas.reader import open_atlas
    from pipeline.run.predict import EXIT_DATASETS_FAILED, EXIT_OK, run_predict

    parser = argparse.ArgumentParser(prog="scatlas query", description="Embed query datasets with the atlas's own "
                                     "model, checkpoint, max_len and seed (from atlas.json), find the k nearest atlas "
                                     "cells of each query cell in the atlas's index (scatlas index), and transfer labels "
                                     "by the neighbours' majority vote. Writes neighbors.parquet (one row per query "
                                     "cell and neighbour) and label_transfer.parquet (one row per query cell).")  # fmt: skip
    parser.add_argument("atlas_dir", metavar="ATLAS_DIR", help="an atlas with an index (scatlas index ATLAS_DIR)")
    parser.add_argument("queries", nargs="+", metavar="QUERY", help="query datasets (any input predict takes)")
    parser.add_argument("-k", type=int, default=10, help="neighbours per query cell (default 10)")
    parser.add_argument("--label", action="append", default=[], help="also transfer this obs column of the atlas's "
                        "source files, e.g. cell_type (repeatable)")  # fmt: skip
    parser.add_argument("--weighted", action="store_true", help="weigh votes by 1 / distance")
    parser.add_argument("--nprobe", type=int, default=None, help="IVF lists searched (default: the index's)")
    parser.add_argument("--name", default=None, help="query name (default: the first query file's name)")
    parser.add_argument("--out", type=Path, default=None, help="output directory (default ATLAS_DIR/queries/NAME)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="a predict setting that "
                        "does not change the numbers, e.g. data.batch_size=64 or trainer=gpu (repeatable)")  # fmt: skip
    args = parser.parse_args(argv)
    atlas = open_atlas(args.atlas_dir)
    check_index(atlas)  # no index, or one of other parts: fail before embedding anything
    fixed = {"model", "seed", "input", "out_dir", "run"}
    refused = [s for s in args.set if s.split("=")[0].split(".")[0] in fixed
               or s.split("=")[0] in ("data.min_counts", "data.min_genes", "data.n_neighbors")]  # fmt: skip
    if refused:
        raise ValueError(f"--set {refused[0]}: a query takes the model, seed and QC settings of the atlas")
    name = args.name or Path(args.queries[0].rstrip("/")).name.split(".")[0]
    out = args.out or query_dir(atlas.out_dir, name)
    cfg = compose_predict([f"input=[{','.join(args.queries)}]", f"out_dir={out}", *query_overrides(atlas), *args.set])
    code = run_predict(cfg)
    if code not in (EXIT_OK, EXIT_DATASETS_FAILED):
        return code
    query = open_atlas(out, progress=atlas.progress)
    if query.n_cells == 0:
        print(f"scatlas query: error: no query cell was embedded; see {out}/datasets.parquet", file=sys.stderr)
        return EXIT_DATASETS_FAILED
    index = load_index(atlas)
    started = time.perf_counter()
    neighbors, transfer = query_atlas(atlas, query, k=args.k, labels=args.label, weighted=args.weighted,
                                      nprobe=args.nprobe, index=index)  # fmt: skip
    seconds = time.perf_counter() - started
    paths = write_query(neighbors, transfer, out)
    print(query_report(atlas, index.description, neighbors, transfer, args.label, seconds))
    print(f"written: {paths[0]}, {paths[1]}")
    return code


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
            "plot": plot, "probe": probe, "index": index, "query": query, "train-demo": train_demo}  # fmt: skip


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


if __name__ == "__main__":
    sys.exit(main())
