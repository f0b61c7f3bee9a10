"""QC, normalisation, HVG, PCA, neighbours, leiden and UMAP: scanpy's standard path, made lean.

Each function takes ``adata`` first, works in place, records its wall time in
``uns['cassia_batch']['timings']`` and its settings in ``uns['cassia_batch']``.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Iterator

import anndata as ad
import numpy as np
import pandas as pd
import scanpy as sc
import scipy.sparse as sp

from cassia_helpers.dataset.batches import highly_variable_per_batch
from cassia_helpers.dataset.counts import LIBRARY_SIZE_KEY
from cassia_helpers.dataset.matrix import cells_per_gene, dense_blocks, row_blocks, subset_in_place
from cassia_helpers.dataset.numba_cache import import_umap, quiet_uncachable
from cassia_helpers.dataset.qc_histograms import qc_distributions
from cassia_helpers.dataset.read import InputError
from cassia_helpers.dataset.record import provenance, warn
from cassia_helpers.dataset.steps import timed

MITO_PREFIX = ("MT-", "MT.")  # MT.CO1: the name R makes of MT-CO1 (make.names), in files converted through R


@timed("qc")
def qc(adata: ad.AnnData, *, min_genes: int = 200, min_cells: int = 3, max_pct_mt: float = 20.0) -> None:
    """Filter cells and genes, in place.

    Cells need ``min_genes`` detected genes and at most ``max_pct_mt`` percent mitochondrial counts
    (genes starting ``MT-``/``mt-``, matched case-insensitively so human and mouse both work); genes
    need ``min_cells`` cells.

    Writes ``obs['n_genes_by_counts']``, ``obs['total_counts']``, ``obs['pct_counts_mt']``,
    ``var['mt']`` and ``uns['cassia_batch']['qc']`` (thresholds, sizes before and after, and histograms of
    the metrics before and after filtering under ``distributions``); a warning when it keeps under half the cells.

    Raises
    ------
    InputError
        No cell or no gene is left after filtering.
    """
    record = provenance(adata)
    before = (int(adata.n_obs), int(adata.n_vars))
    adata.var["mt"] = adata.var_names.str.upper().str.startswith(MITO_PREFIX)
    qc_metrics(adata, mito=adata.var["mt"].to_numpy())
    keep = (adata.obs["n_genes_by_counts"].to_numpy() >= min_genes) & (
        adata.obs["pct_counts_mt"].to_numpy() <= max_pct_mt
    )
    thresholds = f"min_genes={min_genes}, max_pct_mt={max_pct_mt}"
    if keep.sum() < 2:  # one cell has no neighbours, no clusters and no markers
        left = "no cells" if not keep.any() else "1 cell only"
        raise InputError(f"{_file(adata)}: {left} left after QC ({thresholds}; {before[0]} "
                         f"cell{'' if before[0] == 1 else 's'} before)")
    distributions = qc_distributions(adata.obs, keep)  # the removed cells' metrics, for the QC figure
    gene_keep = cells_per_gene(adata.X, keep) >= min_cells
    if not gene_keep.any():  # the cells left are too few for any gene to reach min_cells: say who left them
        raise InputError(f"{_file(adata)}: no genes left after QC: {int(keep.sum())} of {before[0]} cells passed "
                         f"{thresholds}, too few for any gene to be detected in min_cells={min_cells}")
    if keep.sum() * 2 < before[0]:
        warn(adata, f"QC kept {int(keep.sum())} of {before[0]} cells ({thresholds}): check the thresholds")
    if not (keep.all() and gene_keep.all()):
        subset_in_place(adata, keep, gene_keep)
    # subsetting in place rebuilds the AnnData and copies ``uns``: fetch the record again
    record = provenance(adata)
    record["qc"] = {
        "min_genes": min_genes,
        "min_cells": min_cells,
        "max_pct_mt": max_pct_mt,
        "cells_before": before[0],
        "genes_before": before[1],
        "cells_after": int(adata.n_obs),
        "genes_after": int(adata.n_vars),
        "mito_genes": int(adata.var["mt"].sum()),
        "distributions": distributions,
    }
    if record["qc"]["mito_genes"] == 0:
        warn(adata, "no mitochondrial genes (MT-, mt-, MT.) found: the mitochondrial filter removed nothing")


@timed("normalize")
def normalize(adata: ad.AnnData, *, target_sum: float = 1e4) -> None:
    """``normalize_total`` then ``log1p``, in place; skipped when ``X`` is already log-normalised.

    No copy of the counts is kept in memory: they are exactly recoverable from ``X`` and each cell's library
    size, and :func:`cassia_helpers.write_annotated` writes them to the h5ad's ``layers['counts']``
    (:mod:`cassia_helpers.dataset.counts`).

    Writes ``obs['library_size']`` (each cell's counts summed over the genes kept by QC),
    ``uns['cassia_batch']['normalize']`` (``method``: what was done, ``target_sum``, ``library_size``).
    """
    record = provenance(adata)
    if not record.get("input", {}).get("is_counts", True):
        record["normalize"] = {"method": "input (already log-normalised)"}
        return
    library = np.asarray(adata.X.sum(axis=1, dtype=np.float64)).ravel()
    adata.obs[LIBRARY_SIZE_KEY] = library
    scale = np.divide(target_sum, library, out=np.zeros_like(library), where=library > 0).astype(np.float32)
    # in place, a block of rows at a time: sc.pp.normalize_total would allocate a second matrix
    if not np.issubdtype(adata.X.dtype, np.floating):
        adata.X = adata.X.astype(np.float32)
    x = adata.X
    for start, stop in row_blocks(x):
        if sp.issparse(x):
            lo, hi = x.indptr[start], x.indptr[stop]
            x.data[lo:hi] *= np.repeat(scale[start:stop], np.diff(x.indptr[start:stop + 1]))
            np.log1p(x.data[lo:hi], out=x.data[lo:hi])
        else:
            x[start:stop] *= scale[start:stop, None]
            np.log1p(x[start:stop], out=x[start:stop])
    adata.uns["log1p"] = {"base": None}
    record["normalize"] = {"method": f"log1p(normalize_total(target_sum={target_sum:g}))",
                           "target_sum": float(target_sum), "library_size": LIBRARY_SIZE_KEY}


@timed("pca")
def reduce_dimensions(adata: ad.AnnData, *, n_top_genes: int = 2000, n_pcs: int = 50, batch_key: str = "") -> None:
    """Highly variable genes, then PCA on them without densifying the whole matrix or scaling it.

    The covariance of the HVG columns is accumulated over dense blocks of rows (a BLAS product per block),
    then eigendecomposed: the same components as scanpy's ``covariance_eigh`` solver, about ten times
    faster on sparse data because scipy's sparse-sparse product is single-threaded. Memory stays at one
    block plus the HVG × HVG covariance. Each component's sign is fixed (largest loading positive), so the
    result is exact and the same on every run: there is no random seed to give. With ``batch_key``, the genes
    are chosen in each batch (:func:`~cassia_helpers.dataset.batches.highly_variable_per_batch`).

    Writes ``var['highly_variable']``, ``obsm['X_pca']``, ``varm['PCs']`` and ``uns['pca']``
    (``variance``, ``variance_ratio``).
    """
    choose_genes = highly_variable_per_batch if batch_key else highly_variable_genes
    mask = choose_genes(adata, n_top_genes=n_top_genes)
    n_comps = max(1, min(n_pcs, adata.n_obs - 1, int(mask.sum()) - 1))
    variance, components, mean, total_variance = _covariance_pca(adata.X, mask, n_comps)
    components32, offset = components.astype(np.float32), (mean @ components).astype(np.float32)
    adata.obsm["X_pca"] = np.concatenate([rows @ components32 - offset for rows in _hvg_blocks(adata.X, mask)])
    loadings = np.zeros((adata.n_vars, n_comps), dtype=np.float32)
    loadings[mask] = components
    adata.varm["PCs"] = loadings
    adata.uns["pca"] = {
        "variance": variance.astype(np.float32),
        "variance_ratio": (variance / max(total_variance, 1e-12)).astype(np.float32),
        "params": {"zero_center": True, "use_highly_variable": True, "mask_var": "highly_variable"},
    }
    provenance(adata)["pca"] = {"n_top_genes": int(mask.sum()), "n_pcs": n_comps, "solver": "blocked covariance"}


def qc_metrics(adata: ad.AnnData, *, mito: np.ndarray) -> None:
    """Scanpy's QC metrics (``sc.pp.calculate_qc_metrics(qc_vars=["mt"], percent_top=None, log1p=False)``).

    Computed a block of rows at a time: scanpy's version allocates temporaries the size of ``X``.
    Writes ``obs``: ``n_genes_by_counts``, ``total_counts``, ``total_counts_mt``, ``pct_counts_mt``;
    ``var``: ``n_cells_by_counts``, ``mean_counts``, ``pct_dropout_by_counts``, ``total_counts``.
    """
    x = adata.X
    n_obs, n_vars = x.shape
    genes_per_cell = np.zeros(n_obs, dtype=np.int64)
    counts_per_cell, mito_per_cell = np.zeros(n_obs), np.zeros(n_obs)
    cells_per_gene, counts_per_gene = np.zeros(n_vars, dtype=np.int64), np.zeros(n_vars)
    for start, stop in row_blocks(x):
        if sp.issparse(x):
            lo, hi = x.indptr[start], x.indptr[stop]
            values, genes = x.data[lo:hi].astype(np.float64), x.indices[lo:hi]
            cells = np.repeat(np.arange(stop - start), np.diff(x.indptr[start:stop + 1]))
            expressed = values > 0
            genes_per_cell[start:stop] = np.bincount(cells[expressed], minlength=stop - start)
            counts_per_cell[start:stop] = np.bincount(cells, weights=values, minlength=stop - start)
            mito_per_cell[start:stop] = np.bincount(cells, weights=values * mito[genes], minlength=stop - start)
            cells_per_gene += np.bincount(genes[expressed], minlength=n_vars)
            counts_per_gene += np.bincount(genes, weights=values, minlength=n_vars)
        else:
            values = np.asarray(x[start:stop], dtype=np.float64)
            genes_per_cell[start:stop] = (values > 0).sum(axis=1)
            counts_per_cell[start:stop] = values.sum(axis=1)
            mito_per_cell[start:stop] = values[:, mito].sum(axis=1)
            cells_per_gene += (values > 0).sum(axis=0)
            counts_per_gene += values.sum(axis=0)
    adata.obs["n_genes_by_counts"] = genes_per_cell
    adata.obs["total_counts"] = counts_per_cell
    adata.obs["total_counts_mt"] = mito_per_cell
    adata.obs["pct_counts_mt"] = np.divide(mito_per_cell * 100, counts_per_cell, out=np.full(n_obs, np.nan),
                                           where=counts_per_cell > 0)
    adata.var["n_cells_by_counts"] = cells_per_gene
    adata.var["mean_counts"] = counts_per_gene / max(n_obs, 1)
    adata.var["pct_dropout_by_counts"] = (1 - cells_per_gene / max(n_obs, 1)) * 100
    adata.var["total_counts"] = counts_per_gene


def highly_variable_genes(adata: ad.AnnData, *, n_top_genes: int = 2000, n_bins: int = 20) -> np.ndarray:
    """Seurat's highly variable genes (scanpy's ``flavor="seurat"``), without a copy of ``X``.

    Per gene, the mean and variance of ``expm1(X)`` are accumulated over blocks of rows; the log dispersion
    is z-scored within ``n_bins`` bins of log mean expression and the ``n_top_genes`` highest are kept
    (ties at the cut-off included), as ``sc.pp.highly_variable_genes(flavor="seurat")`` does after
    copying the whole matrix to take ``expm1``.

    Writes ``var['highly_variable']``, ``var['means']``, ``var['dispersions']``, ``var['dispersions_norm']``;
    returns the mask.
    """
    n_obs = adata.n_obs
    totals, squares = _expm1_column_sums(adata.X)
    mean = totals / n_obs
    variance = (squares / n_obs - mean**2) * (n_obs / max(n_obs - 1, 1))
    mean[mean == 0] = 1e-12
    dispersion = variance / mean
    dispersion[dispersion <= 0] = np.nan
    dispersion = np.log(dispersion)
    log_mean = np.log1p(mean)
    table = pd.DataFrame({"means": log_mean, "dispersions": dispersion}, index=adata.var_names)
    bins = pd.cut(table["means"], bins=n_bins)
    grouped = table.groupby(bins, observed=True)["dispersions"]
    average, spread = grouped.transform("mean"), grouped.transform("std")
    # a bin holding a single gene has no spread: that gene's normalised dispersion is set to 1
    single = spread.isna() & table["dispersions"].notna()
    spread[single], average[single] = average[single], 0.0
    table["dispersions_norm"] = (table["dispersions"] - average) / spread
    ranked = np.sort(table["dispersions_norm"].dropna().to_numpy())[::-1]
    cut = ranked[min(n_top_genes, len(ranked)) - 1] if len(ranked) else np.inf
    table["highly_variable"] = np.nan_to_num(table["dispersions_norm"].to_numpy(), nan=-np.inf) >= cut
    for column in ("highly_variable", "means", "dispersions", "dispersions_norm"):
        adata.var[column] = table[column].to_numpy()
    adata.uns["hvg"] = {"flavor": "seurat"}
    return adata.var["highly_variable"].to_numpy()


def _expm1_column_sums(x) -> tuple[np.ndarray, np.ndarray]:
    """Per column, the sum of ``expm1(x)`` and of its square (float64), a block of rows at a time."""
    totals, squares = np.zeros(x.shape[1]), np.zeros(x.shape[1])
    for start, stop in row_blocks(x):
        if sp.issparse(x):
            lo, hi = x.indptr[start], x.indptr[stop]
            values = np.expm1(x.data[lo:hi], dtype=np.float64)
            totals += np.bincount(x.indices[lo:hi], weights=values, minlength=x.shape[1])
            squares += np.bincount(x.indices[lo:hi], weights=np.square(values, out=values), minlength=x.shape[1])
        else:
            values = np.expm1(np.asarray(x[start:stop]), dtype=np.float64)
            totals += values.sum(axis=0)
            squares += np.square(values).sum(axis=0)
    return totals, squares


def _hvg_blocks(x, mask: np.ndarray) -> Iterator[np.ndarray]:
    """Dense float32 blocks of rows of ``x`` restricted to the ``mask`` columns: never a copy of all of ``x``."""
    for start, stop in dense_blocks((x.shape[0], int(mask.sum()))):
        rows = x[start:stop]
        rows = rows[:, mask].toarray() if sp.issparse(rows) else np.asarray(rows)[:, mask]
        yield rows.astype(np.float32, copy=False)


def _covariance_pca(x, mask: np.ndarray, n_comps: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
    """Top eigenpairs of the covariance of the ``mask`` columns (variances, loadings, column means, total variance)."""
    n_obs, n_vars = x.shape[0], int(mask.sum())
    gram = np.zeros((n_vars, n_vars))
    totals = np.zeros(n_vars)
    for rows in _hvg_blocks(x, mask):
        gram += rows.T @ rows
        totals += rows.sum(axis=0, dtype=np.float64)
    mean = totals / n_obs
    covariance = (gram - n_obs * np.outer(mean, mean)) / max(n_obs - 1, 1)
    values, vectors = np.linalg.eigh(covariance)
    order = np.argsort(values)[::-1][:n_comps]
    values, vectors = np.clip(values[order], 0, None), vectors[:, order]
    signs = np.sign(vectors[np.argmax(np.abs(vectors), axis=0), np.arange(vectors.shape[1])])
    return values, vectors * np.where(signs == 0, 1, signs), mean, float(np.trace(covariance))


@timed("neighbors")
def neighbors(adata: ad.AnnData, *, n_neighbors: int = 15, seed: int = 0, exact_max_cells: int = 150_000) -> None:
    """kNN graph on ``obsm['X_pca']``. Writes ``obsp['distances']``, ``obsp['connectivities']``.

    Up to ``exact_max_cells`` cells the neighbours are exact (brute force, BLAS); above it, an approximate
    PyNNDescent graph (:func:`graph_only_nndescent`), 2-9 times cheaper from 25k to 100k cells, but at 100k its
    clusters agreed less with the known cell types (ARI 0.45 against 0.49; ``bench/pipeline_vs_tutorial.py``).
    """
    import_umap()  # scanpy builds the graph's connectivities with umap-learn
    k = max(2, min(n_neighbors, adata.n_obs - 1))
    exact = adata.n_obs <= exact_max_cells
    with quiet_uncachable():
        sc.pp.neighbors(adata, n_neighbors=k, use_rep="X_pca", random_state=seed,
                        transformer="sklearn" if exact else graph_only_nndescent(adata.n_obs, k, seed))
    provenance(adata)["neighbors"] = {"n_neighbors": k, "search": "exact" if exact else "pynndescent"}


#: PyNNDescent's trees and candidates per cell and iteration (scanpy's: 21 trees at 100k cells, 55 at 1M, and
#: 15 candidates). At 100k cells: 96.2% of the exact neighbours against 95.9%, in a fifth of the time.
NNDESCENT_TREES, NNDESCENT_CANDIDATES = 8, 30


def graph_only_nndescent(n_obs: int, n_neighbors: int, seed: int):
    """A PyNNDescent transformer for ``n_obs`` cells that builds the kNN graph only.

    ``PyNNDescentTransformer.fit_transform`` ends by compressing its index for later queries, which
    compiles a search function numba cannot cache (tens of seconds in every kernel); scanpy never queries
    the index, so that step is skipped. Settings: :data:`NNDESCENT_TREES`, :data:`NNDESCENT_CANDIDATES`, and
    umap-learn's number of iterations. The graph is the same on every run for a seed.
    """
    from pynndescent import PyNNDescentTransformer

    class GraphOnly(PyNNDescentTransformer):
        def fit_transform(self, X, y=None, **_fit_params):  # noqa: N803 (scikit-learn's names)
            self.fit(X, compress_index=False)
            return self.transform(X=None)

    return GraphOnly(n_neighbors=n_neighbors, metric="euclidean", random_state=seed, n_jobs=sc.settings.n_jobs,
                     n_trees=NNDESCENT_TREES, max_candidates=NNDESCENT_CANDIDATES,
                     n_iters=max(5, round(np.log2(n_obs))))


@timed("leiden")
def cluster(adata: ad.AnnData, *, resolution: float = 1.0, seed: int = 0, key_added: str = "leiden") -> None:
    """Leiden clustering of ``obsp['connectivities']`` with igraph (modularity, 2 iterations).

    The same algorithm and settings as ``sc.tl.leiden(flavor="igraph", n_iterations=2)``, but the igraph
    graph is built from the CSR arrays in chunks and the weights are passed as an array: scanpy's builder
    holds every edge as a Python tuple and every weight as a Python float (about 0.9 GB extra at 78k cells,
    tens of GB at 1M). Labels are ``"0"``, ``"1"``, … (largest cluster first, as igraph numbers them).

    Writes ``obs[key_added]`` (categorical) and ``uns[key_added]['params']``.
    """
    import igraph

    adjacency = adata.obsp["connectivities"].tocsr()
    graph, weights = _igraph_from_adjacency(adjacency)
    igraph.set_random_number_generator(random.Random(seed))
    try:
        membership = graph.community_leiden(objective_function="modularity", weights=weights,
                                            resolution=resolution, n_iterations=2).membership
    finally:
        igraph.set_random_number_generator(random)
    groups = np.asarray(membership)
    labels = np.unique(groups).astype(str)
    adata.obs[key_added] = pd.Categorical(groups.astype(str), categories=sorted(labels, key=int))
    adata.uns[key_added] = {"params": {"resolution": resolution, "random_state": seed, "n_iterations": 2}}
    n_clusters = len(labels)
    provenance(adata)["leiden"] = {"resolution": resolution, "n_clusters": n_clusters, "key": key_added}
    if n_clusters == 1:
        warn(adata, "clustering found a single cluster: markers are its most highly expressed genes")


def _igraph_from_adjacency(adjacency: sp.csr_matrix, *, chunk: int = 200_000):
    """An undirected igraph graph with one edge per stored non-zero of ``adjacency``, and its weights.

    Like scanpy's builder, both (i, j) and (j, i) of a symmetric matrix become edges. Edges are fed to
    igraph from a generator so that only one chunk exists as Python objects at a time.
    """
    import igraph

    keep = adjacency.data != 0
    sources = np.repeat(np.arange(adjacency.shape[0], dtype=np.int64), np.diff(adjacency.indptr))[keep]
    targets = adjacency.indices[keep]
    edges = itertools.chain.from_iterable(
        zip(sources[i:i + chunk].tolist(), targets[i:i + chunk].tolist(), strict=True)
        for i in range(0, len(sources), chunk)
    )
    graph = igraph.Graph(n=adjacency.shape[0], edges=edges, directed=False)
    return graph, adjacency.data[keep].astype(np.float64)


@timed("umap")
def umap(adata: ad.AnnData, *, seed: int = 0, large: int = 50_000) -> None:
    """UMAP of the kNN graph. Writes ``obsm['X_umap']``, ``uns['umap']`` and ``uns['cassia_batch']['umap']``.

    The layout starts from the first two principal components instead of a spectral embedding of the graph
    (the spectral start is ~40% of UMAP's time at 100k cells, for no better separation of cell types;
    ``bench/pipeline_variants.py``). Above ``large`` cells: 100 epochs on all threads, the same for a seed
    whatever their number (:mod:`~cassia_helpers.dataset.umap_layout`); below, umap-learn's layout (200 epochs).
    """
    if adata.n_obs < 3:
        adata.obsm["X_umap"] = np.zeros((adata.n_obs, 2), dtype=np.float32)
        return
    start = np.asarray(adata.obsm["X_pca"][:, :2], dtype=np.float32)
    if start.shape[1] < 2:
        start = np.column_stack([start, np.zeros(len(start), np.float32)])
    chunked = adata.n_obs > large
    epochs, layout = (100, "all threads, fixed cell ranges") if chunked else (200, "umap-learn")
    import_umap()
    if chunked:
        from cassia_helpers.dataset.umap_layout import umap_chunked

        umap_chunked(adata, start, n_epochs=epochs, seed=seed)
    else:
        # UMAP's own initialisations live in a box of about ±10
        adata.obsm["_umap_start"] = start * (10.0 / max(float(np.abs(start).max()), 1e-12))
        try:
            sc.tl.umap(adata, random_state=seed, init_pos="_umap_start", maxiter=epochs)
        finally:
            del adata.obsm["_umap_start"]
    adata.obsm["X_umap"] = adata.obsm["X_umap"].astype(np.float32)
    provenance(adata)["umap"] = {"init": "first two PCs", "epochs": epochs, "layout": layout}


def _file(adata: ad.AnnData) -> str:
    return provenance(adata).get("input", {}).get("file", "dataset")
