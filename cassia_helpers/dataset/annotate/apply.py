"""Run an annotator over a dataset's clusters and write the calls into ``adata``."""

from __future__ import annotations

import json
import time
from dataclasses import asdict, is_dataclass

import anndata as ad
import pandas as pd

from cassia_helpers.dataset.annotate import UNKNOWN, Annotator, ClusterAnnotation, ClusterMarkers, annotation_failure
from cassia_helpers.dataset.annotate.columns import write_pipeline_columns
from cassia_helpers.dataset.record import cluster_key, provenance, warn
from cassia_helpers.dataset.steps import timed

# ``validation`` column of the cluster table: the LLM validator's outcome for a call
VALIDATION_LABELS = {True: "confirmed", False: "not confirmed", None: ""}
BOOST_REVISION = "replaced by the boost"  # the validation of a call the boost replaced (it was re-scored)


@timed("annotation")
def annotate_clusters(
    adata: ad.AnnData,
    clusters: list[ClusterMarkers],
    *,
    annotator: Annotator,
    tissue: str,
    species: str = "human",
    context: str = "",
    groupby: str | None = None,
    key_added: str = "cell_type",
) -> list[ClusterAnnotation]:
    """Annotate every cluster and label every cell.

    Writes ``obs[key_added]`` (categorical main cell type; ``"Unknown"`` is a label),
    ``obs[f"{key_added}_sub"]`` (best sub type or empty), ``obs[f"{key_added}_mixed"]`` (possible
    mixed types, ``"; "``-joined), ``obs[f"{key_added}_confidence"]`` (0–100), and
    ``uns['cassia_batch']['annotation']`` with the per-cluster table (``clusters``), the full results
    as JSON (``results_json``), the annotator's provenance (``provenance``) and ``failure``: a one-line
    reason when most clusters got no answer because of the model service (empty otherwise), which makes
    the dataset ``failed``, and ``step_warnings``: the annotator's one-line notices (steps that failed for
    most clusters, clusters no longer sent), also added to ``uns['cassia_batch']['warnings']``. The table's
    ``validation`` column says whether the LLM validator confirmed each call (``confirmed``, ``not
    confirmed``, empty when no validator ran). The pipeline's columns (quality score, consensus, merged
    groupings) are written by :func:`~cassia_helpers.dataset.annotate.columns.write_pipeline_columns`.
    """
    start = time.perf_counter()
    groupby = groupby or cluster_key(adata)
    expression = {"adata": adata, "groupby": groupby} if getattr(annotator, "reads_expression", False) else {}
    results = annotator.annotate(clusters, tissue=tissue, species=species, context=context, **expression)
    # e.g. an LLM response cache that could not be written (a pipeline's first annotator holds the client)
    for message in dict.fromkeys(getattr(getattr(annotator, "annotator", annotator), "warnings", ())):
        warn(adata, message)
    by_cluster = {r.cluster: r for r in results}
    for markers in clusters:
        if markers.cluster not in by_cluster:
            by_cluster[markers.cluster] = ClusterAnnotation.unknown(
                markers.cluster, "annotator returned no answer", markers.genes, kind="error"
            )
    groupby = groupby or cluster_key(adata)
    labels = adata.obs[groupby].astype(str)
    # A cluster with no markers at all (never sent) is still labelled.
    for cluster in labels.unique():
        by_cluster.setdefault(cluster, ClusterAnnotation.unknown(cluster, "no marker genes", kind="no_markers"))

    def column(getter):
        return labels.map({c: getter(r) for c, r in by_cluster.items()})

    main = column(lambda r: r.main_cell_type or UNKNOWN)
    adata.obs[key_added] = pd.Categorical(main)
    adata.obs[f"{key_added}_sub"] = pd.Categorical(column(lambda r: r.sub_cell_types[0] if r.sub_cell_types else ""))
    adata.obs[f"{key_added}_mixed"] = pd.Categorical(column(lambda r: "; ".join(r.mixed_cell_types)))
    adata.obs[f"{key_added}_confidence"] = column(lambda r: float(r.confidence)).astype("float32")

    ordered = [by_cluster[c.cluster] for c in clusters] + [
        r for c, r in by_cluster.items() if c not in {m.cluster for m in clusters}
    ]
    table = pd.DataFrame([
        {
            "cluster": r.cluster,
            "main_cell_type": r.main_cell_type,
            "sub_cell_types": "; ".join(r.sub_cell_types),
            "mixed_cell_types": "; ".join(r.mixed_cell_types),
            "confidence": float(r.confidence),
            "key_markers": ", ".join(r.key_markers),
            "status": r.status,
            "reason": r.reason,
            "reason_kind": r.reason_kind,
            "iterations": int(r.iterations),
            # the validator saw the first call only: a boosted answer that replaced it was re-scored instead
            "validation": BOOST_REVISION if r.revised_from else VALIDATION_LABELS.get(r.validated, ""),
            "revised_from": r.revised_from,
            "n_cells": int((labels == r.cluster).sum()),
        }
        for r in ordered
    ])
    table.index = table["cluster"].astype(str).to_numpy()
    description = {k: ("" if v is None else v) for k, v in annotator.describe().items()}
    notices = [str(n) for n in getattr(annotator, "notices", [])]
    for notice in notices:
        warn(adata, notice)
    provenance(adata)["annotation"] = {
        "key_added": key_added,
        "tissue": tissue,
        "species": species,
        "context": context,
        "clusters": table,
        "results_json": json.dumps([r.to_dict() for r in ordered], ensure_ascii=False),
        "provenance": {k: json.dumps(v) if isinstance(v, dict | list) else v for k, v in description.items()},
        "seconds": round(time.perf_counter() - start, 3),
        "failure": annotation_failure(ordered) or "",
        "step_warnings": notices,
    }
    settings = getattr(annotator, "settings", None)
    write_pipeline_columns(adata, ordered, groupby=groupby, key_added=key_added,
                           settings=asdict(settings) if is_dataclass(settings) else None)
    return ordered
