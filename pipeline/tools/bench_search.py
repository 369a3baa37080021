"""``scatlas bench --search ATLAS_DIR``: build speed, memory per cell, search speed and recall of each index type.

The indexes are built in memory from the atlas's embeddings (nothing is written under ``ATLAS_DIR/index``);
the queries are a random sample of the atlas's own cells, and recall@k is measured against the exact (flat)
index of the same columns and metric.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from pipeline.analysis.search import (
    METRICS,
    default_nlist,
    fill_index,
    index_columns,
    new_index,
    prepare_vectors,
)
from pipeline.atlas.reader import open_atlas


def bench_index(atlas, kind: str, columns: np.ndarray, metric: str, queries: np.ndarray, k: int) -> dict:
    """Build one index type in memory and time it; search ``queries`` (prepared vectors) with it."""
    import faiss

    started = time.perf_counter()
    index, nlist, nprobe, n_train = new_index(atlas, kind, metric, columns, None, seed=0)
    trained = time.perf_counter()
    n_cells = fill_index(index, atlas, columns, metric)
    built = time.perf_counter()
    _, ids = index.search(queries, k)
    searched = time.perf_counter()
    n_bytes = faiss.serialize_index(index).nbytes
    return {
        "type": kind,
        "nlist": nlist,
        "nprobe": nprobe,
        "n_cells": n_cells,
        "train_cells": n_train,
        "train_s": round(trained - started, 3),
        "add_s": round(built - trained, 3),
        "build_cells_per_s": round(n_cells / (built - started), 1),
        "bytes_per_cell": round(n_bytes / max(n_cells, 1), 1),
        "query_cells_per_s": round(len(queries) / (searched - built), 1),
        "ids": ids,
    }


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="scatlas bench --search", description=__doc__)
    parser.add_argument("atlas_dir", metavar="ATLAS_DIR", help="an atlas (scatlas predict)")
    parser.add_argument("--blocks", default="all", help="embedding blocks, comma-separated (default all)")
    parser.add_argument("--metric", choices=METRICS, default="cosine")
    parser.add_argument("--queries", type=int, default=2000, help="atlas cells drawn as queries (default 2000)")
    parser.add_argument("-k", type=int, default=10)
    parser.add_argument("--json", default="bench_search.json", help="where to write the figures")
    args = parser.parse_args(argv)
    atlas = open_atlas(args.atlas_dir, progress=False)
    columns = index_columns(atlas, [b.strip() for b in args.blocks.split(",")])
    rows = atlas.sample(args.queries, seed=1)
    queries = prepare_vectors(atlas.embedding(None, rows=rows)[:, columns], args.metric)
    kinds = ["flat", "ivf"] + (["ivfpq"] if atlas.n_cells >= 2560 else [])  # 256 codes per PQ codebook
    results = [bench_index(atlas, kind, columns, args.metric, queries, args.k) for kind in kinds]
    exact = results[0].pop("ids")
    for result in results[1:]:
        found = result.pop("ids")
        hits = sum(len(set(a) & set(b)) for a, b in zip(exact, found))
        result[f"recall_at_{args.k}"] = round(hits / exact.size, 4)
    results[0][f"recall_at_{args.k}"] = 1.0
    report = {"atlas": str(atlas.out_dir), "n_cells": atlas.n_cells, "dim": len(columns), "metric": args.metric,
              "queries": len(rows), "k": args.k, "default_nlist": default_nlist(atlas.n_cells), "indexes": results}  # fmt: skip
    print(f"{atlas.n_cells:,} cells, {len(columns)} columns, {args.metric}; {len(rows):,} queries, k={args.k}")
    print("type    nlist nprobe  build cells/s  bytes/cell  query cells/s  recall@k")
    for r in results:
        print(f"{r['type']:<7} {r['nlist'] or '-':>5} {r['nprobe'] or '-':>6} {r['build_cells_per_s']:>14,.0f} "
              f"{r['bytes_per_cell']:>11,.0f} {r['query_cells_per_s']:>14,.0f} {r[f'recall_at_{args.k}']:>9.3f}")  # fmt: skip
    Path(args.json).write_text(json.dumps(report, indent=1))
    print(f"written: {args.json}")
    return 0
