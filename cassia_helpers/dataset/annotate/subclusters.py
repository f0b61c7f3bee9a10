"""Subclusters: the cells called one type are re-clustered and annotated with that type as context."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd

from cassia_helpers.dataset.annotate import Annotator, ClusterAnnotation
from cassia_helpers.dataset.record import provenance, warn

MIN_CELLS = 20


def subcluster_cells(adata: ad.AnnData, mask: np.ndarray, *, resolution: float = 0.5, n_top_genes: int = 2000,
                     n_pcs: int = 30, n_neighbors: int = 15, method: str = "umap", seed: int = 0) -> ad.AnnData:
    """The masked cells, re-clustered on their own with the dataset's own steps: highly variable genes and
    PCA (:func:`~cassia_helpers.preprocess.reduce_dimensions`), exact kNN (``method`` gives the
    connectivities: ``"umap"`` as for the whole dataset, or ``"gauss"``) and leiden
    (:func:`~cassia_helpers.dataset.pp.cluster`); ``obs['subcluster']`` holds the new clusters."""
    import scanpy as sc

    from cassia_helpers.dataset.pp import cluster, reduce_dimensions

    sub = ad.AnnData(X=adata.X[np.flatnonzero(mask)], obs=pd.DataFrame(index=adata.obs_names[mask]),
                     var=pd.DataFrame(index=adata.var_names))
    reduce_dimensions(sub, n_top_genes=min(n_top_genes, sub.n_vars), n_pcs=n_pcs)
    sc.pp.neighbors(sub, n_neighbors=max(2, min(n_neighbors, sub.n_obs - 1)), use_rep="X_pca", method=method,
                    random_state=seed, transformer="sklearn")
    cluster(sub, resolution=resolution, seed=seed, key_added="subcluster")
    return sub


def annotate_subclusters(adata: ad.AnnData, parent: str, *, annotator: Annotator, tissue: str,
                         species: str = "human", context: str = "", key_added: str = "cell_type",
                         resolution: float = 0.5, n_top: int = 50, method: str = "umap",
                         seed: int = 0) -> list[ClusterAnnotation]:
    """Re-cluster the cells of ``obs[key_added] == parent``, rank markers within the parent and annotate
    the subclusters with the parent type as context.

    Writes ``obs[f"{key_added}_subcluster"]`` (the subcluster's call for the parent's cells, ``"{parent}"``
    when a subcluster stays Unknown; other cells keep their existing value, or their ``obs[key_added]``
    label when the column is new) and ``uns['cassia_batch']['subclusters'][parent]`` (per-subcluster
    table, under the parent's name with ``/`` replaced by ``_``). Subcluster ids are ``"{parent} / {n}"``
    (they name the subclusters in the ledger). Fewer than 20 cells, or a single subcluster, is recorded
    as a warning and nothing is annotated.
    """
    from cassia_helpers.dataset.markers import cluster_markers, rank_markers

    column = f"{key_added}_subcluster"
    mask = (adata.obs[key_added].astype(str) == parent).to_numpy()
    if column not in adata.obs:
        adata.obs[column] = adata.obs[key_added].astype(str)
    if not mask.any():  # most likely a typo: said on the terminal too, with the calls there are
        calls = ", ".join(sorted(map(str, pd.unique(adata.obs[key_added].astype(str)))))
        notice = f"--subcluster {parent!r}: no cluster is called that (the calls: {calls})"
        warn(adata, notice)
        provenance(adata).get("annotation", {}).setdefault("step_warnings", []).append(notice)
        return []
    if mask.sum() < MIN_CELLS:
        warn(adata, f"subclusters of {parent!r}: {int(mask.sum())} cells, fewer than {MIN_CELLS}; not re-clustered")
        return []
    sub = subcluster_cells(adata, mask, resolution=resolution, method=method, seed=seed)
    sub.obs["subcluster"] = pd.Categorical([f"{parent} / {c}" for c in sub.obs["subcluster"].astype(str)])
    if sub.obs["subcluster"].nunique() < 2:
        warn(adata, f"subclusters of {parent!r}: re-clustering found a single cluster; not annotated")
        return []
    table = rank_markers(sub, groupby="subcluster", seed=seed)
    markers = cluster_markers(sub, table, groupby="subcluster", n_top=n_top)
    parent_context = "; ".join(x for x in (context, f"all these cells were called {parent}: name the subtype "
                                           f"or state of {parent} within it") if x)
    results = annotator.annotate(markers, tissue=tissue, species=species, context=parent_context)
    calls = {r.cluster: (r.main_cell_type if r.status == "ok" else parent) for r in results}
    values = adata.obs[column].astype(str).to_numpy(copy=True)
    values[mask] = sub.obs["subcluster"].astype(str).map(calls).fillna(parent).to_numpy()
    adata.obs[column] = pd.Categorical(values)
    frame = pd.DataFrame([{"cluster": r.cluster, "main_cell_type": r.main_cell_type,
                           "sub_cell_types": "; ".join(r.sub_cell_types), "status": r.status, "reason": r.reason,
                           "score": np.nan if r.score is None else r.score,
                           "n_cells": int((sub.obs["subcluster"] == r.cluster).sum())} for r in results])
    frame.index = frame["cluster"].to_numpy()
    # an HDF5 group name cannot hold "/"
    provenance(adata).setdefault("subclusters", {})[parent.replace("/", "_")] = {
        "parent": parent, "n_cells": int(mask.sum()), "resolution": resolution, "clusters": frame,
    }
    return results


__all__ = ["annotate_subclusters", "subcluster_cells"]
