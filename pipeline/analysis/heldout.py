"""Held-out accuracy of the demo model: what ``scatlas predict`` adds to its summary for a checkpoint
made by ``scatlas train-demo`` (``<name>.heldout.csv`` next to it).
"""

from __future__ import annotations

from collections import Counter
from importlib import resources
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.atlas.layout import part_file
from pipeline.atlas.state import load_state
from pipeline.io.files import memmap_npz

CELL_TYPE, ORGANISM = "cell_type_ontology_term_id", "organism_ontology_term_id"


def cell_type_table() -> pd.DataFrame:
    """The reviewed map of the files' cell-type names to Cell Ontology terms (``models/data/demo_cell_types.csv``).

    Column ``term`` is the label the model learns: the CL id, or the original
    name where the table gives no CL id.
    """
    with resources.files("models").joinpath("data/demo_cell_types.csv").open("r") as fh:
        table = pd.read_csv(fh, keep_default_na=False)
    table["term"] = table.cl_id.where(table.cl_id != "", table.dataset_label)
    return table


# ----------------------------------------------------------------------------- evaluation


def accuracy(cells: pd.DataFrame, top: dict[str, np.ndarray], decoders: dict[str, dict[int, str]]) -> dict:
    """Top-1 / top-3 cell-type and top-1 organism accuracy, each beside its chance level.

    ``top`` holds each class's predicted label codes ([n, k], best first) for
    the rows of ``cells``, whose columns hold the true terms. The chance level
    ``<metric>_chance`` is the accuracy of the best constant answer: the k
    most frequent true labels of these cells.
    """
    result = {"n_cells": len(cells)}
    for name, short, ks in ((CELL_TYPE, "cell_type", (1, 3)), (ORGANISM, "organism", (1,))):
        truth = cells[name].to_numpy()
        predicted = np.array([[decoders[name][int(code)] for code in row] for row in top[name]], dtype=object)
        hits = predicted.reshape(len(truth), -1) == truth[:, None]
        counts = cells[name].value_counts().to_numpy()
        for k in ks:
            result[f"{short}_top{k}"] = float(hits[:, :k].any(1).mean()) if len(truth) else float("nan")
            result[f"{short}_top{k}_chance"] = float(counts[:k].sum() / len(truth)) if len(truth) else float("nan")
    return result


def describe(metrics: dict) -> str:
    """One line: held-out accuracies beside their chance levels."""
    return (
        f"cell type top-1 {metrics['cell_type_top1']:.1%} (chance {metrics['cell_type_top1_chance']:.1%}), "
        f"top-3 {metrics['cell_type_top3']:.1%} (chance {metrics['cell_type_top3_chance']:.1%}); "
        f"organism {metrics['organism_top1']:.1%} (chance {metrics['organism_top1_chance']:.1%})"
    )


def heldout_report(out_dir: Path, run: int) -> list[str]:
    """What ``scatlas predict`` adds to its summary for a checkpoint made by ``scatlas train-demo``.

    Empty unless the atlas's checkpoint has its held-out split
    (``<name>.heldout.csv``) next to it and the atlas embedded cells of those
    files. Otherwise: the most frequent predicted cell types of those files'
    cells, counted from the done markers, and the accuracy on their held-out
    cells, which training never saw. Only the held-out rows of those files'
    parts are read (memory-mapped), never the whole atlas.
    """
    state = load_state(out_dir, run)
    checkpoint = state.description["model"].get("checkpoint")
    split_path = Path(checkpoint).with_suffix(".heldout.csv") if checkpoint else None
    classes = {c["name"]: c for c in state.description["classes"]}
    if split_path is None or not split_path.is_file() or not {CELL_TYPE, ORGANISM} <= set(classes):
        return []
    split = pd.read_csv(split_path, keep_default_na=False)
    files = {row.dataset: Path(row.path).name for row in state.datasets.itertuples()}
    files = {dataset: name for dataset, name in files.items() if name in set(split.file)}
    records = [record for record in state.done.values() if record["dataset"] in files and "top1" in record]
    if not records:
        return []
    decoders = {c: {int(code): term for code, term in state.description["labels"][c].items()} for c in classes}
    table = cell_type_table()
    names = dict(zip(table.term, table.cl_name.where(table.cl_name != "", table.term)))
    predicted = Counter()
    for record in records:
        predicted.update({decoders[CELL_TYPE][int(code)]: n for code, n in record["top1"][CELL_TYPE].items()})
    lines = [
        f"most predicted cell types ({sum(r['n_cells'] for r in records)} cells): "
        + ", ".join(f"{names.get(term, term)} {n}" for term, n in predicted.most_common(6))
    ]
    try:
        test, top = _heldout_cells(out_dir, records, files, split, classes)
    except (OSError, ValueError) as err:  # a damaged part: validate names it and says how to repair it
        return [*lines, f"held-out cells: not read ({' '.join(str(err).split())}); run scatlas validate {out_dir}"]
    if len(test):
        metrics = accuracy(test, top, decoders)
        lines.append(f"held-out cells ({len(test)}, not used in training; {split_path.name}): {describe(metrics)}")
    return lines


def _heldout_cells(out_dir: Path, records: list[dict], files: dict[int, str], split: pd.DataFrame, classes: dict):
    """The held-out cells among ``records``' parts (their split columns) and their top labels per class."""
    tests, tops = [], {c: [] for c in (CELL_TYPE, ORGANISM)}
    for record in records:
        cells = pd.read_parquet(Path(out_dir) / part_file(record["stem"], "cells"), columns=["row", "obs_name"])
        cells["file"] = files[record["dataset"]]
        cells["position"] = np.arange(len(cells))
        test = cells.merge(split, on=["file", "row", "obs_name"])
        if not len(test):
            continue
        top3 = memmap_npz(Path(out_dir) / part_file(record["stem"], "top3"), "top3")
        rows = np.asarray(top3[np.sort(test.position.to_numpy())])
        test = test.sort_values("position")
        for c in tops:
            tops[c].append(rows[:, classes[c]["start"] : classes[c]["start"] + classes[c]["k"]])
        tests.append(test)
    if not tests:
        return pd.DataFrame(), {}
    return pd.concat(tests, ignore_index=True), {c: np.concatenate(v) for c, v in tops.items()}
