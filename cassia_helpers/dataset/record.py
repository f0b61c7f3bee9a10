"""The ``uns['cassia_batch']`` record: the one owner of its keys.

Every helper of the pipeline writes what it did under one key of this record (``input``, ``qc``,
``normalize``, ``pca``, ``neighbors``, ``leiden``, ``umap``, ``markers``, ``marker_filter``,
``annotation``), plus ``warnings`` (a list of one-line messages for the summary) and ``timings``
(seconds per step, written by :func:`cassia_helpers.dataset.steps.timed`).
"""

from __future__ import annotations

from typing import Any

KEY = "cassia_batch"
WARNINGS, TIMINGS = "warnings", "timings"


def provenance(adata: Any) -> dict:
    """The ``uns['cassia_batch']`` record of ``adata`` (created on first use)."""
    record = adata.uns.setdefault(KEY, {})
    record.setdefault(WARNINGS, [])
    record.setdefault(TIMINGS, {})
    return record


def warn(adata: Any, message: str) -> None:
    """Record a warning for the dataset's summary (``uns['cassia_batch']['warnings']``)."""
    record = provenance(adata)
    record[WARNINGS] = [*record[WARNINGS], message]


def cluster_key(adata: Any, default: str = "leiden") -> str:
    """The ``obs`` column holding the clusters (``key_added`` of :func:`cassia_helpers.dataset.pp.cluster`)."""
    return provenance(adata).get("leiden", {}).get("key", default)


def label_key(adata: Any, default: str = "cell_type") -> str:
    """The ``obs`` column holding the cell-type calls (``key_added`` of ``annotate_clusters``)."""
    return provenance(adata).get("annotation", {}).get("key_added", default)
