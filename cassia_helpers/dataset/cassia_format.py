"""CASSIA's and Seurat's file formats, as pure functions over our tables and results.

* the marker table in Seurat ``FindAllMarkers`` column names (what CASSIA's tools and Seurat users read);
* ``{dataset}_cassia.csv`` rows with CASSIA's summary columns plus ``Score``, ``Scoring_Reasoning`` and
  ``Merged_Grouping_1..3``;
* ``{dataset}_cassia_conversations.json``: per cluster the annotation attempts, validations, formatting and
  scoring turns, keyed by cluster id (the file CASSIA's scoring and boost look for next to the CSV);
* a compact ``uns['rank_genes_groups']`` in scanpy's layout, small enough for the HDF5 header limit.
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Iterable
from urllib.parse import urlsplit

import numpy as np
import pandas as pd

from cassia_helpers.dataset.annotate import ClusterAnnotation
from cassia_helpers.dataset.annotate.agents.prompts import ANSWER_FIELDS
from cassia_helpers.files import csv_safe

# The markers CSV layout: Seurat FindAllMarkers names; ``rank`` and ``score`` (the test statistic) kept from
# our own table. p-values, log2 fold changes and detection fractions (0-1) are those of the marker test.
SEURAT_MARKER_COLUMNS = ["cluster", "gene", "rank", "score", "avg_log2FC", "p_val", "p_val_adj", "pct.1",
                         "pct.2"]
_TO_SEURAT = {"logfoldchange": "avg_log2FC", "pval": "p_val", "pval_adj": "p_val_adj",
              "pct_in_cluster": "pct.1", "pct_out_cluster": "pct.2"}

CASSIA_SUMMARY_COLUMNS = [
    "Cluster ID", "Predicted General Cell Type", "Predicted Detailed Cell Type", "Possible Mixed Cell Types",
    "Marker Number", "Marker List", "Iterations", "Model", "Provider", "Tissue", "Species",
]
CASSIA_EXTRA_COLUMNS = ["Score", "Scoring_Reasoning", "Merged_Grouping_1", "Merged_Grouping_2",
                        "Merged_Grouping_3"]
CASSIA_COLUMNS = CASSIA_SUMMARY_COLUMNS + CASSIA_EXTRA_COLUMNS

# HDF5 keeps a compound dtype in a 64 KiB object header: each field (one per cluster) costs its padded
# name plus about 48 bytes, which is what limits scanpy's record arrays to roughly a thousand clusters.
HDF5_HEADER_BYTES = 60_000


def to_seurat_markers(table: pd.DataFrame) -> pd.DataFrame:
    """Our marker table (``cluster, rank, gene, score, logfoldchange, pval, pval_adj, pct_in_cluster,
    pct_out_cluster``) with Seurat ``FindAllMarkers`` column names, in :data:`SEURAT_MARKER_COLUMNS` order."""
    out = table.rename(columns=_TO_SEURAT)
    missing = [c for c in SEURAT_MARKER_COLUMNS if c not in out.columns]
    if missing:
        raise ValueError(f"marker table lacks {', '.join(missing)}")
    out = out[SEURAT_MARKER_COLUMNS].copy()
    out["cluster"] = out["cluster"].astype(str)
    return out


def from_seurat_markers(table: pd.DataFrame) -> pd.DataFrame:
    """The inverse of :func:`to_seurat_markers` (reads a markers CSV back into our column names)."""
    return table.rename(columns={v: k for k, v in _TO_SEURAT.items()})


def provider_label(base_url: str) -> str:
    """``scheme://host[:port]/path`` of an endpoint: no user, password, query or fragment."""
    parts = urlsplit(base_url or "")
    if not parts.scheme or not parts.hostname:
        return base_url.split("?", 1)[0] if "@" not in base_url else ""
    host = parts.hostname + (f":{parts.port}" if parts.port else "")
    return f"{parts.scheme}://{host}{parts.path.rstrip('/')}"


def _score_cell(value: float | None) -> str:
    return "" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.0f}"


def cassia_rows(results: Iterable[ClusterAnnotation], *, tissue: str, species: str, model: str,
                provider: str) -> list[dict]:
    """One CASSIA summary row per cluster (``provider``: the endpoint's base URL, or ``reference``)."""
    provider = provider_label(provider) if "://" in provider else provider
    rows = []
    for r in results:
        merged = (list(r.merged_groupings) + ["", "", ""])[:3]
        rows.append({
            "Cluster ID": r.cluster,
            "Predicted General Cell Type": r.main_cell_type,
            "Predicted Detailed Cell Type": ", ".join(r.sub_cell_types),
            "Possible Mixed Cell Types": ", ".join(r.mixed_cell_types),
            "Marker Number": len(r.markers_sent),
            "Marker List": ", ".join(r.markers_sent),
            "Iterations": r.iterations,
            "Model": model,
            "Provider": provider,
            "Tissue": tissue,
            "Species": species,
            "Score": _score_cell(r.score),
            "Scoring_Reasoning": r.score_reasoning,
            "Merged_Grouping_1": merged[0],
            "Merged_Grouping_2": merged[1],
            "Merged_Grouping_3": merged[2],
        })
    return rows


def cassia_csv(results: Iterable[ClusterAnnotation], *, tissue: str, species: str, model: str,
               provider: str) -> str:
    """``{dataset}_cassia.csv`` text: :data:`CASSIA_COLUMNS`, one row per cluster."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=CASSIA_COLUMNS)
    writer.writeheader()
    rows = cassia_rows(results, tissue=tissue, species=species, model=model, provider=provider)
    writer.writerows({k: csv_safe(v) for k, v in row.items()} for row in rows)
    return buffer.getvalue()


def conversations(results: Iterable[ClusterAnnotation]) -> dict[str, dict]:
    """``{dataset}_cassia_conversations.json`` content, keyed by cluster id.

    Each cluster has ``annotations`` (every annotator turn, boost turns included, oldest first),
    ``validations`` (validator turns; a call without annotator turns, the offline reference's, has its
    reasoning as its one annotation), ``formatting`` (the last formatter reply; the boost's structured
    answer when that answer was kept), ``scoring`` (the last scorer reply) and ``boost`` (the boost
    exchange: genes asked and values answered). When the boosted answer was kept, its concluding turn is
    also the last of ``annotations`` (CASSIA's boost reads the last one). When that answer replaced the first
    call, the validator never saw it: ``validations`` then holds one line saying so (CASSIA's report shows
    "review needed", not the first call's pass) and the validator's turns move to ``first_call_validations``.
    """
    out: dict[str, dict] = {}
    for r in results:
        entry: dict = {"annotations": [], "validations": [], "formatting": "", "scoring": "", "boost": []}
        for turn in r.transcript:
            agent, content = str(turn.get("agent", "")), str(turn.get("content", ""))
            if agent.startswith("annotator"):
                entry["annotations"].append(content)
            elif agent.startswith("validator"):
                entry["validations"].append(content)
            elif agent.startswith("formatter"):
                entry["formatting"] = content
            elif agent.startswith("scorer"):
                entry["scoring"] = content
            elif agent.startswith(("boost", "gene look-up")):
                entry["boost"].append({"agent": agent, "content": content})
                if r.kept_answer == "boosted" and agent.startswith("boost") and "FINAL ANNOTATION" in content.upper():
                    entry["annotations"].append(content)
        if not entry["annotations"] and r.reasoning:  # the offline reference: its reasoning is the analysis
            entry["annotations"].append(r.reasoning)
        if r.kept_answer == "boosted":  # the answer kept, not the formatter's reading of the first call
            entry["formatting"] = json.dumps({name: getattr(r, name) for name in ANSWER_FIELDS})
        if r.revised_from:
            entry["first_call_validations"] = entry["validations"]
            entry["validations"] = [f"NOT VALIDATED: the annotation boost replaced the first call "
                                    f"({r.revised_from}), the one the validator checked; this call was scored "
                                    "again, not validated."]
        out[str(r.cluster)] = entry
    return out


def rank_genes_groups_fits(groups: Iterable[str]) -> bool:
    """Whether a scanpy record array with one field per group fits the HDF5 object header."""
    return sum(8 * math.ceil((len(str(g).encode()) + 1) / 8) + 48 for g in groups) <= HDF5_HEADER_BYTES


def rank_genes_groups_uns(table: pd.DataFrame, *, groupby: str, method: str = "wilcoxon",
                          n_genes: int = 25) -> dict | None:
    """scanpy's ``uns['rank_genes_groups']`` from our marker table, top ``n_genes`` per cluster.

    Names are fixed-width strings and numbers float32; ``pts``/``pts_rest`` hold the detection fractions of
    the genes kept. ``None`` when the clusters are too many for the HDF5 header (see :data:`HDF5_HEADER_BYTES`).
    """
    groups = list(dict.fromkeys(table["cluster"].astype(str)))
    if not groups or not rank_genes_groups_fits(groups):
        return None
    top = table.assign(cluster=table["cluster"].astype(str)).sort_values(["cluster", "rank"], kind="stable")
    top = top.groupby("cluster", sort=False).head(n_genes)
    rows = int(top.groupby("cluster").size().max())
    width = max(1, int(top["gene"].astype(str).str.len().max()))
    fields = {"names": ("gene", f"<U{width}", ""), "scores": ("score", "<f4", np.nan),
              "logfoldchanges": ("logfoldchange", "<f4", np.nan), "pvals": ("pval", "<f4", np.nan),
              "pvals_adj": ("pval_adj", "<f4", np.nan)}
    out: dict = {"params": {"groupby": groupby, "reference": "rest", "method": method, "use_raw": False,
                            "layer": None, "corr_method": "benjamini-hochberg"}}
    by_group = {g: part for g, part in top.groupby("cluster", sort=False)}
    for key, (column, dtype, fill) in fields.items():
        array = np.full(rows, fill, dtype=[(g, dtype) for g in groups])
        for g in groups:
            values = by_group[g][column].to_numpy() if g in by_group else []
            array[g][:len(values)] = values
        out[key] = array
    genes = list(dict.fromkeys(top["gene"].astype(str)))
    for key, column in (("pts", "pct_in_cluster"), ("pts_rest", "pct_out_cluster")):
        wide = top.pivot_table(index="gene", columns="cluster", values=column, aggfunc="first", observed=True)
        out[key] = wide.reindex(index=genes, columns=groups).astype("float32").fillna(0.0)
    return out


__all__ = [
    "CASSIA_COLUMNS", "SEURAT_MARKER_COLUMNS", "cassia_csv", "cassia_rows", "conversations",
    "from_seurat_markers", "provider_label", "rank_genes_groups_fits", "rank_genes_groups_uns",
    "to_seurat_markers",
]
