"""Label names: ontology term ids -> readable names (``CL:0000084`` -> ``T cell``), and short class names."""

from __future__ import annotations

import functools
import re

import pandas as pd

from pipeline import DATA_DIR

ONTOLOGY_TERM = re.compile(r"^[A-Za-z]+:[A-Za-z0-9]+$")

#: term,name of the ontologies scPRINT-2 labels come from (written by ``pipeline.tools.ontology_names``).
ONTOLOGY_NAMES = DATA_DIR / "ontology_names.csv.gz"


def short_name(name: str) -> str:
    """``cell_type_ontology_term_id`` -> ``cell_type``, ``self_reported_ethnicity...`` -> ``ethnicity``, ``age_group`` -> ``age``."""
    return name.removesuffix("_ontology_term_id").removeprefix("self_reported_").removesuffix("_group")


def term_names(terms) -> dict[str, str]:
    """Readable names of term ids (``CL:0000084`` -> ``T cell``), from the table shipped with the package.

    The table covers the cell types, tissues, diseases, development stages,
    ancestries, sex, assays and organisms CELLxGENE labels cells with, so no
    lookup needs the network or an extra package. A term the table does not
    know (a label that is not an ontology id, such as the demo model's
    doublets) is its own name.
    """
    names = _shipped_names()
    return {str(t): names.get(str(t), str(t)) for t in terms}


@functools.lru_cache(maxsize=1)
def _shipped_names() -> dict[str, str]:
    table = pd.read_csv(ONTOLOGY_NAMES, dtype=str, keep_default_na=False)
    return dict(zip(table["term"], table["name"]))
