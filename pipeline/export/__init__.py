"""Exports of an atlas into other ecosystems' formats: parquet (SQL, dataframes), AnnData zarr, TileDB-SOMA."""
