"""``scatlas plot``: PCA/UMAP of a cell sample, score histograms, a cell type x tissue (or other class) heatmap."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.analysis.summary import cell_type_class, summary_tables
from pipeline.atlas.labels import short_name
from pipeline.atlas.reader import Atlas

# ----------------------------------------------------------------------------- plot


def plot_atlas(atlas: Atlas, out_dir: str | Path, tables: dict[str, pd.DataFrame] | None = None,
               n_cells: int = 5000, method: str = "pca", seed: int = 0) -> tuple[list[Path], list[str]]:  # fmt: skip
    """Write the atlas plots as PNGs under ``out_dir``; returns their paths and a note per plot left out.

    - ``embedding_{method}.png``: a PCA (or UMAP) of ``n_cells`` cells drawn at
      random, coloured by predicted (top-1) cell type and by dataset;
    - ``score_histograms.png``: per class, the scores of the top-1, top-2 and
      top-3 labels;
    - ``cell_type_by_{other}.png``: cells per (top-1 cell type, top-1 tissue),
      or of the model's first other class when it predicts no tissue; left out,
      with a note, when either axis holds a single label (it would only repeat
      the other's counts).

    ``tables`` are those of :func:`summary_tables` (computed when not given).
    """
    import matplotlib

    matplotlib.use("Agg")
    if atlas.n_cells == 0:
        raise ValueError(f"{atlas.out_dir}: no cells embedded yet (no part is done)")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tables = summary_tables(atlas) if tables is None else tables
    paths = [
        _plot_embedding(atlas, out_dir / f"embedding_{method}.png", n_cells, method, seed),
        _plot_score_histograms(tables["score_histograms"], out_dir / "score_histograms.png"),
    ]
    notes = []
    crossed = _cell_type_by_other(atlas, tables["cell_type_by_class"])
    if crossed is None:
        notes.append("cell type x another class: not plotted, the model predicts no class besides cell type")
    else:
        other, matrix = crossed
        path = out_dir / f"cell_type_by_{other}.png"
        if min(matrix.shape) > 1:
            paths.append(_plot_cell_type_by_other(atlas, other, matrix, path))
        else:
            single = matrix.columns[0] if matrix.shape[1] == 1 else matrix.index[0]
            path.unlink(missing_ok=True)  # a plot of an earlier run would now be out of date
            notes.append(f"{path.name}: not plotted, every cell has the same top-1 "
                         f"{'cell type' if matrix.shape[0] == 1 else other.replace('_', ' ')} ({single})")  # fmt: skip
    return paths, notes


def _cell_type_by_other(atlas: Atlas, crosstab: pd.DataFrame) -> tuple[str, pd.DataFrame] | None:
    """The class crossed with cell type (tissue, else the first other class) and its cells per pair of labels."""
    others = list(dict.fromkeys(crosstab["class"]))
    if not others:
        return None
    other = "tissue" if "tissue" in others else others[0]
    mine = crosstab[crosstab["class"] == other]
    matrix = mine.pivot_table(index="cell_type_name", columns="name", values="n_cells", aggfunc="sum", fill_value=0)
    return other, matrix


def _plot_embedding(atlas: Atlas, path: Path, n_cells: int, method: str, seed: int) -> Path:
    import matplotlib.pyplot as plt
    from sklearn.decomposition import PCA
    from sklearn.preprocessing import StandardScaler

    rows = atlas.sample(n_cells, seed)
    embedding = StandardScaler().fit_transform(atlas.embedding(rows=rows))
    primary = cell_type_class(atlas)
    cell_types = atlas.label_names(primary, atlas.top(primary, k=1, rows=rows)[:, 0])
    stems = {int(d): Path(p).stem for d, p in zip(atlas.datasets["dataset"], atlas.datasets["path"])}
    datasets = np.array([stems[int(d)] for d in atlas.cells(rows)["dataset"]], dtype=object)
    if method == "umap":
        import umap

        reduced = PCA(n_components=min(50, *embedding.shape), random_state=seed).fit_transform(embedding)
        coords = umap.UMAP(random_state=seed, n_jobs=1).fit_transform(reduced)
        axis_names = ("UMAP 1", "UMAP 2")
    elif method == "pca":
        pca = PCA(n_components=2, random_state=seed).fit(embedding)
        coords = pca.transform(embedding)
        axis_names = tuple(f"PC{i + 1} ({share:.0%})" for i, share in enumerate(pca.explained_variance_ratio_))
    else:
        raise ValueError(f"method must be 'pca' or 'umap', got {method!r}")
    figure, axes = plt.subplots(1, 2, figsize=(16, 7))
    for ax, values, title in ((axes[0], cell_types, f"predicted {short_name(primary).replace('_', ' ')} (top-1)"),
                              (axes[1], datasets, "dataset")):  # fmt: skip
        _scatter_by_category(ax, coords, values)
        ax.set_title(title)
        ax.set_xlabel(axis_names[0])
        ax.set_ylabel(axis_names[1])
    figure.suptitle(f"{atlas.out_dir.name}: {method.upper()} of the scPRINT-2 embedding, {len(rows):,} of "
                    f"{atlas.n_cells:,} cells")  # fmt: skip
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def _scatter_by_category(ax, coords: np.ndarray, values: np.ndarray, n_shown: int = 15) -> None:
    import matplotlib.pyplot as plt

    names, counts = np.unique(values, return_counts=True)
    shown = list(names[np.argsort(-counts, kind="stable")][:n_shown])
    colours = plt.get_cmap("tab20").colors
    rest = ~np.isin(values, shown)
    if rest.any():
        ax.scatter(*coords[rest].T, s=3, color="lightgrey", label=f"other ({len(names) - len(shown)})", rasterized=True)
    for i, name in enumerate(shown):
        mask = values == name
        ax.scatter(*coords[mask].T, s=3, color=colours[i % len(colours)], label=f"{name} ({mask.sum():,})",
                   rasterized=True)  # fmt: skip
    ax.legend(loc="center left", bbox_to_anchor=(1.0, 0.5), markerscale=4, fontsize=8, frameon=False)


def _plot_score_histograms(histograms: pd.DataFrame, path: Path) -> Path:
    import matplotlib.pyplot as plt

    classes = list(dict.fromkeys(histograms["class"]))
    n_columns = min(3, max(len(classes), 1))
    n_rows = max(1, -(-len(classes) // n_columns))
    figure, axes = plt.subplots(n_rows, n_columns, figsize=(5 * n_columns, 3.2 * n_rows), squeeze=False)
    for ax, name in zip(axes.flat, classes):
        mine = histograms[histograms["class"] == name]
        used = mine.loc[mine["n_cells"] > 0]
        for rank, group in mine.groupby("rank"):
            ax.stairs(group["n_cells"], np.append(group["bin_start"], group["bin_stop"].iloc[-1]), label=f"top-{rank}")
        if len(used):  # zoom on the scores present, keeping a little room
            low, high = used["bin_start"].min(), used["bin_stop"].max()
            pad = max(0.02, 0.05 * (high - low))
            ax.set_xlim(max(0.0, low - pad), min(1.0, high + pad))
        ax.set_title(name.replace("_", " "))
        ax.set_xlabel("score")
        ax.set_ylabel("cells")
        ax.legend(fontsize=8, frameon=False)
    for ax in list(axes.flat)[len(classes) :]:
        ax.set_visible(False)
    figure.suptitle("scores of the top-1/2/3 labels per class (sigmoid of each label's logit)")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


def _plot_cell_type_by_other(atlas: Atlas, other: str, matrix: pd.DataFrame, path: Path, max_rows: int = 30,
                             max_columns: int = 20) -> Path:  # fmt: skip
    import matplotlib.pyplot as plt
    from matplotlib.colors import LogNorm

    matrix = matrix.loc[matrix.sum(axis=1).sort_values(ascending=False).index[:max_rows],
                        matrix.sum(axis=0).sort_values(ascending=False).index[:max_columns]]  # fmt: skip
    counts = matrix.to_numpy()
    figure, ax = plt.subplots(figsize=(max(6.5, 3.5 + 0.55 * counts.shape[1]), max(4.0, 2.2 + 0.35 * counts.shape[0])))
    norm = LogNorm(vmin=1, vmax=max(int(counts.max(initial=0)), 2))
    image = ax.imshow(np.where(counts > 0, counts, np.nan), cmap="viridis", aspect="auto", norm=norm)
    ax.set_xticks(range(counts.shape[1]), matrix.columns, rotation=45, ha="right")
    ax.set_yticks(range(counts.shape[0]), matrix.index)
    for (i, j), value in np.ndenumerate(counts):
        if value:
            ax.text(j, i, f"{value:,}", ha="center", va="center", fontsize=7,
                    color="black" if norm(value) > 0.6 else "white")  # fmt: skip
    cell_type = short_name(cell_type_class(atlas)).replace("_", " ")
    other = other.replace("_", " ")
    ax.set_xlabel(f"predicted {other} (top-1)")
    ax.set_ylabel(f"predicted {cell_type} (top-1)")
    figure.colorbar(image, ax=ax, label="cells")
    ax.set_title(f"cells per predicted {cell_type} and {other}\n{atlas.n_cells:,} cells, {atlas.parts['dataset'].nunique()} "
                 "datasets", fontsize=10)  # fmt: skip
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path
