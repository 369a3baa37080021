"""Reading an atlas: :func:`open_atlas` and :class:`Atlas`, a lazy, memory-mapped view of its done parts."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.atlas.labels import short_name, term_names
from pipeline.atlas.layout import PART_ARRAYS, part_file
from pipeline.atlas.state import load_state
from pipeline.io.console import track_on_terminal
from pipeline.io.files import memmap_npz
from pipeline.io.formats import open_counts

# ----------------------------------------------------------------------------- the Python API: open_atlas


def open_atlas(out_dir: str | Path, run: int | None = None, progress: bool = True) -> Atlas:
    """Open an atlas directory for reading; only its manifest is read.

    Parameters
    ----------
    out_dir : str or Path
        The ``out_dir`` of a ``scatlas predict`` run. It may still be being
        written: the atlas holds the parts that are done now.
    run : int, optional
        Run counter; default the latest run.
    progress : bool
        Show a progress bar (on stderr) on every pass over parts.

    Returns
    -------
    Atlas
    """
    state = load_state(out_dir, run)
    records = [state.done[p] for p in sorted(state.done)]
    parts = pd.DataFrame(
        {
            key: pd.Series([r[key] for r in records], dtype=object if key == "stem" else np.int64)
            for key in ("part", "dataset", "start", "stop", "rank", "stem", "n_cells", "n_dropped")
        }
    )
    parts["first"] = np.cumsum(parts["n_cells"].to_numpy()) - parts["n_cells"].to_numpy()
    return Atlas(state.out_dir, state.run, state.description, state.datasets, parts, len(state.units), progress)


@dataclass
class Atlas:
    """A read-only view of an atlas directory: its done parts, read lazily.

    Build it with :func:`open_atlas`. Cells are numbered 0 .. ``n_cells - 1``
    in part order, then row order within a part (the *atlas row*). Every
    method taking ``rows`` accepts ``None`` (all cells), an array of atlas
    rows (any order; the result follows it) or a boolean mask of length
    ``n_cells``. Arrays are memory-mapped from the ``.npz`` files, so only the
    rows asked for are read.

    Class and block names are those of ``atlas.json`` (e.g.
    ``cell_type_ontology_term_id``), or a short form: ``cell_type``, ``tissue``,
    ``disease``, ``age``, ``assay``, ``ethnicity``, ``sex``, ``organism``,
    ``cell_culture``.

    Attributes
    ----------
    out_dir : Path
    run : int
    description : dict
        ``atlas.json``.
    datasets : pd.DataFrame
        ``datasets.parquet``: ``dataset``, ``path``, ``status``, ...
    parts : pd.DataFrame
        One row per done part, in part order: ``part``, ``dataset``,
        ``start``, ``stop`` (its source rows), ``stem``, ``n_cells``,
        ``n_dropped``, ``first`` (atlas row of its first cell).
    n_planned_parts : int
        Units in the plan; more than ``len(parts)`` while a run is going on.
    progress : bool
        Show progress bars on passes over parts.
    """

    out_dir: Path
    run: int
    description: dict
    datasets: pd.DataFrame
    parts: pd.DataFrame
    n_planned_parts: int
    progress: bool = True

    def __repr__(self) -> str:
        return (f"Atlas({str(self.out_dir)!r}, run {self.run}: {len(self.parts)}/{self.n_planned_parts} parts done, "
                f"{self.n_cells:,} cells, {self.embedding_width} embedding columns, {len(self.classes)} classes)")  # fmt: skip

    @property
    def n_cells(self) -> int:
        """Cells embedded in the done parts."""
        return int(self.parts["n_cells"].sum())

    @property
    def embedding_width(self) -> int:
        return int(self.description["embedding_width"])

    @property
    def blocks(self) -> list[str]:
        """Embedding block names, in column order (``other`` first)."""
        return [b["name"] for b in self.description["embedding_blocks"]]

    @property
    def classes(self) -> list[str]:
        """Class names, in column order."""
        return [c["name"] for c in self.description["classes"]]

    def class_name(self, name: str) -> str:
        """The ``atlas.json`` name of a class given by its name or short form (``cell_type``)."""
        return _match_name(name, self.classes, "class", self.out_dir)

    def class_info(self, name: str) -> dict:
        """``atlas.json``'s entry for a class: ``name``, ``k``, ``start``, ``n_labels``."""
        full = self.class_name(name)
        return next(c for c in self.description["classes"] if c["name"] == full)

    def block_columns(self, name: str) -> slice:
        """The embedding columns of a block, e.g. ``block_columns("cell_type")`` -> ``slice(256, 320)``."""
        full = _match_name(name, self.blocks, "embedding block", self.out_dir)
        block = next(b for b in self.description["embedding_blocks"] if b["name"] == full)
        return slice(block["start"], block["start"] + block["width"])

    def top_columns(self, name: str, k: int | None = None) -> slice:
        """The ``top3`` / ``scores`` columns of a class's top ``k`` labels (default: all the atlas holds)."""
        info = self.class_info(name)
        k = info["k"] if k is None else int(k)
        if not 1 <= k <= info["k"]:
            raise ValueError(f"{self.out_dir}: {info['name']} holds the top {info['k']} labels, asked for k={k}")
        return slice(info["start"], info["start"] + k)

    # ------------------------------------------------------------------ labels

    def labels(self, name: str) -> pd.DataFrame:
        """The label vocabulary of a class: ``id``, ``term`` (``atlas.json``) and ``name`` (human-readable)."""
        full = self.class_name(name)
        vocabulary = self.description["labels"][full]
        ids = sorted(int(i) for i in vocabulary)
        terms = [vocabulary[str(i)] for i in ids]
        names = term_names(terms)
        return pd.DataFrame({"id": ids, "term": terms, "name": [names[t] for t in terms]})

    def decode(self, name: str, ids: np.ndarray) -> np.ndarray:
        """Label ids of a class -> their terms (as in ``atlas.json``), same shape."""
        return self._lookup(name, ids, "term")

    def label_names(self, name: str, ids: np.ndarray) -> np.ndarray:
        """Label ids of a class -> human-readable names (the term itself when no ontology name is known)."""
        return self._lookup(name, ids, "name")

    def _lookup(self, name: str, ids: np.ndarray, column: str) -> np.ndarray:
        table = self.labels(name)
        values = np.full(int(table["id"].max()) + 1 if len(table) else 0, "", dtype=object)
        values[table["id"].to_numpy()] = table[column].to_numpy()
        ids = np.asarray(ids)
        if ids.size and (ids.min() < 0 or ids.max() >= len(values)):
            raise ValueError(f"{self.out_dir}: label ids outside the vocabulary of {self.class_name(name)}")
        return values[ids]

    # ------------------------------------------------------------------ arrays

    def array(self, part: int, kind: str) -> np.ndarray:
        """One part's ``embs``, ``top3`` or ``scores`` array, memory-mapped (read-only)."""
        if kind not in PART_ARRAYS:
            raise ValueError(f"kind must be one of {list(PART_ARRAYS)}, got {kind!r}")
        return memmap_npz(self.out_dir / part_file(self._stem(part), kind), kind)

    def part_cells(self, part: int) -> pd.DataFrame:
        """One part's cell table (dataset, row, obs_name, organism, ...)."""
        return pd.read_parquet(self.out_dir / part_file(self._stem(part), "cells"))

    def _stem(self, part: int) -> str:
        """The file stem of a done part, found by bisection (:attr:`parts` is in part order): a pass over every
        part costs n log n, where a scan of the table per part grew as n squared."""
        done = self.parts["part"].to_numpy()
        i = int(np.searchsorted(done, part))
        if i == len(done) or done[i] != part:
            raise ValueError(f"{self.out_dir}: part {part} is not done")
        return self.parts["stem"].iat[i]

    def iter_parts(self, kinds=("embs", "top3", "scores"), cells: bool = True, description: str = "reading parts"):
        """One pass over the done parts, with a progress bar.

        Yields
        ------
        (pd.Series, dict)
            The part's row of :attr:`parts`, and its arrays by kind
            (memory-mapped) plus ``cells`` (its cell table) when
            ``cells`` is true.
        """
        for record in self._track(self.parts.itertuples(index=False), len(self.parts), description):
            data = {kind: self.array(record.part, kind) for kind in kinds}
            if cells:
                data["cells"] = self.part_cells(record.part)
            yield record, data

    def cells(self, rows=None) -> pd.DataFrame:
        """The cells' ``dataset``, ``row``, ``obs_name``, ... plus ``part``, indexed by atlas row."""
        return self._read(rows, {"cells": None}, "reading cells")["cells"]

    def embedding(self, block: str | None = None, rows=None) -> np.ndarray:
        """Embedding columns of the cells: a named block (``cell_type``, ``other``, ...) or all (``None``)."""
        columns = slice(None) if block is None else self.block_columns(block)
        return self._read(rows, {"embs": columns}, "reading embeddings")["embs"]

    def top(self, name: str, k: int | None = None, rows=None) -> np.ndarray:
        """Ids of the top ``k`` labels of a class (default: all the atlas holds), ``[n, k]`` int32."""
        return self._read(rows, {"top3": self.top_columns(name, k)}, "reading top labels")["top3"]

    def scores(self, name: str, k: int | None = None, rows=None) -> np.ndarray:
        """Scores of the top ``k`` labels of a class, ``[n, k]`` float32, matching :meth:`top`."""
        return self._read(rows, {"scores": self.top_columns(name, k)}, "reading scores")["scores"]

    def predictions(self, rows=None, k: int | None = None) -> pd.DataFrame:
        """Decoded predictions, indexed by atlas row.

        For each class (short name, e.g. ``cell_type``) and rank ``r`` up to
        ``k`` (default: all the atlas holds): ``cell_type_top{r}`` (the term),
        ``cell_type_top{r}_name`` and ``cell_type_top{r}_score``.
        """
        data = self._read(rows, {"top3": slice(None), "scores": slice(None)}, "reading predictions")
        return self._prediction_table(data["top3"], data["scores"], k, data["index"])

    def sample(self, n: int, seed: int = 0) -> np.ndarray:
        """``n`` atlas rows drawn without replacement (all rows if ``n >= n_cells``), sorted."""
        if n >= self.n_cells:
            return np.arange(self.n_cells)
        return np.sort(np.random.default_rng(seed).choice(self.n_cells, size=n, replace=False))

    # ------------------------------------------------------------------ source data

    def dataset_path(self, dataset: int) -> Path:
        """The source file of a dataset id, as ``datasets.parquet`` records it.

        A relative path is taken from the current directory, else from the
        atlas directory's parent (where ``scatlas predict`` usually ran).
        """
        match = self.datasets.loc[self.datasets["dataset"] == dataset, "path"]
        if match.empty:
            raise ValueError(f"{self.out_dir}/datasets.parquet: no dataset {dataset}")
        path = Path(match.iloc[0])
        for candidate in (path, self.out_dir.parent / path):
            if candidate.exists():
                return candidate
        raise FileNotFoundError(f"{path}: source of dataset {dataset} not found (relative paths are tried from the "
                                f"current directory and from {self.out_dir.parent})")  # fmt: skip

    def source_obs(self, columns: list[str] | str, rows=None) -> pd.DataFrame:
        """Columns of the source datasets' ``obs`` for the cells, indexed by atlas row.

        A dataset lacking a column gives missing values there. Each source
        file's ``obs_names`` are checked against the atlas, so a file changed
        since it was embedded is refused.
        """
        columns = [columns] if isinstance(columns, str) else list(columns)
        cells = self.cells(rows)
        result = pd.DataFrame(index=cells.index, columns=columns, dtype=object)
        for dataset, group in cells.groupby("dataset", sort=True):
            path = self.dataset_path(int(dataset))
            record = self.datasets.loc[self.datasets["dataset"] == dataset]
            location = record["counts_location"].iloc[0] if len(record) else "auto"
            soma_filter = record["soma_filter"].iloc[0] if "soma_filter" in record and len(record) else None
            with open_counts(path, counts=location, obs_filter=soma_filter or None) as matrix:
                rows_in_source = group["row"].to_numpy()
                if not np.array_equal(matrix.obs_names[rows_in_source].astype(str), group["obs_name"].to_numpy(str)):
                    raise ValueError(f"{path}: obs names differ from the atlas; the file changed since it was embedded")
                for column in columns:
                    if column in matrix.obs:
                        result.loc[group.index, column] = matrix.obs[column].to_numpy(dtype=object)[rows_in_source]
        return result

    def to_anndata(self, rows=None):
        """An AnnData of the cells: ``obsm['X_scprint2']`` (the embedding), predictions in ``obs``.

        ``obs_names`` are the source cells' names; ``obs`` also holds
        ``dataset``, ``row``, ``organism``, ``n_counts``, ``n_genes``, ``part``
        and the columns of :meth:`predictions`. ``uns['scprint2']`` names the
        atlas and the embedding blocks (columns of ``X_scprint2``). There is
        no ``X``: join the counts from the source file (``dataset``, ``row``).
        """
        import anndata

        data = self._read(rows, {"cells": None, "embs": slice(None), "top3": slice(None), "scores": slice(None)},
                          "reading cells")  # fmt: skip
        obs = pd.concat(
            [data["cells"], self._prediction_table(data["top3"], data["scores"], None, data["index"])], axis=1
        )
        obs.index = pd.Index(obs.pop("obs_name").astype(str).to_numpy(), name=None)
        blocks = pd.DataFrame(self.description["embedding_blocks"])
        uns = {"scprint2": {"atlas": str(self.out_dir.resolve()), "run": self.run, "embedding_blocks": blocks}}
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*names are not unique.*")
            return anndata.AnnData(obs=obs, obsm={"X_scprint2": data["embs"]}, uns=uns)

    # ------------------------------------------------------------------ internals

    def _prediction_table(self, top: np.ndarray, scores: np.ndarray, k: int | None, index: pd.Index) -> pd.DataFrame:
        columns = {}
        for info in self.description["classes"]:
            short = short_name(info["name"])
            terms = self.labels(info["name"])["term"].unique()
            for rank in range(min(info["k"], info["k"] if k is None else k)):
                ids = top[:, info["start"] + rank]
                columns[f"{short}_top{rank + 1}"] = pd.Categorical(self.decode(info["name"], ids), categories=terms)
                columns[f"{short}_top{rank + 1}_name"] = pd.Categorical(self.label_names(info["name"], ids))
                columns[f"{short}_top{rank + 1}_score"] = scores[:, info["start"] + rank]
        return pd.DataFrame(columns, index=index)

    def _row_index(self, rows) -> np.ndarray:
        rows = np.asarray(rows)
        if rows.dtype == bool:
            if rows.shape != (self.n_cells,):
                raise ValueError(f"a boolean row mask must have length n_cells = {self.n_cells}, got {rows.shape}")
            return np.flatnonzero(rows)
        rows = rows.astype(np.int64).reshape(-1)
        if rows.size and (rows.min() < 0 or rows.max() >= self.n_cells):
            raise ValueError(f"{self.out_dir}: atlas rows must lie in [0, {self.n_cells})")
        return rows

    def _read(self, rows, wanted: dict, description: str) -> dict:
        """One pass over the parts holding ``rows``: ``wanted`` maps ``cells`` / an array kind to its columns.

        Returns the stacked values by name, in ``rows`` order, and ``index`` (their atlas rows).
        """
        firsts = self.parts["first"].to_numpy()
        if rows is None:
            index = np.arange(self.n_cells)
            groups = [(i, slice(None)) for i in range(len(self.parts))]
            order = None
        else:
            index = self._row_index(rows)
            part_of = np.searchsorted(firsts, index, side="right") - 1
            order = np.argsort(part_of, kind="stable")
            present, starts = np.unique(part_of[order], return_index=True)
            bounds = np.append(starts, len(order))
            groups = [(int(i), index[order[a:b]] - firsts[i]) for i, a, b in zip(present, bounds[:-1], bounds[1:])]
        pieces = {name: [] for name in wanted}
        for i, local in self._track(groups, len(groups), description):
            record = self.parts.iloc[i]
            for name, columns in wanted.items():
                if name == "cells":
                    table = self.part_cells(record["part"]).iloc[local].reset_index(drop=True)
                    table["part"] = record["part"]
                    pieces[name].append(table)
                else:
                    # a copy: a view would keep the part's file mapped (an open file each) until the end
                    pieces[name].append(np.array(self.array(record["part"], name)[local, columns]))
        result = {}
        for name, columns in wanted.items():
            if name == "cells":
                empty = pd.DataFrame(columns=["dataset", "row", "obs_name", "organism", "n_counts", "n_genes", "part"])
                value = pd.concat(pieces[name], ignore_index=True) if pieces[name] else empty
            else:
                width = len(range(*columns.indices(self._width(name))))
                value = (
                    np.concatenate(pieces[name]) if pieces[name] else np.zeros((0, width), np.dtype(PART_ARRAYS[name]))
                )
            if order is not None:
                inverse = np.empty_like(order)
                inverse[order] = np.arange(len(order))
                value = value.iloc[inverse] if name == "cells" else value[inverse]
            result[name] = value
        result["index"] = pd.Index(index, name="atlas_row")
        if "cells" in result:
            result["cells"].index = result["index"]
        return result

    def _width(self, kind: str) -> int:
        return self.embedding_width if kind == "embs" else int(self.description["top_columns"])

    def _track(self, items, total: int, description: str):
        """``items``, with a progress bar on stderr when it is a terminal (or a notebook)."""
        return track_on_terminal(items, total, description, self.progress)


def _match_name(name: str, names: list[str], what: str, where) -> str:
    """``name`` itself, else the one of ``names`` it is the short form, the prefix or a ``_``-separated part of."""
    if name in names:
        return name
    rules = (lambda n: short_name(n) == name, lambda n: n.startswith(f"{name}_"), lambda n: f"_{name}_" in f"_{n}_")
    for rule in rules:
        found = [n for n in names if rule(n)]
        if len(found) == 1:
            return found[0]
        if found:
            raise ValueError(f"{where}: {what} {name!r} is ambiguous: it could be {found}")
    raise ValueError(f"{where}: no {what} {name!r}; the atlas has {names}")
