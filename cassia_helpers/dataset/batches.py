"""Datasets of many donors or samples (``batch_key``): genes chosen per batch, the PCA integrated with Harmony,
and every cluster's cells counted per batch.

Clustered as they are, the cells of a 40-patient atlas split by patient before they split by cell type, and
each patient's clusters get their own calls. With ``batch_key`` naming the ``obs`` column of the donor (or
sample, or batch):

1. :func:`check_batches` (before QC) checks the column and that Harmony is installed, and counts each batch's
   cells, so the cells QC removes from each batch are known;
2. the highly variable genes are chosen in each batch and ranked by the number of batches that chose them
   (:func:`highly_variable_per_batch`, scanpy's ``highly_variable_genes(batch_key=...)``), so that genes
   which differ only between donors do not dominate the PCA;
3. :func:`integrate_batches` corrects the PCA with Harmony (``harmonypy``, the ``[harmony]`` extra): the
   corrected components replace ``obsm['X_pca']``, which the kNN graph, the clustering and the UMAP read; the
   uncorrected ones are kept in ``obsm['X_pca_uncorrected']``;
4. :func:`count_batches` (after clustering) counts each cluster's cells per batch and flags the clusters made
   of one batch only: a cell type of one donor, or a donor effect Harmony did not remove.
"""

from __future__ import annotations

import importlib.util
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from cassia_helpers.dataset.existing import input_column
from cassia_helpers.dataset.record import cluster_key, provenance, warn
from cassia_helpers.dataset.steps import timed

if TYPE_CHECKING:
    from anndata import AnnData

#: the ``obs`` column holding each cell's batch (the input's column, its missing values named)
BATCH_COLUMN = "cassia_batch"
MISSING = "unassigned"
HARMONY_HINT = "pip install 'cassia-batch[harmony]' (or pip install harmonypy)"


def harmony_installed() -> bool:
    """Whether ``harmonypy`` can be imported (without importing it)."""
    return importlib.util.find_spec("harmonypy") is not None


def harmony_missing_message(batch_key: str) -> str:
    """The one-line message for a ``batch_key`` given where ``harmonypy`` is not installed."""
    return f"batch_key {batch_key!r} needs harmonypy to integrate the batches, and it is not installed: {HARMONY_HINT}"


def check_batches(adata: AnnData, *, batch_key: str = "") -> None:
    """Check ``obs[batch_key]`` and Harmony, and count each batch's cells before QC; nothing without a key.

    Writes ``obs['cassia_batch']`` (each cell's batch as text; cells the input leaves empty are
    ``unassigned``) and ``uns['cassia_batch']['batches']`` (``input_key``, ``batches``, ``cells_before_qc``).

    Raises
    ------
    InputError
        The input has no such column (the message names the input and its columns).
    ModuleNotFoundError
        ``harmonypy`` is not installed (the message says how to install it).
    """
    if not batch_key:
        return
    column = input_column(adata, batch_key, what="batch_key")
    if not harmony_installed():
        raise ModuleNotFoundError(harmony_missing_message(batch_key))
    values = adata.obs[column]
    labels = values.astype(object).where(values.notna(), MISSING).astype(str)
    order = sorted(pd.unique(labels), key=str)
    adata.obs[BATCH_COLUMN] = pd.Categorical(labels.to_numpy(), categories=order)
    counts = adata.obs[BATCH_COLUMN].value_counts().reindex(order)
    provenance(adata)["batches"] = {"input_key": column, "key": BATCH_COLUMN, "batches": order,
                                    "cells_before_qc": [int(n) for n in counts]}
    if len(order) < 2:
        warn(adata, f"batch_key {batch_key!r}: every cell is in one batch ({order[0]}): nothing to integrate")


def highly_variable_per_batch(adata: AnnData, *, n_top_genes: int = 2000) -> np.ndarray:
    """Seurat's highly variable genes chosen in each batch of ``obs['cassia_batch']`` and ranked by the number
    of batches that chose them, then by their mean normalised dispersion
    (``sc.pp.highly_variable_genes(flavor="seurat", batch_key=...)``).

    Writes ``var['highly_variable']``, ``var['means']``, ``var['dispersions']``, ``var['dispersions_norm']``,
    ``var['highly_variable_nbatches']``; returns the mask.
    """
    import scanpy as sc

    batches = adata.obs[BATCH_COLUMN]
    # a batch of a single cell has no variance: scanpy's per-batch statistics need two cells at least
    small = batches.value_counts()
    small = set(small[small < 2].index)
    view = adata[~batches.isin(small).to_numpy()] if small else adata
    table = sc.pp.highly_variable_genes(view, flavor="seurat", n_top_genes=min(n_top_genes, adata.n_vars),
                                        batch_key=BATCH_COLUMN, inplace=False)
    table = table.reindex(adata.var_names)
    for column in ("highly_variable", "means", "dispersions", "dispersions_norm", "highly_variable_nbatches"):
        values = table[column].to_numpy()
        adata.var[column] = values.astype(bool) if column == "highly_variable" else values
    adata.var["highly_variable"] = adata.var["highly_variable"].fillna(False).astype(bool)
    adata.uns["hvg"] = {"flavor": "seurat", "batch_key": BATCH_COLUMN}
    provenance(adata)["batches"]["hvg"] = {"n_top_genes": int(adata.var["highly_variable"].sum()),
                                           "batches_left_out": sorted(map(str, small))}
    return adata.var["highly_variable"].to_numpy()


def integrate_batches(adata: AnnData, *, batch_key: str = "", seed: int = 0) -> None:
    """Correct ``obsm['X_pca']`` for the batches of ``obs['cassia_batch']`` with Harmony; nothing without a key
    (or with one batch only).

    Writes ``obsm['X_pca']`` (the corrected components), ``obsm['X_pca_uncorrected']`` and
    ``uns['cassia_batch']['batches']['harmony']`` (``iterations``, ``converged``, ``n_clusters``, ``seed``).
    """
    record = provenance(adata).get("batches")
    if batch_key and record and len(record["batches"]) >= 2:  # a step, timed and on the progress lines, only then
        _harmony(adata, record, seed=seed)


@timed("harmony")
def _harmony(adata: AnnData, record: dict, *, seed: int) -> None:
    import harmonypy

    pcs = np.asarray(adata.obsm["X_pca"], dtype=np.float64)
    meta = pd.DataFrame({"batch": adata.obs[BATCH_COLUMN].astype(str).to_numpy()})
    # harmonypy's default is N/30 soft clusters (at most 100): at least two, so tiny datasets integrate too
    n_clusters = int(min(max(round(adata.n_obs / 30.0), 2), 100, max(adata.n_obs - 1, 1)))
    result = harmonypy.run_harmony(pcs, meta, "batch", nclust=n_clusters, random_state=seed, verbose=False)
    corrected = np.asarray(result.Z_corr, dtype=np.float32)  # cells x components (harmonypy >= 2)
    adata.obsm["X_pca_uncorrected"] = adata.obsm["X_pca"]
    adata.obsm["X_pca"] = np.ascontiguousarray(corrected)
    rounds = list(getattr(result, "objective_harmony", []) or [])
    record["harmony"] = {"n_clusters": n_clusters, "seed": seed, "iterations": max(len(rounds) - 1, 0),
                         "method": f"harmonypy {_version('harmonypy')}"}


def count_batches(adata: AnnData) -> pd.DataFrame | None:
    """Each cluster's cells per batch, and the clusters made of one batch only; ``None`` without a batch key.

    Writes ``uns['cassia_batch']['batches']``: ``cells_after_qc`` (per batch, in the order of ``batches``),
    ``clusters`` (one row per cluster: ``cluster``, ``n_batches``, ``batch_cells`` as ``"A: 120; B: 98"``,
    largest first, and ``single_batch``) and ``single_batch_clusters``; a warning names the clusters of one
    batch, another the batches QC kept under half of.
    """
    record = provenance(adata).get("batches")
    if not record:
        return None
    clusters = adata.obs[cluster_key(adata)]
    batches = adata.obs[BATCH_COLUMN].astype(str)
    order = [str(c) for c in (clusters.cat.categories if hasattr(clusters, "cat") else sorted(set(clusters)))]
    counts = pd.crosstab(clusters.astype(str), batches).reindex(index=order, columns=record["batches"], fill_value=0)
    counts = counts.loc[counts.sum(axis=1) > 0]
    several = len(record["batches"]) > 1
    rows = []
    for cluster, row in counts.iterrows():
        present = row[row > 0].sort_values(ascending=False, kind="stable")
        rows.append({"cluster": str(cluster), "n_batches": int(len(present)),
                     "batch_cells": "; ".join(f"{b}: {int(n)}" for b, n in present.items()),
                     "single_batch": bool(several and len(present) == 1)})
    table = pd.DataFrame(rows, columns=["cluster", "n_batches", "batch_cells", "single_batch"])
    single = table.loc[table["single_batch"], "cluster"].tolist()
    record.update(cells_after_qc=[int(n) for n in counts.sum(axis=0)], clusters=table, single_batch_clusters=single)
    kept = zip(record["batches"], record["cells_before_qc"], record["cells_after_qc"], strict=True)
    lost = [f"{name} {after}/{before}" for name, before, after in kept if after * 2 < before]
    if lost:  # a failed lane or sample: the rest of the dataset hides it
        warn(adata, f"QC kept under half the cells of {record['input_key']} " + ", ".join(lost))
    if single:
        only = {c: table.set_index("cluster").loc[c, "batch_cells"].split(":")[0] for c in single}
        warn(adata, f"cluster(s) made of one {record['input_key']} only: "
                    + ", ".join(f"{c} ({b})" for c, b in only.items()))
    return table


def batch_result(record: dict) -> dict:
    """What ``{dataset}_result.json`` says of the batches (``{}`` without a batch key): ``batch_key``,
    ``batches`` (cells per batch after QC), ``single_batch_clusters``."""
    batches = record.get("batches")
    if not batches:
        return {}
    after = batches.get("cells_after_qc") or [None] * len(batches["batches"])
    return {"batch_key": batches["input_key"], "batches": dict(zip(batches["batches"], after, strict=True)),
            "single_batch_clusters": [str(c) for c in batches.get("single_batch_clusters", [])]}


def batch_summary_lines(record: dict) -> list[str]:
    """The lines of ``{dataset}_summary.txt`` on the batches: cells per batch before and after QC, each
    cluster's cells per batch, the clusters of one batch (none without a batch key)."""
    batches = record.get("batches")
    if not batches:
        return []
    after = batches.get("cells_after_qc") or [None] * len(batches["batches"])
    lines = ["", f"Batches ({batches['input_key']}; Harmony: {batches.get('harmony', {}).get('method', 'not run')})"]
    for name, before, kept in zip(batches["batches"], batches["cells_before_qc"], after, strict=True):
        lines.append(f"  {name}: {before} cells before QC, {'?' if kept is None else kept} after")
    table = batches.get("clusters")
    if isinstance(table, pd.DataFrame) and len(table):
        lines.append("  cells per batch in each cluster:")
        for row in table.itertuples():
            flag = "  [one batch only]" if row.single_batch else ""
            lines.append(f"    {row.cluster:>4}  {row.batch_cells}{flag}")
    return lines


def _version(name: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return "unknown"
