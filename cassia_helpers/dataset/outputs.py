"""Write one dataset's outputs: the files of the contract plus the records the driver aggregates.

Every file is written atomically; ``{dataset}_result.json`` is written last, so its presence means the
notebook finished all of its outputs.
"""

from __future__ import annotations

import platform
from datetime import UTC, datetime
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import anndata as ad
import pandas as pd

from cassia_helpers.contract import DatasetPaths
from cassia_helpers.dataset.annotate import REFERENCE_NOTE, ClusterAnnotation, ClusterMarkers
from cassia_helpers.dataset.annotate.columns import pipeline_text_lines
from cassia_helpers.dataset.batches import batch_result, batch_summary_lines
from cassia_helpers.dataset.counts import write_counts_layer
from cassia_helpers.dataset.evidence import summary_lines as evidence_summary_lines
from cassia_helpers.dataset.record import cluster_key, label_key, provenance
from cassia_helpers.dataset.split_mixed import split_summary_lines
from cassia_helpers.dataset.steps import phase_times
from cassia_helpers.files import atomic_path, write_csv, write_json, write_text
from cassia_helpers.settings import Settings

# genes per cluster in {dataset}_markers.csv
MARKERS_CSV_TOP = 100
PACKAGES = ("cassia-batch", "scanpy", "anndata", "numpy", "scipy", "pandas", "leidenalg", "igraph", "openai")


def package_versions() -> dict[str, str]:
    """Versions of the packages that shape the results (recorded in ``uns`` and the summary)."""
    found = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = "not installed"
    return found


def write_markers(markers: pd.DataFrame, paths: DatasetPaths, *, sent: list[ClusterMarkers] | None = None,
                  n_genes: int = MARKERS_CSV_TOP) -> Path:
    """``{dataset}_markers.csv``: the top ``n_genes`` of every cluster and every gene ``sent`` for it to the
    annotator (:func:`cassia_helpers.dataset.markers.top_markers`), one row per cluster × gene in the order
    of the test's ranks, with Seurat ``FindAllMarkers`` column names (``cluster, gene, rank, score,
    avg_log2FC, p_val, p_val_adj, pct.1, pct.2``) so that CASSIA's and Seurat users' tools read it as it is."""
    from cassia_helpers.dataset.cassia_format import to_seurat_markers
    from cassia_helpers.dataset.markers import top_markers

    write_csv(paths.markers_csv, to_seurat_markers(top_markers(markers, n_genes, sent=sent)))
    return paths.markers_csv


def write_annotated(adata: ad.AnnData, paths: DatasetPaths) -> Path:
    """``{dataset}_annotated.h5ad`` (gzip-free for speed; ``obs``, ``obsm``, ``layers`` and ``uns`` kept).

    When ``X`` was normalised from counts, the counts are rebuilt from it and streamed into
    ``layers['counts']`` of the file (:func:`cassia_helpers.dataset.counts.write_counts_layer`).
    """
    provenance(adata)["versions"] = package_versions()
    with atomic_path(paths.annotated_h5ad) as tmp:
        adata.write_h5ad(tmp)
        write_counts_layer(adata, tmp)
    return paths.annotated_h5ad


def check_lines(checks: pd.DataFrame) -> dict[str, str]:
    """Per cluster, one line on its Cell Ontology term and its marker evidence (from :func:`call_checks`)."""
    lines = {}
    for row in checks.to_dict("records") if len(checks) else []:
        parts = []
        term = row.get("cell_type_ontology_term_id")
        if term and term != "unknown":
            parts.append(f"CL: {row.get('cell_type_ontology_term')} ({term}, {row.get('ontology_match')}); "
                         f"lineage {row.get('cell_type_lineage')}")
        elif term:
            parts.append("CL: no matching Cell Ontology term")
        if pd.notna(row.get("evidence_score")):
            parts.append(f"marker evidence {float(row['evidence_score']):.2f}")
        if row.get("evidence_flag") is True:
            parts.append(f"FLAG: {row.get('evidence_flag_reason')}")
        lines[str(row["cluster"])] = "; ".join(parts)
    return lines


def _key_markers(result: ClusterAnnotation, *, mark_unsent: bool) -> str:
    """The call's key markers; with ``mark_unsent`` (a model's call), each one the model named without having
    been sent it is marked: a reader checking the call against the data should know which came from the model
    alone."""
    sent = {gene.upper() for gene in result.markers_sent}
    return ", ".join(gene if not mark_unsent or gene.upper() in sent else f"{gene} (not sent)"
                     for gene in result.key_markers)


def annotation_text(results: list[ClusterAnnotation], *, dataset: str, tissue: str, species: str,
                    annotator: dict, checks: dict[str, str] | None = None) -> str:
    """The readable CASSIA-style text: per cluster the markers sent, each agent's turn and the call."""
    lines = [
        f"CASSIA-style annotation of {dataset}",
        f"Tissue: {tissue}    Species: {species}",
        f"Annotator: {annotator.get('annotator', '?')}"
        + (f"    Model: {annotator['model']}" if annotator.get("model") else ""),
    ]
    if annotator.get("annotator") == "reference":
        lines.append(REFERENCE_NOTE)
    lines.append("")
    for r in results:
        lines += [
            "=" * 78,
            f"Cluster {r.cluster}: {r.main_cell_type}"
            + (f"  (confidence {r.confidence:.0f}/100)" if r.status == "ok" else f"  [{r.reason}]"),
            "=" * 78,
            f"Markers sent ({len(r.markers_sent)}): {', '.join(r.markers_sent) or '-'}",
        ]
        for turn in r.transcript:
            lines += ["", f"--- {turn.get('agent', 'turn')} ---", str(turn.get("content", "")).rstrip()]
        lines += [
            "",
            "Final answer:",
            f"  main cell type:   {r.main_cell_type}",
            f"  sub cell types:   {', '.join(r.sub_cell_types) or '-'}",
            f"  mixed cell types: {', '.join(r.mixed_cell_types) or '-'}",
            f"  confidence:       {r.confidence:.0f}",
            f"  key markers:      {_key_markers(r, mark_unsent=annotator.get('annotator') == 'llm') or '-'}",
            f"  reasoning:        {r.reasoning}",
        ]
        lines += pipeline_text_lines(r)
        if r.status == "ok" and (checks or {}).get(str(r.cluster)):
            lines.append(f"  checks:           {checks[str(r.cluster)]}")
        if r.status != "ok":
            lines.append(f"  status:           Unknown ({r.reason})")
        if r.iterations or r.input_tokens or r.output_tokens:
            lines.append(f"  iterations: {r.iterations}    tokens: {r.input_tokens} in, {r.output_tokens} out")
        lines.append("")
    return "\n".join(lines)


def write_annotation(adata: ad.AnnData, results: list[ClusterAnnotation], paths: DatasetPaths, *, tissue: str,
                     species: str, annotator: dict) -> Path:
    """``{dataset}_annotation.txt``, and for CASSIA's own tools ``{dataset}_cassia.csv`` (CASSIA's batch
    columns with ``Score`` and ``Merged_Grouping_1..3``) and ``{dataset}_cassia_conversations.json``."""
    from cassia_helpers.dataset.cluster_table import call_checks

    write_text(paths.annotation_txt, annotation_text(results, dataset=paths.dataset, tissue=tissue, species=species,
                                                     annotator=annotator, checks=check_lines(call_checks(adata))))
    from cassia_helpers.dataset.cassia_format import cassia_csv, conversations

    write_text(paths.cassia_csv, cassia_csv(results, tissue=tissue, species=species,
                                            model=annotator.get("model") or "reference",
                                            provider=annotator.get("endpoint_host") or "reference"))
    write_json(paths.cassia_conversations_json, conversations(results))
    return paths.annotation_txt


def dataset_summary_text(adata: ad.AnnData, paths: DatasetPaths, settings: Settings) -> str:
    """``{dataset}_summary.txt``: parameters, counts before/after QC, timings, warnings."""
    record = provenance(adata)
    qc = record.get("qc", {})
    timings = record.get("timings", {})
    annotation = record.get("annotation", {})
    described = annotation.get("provenance", {})
    preprocessing = phase_times(timings)["preprocessing"]
    lines = [
        f"Dataset: {paths.dataset}",
        f"Tissue: {paths.tissue}",
        f"Input: {record.get('input', {}).get('file', '')}",
        f"Written: {datetime.now(UTC).isoformat(timespec='seconds')}",
        "",
        "Input",
        f"  gene symbols from: {record.get('input', {}).get('symbol_source', '')}",
        f"  raw counts found:  {record.get('input', {}).get('is_counts')} "
        f"({record.get('input', {}).get('counts_source', '')})",
        f"  normalisation:     {record.get('normalize', {}).get('method', '')}",
        "",
        "Cells and genes",
        f"  before QC: {qc.get('cells_before', '?')} cells x {qc.get('genes_before', '?')} genes",
        f"  after QC:  {qc.get('cells_after', '?')} cells x {qc.get('genes_after', '?')} genes",
        f"  clusters:  {record.get('leiden', {}).get('n_clusters', '?')}",
        *split_summary_lines(record),
        "",
        "Annotation",
        f"  annotator: {described.get('annotator', '?')}",
    ]
    if described.get("annotator") == "reference":
        lines.append(f"  {REFERENCE_NOTE}")
    else:
        for key in ("model", "provider", "endpoint_host", "prompt_version"):
            if described.get(key):
                lines.append(f"  {key}: {described[key]}")
    table = annotation.get("clusters")
    if isinstance(table, pd.DataFrame) and len(table):
        unknown = int((table["status"] != "ok").sum())
        lines.append(f"  clusters labelled: {len(table) - unknown}, Unknown: {unknown}")
        if "validation" in table and (table["validation"] != "").any():
            lines.append(f"  not confirmed by the validator: {_unconfirmed(table)} of {len(table)} clusters")
        for _, row in table.iterrows():
            reason = f" [{row['reason']}]" if row["status"] != "ok" else ""
            lines.append(f"    {row['cluster']:>4}  {row['n_cells']:>7} cells  {row['main_cell_type']}{reason}")
    lines += evidence_summary_lines(record)
    lines += batch_summary_lines(record)
    lines += ["", "Timings (seconds)"]
    lines += [f"  {step:<19} {seconds:9.2f}" for step, seconds in timings.items()]
    lines += [f"  {'preprocessing total':<19} {preprocessing:9.2f}"]
    warnings = list(record.get("warnings", []))
    lines += ["", f"Warnings ({len(warnings)})"] + [f"  - {w}" for w in warnings]
    lines += ["", "Settings"] + [f"  {k} = {v!r}" for k, v in settings.values().items()]
    lines += ["", "Versions"] + [f"  {k} {v}" for k, v in package_versions().items()]
    return "\n".join(lines) + "\n"


def write_summary(adata: ad.AnnData, paths: DatasetPaths, settings: Settings) -> Path:
    """``{dataset}_summary.txt``."""
    write_text(paths.summary_txt, dataset_summary_text(adata, paths, settings))
    return paths.summary_txt


def _terms(adata: ad.AnnData) -> list[dict]:
    """Cells per Cell Ontology term (``term_id``, ``term_name``, ``lineage_name``, ``n_cells``)."""
    columns = ["cell_type_ontology_term_id", "cell_type_ontology_term", "cell_type_lineage"]
    if not all(c in adata.obs for c in columns):
        return []
    counts = adata.obs[columns].astype(str).value_counts()
    return [{"term_id": t, "term_name": n, "lineage_name": lineage, "n_cells": int(c)}
            for (t, n, lineage), c in counts.items()]


def _unconfirmed(table) -> int:
    """Calls the LLM validator did not confirm (the annotation table's ``validation`` column)."""
    if not isinstance(table, pd.DataFrame) or "validation" not in table:
        return 0
    return int((table["validation"].astype(str) == "not confirmed").sum())


def _flagged(record: dict) -> int:
    table = record.get("marker_evidence", {}).get("clusters")
    return int(table["flag"].astype(bool).sum()) if isinstance(table, pd.DataFrame) and "flag" in table else 0


def _pipeline_summary(table) -> dict:
    """Mean quality score and disputed clusters, from ``uns['cassia_batch']['pipeline']['clusters']``."""
    if not isinstance(table, pd.DataFrame) or table.empty:
        return {"mean_score": None, "disputed_clusters": 0, "boosted_clusters": 0}
    scores = pd.to_numeric(table.get("score"), errors="coerce")
    flags = table.get("disputed", pd.Series(False, index=table.index)).astype(bool)
    boosted = table.get("boosted", pd.Series(False, index=table.index)).astype(bool)
    return {"mean_score": None if scores.isna().all() else round(float(scores.mean()), 1),
            "disputed_clusters": int(flags.sum()), "boosted_clusters": int(boosted.sum())}


def _self_score(record: dict) -> dict:
    """The dataset's agreement with its author labels, with the cells per (author label, call) pair under
    ``confusion`` (``[author_label, call, n_cells, self_score]`` rows, for the report's confusion view)."""
    summary = dict(record.get("summary", {}))
    confusion = record.get("confusion")
    if summary and isinstance(confusion, pd.DataFrame):
        summary["confusion"] = [[str(a), str(c), int(n), str(s)] for a, c, n, s in
                                confusion[["author_label", "call", "n_cells", "self_score"]].itertuples(index=False)]
    return summary


def _subclusters(record: dict) -> dict:
    """``--subcluster``'s results: per parent type, its cells, the resolution and each subcluster's call."""
    out = {}
    for entry in record.get("subclusters", {}).values():
        frame = entry.get("clusters")
        rows = frame.to_dict("records") if isinstance(frame, pd.DataFrame) else []
        out[str(entry.get("parent", ""))] = {
            "n_cells": int(entry.get("n_cells", 0)), "resolution": float(entry.get("resolution", 0.0)),
            "clusters": [{"cluster": str(r["cluster"]), "cell_type": str(r["main_cell_type"]),
                          "n_cells": int(r["n_cells"]), "status": str(r["status"]), "reason": str(r["reason"]),
                          "score": None if pd.isna(r["score"]) else round(float(r["score"]), 1)} for r in rows],
        }
    return out


def write_result(adata: ad.AnnData, paths: DatasetPaths) -> Path:
    """``{dataset}_result.json``: the notebook's record for the run summaries, written last."""
    record = provenance(adata)
    phases = phase_times(record.get("timings", {}))
    clusters, labels = cluster_key(adata), label_key(adata)
    table = record.get("annotation", {}).get("clusters")
    described = record.get("annotation", {}).get("provenance", {})
    result = {
        "dataset": paths.dataset,
        "tissue": paths.tissue,
        "n_cells": int(adata.n_obs),
        "n_genes": int(adata.n_vars),
        "n_clusters": int(adata.obs[clusters].nunique()) if clusters in adata.obs else 0,
        "n_cells_input": record.get("qc", {}).get("cells_before"),
        "n_genes_input": record.get("qc", {}).get("genes_before"),
        "preprocessing_time": phases["preprocessing"],
        "annotation_time": phases["annotation"],
        "timings": dict(record.get("timings", {})),
        "annotator": described.get("annotator", ""),
        "model": described.get("model", ""),
        "unknown_clusters": int((table["status"] != "ok").sum()) if isinstance(table, pd.DataFrame) else 0,
        "cell_types": {str(k): int(v) for k, v in adata.obs[labels].value_counts().items()}
        if labels in adata.obs else {},
        "warnings": list(record.get("warnings", [])),
        "annotation_failure": record.get("annotation", {}).get("failure", ""),
        "unconfirmed_clusters": _unconfirmed(table),
        "step_warnings": list(record.get("annotation", {}).get("step_warnings", [])),
        **_pipeline_summary(record.get("pipeline", {}).get("clusters")),
        "cell_type_terms": _terms(adata),
        "flagged_clusters": _flagged(record),
        "evidence_flags": record.get("marker_evidence", {}).get("flags", {}),
        "self_score": _self_score(record.get("self_score", {})),
        **({"batches": batch_result(record)} if record.get("batches") else {}),
        **({"subclusters": _subclusters(record)} if record.get("subclusters") else {}),
    }
    write_json(paths.result_json, result)
    return paths.result_json
