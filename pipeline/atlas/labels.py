"""Label names: ontology term ids -> readable names (``CL:0000084`` -> ``T cell``), and short class names."""

from __future__ import annotations

import functools
import os
import re
from pathlib import Path

from pipeline.io.files import read_json, write_json

ONTOLOGY_TERM = re.compile(r"^[A-Za-z]+:[A-Za-z0-9]+$")


def short_name(name: str) -> str:
    """``cell_type_ontology_term_id`` -> ``cell_type``, ``self_reported_ethnicity...`` -> ``ethnicity``, ``age_group`` -> ``age``."""
    return name.removesuffix("_ontology_term_id").removeprefix("self_reported_").removesuffix("_group")


_TERM_NAMES: dict[str, str] = {}


def term_names(terms) -> dict[str, str]:
    """Ontology labels of term ids (``CL:0000084`` -> ``T cell``), via ``cellxgene-ontology-guide``.

    A term maps to itself when the package (the ``ontology`` extra) is not
    installed, the term is not an ontology id, or the ontologies do not know
    it. Looked-up names are kept in a cache file under ``$XDG_CACHE_HOME``
    (default ``~/.cache``) ``/scprint-atlas/``, since loading an ontology can
    take seconds (NCBITaxon: about 15 s).
    """
    terms = [str(t) for t in terms]
    wanted = [t for t in dict.fromkeys(terms) if t not in _TERM_NAMES]
    if wanted:
        parser, cache_path = _ontology_parser()
        if parser is None:
            _TERM_NAMES.update({t: t for t in wanted})
        else:
            cached = _read_name_cache(cache_path)
            unknown = [t for t in wanted if t not in cached]
            for term in unknown:
                cached[term] = _lookup_term(parser, term)
            _TERM_NAMES.update({t: cached[t] for t in wanted})
            if unknown:
                _write_name_cache(cache_path, cached)
    return {t: _TERM_NAMES[t] for t in terms}


def _lookup_term(parser, term: str) -> str:
    if not ONTOLOGY_TERM.match(term):
        return term
    try:
        return parser.get_term_label(term) or term
    except Exception:  # noqa: BLE001 - unknown ontologies and terms raise various errors; the id is the fallback
        return term


@functools.lru_cache(maxsize=1)
def _ontology_parser():
    """The parser and the path of its name cache, or ``(None, None)`` without ``cellxgene-ontology-guide``."""
    try:
        from cellxgene_ontology_guide.ontology_parser import OntologyParser
    except ImportError:
        return None, None
    from importlib.metadata import version

    cache_dir = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "scprint-atlas"
    return OntologyParser(), cache_dir / f"ontology_names_{version('cellxgene-ontology-guide')}.json"


def _read_name_cache(path: Path) -> dict[str, str]:
    try:
        return read_json(path)
    except (OSError, ValueError):
        return {}


def _write_name_cache(path: Path, names: dict[str, str]) -> None:
    try:
        write_json(path, names)
    except OSError:  # a read-only home: names are looked up again next time
        pass
