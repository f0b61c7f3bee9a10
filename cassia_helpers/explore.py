"""Helpers for inspecting finished runs by hand (``notebooks/explore_run.ipynb``)."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from .contract import BATCH_SUMMARY_CSV, RUN_PREFIX, TOKEN_TRACKING_JSON, DatasetPaths, read_result


def latest_run(output_dir: str | Path = "batch_results") -> Path:
    """The most recent ``run_*`` folder of ``output_dir`` (by its timestamp)."""
    runs = sorted(Path(output_dir).glob(f"{RUN_PREFIX}*"), key=lambda p: p.name[-15:])
    if not runs:
        raise FileNotFoundError(f"{output_dir}: no run folders yet (run `python run_batch.py --tissues ...` first)")
    return runs[-1]


def load_summary(run_dir: str | Path) -> pd.DataFrame:
    """``batch_summary.csv`` of a run."""
    return pd.read_csv(Path(run_dir) / BATCH_SUMMARY_CSV)


def cell_type_counts(run_dir: str | Path) -> pd.DataFrame:
    """Cells per cell type (rows) in each successful dataset (columns)."""
    summary = load_summary(run_dir)
    columns = {}
    for row in summary[summary["status"] == "success"].itertuples():
        result = read_result(DatasetPaths(Path(run_dir), row.tissue, row.dataset)) or {}
        columns[f"{row.tissue}/{row.dataset}"] = pd.Series(result.get("cell_types", {}), dtype="Int64")
    return pd.DataFrame(columns).fillna(0).astype(int).sort_index()


def cost_by_dataset(run_dir: str | Path) -> pd.DataFrame:
    """Calls, tokens and cost per dataset from ``token_tracking.json``."""
    tracking = json.loads((Path(run_dir) / TOKEN_TRACKING_JSON).read_text(encoding="utf-8"))
    return pd.DataFrame(tracking["by_dataset"]).T


def umap_images(run_dir: str | Path) -> dict[str, Path]:
    """The UMAP PNG of each successful dataset, keyed ``tissue/dataset``."""
    summary = load_summary(run_dir)
    found = {}
    for row in summary[summary["status"] == "success"].itertuples():
        path = DatasetPaths(Path(run_dir), row.tissue, row.dataset).umap_png
        if path.is_file():
            found[f"{row.tissue}/{row.dataset}"] = path
    return found
