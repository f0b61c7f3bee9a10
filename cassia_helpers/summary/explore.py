"""Helpers for inspecting finished runs by hand (``notebooks/explore_run.ipynb``).

Tables come back with counts as integers (``700``, not ``700.0``) and error messages shown in full.
"""

from __future__ import annotations

import html
from pathlib import Path

import pandas as pd

from cassia_helpers.contract import (
    BATCH_SUMMARY_CSV,
    BATCH_SUMMARY_TXT,
    RUN_PREFIX,
    TOKEN_TRACKING_JSON,
    DatasetPaths,
    read_result,
)
from cassia_helpers.files import read_json

INTEGER_COLUMNS = ("n_cells", "n_genes", "n_clusters", "calls", "failed_calls", "interrupted_calls", "input_tokens",
                   "output_tokens", "total_tokens", "estimated_calls", "estimated_tokens")
# text wraps between words; "word-break: break-word" also let the browser squeeze a column to one letter per line
_WRAP = {"white-space": "pre-wrap", "text-align": "left", "overflow-wrap": "break-word", "min-width": "14ch"}


def latest_run(output_dir: str | Path = "batch_results") -> Path:
    """The most recent ``run_*`` folder of ``output_dir`` (by its timestamp) that has a ``batch_summary.csv``:
    a run that stopped before its summaries (e.g. the wrong Python, a missing package) is passed over."""
    runs = sorted(Path(output_dir).glob(f"{RUN_PREFIX}*"), key=lambda p: p.name[-15:])
    if not runs:
        raise FileNotFoundError(f"{output_dir}: no run folders yet (run `python run_batch.py --tissues ...` first)")
    finished = [run for run in runs if (run / BATCH_SUMMARY_CSV).is_file()]
    if not finished:
        raise FileNotFoundError(f"{output_dir}: no run has a {BATCH_SUMMARY_CSV} yet ({len(runs)} unfinished)")
    return finished[-1]


def find_run(run_dir: str | Path = "", output_dir: str | Path = "batch_results") -> Path:
    """``run_dir`` when given, else the newest run of ``output_dir``."""
    return Path(run_dir) if run_dir else latest_run(output_dir)


def load_summary(run_dir: str | Path) -> pd.DataFrame:
    """``batch_summary.csv`` of a run: counts as integers (``700``, not ``700.0``), missing errors, statuses,
    tissues and dataset names as ``""``."""
    table = pd.read_csv(Path(run_dir) / BATCH_SUMMARY_CSV, dtype={c: "Int64" for c in INTEGER_COLUMNS})
    for column in ("error", "status", "tissue", "dataset"):
        if column in table:
            table[column] = table[column].fillna("").astype(str)
    return table


def summary_table(run_dir: str | Path):
    """The run's datasets (without the long ``file_path``/``output_dir``), errors in full."""
    table = load_summary(run_dir).drop(columns=["file_path", "output_dir"], errors="ignore")
    return styled(table)


def summary_text(run_dir: str | Path) -> None:
    """Print ``batch_summary.txt``."""
    print((Path(run_dir) / BATCH_SUMMARY_TXT).read_text(encoding="utf-8"))


def failures(run_dir: str | Path):
    """Datasets that did not succeed, with their one-line reason in full."""
    table = load_summary(run_dir)
    return styled(table.loc[table["status"] != "success", ["tissue", "dataset", "status", "error"]])


def styled(table: pd.DataFrame):
    """A Styler: no cut-off text, integers without decimals, other numbers to 3 significant digits. Every value
    and header is HTML-escaped: labels, names and error messages come from models, servers and file names, and
    a notebook's own output is trusted (its script would run)."""
    floats = [c for c in table.columns if pd.api.types.is_float_dtype(table[c])]
    styler = table.style.hide(axis="index").format(escape="html").format_index(escape="html", axis=1)
    styler = styler.format("{:.3g}", subset=floats, na_rep="–", escape="html")
    text = [c for c in table.columns if table[c].dtype == object]
    return styler.set_properties(subset=text, **_WRAP) if text else styler


def _successful(run_dir: str | Path) -> list[DatasetPaths]:
    summary = load_summary(run_dir)
    rows = summary[summary["status"] == "success"]
    return [DatasetPaths(Path(run_dir), str(r.tissue), str(r.dataset)) for r in rows.itertuples()]


def datasets(run_dir: str | Path) -> list[str]:
    """``tissue/dataset`` of every successful dataset."""
    return [f"{p.tissue}/{p.dataset}" for p in _successful(run_dir)]


def cell_type_counts(run_dir: str | Path) -> pd.DataFrame:
    """Cells per cell type (rows) in each successful dataset (columns)."""
    columns = {}
    for paths in _successful(run_dir):
        result = read_result(paths) or {}
        columns[f"{paths.tissue}/{paths.dataset}"] = pd.Series(result.get("cell_types", {}), dtype="Int64")
    return pd.DataFrame(columns).fillna(0).astype(int).sort_index()


def cost_by_dataset(run_dir: str | Path) -> pd.DataFrame:
    """Calls, tokens and cost per dataset (``tissue/dataset``) from ``token_tracking.json``; every dataset of
    the run has its row, with zeros when it sent nothing (the offline reference, a cached rerun)."""
    tracking = read_json(Path(run_dir) / TOKEN_TRACKING_JSON) or {}
    summary = load_summary(run_dir)
    names = [f"{t}/{d}" for t, d in zip(summary["tissue"], summary["dataset"], strict=True)] if len(summary) else []
    table = pd.DataFrame(tracking.get("by_dataset", {})).T
    table = table.reindex(list(dict.fromkeys([*names, *table.index])))
    for column in ("calls", "input_tokens", "output_tokens", "cost"):
        if column not in table:
            table[column] = 0
    table = table.fillna(0)
    for column in table.columns:
        table[column] = pd.to_numeric(table[column])
        if column in INTEGER_COLUMNS:
            table[column] = table[column].astype("Int64")
    return table


def umap_images(run_dir: str | Path) -> dict[str, Path]:
    """The UMAP PNG of each successful dataset, keyed ``tissue/dataset``."""
    return {f"{p.tissue}/{p.dataset}": p.umap_png for p in _successful(run_dir) if p.umap_png.is_file()}


def show_umaps(run_dir: str | Path) -> None:
    """Display each successful dataset's UMAP PNG under its name."""
    from IPython.display import Image, Markdown, display

    for name, path in umap_images(run_dir).items():
        display(Markdown(f"**{name}**"), Image(filename=str(path)))


def load_dataset(run_dir: str | Path, name: str = ""):
    """A successful dataset's annotated AnnData, with the run's cell-type colours set for ``sc.pl``.

    ``name`` is ``tissue/dataset`` or a dataset name; empty means the first successful dataset.
    """
    import anndata as ad

    from cassia_helpers.dataset.figures import set_colors

    found = _successful(run_dir)
    if not found:
        raise FileNotFoundError(f"{run_dir}: no successful dataset")
    chosen = [p for p in found if name in ("", p.dataset, f"{p.tissue}/{p.dataset}")]
    if not chosen:
        raise KeyError(f"{name!r} is not a successful dataset of this run: {', '.join(datasets(run_dir))}")
    adata = ad.read_h5ad(chosen[0].annotated_h5ad)
    if "cell_type" in adata.obs and "cell_type_colors" not in adata.uns:
        set_colors(adata, "cell_type")
    return adata


def cluster_scores(adata, *, groupby: str = "leiden", key: str = "cell_type"):
    """Per cluster: label, size, the annotator's confidence (and any score columns), status and reason
    (a cluster left ``Unknown`` says why), key markers; the dataset's warnings as the caption."""
    from cassia_helpers.dataset.cluster_table import cluster_table

    table = cluster_table(adata, groupby=groupby, key=key)
    table = table.drop(columns=["label", "color", "reasoning", "top_markers"], errors="ignore")
    table = table.loc[:, [c for c in table.columns if not (table[c].astype(str).isin(["", "nan", "None"])).all()]]
    warnings = list(adata.uns.get("cassia_batch", {}).get("warnings", []))
    styler = styled(table)
    if warnings:
        styler = styler.set_caption(html.escape("Warnings: " + " · ".join(map(str, warnings))))
    return styler
