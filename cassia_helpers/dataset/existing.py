"""The input's own clustering and embedding, kept instead of computed (``cluster_key``).

A lab often has a clustering it has published figures with. With ``cluster_key`` the run annotates those
clusters: they are copied into ``obs['leiden']`` (the column every output and summary reads, so the output
contract holds unchanged) and ``uns['cassia_batch']['leiden']`` records where they came from
(``source: "input"``, ``input_key``). The input's column itself stays as it was (under ``author_`` when the
run writes the same name, e.g. an input's own ``leiden``).

QC still runs (a cell that fails the thresholds is as unreliable in an author's cluster as in ours), but
never silently: the cells it removed from each cluster are recorded in ``uns['cassia_batch']['leiden']``
and named in the dataset's warnings. The input's UMAP is reused when it has one.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from cassia_helpers.dataset.author import AUTHOR_PREFIX, written_by_run
from cassia_helpers.dataset.read import InputError
from cassia_helpers.dataset.record import provenance, warn
from cassia_helpers.inputs import missing_column

if TYPE_CHECKING:
    from anndata import AnnData

UNASSIGNED = "unassigned"  # the cluster of cells the input's column leaves empty


def input_column(adata: AnnData, key: str, *, what: str) -> str:
    """The ``obs`` column holding the input's own ``key``: the column :func:`~cassia_helpers.dataset.read.read_dataset`
    renamed (``cell_type`` -> ``author_cell_type``: ``obs['cell_type']`` is then the run's), else ``key``
    itself; :class:`InputError` naming the file and the input's columns when it has none."""
    record = provenance(adata).get("input", {})
    renamed = record.get("renamed", {}).get("obs", {})
    if key in renamed:
        return renamed[key]
    if key in adata.obs.columns:
        return key
    if not record and AUTHOR_PREFIX + key in adata.obs.columns:  # not read by read_dataset: no record of renames
        return AUTHOR_PREFIX + key
    original = {new: old for old, new in renamed.items()}
    columns = [original.get(c, c) for c in map(str, adata.obs.columns) if c in original or not written_by_run("obs", c)]
    raise InputError(f"{record.get('file', 'input')}: {missing_column(what, key, columns)}")


def kept_as(adata: AnnData, slot: str, name: str) -> str:
    """The name under which the input's own ``slot`` entry ``name`` is kept (``X_umap`` -> ``author_X_umap``,
    or a longer name when the input had that one too), ``""`` when the input had none."""
    record = provenance(adata).get("input", {})
    if record:
        return record.get("renamed", {}).get(slot, {}).get(name, "")
    kept = AUTHOR_PREFIX + name  # not read by read_dataset: no record of renames
    return kept if kept in (adata.obs.columns if slot == "obs" else getattr(adata, slot).keys()) else ""


def keep_clusters(adata: AnnData, *, cluster_key: str = "") -> None:
    """Copy the input's clusters ``obs[cluster_key]`` into ``obs['leiden']`` (before QC); nothing without a key.

    Cluster names keep the input's order (its categories, else numbers in numeric order and names sorted;
    ``3.0`` is ``"3"``); cells without a cluster form the cluster ``unassigned`` (``unassigned_`` when the
    input names a cluster so), with a warning. Writes ``obs['leiden']`` and ``uns['cassia_batch']['leiden']``
    (``source``, ``input_key``, ``key``, ``clusters``, ``cells_before_qc``).
    """
    if not cluster_key:
        return
    column = input_column(adata, cluster_key, what="cluster_key")
    values = adata.obs[column]
    if isinstance(values.dtype, pd.CategoricalDtype):
        order = [_cluster_name(c) for c in values.cat.categories]
    else:  # numbers in numeric order (2 before 10), names in text order
        present = values.dropna().unique()
        order = [_cluster_name(v) for v in (sorted(present) if pd.api.types.is_numeric_dtype(values)
                                            else sorted(present, key=str))]
    empty = UNASSIGNED
    while empty in order:  # a cluster the lab itself named "unassigned" stays its own
        empty = f"{empty}_"
    labels = values.astype(object).map(lambda v: empty if pd.isna(v) else _cluster_name(v))
    missing = int((labels == empty).sum())
    if missing:
        order.append(empty)
        warn(adata, f"{missing} cells have no cluster in obs['{column}']: they are annotated together as "
                    f"cluster '{empty}'")
    order = list(dict.fromkeys(c for c in order if (labels == c).any()))
    adata.obs["leiden"] = pd.Categorical(labels.to_numpy(), categories=order)
    counts = adata.obs["leiden"].value_counts().reindex(order)
    provenance(adata)["leiden"] = {"source": "input", "input_key": column, "key": "leiden", "n_clusters": len(order),
                                   "clusters": order, "cells_before_qc": [int(n) for n in counts]}


def _cluster_name(value) -> str:
    """A cluster id as text: a whole number without its ``.0`` (``3.0`` -> ``"3"``)."""
    if isinstance(value, float | np.floating) and float(value).is_integer():
        return str(int(value))
    return str(value)


def cluster_or_keep(adata: AnnData, *, cluster_key: str = "", resolution: float = 1.0, seed: int = 0) -> None:
    """Leiden clustering (:func:`cassia_helpers.dataset.pp.cluster`), or, with ``cluster_key``, the input's
    clusters kept by :func:`keep_clusters`, with the cells QC removed from each recorded.

    Writes ``obs['leiden']``; with ``cluster_key`` also ``uns['cassia_batch']['leiden']['removed_by_qc']``
    (cells removed per cluster, in the order of ``clusters``) and a warning when QC removed cells.
    """
    if not cluster_key:
        from cassia_helpers.dataset.pp import cluster

        cluster(adata, resolution=resolution, seed=seed)
        return
    record = provenance(adata)["leiden"]
    after = adata.obs["leiden"].value_counts().reindex(record["clusters"], fill_value=0)
    removed = [int(b - a) for b, a in zip(record["cells_before_qc"], after, strict=True)]
    record["removed_by_qc"] = removed
    adata.obs["leiden"] = adata.obs["leiden"].cat.remove_unused_categories()
    record["n_clusters"] = int(len(adata.obs["leiden"].cat.categories))
    if any(removed):
        parts = [f"{name} {n}/{before}" for name, n, before in zip(record["clusters"], removed,
                                                                    record["cells_before_qc"], strict=True) if n]
        warn(adata, f"QC removed {sum(removed)} cell(s) from the input's clusters ({record['input_key']}): "
                    + ", ".join(parts))
    emptied = [name for name, n in zip(record["clusters"], after, strict=True) if n == 0]
    if emptied:
        warn(adata, f"QC removed every cell of the input's cluster(s) {', '.join(emptied)}: not annotated")


def umap_or_keep(adata: AnnData, *, cluster_key: str = "", seed: int = 0) -> None:
    """UMAP (:func:`cassia_helpers.dataset.pp.umap`), or, for a dataset on its own clusters whose input has
    a UMAP (``X_umap``, kept as ``author_X_umap`` when read), that embedding. Writes ``obsm['X_umap']``
    and ``uns['cassia_batch']['umap']``."""
    kept = kept_as(adata, "obsm", "X_umap") if cluster_key else ""
    embedding = adata.obsm.get(kept) if kept else None
    if embedding is not None and np.ndim(embedding) == 2 and np.shape(embedding)[1] >= 2:
        values = np.asarray(embedding, dtype=np.float32)[:, :2]
        if np.isfinite(values).all():
            adata.obsm["X_umap"] = values
            provenance(adata)["umap"] = {"source": "input", "input_key": kept}
            return
    from cassia_helpers.dataset.pp import umap

    umap(adata, seed=seed)
