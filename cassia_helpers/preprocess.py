"""QC, normalisation, HVG, PCA, neighbours, leiden and UMAP: scanpy's standard path, made lean.

Each function takes ``adata`` first, works in place, records its wall time in
``uns['cassia_batch']['timings']`` and its settings in ``uns['cassia_batch']``.
"""

from __future__ import annotations

import anndata as ad
import numpy as np
import scanpy as sc
import scipy.sparse as sp

from .io import InputError, available_memory_bytes, provenance, timed, warn

MITO_PREFIX = "MT-"


@timed("qc")
def qc(
    adata: ad.AnnData,
    *,
    min_genes: int = 200,
    min_cells: int = 3,
    max_pct_mt: float = 20.0,
) -> None:
    """Filter cells and genes, in place.

    Cells need ``min_genes`` detected genes and at most ``max_pct_mt`` percent mitochondrial counts
    (genes starting ``MT-``/``mt-``, matched case-insensitively so human and mouse both work); genes
    need ``min_cells`` cells. When ``X`` holds counts they are kept in ``layers['counts']``.

    Writes ``obs['n_genes_by_counts']``, ``obs['total_counts']``, ``obs['pct_counts_mt']``,
    ``var['mt']``, ``layers['counts']`` and ``uns['cassia_batch']['qc']``.

    Raises
    ------
    InputError
        No cell or no gene is left after filtering.
    """
    record = provenance(adata)
    before = (int(adata.n_obs), int(adata.n_vars))
    adata.var["mt"] = adata.var_names.str.upper().str.startswith(MITO_PREFIX)
    sc.pp.calculate_qc_metrics(adata, qc_vars=["mt"], percent_top=None, log1p=False, inplace=True)
    keep = (adata.obs["n_genes_by_counts"].to_numpy() >= min_genes) & (
        adata.obs["pct_counts_mt"].to_numpy() <= max_pct_mt
    )
    if not keep.all():
        adata._inplace_subset_obs(keep)
    if adata.n_obs == 0:
        raise InputError(
            f"{_file(adata)}: no cells left after QC (min_genes={min_genes}, max_pct_mt={max_pct_mt}; "
            f"{before[0]} cells before)"
        )
    gene_keep, _ = sc.pp.filter_genes(adata.X, min_cells=min_cells, inplace=False)
    if not gene_keep.all():
        adata._inplace_subset_var(gene_keep)
    if adata.n_vars == 0:
        raise InputError(f"{_file(adata)}: no genes left after QC (min_cells={min_cells})")
    # subsetting in place rebuilds the AnnData and copies ``uns``: fetch the record again
    record = provenance(adata)
    if record.get("input", {}).get("is_counts", True):
        if _fits_twice(adata.X):
            adata.layers["counts"] = adata.X.copy()
        else:
            # A second copy of a very large matrix would not fit; counts stay recoverable from X.
            warn(adata, "counts layer not kept (a second copy of the matrix would not fit in memory): "
                        "recover counts as round(expm1(X) * obs['total_counts'] / target_sum)")
    record["qc"] = {
        "min_genes": min_genes,
        "min_cells": min_cells,
        "max_pct_mt": max_pct_mt,
        "cells_before": before[0],
        "genes_before": before[1],
        "cells_after": int(adata.n_obs),
        "genes_after": int(adata.n_vars),
        "mito_genes": int(adata.var["mt"].sum()),
    }
    if record["qc"]["mito_genes"] == 0:
        warn(adata, "no mitochondrial genes (MT-/mt-) found: the mitochondrial filter removed nothing")


@timed("normalize")
def normalize(adata: ad.AnnData, *, target_sum: float = 1e4) -> None:
    """``normalize_total`` then ``log1p``, in place; skipped when ``X`` is already log-normalised.

    Writes ``uns['cassia_batch']['normalized']`` (``"log1p(total={target_sum})"`` or ``"input"``).
    """
    record = provenance(adata)
    if not record.get("input", {}).get("is_counts", True):
        record["normalized"] = "input (already log-normalised)"
        return
    sc.pp.normalize_total(adata, target_sum=target_sum)
    sc.pp.log1p(adata)
    record["normalized"] = f"log1p(normalize_total(target_sum={target_sum:g}))"


@timed("pca")
def reduce_dimensions(adata: ad.AnnData, *, n_top_genes: int = 2000, n_pcs: int = 50, seed: int = 0) -> None:
    """Highly variable genes, then PCA on them without densifying the whole matrix or scaling it.

    The covariance of the HVG columns is accumulated over dense blocks of rows (a BLAS product per block),
    then eigendecomposed: the same components as scanpy's ``covariance_eigh`` solver, about ten times
    faster on sparse data because scipy's sparse-sparse product is single-threaded. Memory stays at one
    block plus the HVG × HVG covariance. Each component's sign is fixed (largest loading positive).

    Writes ``var['highly_variable']``, ``obsm['X_pca']``, ``varm['PCs']`` and ``uns['pca']``
    (``variance``, ``variance_ratio``).
    """
    n_top = min(n_top_genes, adata.n_vars)
    sc.pp.highly_variable_genes(adata, n_top_genes=n_top, flavor="seurat")
    mask = adata.var["highly_variable"].to_numpy()
    n_comps = max(1, min(n_pcs, adata.n_obs - 1, int(mask.sum()) - 1))
    x = adata.X[:, mask]
    x = x.tocsr() if sp.issparse(x) else np.asarray(x)
    variance, components, mean, total_variance = _covariance_pca(x, n_comps)
    projected = x @ components.astype(np.float32)
    adata.obsm["X_pca"] = (np.asarray(projected) - (mean @ components).astype(np.float32)).astype(np.float32)
    loadings = np.zeros((adata.n_vars, n_comps), dtype=np.float32)
    loadings[mask] = components
    adata.varm["PCs"] = loadings
    adata.uns["pca"] = {
        "variance": variance.astype(np.float32),
        "variance_ratio": (variance / max(total_variance, 1e-12)).astype(np.float32),
        "params": {"zero_center": True, "use_highly_variable": True, "mask_var": "highly_variable"},
    }
    provenance(adata)["pca"] = {"n_top_genes": int(mask.sum()), "n_pcs": n_comps, "solver": "blocked covariance"}


def _covariance_pca(x, n_comps: int, *, block: int = 10_000) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
    """Top eigenpairs of the column covariance of ``x`` (variances, loadings, column means, total variance)."""
    n_obs, n_vars = x.shape
    gram = np.zeros((n_vars, n_vars))
    totals = np.zeros(n_vars)
    for start in range(0, n_obs, block):
        rows = x[start:start + block]
        rows = rows.toarray() if sp.issparse(rows) else np.asarray(rows, dtype=np.float32)
        rows = rows.astype(np.float32, copy=False)
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

    Up to ``exact_max_cells`` cells the neighbours are exact (brute force, BLAS): at 78k cells that is twice
    as fast as PyNNDescent in a fresh process (which spends ~25 s compiling) and agrees better with the
    known cell types (``bench/``). Above it, scanpy's approximate PyNNDescent search scales better.
    """
    k = max(2, min(n_neighbors, adata.n_obs - 1))
    exact = adata.n_obs <= exact_max_cells
    sc.pp.neighbors(adata, n_neighbors=k, use_rep="X_pca", random_state=seed,
                    transformer="sklearn" if exact else None)
    provenance(adata)["neighbors"] = {"n_neighbors": k, "search": "exact" if exact else "pynndescent"}


@timed("leiden")
def cluster(adata: ad.AnnData, *, resolution: float = 1.0, seed: int = 0, key_added: str = "leiden") -> None:
    """Leiden clustering (igraph flavour). Writes ``obs[key_added]`` (categorical, labels ``"0"``, ``"1"``, …)."""
    sc.tl.leiden(
        adata,
        resolution=resolution,
        flavor="igraph",
        n_iterations=2,
        directed=False,
        random_state=seed,
        key_added=key_added,
    )
    n_clusters = int(adata.obs[key_added].nunique())
    provenance(adata)["leiden"] = {"resolution": resolution, "n_clusters": n_clusters, "key": key_added}
    if n_clusters == 1:
        warn(adata, "clustering found a single cluster: markers are its most highly expressed genes")


@timed("umap")
def umap(adata: ad.AnnData, *, seed: int = 0, large: int = 50_000) -> None:
    """UMAP of the kNN graph. Writes ``obsm['X_umap']`` and ``uns['cassia_batch']['umap']``.

    The layout starts from the first two principal components instead of a spectral embedding of the graph
    (the spectral start is ~40% of UMAP's time at 100k cells, for no better separation of cell types;
    ``bench/pipeline_variants.py``), and datasets above ``large`` cells run 100 epochs instead of 200
    (the embedding is for looking at; clustering does not use it).
    """
    if adata.n_obs < 3:
        adata.obsm["X_umap"] = np.zeros((adata.n_obs, 2), dtype=np.float32)
        return
    start = np.asarray(adata.obsm["X_pca"][:, :2], dtype=np.float32)
    if start.shape[1] < 2:
        start = np.column_stack([start, np.zeros(len(start), np.float32)])
    # UMAP's own initialisations live in a box of about ±10
    adata.obsm["_umap_start"] = start * (10.0 / max(float(np.abs(start).max()), 1e-12))
    epochs = 100 if adata.n_obs > large else None
    try:
        sc.tl.umap(adata, random_state=seed, init_pos="_umap_start", maxiter=epochs)
    finally:
        del adata.obsm["_umap_start"]
    adata.obsm["X_umap"] = adata.obsm["X_umap"].astype(np.float32)
    provenance(adata)["umap"] = {"init": "first two PCs", "epochs": epochs or "scanpy default"}


def _matrix_bytes(matrix) -> int:
    if sp.issparse(matrix):
        return int(matrix.data.nbytes + matrix.indices.nbytes + matrix.indptr.nbytes)
    return int(np.asarray(matrix).nbytes)


def _fits_twice(matrix, *, share: float = 0.35) -> bool:
    """Whether one more copy of ``matrix`` keeps us under ``share`` of the memory still available."""
    available = available_memory_bytes()
    return available is None or _matrix_bytes(matrix) <= share * available


def _file(adata: ad.AnnData) -> str:
    return provenance(adata).get("input", {}).get("file", "dataset")
