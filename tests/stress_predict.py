"""Run a small `scatlas predict` many times in a row, then two at a time, and check every exit code.

A run must only ever exit with a code of the README's table: here 0 (every dataset embedded), as each run embeds
the shipped 600-cell BMMC file into a fresh out_dir with the tiny model. Anything else (134 from a native thread
alive at interpreter exit, 139, ...) is printed with the end of that run's stderr, and the script exits 1.

    .venv/bin/python tests/stress_predict.py --runs 30 [--workdir DIR]
"""

import argparse
import collections
import os
import subprocess
import sys
import tempfile
from pathlib import Path

DATA = Path(__file__).parent / "data" / "neurips2021_human_bmmc_cite_rna_600x1000.h5ad"
README_CODES = {0, 2, 3, 75, 130}
EXPECTED = 0
SETTINGS = ["data.num_workers=0", "data.cells_per_unit=300", "data.batch_size=100", "model.max_len=64"]


def start(out_dir: Path, extra: list[str]) -> subprocess.Popen:
    args = [sys.executable, "-m", "pipeline", "predict", f"input={DATA}", f"out_dir={out_dir}", *SETTINGS, *extra]
    return subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=os.environ.copy())


def check(name: str, proc: subprocess.Popen, codes: collections.Counter, bad: list[str]) -> None:
    _, stderr = proc.communicate(timeout=600)
    codes[proc.returncode] += 1
    print(f"{name}: exit {proc.returncode}", flush=True)
    if proc.returncode != EXPECTED:
        bad.append(f"{name}: exit {proc.returncode}\n{stderr[-1500:]}")


def stress(runs: int, workdir: Path, extra: list[str]) -> int:
    codes: collections.Counter = collections.Counter()
    bad: list[str] = []
    for i in range(runs):  # in a row
        check(f"run {i}", start(workdir / f"row_{i}", extra), codes, bad)
    for i in range(0, runs, 2):  # two at once, sharing the CPUs
        pair = [start(workdir / f"pair_{i}_{j}", extra) for j in range(2)]
        for j, proc in enumerate(pair):
            check(f"pair {i // 2} run {j}", proc, codes, bad)
    print(f"{sum(codes.values())} predicts: exit codes {dict(sorted(codes.items()))}")
    for line in bad:
        print(line)
    outside = sorted(set(codes) - README_CODES)
    if outside:
        print(f"exit codes outside the README's table: {outside}")
    return 1 if bad else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=30, help="predicts in a row, and as many again two at a time")
    parser.add_argument("--workdir", type=Path, default=None, help="where the atlases go (default: a temporary dir)")
    parser.add_argument("overrides", nargs="*", help="more predict overrides, e.g. data.num_workers=2")
    args = parser.parse_args()
    if args.workdir is not None:
        args.workdir.mkdir(parents=True, exist_ok=True)
        return stress(args.runs, args.workdir, args.overrides)
    with tempfile.TemporaryDirectory() as workdir:
        return stress(args.runs, Path(workdir), args.overrides)


if __name__ == "__main__":
    sys.exit(main())
