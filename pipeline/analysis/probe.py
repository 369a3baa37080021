"""``scatlas probe``: a linear probe of the embeddings against a label column of the source datasets."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.atlas.reader import Atlas

# ----------------------------------------------------------------------------- probe


def linear_probe(atlas: Atlas, label: str, block: str | None = None, max_cells: int = 100_000,
                 test_size: float = 0.25, seed: int = 0) -> dict:  # fmt: skip
    """Train a logistic-regression probe on the embeddings against a source ``obs`` column.

    Up to ``max_cells`` atlas cells are drawn at random; those whose source
    dataset has the column ``label`` (and a value there) are kept, and labels
    with fewer than 2 cells dropped. The cells are split, stratified by label,
    into a training and a held-out set (``test_size``, fixed ``seed``); the
    embedding (a ``block`` or all columns) is standardized on the training set.

    Returns
    -------
    dict
        ``accuracy``, ``macro_f1`` on the held-out cells, and the same for the
        majority-class baseline (``baseline_accuracy``, ``baseline_macro_f1``),
        with the numbers of cells, labels and datasets used.
    """
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import accuracy_score, f1_score
    from sklearn.model_selection import train_test_split
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    from threadpoolctl import threadpool_limits

    if block is not None:
        atlas.block_columns(block)  # an unknown block fails before the source files are read
    rows = atlas.sample(max_cells, seed)
    values = atlas.source_obs(label, rows)[label]
    labelled = values.notna().to_numpy() & (values.astype(str).str.strip() != "").to_numpy()
    if not labelled.any():
        raise ValueError(f"{atlas.out_dir}: no source dataset has cells with an obs column {label!r}")
    rows, y = rows[labelled], values.to_numpy()[labelled].astype(str)
    names, counts = np.unique(y, return_counts=True)
    kept = np.isin(y, names[counts >= 2])
    rows, y = rows[kept], y[kept]
    n_labels = len(np.unique(y))
    if n_labels < 2:
        raise ValueError(f"{atlas.out_dir}: obs column {label!r} has fewer than 2 labels with 2 or more cells")
    n_test = max(round(test_size * len(y)), n_labels)
    if len(y) - n_test < n_labels:
        raise ValueError(
            f"{atlas.out_dir}: {len(y)} labelled cells are too few for a stratified split of {n_labels} labels"
        )
    x = atlas.embedding(block, rows=rows)
    datasets = atlas.cells(rows)["dataset"].unique()
    x_train, x_test, y_train, y_test = train_test_split(x, y, test_size=n_test, stratify=y, random_state=seed)
    model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
    # small problems: one BLAS thread (threaded OpenBLAS is many times slower on small matrices on a busy machine)
    threads = 1 if x_train.size < 10_000_000 else None
    with threadpool_limits(threads, user_api="blas"), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConvergenceWarning)
        predicted = model.fit(x_train, y_train).predict(x_test)
    majority = pd.Series(y_train).value_counts().index[0]
    baseline = np.full(len(y_test), majority, dtype=object)
    return {
        "label": label,
        "block": "all" if block is None else block,
        "n_columns": int(x.shape[1]),
        "n_cells": len(y),
        "n_train": len(y_train),
        "n_test": len(y_test),
        "n_labels": int(n_labels),
        "n_labels_dropped": int((counts < 2).sum()),
        "datasets": sorted(int(d) for d in datasets),
        "accuracy": float(accuracy_score(y_test, predicted)),
        "macro_f1": float(f1_score(y_test, predicted, average="macro", zero_division=0)),
        "baseline_label": str(majority),
        "baseline_accuracy": float(accuracy_score(y_test, baseline)),
        "baseline_macro_f1": float(f1_score(y_test, baseline, average="macro", zero_division=0)),
        "converged": not any(issubclass(w.category, ConvergenceWarning) for w in caught),
        "seed": seed,
    }


def write_probe(result: dict, out_dir: str | Path) -> Path:
    """Write a probe result as ``probe_<label>.json`` under ``out_dir``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"probe_{result['label']}.json"
    path.write_text(json.dumps(result, indent=1))
    return path


def probe_report(result: dict) -> str:
    return (
        f"linear probe of obs[{result['label']!r}] on the embedding ({result['block']}, {result['n_columns']} columns): "
        f"{result['n_cells']:,} cells of {len(result['datasets'])} dataset(s), {result['n_labels']} labels"
        + (f" ({result['n_labels_dropped']} with a single cell left out)" if result["n_labels_dropped"] else "")
        + f"\nheld out {result['n_test']:,} cells: accuracy {result['accuracy']:.3f}, macro-F1 {result['macro_f1']:.3f}"
        f"\nmajority-class baseline ({result['baseline_label']!r}): accuracy {result['baseline_accuracy']:.3f}, "
        f"macro-F1 {result['baseline_macro_f1']:.3f}"
        + ("" if result["converged"] else "\n(the logistic regression did not converge in 2000 iterations)")
    )
