"""10x Cell Ranger outputs: ``.h5`` (v3 ``matrix`` group or v2 ``<genome>`` group) and ``matrix.mtx`` directories.

Only ``Gene Expression`` features are kept. An ``.h5`` is read by rows from the
file; Matrix Market text cannot be, so it is loaded once per reading process.
"""

from __future__ import annotations

import os

import h5py
import numpy as np
import pandas as pd
import scipy.io
import scipy.sparse as sp

from pipeline.io.matrix import (
    CSRRows,
    DatasetError,
    as_text,
    check_only_location,
    closed_on_error,
    in_memory_findings,
    open_hdf5_file,
    table_count_matrix,
)

#: 10x feature type of the RNA features.
GENE_EXPRESSION = "Gene Expression"


# ----------------------------------------------------------------------------- openers


def open_10x_h5(path, counts="auto"):
    """Open a 10x Cell Ranger ``.h5`` feature-barcode matrix (v3 ``matrix`` group, or v1/v2 genome groups).

    Rows are read from the file's CSC-by-barcode arrays; only the ``Gene
    Expression`` features are kept (other feature types are named in the
    matrix's warnings). ``counts`` is ``'auto'`` or the group: ``'matrix'``, or
    a v2 genome (``'GRCh38'``). A multi-genome (barnyard) v2 file needs the
    genome: :func:`genome_groups` lists them, and planning reads each as its own
    dataset. Genome prefixes of gene ids (``hg19_ENSG...``) are removed. A
    probe-level matrix (``features/id`` like ``ENSG...|GENE|probe``) is read
    per gene, from ``features/gene_id``, its probes summed as Cell Ranger's
    gene-level matrix does.
    """
    h5_file = open_hdf5_file(path)
    with closed_on_error(path, "a 10x HDF5 file", h5_file):
        group_name = _group_name(path, h5_file, counts)
        group = h5_file[group_name]
        n_features, n_barcodes = (int(n) for n in group["shape"][:2])
        barcodes = as_text(group["barcodes"][:])
        if "features" in group:
            features = group["features"]
            ids, names = as_text(features["id"][:]), as_text(features["name"][:])
            types = as_text(features["feature_type"][:]) if "feature_type" in features else None
            gene_ids = as_text(features["gene_id"][:]) if "gene_id" in features else None
        else:  # Cell Ranger 1 and 2
            ids, names, types, gene_ids = as_text(group["genes"][:]), as_text(group["gene_names"][:]), None, None
            ids, names = _without_genome_prefix(group_name, ids), _without_genome_prefix(group_name, names)
        n_columns = group["indptr"].shape[0] - 1
        if (len(ids), len(barcodes), n_columns) != (n_features, n_barcodes, n_barcodes):
            raise DatasetError(path, f"{group_name}/shape is {n_features} features x {n_barcodes} barcodes, but it lists "
                               f"{len(ids)} features, {len(barcodes)} barcodes and {n_columns} indptr columns")  # fmt: skip
        var, keep, findings = _tenx_var(path, ids, names, types)
        rows = CSRRows(group["data"], group["indices"], group["indptr"], n_features, keep)
        if gene_ids is not None:
            var, rows, finding = _per_gene(var, gene_ids if keep is None else gene_ids[keep], rows)
            findings += finding
        return table_count_matrix(path, group_name, pd.Index(barcodes, name="barcode"), var, rows, h5_file, findings)


def _group_name(path, h5_file, counts):
    """The group of the counts: ``matrix`` (v3), or the v1/v2 genome asked for or the only one."""
    if "matrix" in h5_file:
        check_only_location(path, counts, "matrix", "a 10x HDF5 file")
        return "matrix"
    genomes = genome_groups(h5_file)
    if counts in genomes or (counts == "auto" and len(genomes) == 1):
        return genomes[0] if counts == "auto" else counts
    if counts == "auto":
        raise DatasetError(path, f"is a multi-genome 10x HDF5 file (genomes {', '.join(genomes)}); list it as an "
                           "input to read each genome as a dataset, or pass data.counts=<genome>")  # fmt: skip
    raise DatasetError(path, f"has no genome {counts!r}: it is a 10x HDF5 file of genomes {', '.join(genomes)}; pass "
                       "data.counts=<one of them>")  # fmt: skip


def _without_genome_prefix(genome, names):
    """Names without the ``<genome>_`` prefix a multi-genome Cell Ranger reference gives every gene."""
    prefix = f"{genome}_"
    if len(names) and all(str(name).startswith(prefix) for name in names):
        return np.array([str(name)[len(prefix) :] for name in names], dtype=object)
    return names


class _SummedColumns:
    """Rows of a source with its columns summed into groups: ``source[selection] @ grouping``."""

    def __init__(self, source, grouping):
        self.source, self.grouping = source, grouping.tocsr()

    @property
    def n_stored(self):
        return self.source.n_stored

    def __getitem__(self, selection):
        return sp.csr_matrix(self.source[selection] @ self.grouping)


def _per_gene(var, gene_ids, rows):
    """A probe-level matrix (several features per ``gene_id``) as one column per gene, its probes summed."""
    gene_ids = np.asarray(gene_ids, dtype=object)
    if pd.Index(gene_ids).is_unique:
        return var.set_axis(pd.Index(gene_ids, name="gene_ids"), axis=0), rows, []
    genes, column = np.unique(gene_ids, return_inverse=True)
    order = pd.unique(column)  # genes in the order of their first probe
    position = np.empty(len(genes), dtype=np.int64)
    position[order] = np.arange(len(order))
    column = position[column]
    grouping = sp.csr_matrix((np.ones(len(gene_ids), dtype=np.float32), (np.arange(len(gene_ids)), column)),
                             shape=(len(gene_ids), len(order)))  # fmt: skip
    first = np.unique(column, return_index=True)[1]
    gene_var = var.iloc[first].set_axis(pd.Index(gene_ids[first], name="gene_ids"), axis=0)
    finding = f"probe-level matrix: {len(gene_ids)} probes summed into {len(order)} genes (features/gene_id)"
    return gene_var, _SummedColumns(rows, grouping), [finding]


def open_10x_mtx(path, counts="auto"):
    """Open a 10x matrix directory (``matrix.mtx(.gz)``, ``barcodes.tsv(.gz)``, ``features.tsv(.gz)``/``genes.tsv``).

    The Matrix Market file is read into memory once; only ``Gene Expression``
    features are kept. ``counts`` is ``'auto'`` or the matrix file's name.
    """
    files = {what: _first_file(path, names) for what, names in (
        ("matrix", ("matrix.mtx.gz", "matrix.mtx")),
        ("barcodes", ("barcodes.tsv.gz", "barcodes.tsv")),
        ("features", ("features.tsv.gz", "features.tsv", "genes.tsv.gz", "genes.tsv")),
    )}  # fmt: skip
    location = os.path.basename(files["matrix"])
    check_only_location(path, counts, location, "a 10x matrix directory")
    for what in ("barcodes", "features"):
        if not os.path.exists(files[what]):
            raise DatasetError(path, f"has {location} but no {what}.tsv.gz (a 10x matrix directory needs both)")
    with closed_on_error(path, "a 10x matrix directory"):
        barcodes = pd.read_csv(files["barcodes"], sep="\t", header=None, dtype=str, keep_default_na=False)[0]
        features = pd.read_csv(files["features"], sep="\t", header=None, dtype=str, keep_default_na=False)
        matrix = scipy.io.mmread(files["matrix"])
    n_features, n_barcodes = matrix.shape
    if (len(features), len(barcodes)) != (n_features, n_barcodes):
        raise DatasetError(path, f"{location} is {n_features} features x {n_barcodes} barcodes, but "
                           f"{os.path.basename(files['features'])} has {len(features)} rows and "
                           f"{os.path.basename(files['barcodes'])} {len(barcodes)}")  # fmt: skip
    ids = features[0].to_numpy(dtype=object)
    names = features[1].to_numpy(dtype=object) if features.shape[1] > 1 else ids
    types = features[2].to_numpy(dtype=object) if features.shape[1] > 2 else None
    var, keep, findings = _tenx_var(path, ids, names, types)
    rows = sp.csr_matrix(matrix.T)
    if keep is not None:
        rows = rows[:, keep]
    findings += in_memory_findings(path, location, rows.nnz)
    return table_count_matrix(path, location, pd.Index(barcodes.to_numpy(dtype=object), name="barcode"), var, rows,
                         None, findings)  # fmt: skip


def _tenx_var(path, ids, names, types):
    """(var of the Gene Expression features, their column positions or None for all, findings)."""
    types = np.full(len(ids), GENE_EXPRESSION, dtype=object) if types is None else types
    var = pd.DataFrame({"gene_symbols": names, "feature_types": types}, index=pd.Index(ids, name="gene_ids"))
    is_rna = types == GENE_EXPRESSION
    if is_rna.all():
        return var, None, []
    kinds = pd.Series(types[~is_rna]).value_counts()
    if not is_rna.any():
        if set(kinds.index) == {"Peaks"}:
            raise DatasetError(path, "looks like ATAC peaks, not RNA (all its features are Peaks): scPRINT-2 embeds "
                               "gene expression")  # fmt: skip
        raise DatasetError(path, f"has no {GENE_EXPRESSION} features (only {', '.join(kinds.index)}): scPRINT-2 "
                           "embeds gene expression")  # fmt: skip
    left_out = ", ".join(f"{n} {kind}" for kind, n in kinds.items())
    finding = f"kept the {int(is_rna.sum())} {GENE_EXPRESSION} features; left out {left_out}"
    return var[is_rna], np.flatnonzero(is_rna), [finding]


def genome_groups(h5_file):
    """The genome groups of a Cell Ranger 1/2 ``.h5`` (``GRCh38``; ``hg19`` and ``mm10`` for a barnyard), in file order."""
    return [name for name, group in h5_file.items() if isinstance(group, h5py.Group)
            and {"barcodes", "genes", "indptr"} <= set(group)]  # fmt: skip


def _first_file(folder, names):
    """The first of ``names`` that exists in ``folder``, else the first name (for messages)."""
    paths = [os.path.join(folder, name) for name in names]
    return next((p for p in paths if os.path.exists(p)), paths[0])
