"""Write ``pipeline/data/ontology_names.csv.gz``: the names of the ontology terms scPRINT-2 models predict.

The table ships with the package so that summaries, plots and ``atlas.json``
show names in the default install, offline, without the 94 MB
``cellxgene-ontology-guide`` (a test dependency, the source of the names).
It holds every term of the ontologies CELLxGENE labels cells with (cell types,
tissues, diseases, development stages, ancestries, sex), obsolete ones too
since older checkpoints use them, the assays and the organisms.

    python -m pipeline.tools.ontology_names    # rewrite the shipped table
"""

from __future__ import annotations

import gzip
import io
import sys
from pathlib import Path

import pandas as pd

from pipeline.atlas.labels import ONTOLOGY_NAMES
from pipeline.io.files import atomic_write

#: Ontologies taken whole.
WHOLE_ONTOLOGIES = ("CL", "UBERON", "MONDO", "HsapDv", "MmusDv", "HANCESTRO", "PATO")

#: EFO terms under these: assays and single-cell library constructions (the rest of EFO is not a cell label).
ASSAY_ROOTS = ("EFO:0002772", "EFO:0010183")

#: The organisms of CELLxGENE and of scPRINT-2's training data (NCBITaxon has 2.6M terms).
ORGANISMS = ("NCBITaxon:9606", "NCBITaxon:10090", "NCBITaxon:10116", "NCBITaxon:7955", "NCBITaxon:7227",
             "NCBITaxon:6239", "NCBITaxon:9823", "NCBITaxon:9541", "NCBITaxon:9544", "NCBITaxon:9483",
             "NCBITaxon:9598", "NCBITaxon:9595", "NCBITaxon:30608", "NCBITaxon:9913", "NCBITaxon:9685")  # fmt: skip


def ontology_names() -> pd.DataFrame:
    """``term``, ``name`` of every term the table ships, sorted by term, from ``cellxgene-ontology-guide``."""
    from cellxgene_ontology_guide.ontology_parser import OntologyParser

    parser = OntologyParser()
    names = {}
    for ontology in WHOLE_ONTOLOGIES:
        names.update({term: info["label"] for term, info in parser.cxg_schema.ontology(ontology).items()})
    for root in ASSAY_ROOTS:
        for term in [root, *parser.get_term_descendants(root)]:
            names[term] = parser.get_term_label(term)
    names.update({term: parser.get_term_label(term) for term in ORGANISMS})
    return pd.DataFrame(sorted(names.items()), columns=["term", "name"])


def write_ontology_names(path: Path = ONTOLOGY_NAMES) -> Path:
    """Write the table as gzipped CSV, byte for byte the same for the same ontologies (no time stamp)."""
    text = ontology_names().to_csv(index=False, lineterminator="\n").encode()
    buffer = io.BytesIO()
    with gzip.GzipFile(fileobj=buffer, mode="wb", compresslevel=9, mtime=0) as fh:
        fh.write(text)
    atomic_write(path, lambda tmp: Path(tmp).write_bytes(buffer.getvalue()))
    return Path(path)


if __name__ == "__main__":
    print(write_ontology_names(Path(sys.argv[1]) if len(sys.argv) > 1 else ONTOLOGY_NAMES))
