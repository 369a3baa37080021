"""Reading count matrices (one module per on-disk format) and writing files atomically."""

from pipeline.io.formats import detect_format, open_counts
from pipeline.io.matrix import CountMatrix, DatasetError

__all__ = ["CountMatrix", "DatasetError", "detect_format", "open_counts"]
