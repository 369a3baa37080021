"""pipeline.io.genes and pipeline.plan.vocabulary on the shipped real datasets and the GENCODE tables."""

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from conftest import BMMC, BRAIN, CD4T, HEART, PBMC, SPLEEN

from pipeline.io.formats import open_counts
from pipeline.io.genes import ORGANISMS, gene_table, organism_id, to_ensembl
from pipeline.plan.vocabulary import to_vocabulary, vocabulary_columns

pytestmark = pytest.mark.filterwarnings("ignore::anndata.OldFormatWarning")


HUMAN, MOUSE = "NCBITaxon:9606", "NCBITaxon:10090"


def var_of(path):
    with open_counts(path) as matrix:
        return matrix.var


@pytest.mark.parametrize(
    "value, expected",
    [
        ("human", HUMAN),
        ("Homo sapiens", HUMAN),
        ("homo_sapiens", HUMAN),
        ("NCBITaxon:9606", HUMAN),
        ("ncbitaxon_9606", HUMAN),
        ("mouse", MOUSE),
        ("Mus musculus", MOUSE),
        (" mus_musculus ", MOUSE),
        ("NCBITaxon:10090", MOUSE),
        ("NCBITaxon:9541", "NCBITaxon:9541"),
        (None, None),
        ("", None),
        ("unknown", None),
        (float("nan"), None),
    ],
)
def test_organism_id(value, expected):
    assert organism_id(value) == expected


def test_unknown_organism_name_is_an_error():
    with pytest.raises(ValueError, match="unknown organism 'zebrafish'"):
        organism_id("zebrafish")


def test_gene_tables():
    assert ORGANISMS == {HUMAN: "human", MOUSE: "mouse"}
    human, mouse = gene_table("human"), gene_table("Mus musculus")
    assert list(human.columns) == ["ensembl_id", "symbol", "gene_type"]
    assert (len(human), len(mouse)) == (78894, 78317)
    assert human["ensembl_id"].is_unique and mouse["ensembl_id"].is_unique
    assert (human["gene_type"] == "protein_coding").sum() == 20120
    assert gene_table(HUMAN) is human  # cached
    with pytest.raises(ValueError, match="no gene table for organism 'NCBITaxon:9541'"):
        gene_table("NCBITaxon:9541")


def test_pbmc_symbols_are_inferred_human():
    genes = to_ensembl(var_of(PBMC))
    assert genes.organism == HUMAN
    assert genes.source == "symbols in var_names via the human GENCODE table"
    assert len(genes.ids) == 16727
    # 2,190 of the symbols are retired clone-based names (e.g. AL627309.1) from the
    # 10x Ensembl 93 reference, which current GENCODE names by Ensembl ID only; the
    # rest are mostly current symbols.
    assert 1 - genes.n_unknown / 16727 >= 0.83
    clone_based = var_of(PBMC).index.str.fullmatch(r"[A-Z]{1,2}\d+\.\d+")
    assert clone_based.sum() == 2190
    assert np.mean(genes.ids[~clone_based] != "") >= 0.96
    assert genes.n_unknown == int(np.sum(genes.ids == ""))
    assert all(gene.startswith("ENSG") for gene in genes.ids[genes.ids != ""])


def test_symbol_mapping_agrees_with_the_files_ensembl_ids():
    bmmc = var_of(BMMC)
    genes = to_ensembl(pd.DataFrame(index=bmmc.index), organism="human")
    known = genes.ids != ""
    assert known.mean() >= 0.95
    assert np.mean(genes.ids[known] == bmmc["gene_ids"].to_numpy(dtype=str)[known]) == 1.0

    brain = var_of(BRAIN)
    genes = to_ensembl(pd.DataFrame(index=brain["gene_symbols"].astype(str)))
    known = genes.ids != ""
    assert genes.organism == MOUSE
    assert known.mean() >= 0.92
    assert np.mean(genes.ids[known] == brain.index.to_numpy(dtype=str)[known]) >= 0.99


def test_ensembl_ids_from_a_var_column():
    genes = to_ensembl(var_of(SPLEEN))
    assert genes.source == "var['gene_ids']"
    assert genes.organism == MOUSE
    assert genes.n_unknown == 0
    assert genes.ids[0] == "ENSMUSG00000043716"


def test_ensembl_var_names():
    brain = to_ensembl(var_of(BRAIN))
    assert (brain.source, brain.organism, brain.n_unknown) == ("var_names", MOUSE, 0)
    cd4t = to_ensembl(var_of(CD4T), organism="mouse")  # the IDs' own organism wins
    assert (cd4t.source, cd4t.organism, cd4t.n_unknown) == ("var_names", HUMAN, 0)


def test_spike_ins_are_unknown():
    genes = to_ensembl(var_of(HEART))
    assert genes.organism == HUMAN
    assert genes.n_unknown == 1
    assert genes.ids[0] == ""
    assert var_of(HEART).index[0] == "ERCC-00002"


def test_version_suffixes_are_stripped():
    brain = var_of(BRAIN)
    versioned = pd.DataFrame(index=[f"{name}.{i % 7 + 1}" for i, name in enumerate(brain.index)])
    versioned.index.values[1] = versioned.index[1] + "_PAR_Y"
    genes = to_ensembl(versioned)
    assert genes.source == "var_names"
    assert genes.ids.tolist() == brain.index.tolist()


def test_ambiguous_symbols_pick_protein_coding_then_lowest_id():
    genes = to_ensembl(pd.DataFrame(index=["CAST", "MATR3", "mall", "RGS5-1", "NOT_A_GENE"]), organism=HUMAN)
    # CAST: lncRNA ENSG00000153113 and protein-coding ENSG00000310517;
    # MATR3: two protein-coding IDs; mall: case-insensitive; RGS5-1: made unique by anndata
    assert genes.ids.tolist() == ["ENSG00000310517", "ENSG00000015479", "ENSG00000144063", "ENSG00000143248", ""]
    assert genes.n_unknown == 1


def test_symbols_that_cannot_be_mapped_give_no_ids():
    unclear = to_ensembl(pd.DataFrame(index=["gfp", "tdTomato_x", "Actb", "ACTB"]))
    assert unclear.organism is None
    assert unclear.ids.tolist() == ["", "", "", ""] and unclear.n_unknown == 4
    assert unclear.source == "symbols matching no gene table clearly (exact: human 1, mouse 1)"
    macaque = to_ensembl(pd.DataFrame(index=["ACTB", "GAPDH"]), organism="NCBITaxon:9541")
    assert (macaque.organism, macaque.n_unknown) == (None, 2)
    assert macaque.source == "symbols; no gene table for NCBITaxon:9541"


def test_vocabulary_columns_sum_repeated_genes():
    bmmc = var_of(BMMC)
    ids = bmmc["gene_ids"].to_numpy(dtype=object).copy()
    ids[5] = ids[3]  # gene 5 now repeats gene 3
    ids[7] = ""  # unknown gene
    vocabulary = ["ENSG_NOT_IN_DATA"] + list(ids[[3, 0, 10, 7 - 1]])
    columns, n_covered = vocabulary_columns(ids, vocabulary)
    assert columns.shape == (1000,) and columns[7] == -1 and columns[3] == columns[5] == 1
    assert n_covered == 4
    with open_counts(BMMC) as counts:
        rows = counts.read_rows(0, 600)
    mapped = to_vocabulary(rows, columns, len(vocabulary))
    assert mapped.shape == (600, 5) and mapped.dtype == np.float32 and mapped.has_canonical_format
    per_vocabulary_gene = mapped.toarray()
    dense = rows.toarray()
    assert per_vocabulary_gene[:, 1].sum() > 0
    np.testing.assert_array_equal(per_vocabulary_gene[:, 0], 0)
    np.testing.assert_array_equal(per_vocabulary_gene[:, 1], dense[:, 3] + dense[:, 5])
    np.testing.assert_array_equal(per_vocabulary_gene[:, 2], dense[:, 0])
    np.testing.assert_array_equal(per_vocabulary_gene[:, 3], dense[:, 10])
    np.testing.assert_array_equal(per_vocabulary_gene[:, 4], dense[:, 6])
    # checked against the canonical scipy form: sorted columns, repeats summed once
    reference = (rows @ reference_matrix(columns, 5)).tocsr()
    reference.sum_duplicates()
    np.testing.assert_array_equal(mapped.indptr, reference.indptr)
    np.testing.assert_array_equal(mapped.indices, reference.indices)
    # explicitly stored zeros are not expressed genes
    with_zeros = rows.copy()
    with_zeros.data[::7] = 0
    mapped = to_vocabulary(with_zeros, columns, len(vocabulary))
    assert (mapped.data != 0).all()
    np.testing.assert_array_equal(mapped.toarray(), (with_zeros @ reference_matrix(columns, 5)).toarray())
    with pytest.raises(ValueError, match="repeats gene"):
        vocabulary_columns(ids, ["A", "B", "A"])


def reference_matrix(columns, n_vocab):
    """Dataset genes x vocabulary 0/1 matrix: the sparse-product form of the mapping."""
    mapped_genes = np.flatnonzero(columns >= 0)
    ones = np.ones(mapped_genes.size, dtype=np.float32)
    return sp.csr_matrix((ones, (mapped_genes, columns[mapped_genes])), shape=(len(columns), n_vocab))
