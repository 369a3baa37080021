"""scprint-atlas: count matrices -> a scPRINT-2 cell-embedding atlas.

The subpackages are the stages of the walk: ``io`` -> ``plan`` -> ``tokens`` ->
``run`` -> ``atlas``, with ``analysis`` reading atlases and ``tools`` (benchmarks,
upstream comparison, demo training) apart. See the README's Layout section.
"""

from pathlib import Path

#: Files shipped in the package: the demo datasets and the GENCODE gene tables.
DATA_DIR = Path(__file__).parent / "data"
