"""Marker genes per cluster: a tidy table, and the ranked lists sent to annotators."""

from __future__ import annotations

import re
import warnings

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp
from scipy import stats

from cassia_helpers.dataset.annotate import ClusterMarkers
from cassia_helpers.dataset.matrix import row_blocks
from cassia_helpers.dataset.record import cluster_key, provenance, warn
from cassia_helpers.dataset.steps import timed
from cassia_helpers.dataset.wilcoxon import rank_sum_test

MARKER_COLUMNS = [
    "cluster",
    "rank",
    "gene",
    "score",
    "logfoldchange",
    "pval",
    "pval_adj",
    "pct_in_cluster",
    "pct_out_cluster",
]


# genes per cluster kept in uns['rank_genes_groups'] (the CSV holds more)
RANK_GENES_GROUPS_TOP = 25


@timed("markers")
def rank_markers(
    adata: ad.AnnData,
    *,
    groupby: str | None = None,
    method: str = "wilcoxon",
    n_genes: int | None = 100,
    max_cells_per_cluster: int | None = 1000,
    min_pct: float = 0.1,
    gene_chunk: int = 1000,
    seed: int = 0,
    key_added: str | None = "rank_genes_groups",
) -> pd.DataFrame:
    """Rank marker genes of every cluster against all other cells.

    Tests run on log-normalised ``X``. ``method="wilcoxon"`` gives the statistics of scanpy's
    ``rank_genes_groups(method="wilcoxon")`` (no tie correction, as its default) from one ranking of each gene
    for all clusters (:mod:`cassia_helpers.dataset.wilcoxon`); other methods run scanpy's.
    Clusters larger than ``max_cells_per_cluster`` are represented by
    a random sample of that many cells (the ranking of strong markers is stable under such sampling and
    the test cost falls from minutes to seconds on large data); ``None`` uses every cell. As Seurat's
    ``FindAllMarkers`` does by default (``min.pct = 0.1``), only genes detected in at least ``min_pct`` of
    the (sampled) cells of some cluster are tested: the others cannot be useful markers, and leaving them
    out shrinks the copy of the matrix the test works on (0 tests every gene). Genes are tested
    ``gene_chunk`` at a time, so memory stays at a fraction of ``X`` whatever its width; the adjusted
    p-values (Benjamini-Hochberg) are computed over all genes tested. Results are not left in
    ``uns['rank_genes_groups']`` (with many clusters it breaks the h5ad write; see
    :func:`store_rank_genes_groups`). ``n_genes=None`` keeps every tested gene of every cluster: the full
    differential expression that the boost agent's gene look-ups are answered from.

    Returns
    -------
    A tidy table, one row per cluster × gene, best first within a cluster, with columns
    ``cluster, rank, gene, score, logfoldchange, pval, pval_adj, pct_in_cluster, pct_out_cluster``.
    Writes ``uns['cassia_batch']['markers']`` (settings) and ``uns[key_added]``.
    """
    groupby = groupby or cluster_key(adata)
    labels = adata.obs[groupby].astype(str)
    groups = sorted(labels.unique(), key=_natural_key)
    subset = _sample_cells(labels, max_cells_per_cluster, seed)
    record = {"method": method, "groupby": groupby, "n_genes": n_genes or 0,
              "max_cells_per_cluster": max_cells_per_cluster or 0, "cells_tested": int(subset.sum()),
              "min_pct": min_pct}
    provenance(adata)["markers"] = record
    if len(groups) == 1:
        record["method"] = "mean expression (single cluster)"
        return _single_cluster_markers(adata, groups[0], n_genes)

    sizes = labels.value_counts()
    testable = [g for g in groups if sizes[g] >= 2]
    if len(testable) < len(groups):
        skipped = [g for g in groups if g not in testable]
        warn(adata, f"clusters {', '.join(skipped)} have a single cell: no marker test, labelled Unknown")
    if len(testable) < 2:
        record["method"] = "mean expression (single testable cluster)"
        return _single_cluster_markers(adata[labels == testable[0]], testable[0], n_genes) if testable else \
            pd.DataFrame(columns=MARKER_COLUMNS)
    codes = pd.Categorical(labels[subset], groups)
    genes = _detected_genes(adata.X, subset, codes.codes, len(groups), min_pct)
    record["genes_tested"] = int(genes.sum())
    # Every statistic but the adjusted p-value is per gene, so genes are tested a chunk at a time (memory
    # stays at a fraction of X) and the Benjamini-Hochberg step runs over all of them.
    tables = []
    for chunk in np.array_split(np.flatnonzero(genes), max(1, -(-int(genes.sum()) // gene_chunk))):
        columns = np.zeros(adata.n_vars, dtype=bool)
        columns[chunk] = True
        work = _submatrix(adata.X, subset, columns)
        names = adata.var_names[columns]
        if method == "wilcoxon":
            tables.extend(_wilcoxon_tables(work, codes, testable, names))
        else:
            tables.append(_scanpy_table(work, codes, testable, names, groupby=groupby, method=method))
        del work
    table = pd.concat(tables, ignore_index=True)
    table["cluster"] = table["cluster"].astype(str)
    table["pval_adj"] = table.groupby("cluster", sort=False)["pval"].transform(
        lambda p: stats.false_discovery_control(p.fillna(1.0).to_numpy(), method="bh"))
    table = table.sort_values(["cluster", "score"], ascending=[True, False], kind="stable")
    table["rank"] = table.groupby("cluster", sort=False).cumcount() + 1
    if n_genes:
        table = table[table["rank"] <= n_genes]
    table["cluster"] = pd.Categorical(table["cluster"], groups)
    table = table.sort_values(["cluster", "rank"]).reset_index(drop=True)
    table["cluster"] = table["cluster"].astype(str)
    table = table[MARKER_COLUMNS]
    if key_added:
        store_rank_genes_groups(adata, top_markers(table, RANK_GENES_GROUPS_TOP), groupby=groupby, method=method,
                                n_genes=RANK_GENES_GROUPS_TOP, key_added=key_added)
    return table


def _wilcoxon_tables(x, codes: pd.Categorical, testable: list[str], names: pd.Index) -> list[pd.DataFrame]:
    """scanpy's wilcoxon statistics of every testable cluster against the rest, one ranking per gene for all
    clusters (:func:`cassia_helpers.dataset.wilcoxon.rank_sum_test`)."""
    result = rank_sum_test(x, codes.codes, len(codes.categories))
    position = {group: code for code, group in enumerate(codes.categories)}
    return [pd.DataFrame({
        "cluster": group, "gene": names.to_numpy(),
        # the dtypes of scanpy's uns['rank_genes_groups'], from which this table was read before
        "score": result.scores[position[group]].astype(np.float32),
        "logfoldchange": result.logfoldchanges[position[group]].astype(np.float32),
        "pval": result.pvals[position[group]], "pct_in_cluster": result.pts[position[group]],
        "pct_out_cluster": result.pts_rest[position[group]],
    }) for group in testable]


def _scanpy_table(x, codes: pd.Categorical, testable: list[str], names: pd.Index, *, groupby: str,
                  method: str) -> pd.DataFrame:
    """``sc.tl.rank_genes_groups`` with another method than wilcoxon (t-test, logreg), in our columns."""
    import scanpy as sc

    work = ad.AnnData(X=x, obs=pd.DataFrame({groupby: codes}, index=np.arange(len(codes)).astype(str)),
                      var=pd.DataFrame(index=names))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", pd.errors.PerformanceWarning)
        sc.tl.rank_genes_groups(work, groupby, groups=testable, reference="rest", method=method, pts=True,
                                use_raw=False, key_added="ranked", n_genes=len(names))
    table = sc.get.rank_genes_groups_df(work, group=None, key="ranked")
    return table.rename(columns={"group": "cluster", "names": "gene", "scores": "score",
                                 "logfoldchanges": "logfoldchange", "pvals": "pval",
                                 "pct_nz_group": "pct_in_cluster", "pct_nz_reference": "pct_out_cluster"})


def _detected_genes(x, cells: np.ndarray, codes: np.ndarray, n_groups: int, min_pct: float) -> np.ndarray:
    """Genes detected in at least ``min_pct`` of the ``cells`` of some group (``codes``: group per kept cell)."""
    if min_pct <= 0:
        return np.ones(x.shape[1], dtype=bool)
    group_of_row = np.full(x.shape[0], -1)
    group_of_row[cells] = codes
    detected = np.zeros((n_groups, x.shape[1]), dtype=np.int64)
    for start, stop in row_blocks(x):
        groups = group_of_row[start:stop]
        if sp.issparse(x):
            lo, hi = x.indptr[start], x.indptr[stop]
            entry_group = np.repeat(groups, np.diff(x.indptr[start:stop + 1]))
            keep = (entry_group >= 0) & (x.data[lo:hi] != 0)
            flat = entry_group[keep] * x.shape[1] + x.indices[lo:hi][keep]
            detected += np.bincount(flat, minlength=detected.size).reshape(detected.shape)
        else:
            block = np.asarray(x[start:stop]) != 0
            for group in np.unique(groups[groups >= 0]):
                detected[group] += block[groups == group].sum(axis=0)
    sizes = np.maximum(np.bincount(codes, minlength=n_groups), 1)
    kept = (detected / sizes[:, None] >= min_pct).any(axis=0)
    return kept if kept.any() else np.ones(x.shape[1], dtype=bool)  # nothing passes: test every gene


def _submatrix(x, cells: np.ndarray, genes: np.ndarray):
    """``x[cells][:, genes]`` in one pass over blocks of rows, without a copy of all of ``x``'s selected rows."""
    if not sp.issparse(x):
        return np.asarray(x)[np.flatnonzero(cells)][:, genes]
    x = x.tocsr()
    new_column = (np.cumsum(genes) - 1).astype(np.int64)
    data, indices, per_row = [], [], []
    for start, stop in row_blocks(x):
        lo, hi = x.indptr[start], x.indptr[stop]
        rows = np.repeat(np.arange(stop - start), np.diff(x.indptr[start:stop + 1]))
        kept = cells[start:stop][rows] & genes[x.indices[lo:hi]]
        data.append(x.data[lo:hi][kept])
        indices.append(new_column[x.indices[lo:hi][kept]])
        per_row.append(np.bincount(rows[kept], minlength=stop - start)[cells[start:stop]])
    indptr = np.concatenate([[0], np.cumsum(np.concatenate(per_row))])
    return sp.csr_matrix((np.concatenate(data), np.concatenate(indices), indptr),
                         shape=(int(cells.sum()), int(genes.sum())))


def _natural_key(label: str):
    return (0, int(label), "") if label.isdigit() else (1, 0, label)


def _sample_cells(labels: pd.Series, max_cells: int | None, seed: int) -> np.ndarray:
    keep = np.ones(len(labels), dtype=bool)
    if not max_cells:
        return keep
    rng = np.random.default_rng(seed)
    codes = labels.to_numpy()
    for group in pd.unique(codes):
        members = np.flatnonzero(codes == group)
        if members.size > max_cells:
            drop = rng.choice(members, members.size - max_cells, replace=False)
            keep[drop] = False
    return keep


def _single_cluster_markers(adata: ad.AnnData, group: str, n_genes: int | None) -> pd.DataFrame:
    x = adata.X
    mean = np.asarray(x.mean(axis=0)).ravel()
    detected = np.asarray((x > 0).mean(axis=0)).ravel() if sp.issparse(x) else (x > 0).mean(axis=0)
    order = np.argsort(-mean, kind="stable")[:n_genes]
    return pd.DataFrame({
        "cluster": group,
        "rank": np.arange(1, len(order) + 1),
        "gene": adata.var_names[order].to_numpy(),
        "score": mean[order],
        "logfoldchange": np.nan,
        "pval": np.nan,
        "pval_adj": np.nan,
        "pct_in_cluster": detected[order],
        "pct_out_cluster": np.nan,
    })[MARKER_COLUMNS]


#: Genes never sent to a model (they stay in the markers CSV and the boost's look-ups): ribosomal proteins
#: (RPS*/RPL*, RPLP*, RPSA; mouse Rps*/Rpl*), mitochondrially encoded genes (MT-*, mouse mt-*) and their
#: nuclear pseudogenes (MTRNR2L*), and ubiquitous transcripts that rank high in any cluster with more RNA
#: (translation elongation factors, thymosins, ferritins, actins, GAPDH, B2M, MALAT1/NEAT1, ...). They say
#: how many transcripts a cell has, not which type it is, and crowd out the markers that do.
UNINFORMATIVE_PATTERN = re.compile(r"^(?:RP[SL](?!\d+K[AB])\d+[A-Z]{0,2}\d*$|RPLP\d$|RPSA$|MT[-.]|MTRNR2L\d)",
                                   re.IGNORECASE)  # not the S6 kinases (RPS6KA1, RPS6KB1)
UBIQUITOUS_GENES = frozenset({
    "MALAT1", "NEAT1", "EEF1A1", "EEF1B2", "EEF1D", "EEF1G", "EEF2", "TPT1", "TMSB4X", "TMSB10", "FTL", "FTH1",
    "ACTB", "ACTG1", "GAPDH", "B2M", "UBA52", "FAU", "PTMA", "HSP90AB1", "PFN1", "MYL6", "NACA", "BTF3",
})
#: How the genes sent are ordered after the filters (see :func:`cluster_markers`)
RANKINGS = ("logfc", "score")


def informative(gene: str) -> bool:
    """Whether a gene may be sent to a model: not ribosomal, mitochondrial or ubiquitous (any species' case)."""
    return not UNINFORMATIVE_PATTERN.match(gene) and gene.upper() not in UBIQUITOUS_GENES


def cluster_markers(
    adata: ad.AnnData,
    markers: pd.DataFrame,
    *,
    groupby: str | None = None,
    n_top: int = 50,
    max_pval_adj: float = 0.05,
    min_logfc: float = 0.25,
    min_pct: float = 0.1,
    ranking: str = "logfc",
    informative_only: bool = True,
) -> list[ClusterMarkers]:
    """The marker list of each cluster, as sent to an annotator.

    Genes pass when ``pval_adj <= max_pval_adj``, ``logfoldchange >= min_logfc`` and they are detected in
    at least ``min_pct`` of the cluster's cells; with ``informative_only`` ribosomal, mitochondrial and
    ubiquitous genes (:func:`informative`) are left out. ``ranking="logfc"`` (the default, as CASSIA
    does) orders the passing genes by log2 fold change, most specific first; ``"score"`` keeps the test's
    order (the wilcoxon score, which favours highly expressed genes). The first ``n_top`` are kept. A
    cluster with fewer than 5 passing genes keeps its top ranked informative genes instead (recorded as a
    warning). The full table (every gene) stays in ``markers`` for the CSV and the boost's look-ups.

    Writes ``uns['cassia_batch']['marker_filter']``: the filters, the ranking, the genes left out
    (``excluded``) and how many of them were among the first ``n_top`` of the test's ranking, all clusters
    together (``n_left_out``).
    """
    if ranking not in RANKINGS:
        raise ValueError(f"ranking must be one of {RANKINGS}, got {ranking!r}")
    groupby = groupby or cluster_key(adata)
    sizes = adata.obs[groupby].astype(str).value_counts()
    result = []
    relaxed = []
    excluded = 0  # left-out genes among the first n_top of the test's ranking
    for cluster, rows in markers.groupby("cluster", sort=False):
        rows = rows.sort_values("rank")
        if informative_only:
            keep = rows["gene"].astype(str).map(informative).to_numpy(dtype=bool)
            excluded += int((~keep[:n_top]).sum())
            rows = rows[keep]
        passing = rows[(rows["pval_adj"].fillna(0) <= max_pval_adj)
                       & (rows["logfoldchange"].fillna(np.inf) >= min_logfc)
                       & (rows["pct_in_cluster"].fillna(1.0) >= min_pct)]
        if len(passing) < 5:
            relaxed.append(str(cluster))
            passing = rows
        elif ranking == "logfc":
            passing = passing.sort_values("logfoldchange", ascending=False, kind="stable")
        top = passing.head(n_top)
        result.append(ClusterMarkers(
            cluster=str(cluster),
            genes=top["gene"].astype(str).tolist(),
            logfoldchanges=top["logfoldchange"].astype(float).round(3).tolist(),
            pct_in=top["pct_in_cluster"].astype(float).round(3).tolist(),
            pct_out=top["pct_out_cluster"].astype(float).round(3).tolist(),
            n_cells=int(sizes.get(str(cluster), 0)),
        ))
    provenance(adata)["marker_filter"] = {
        "ranking": ("log2 fold change (best first)" if ranking == "logfc"
                    else "rank_genes_groups score (best first)"),
        "n_top": n_top, "max_pval_adj": max_pval_adj, "min_logfc": min_logfc, "min_pct": min_pct,
        "excluded": ("ribosomal (RPS/RPL), mitochondrial (MT-) and ubiquitous genes "
                     f"({', '.join(sorted(UBIQUITOUS_GENES))})" if informative_only else "none"),
        "n_left_out": excluded,
    }
    if relaxed:
        warn(adata, f"clusters {', '.join(relaxed)} had fewer than 5 markers passing the filters: "
                    "their top ranked genes were sent instead")
    return result


def top_markers(table: pd.DataFrame, n_genes: int = 100, *,
                sent: list[ClusterMarkers] | None = None) -> pd.DataFrame:
    """The first ``n_genes`` ranks of every cluster of a full table (``rank_markers(n_genes=None)``).

    Parameters
    ----------
    table
        The full marker table, one row per cluster × gene.
    n_genes
        Ranks kept per cluster.
    sent
        The lists sent to the annotator (:func:`cluster_markers`): each of their genes keeps its cluster's
        row too, after the first ``n_genes`` in the order of the test's ranks. The lists are ranked by fold
        change, so many of their genes rank lower by the test, and a reader checking what the annotator saw
        (or CASSIA's boost looking a gene up) would otherwise find no row.

    Returns
    -------
    pandas.DataFrame
        The rows kept, in ``table``'s order.
    """
    keep = table["rank"] <= n_genes
    if sent:
        pairs = pd.MultiIndex.from_tuples([(m.cluster, gene) for m in sent for gene in m.genes])
        keep |= pd.MultiIndex.from_arrays([table["cluster"].astype(str), table["gene"].astype(str)]).isin(pairs)
    return table[keep].reset_index(drop=True)


def store_rank_genes_groups(
    adata: ad.AnnData,
    markers: pd.DataFrame,
    *,
    groupby: str = "leiden",
    method: str = "wilcoxon",
    n_genes: int = 25,
    key_added: str = "rank_genes_groups",
) -> bool:
    """Keep the marker test in ``uns[key_added]`` as scanpy does, compactly.

    The top ``n_genes`` per cluster, float32 numbers and fixed-width names (``names``, ``scores``,
    ``logfoldchanges``, ``pvals``, ``pvals_adj``, ``pts``, ``pts_rest``, ``params``), so scanpy's
    ``sc.get.rank_genes_groups_df`` and ``sc.pl.rank_genes_groups_*`` work on the written h5ad. With more
    clusters than HDF5's object header can describe (about a thousand), nothing is stored and a warning is
    recorded. Returns whether it was stored.
    """
    from cassia_helpers.dataset.cassia_format import rank_genes_groups_uns

    entry = rank_genes_groups_uns(markers, groupby=groupby, method=method, n_genes=n_genes)
    if entry is None:
        warn(adata, f"uns['{key_added}'] not written: {markers['cluster'].nunique()} clusters are more than an "
                    "h5ad can hold in scanpy's layout; the markers CSV has the full table")
        return False
    adata.uns[key_added] = entry
    return True
