"""``scatlas merge``: several shard atlases (``slurm/predict_array.sbatch``) as one atlas directory.

Each shard numbers its datasets and parts from 0. The merged atlas numbers
them again in one space: the datasets and parts of the first shard, then those
of the next, and so on. Its part arrays are links to the shards' files (hard
links, or symbolic links where the shard is on another file system), so no
array is copied: their sha256 in the done markers stay those of the shards. The
small per-part tables (cells, dropped) are rewritten with the new dataset ids
and two more columns, ``shard`` and ``shard_dataset`` (the dataset's id in its
shard), and get new checksums. ``datasets.parquet`` gains ``shard``,
``shard_dataset`` and ``shard_dir``; ``atlas.json`` lists the shards under
``shards``. Every reader of an atlas (``open_atlas``, status, validate,
summarize, plot, probe, export, index) then reads the merged directory as it
reads any atlas.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from pipeline.atlas.layout import (
    PART_ARRAYS,
    PART_TABLES,
    datasets_path,
    description_path,
    part_file,
    part_stem,
)
from pipeline.atlas.manifest import INPUT_COLUMNS, index_markers, mark_done, mark_failed, read_units, write_units
from pipeline.atlas.state import AtlasState, load_state
from pipeline.io.console import track_on_terminal
from pipeline.io.files import atomic_write, file_sha256, write_json
from pipeline.plan.units import Unit

#: The run counter of a merged atlas (its file names and markers): one run, whatever the shards' runs were.
MERGED_RUN = 0
#: A shard directory as ``slurm/predict_array.sbatch`` names it: ``shard_<array task>``.
SHARD_NAME = re.compile(r"^shard_(\d+)$")
#: What must be equal in every shard's ``atlas.json`` for their numbers to be comparable.
SAME_IN_EVERY_SHARD = ("embedding_blocks", "classes", "labels")


@dataclass
class MergeResult:
    """What :func:`merge_shards` wrote: the merged directory and counts, for the command's report."""

    out_dir: Path
    shards: list[dict]
    n_datasets: int
    n_parts: int
    n_cells: int
    n_dropped: int
    hard_links: int
    symlinks: int


def shard_dirs(paths: list[str | Path]) -> list[tuple[int, Path]]:
    """The shard atlases named by ``paths``, as ``(shard number, directory)`` in merge order.

    A path that is no atlas but holds ``shard_<i>`` directories (the
    ``OUT_DIR`` of ``slurm/predict_array.sbatch``) stands for them. When every
    shard is named ``shard_<i>``, ``i`` is its number and the order; otherwise
    the shards are numbered in the order given.
    """
    found: list[Path] = []
    for path in map(Path, paths):
        if not path.exists():
            raise FileNotFoundError(f"{path}: no such shard atlas")
        inner = sorted(p for p in path.iterdir() if p.is_dir() and SHARD_NAME.match(p.name)) if path.is_dir() else []
        if not description_path(path).exists() and inner:
            found += inner
        elif not description_path(path).exists():
            raise FileNotFoundError(f"{path} is not an atlas directory (no atlas.json): its array task has not "
                                    "started, or it is not a shard")  # fmt: skip
        else:
            found.append(path)
    if not found:
        raise ValueError("no shard atlas to merge")
    resolved = [p.resolve() for p in found]
    repeated = sorted({str(p) for p in resolved if resolved.count(p) > 1})
    if repeated:
        raise ValueError(f"{repeated[0]} is named twice; give each shard once")
    matches = [SHARD_NAME.match(p.name) for p in found]
    numbers = [int(m.group(1)) for m in matches if m]
    if len(numbers) == len(found) and len(set(numbers)) == len(numbers):
        return sorted(zip(numbers, found))
    return list(enumerate(found))


def merge_shards(paths: list[str | Path], out_dir: str | Path) -> MergeResult:
    """Write one atlas directory ``out_dir`` that holds every shard atlas of ``paths``, linking their arrays.

    Parameters
    ----------
    paths : list of str or Path
        Shard atlas directories, or a directory holding ``shard_<i>`` ones.
    out_dir : str or Path
        The merged atlas; it must not exist or be an empty directory. It is
        written beside itself and renamed into place when complete.

    Returns
    -------
    MergeResult

    Raises
    ------
    ValueError
        A shard is not finished, the shards were made with other models or
        settings, one input is in two shards, or ``out_dir`` is not empty.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise ValueError(f"{out_dir} exists and is not an empty directory; merge into a new directory")
    shards = [(number, load_state(path)) for number, path in shard_dirs(paths)]
    _check_shards(shards)
    staging = out_dir.parent / f".{out_dir.name}.merge-{os.getpid()}"
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    for leftover in out_dir.parent.glob(f".{out_dir.name}.merge-*"):
        shutil.rmtree(leftover, ignore_errors=True)
    staging.mkdir()
    try:
        result = _write_merged(shards, staging, out_dir)
        os.replace(staging, out_dir)  # replaces an empty directory too
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    index_markers(out_dir, MERGED_RUN)  # the marker cache, so readers need not open every marker
    return result


def _check_shards(shards: list[tuple[int, AtlasState]]) -> None:
    """Refuse shards that are not finished, made with other settings than the first, or that share an input."""
    first = shards[0][1]
    first_settings = _run_settings(first)
    seen_paths: dict[str, Path] = {}
    for _, state in shards:
        if state.pending:
            raise ValueError(f"shard {state.out_dir} is not finished: {len(state.pending)} of {len(state.units)} "
                             f"parts still to do; see scatlas status {state.out_dir}, finish it or leave it out")  # fmt: skip
        settings = _run_settings(state)
        changed = sorted(k for k in {*settings, *first_settings} if settings.get(k) != first_settings.get(k))
        changed += [k for k in SAME_IN_EVERY_SHARD if state.description.get(k) != first.description.get(k)]
        if changed:
            raise ValueError(f"shard {state.out_dir} was made with other settings than {first.out_dir} "
                             f"({', '.join(changed)}); merge only shards of one model and one set of settings")  # fmt: skip
        for path in state.datasets["path"].astype(str):
            if path in seen_paths:
                raise ValueError(f"input {path} is in both {seen_paths[path]} and {state.out_dir}: its cells would "
                                 "be in the merged atlas twice")  # fmt: skip
            seen_paths[path] = state.out_dir


def _run_settings(state: AtlasState) -> dict:
    """What changes the numbers of an atlas's run (``atlas.json`` runs[].settings), with the checkpoint's sha256."""
    return {**_latest_run(state).get("settings", {}),
            "checkpoint_sha256": state.description["model"].get("checkpoint_sha256")}  # fmt: skip


def _latest_run(state: AtlasState) -> dict:
    """The entry of ``atlas.json``'s ``runs`` of the run being read: its settings and attempts."""
    return next((r for r in state.description.get("runs", []) if r["run"] == state.run), {})


def _write_merged(shards: list[tuple[int, AtlasState]], staging: Path, out_dir: Path) -> MergeResult:
    """Write the merged atlas into ``staging`` (renamed to ``out_dir`` by the caller)."""
    units: list[Unit] = []
    inputs: dict[int, dict] = {}
    dataset_rows: list[pd.DataFrame] = []
    shard_entries: list[dict] = []
    attempts: list[dict] = []
    links = {"hard": 0, "symbolic": 0}
    n_cells = n_dropped = 0
    for number, state in shards:
        first_dataset, first_part = sum(len(t) for t in dataset_rows), len(units)
        new_dataset = {int(d): first_dataset + i for i, d in enumerate(sorted(state.datasets["dataset"]))}
        shard_units, shard_inputs = read_units(state.out_dir)
        new_part = {u.part: first_part + i for i, u in enumerate(sorted(shard_units, key=lambda u: u.part))}
        for unit in shard_units:
            units.append(Unit(new_part[unit.part], new_dataset[unit.dataset], unit.start, unit.stop))
        for dataset, identity in shard_inputs.items():
            inputs[new_dataset[dataset]] = identity
        table = state.datasets.sort_values("dataset").reset_index(drop=True)
        table.insert(1, "shard", number)
        table.insert(2, "shard_dataset", table["dataset"])
        table["dataset"] = table["shard_dataset"].map(new_dataset)
        table["shard_dir"] = str(state.out_dir.resolve())
        dataset_rows.append(table)
        linking = f"shard {number}: linking {len(state.done):,} parts"
        for part, record in track_on_terminal(state.done.items(), len(state.done), linking):
            kinds = _link_part(state, record, staging, new_part[part], new_dataset, number)
            for kind in kinds:
                links[kind] += 1
            n_cells += int(record["n_cells"])
            n_dropped += int(record["n_dropped"])
        for part, record in state.failed.items():
            if part not in state.done:
                unit = Unit(new_part[part], new_dataset[int(record["dataset"])], int(record["start"]),
                            int(record["stop"]))  # fmt: skip
                mark_failed(staging, MERGED_RUN, unit, int(record["rank"]), record["error"])
        attempts += [{**attempt, "shard": number} for attempt in _latest_run(state).get("attempts", [])]
        shard_entries.append({"shard": number, "path": str(state.out_dir.resolve()), "run": state.run,
                              "first_dataset": first_dataset, "n_datasets": len(new_dataset),
                              "first_part": first_part, "n_parts": len(new_part)})  # fmt: skip
    datasets = pd.concat(dataset_rows, ignore_index=True)
    atomic_write(datasets_path(staging), lambda tmp: datasets.to_parquet(tmp, index=False))
    write_units(staging, units, {d: {c: inputs[d].get(c) for c in INPUT_COLUMNS} for d in inputs})
    write_json(description_path(staging), _merged_description(shards, out_dir, shard_entries, attempts))
    return MergeResult(out_dir, shard_entries, len(datasets), len(units), n_cells, n_dropped, links["hard"],
                       links["symbolic"])  # fmt: skip


def _link_part(state: AtlasState, record: dict, staging: Path, part: int, new_dataset: dict[int, int],
               shard: int) -> list[str]:  # fmt: skip
    """Link one done part of a shard into ``staging`` as part ``part``, rewrite its tables and mark it done.

    Returns the kind of link made for each array (``hard`` or ``symbolic``).
    """
    stem = part_stem(MERGED_RUN, part, int(record["rank"]))
    files, sizes, kinds = {}, {}, []
    for name in PART_ARRAYS:
        source = state.out_dir / part_file(record["stem"], name)
        target = staging / part_file(stem, name)
        kinds.append(_link(source, target))
        files[target.name] = record["files"][source.name]
        sizes[target.name] = source.stat().st_size
    for name in PART_TABLES:
        source = state.out_dir / part_file(record["stem"], name)
        if file_sha256(source) != record["files"][source.name]:
            raise ValueError(f"{source} changed since it was written (checksum mismatch); see scatlas validate "
                             f"{state.out_dir}")  # fmt: skip
        table = pd.read_parquet(source)
        table["shard"] = shard
        table["shard_dataset"] = table["dataset"]
        # a part holds one dataset's cells: its new id is set directly, not mapped through every dataset's
        dataset = int(record["dataset"])
        if not table["dataset"].eq(dataset).all():
            raise ValueError(f"{source} holds cells of another dataset than its part's ({dataset}); see scatlas "
                             f"validate {state.out_dir}")  # fmt: skip
        table["dataset"] = pd.Series(new_dataset[dataset], index=table.index, dtype="int64")
        target = staging / part_file(stem, name)
        atomic_write(target, lambda tmp, t=table: t.to_parquet(tmp, index=False))
        files[target.name] = file_sha256(target)
        sizes[target.name] = target.stat().st_size
    mark_done(staging, MERGED_RUN, {**record, "part": part, "dataset": new_dataset[int(record["dataset"])],
                                    "stem": stem, "files": files, "sizes": sizes, "shard": shard,
                                    "shard_part": record["part"]})  # fmt: skip
    return kinds


def _link(source: Path, target: Path) -> str:
    """A hard link ``target`` to ``source``, or a symbolic link where a hard link cannot be made; returns which."""
    try:
        os.link(source, target)
        return "hard"
    except FileNotFoundError:
        raise FileNotFoundError(f"{source} is missing; see scatlas validate {source.parent}") from None
    except OSError as err:
        if err.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP):
            raise
    os.symlink(source.resolve(), target)
    return "symbolic"


def _merged_description(shards: list[tuple[int, AtlasState]], out_dir: Path, shard_entries: list[dict],
                        attempts: list[dict]) -> dict:  # fmt: skip
    """``atlas.json`` of the merged atlas: the first shard's, with one run, every shard's inputs and the shards."""
    description = dict(shards[0][1].description)
    config = dict(description.get("config", {}))
    inputs = []
    for _, state in shards:
        value = state.description.get("config", {}).get("input")
        inputs += value if isinstance(value, list) else [value]
    config.update(out_dir=str(out_dir), input=inputs, run=MERGED_RUN)
    label_names = {}
    for _, state in shards:
        label_names.update(state.description.get("label_names", {}))
    description.update(config=config, run=MERGED_RUN, shards=shard_entries,
                       runs=[{"run": MERGED_RUN, "settings": _latest_run(shards[0][1]).get("settings", {}),
                             "attempts": attempts}])  # fmt: skip
    if label_names:
        description["label_names"] = label_names
    return description
