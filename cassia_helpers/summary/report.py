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
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path

import pandas as pd

from cassia_helpers.contract import BATCH_SUMMARY_CSV, REPORT_HTML, RUN_MANIFEST, TOKEN_TRACKING_JSON, DatasetPaths
from cassia_helpers.files import read_json, write_text
from cassia_helpers.palette import UNKNOWN_COLOR, is_no_call, run_palette

TEMPLATE = "report.html.j2"
#: figure (``DatasetPaths.figure_pngs``) -> (caption, thumbnail width in pixels)
FIGURES = {
    "umap": ("UMAP by cell type and by cluster", 1100),
    "dotplot": ("Marker genes per cluster", 1000),
    "qc": ("Quality control before and after the thresholds", 900),
    "cluster_sizes": ("Cluster sizes", 600),
}
#: per-cluster columns of {dataset}_clusters.csv shown when a run has them (not all empty), with their headings
OPTIONAL_COLUMNS = {"confidence": "Confidence", "score": "Score", "cell_type_ontology_term": "Cell Ontology",
                    "evidence_score": "Marker evidence", "evidence_flag_reason": "Flag", "agreement": "Agreement",
                    "broad": "Broad type"}
INTEGER_COLUMNS = ("n_cells", "n_genes", "n_clusters")
OPEN_SECTIONS_UP_TO = 10


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


def load_summary(run_dir: Path) -> pd.DataFrame:
    """``batch_summary.csv`` with counts as integers (``700``, not ``700.0``) and empty errors as ``""``."""
    table = pd.read_csv(run_dir / BATCH_SUMMARY_CSV, dtype={c: "Int64" for c in INTEGER_COLUMNS})
    for column in ("error", "status", "tissue", "dataset"):
        if column in table:
            table[column] = table[column].fillna("").astype(str)
    return table


def _wall_time(statuses: list[dict], manifest: dict) -> float | None:
    starts = [s.get("started_at") for s in statuses if s.get("started_at")] + [manifest.get("created_at")]
    ends = [s.get("finished_at") for s in statuses if s.get("finished_at")]
    try:
        first = min(datetime.fromisoformat(s) for s in starts if s)
        last = max(datetime.fromisoformat(s) for s in ends)
    except ValueError:
        return None
    return max((last - first).total_seconds(), 0.0)


def _clusters(path: Path) -> list[dict]:
    """The rows of ``{dataset}_clusters.csv`` ready for the template (empty when the file is missing)."""
    if not path.is_file():
        return []
    table = pd.read_csv(path, dtype={"cluster": str}, keep_default_na=False)
    optional = [c for c in OPTIONAL_COLUMNS if c in table and (table[c].astype(str).str.strip() != "").any()]
    rows = []
    for record in table.to_dict("records"):
        record["optional"] = {c: _format_value(record.get(c)) for c in optional}
        record["flag"] = _one_line(record.get("reason")) if str(record.get("status", "ok")) not in ("ok", "") else ""
        rows.append(record)
    return rows


def _format_value(value) -> str:
    if isinstance(value, float):
        return f"{value:g}" if not math.isnan(value) else ""
    return _one_line(value)


def _dataset(run_dir: Path, row: dict, tracking: dict, pool: ThreadPoolExecutor) -> dict:
    tissue, name = row["tissue"], row["dataset"]
    paths = DatasetPaths(run_dir, tissue, name)
    status = _read_json(paths.status_json)
    result = _read_json(paths.result_json) if row["status"] == "success" else {}
    clusters = _clusters(paths.clusters_csv)
    figures = []
    for key, path in paths.figure_pngs.items():
        caption, width = FIGURES[key]
        if path.is_file():
            figures.append({"key": key, "caption": caption, "src": pool.submit(thumbnail_uri, path, width=width),
                            "file": f"{tissue}/{name}/{path.name}"})
    usage = tracking.get("by_dataset", {}).get(f"{tissue}/{name}", {})
    return {
        "anchor": f"ds-{tissue}-{name}".replace(" ", "_"),
        "tissue": tissue,
        "name": name,
        "status": row["status"],
        "status_record": status,
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
        "optional_columns": [OPTIONAL_COLUMNS[c] for c in clusters[0]["optional"]] if clusters else [],
        "figures": figures,
        "notebook": f"{tissue}/{name}/{paths.notebook.name}",
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
    # thumbnails are made on a few threads (Pillow releases the GIL while decoding, resizing and encoding)
    with ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1)) as pool:
        datasets = [_dataset(run_dir, row, tracking, pool) for row in summary.to_dict("records")]
        for dataset in datasets:
            for figure in dataset["figures"]:
                figure["src"] = figure["src"].result()
    statuses = [d["status_record"] for d in datasets]
    counts = summary["status"].value_counts().to_dict()
    bars, colors = _composition([d for d in datasets if d["status"] == "success"])
    annotators = sorted({d["annotator"] for d in datasets if d["annotator"]})
    models = sorted({d["model"] for d in datasets if d["model"] and d["annotator"] != "reference"})
    return {
        "title": f"Cell-type annotation report: {run_dir.name}",
        "run_name": run_dir.name,
        "generated_at": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "started_at": manifest.get("created_at", ""),
        "n_datasets": len(datasets),
        "n_success": int(counts.get("success", 0)),
        "n_failed": int(sum(v for k, v in counts.items() if k != "success")),
        "status_counts": counts,
        "wall_time": _seconds(_wall_time(statuses, manifest)),
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
        "composition": bars,
        "colors": colors,
        "open_sections": len(datasets) <= OPEN_SECTIONS_UP_TO,
    }


def render_report(context: dict) -> str:
    """The HTML of the report (jinja2 template shipped in ``cassia_helpers/summary/templates``)."""
    import jinja2

    environment = jinja2.Environment(
        loader=jinja2.PackageLoader("cassia_helpers.summary", "templates"),
        autoescape=jinja2.select_autoescape(["html", "j2"]),
        trim_blocks=True,
        lstrip_blocks=True,
        undefined=jinja2.StrictUndefined,
    )
    environment.filters["thousands"] = lambda n: f"{int(n):,}" if n is not None else "–"
    return environment.get_template(TEMPLATE).render(**context)


def write_report(run_dir: str | Path) -> Path:
    """Write ``report.html`` in the run folder (from the files listed in the module docstring); return its path."""
    run_dir = Path(run_dir)
    path = run_dir / REPORT_HTML
    write_text(path, render_report(report_context(run_dir)))
    return path
