"""The per-cluster table of one dataset, ``{dataset}_clusters.csv``: what the run report shows per cluster.

One row per cluster: its label (``"3: NK cell"``), cell type, size, the annotator's confidence and flags,
key markers, the first markers the annotator was given, the agents' reasoning and the cell type's colour. Built from
``uns['cassia_batch']['annotation']`` (written by :func:`cassia_helpers.annotate_clusters`), so the report
never has to open the h5ad.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from cassia_helpers.contract import DatasetPaths
from cassia_helpers.dataset.record import KEY as PROVENANCE_KEY
from cassia_helpers.files import write_csv
from cassia_helpers.palette import run_palette

#: Columns always present, in this order; any other column of the annotation table (e.g. ``score``,
#: ``evidence``) follows them.
COLUMNS = [
    "cluster", "label", "cell_type", "n_cells", "pct_cells", "confidence", "status", "reason",
    "sub_cell_types", "mixed_cell_types", "key_markers", "top_markers", "reasoning", "color",
]


def cluster_label(cluster: str, cell_type: str) -> str:
    """``"3: NK cell"``."""
    return f"{cluster}: {cell_type}"


def cluster_table(
    adata,
    *,
    markers: pd.DataFrame | None = None,
    groupby: str = "leiden",
    key: str = "cell_type",
    n_markers: int = 5,
) -> pd.DataFrame:
    """One row per cluster of ``obs[groupby]``, in cluster order.

    Parameters
    ----------
    adata
        Annotated data: reads ``obs[groupby]``, ``obs[key]``, ``uns[f'{key}_colors']`` when set, and
        ``uns['cassia_batch']['annotation']`` (``clusters`` table and ``results_json``) when present.
    markers
        The ranked marker table of :func:`cassia_helpers.rank_markers` (``cluster, rank, gene, ...``):
        ``top_markers`` holds the first ``n_markers`` genes the annotator was given (its filtered list, in
        the order sent), or of this table for a cluster sent none.

    Returns
    -------
    A DataFrame with :data:`COLUMNS` (plus any extra column of the annotation table).
    """
    clusters = adata.obs[groupby].astype(str)
    cell_types = adata.obs[key].astype(str) if key in adata.obs else pd.Series("Unknown", index=adata.obs_names)
    order = list(adata.obs[groupby].cat.categories) if hasattr(adata.obs[groupby], "cat") else sorted(set(clusters))
    sizes = clusters.value_counts()
    first_type = cell_types.groupby(clusters.to_numpy()).agg(lambda s: s.value_counts().index[0])
    annotation = adata.uns.get(PROVENANCE_KEY, {}).get("annotation", {})
    table = annotation.get("clusters")
    table = table.set_index(table["cluster"].astype(str)) if isinstance(table, pd.DataFrame) and len(table) else None
    results = {}
    try:
        results = {str(r["cluster"]): r for r in json.loads(annotation.get("results_json") or "[]")}
    except (TypeError, ValueError):
        pass
    top = {}
    if markers is not None and len(markers):
        ranked = markers.sort_values(["cluster", "rank"]) if "rank" in markers else markers
        top = {str(c): ", ".join(rows["gene"].astype(str).head(n_markers)) for c, rows in ranked.groupby("cluster")}
    colors = _colors(adata, key)
    rows = []
    for cluster in map(str, order):
        if cluster not in sizes.index:
            continue
        cell_type = str(first_type.get(cluster, "Unknown"))
        row = table.loc[cluster].to_dict() if table is not None and cluster in table.index else {}
        result = results.get(cluster, {})
        rows.append({
            **{k: v for k, v in row.items() if k not in ("main_cell_type",)},
            "cluster": cluster,
            "label": cluster_label(cluster, cell_type),
            "cell_type": cell_type,
            "n_cells": int(sizes[cluster]),
            "pct_cells": round(100.0 * sizes[cluster] / max(adata.n_obs, 1), 2),
            "confidence": row.get("confidence", result.get("confidence")),
            "status": row.get("status", result.get("status", "")),
            "reason": row.get("reason", result.get("reason", "")),
            "sub_cell_types": row.get("sub_cell_types", "; ".join(result.get("sub_cell_types", []))),
            "mixed_cell_types": row.get("mixed_cell_types", "; ".join(result.get("mixed_cell_types", []))),
            "key_markers": row.get("key_markers", ", ".join(result.get("key_markers", []))),
            "top_markers": ", ".join(result.get("markers_sent", [])[:n_markers]) or top.get(cluster, ""),
            "reasoning": str(result.get("reasoning", "")),
            "color": colors.get(cell_type, ""),
        })
    frame = pd.DataFrame(rows)
    checks = call_checks(adata)
    if len(checks):
        frame = frame.drop(columns=[c for c in checks.columns if c in frame.columns and c != "cluster"])
        frame = frame.merge(checks, on="cluster", how="left")
    extra = [c for c in frame.columns if c not in COLUMNS and c != "iterations"]
    return frame.reindex(columns=COLUMNS + extra)


# per-cluster columns of the checks on the calls: (uns record key, its column, the column written)
CHECK_COLUMNS = (
    ("pipeline", "score", "score"), ("pipeline", "disputed", "disputed"), ("pipeline", "agreement", "agreement"),
    ("pipeline", "broad", "broad"), ("pipeline", "detailed", "detailed"), ("pipeline", "fine", "fine"),
    ("ontology", "term_id", "cell_type_ontology_term_id"), ("ontology", "term_name", "cell_type_ontology_term"),
    ("ontology", "lineage_name", "cell_type_lineage"), ("ontology", "method", "ontology_match"),
    ("marker_evidence", "evidence_score", "evidence_score"), ("marker_evidence", "flag", "evidence_flag"),
    ("marker_evidence", "flag_reason", "evidence_flag_reason"), ("marker_evidence", "flag_kind", "evidence_flag_kind"),
    ("self_score", "author_label", "author_label"), ("self_score", "author_label_fraction", "author_label_fraction"),
    ("self_score", "author_term_id", "author_term_id"), ("self_score", "self_score", "self_score"),
    ("self_score", "self_score_distance", "self_score_distance"),
    ("batches", "n_batches", "n_batches"), ("batches", "batch_cells", "batch_cells"),
    ("batches", "single_batch", "single_batch"),
)


def call_checks(adata) -> pd.DataFrame:
    """One row per cluster with what the pipeline, the ontology mapping and the marker evidence recorded
    (``uns['cassia_batch']['pipeline' | 'ontology' | 'marker_evidence']['clusters']``), where present."""
    record = adata.uns.get(PROVENANCE_KEY, {})
    merged: pd.DataFrame | None = None
    for key in dict.fromkeys(k for k, _, _ in CHECK_COLUMNS):
        table = record.get(key, {}).get("clusters") if isinstance(record.get(key), dict) else None
        if not isinstance(table, pd.DataFrame) or table.empty or "cluster" not in table:
            continue
        wanted = {column: name for k, column, name in CHECK_COLUMNS if k == key and column in table}
        part = table[["cluster", *wanted]].rename(columns=wanted).assign(cluster=lambda t: t["cluster"].astype(str))
        merged = part if merged is None else merged.merge(part, on="cluster", how="outer")
    return merged if merged is not None else pd.DataFrame()


def _colors(adata, key: str) -> dict[str, str]:
    """The colour of each label: ``uns[f'{key}_colors']`` when it matches the categories, else the run palette."""
    column = adata.obs[key] if key in adata.obs else None
    if column is None:
        return {}
    categories = list(column.cat.categories) if hasattr(column, "cat") else sorted(set(column.astype(str)))
    stored = adata.uns.get(f"{key}_colors")
    if stored is not None and len(stored) == len(categories):
        return {str(c): str(v) for c, v in zip(categories, stored, strict=True)}
    return run_palette(map(str, categories))


def write_cluster_table(adata, paths: DatasetPaths, *, markers: pd.DataFrame | None = None,
                        groupby: str = "leiden", key: str = "cell_type") -> Path:
    """Write ``{dataset}_clusters.csv`` (see :func:`cluster_table`) and return its path."""
    path = paths.clusters_csv
    write_csv(path, cluster_table(adata, markers=markers, groupby=groupby, key=key))
    return path
