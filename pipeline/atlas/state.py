"""The state of an atlas directory from its manifest, ``scatlas status`` and ``scatlas validate``."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.atlas.layout import (
    PART_ARRAYS,
    PART_TABLES,
    datasets_path,
    description_path,
    index_description_path,
    index_file,
    part_file,
    part_files_pattern,
)
from pipeline.atlas.manifest import done_parts, failed_parts, read_units
from pipeline.io.files import file_sha256, read_json
from pipeline.plan.units import Unit


@dataclass
class AtlasState:
    """Everything the manifest says about one run of an atlas directory."""

    out_dir: Path
    run: int
    description: dict
    datasets: pd.DataFrame
    units: list[Unit]
    done: dict[int, dict]
    failed: dict[int, dict]

    @property
    def pending(self) -> list[Unit]:
        failed_datasets = set(self.datasets.loc[self.datasets.status == "failed", "dataset"])
        return [u for u in self.units if u.part not in self.done and u.dataset not in failed_datasets]


def load_state(out_dir: str | Path, run: int | None = None) -> AtlasState:
    """Read ``atlas.json``, ``datasets.parquet``, the unit plan and the part markers."""
    out_dir = Path(out_dir)
    if not description_path(out_dir).exists():
        raise FileNotFoundError(f"{out_dir} is not an atlas directory (no atlas.json)")
    description = read_json(description_path(out_dir))
    run = description["run"] if run is None else run
    units, _ = read_units(out_dir)
    return AtlasState(
        out_dir=out_dir,
        run=run,
        description=description,
        datasets=pd.read_parquet(datasets_path(out_dir)),
        units=units,
        done=done_parts(out_dir, run),
        failed=failed_parts(out_dir, run),
    )


def status_report(state: AtlasState) -> str:
    """Units and cells done, failures, per-rank throughput and an ETA, as text."""
    units_by_part = {u.part: u for u in state.units}
    n_done = len(state.done)
    embedded = sum(r["n_cells"] for r in state.done.values())
    dropped = sum(r["n_dropped"] for r in state.done.values())
    planned_cells = sum(u.n_cells for u in state.units)
    remaining = sum(u.n_cells for u in state.pending)
    lines = [
        f"atlas {state.out_dir}  run {state.run}",
        f"units     {n_done}/{len(state.units)} done, {len(state.pending)} pending",
        f"cells     {embedded:,} embedded, {dropped:,} dropped, of {planned_cells:,} planned",
    ]
    failed_ds = state.datasets[state.datasets.status == "failed"]
    lines.append(f"datasets  {(state.datasets.status == 'done').sum()}/{len(state.datasets)} done, "
                 f"{len(failed_ds)} failed")  # fmt: skip
    for row in failed_ds.itertuples():
        lines.append(f"  failed: {row.error}")
    for part, record in sorted(state.failed.items()):
        if part not in state.done:
            lines.append(f"  failed part {part}: {record['error']}")
    by_rank: dict[int, list[dict]] = {}
    for record in state.done.values():
        by_rank.setdefault(int(record["rank"]), []).append(record)
    total_rate = 0.0
    for rank, records in sorted(by_rank.items()):
        cells = sum(units_by_part[r["part"]].n_cells for r in records if r["part"] in units_by_part)
        seconds = sum(r["seconds"] for r in records)
        rate = cells / seconds if seconds else 0.0
        total_rate += rate
        lines.append(f"rank {rank:>4}  {len(records)} parts, {cells:,} cells, {rate:,.0f} cells/s")
    if remaining and total_rate:
        lines.append(f"ETA       {remaining / total_rate / 60:.1f} min at {total_rate:,.0f} cells/s")
    return "\n".join(lines)


def incomplete_datasets(state: AtlasState) -> list[str]:
    """One line per dataset that is not in the atlas whole: failed (with its error), or with parts not done yet.

    An atlas can be consistent (:func:`validate` finds nothing) and still
    incomplete; ``scatlas validate`` tells the two apart by its exit code.
    """
    pending: dict[int, list[Unit]] = {}
    for unit in state.pending:
        pending.setdefault(unit.dataset, []).append(unit)
    units_of: dict[int, int] = {}
    for unit in state.units:
        units_of[unit.dataset] = units_of.get(unit.dataset, 0) + 1
    lines = []
    for row in state.datasets.itertuples():
        if row.status == "failed":
            lines.append(f"dataset {row.dataset} failed and is not in the atlas: {row.error}")
        elif row.dataset in pending:
            lines.append(f"dataset {row.dataset} ({row.path}): {len(pending[row.dataset])} of "
                         f"{units_of[row.dataset]} parts not done yet; run the same predict command to finish it")  # fmt: skip
    return lines


def validate(out_dir: str | Path, run: int | None = None, quick: bool = False) -> list[str]:
    """Check an atlas is consistent; returns the problems found (empty = consistent). See :func:`check_atlas`."""
    return check_atlas(out_dir, run, quick)[0]


def check_atlas(out_dir: str | Path, run: int | None = None, quick: bool = False) -> tuple[list[str], list[int]]:
    """The consistency problems of an atlas (empty = consistent), and the done parts among them whose files are damaged.

    Checks: every part's five files exist and match the sha256 in its marker;
    the rows of a part agree across files and with ``atlas.json`` widths; every
    row of every done unit is present exactly once, embedded or dropped; no
    stray part files. Datasets that failed or are not done yet are not
    problems here: :func:`incomplete_datasets` names them. A damaged part (a
    file missing, changed or unreadable) is embedded again once
    :func:`pipeline.atlas.manifest.forget_part` made it pending. ``quick``
    checks the plan, the markers and that the files exist, without reading them
    (no checksums, no rows): one listing of the directory.
    """
    state = load_state(out_dir, run)
    out_dir = state.out_dir
    present = set(os.listdir(out_dir))
    stray_prefix = part_files_pattern(state.run).rstrip("*")
    problems, damaged = [], []
    width, n_top = state.description["embedding_width"], state.description["top_columns"]
    units_by_part = {u.part: u for u in state.units}
    expected_files = set()
    for part, record in sorted(state.done.items()):
        unit = units_by_part.get(part)
        if unit is None or (unit.dataset, unit.start, unit.stop) != (
            record["dataset"],
            record["start"],
            record["stop"],
        ):
            problems.append(f"part {part}: marker does not match the plan")
            continue
        expected_files.update(record["files"])
        missing = [f for f in record["files"] if f not in present]
        corrupt = []
        if not quick:
            corrupt = [
                f for f, digest in record["files"].items() if f not in missing and file_sha256(out_dir / f) != digest
            ]
        if missing or corrupt:
            problems.append(f"part {part}: " + "; ".join(
                [f"missing files {missing}"] * bool(missing)
                + [f"files changed since written (checksum mismatch): {corrupt}"] * bool(corrupt)))  # fmt: skip
            damaged.append(part)
            continue
        if quick:
            continue
        found = _check_part(part, unit, read_part(out_dir, record), record, width, n_top)
        problems += found
        damaged += [part] * bool(found)
    stray = sorted(n for n in present if n.startswith(stray_prefix) and n not in expected_files)
    if stray:
        problems.append(f"{len(stray)} part files not in the manifest: {stray[:5]}")
    return problems + [f"index: {p}" for p in index_problems(out_dir, state.run, state.done)], damaged


def index_problems(out_dir: str | Path, run: int, done: dict[int, dict], missing: bool = True) -> list[str]:
    """How the nearest-neighbour index (``index/``, if any) disagrees with the atlas's done parts now.

    An index covering a part the atlas does not have, or whose embeddings changed since (their sha256 in the
    part's done marker differs), is wrong and must be rebuilt; with ``missing``, parts done since the index was
    built are reported too (``scatlas index`` extends it with them).
    """
    path = index_description_path(out_dir)
    if not path.exists():
        return []
    index = read_json(path)
    problems = []
    if int(index["run"]) != int(run):
        problems.append(f"built for run {index['run']}, not run {run}")
    file = index_file(out_dir, index["generation"])
    if not file.exists() or file.stat().st_size != index["file_bytes"]:
        problems.append(f"{file.name} is missing or changed since it was written")
    foreign = [int(p) for p, entry in index["parts"].items()
               if int(p) not in done or done[int(p)]["files"].get(part_file(entry["stem"], "embs")) != entry["embs_sha256"]]  # fmt: skip
    if foreign:
        problems.append(f"it covers {len(foreign)} part(s) the atlas does not have now or whose embeddings changed "
                        f"(parts {foreign[:5]})")  # fmt: skip
    new = sorted(set(done) - {int(p) for p in index["parts"]})
    if missing and new:
        problems.append(f"{len(new)} part(s) ({sum(done[p]['n_cells'] for p in new):,} cells) done since it was "
                        f"built are not in it: `scatlas index {out_dir}` adds them")  # fmt: skip
    return problems


def _check_part(part: int, unit: Unit, data: dict, record: dict, width: int, n_top: int) -> list[str]:
    problems = []
    n = len(data["cells"])
    shapes = {k: data[k].shape for k in ("embs", "top3", "scores")}
    if any(s[0] != n for s in shapes.values()) or n != record["n_cells"]:
        problems.append(
            f"part {part}: row counts disagree: cells {n}, " + ", ".join(f"{k} {s[0]}" for k, s in shapes.items())
        )
    if shapes["embs"][1] != width or shapes["top3"][1] != n_top or shapes["scores"][1] != n_top:
        problems.append(f"part {part}: widths {shapes} do not match atlas.json ({width}, {n_top})")
    rows = np.concatenate([data["cells"]["row"].to_numpy(), data["dropped"]["row"].to_numpy()])
    datasets = np.concatenate([data["cells"]["dataset"].to_numpy(), data["dropped"]["dataset"].to_numpy()])
    if (datasets != unit.dataset).any():
        problems.append(f"part {part}: holds cells of another dataset")
    if len(rows) != unit.n_cells or not np.array_equal(np.sort(rows), np.arange(unit.start, unit.stop)):
        problems.append(
            f"part {part}: cells embedded + dropped ({len(rows)}) are not exactly rows {unit.start}-{unit.stop}"
        )
    return problems


def read_part(out_dir: str | Path, record: dict) -> dict:
    """The arrays and tables of one done part: ``embs``, ``top3``, ``scores``, ``cells``, ``dropped``."""
    part = {}
    for name in PART_ARRAYS:
        with np.load(Path(out_dir) / part_file(record["stem"], name)) as npz:
            part[name] = npz[name]
    for name in PART_TABLES:
        part[name] = pd.read_parquet(Path(out_dir) / part_file(record["stem"], name))
    return part
