"""``report.html``: the run in one self-contained page a PI can open from an email.

Everything is read from the run folder — ``batch_summary.csv``, ``token_tracking.json``, the optional
``run_manifest.json`` and, per dataset, ``{dataset}_status.json``, ``{dataset}_result.json``,
``{dataset}_clusters.csv`` and the figures' PNGs — with plain pandas and json (no scanpy, no matplotlib).
Figures are embedded as downscaled, palette-quantised PNG thumbnails, so a 100-dataset report stays a few
megabytes and the page needs no network.
"""

from __future__ import annotations

import base64
import io
import math
import os
import re
import zlib
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import quote

import pandas as pd

from cassia_helpers.contract import CELL_TYPES_PNG, REPORT_HTML, RUN_MANIFEST, TOKEN_TRACKING_JSON, DatasetPaths
from cassia_helpers.files import read_json, write_text
from cassia_helpers.ledger import format_cost
from cassia_helpers.palette import UNKNOWN_COLOR, is_no_call, run_palette
from cassia_helpers.settings import BY_NAME, default
from cassia_helpers.summary.aggregate import wall_clock
from cassia_helpers.summary.explore import load_summary
from cassia_helpers.summary.self_scores import SCORE_RGB, accuracy_rows, confusion_view

TEMPLATE = "report.html.j2"
# the badge of each kind of marker-evidence flag (``evidence_flag_kind`` of {dataset}_clusters.csv)
FLAG_TEXT = {"contradicted": "contradicted by markers", "implausible_for_tissue": "unexpected in tissue",
             "markers_not_enriched": "markers not enriched"}
#: figure (``DatasetPaths.figure_pngs``) -> (caption, thumbnail width in pixels)
FIGURES = {
    "umap": ("UMAP by cell type and by cluster", 1100),
    "dotplot": ("Marker genes per cluster", 1000),
    "qc": ("Quality control before and after the thresholds", 900),
    "cluster_sizes": ("Cluster sizes", 600),
    "qc_batches": ("Quality control per batch", 1100),
}
#: figures shown at the page's width (the others side by side)
WIDE_FIGURES = ("umap", "dotplot", "qc_batches")
OPEN_SECTIONS_UP_TO = 10
HEATMAP_WIDTH = 1400
#: what makes a cluster worth a second look, in the order the report lists them (see ``_clusters``)
CHECK_KINDS = {"unknown": "Unknown or failed", "flagged": "flagged by marker evidence",
               "low": "low score", "disputed": "disputed"}


def thumbnail_uri(path: Path, *, width: int, colors: int = 64) -> str:
    """A ``data:image/png;base64,…`` URI of the PNG at ``path``, at most ``width`` pixels wide, quantised to
    ``colors`` colours (plots have few colours: a fraction of the size, text stays sharp)."""
    from PIL import Image

    with Image.open(path) as image:
        image = image.convert("RGB")
        if image.width > width:
            image = image.resize((width, max(1, round(image.height * width / image.width))), Image.LANCZOS)
        quantised = image.quantize(colors=colors, method=Image.Quantize.FASTOCTREE, dither=Image.Dither.NONE)
        buffer = io.BytesIO()
        quantised.save(buffer, format="PNG", compress_level=7)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _read_json(path: Path) -> dict:
    data = read_json(path)
    return data if isinstance(data, dict) else {}


def _one_line(text) -> str:
    if text is None or (isinstance(text, float) and math.isnan(text)):
        return ""
    return " ".join(str(text).split())


def _number(value) -> int | None:
    if value is None or (isinstance(value, float) and math.isnan(value)) or value is pd.NA:
        return None
    return int(value)


def _seconds(value) -> str:
    """``38 s``, ``4 min 05 s``, ``2 h 03 min``."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    value = float(value)
    if value < 60:
        return f"{value:.0f} s" if value >= 10 else f"{value:.1f} s"
    minutes, seconds = divmod(round(value), 60)
    if minutes < 60:
        return f"{minutes} min {seconds:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


def _utc_minute(stamp: str) -> str:
    """An ISO time as the report writes its own (``2026-12-07 20:31 UTC``); as given when it is not one."""
    try:
        return datetime.fromisoformat(stamp).astimezone(UTC).strftime("%Y-%m-%d %H:%M UTC")
    except (TypeError, ValueError):
        return stamp


def _float(value) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def _true(value) -> bool:
    return str(value).strip().casefold() in ("true", "1", "yes")


def _reasons_by_kind(text: str) -> dict[str, list[str]]:
    """``evidence_flag_reason`` (``"kind: reason; kind: reason"``) as the reasons of each kind."""
    reasons: dict[str, list[str]] = {}
    for part in re.split(rf"; (?=(?:{'|'.join(FLAG_TEXT)}): )", text or ""):
        kind, _, reason = part.partition(": ")
        if kind in FLAG_TEXT and reason:
            reasons.setdefault(kind, []).append(reason)
    return reasons


def _clusters(path: Path, *, dataset: str, anchor: str, low_score: float) -> list[dict]:
    """The rows of ``{dataset}_clusters.csv`` ready for the template (empty when the file is missing): numbers
    as numbers (``None`` when empty), text on one line, and what needs a reader's attention under ``checks``."""
    if not path.is_file():
        return []
    table = pd.read_csv(path, dtype={"cluster": str}, keep_default_na=False)
    has_score = "score" in table and pd.to_numeric(table["score"], errors="coerce").notna().any()
    rows = []
    for record in table.to_dict("records"):
        text = {key: _one_line(record.get(key)) for key in (
            "cluster", "cell_type", "status", "reason", "sub_cell_types", "mixed_cell_types", "key_markers",
            "top_markers", "cell_type_ontology_term", "cell_type_ontology_term_id", "cell_type_lineage",
            "broad", "evidence_flag_reason", "color", "revised_from")}
        row = {**text, "dataset": dataset, "anchor": anchor, "reasoning": str(record.get("reasoning") or "").strip(),
               "n_cells": _number(_float(record.get("n_cells"))) or 0, "pct_cells": _float(record.get("pct_cells")),
               "score": _float(record.get("score")), "confidence": _float(record.get("confidence")),
               "evidence": _float(record.get("evidence_score")), "agreement": _float(record.get("agreement"))}
        row["lineage"] = row["cell_type_lineage"] or row["broad"]
        checks = []
        if is_no_call(row["cell_type"]):
            checks.append(("unknown", "Unknown", row["reason"] or "no cell type called"))
        elif row["status"] not in ("", "ok"):
            checks.append(("unknown", row["status"], row["reason"]))
        if _true(record.get("evidence_flag")):
            kinds = [k.strip() for k in str(record.get("evidence_flag_kind") or "").split(",") if k.strip()]
            reasons = _reasons_by_kind(row["evidence_flag_reason"])
            for kind in kinds or ["markers_not_enriched"]:  # a badge per kind, each with its own reasons
                checks.append(("flagged", FLAG_TEXT.get(kind, kind.replace("_", " ")),
                               "; ".join(reasons.get(kind, []))))
        # the quality score where the annotator gives one, else its confidence (an LLM run without scoring)
        ranking = row["score"] if has_score else row["confidence"]
        if ranking is not None and ranking < low_score:
            checks.append(("low", f"score < {low_score:g}", ""))
        if _true(record.get("disputed")):
            checks.append(("disputed", "disputed", "the repeated runs disagree"))
        row["checks"] = [{"kind": k, "text": t, "detail": d} for k, t, d in checks]
        row["kinds"] = " ".join(dict.fromkeys(k for k, _, _ in checks))
        rows.append(row)
    return rows


def _link(tissue: str, name: str, file: Path) -> str:
    """A relative link to a file of a dataset's folder: names may hold ``#``, ``%``, ``?`` or spaces."""
    return "/".join(quote(part) for part in (tissue, name, file.name))


def _anchor(tissue: str, name: str) -> str:
    """An element id for the dataset, safe in a ``#fragment``: other characters become ``_``, and a short
    hash of the names keeps two datasets whose names differ only there apart."""
    raw = f"ds-{tissue}-{name}"
    safe = re.sub(r"[^A-Za-z0-9_-]", "_", raw)
    return safe if safe == raw else f"{safe}-{zlib.crc32(raw.encode()):08x}"


def _dataset(run_dir: Path, row: dict, tracking: dict, pool: ThreadPoolExecutor, *, low_score: float) -> dict:
    tissue, name = row["tissue"], row["dataset"]
    paths = DatasetPaths(run_dir, tissue, name)
    anchor = _anchor(tissue, name)
    status = _read_json(paths.status_json)
    result = _read_json(paths.result_json) if row["status"] == "success" else {}
    clusters = _clusters(paths.clusters_csv, dataset=f"{tissue}/{name}", anchor=anchor, low_score=low_score)
    figures = []
    for key, path in {**paths.figure_pngs, "qc_batches": paths.qc_batches_png}.items():
        caption, width = FIGURES[key]
        if path.is_file():
            figures.append({"key": key, "caption": caption, "src": pool.submit(thumbnail_uri, path, width=width),
                            "file": _link(tissue, name, path)})
    usage = tracking.get("by_dataset", {}).get(f"{tissue}/{name}", {})
    return {
        "anchor": anchor,
        "tissue": tissue,
        "name": name,
        "status": row["status"],
        "error": _one_line(row.get("error") or status.get("error")),
        "error_type": status.get("error_type", ""),
        "input_file": Path(str(row.get("file_path") or "")).name,
        "n_cells": _number(row.get("n_cells")),
        "n_cells_input": _number(result.get("n_cells_input")),
        "n_genes": _number(row.get("n_genes")),
        "n_clusters": _number(row.get("n_clusters")),
        "time": _seconds(row.get("total_time")),
        "annotator": result.get("annotator", ""),
        "model": result.get("model", ""),
        "unknown_clusters": result.get("unknown_clusters"),
        "unconfirmed_clusters": result.get("unconfirmed_clusters"),
        "warnings": [_one_line(w) for w in result.get("warnings", [])],
        "cell_types": {str(k): int(v) for k, v in result.get("cell_types", {}).items()},
        "tokens": int(usage.get("total_tokens", 0)),
        "cost": float(usage.get("cost", 0.0)),
        "clusters": clusters,
        "n_attention": sum(bool(c["checks"]) for c in clusters),
        "figures": figures,
        "confusion": confusion_view(result.get("self_score")),
        "self_score_key": (result.get("self_score") or {}).get("self_score_key", ""),
        "batches": result.get("batches") or {},
        "subclusters": result.get("subclusters") or {},
        # links only to files that exist (an input rejected before its notebook ran has none)
        "notebook": _link(tissue, name, paths.notebook) if paths.notebook.is_file() else "",
        "kernel_log": _link(tissue, name, paths.kernel_log) if paths.kernel_log.is_file() else "",
    }


def _composition(datasets: list[dict]) -> tuple[list[dict], dict[str, str]]:
    """Per successful dataset its cell types as percentages, and the colour of every cell type."""
    colors: dict[str, str] = {}
    for dataset in datasets:  # the colours the dataset's figures used, when its clusters table has them
        for row in dataset["clusters"]:
            if row.get("color"):
                colors.setdefault(str(row["cell_type"]), str(row["color"]))
    labels = {t for d in datasets for t in d["cell_types"]}
    missing = run_palette(labels - set(colors))
    colors.update({k: v for k, v in missing.items() if k not in colors})
    bars = []
    for dataset in datasets:
        total = sum(dataset["cell_types"].values())
        if not total:
            continue
        parts = sorted(dataset["cell_types"].items(), key=lambda kv: (is_no_call(kv[0]), -kv[1]))
        bars.append({
            "label": f"{dataset['tissue']}/{dataset['name']}",
            "anchor": dataset["anchor"],
            "total": total,
            "parts": [{"label": k, "n": v, "pct": 100.0 * v / total, "color": colors.get(k, UNKNOWN_COLOR)}
                      for k, v in parts],
        })
    order = sorted(labels, key=lambda t: (is_no_call(t), -sum(d["cell_types"].get(t, 0) for d in datasets)))
    return bars, {t: colors[t] for t in order}


def report_context(run_dir: str | Path) -> dict:
    """Everything the template shows, read from the run folder."""
    run_dir = Path(run_dir)
    summary = load_summary(run_dir)
    tracking = _read_json(run_dir / TOKEN_TRACKING_JSON)
    manifest = _read_json(run_dir / RUN_MANIFEST)
    low_score = _low_score(manifest)
    # thumbnails are made on a few threads (Pillow releases the GIL while decoding, resizing and encoding)
    with ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1)) as pool:
        datasets = [_dataset(run_dir, row, tracking, pool, low_score=low_score) for row in summary.to_dict("records")]
        heatmap = run_dir / CELL_TYPES_PNG
        cross = pool.submit(thumbnail_uri, heatmap, width=HEATMAP_WIDTH) if heatmap.is_file() else None
        for dataset in datasets:
            for figure in dataset["figures"]:
                figure["src"] = figure["src"].result()
        cross = {"src": cross.result(), "file": CELL_TYPES_PNG} if cross is not None else None
    clusters = [c for d in datasets if d["status"] == "success" for c in d["clusters"]]
    anchors = {f"{d['tissue']}/{d['name']}": d["anchor"] for d in datasets if d["confusion"]}
    counts = summary["status"].value_counts().to_dict()
    bars, colors = _composition([d for d in datasets if d["status"] == "success"])
    annotators = sorted({d["annotator"] for d in datasets if d["annotator"]})
    models = sorted({d["model"] for d in datasets if d["model"] and d["annotator"] != "reference"})
    return {
        "title": f"Cell-type annotation report: {run_dir.name}",
        "run_name": run_dir.name,
        "generated_at": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "started_at": _utc_minute(manifest.get("created_at", "")),
        "n_datasets": len(datasets),
        "n_success": int(counts.get("success", 0)),
        "n_failed": int(sum(v for k, v in counts.items() if k != "success")),
        "status_counts": counts,
        "check_kinds": CHECK_KINDS,
        "wall_time": _seconds(wall_clock(run_dir, manifest)),
        "dataset_time": _seconds(float(pd.to_numeric(summary.get("total_time"), errors="coerce").fillna(0).sum())),
        "n_cells": int(sum(d["n_cells"] or 0 for d in datasets)),
        "n_clusters": int(sum(d["n_clusters"] or 0 for d in datasets)),
        "unknown_clusters": int(sum(d["unknown_clusters"] or 0 for d in datasets)),
        "unconfirmed_clusters": int(sum(d["unconfirmed_clusters"] or 0 for d in datasets)),
        "annotators": annotators,
        "models": models,
        "tracking": {
            "calls": int(tracking.get("total_calls", 0)),
            "failed_calls": int(tracking.get("failed_calls", 0)),
            "cache_hits": int(tracking.get("cache_hits", 0)),
            "input_tokens": int(tracking.get("total_input_tokens", 0)),
            "output_tokens": int(tracking.get("total_output_tokens", 0)),
            "total_tokens": int(tracking.get("total_tokens", 0)),
            "cost": float(tracking.get("total_cost", 0.0)),
            "currency": tracking.get("currency", "USD"),
            "unknown_price_models": list(tracking.get("unknown_price_models", [])),
        },
        "datasets": datasets,
        "failures": [d for d in datasets if d["status"] != "success"],
        "skipped_inputs": [str(line) for line in manifest.get("skipped_inputs") or []],
        "composition": bars,
        "colors": colors,
        "open_sections": len(datasets) <= OPEN_SECTIONS_UP_TO,
        "clusters": clusters,
        "checks": {kind: sum(kind in c["kinds"].split() for c in clusters) for kind in CHECK_KINDS},
        "n_attention": sum(bool(c["checks"]) for c in clusters),
        "low_score": low_score,
        # the offline annotator reports one measure as both: the table then shows one column, and says so
        "same_measure": all(c["confidence"] == c["score"] for c in clusters),
        "has": {key: any(c[key] not in (None, "") for c in clusters)
                for key in ("score", "confidence", "evidence", "agreement", "lineage", "cell_type_ontology_term")},
        "lineages": sorted({c["lineage"] for c in clusters if c["lineage"]}, key=str.casefold),
        "cross": cross,
        "accuracy": [{**row, "anchor": anchors.get(row["dataset"], "")} for row in accuracy_rows(summary)],
        "score_colors": {kind: f"rgb{rgb}" for kind, rgb in SCORE_RGB.items()},
        "wide_figures": WIDE_FIGURES,
    }


def _low_score(manifest: dict) -> float:
    """Scores below the run's ``boost_below`` (the pipeline's own bar for a weak call) are highlighted."""
    value = _float(manifest.get("analysis", {}).get("boost_below"))
    return value if value is not None else float(default(BY_NAME["boost_below"]))


def render_report(context: dict) -> str:
    """The HTML of the report (jinja2 template shipped in ``cassia_helpers/summary/templates``)."""
    import jinja2
    import markupsafe

    environment = jinja2.Environment(
        loader=jinja2.PackageLoader("cassia_helpers.summary", "templates"),
        autoescape=jinja2.select_autoescape(["html", "j2"]),
        trim_blocks=True,
        lstrip_blocks=True,
        undefined=jinja2.StrictUndefined,
    )
    environment.filters["thousands"] = lambda n: f"{int(n):,}" if n is not None else "–"
    # a cost under a cent keeps its digits (0.0042, not 0.00)
    environment.filters["usd"] = lambda x: format_cost(float(x or 0.0)).removeprefix("$")
    # one number format per measure, whatever the CSV held (0.917 and 0.7932 both show as 0.92 / 0.79)
    environment.filters["fixed"] = lambda x, digits=0: "–" if x is None else f"{x:.{digits}f}"
    # long dataset names may wrap after "/" and "_" (<wbr> adds no character: search and copy see the name)
    environment.filters["breakable"] = lambda text: markupsafe.Markup("<wbr>").join(
        re.split(r"(?<=[/_])", str(text)))
    environment.filters["sortable"] = lambda x: "" if x is None else f"{x:.6g}"
    return environment.get_template(TEMPLATE).render(**context)


def write_report(run_dir: str | Path) -> Path:
    """Write ``report.html`` in the run folder (from the files listed in the module docstring); return its path."""
    run_dir = Path(run_dir)
    path = run_dir / REPORT_HTML
    write_text(path, render_report(report_context(run_dir)))
    return path
