"""``scatlas export``: an atlas written in the format of another ecosystem (parquet, AnnData zarr, TileDB-SOMA)."""

from __future__ import annotations

from pathlib import Path

from pipeline.export.anndata_zarr import export_zarr
from pipeline.export.parquet import export_parquet
from pipeline.export.soma import export_soma

#: ``--to`` -> the function that writes an opened atlas to a new path.
EXPORTERS = {"parquet": export_parquet, "zarr": export_zarr, "soma": export_soma}


def export_atlas(atlas, to: str, out: str | Path) -> Path:
    """Write the done parts of ``atlas`` (:func:`pipeline.atlas.open_atlas`) as ``to`` at ``out``; returns ``out``.

    Raises
    ------
    ValueError
        ``to`` is not one of :data:`EXPORTERS`, or no cell is embedded yet.
    FileExistsError
        ``out`` exists.
    ModuleNotFoundError
        The format's extra is not installed (the message names it).
    """
    if to not in EXPORTERS:
        raise ValueError(f"--to must be one of {', '.join(EXPORTERS)}, not {to!r}")
    if atlas.n_cells == 0:
        raise ValueError(f"{atlas.out_dir}: no embedded cell in a done part yet; there is nothing to export")
    return EXPORTERS[to](atlas, out)
