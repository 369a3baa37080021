"""``scatlas summarize``: tables of predicted labels per dataset and class, score distributions.

Works on the parts that are done, through :class:`pipeline.atlas.Atlas`, one
pass with a progress bar.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.atlas.labels import short_name
from pipeline.atlas.reader import Atlas

#: Score histograms have this many bins over [0, 1]; medians are read from them.
N_SCORE_BINS = 200


#: A top-1 label is called ambiguous when the top-2 score is within this of it.
AMBIGUOUS_MARGIN = 0.05


#: Sparse count tables are compacted after this many parts.
COMPACT_EVERY = 256


# ----------------------------------------------------------------------------- summarize


def summary_tables(atlas: Atlas) -> dict[str, pd.DataFrame]:
    """Count and score tables of an atlas, from one pass over its done parts.

    Classes are named by their short form (``cell_type``, ``tissue``, ...);
    ``label`` is the term of ``atlas.json`` and ``name`` its ontology name.

    Returns
    -------
    dict of pd.DataFrame
        ``datasets``: per dataset, cells embedded and dropped in done parts,
        parts done of planned.
        ``predicted_by_dataset``: per dataset, class and label, the cells
        whose top-1 label it is.
        ``cell_type_by_class``: per dataset, the cells of each pair (top-1
        cell type, top-1 label of another class).
        ``labels``: per class and label, how often it is ranked 1st, 2nd,
        3rd, and the mean and median of its scores at each rank.
        ``top1_top2``: per class, how often each label is runner-up to each
        top-1 label.
        ``classes``: per class, labels used, median scores, median margin
        between the top-1 and top-2 scores, share of ambiguous cells (margin
        below ``AMBIGUOUS_MARGIN``) and of cells whose top-2 score is at least
        0.5 too.
        ``score_histograms``: per class and rank, cells per score bin.
    """
    classes = atlas.description["classes"]
    primary = cell_type_class(atlas)
    primary_info = atlas.class_info(primary)
    rank_counts = {c["name"]: np.zeros((c["k"], c["n_labels"]), np.int64) for c in classes}
    score_sums = {c["name"]: np.zeros((c["k"], c["n_labels"])) for c in classes}
    histograms = {c["name"]: np.zeros((c["k"], c["n_labels"], N_SCORE_BINS), np.int64) for c in classes}
    margins = {c["name"]: np.zeros(N_SCORE_BINS, np.int64) for c in classes if c["k"] >= 2}
    top2_above_half = {c["name"]: 0 for c in classes if c["k"] >= 2}
    pairs = {c["name"]: np.zeros(c["n_labels"] ** 2, np.int64) for c in classes if c["k"] >= 2}
    by_dataset, crossed = (
        _SparseCounts(["dataset", "class", "label"]),
        _SparseCounts(["dataset", "class", "cell_type", "label"]),
    )

    for record, data in atlas.iter_parts(("top3", "scores"), cells=False, description="summarizing"):
        top, scores = np.asarray(data["top3"]), np.asarray(data["scores"])
        primary_top1 = top[:, primary_info["start"]]
        for info in classes:
            name, n_labels = info["name"], info["n_labels"]
            ids = top[:, info["start"] : info["start"] + info["k"]]
            values = scores[:, info["start"] : info["start"] + info["k"]]
            for rank in range(info["k"]):
                rank_counts[name][rank] += np.bincount(ids[:, rank], minlength=n_labels)
                score_sums[name][rank] += np.bincount(ids[:, rank], weights=values[:, rank], minlength=n_labels)
                flat = ids[:, rank] * N_SCORE_BINS + _score_bins(values[:, rank])
                histograms[name][rank] += np.bincount(flat, minlength=n_labels * N_SCORE_BINS).reshape(n_labels, -1)
            if info["k"] >= 2:
                margins[name] += np.bincount(_score_bins(values[:, 0] - values[:, 1]), minlength=N_SCORE_BINS)
                top2_above_half[name] += int((values[:, 1] >= 0.5).sum())
                pairs[name] += np.bincount(ids[:, 0] * n_labels + ids[:, 1], minlength=n_labels**2)
            by_dataset.add((record.dataset, name), ids[:, 0])
            if name != primary:
                crossed.add((record.dataset, name), primary_top1, ids[:, 0], n_labels)

    terms = {c["name"]: atlas.labels(c["name"]) for c in classes}
    tables = {"datasets": _datasets_table(atlas)}

    counts = by_dataset.table()
    tables["predicted_by_dataset"] = _with_names(counts, terms, "class", "label").sort_values(
        ["dataset", "class", "n_cells"], ascending=[True, True, False], kind="stable", ignore_index=True)  # fmt: skip

    crosstab = crossed.table()
    crosstab["cell_type_name"] = _names_of(terms[primary], crosstab["cell_type"])
    crosstab["cell_type"] = _terms_of(terms[primary], crosstab["cell_type"])
    tables["cell_type_by_class"] = _with_names(crosstab, terms, "class", "label")[
        ["dataset", "class", "cell_type", "cell_type_name", "label", "name", "n_cells"]
    ]

    label_rows, class_rows, histogram_rows, pair_rows = [], [], [], []
    bins = np.arange(N_SCORE_BINS + 1) / N_SCORE_BINS
    max_k = max((c["k"] for c in classes), default=0)
    for info in classes:
        name, short, n_cells = info["name"], short_name(info["name"]), int(rank_counts[info["name"]][0].sum())
        table = terms[name].rename(columns={"term": "label"}).drop(columns="id")
        table.insert(0, "class", short)
        for rank in range(max_k):
            held = rank < info["k"]
            n_at_rank = rank_counts[name][rank] if held else np.zeros(info["n_labels"], np.int64)
            table[f"n_top{rank + 1}"] = n_at_rank
            with np.errstate(invalid="ignore", divide="ignore"):
                table[f"mean_score_top{rank + 1}"] = score_sums[name][rank] / n_at_rank if held else np.nan
            table[f"median_score_top{rank + 1}"] = (
                [_histogram_median(h, bins) for h in histograms[name][rank]] if held else np.nan
            )
        label_rows.append(table.sort_values("n_top1", ascending=False, kind="stable"))
        summary = {"class": short, "atlas_name": name, "k": info["k"], "n_labels": info["n_labels"],
                   "n_cells": n_cells, "n_labels_top1": int((rank_counts[name][0] > 0).sum())}  # fmt: skip
        for rank in range(max_k):
            per_rank = histograms[name][rank].sum(axis=0) if rank < info["k"] else None
            summary[f"median_score_top{rank + 1}"] = (
                _histogram_median(per_rank, bins) if per_rank is not None else np.nan
            )
            if per_rank is not None:
                histogram_rows.append(pd.DataFrame({"class": short, "rank": rank + 1, "bin_start": bins[:-1],
                                                    "bin_stop": bins[1:], "n_cells": per_rank}))  # fmt: skip
        if info["k"] >= 2:
            summary["median_margin"] = _histogram_median(margins[name], bins)
            ambiguous_bins = round(AMBIGUOUS_MARGIN * N_SCORE_BINS)
            summary["share_ambiguous"] = margins[name][:ambiguous_bins].sum() / n_cells if n_cells else np.nan
            summary["share_top2_above_half"] = top2_above_half[name] / n_cells if n_cells else np.nan
            square = pairs[name].reshape(info["n_labels"], info["n_labels"])
            top1, top2 = np.nonzero(square)
            pair_rows.append(pd.DataFrame({
                "class": short, "top1": _terms_of(terms[name], top1), "top1_name": _names_of(terms[name], top1),
                "top2": _terms_of(terms[name], top2), "top2_name": _names_of(terms[name], top2),
                "n_cells": square[top1, top2],
            }).sort_values("n_cells", ascending=False, kind="stable"))  # fmt: skip
        class_rows.append(summary)
    tables["labels"] = pd.concat(label_rows, ignore_index=True) if label_rows else pd.DataFrame()
    tables["top1_top2"] = pd.concat(pair_rows, ignore_index=True) if pair_rows else pd.DataFrame()
    tables["classes"] = pd.DataFrame(class_rows)
    tables["score_histograms"] = pd.concat(histogram_rows, ignore_index=True) if histogram_rows else pd.DataFrame()
    return tables


def write_tables(tables: dict[str, pd.DataFrame], out_dir: str | Path) -> list[Path]:
    """Write each table as ``<name>.csv`` and ``<name>.parquet`` under ``out_dir``; returns the CSV paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for name, table in tables.items():
        table.to_csv(out_dir / f"{name}.csv", index=False)
        table.to_parquet(out_dir / f"{name}.parquet", index=False)
        written.append(out_dir / f"{name}.csv")
    return written


def summary_report(atlas: Atlas, tables: dict[str, pd.DataFrame], n_top: int = 3) -> str:
    """A short text report: cells, datasets, and per class its most predicted labels and score figures."""
    datasets = tables["datasets"]
    lines = [
        (
            f"atlas {atlas.out_dir}  run {atlas.run}: {len(atlas.parts)}/{atlas.n_planned_parts} parts done, "
            f"{atlas.n_cells:,} cells embedded, {int(datasets['n_dropped'].sum()):,} dropped, "
            f"{int((datasets['n_embedded'] > 0).sum())}/{len(datasets)} datasets with cells"
        ),
        f"{'class':<12} {'labels':>6} {'used':>5} {'top-1':>6} {'margin':>6} {'ambig.':>6}  most predicted (top-1 share)",
    ]
    labels = tables["labels"]
    for row in tables["classes"].itertuples():
        mine = labels[labels["class"] == row[1]].head(n_top)
        top = ", ".join(f"{r.name} {r.n_top1 / row.n_cells:.0%}" for r in mine.itertuples() if row.n_cells and r.n_top1)
        margin = getattr(row, "median_margin", np.nan)
        ambiguous = getattr(row, "share_ambiguous", np.nan)
        lines.append(f"{row[1]:<12} {row.n_labels:>6} {row.n_labels_top1:>5} {row.median_score_top1:>6.2f} "
                     f"{_fmt(margin, '.2f'):>6} {_fmt(ambiguous, '.0%'):>6}  {top}")  # fmt: skip
    lines.append("top-1: median top-1 score; margin: median top-1 minus top-2 score; "
                 f"ambig.: share of cells with a margin below {AMBIGUOUS_MARGIN}")  # fmt: skip
    return "\n".join(lines)


def cell_type_class(atlas: Atlas) -> str:
    """The class the cross tables are made against: cell type, else the first class."""
    try:
        return atlas.class_name("cell_type")
    except ValueError:
        return atlas.classes[0]


def _datasets_table(atlas: Atlas) -> pd.DataFrame:
    done = atlas.parts.groupby("dataset").agg(n_embedded=("n_cells", "sum"), n_dropped=("n_dropped", "sum"),
                                              n_parts_done=("part", "size"))  # fmt: skip
    table = atlas.datasets[["dataset", "path", "status", "error", "n_cells"]].merge(
        done, left_on="dataset", right_index=True, how="left")  # fmt: skip
    for column in ("n_embedded", "n_dropped", "n_parts_done"):
        table[column] = table[column].fillna(0).astype(np.int64)
    return table


class _SparseCounts:
    """Counts of (key..., code...) tuples accumulated part by part, kept as a compact table."""

    def __init__(self, columns: list[str]):
        self.columns = columns
        self.frames: list[pd.DataFrame] = []

    def add(self, key: tuple, codes: np.ndarray, second: np.ndarray | None = None, n_second: int = 0) -> None:
        flat = codes.astype(np.int64) if second is None else codes.astype(np.int64) * n_second + second
        values, counts = np.unique(flat, return_counts=True)
        frame = {column: value for column, value in zip(self.columns, key)}
        if second is None:
            frame[self.columns[-1]] = values
        else:
            frame[self.columns[-2]], frame[self.columns[-1]] = np.divmod(values, n_second)
        frame["n_cells"] = counts
        self.frames.append(pd.DataFrame(frame))
        if len(self.frames) >= COMPACT_EVERY:
            self.frames = [self.table()]

    def table(self) -> pd.DataFrame:
        if not self.frames:
            return pd.DataFrame(
                {**{c: pd.Series(dtype=np.int64) for c in self.columns}, "n_cells": pd.Series(dtype=np.int64)}
            )
        return (
            pd.concat(self.frames, ignore_index=True).groupby(self.columns, as_index=False, sort=True)["n_cells"].sum()
        )


def _score_bins(values: np.ndarray) -> np.ndarray:
    return np.clip((values * N_SCORE_BINS).astype(np.int64), 0, N_SCORE_BINS - 1)


def _histogram_median(counts: np.ndarray, bins: np.ndarray) -> float:
    total = counts.sum()
    if total == 0:
        return np.nan
    i = int(np.searchsorted(np.cumsum(counts), total / 2))
    return float((bins[i] + bins[i + 1]) / 2)


def _terms_of(labels: pd.DataFrame, ids) -> np.ndarray:
    return labels.set_index("id")["term"].reindex(np.asarray(ids)).to_numpy()


def _names_of(labels: pd.DataFrame, ids) -> np.ndarray:
    return labels.set_index("id")["name"].reindex(np.asarray(ids)).to_numpy()


def _with_names(table: pd.DataFrame, terms: dict, class_column: str, id_column: str) -> pd.DataFrame:
    """Replace class names by their short form and label ids by ``label`` (term) + ``name``."""
    table = table.copy()
    names, labels = np.empty(len(table), object), np.empty(len(table), object)
    for name, group in table.groupby(class_column).groups.items():
        ids = table.loc[group, id_column]
        labels[table.index.get_indexer(group)] = _terms_of(terms[name], ids)
        names[table.index.get_indexer(group)] = _names_of(terms[name], ids)
    table[class_column] = table[class_column].map(short_name)
    table[id_column], table["name"] = labels, names
    return table[[c for c in table.columns if c != "n_cells"] + ["n_cells"]]


def _fmt(value: float, spec: str) -> str:
    return "-" if value is None or pd.isna(value) else format(value, spec)
