"""The ``scatlas`` command.

    scatlas predict [key=value ...]   embed datasets (a Hydra app: configs/predict.yaml; --help lists the groups)
    scatlas status ATLAS_DIR          units and cells done, failures, per-rank throughput, ETA
    scatlas validate ATLAS_DIR        exit 0 only if the atlas is complete and consistent
    scatlas bench [--help]            data path, memory, forward and end-to-end throughput figures
"""

from __future__ import annotations

import argparse
import logging
import sys
import warnings
from pathlib import Path

import configs

CONFIG_DIR = str(Path(configs.__file__).parent)
USAGE = __doc__


def predict(argv: list[str]) -> int:
    """Run the Hydra app ``predict`` with ``argv`` as its command line."""
    import hydra
    from omegaconf import DictConfig

    from models import CheckpointError
    from pipeline.predict import run_predict

    exit_code = {"code": 0}

    @hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="predict")
    def app(cfg: DictConfig) -> None:
        try:
            exit_code["code"] = run_predict(cfg)
        except (FileNotFoundError, ValueError, CheckpointError) as err:
            print(f"scatlas predict: error: {err}", file=sys.stderr)
            exit_code["code"] = 2
        if exit_code["code"]:  # also what a Hydra launcher (submitit) sees as the job's status
            sys.exit(exit_code["code"])

    sys.argv = [str(Path(__file__).with_name("__main__.py")), *argv]  # DDP re-launches this file on each rank
    app()
    return exit_code["code"]


def status(argv: list[str]) -> int:
    from pipeline.atlas import load_state, status_report

    args = _atlas_args("status", argv)
    print("\n\n".join(status_report(load_state(d, args.run)) for d in args.atlas_dirs))
    return 0


def validate(argv: list[str]) -> int:
    from pipeline.atlas import load_state, validate as check

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


def bench(argv: list[str]) -> int:
    from pipeline.bench import main as run_bench

    return run_bench(argv)


COMMANDS = {"predict": predict, "status": status, "validate": validate, "bench": bench}


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
