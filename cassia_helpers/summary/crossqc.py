"""Cross-dataset QC of a run: which Cell Ontology terms appear in which datasets.

Inputs are per-dataset cell tables (each dataset's ``obs`` with the CELLxGENE-style columns written by
:func:`cassia_helpers.dataset.ontology.annotate_ontology`) or per-dataset cluster records; outputs are a tidy
dataset x CL term table (cell counts and fractions), the types present in most datasets of a tissue
but missing from one, the datasets with many ``Unknown`` or flagged clusters, and a heatmap PNG.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from cassia_helpers.canvas import plain_text

__all__ = ["cell_type_heatmap_figure", "cell_type_table", "flagged_datasets", "missing_types",
           "plot_cell_type_heatmap"]

TERM_ID = "cell_type_ontology_term_id"
TERM = "cell_type_ontology_term"
LINEAGE = "cell_type_lineage"
COLUMNS = ["dataset", "tissue", TERM_ID, TERM, LINEAGE, "n_cells", "fraction"]


def cell_type_table(
    obs_tables: dict[str, pd.DataFrame] | None = None,
    *,
    records: list[dict[str, Any]] | None = None,
    tissues: dict[str, str] | None = None,
) -> pd.DataFrame:
    """One row per dataset x CL term with cell counts and fractions.

    Parameters
    ----------
    obs_tables
        ``{dataset: obs}``, each with ``cell_type_ontology_term_id``, ``cell_type_ontology_term`` and
        ``cell_type_lineage`` columns (one row per cell).
    records
        Alternatively (or as well), per-cluster records ``{"dataset", "term_id", "term_name",
        "lineage_name", "n_cells"}`` (``tissue`` optional), e.g. from the datasets' ontology tables.
    tissues
        ``{dataset: tissue}``; datasets not listed get an empty tissue.

    Returns
    -------
    pandas.DataFrame
        Columns ``dataset, tissue, cell_type_ontology_term_id, cell_type_ontology_term,
        cell_type_lineage, n_cells, fraction``; within each dataset ``n_cells`` sums to its cells and
        ``fraction`` to 1. Unmatched cells are one row with the id ``"unknown"``.
    """
    tissues = dict(tissues or {})
    parts = []
    for dataset, obs in (obs_tables or {}).items():
        missing = [c for c in (TERM_ID, TERM, LINEAGE) if c not in obs.columns]
        if missing:
            raise ValueError(f"dataset {dataset!r}: obs lacks {missing}; run annotate_ontology first")
        counts = (obs[[TERM_ID, TERM, LINEAGE]].astype(str).value_counts().rename("n_cells").reset_index())
        counts.insert(0, "dataset", str(dataset))
        parts.append(counts)
    for rec in records or []:
        parts.append(pd.DataFrame([{
            "dataset": str(rec["dataset"]), TERM_ID: str(rec["term_id"]), TERM: str(rec["term_name"]),
            LINEAGE: str(rec.get("lineage_name", "")), "n_cells": int(rec["n_cells"]),
        }]))
        if rec.get("tissue"):
            tissues.setdefault(str(rec["dataset"]), str(rec["tissue"]))
    if not parts:
        return pd.DataFrame(columns=COLUMNS)
    table = pd.concat(parts, ignore_index=True)
    table = table.groupby(["dataset", TERM_ID, TERM, LINEAGE], as_index=False, observed=True)["n_cells"].sum()
    table["n_cells"] = table["n_cells"].astype(int)
    table["fraction"] = table["n_cells"] / table.groupby("dataset")["n_cells"].transform("sum")
    table.insert(1, "tissue", table["dataset"].map(tissues).fillna(""))
    return table.sort_values(["dataset", "n_cells"], ascending=[True, False], ignore_index=True)[COLUMNS]


def missing_types(table: pd.DataFrame, *, min_share: float = 0.6, min_datasets: int = 3) -> pd.DataFrame:
    """CL terms present in most datasets of a tissue but absent from some of them.

    Parameters
    ----------
    table
        Output of :func:`cell_type_table`.
    min_share
        A term counts as expected in a tissue when present in at least this share of its datasets.
    min_datasets
        Tissues with fewer datasets are skipped (no "most" to speak of).

    Returns
    -------
    pandas.DataFrame
        ``tissue, dataset, cell_type_ontology_term_id, cell_type_ontology_term, present_in, n_datasets``:
        one row per dataset missing an expected term (``"unknown"`` is never expected).
    """
    rows = []
    for tissue, sub in table.groupby("tissue"):
        datasets = sorted(sub["dataset"].unique())
        if len(datasets) < min_datasets:
            continue
        present = sub[sub[TERM_ID] != "unknown"].groupby([TERM_ID, TERM])["dataset"].agg(set)
        for (term_id, term), where in present.items():
            if len(where) >= min_share * len(datasets) and len(where) < len(datasets):
                for dataset in datasets:
                    if dataset not in where:
                        rows.append({"tissue": tissue, "dataset": dataset, TERM_ID: term_id, TERM: term,
                                     "present_in": len(where), "n_datasets": len(datasets)})
    return pd.DataFrame(rows, columns=["tissue", "dataset", TERM_ID, TERM, "present_in", "n_datasets"])


def flagged_datasets(clusters: pd.DataFrame, *, max_share: float = 0.25) -> pd.DataFrame:
    """Datasets with a large share of ``Unknown`` or evidence-flagged clusters.

    Parameters
    ----------
    clusters
        One row per dataset x cluster with ``dataset``, ``main_cell_type`` (or ``label``) and optionally
        ``flag`` (marker-evidence flag) and ``n_cells``.
    max_share
        Datasets whose share of unknown-or-flagged clusters exceeds this are marked ``suspect``.

    Returns
    -------
    pandas.DataFrame
        ``dataset, n_clusters, n_unknown, n_flagged, share, suspect``, worst first.
    """
    label = clusters["main_cell_type"] if "main_cell_type" in clusters else clusters["label"]
    unknown = label.astype(str).str.strip().str.lower().isin(["unknown", ""])
    flag = clusters["flag"].astype(bool) if "flag" in clusters else pd.Series(False, index=clusters.index)
    df = pd.DataFrame({"dataset": clusters["dataset"].astype(str), "unknown": unknown, "flag": flag & ~unknown})
    out = df.groupby("dataset").agg(n_clusters=("unknown", "size"), n_unknown=("unknown", "sum"),
                                    n_flagged=("flag", "sum")).reset_index()
    out["share"] = (out["n_unknown"] + out["n_flagged"]) / out["n_clusters"]
    out["suspect"] = out["share"] > max_share
    return out.sort_values(["share", "dataset"], ascending=[False, True], ignore_index=True)


#: font size of the heatmap's labels, and the width of one of its characters in inches (the average glyph of
#: matplotlib's sans-serif is about 0.6 em): the figure is sized from its longest labels
LABEL_FONTSIZE = 8
CHAR_INCHES = 0.6 * LABEL_FONTSIZE / 72
CELL_INCHES = 0.3
MAX_ANNOTATED_CELLS = 400


@plain_text
def cell_type_heatmap_figure(table: pd.DataFrame, *, value: str = "fraction", max_terms: int = 60):
    """The dataset x CL term table as a heatmap :class:`~matplotlib.figure.Figure`, sized from its content.

    The figure grows with the number of datasets and terms and with the longest names (rotated Cell Ontology
    names need their length in height), so the cells never collapse however long the labels are.
    Arguments as :func:`plot_cell_type_heatmap`.
    """
    from cassia_helpers.canvas import new_figure

    grid = table.pivot_table(index="dataset", columns=TERM, values=value, aggfunc="sum", fill_value=0)
    order = table.groupby(TERM)["n_cells"].sum().sort_values(ascending=False).index[:max_terms]
    grid = grid[[t for t in order if t in grid.columns]]
    n_rows, n_cols = max(grid.shape[0], 1), max(grid.shape[1], 1)
    longest_term = max((len(str(t)) for t in grid.columns), default=0)
    longest_dataset = max((len(str(d)) for d in grid.index), default=0)
    # labels + cells + title, axis labels and the colour bar
    width = longest_dataset * CHAR_INCHES + n_cols * CELL_INCHES + 2.4
    height = longest_term * CHAR_INCHES + n_rows * CELL_INCHES + 1.4
    fig = new_figure(max(width, 5.0), max(height, 3.0))
    ax = fig.add_subplot(1, 1, 1)
    values = grid.to_numpy(dtype=float) if grid.size else np.zeros((1, 1))
    image = ax.imshow(values, aspect="auto", cmap="viridis", vmin=0)
    if grid.size <= MAX_ANNOTATED_CELLS:  # small grids: the number in each cell
        top = max(float(values.max()), 1e-12)
        for (row, col), number in np.ndenumerate(values):
            ax.text(col, row, f"{number:.0%}" if value == "fraction" else f"{number:,.0f}", ha="center",
                    va="center", fontsize=6.5, color="black" if number > 0.6 * top else "white")
    ax.set_xticks(range(grid.shape[1]), grid.columns, rotation=90, fontsize=LABEL_FONTSIZE)
    ax.set_yticks(range(grid.shape[0]), grid.index, fontsize=LABEL_FONTSIZE)
    ax.set_xlabel("Cell Ontology term", fontsize=9)
    ax.set_ylabel("dataset", fontsize=9)
    bar = fig.colorbar(image, ax=ax, label="share of the dataset's cells" if value == "fraction" else "cells",
                       shrink=min(1.0, 3.0 / max(n_rows * CELL_INCHES, 0.1)), aspect=12)
    if value == "fraction":  # in % as the cells are labelled
        from matplotlib.ticker import PercentFormatter

        bar.formatter = PercentFormatter(xmax=1.0, decimals=0)
    bar.ax.tick_params(labelsize=LABEL_FONTSIZE)
    bar.set_label(bar.ax.get_ylabel(), fontsize=9)
    ax.set_title("Cell types across datasets", fontsize=10, loc="left")
    return fig


def plot_cell_type_heatmap(table: pd.DataFrame, path: str | Path, *, value: str = "fraction",
                           max_terms: int = 60) -> Path:
    """Draw the dataset x CL term table as a heatmap PNG (:func:`cell_type_heatmap_figure`).

    Drawn with :func:`cassia_helpers.canvas.new_figure` (no pyplot state, no backend switch) and written
    atomically by :func:`cassia_helpers.canvas.save_figure`.

    Parameters
    ----------
    table
        Output of :func:`cell_type_table`.
    path
        PNG file to write.
    value
        ``"fraction"`` or ``"n_cells"``.
    max_terms
        Keep the terms with the most cells overall.

    Returns
    -------
    pathlib.Path
        The file written.
    """
    from cassia_helpers.canvas import save_figure

    return save_figure(cell_type_heatmap_figure(table, value=value, max_terms=max_terms), path)
