"""Search an atlas: a faiss nearest-neighbour index of its embeddings, neighbours of new cells, label transfer.

``scatlas index`` builds (or extends) the index under ``ATLAS_DIR/index/``; ``scatlas query`` embeds query
datasets with the atlas's own model settings (see :func:`query_overrides`), then :func:`search` finds each
query cell's nearest atlas cells and :func:`transfer_labels` takes the neighbours' majority vote per class
and per source ``obs`` column. Python::

    from pipeline.analysis.search import search, transfer_labels
    neighbors = search(atlas, query_embeddings, k=10)
    votes = transfer_labels(atlas, neighbors, labels=["cell_type"])

An index entry's id is ``part << 32 | row within the part``, so it stays right when parts finish out of
order and atlas rows shift.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.atlas.labels import short_name
from pipeline.atlas.layout import QUERY_TABLES, index_description_path, index_file, part_file
from pipeline.atlas.reader import Atlas
from pipeline.atlas.state import index_problems, load_state
from pipeline.io.files import atomic_write, file_sha256, read_json, write_json

INDEX_TYPES = ("auto", "flat", "ivf", "ivfpq")
METRICS = ("cosine", "l2")
#: ``auto`` keeps an exact (flat) index up to this many cells, IVF-Flat up to IVF_MAX_CELLS, IVF-PQ beyond
#: (README "Search an atlas" has the timings and memory behind these bounds).
FLAT_MAX_CELLS = 100_000
IVF_MAX_CELLS = 5_000_000
#: IVF training: about this many sample cells per inverted list (faiss warns under 39), at most TRAIN_MAX_CELLS.
TRAIN_CELLS_PER_LIST = 64
TRAIN_MAX_CELLS = 500_000
#: Rows embedded into the index at a time, so a large part does not have to fit in memory twice.
ADD_CHUNK = 100_000
_ID_SHIFT = 32


def _faiss():
    try:
        import faiss
    except ImportError:
        raise ValueError("searching an atlas needs faiss-cpu: pip install -e '.[search]'") from None
    return faiss


@dataclass
class AtlasIndex:
    """A loaded index: its ``index.json`` description and the faiss index; ``missing`` counts atlas cells not
    yet in it (parts done after the index was built)."""

    description: dict
    index: object
    missing_parts: list[int]
    missing_cells: int


# ----------------------------------------------------------------------------- building


def default_nlist(n_cells: int) -> int:
    """Inverted lists of an IVF index: about 4 sqrt(n), with enough cells per list to train on."""
    return int(max(1, min(round(4 * np.sqrt(n_cells)), n_cells // 39)))


def default_nprobe(nlist: int) -> int:
    """Lists searched per query: 1/8 of them, at least 8 (recall@10 against exact search >= 0.9 on our data)."""
    return int(min(nlist, max(8, nlist // 8)))


def pq_subquantizers(dim: int) -> int:
    """IVF-PQ codes: one byte per 4 dimensions (the largest divisor of ``dim`` up to dim / 4)."""
    return next(m for m in range(max(1, dim // 4), 0, -1) if dim % m == 0)


def choose_index_type(n_cells: int) -> str:
    """``flat`` (exact) for small atlases, ``ivf`` (IVF-Flat) for mid-sized ones, ``ivfpq`` beyond."""
    if n_cells <= FLAT_MAX_CELLS:
        return "flat"
    return "ivf" if n_cells <= IVF_MAX_CELLS else "ivfpq"


def index_columns(atlas: Atlas, blocks: list[str] | None) -> np.ndarray:
    """The embedding columns of the named blocks (all columns for ``None`` or ``["all"]``), in block order."""
    if not blocks or list(blocks) == ["all"]:
        return np.arange(atlas.embedding_width)
    slices = sorted((atlas.block_columns(b) for b in blocks), key=lambda s: s.start)
    return np.concatenate([np.arange(s.start, s.stop) for s in slices])


def prepare_vectors(x: np.ndarray, metric: str) -> np.ndarray:
    """float32, C-ordered, and unit-length rows for ``cosine`` (so inner product is cosine similarity)."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    if metric == "cosine":
        norms = np.linalg.norm(x, axis=1, keepdims=True)
        x = x / np.maximum(norms, 1e-12)
    return x


def build_index(atlas: Atlas, blocks: list[str] | None = None, metric: str | None = None, kind: str | None = None,
                nlist: int | None = None, rebuild: bool = False, seed: int = 0) -> dict:  # fmt: skip
    """Build the atlas's index, or extend the existing one with the parts done since; returns ``index.json``.

    Settings left ``None`` keep those of an existing index (else: all blocks, cosine, ``auto``); asking for
    other settings than the existing index's needs ``rebuild``. An IVF index is trained on a random sample
    of cells, then every index is filled part by part, so memory holds the index and one chunk of a part.
    The faiss file is written under a new name first and ``index.json``, written last, points to it.
    """
    faiss = _faiss()
    out_dir = atlas.out_dir
    done = load_state(out_dir, atlas.run).done
    previous = read_json(index_description_path(out_dir)) if index_description_path(out_dir).exists() else None
    existing = None if rebuild else previous
    asked = {"blocks": None if blocks is None else sorted(blocks), "metric": metric, "type": kind}
    if existing is not None:
        differ = [
            k for k, v in asked.items() if v is not None and v != existing[k] and not (k == "type" and v == "auto")
        ]
        if differ:
            raise ValueError(f"{out_dir}/index was built with other {', '.join(differ)} ({', '.join(str(existing[k]) for k in differ)}); "
                             "add --rebuild to build a new one")  # fmt: skip
        foreign = index_problems(out_dir, atlas.run, done, missing=False)
        if foreign:
            raise ValueError(f"{out_dir}/index: {foreign[0]}; add --rebuild to build it again")
    metric = (existing or {}).get("metric", metric or "cosine")
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
    block_names = (existing or {}).get("blocks", asked["blocks"] or ["all"])
    columns = index_columns(atlas, block_names)
    dim = len(columns)
    started = time.perf_counter()
    if existing is not None:
        index = faiss.read_index(str(index_file(out_dir, existing["generation"])))
        kind, nlist, nprobe = existing["type"], existing.get("nlist"), existing.get("nprobe")
        covered = {int(p) for p in existing["parts"]}
        if covered >= set(done):
            return {**existing, "last_added_cells": 0, "last_seconds": 0.0, "up_to_date": True}
        train_cells = 0
    else:
        kind = choose_index_type(atlas.n_cells) if kind in (None, "auto") else kind
        if kind not in INDEX_TYPES:
            raise ValueError(f"index type must be one of {INDEX_TYPES}, got {kind!r}")
        index, nlist, nprobe, train_cells = new_index(atlas, kind, metric, columns, nlist, seed)
        covered = set()
    parts = dict((existing or {}).get("parts", {}))
    n_added = fill_index(index, atlas, columns, metric, skip=covered, done=done, parts=parts)
    seconds = time.perf_counter() - started
    generation = 0 if previous is None else int(previous["generation"]) + 1
    path = index_file(out_dir, generation)
    atomic_write(path, lambda tmp: faiss.write_index(index, tmp))
    description = {
        "format": "scprint-atlas-index/1",
        "run": atlas.run,
        "type": kind,
        "metric": metric,
        "blocks": block_names,
        "dim": dim,
        "nlist": nlist,
        "nprobe": nprobe,
        "n_cells": int(index.ntotal),
        "generation": generation,
        "file": path.name,
        "file_bytes": path.stat().st_size,
        "parts": parts,
        "faiss_version": faiss.__version__,
        "built": (existing or {}).get("built", time.strftime("%Y-%m-%dT%H:%M:%S")),
        "extended": None if existing is None else time.strftime("%Y-%m-%dT%H:%M:%S"),
        "last_added_cells": n_added,
        "last_train_cells": train_cells,
        "last_seconds": round(seconds, 3),
    }
    write_json(index_description_path(out_dir), description)
    if previous is not None:
        index_file(out_dir, previous["generation"]).unlink(missing_ok=True)
    return description


def fill_index(index, atlas: Atlas, columns: np.ndarray, metric: str, skip: set[int] = frozenset(),
               done: dict[int, dict] | None = None, parts: dict | None = None) -> int:  # fmt: skip
    """Add every done part of the atlas but those in ``skip`` to ``index``, a chunk of rows at a time; returns
    the cells added. ``parts`` (part id -> stem, cells, sha256 of its embeddings from ``done``) is filled in."""
    n_added = 0
    for record, data in atlas.iter_parts(kinds=("embs",), cells=False, description="indexing parts"):
        if int(record.part) in skip:
            continue
        embs = data["embs"]
        for start in range(0, len(embs), ADD_CHUNK):
            x = prepare_vectors(np.asarray(embs[start : start + ADD_CHUNK][:, columns]), metric)
            local = np.arange(start, start + len(x), dtype=np.int64)
            index.add_with_ids(x, (np.int64(record.part) << _ID_SHIFT) | local)
        n_added += len(embs)
        if parts is not None:
            sha = done[int(record.part)]["files"][part_file(record.stem, "embs")]
            parts[str(int(record.part))] = {"stem": record.stem, "n_cells": int(record.n_cells), "embs_sha256": sha}
    return n_added


def new_index(atlas: Atlas, kind: str, metric: str, columns: np.ndarray, nlist: int | None, seed: int):
    """An empty index of ``kind``, trained on a sample of the atlas for IVF types: (index, nlist, nprobe, n_train)."""
    faiss = _faiss()
    dim = len(columns)
    faiss_metric = faiss.METRIC_INNER_PRODUCT if metric == "cosine" else faiss.METRIC_L2
    if kind == "flat":
        flat = faiss.IndexFlatIP(dim) if metric == "cosine" else faiss.IndexFlatL2(dim)
        return faiss.IndexIDMap2(flat), None, None, 0
    nlist = default_nlist(atlas.n_cells) if nlist is None else int(nlist)
    n_train = min(atlas.n_cells, max(TRAIN_CELLS_PER_LIST * nlist, 256 * 39 if kind == "ivfpq" else 0), TRAIN_MAX_CELLS)
    if n_train < max(nlist, 256 if kind == "ivfpq" else 1):
        raise ValueError(f"{atlas.out_dir}: {atlas.n_cells} cells are too few for an {kind} index of {nlist} lists; "
                         "use --type flat")  # fmt: skip
    if kind == "ivf":
        quantizer = faiss.IndexFlatIP(dim) if metric == "cosine" else faiss.IndexFlatL2(dim)
        index = ivf = faiss.IndexIVFFlat(quantizer, dim, nlist, faiss_metric)
    else:
        # PQ codes lose the small differences between embeddings that share a large common component, so the
        # vectors are centred on the atlas mean first; L2 is unchanged by centring and, on unit vectors, ranks
        # as cosine does, so the PQ index is always L2 (search() converts its distances)
        ivf = faiss.IndexIVFPQ(faiss.IndexFlatL2(dim), dim, nlist, pq_subquantizers(dim), 8)
        index = faiss.IndexPreTransform(faiss.CenteringTransform(dim), ivf)
    sample = prepare_vectors(atlas.embedding(None, rows=atlas.sample(n_train, seed))[:, columns], metric)
    ivf.cp.seed = seed
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        index.train(sample)
    ivf.nprobe = default_nprobe(nlist)
    return index, nlist, int(ivf.nprobe), len(sample)


# ----------------------------------------------------------------------------- searching


def check_index(atlas: Atlas) -> tuple[dict, list[int], int]:
    """``index.json`` of the atlas, after checking the index covers only parts the atlas has now (same files);
    also the parts done since it was built and their cells, which a search does not see."""
    path = index_description_path(atlas.out_dir)
    if not path.exists():
        raise FileNotFoundError(f"{atlas.out_dir} has no index: build it with `scatlas index {atlas.out_dir}`")
    description = read_json(path)
    done = load_state(atlas.out_dir, atlas.run).done
    problems = index_problems(atlas.out_dir, atlas.run, done, missing=False)
    if problems:
        raise ValueError(f"{atlas.out_dir}/index: {problems[0]}; build it again with "
                         f"`scatlas index {atlas.out_dir} --rebuild`")  # fmt: skip
    missing = sorted(set(done) - {int(p) for p in description["parts"]})
    return description, missing, int(sum(done[p]["n_cells"] for p in missing))


def load_index(atlas: Atlas) -> AtlasIndex:
    """Read the atlas's index (see :func:`check_index`); a search of an index lacking parts warns."""
    faiss = _faiss()
    description, missing, missing_cells = check_index(atlas)
    if missing:
        warnings.warn(f"{atlas.out_dir}/index lacks {len(missing)} part(s) ({missing_cells:,} cells) done since it "
                      f"was built; `scatlas index {atlas.out_dir}` adds them", stacklevel=2)  # fmt: skip
    index = faiss.read_index(str(index_file(atlas.out_dir, description["generation"])))
    if description.get("nprobe"):
        faiss.extract_index_ivf(index).nprobe = int(description["nprobe"])
    return AtlasIndex(description, index, missing, missing_cells)


def search(atlas: Atlas, embeddings: np.ndarray, k: int = 10, index: AtlasIndex | None = None,
           nprobe: int | None = None) -> pd.DataFrame:  # fmt: skip
    """The ``k`` nearest atlas cells of each row of ``embeddings``.

    ``embeddings`` holds full atlas-width rows (as :meth:`Atlas.embedding` gives them) or just the index's
    columns. Returns one row per (query, neighbour): ``query`` (row of ``embeddings``), ``rank`` (1 = nearest),
    ``atlas_row``, the neighbour's source ``dataset``, ``row`` and ``obs_name``, and ``distance`` (``1 - cosine``
    or Euclidean, by the index's metric). A query left with fewer than ``k`` candidates by an IVF index has
    fewer rows.
    """
    index = load_index(atlas) if index is None else index
    description = index.description
    embeddings = np.asarray(embeddings, dtype=np.float32)
    if embeddings.ndim != 2 or embeddings.shape[1] not in (atlas.embedding_width, description["dim"]):
        raise ValueError(f"embeddings must have {atlas.embedding_width} columns (the atlas's) or {description['dim']} "
                         f"(the index's blocks {description['blocks']}), got shape {embeddings.shape}")  # fmt: skip
    if embeddings.shape[1] == atlas.embedding_width and description["dim"] != atlas.embedding_width:
        embeddings = embeddings[:, index_columns(atlas, description["blocks"])]
    if description.get("nlist"):
        _faiss().extract_index_ivf(index.index).nprobe = int(nprobe or description["nprobe"])
    scores, ids = index.index.search(prepare_vectors(embeddings, description["metric"]), int(k))
    query, rank = np.nonzero(ids >= 0)
    ids, scores = ids[query, rank], scores[query, rank]
    parts, local = ids >> _ID_SHIFT, ids & ((1 << _ID_SHIFT) - 1)
    first = dict(zip(atlas.parts["part"].to_numpy(), atlas.parts["first"].to_numpy()))
    atlas_rows = np.array([first[p] for p in parts], dtype=np.int64) + local
    if description["type"] == "ivfpq":  # squared L2 of (unit, for cosine) vectors: ||a - b||^2 = 2 - 2 cos
        distance = scores / 2 if description["metric"] == "cosine" else np.sqrt(np.maximum(scores, 0.0))
    else:
        distance = 1.0 - scores if description["metric"] == "cosine" else np.sqrt(np.maximum(scores, 0.0))
    cells = atlas.cells(atlas_rows) if len(atlas_rows) else atlas.cells(np.zeros(0, np.int64))
    return pd.DataFrame({
        "query": query.astype(np.int64), "rank": (rank + 1).astype(np.int16), "atlas_row": atlas_rows,
        "dataset": cells["dataset"].to_numpy(np.int64), "row": cells["row"].to_numpy(np.int64),
        "obs_name": cells["obs_name"].to_numpy(object), "distance": distance.astype(np.float32),
    })  # fmt: skip


def transfer_labels(atlas: Atlas, neighbors: pd.DataFrame, classes: list[str] | None = None,
                    labels: list[str] = (), weighted: bool = False) -> pd.DataFrame:  # fmt: skip
    """The neighbours' majority vote for each query cell, per class and per source ``obs`` column.

    ``neighbors`` is :func:`search`'s table. For each class (default: all; the neighbours' top-1 predicted
    label) and each name in ``labels`` (a column of the atlas's source files' ``obs``, e.g. ``cell_type``;
    neighbours without a value do not vote): ``{name}_vote``, ``{name}_share`` (the winner's share of the
    votes) and ``{name}_voters``, with ``name`` the class's short name (and a ``{name}_vote_name``) or
    ``obs_{label}`` for a source column. ``weighted`` weighs each vote by
    ``1 / (distance + 1e-6)``, so nearer cells count more; a tie goes to the label of the nearest voter.
    Indexed by ``query``.
    """
    queries = pd.Index(np.unique(neighbors["query"].to_numpy()), name="query")
    weight = 1.0 / (neighbors["distance"].to_numpy(np.float64) + 1e-6) if weighted else np.ones(len(neighbors))
    rows = neighbors["atlas_row"].to_numpy(np.int64)
    columns = {}
    for name in atlas.classes if classes is None else classes:
        full = atlas.class_name(name)
        votes = atlas.decode(full, atlas.top(full, k=1, rows=rows)[:, 0]) if len(rows) else np.zeros(0, object)
        winner, share, voters = _vote(neighbors, votes, weight, queries)
        short = short_name(full)
        columns[f"{short}_vote"] = winner
        names = pd.Series(atlas.labels(full).set_index("term")["name"])
        columns[f"{short}_vote_name"] = winner.map(names.groupby(level=0).first())
        columns[f"{short}_share"], columns[f"{short}_voters"] = share, voters
    if labels:
        unique_rows, inverse = np.unique(rows, return_inverse=True)
        source = atlas.source_obs(list(labels), unique_rows)
        for label in labels:
            values = source[label].to_numpy(object)[inverse]
            winner, share, voters = _vote(neighbors, values, weight, queries)
            columns[f"obs_{label}_vote"], columns[f"obs_{label}_share"] = winner, share
            columns[f"obs_{label}_voters"] = voters
    return pd.DataFrame(columns, index=queries)


def _vote(neighbors: pd.DataFrame, values: np.ndarray, weight: np.ndarray, queries: pd.Index):
    """Per query: the label with the most (weighted) votes, its share of the votes and the number of voters."""
    table = pd.DataFrame({"query": neighbors["query"].to_numpy(), "rank": neighbors["rank"].to_numpy(),
                          "value": values, "weight": weight})  # fmt: skip
    table = table[table["value"].notna() & (table["value"].astype(str).str.strip() != "")]
    table["value"] = table["value"].astype(str)
    totals = table.groupby("query")["weight"].sum()
    voters = table.groupby("query").size()
    per_label = table.groupby(["query", "value"], sort=False).agg(weight=("weight", "sum"), nearest=("rank", "min"))
    per_label = per_label.reset_index().sort_values(["query", "weight", "nearest"], ascending=[True, False, True])
    best = per_label.drop_duplicates("query").set_index("query")
    winner = best["value"].reindex(queries)
    share = (best["weight"] / totals).reindex(queries).astype(np.float32)
    return winner, share, voters.reindex(queries, fill_value=0).astype(np.int32)


# ----------------------------------------------------------------------------- a query, end to end


def query_overrides(atlas: Atlas) -> list[str]:
    """Hydra overrides that embed query datasets as the atlas was embedded: model, checkpoint, max_len, seed, QC.

    Refuses when the checkpoint file the atlas names has changed since (its sha256 differs).
    """
    settings = next(r["settings"] for r in atlas.description["runs"] if r["run"] == atlas.run)
    config = atlas.description["config"]
    checkpoint = config["model"]["checkpoint"]
    path = atlas.description["model"].get("checkpoint")
    if path and Path(path).exists() and file_sha256(path) != settings["checkpoint_sha256"]:
        raise ValueError(f"{path}: the checkpoint changed since {atlas.out_dir} was embedded (sha256 differs); "
                         "a query must use the atlas's own model")  # fmt: skip
    return [
        f"model={settings['model']}",
        f"model.checkpoint={'null' if checkpoint is None else checkpoint}",
        f"model.max_len={settings['max_len']}",
        f"seed={settings['seed']}",
        f"data.min_counts={settings['min_counts']}",
        f"data.min_genes={settings['min_genes']}",
        f"data.n_neighbors={settings['n_neighbors']}",
    ]


#: What must be equal between an atlas and a query's embedding for their embeddings to be comparable.
SAME_SETTINGS = ("model", "checkpoint_sha256", "max_len", "seed")


def check_same_model(atlas: Atlas, query: Atlas) -> None:
    """Refuse a query atlas embedded with another model, checkpoint, max_len or seed than ``atlas``."""
    mine = next(r["settings"] for r in atlas.description["runs"] if r["run"] == atlas.run)
    theirs = next(r["settings"] for r in query.description["runs"] if r["run"] == query.run)
    differ = [k for k in SAME_SETTINGS if mine.get(k) != theirs.get(k)]
    if differ:
        raise ValueError(f"{query.out_dir} was embedded with other {', '.join(differ)} than {atlas.out_dir} "
                         f"({', '.join(f'{theirs.get(k)} != {mine.get(k)}' for k in differ)}); "
                         "its cells cannot be searched in this atlas")  # fmt: skip


def query_atlas(atlas: Atlas, query: Atlas, k: int = 10, labels: list[str] = (), weighted: bool = False,
                nprobe: int | None = None, index: AtlasIndex | None = None) -> tuple[pd.DataFrame, pd.DataFrame]:  # fmt: skip
    """Search every cell of ``query`` (an atlas of the query datasets) in ``atlas``.

    Returns the neighbours table (``query_dataset``, ``query_row``, ``query_obs_name``, ``rank``, then the
    atlas cell's ``atlas_row``, ``dataset``, ``row``, ``obs_name`` and ``distance``) and the label-transfer
    table (one row per query cell: its source, then per class the vote, its share and the model's own top-1
    for the cell, ``{class}_model``, then the votes of ``labels``).
    """
    check_same_model(atlas, query)
    index = load_index(atlas) if index is None else index
    cells = query.cells()
    found = search(atlas, query.embedding(), k=k, index=index, nprobe=nprobe)
    source = cells[["dataset", "row", "obs_name"]].reset_index(drop=True)
    source.columns = ["query_dataset", "query_row", "query_obs_name"]
    neighbors = pd.concat([source.iloc[found["query"].to_numpy()].reset_index(drop=True),
                           found.drop(columns="query")], axis=1)  # fmt: skip
    votes = transfer_labels(atlas, found, labels=list(labels), weighted=weighted).reindex(np.arange(len(cells)))
    own = query.predictions(k=1).reset_index(drop=True)
    transfer = source.copy()
    for name in atlas.classes:
        short = short_name(name)
        for column in (f"{short}_vote", f"{short}_vote_name", f"{short}_share", f"{short}_voters"):
            transfer[column] = votes[column].to_numpy()
        transfer[f"{short}_model"] = own[f"{short}_top1"].astype(object).to_numpy()
        transfer[f"{short}_model_name"] = own[f"{short}_top1_name"].astype(object).to_numpy()
    for label in labels:
        for column in (f"obs_{label}_vote", f"obs_{label}_share", f"obs_{label}_voters"):
            transfer[column] = votes[column].to_numpy()
    return neighbors, transfer


def write_query(neighbors: pd.DataFrame, transfer: pd.DataFrame, out_dir: str | Path) -> list[Path]:
    """Write the two tables of a query atomically under ``out_dir``."""
    paths = []
    for name, table in (("neighbors", neighbors), ("transfer", transfer)):
        path = Path(out_dir) / QUERY_TABLES[name]
        atomic_write(path, lambda tmp, t=table: t.to_parquet(tmp, index=False))
        paths.append(path)
    return paths


def query_report(atlas: Atlas, index: dict, neighbors: pd.DataFrame, transfer: pd.DataFrame,
                 labels: list[str] = (), seconds: float | None = None) -> str:  # fmt: skip
    """A few lines: what was searched, how near the neighbours are, and per class how often the neighbours'
    vote agrees with the model's own top-1; per label the most transferred values."""
    k = int(neighbors["rank"].max()) if len(neighbors) else 0
    nearest = neighbors.loc[neighbors["rank"] == 1, "distance"]
    lines = [f"searched {len(transfer):,} query cells in {atlas.out_dir} ({index['n_cells']:,} cells, {index['type']} "
             f"index, {index['metric']}, blocks {','.join(index['blocks'])}): k={k}"
             + (f", {len(transfer) / seconds:,.0f} query cells/s" if seconds else "")
             + (f"; median distance to the nearest cell {nearest.median():.3f}" if len(nearest) else "")]  # fmt: skip
    lines.append("class        vote = model's top-1   mean vote share   most voted")
    for name in atlas.classes:
        short = short_name(name)
        vote, model = transfer[f"{short}_vote"], transfer[f"{short}_model"]
        agree = float((vote.astype(object) == model.astype(object)).mean()) if len(transfer) else float("nan")
        common = transfer[f"{short}_vote_name"].value_counts().head(2)
        lines.append(f"{short:<12} {agree:>6.1%}                {transfer[f'{short}_share'].mean():>6.2f}           "
                     + ", ".join(f"{n} {c}" for n, c in common.items()))  # fmt: skip
    for label in labels:
        common = transfer[f"obs_{label}_vote"].value_counts().head(3)
        covered = transfer[f"obs_{label}_vote"].notna().mean() if len(transfer) else 0.0
        lines.append(f"obs {label!r}: {covered:.0%} of query cells got a vote (mean share "
                     f"{transfer[f'obs_{label}_share'].mean():.2f}); most voted: "
                     + ", ".join(f"{n} {c}" for n, c in common.items()))  # fmt: skip
    return "\n".join(lines)


def index_report(description: dict, out_dir: Path) -> str:
    """One line on a built or extended index: type, size, speed and memory per cell."""
    n, added, seconds = description["n_cells"], description["last_added_cells"], description["last_seconds"]
    if description.get("up_to_date"):
        return f"index up to date: {out_dir}/index/{description['file']} covers all {n:,} cells of the atlas"
    what = "extended" if description["extended"] else "built"
    rate = f", {added / seconds:,.0f} cells/s" if seconds and added else ""
    return (f"index {what}: {out_dir}/index/{description['file']} ({description['type']}, {description['metric']}, "
            f"blocks {','.join(description['blocks'])}, {description['dim']} columns"
            + (f", nlist {description['nlist']}, nprobe {description['nprobe']}" if description["nlist"] else "")
            + f"): {n:,} cells, {added:,} added in {seconds:.2f} s{rate}, "
            f"{description['file_bytes'] / max(n, 1):,.0f} bytes per cell")  # fmt: skip
