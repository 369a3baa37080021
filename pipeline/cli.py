"""The ``scatlas`` command.

scatlas predict [key=value ...]   embed datasets (a Hydra app: configs/predict.yaml; --help lists the groups)
scatlas neighbors [key=value ...] kNN graphs of predict's datasets on CPUs, before the GPU job (SLURM arrays)
scatlas status ATLAS_DIR          units and cells done, failures, per-rank throughput, ETA
scatlas validate ATLAS_DIR        exit 0 only if the atlas is complete and consistent (1 invalid, 3 incomplete)
scatlas merge OUT SHARD_DIR...    one atlas of the shard atlases of a job array (slurm/predict_array.sbatch), arrays
                                  linked, not copied
scatlas bench [--help]            data path, memory, forward and end-to-end throughput figures
scatlas bench --search ATLAS_DIR  index build speed, memory per cell, search speed and recall per index type
scatlas summarize ATLAS_DIR       tables of predicted labels per dataset, cell type x tissue/..., scores
scatlas plot ATLAS_DIR            PNGs: PCA/UMAP of a cell sample, score histograms, cell type x tissue (or other class)
scatlas probe ATLAS_DIR --label COLUMN   linear probe of the embeddings against a source obs column
scatlas export ATLAS_DIR --to parquet|zarr|soma OUT   the cells, predictions and embeddings for duckdb/pandas,
                                  AnnData (zarr) or TileDB-SOMA
scatlas index ATLAS_DIR           build (or extend) the nearest-neighbour index of an atlas (faiss)
scatlas query ATLAS_DIR QUERY...  embed query datasets with the atlas's model, find their nearest atlas cells,
                                  transfer labels by majority vote
scatlas train-demo [--out-dir DIR]      re-train the shipped tiny demo checkpoint (CPU, minutes, deterministic)
"""

from __future__ import annotations

import argparse
import atexit
import errno
import logging
import os
import re
import sys
import threading
import traceback
import warnings
from pathlib import Path

from configs import CONFIG_DIR

USAGE = __doc__


def predict(argv: list[str]) -> int:
    """Run the Hydra app ``predict`` with ``argv`` as its command line, once the arguments are checked."""
    from pipeline.analysis.heldout import heldout_report
    from pipeline.run.predict import run_predict

    return _hydra_command("predict", argv, lambda cfg: run_predict(cfg, extra_lines=heldout_report))


def neighbors(argv: list[str]) -> int:
    """``scatlas neighbors``: the kNN graphs of a predict config's datasets on CPUs (one SLURM array task's share)."""
    from pipeline.run.predict import run_neighbors

    if argv and argv[0] in ("-h", "--help"):
        print("usage: scatlas neighbors [key=value ...]  (the same config as scatlas predict)\n\nBuild the kNN "
              "graphs (and sparse copies) of the datasets of a predict run in its out_dir, on CPUs, before the GPU "
              "job. In a SLURM job array, task SLURM_ARRAY_TASK_ID of SLURM_ARRAY_TASK_COUNT takes the datasets "
              "whose id is that task modulo the count. See slurm/neighbors.sbatch.")  # fmt: skip
        return 0
    task, n_tasks = array_task()
    return _hydra_command("neighbors", argv, lambda cfg: run_neighbors(cfg, task, n_tasks))


def array_task() -> tuple[int, int]:
    """This process's (task, number of tasks) in a SLURM job array; (0, 1) outside one."""
    if "SLURM_ARRAY_TASK_ID" not in os.environ:
        return 0, 1
    task = int(os.environ["SLURM_ARRAY_TASK_ID"]) - int(os.environ.get("SLURM_ARRAY_TASK_MIN", 0))
    return task, int(os.environ.get("SLURM_ARRAY_TASK_COUNT", 1))


def _hydra_command(name: str, argv: list[str], command) -> int:
    """Run ``command(cfg)`` as the Hydra app of ``configs/predict.yaml`` with ``argv`` as its overrides.

    The arguments and ``out_dir`` are checked first (one line, nothing created);
    errors of the environment (full disk, permissions) end as one line with
    exit 4 and their traceback in the run's log file.
    """
    import hydra
    from omegaconf import DictConfig

    from models import CheckpointError
    from pipeline.io.files import LockHeld, environment_error
    from pipeline.run.predict import EXIT_ENVIRONMENT, EXIT_IN_USE

    argv = quote_paths(argv)  # an existing path with a comma or a space, as one value
    problem = predict_argument_problem(argv)
    if problem:
        print(f"scatlas {name}: error: {problem}", file=sys.stderr)
        return 2
    problem = _out_dir_problem(argv)
    if problem:  # before Hydra, which would fail creating its log folder there with a traceback
        print(f"scatlas {name}: error: {problem}", file=sys.stderr)
        return EXIT_ENVIRONMENT
    logging.raiseExceptions = False  # a log line that cannot be written (full disk) is dropped, not a traceback
    exit_code = {"code": 0}

    @hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="predict")
    def app(cfg: DictConfig) -> None:
        try:
            exit_code["code"] = command(cfg)
        except LockHeld as err:
            print(f"scatlas {name}: error: {err}", file=sys.stderr)
            exit_code["code"] = EXIT_IN_USE
        except Exception as err:
            line = environment_error(err, cfg.out_dir)
            if line is not None:
                _log_traceback(err)
                print(f"scatlas {name}: error: {line}", file=sys.stderr)
                exit_code["code"] = EXIT_ENVIRONMENT
            elif isinstance(err, (FileNotFoundError, ValueError, CheckpointError)):
                print(f"scatlas {name}: error: {err}", file=sys.stderr)
                exit_code["code"] = 2
            else:
                raise
        if exit_code["code"]:  # also what a Hydra launcher (submitit) sees as the job's status
            sys.exit(exit_code["code"])

    sys.argv = [str(Path(__file__).with_name("__main__.py")), *quote_paths(argv)]  # DDP re-launches this file
    app()
    return exit_code["code"]


#: Hydra flags whose command lines are Hydra's to check: help, config printing, sweeps (checked per job).
HYDRA_HANDLES = ("help", "hydra_help", "cfg", "info", "shell_completion", "multirun", "experimental_rerun")


def predict_argument_problem(argv: list[str]) -> str | None:
    """One line saying what is wrong with a ``predict`` command line, or None; nothing is created on disk.

    Hydra's flags are parsed as Hydra does (a bad flag exits 2 with the usage of
    ``scatlas predict``); the overrides are composed into the config, so a
    misspelled key, an unknown option of a group or an unquoted value is caught
    here, with the nearest valid name, instead of Hydra's multi-line advice and
    exit 1; a number must be given where the default is one (``seed=x`` would
    otherwise fail after the atlas directory is made); the inputs named must
    exist (one missing among others is a failed dataset). Help, info and
    ``--multirun`` sweeps are left to Hydra.
    """
    from hydra._internal.utils import get_args_parser
    from hydra.errors import HydraException, MissingConfigException, OverrideParseException

    from configs import compose_predict
    from pipeline.plan.inputs import resolve_inputs
    from pipeline.run.predict import DEMO_DATASET

    parser = get_args_parser()
    parser.prog = "scatlas predict"
    args = parser.parse_args(argv)
    if any(getattr(args, flag) for flag in HYDRA_HANDLES):
        return None
    overrides = [o for o in args.overrides if not o.lstrip("+~").startswith("hydra")]  # Hydra's own keys
    try:
        cfg = compose_predict(overrides)
    except MissingConfigException as err:
        found = re.search(r"Could not find '(.+?)/(.+?)'", str(err))
        if not found:
            return _first_line(err)
        group, option = found.groups()
        options = re.findall(r"^\t(\S+)$", str(err), flags=re.MULTILINE)
        return f"{group}={option}: no such {group}{_did_you_mean(option, options)} (the options: {', '.join(options)})"
    except OverrideParseException:
        bad = next((o for o in overrides if not _parses(o)), " ".join(overrides))
        return f"cannot read {bad}: {_quote_advice(bad)}"
    except HydraException as err:
        message = str(err)
        if found := re.search(r"Could not override '(.+?)'", message):
            key = found.group(1)
            return f"no key {key!r} in the config{_did_you_mean(key, _config_keys(compose_predict()))}; see scatlas predict --help"
        if found := re.search(r"Ambiguous value for argument '(.+?)'$", message, flags=re.MULTILINE):
            return f"{found.group(1)}: a comma makes Hydra read a sweep; {_quote_advice(found.group(1))}"
        return _first_line(err)
    groups = [o for o in overrides if o.split("=")[0] in ("model", "data", "trainer")]
    defaults, values = _config_values(compose_predict(groups)), _config_values(cfg)
    kinds = {bool: "true or false", int: "a whole number", float: "a number"}
    for key, default in defaults.items():  # trainer.* are Lightning's: devices=auto is as valid as devices=4
        if (
            type(default) in kinds
            and not key.startswith("trainer.")
            and not isinstance(values.get(key), (type(default), int))
        ):
            return f"{key}={values.get(key)}: must be {kinds[type(default)]} (default {default}); see scatlas predict --help"
    try:
        inputs = resolve_inputs(cfg.input if cfg.input else str(DEMO_DATASET))
    except ValueError as err:
        return str(err)
    if not any(os.path.exists(path) for path, _ in inputs):  # one missing among others is a failed dataset
        return f"input {inputs[0][0]} does not exist{' (nor do the others)' if len(inputs) > 1 else ''}; check the path"
    return None


def _first_line(err: Exception) -> str:
    return str(err).strip().splitlines()[0]


def _parses(override: str) -> bool:
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import OverrideParseException

    try:
        OverridesParser.create().parse_overrides([override])
    except OverrideParseException:
        return False
    return True


def _quote_advice(override: str) -> str:
    key, _, value = override.partition("=")
    return f"quote the value for Hydra inside shell quotes: '{key}=\"{value}\"' (a list is {key}=[a,b])"


def _did_you_mean(name: str, valid: list[str]) -> str:
    import difflib

    close = difflib.get_close_matches(name, valid, n=1, cutoff=0.5)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _config_values(cfg) -> dict:
    """Dotted key -> value of every leaf of a config (``data.batch_size`` -> 64), interpolations unresolved."""
    from omegaconf import OmegaConf

    def flatten(node, prefix):
        for key, value in node.items():
            yield from flatten(value, f"{prefix}{key}.") if isinstance(value, dict) else [(f"{prefix}{key}", value)]

    return dict(flatten(OmegaConf.to_container(cfg, resolve=False), ""))


def _config_keys(cfg, prefix: str = "") -> list[str]:
    """Every dotted key of a config: ``input``, ``data.counts``, ``trainer.devices``, ..."""
    keys = []
    for key, value in cfg.items():
        keys.append(f"{prefix}{key}")
        if hasattr(value, "items"):
            keys += _config_keys(value, f"{prefix}{key}.")
    return keys


def _log_traceback(err: BaseException) -> None:
    """Write ``err``'s traceback to the run's log files only (Hydra's ``<out_dir>/logs/<time>/*.log``), not the terminal."""
    record = logging.LogRecord("scatlas", logging.ERROR, __file__, 0, "the run stopped on this error:", None,
                               (type(err), err, err.__traceback__))  # fmt: skip
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler):
            handler.handle(record)


def _out_dir_problem(argv: list[str]) -> str | None:
    """One line if ``out_dir`` (the last ``out_dir=`` of ``argv``, else the default) cannot hold an atlas.

    Checked before anything is created: an existing file of that name, a
    folder the user may not write, or a file system with no space left.
    """
    from pipeline.io.files import environment_error

    values = [arg.split("=", 1)[1] for arg in argv if arg.startswith("out_dir=")]
    if "-m" in argv or "--multirun" in argv or (values and ("${" in values[-1] or "," in values[-1])):
        return None  # a sweep or an interpolation: the launcher's jobs check their own
    out_dir = Path(values[-1] if values else "atlas")
    existing = out_dir
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():  # out_dir, or a folder above it, is a file
        return environment_error(OSError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), str(existing)), out_dir)
    if not os.access(existing, os.W_OK | os.X_OK):
        return environment_error(OSError(errno.EACCES, os.strerror(errno.EACCES), str(existing)), out_dir)
    space = os.statvfs(existing)
    if space.f_bavail * space.f_frsize < 1 << 16:  # less than Hydra writes before the run starts
        return environment_error(OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(existing)), out_dir)
    return None


def quote_paths(overrides: list[str]) -> list[str]:
    """The overrides, each value that is an existing file or directory in Hydra quotes where Hydra would misread it.

    To a user, ``'input=/data/my run, v2/x.h5ad'`` is one path; Hydra reads the
    comma as a sweep (and brackets, quotes, ``=`` as its grammar) unless the
    value is quoted for it: ``input="/data/my run, v2/x.h5ad"``.
    """
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser = OverridesParser.create()

    unreadable = object()

    def value_of(override: str):
        try:
            return parser.parse_override(override).value()
        except Exception:  # noqa: BLE001 - any parse error: Hydra reports it when it parses the command line
            return unreadable

    def misread(override: str, value: str) -> bool:  # a number, true/false or null is meant as such
        parsed = value_of(override)
        return parsed is unreadable or not (parsed == value or parsed is None or isinstance(parsed, (int, float)))

    quoted = []
    for override in overrides:
        key, sep, value = override.partition("=")
        if sep and not key.startswith("-") and os.path.exists(value) and misread(override, value):
            escaped = value.replace('"', '\\"')
            candidate = f'{key}="{escaped}"'
            override = candidate if value_of(candidate) == value else override
        quoted.append(override)
    return quoted


def status(argv: list[str]) -> int:
    from pipeline.atlas.state import load_state, status_report

    args = _atlas_args("status", argv)
    print("\n\n".join(status_report(load_state(d, args.run)) for d in args.atlas_dirs))
    return 0


#: Exit codes of ``scatlas validate`` (README, "Exit codes of validate").
VALID, INVALID, INCOMPLETE = 0, 1, 3


def validate(argv: list[str]) -> int:
    from pipeline.atlas.layout import lock_path
    from pipeline.atlas.manifest import forget_part
    from pipeline.atlas.state import check_atlas, incomplete_datasets, load_state
    from pipeline.io.files import LockHeld, hold_lock

    args = _atlas_args("validate", argv)
    codes = []
    for atlas_dir in args.atlas_dirs:
        problems, damaged = check_atlas(atlas_dir, args.run, quick=args.quick)
        state = load_state(atlas_dir, args.run)
        missing = incomplete_datasets(state)
        for line in missing:
            print(f"incomplete: {line}")
        for problem in problems:
            print(f"invalid: {problem}")
        command = _predict_command(state)
        shards = [s["path"] for s in state.description.get("shards", [])]
        if damaged and shards:  # a merged atlas's parts are the shards' files: they are repaired there
            print(f"repair: the parts of a merged atlas are its shards' files: scatlas validate {' '.join(shards)} "
                  "--repair, re-run their predict, then scatlas merge them again into a new directory")  # fmt: skip
        elif damaged and args.repair:
            try:
                with hold_lock(lock_path(atlas_dir), atlas_dir):  # not while a run writes the atlas
                    for part in damaged:
                        forget_part(atlas_dir, state.run, part)
            except LockHeld as err:
                print(f"scatlas validate: error: {err}", file=sys.stderr)
                return 5
            print(f"repair: {len(damaged)} damaged parts ({', '.join(map(str, damaged))}) are pending again; embed "
                  f"them: {command}")  # fmt: skip
        elif damaged:
            print(f"repair: scatlas validate {atlas_dir} --repair && {command}")
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


def merge(argv: list[str]) -> int:
    """``scatlas merge OUT SHARD_DIR...``: one atlas directory of finished shard atlases, their arrays linked."""
    from pipeline.atlas.merge import merge_shards

    parser = argparse.ArgumentParser(prog="scatlas merge", description="Merge the shard atlases of a job array "
                                     "(slurm/predict_array.sbatch writes OUT_DIR/shard_<i>) into one atlas directory "
                                     "that every command and open_atlas read as one. Datasets and parts are numbered "
                                     "again (shard 0's first, then shard 1's, ...); the cell tables and "
                                     "datasets.parquet get a shard column and the dataset's id in its shard "
                                     "(shard_dataset). The part arrays are hard links to the shards' files (symbolic "
                                     "links when OUT is on another file system), so nothing large is copied. Every "
                                     "shard must be finished and made with the same model and settings. To add shards "
                                     "finished later, merge again into a new OUT.")  # fmt: skip
    parser.add_argument("out", type=Path, metavar="OUT", help="the merged atlas (must not exist, or be empty)")
    parser.add_argument("shards", nargs="+", metavar="SHARD_DIR", help="shard atlases (OUT_DIR/shard_*), or the "
                        "OUT_DIR that holds them; shard_<i> directories are merged in the order of i")  # fmt: skip
    args = parser.parse_args(argv)
    result = merge_shards(args.shards, args.out)
    print(f"merged {len(result.shards)} shards ({', '.join(str(s['shard']) for s in result.shards)}) into "
          f"{result.out_dir}: {result.n_datasets} datasets, {result.n_parts} parts, {result.n_cells:,} cells "
          f"embedded, {result.n_dropped:,} dropped")  # fmt: skip
    if result.symlinks:
        print(f"part arrays: {result.hard_links} hard links, {result.symlinks} symbolic links (another file system): "
              "keep the shards where they are, the merged atlas reads their files")  # fmt: skip
    else:
        print(f"part arrays: {result.hard_links} hard links to the shards' files (no copy; removing a shard leaves "
              "them whole)")  # fmt: skip
    return 0


def _predict_command(state) -> str:
    """The command of the latest attempt of the atlas's run (as ``atlas.json`` records it)."""
    run = next((r for r in state.description.get("runs", []) if r["run"] == state.run), {})
    commands = [a["command"] for a in run.get("attempts", []) if a.get("command")]
    return commands[-1] if commands else f"the scatlas predict command that made {state.out_dir}"


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
    if command == "validate":
        parser.add_argument("--repair", action="store_true", help="make damaged parts (files missing, changed or "
                            "unreadable) pending, so that the next scatlas predict embeds them again")  # fmt: skip
        parser.add_argument("--quick", action="store_true", help="check the plan, the done markers and that every "
                            "part file exists, without reading the files (no checksums, no row checks)")  # fmt: skip
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
                              "class, and a heatmap of predicted cell type x tissue (or the model's next class; "
                              "left out, saying so, when one axis holds a single label).", "plots")  # fmt: skip
    parser.add_argument("--cells", type=int, default=5000, help="cells drawn for the PCA/UMAP (default 5000)")
    parser.add_argument("--umap", action="store_true", help="UMAP instead of PCA (umap-learn; ~30 s more to compile)")
    args, atlas = _open(parser, argv)
    paths, notes = plot_atlas(atlas, args.out or atlas.out_dir / "plots", n_cells=args.cells,
                              method="umap" if args.umap else "pca")  # fmt: skip
    print("\n".join(map(str, paths)))
    for note in notes:
        print(note, file=sys.stderr)
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


def export(argv: list[str]) -> int:
    from pipeline.atlas.reader import open_atlas
    from pipeline.export.exporters import EXPORTERS, export_atlas

    parser = argparse.ArgumentParser(prog="scatlas export", description="Write the cells of an atlas, their decoded "
                                     "predictions (terms, names, scores of every class) and embeddings in another "
                                     "ecosystem's format: parquet (a cells/ and an embeddings/ table, one file per "
                                     "part, for duckdb, polars or pandas), zarr (one AnnData store: obs + "
                                     "obsm['X_scprint2']) or soma (a TileDB-SOMA experiment; needs the soma extra). "
                                     "Reads one part at a time and writes OUT only when complete; the atlas's model, "
                                     "checkpoint sha256 and settings go in the output's metadata (scprint_atlas).")  # fmt: skip
    parser.add_argument("atlas_dir", metavar="ATLAS_DIR", help="out_dir of a scatlas predict run")
    parser.add_argument("--to", required=True, choices=list(EXPORTERS), help="output format")
    parser.add_argument("out", type=Path, metavar="OUT", help="the directory to write (must not exist)")
    parser.add_argument("--run", type=int, default=None, help="run counter (default: the latest run)")
    args = parser.parse_args(argv)
    atlas = open_atlas(args.atlas_dir, args.run)
    try:
        written = export_atlas(atlas, args.to, args.out)
    except (FileExistsError, ModuleNotFoundError) as err:
        print(f"scatlas export: error: {err}", file=sys.stderr)
        return 2
    print(f"exported {atlas.n_cells:,} cells of {len(atlas.parts)} parts ({atlas.out_dir}, run {atlas.run}) "
          f"to {written} ({args.to})")  # fmt: skip
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


COMMANDS = {"predict": predict, "neighbors": neighbors, "status": status, "validate": validate, "merge": merge,
            "bench": bench, "summarize": summarize, "plot": plot, "probe": probe, "export": export, "index": index, "query": query,
            "train-demo": train_demo}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    logging.getLogger("lightning.pytorch.utilities.rank_zero").setLevel(logging.WARNING)
    # Lightning's "Received SIGTERM" line: run_predict says once that it stopped and will resume
    logging.getLogger("lightning.pytorch.trainer.connectors.signal_connector").setLevel(logging.WARNING)
    for noise in (".*does not have many workers.*", ".*infer the batch indices.*", ".*LeafSpec.*"):
        warnings.filterwarnings("ignore", message=noise)
    if "SLURM_JOB_ID" not in os.environ:  # Lightning's hint to use srun, printed on any machine with SLURM installed
        warnings.filterwarnings("ignore", message=".*The `srun` command is available.*")
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
