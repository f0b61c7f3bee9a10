"""Run-level summaries: ``batch_summary.csv``, ``batch_summary.txt``, ``token_tracking.json`` and the
cross-dataset ``cell_types.csv`` / ``cell_types.png``.

Everything is read back from the run folder (manifest, each dataset's status, result and ledger), so a
run can be re-aggregated at any time; the user's own files in the folder are never touched.
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pandas as pd

from cassia_helpers.contract import (
    BATCH_SUMMARY_CSV,
    BATCH_SUMMARY_TXT,
    CELL_TYPES_CSV,
    CELL_TYPES_PNG,
    INTERRUPTED,
    RUN_MANIFEST,
    SUCCESS,
    TOKEN_TRACKING_JSON,
    DatasetPaths,
    read_manifest,
    read_result,
    read_status,
)
from cassia_helpers.dataset.annotate import REFERENCE_NOTE
from cassia_helpers.files import write_csv, write_json, write_text
from cassia_helpers.ledger import format_cost, tracking_from_ledgers
from cassia_helpers.summary.self_scores import self_score_fields, self_score_lines, summary_self_score_columns

SUMMARY_COLUMNS = [
    "dataset", "tissue", "file_path", "n_cells", "n_genes", "n_clusters",
    "preprocessing_time", "annotation_time", "total_time", "status", "output_dir", "error",
]


def load_manifest(run_dir: str | Path) -> dict:
    """The run's manifest; a one-line ``ValueError`` when it is missing or damaged."""
    manifest = read_manifest(run_dir)
    if manifest is None:
        raise ValueError(f"{Path(run_dir) / RUN_MANIFEST}: missing or damaged run manifest")
    return manifest


def collect(run_dir: str | Path) -> pd.DataFrame:
    """One row per dataset of the run, with the columns of ``batch_summary.csv`` plus ``annotator``,
    ``unknown_clusters``, ``warnings`` and ``cell_type_terms`` (the dataset's CL term records)."""
    run_dir = Path(run_dir)
    rows = []
    for entry in load_manifest(run_dir)["datasets"]:
        paths = DatasetPaths(run_dir, entry["tissue"], entry["name"])
        status = read_status(paths) or {"status": INTERRUPTED, "error": "never started", "duration_s": 0.0}
        result = _attempt_result(paths, status)
        rows.append({
            "dataset": entry["name"],
            "tissue": entry["tissue"],
            "file_path": entry["path"],
            "n_cells": result.get("n_cells"),
            "n_genes": result.get("n_genes"),
            "n_clusters": result.get("n_clusters"),
            "preprocessing_time": result.get("preprocessing_time"),
            "annotation_time": result.get("annotation_time"),
            "total_time": status.get("duration_s"),
            "status": status["status"],
            "output_dir": str(paths.folder.resolve()),
            "error": status.get("error", ""),
            "annotator": result.get("annotator", ""),
            "unknown_clusters": result.get("unknown_clusters"),
            "warnings": len(result.get("warnings", [])),
            "unconfirmed_clusters": result.get("unconfirmed_clusters"),
            "step_warnings": [str(w) for w in result.get("step_warnings", []) or []],
            "cell_type_terms": result.get("cell_type_terms", []),
            **self_score_fields(result),
        })
    table = pd.DataFrame(rows)
    for column in ("n_cells", "n_genes", "n_clusters", "unknown_clusters", "unconfirmed_clusters", "scored_cells",
                   "unscored_cells"):
        if column in table:  # counts stay whole numbers where a dataset has none (not 580.0)
            table[column] = pd.to_numeric(table[column], errors="coerce").astype("Int64")
    return table


def _attempt_result(paths: DatasetPaths, status: dict) -> dict:
    """The result record of the dataset's last attempt, or ``{}``. A failed dataset whose notebook ran to the
    end (the model server failed its annotation) has one; a record older than the attempt is not its."""
    if status["status"] != SUCCESS:
        try:
            started = datetime.fromisoformat(status.get("started_at") or "").timestamp()
            if paths.result_json.stat().st_mtime < started:
                return {}
        except (OSError, ValueError):
            return {}
    return read_result(paths) or {}


def token_tracking(run_dir: str | Path) -> dict:
    """Merge every dataset's ledger into the run's token record (``token_tracking.json``)."""
    run_dir = Path(run_dir)
    datasets = load_manifest(run_dir)["datasets"]
    ledgers = [DatasetPaths(run_dir, d["tissue"], d["name"]).llm_calls_jsonl for d in datasets]
    return {"generated_at": datetime.now(UTC).isoformat(timespec="seconds"), **tracking_from_ledgers(ledgers)}


def _budget_unknown(run_dir: Path, table: pd.DataFrame) -> int:
    """Clusters left Unknown because the budget stopped their requests (``reason_kind`` in each
    ``{dataset}_clusters.csv``)."""
    lost = 0
    for row in table.itertuples():
        try:
            clusters = pd.read_csv(DatasetPaths(run_dir, row.tissue, row.dataset).clusters_csv, dtype=str,
                                   keep_default_na=False)
        except (OSError, ValueError):
            continue
        if "reason_kind" in clusters and "status" in clusters:
            lost += int(((clusters["reason_kind"] == "budget") & (clusters["status"] != "ok")).sum())
    return lost


def wall_clock(run_dir: Path, manifest: dict) -> float | None:
    """Seconds from the run's start to the end of its last dataset, as the records say (``None`` when they
    do not): the same however late the summaries are written, or written again."""
    statuses = [read_status(DatasetPaths(run_dir, d.get("tissue", ""), d.get("name", "")))
                for d in manifest.get("datasets", []) if isinstance(d, dict)]
    starts = [s.get("started_at") for s in statuses if s and s.get("started_at")] + [manifest.get("created_at")]
    ends = [s.get("finished_at") for s in statuses if s and s.get("finished_at")]
    try:
        first = min(datetime.fromisoformat(s) for s in starts if s)
        last = max(datetime.fromisoformat(s) for s in ends)
    except (TypeError, ValueError):
        return None
    return max((last - first).total_seconds(), 0.0)


def _fmt_seconds(value) -> str:
    return "-" if value is None or pd.isna(value) else f"{float(value):.1f}s"


def run_summary_text(run_dir: Path, table: pd.DataFrame, tracking: dict, manifest: dict,
                     checks: dict[str, pd.DataFrame] | None = None) -> str:
    """The human-readable ``batch_summary.txt``."""
    counts = table["status"].value_counts()
    seconds = wall_clock(run_dir, manifest)
    elapsed = "" if seconds is None else f"{seconds:.1f}s (wall clock, from the run's start to its last dataset)"
    annotators = sorted({a for a in table.get("annotator", pd.Series(dtype=str)).dropna() if a})
    lines = [
        "CASSIA batch summary",
        f"Run folder: {run_dir.name}",
        f"Started: {manifest.get('created_at', '')}",
        f"Summarised: {datetime.now(UTC).isoformat(timespec='seconds')}",
        "",
        "Processing statistics",
        f"  Datasets processed: {len(table)}",
        f"  Succeeded: {int(counts.get('success', 0))}",
        f"  Failed: {int(counts.get('failed', 0))}",
        f"  Interrupted: {int(counts.get('interrupted', 0))}",
        f"  Time elapsed: {elapsed}",
        f"  Dataset time (sum): {table['total_time'].fillna(0).sum():.1f}s",
        "",
        "Annotation",
        f"  Annotator(s): {', '.join(annotators) or '-'}",
    ]
    if annotators == ["reference"]:
        lines.append(f"  {REFERENCE_NOTE}")
    unknown = table["unknown_clusters"].fillna(0).sum() if "unknown_clusters" in table else 0
    lines.append(f"  Clusters labelled Unknown: {int(unknown)}")
    if "unconfirmed_clusters" in table and table["unconfirmed_clusters"].notna().any():
        lines.append(f"  Calls not confirmed by the validator: {int(table['unconfirmed_clusters'].fillna(0).sum())}")
    for row in table.itertuples():
        lines += [f"  WARNING {row.tissue}/{row.dataset}: {w}" for w in getattr(row, "step_warnings", None) or []]
    lines += [
        "",
        "Token usage",
        f"  API calls: {tracking['total_calls']} ({tracking['failed_calls']} failed); "
        f"answers reused from the cache, not sent: {tracking['cache_hits']}",
        f"  Input tokens: {tracking['total_input_tokens']:,}",
        f"  Output tokens: {tracking['total_output_tokens']:,}",
        f"  Total tokens: {tracking['total_tokens']:,}",
        "",
        "Cost breakdown",
        f"Total cost: {format_cost(tracking['total_cost'])}",
    ]
    if tracking["budget_skipped"]:
        lost = _budget_unknown(run_dir, table)
        lines.append(f"  Budget reached: {tracking['budget_skipped']} request(s) not sent (--max-cost); "
                     + (f"{lost} cluster(s) are Unknown with reason 'budget'" if lost else
                        "no cluster became Unknown for it (each kept the answer it had)"))
    if tracking.get("not_sent"):
        lines.append(f"  Not sent: {tracking['not_sent']} request(s) never reached the server (refused connection, "
                     "refused certificate, or stopped while connecting); they are not counted as calls")
    if tracking.get("tokens_estimated"):
        lines.append(f"  Estimated: {tracking['estimated_tokens']:,} tokens of {tracking['estimated_calls']} call(s) "
                     "are local estimates (the server reported no usage, or the call was cut off)")
    if tracking.get("interrupted_calls"):
        lines.append(f"  Interrupted: {tracking['interrupted_calls']} request(s) were cut off mid-flight; they are "
                     "counted as sent")
    for event in tracking.get("circuit_breaker", []):
        lines.append(f"  Server unreachable: requests stopped at {event['timestamp']} ({event['error']})")
    if tracking["unknown_price_models"]:
        lines.append(f"  WARNING: no known price for {', '.join(tracking['unknown_price_models'])}: their calls "
                     "are counted at $0 (set prices with --price-file or --input-price/--output-price)")
    for name, part in tracking["by_model"].items():
        flag = "" if part["price_known"] else "  (price unknown)"
        lines.append(f"  model {name}: {part['calls']} calls, {part['input_tokens']:,} in, "
                     f"{part['output_tokens']:,} out, {format_cost(part['cost'])}{flag}")
    for name, part in tracking["by_dataset"].items():
        lines.append(f"  dataset {name}: {part['calls']} calls, {part['input_tokens']:,} in, "
                     f"{part['output_tokens']:,} out, {format_cost(part['cost'])}")
    checks = checks or {}
    flagged = checks.get("flagged", pd.DataFrame())
    missing = checks.get("missing", pd.DataFrame())
    suspect = flagged[flagged["suspect"]] if len(flagged) else flagged
    if len(suspect) or len(missing):
        lines += ["", "Cross-dataset checks (Cell Ontology terms in cell_types.csv)"]
    for row in suspect.itertuples():
        lines.append(f"  FLAG {row.dataset}: {row.n_unknown} Unknown and {row.n_flagged} marker-evidence-flagged "
                     f"of {row.n_clusters} clusters")
    for row in missing.itertuples() if len(missing) else []:
        lines.append(f"  MISSING {row.tissue}/{row.dataset}: no {row.cell_type_ontology_term} "
                     f"(present in {row.present_in} of {row.n_datasets} {row.tissue} datasets)")
    lines += self_score_lines(table)
    lines += ["", "Per-file status"]
    for row in table.itertuples():
        detail = f"{row.n_cells} cells, {row.n_clusters} clusters, {_fmt_seconds(row.total_time)}" \
            if row.status == "success" else (row.error or "")
        lines.append(f"  {row.status:<11} {row.tissue}/{row.dataset}: {detail}")
    # entries of the tissue folders that were not run (wrong format, unusable name): a colleague reading the
    # summary later should see them, not only whoever watched the terminal
    lines += [f"  {'not run':<11} {line}" for line in manifest.get("skipped_inputs") or []]
    reruns = [r for s in manifest.get("sessions", []) if isinstance(s, dict) for r in s.get("rerun") or []]
    if reruns:  # --resume found them incomplete (batch.resume): say why they ran again
        lines += ["", "Re-run on resume (the earlier files are in the dataset's superseded/ folder)"]
        lines += [f"  {r.get('tissue')}/{r.get('dataset')}: {r.get('reason')}" for r in reruns]
    return "\n".join(lines) + "\n"


def cell_types(run_dir: str | Path, table: pd.DataFrame | None = None) -> pd.DataFrame:
    """One row per successful dataset × Cell Ontology term: cells and fraction (``cell_types.csv``)."""
    from cassia_helpers.summary.crossqc import cell_type_table

    table = collect(run_dir) if table is None else table
    records = []
    for row in table[table["status"] == SUCCESS].itertuples():
        records += [{**term, "dataset": row.dataset, "tissue": row.tissue} for term in row.cell_type_terms]
    return cell_type_table(records=records) if records else pd.DataFrame(
        columns=["dataset", "tissue", "cell_type_ontology_term_id", "cell_type_ontology_term", "cell_type_lineage",
                 "n_cells", "fraction"])


def cross_dataset_checks(run_dir: str | Path, table: pd.DataFrame, terms: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """Types present in most datasets of a tissue but missing from one, and datasets with many Unknown or
    evidence-flagged clusters (read from each dataset's ``{dataset}_clusters.csv``)."""
    from cassia_helpers.summary.crossqc import flagged_datasets, missing_types

    run_dir = Path(run_dir)
    frames = []
    for row in table[table["status"] == SUCCESS].itertuples():
        path = DatasetPaths(run_dir, row.tissue, row.dataset).clusters_csv
        try:
            clusters = pd.read_csv(path, dtype={"cluster": str}, keep_default_na=False)
        except (OSError, ValueError):
            continue
        flag = clusters["evidence_flag"].astype(str).str.lower().eq("true") if "evidence_flag" in clusters else False
        frames.append(pd.DataFrame({"dataset": f"{row.tissue}/{row.dataset}", "main_cell_type": clusters["cell_type"],
                                    "flag": flag}))
    flagged = flagged_datasets(pd.concat(frames, ignore_index=True)) if frames else pd.DataFrame()
    return {"missing": missing_types(terms) if len(terms) else pd.DataFrame(), "flagged": flagged}


def write_run_summaries(run_dir: str | Path) -> pd.DataFrame:
    """Write ``batch_summary.csv``, ``batch_summary.txt``, ``token_tracking.json`` and ``cell_types.csv``;
    return the summary table."""
    run_dir = Path(run_dir)
    manifest = load_manifest(run_dir)
    table = collect(run_dir)
    tracking = token_tracking(run_dir)
    terms = cell_types(run_dir, table)
    checks = cross_dataset_checks(run_dir, table, terms)
    write_csv(run_dir / BATCH_SUMMARY_CSV, table[SUMMARY_COLUMNS + summary_self_score_columns(table)])
    write_json(run_dir / TOKEN_TRACKING_JSON, tracking)
    write_csv(run_dir / CELL_TYPES_CSV, terms)
    write_text(run_dir / BATCH_SUMMARY_TXT, run_summary_text(run_dir, table, tracking, manifest, checks))
    return table


def write_cell_type_heatmap(run_dir: str | Path) -> Path | None:
    """``cell_types.png``: the dataset × Cell Ontology term heatmap of ``cell_types.csv`` (when it has rows)."""
    from cassia_helpers.summary.crossqc import plot_cell_type_heatmap

    run_dir = Path(run_dir)
    try:
        terms = pd.read_csv(run_dir / CELL_TYPES_CSV)
    except (OSError, ValueError):
        return None
    return plot_cell_type_heatmap(terms, run_dir / CELL_TYPES_PNG) if len(terms) else None
