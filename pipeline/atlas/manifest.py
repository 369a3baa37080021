"""The manifest of an atlas: the stored plan, the part markers, ``atlas.json`` and ``datasets.parquet``.

Every write is atomic (temporary file + rename), so a run killed at any moment
leaves either the old or the new version of each file.
"""

from __future__ import annotations

import os
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import pandas as pd
from omegaconf import DictConfig, OmegaConf

from pipeline.atlas.labels import term_names
from pipeline.atlas.layout import datasets_path, is_marker, marker_index_path, marker_path, run_dir, units_path
from pipeline.io.files import atomic_write, read_json, write_json
from pipeline.plan.datasets import DatasetPlan, plan_from_record
from pipeline.plan.units import Unit


def tool_version() -> str:
    try:
        return version("scprint-atlas")
    except PackageNotFoundError:
        return "unknown"


def column_blocks(config) -> tuple[list[dict], list[dict]]:
    """Where each embedding block and each class's top labels sit in a part's columns.

    Returns the embedding blocks (``name``, ``start``, ``width``) in ``embs``
    column order, and the classes (``name``, ``k``, ``start``, ``n_labels``) in
    ``top3``/``scores`` column order, from a model config.
    """
    blocks, start = [], 0
    for name, width in config.embedding_blocks:
        blocks.append({"name": name, "start": start, "width": width})
        start += width
    classes, start = [], 0
    for name, k in config.topk.items():
        classes.append({"name": name, "k": k, "start": start, "n_labels": config.classes[name]})
        start += k
    return blocks, classes


#: What the stored plan records of each input: its path and identity (see ``pipeline.plan.datasets.input_identity``).
INPUT_COLUMNS = ("path", "size", "mtime_ns", "fingerprint")


def read_units(out_dir) -> tuple[list[Unit], dict[int, dict]]:
    """The stored plan: its units, and the ``path`` and identity of every dataset it used (:data:`INPUT_COLUMNS`).

    A plan stored by an older version has no identity: ``size``, ``mtime_ns``
    and ``fingerprint`` are then None.
    """
    path = units_path(out_dir)
    if not path.exists():
        return [], {}
    table = pd.read_parquet(path)
    units = [Unit(int(r.part), int(r.dataset), int(r.start), int(r.stop)) for r in table.itertuples()]
    inputs = {}
    for row in table.drop_duplicates("dataset").itertuples():
        inputs[int(row.dataset)] = {c: getattr(row, c, None) for c in INPUT_COLUMNS}
    return units, inputs


def read_plan(out_dir) -> tuple[list[Unit], dict[int, DatasetPlan]]:
    """The plan rank 0 stored for the attempt: its units and the light plan of every dataset (no file opened)."""
    units, inputs = read_units(out_dir)
    table = pd.read_parquet(datasets_path(out_dir))
    datasets = {int(r["dataset"]): plan_from_record(r, inputs.get(int(r["dataset"]))) for r in table.to_dict("records")}
    return units, datasets


def write_units(out_dir, units: list[Unit], inputs: dict[int, dict]) -> None:
    """Store the plan: one row per unit, with its dataset's path and identity (``inputs``, as :func:`read_units`)."""
    table = pd.DataFrame(
        {
            "part": [u.part for u in units],
            "dataset": [u.dataset for u in units],
            "start": [u.start for u in units],
            "stop": [u.stop for u in units],
            **{c: [inputs[u.dataset][c] for u in units] for c in INPUT_COLUMNS},
        }
    )
    atomic_write(units_path(out_dir), lambda tmp: table.to_parquet(tmp, index=False))


def done_parts(out_dir, run: int) -> dict[int, dict]:
    """part id -> its done record, for one run."""
    return _part_records(out_dir, run, "done")


def failed_parts(out_dir, run: int) -> dict[int, dict]:
    """part id -> its failure record (unit, rank, error), for one run."""
    return _part_records(out_dir, run, "failed")


def index_markers(out_dir, run: int) -> tuple[dict[int, dict], dict[int, dict]]:
    """The done and failed records of a run, read once more and stored in the marker indexes; returns both.

    An index maps each marker's name and identity (inode, modification time,
    size) to its record, so the next reader opens only the markers written
    since. The markers stay the truth: a marker gone or rewritten is not taken
    from the index.
    """
    records = []
    for kind in ("done", "failed"):
        found, index = _marker_records(out_dir, run, kind)
        if run_dir(out_dir, run).is_dir():
            write_json(marker_index_path(out_dir, run, kind), {"format": 1, "markers": index})
        records.append(found)
    return records[0], records[1]


def _part_records(out_dir, run: int, kind: str) -> dict[int, dict]:
    return _marker_records(out_dir, run, kind)[0]


def _marker_records(out_dir, run: int, kind: str) -> tuple[dict[int, dict], dict[str, list]]:
    """part -> record of every marker of one kind, and the index entries (name -> [identity..., record])."""
    try:
        entries = [e for e in os.scandir(run_dir(out_dir, run)) if is_marker(e.name, kind)]
    except FileNotFoundError:
        return {}, {}
    try:
        stored = read_json(marker_index_path(out_dir, run, kind)).get("markers", {})
    except (OSError, ValueError):
        stored = {}
    records, index = {}, {}
    for entry in entries:
        try:
            stat = entry.stat()
            identity = [entry.inode(), stat.st_mtime_ns, stat.st_size]
            cached = stored.get(entry.name)
            record = cached[3] if cached is not None and cached[:3] == identity else read_json(entry.path)
        except FileNotFoundError:  # replaced or removed while listed
            continue
        records[int(record["part"])] = record
        index[entry.name] = [*identity, record]
    return dict(sorted(records.items())), index


def mark_done(out_dir, run: int, record: dict) -> None:
    marker_path(out_dir, run, record["part"], "failed").unlink(missing_ok=True)
    write_json(marker_path(out_dir, run, record["part"], "done"), record)


def forget_part(out_dir, run: int, part: int) -> None:
    """Make a done part pending again (its files are damaged), so that the next run embeds its unit again."""
    marker_path(out_dir, run, part, "done").unlink(missing_ok=True)


def damaged_parts(out_dir, done: dict[int, dict]) -> dict[int, str]:
    """Done parts whose files are missing or not of the size their marker records: part -> what is wrong.

    The cheap check a resumed run makes (one ``stat`` per file); the full
    checksums are ``scatlas validate``'s.
    """
    damaged = {}
    for part, record in done.items():
        sizes = record.get("sizes") or dict.fromkeys(record["files"])  # markers of older versions record no sizes
        for name, size in sizes.items():
            try:
                actual = (Path(out_dir) / name).stat().st_size
            except FileNotFoundError:
                damaged[part] = f"{name} is missing"
                break
            if size is not None and actual != size:
                damaged[part] = f"{name} has {actual:,} bytes, not the {size:,} written"
                break
    return damaged


def mark_failed(out_dir, run: int, unit: Unit, rank: int, error: str) -> None:
    record = {"part": unit.part, "dataset": unit.dataset, "start": unit.start, "stop": unit.stop,
              "rank": rank, "error": error}  # fmt: skip
    write_json(marker_path(out_dir, run, unit.part, "failed"), record)


def atlas_description(cfg: DictConfig, model, run: int, runs: list[dict], with_names: bool = False) -> dict:
    """The content of ``atlas.json``; ``with_names`` adds ``label_names`` (term -> ontology name, a slow first lookup)."""
    config = model.config
    blocks, classes = column_blocks(config)
    description = {
        "format": "scprint-atlas/1",
        "tool_version": tool_version(),
        "embedding_width": sum(b["width"] for b in blocks),
        "embedding_blocks": blocks,
        "top_columns": sum(c["k"] for c in classes),
        "classes": classes,
        "labels": {
            c: {str(code): term for code, term in config.label_decoders[c].items() if code < n}
            for c, n in config.classes.items()
        },  # fmt: skip
        "model": {
            "name": cfg.model.name,
            "checkpoint": model.checkpoint_path,
            "checkpoint_sha256": model.checkpoint_sha256,
            "max_len": int(cfg.model.max_len),
            "organisms": config.organisms,
            "vocabulary_size": len(config.vocabulary),
        },
        "config": OmegaConf.to_container(cfg, resolve=True),
        "run": run,
        "runs": runs,
    }
    if with_names:
        description["label_names"] = term_names(t for labels in description["labels"].values() for t in labels.values())
    return description


def write_datasets_table(out_dir: Path, datasets: list[DatasetPlan], units: list[Unit], done: dict[int, dict],
                         failed: dict[int, dict]) -> pd.DataFrame:  # fmt: skip
    """``datasets.parquet``: planning facts plus each dataset's status from the part records (done, failed)."""
    units_of: dict[int, list[Unit]] = {}
    for unit in units:
        units_of.setdefault(unit.dataset, []).append(unit)
    rows = []
    for ds in datasets:
        row = ds.record()
        mine = units_of.get(ds.dataset, [])
        row["n_units"] = len(mine)
        row["n_units_done"] = sum(u.part in done for u in mine)
        row["n_embedded"] = sum(done[u.part]["n_cells"] for u in mine if u.part in done)
        row["n_dropped"] = sum(done[u.part]["n_dropped"] for u in mine if u.part in done)
        errors = [failed[u.part]["error"] for u in mine if u.part in failed and u.part not in done]
        if ds.status != "failed":
            if errors:
                row["status"], row["error"] = "failed", errors[0]
            elif mine and row["n_units_done"] == len(mine):
                row["status"] = "done"
            else:
                row["status"] = "pending"
        rows.append(row)
    table = pd.DataFrame(rows)
    atomic_write(datasets_path(out_dir), lambda tmp: table.to_parquet(tmp, index=False))
    return table
