"""An atlas as one AnnData zarr store: ``obs`` the cells with decoded predictions, ``obsm['X_scprint2']`` the
embedding; ``anndata.read_zarr`` opens it, and its arrays can be sliced without reading the whole store.

The store is written part by part: parts are gathered up to one obs chunk of rows (zarr pays per array write,
and the obs has some 80 arrays), the first block is written with anndata's own encoder, each later block is
appended to every array (resize, then write its rows). Memory is that of one block whatever the atlas size.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.export.cells import PROVENANCE_KEY, cell_table_layout, part_tables, provenance_json, staged_output

#: Rows per chunk of the obs columns, and of the embedding (at 424 float32 columns, 8,192 rows is 14 MB).
OBS_CHUNK_ROWS = 65_536
EMBEDDING_CHUNK_ROWS = 8_192


def export_zarr(atlas, out: str | Path, block_rows: int = OBS_CHUNK_ROWS) -> Path:
    """Write the atlas's done parts as one AnnData zarr store at ``out``; returns ``out``.

    ``obs`` is indexed by the source cells' names (they may repeat across
    datasets: ``dataset`` and ``row`` identify a cell) and holds the columns of
    the parquet export's cell table; ``uns['scprint2']`` holds the embedding
    blocks (columns of ``X_scprint2``) and the provenance (JSON). There is no
    ``X``: the counts stay in the source files. Parts are written in blocks
    of at least ``block_rows`` cells (the last block may be smaller).
    """
    import anndata
    import zarr

    layout = cell_table_layout(atlas)
    with staged_output(out) as staging:
        root = zarr.open_group(staging, mode="w", zarr_format=2)
        root.attrs.update({"encoding-type": "anndata", "encoding-version": "0.1.0"})
        n_written, pending = 0, []
        for _, cells, embs in part_tables(atlas, layout):
            pending.append((obs_frame(cells), embs))
            if sum(len(obs) for obs, _ in pending) >= block_rows:
                n_written, pending = write_rows(root, pending, n_written), []
        n_written = write_rows(root, pending, n_written)
        if n_written == 0:
            raise ValueError(f"{atlas.out_dir}: no part is done; there is nothing to export")
        blocks = pd.DataFrame(atlas.description["embedding_blocks"])
        uns = {"scprint2": {"run": atlas.run, "embedding_blocks": blocks, PROVENANCE_KEY: provenance_json(atlas)}}
        anndata.io.write_elem(root, "uns", uns)
        anndata.io.write_elem(root, "var", pd.DataFrame(index=pd.Index([], dtype=str)))
        for empty in ("layers", "obsp", "varm", "varp"):
            anndata.io.write_elem(root, empty, {})
        zarr.consolidate_metadata(staging)
    return Path(out)


def obs_frame(cells: pd.DataFrame) -> pd.DataFrame:
    """The cell table as ``obs``: indexed by ``obs_name``; missing strings (a dataset without a column) are ''."""
    obs = cells.drop(columns="obs_name")
    for name in obs.columns:
        if obs[name].dtype == object:
            obs[name] = obs[name].fillna("").astype(str)
    obs.index = pd.Index(cells["obs_name"].astype(str).to_numpy(), name=None)
    return obs


def write_rows(root, pending: list, start: int) -> int:
    """Write the gathered ``(obs, embs)`` parts as rows ``start ...`` of the store; returns the rows now written."""
    if not pending:
        return start
    obs = pd.concat([obs for obs, _ in pending])
    embs = np.concatenate([embs for _, embs in pending])
    if start == 0:
        import anndata

        anndata.io.write_elem(root, "obs", obs, dataset_kwargs={"chunks": (OBS_CHUNK_ROWS,)})
        anndata.io.write_elem(root, "obsm", {"X_scprint2": embs},
                              dataset_kwargs={"chunks": (EMBEDDING_CHUNK_ROWS, embs.shape[1])})  # fmt: skip
    else:
        append_rows(root, obs, embs, start)
    return start + len(obs)


def append_rows(root, obs: pd.DataFrame, embs: np.ndarray, start: int) -> None:
    """Write ``obs`` and ``embs`` as rows ``start ...`` of the store's obs columns and ``obsm/X_scprint2``."""
    stop = start + len(obs)
    columns = {"_index": obs.index.to_numpy(dtype=object), **{name: obs[name] for name in obs.columns}}
    for name, values in columns.items():
        element = root[f"obs/{name}"]
        if isinstance(values, pd.Series) and isinstance(values.dtype, pd.CategoricalDtype):
            element, values = element["codes"], values.cat.codes.to_numpy()
        values = np.asarray(values)
        element.resize((stop,))
        element[start:stop] = values.astype(element.dtype) if values.dtype != object else values
    matrix = root["obsm/X_scprint2"]
    matrix.resize((stop, matrix.shape[1]))
    matrix[start:stop] = embs
