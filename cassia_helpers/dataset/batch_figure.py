"""The QC figure of a dataset with ``batch_key``, ``{dataset}_qc_batches.png``: each batch's cells before and after
QC, and its cells' genes, counts and mitochondrial share, so that a donor whose cells QC treats differently (a
failed library, a damaged sample) is seen at once."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from cassia_helpers.canvas import new_figure, plain_text, save_figure
from cassia_helpers.contract import DatasetPaths
from cassia_helpers.dataset.batches import BATCH_COLUMN
from cassia_helpers.dataset.figures import _plain_log_axis as plain_log_axis
from cassia_helpers.dataset.qc_histograms import QC_METRICS
from cassia_helpers.dataset.record import KEY as PROVENANCE_KEY

MAX_BATCHES = 60  # one row per batch: beyond this the rows would be unreadable; the largest are shown


@plain_text
def batch_qc_figure(adata):
    """Per batch (one row each, the largest ``MAX_BATCHES``): cells kept and removed by QC, and box plots of genes
    per cell, counts per cell and % mitochondrial counts of the cells kept. Reads
    ``uns['cassia_batch']['batches']`` and ``uns['cassia_batch']['qc']`` (thresholds) and the QC metrics in
    ``obs``."""
    record = adata.uns[PROVENANCE_KEY]["batches"]
    qc = dict(adata.uns[PROVENANCE_KEY].get("qc", {}))
    before = dict(zip(record["batches"], record["cells_before_qc"], strict=True))
    labels = adata.obs[BATCH_COLUMN].astype(str)
    kept = labels.value_counts().reindex(list(before), fill_value=0)
    order = sorted(before, key=lambda b: -before[b])[:MAX_BATCHES]
    thresholds = {"n_genes_by_counts": qc.get("min_genes"), "pct_counts_mt": qc.get("max_pct_mt")}
    figure = new_figure(12, 1.6 + 0.28 * len(order))
    axes = figure.subplots(1, 1 + len(QC_METRICS), sharey=True)
    positions = np.arange(len(order))
    ax = axes[0]
    kept_n = np.array([int(kept[b]) for b in order])
    removed_n = np.array([int(before[b]) for b in order]) - kept_n
    ax.barh(positions, kept_n, color="#1f77b4", height=0.7, label="kept")
    ax.barh(positions, removed_n, left=kept_n, color="#d0d0d0", height=0.7, label="removed by QC")
    for y, k, r in zip(positions, kept_n, removed_n, strict=True):
        ax.text(k + r, y, f" {k:,}/{k + r:,}", va="center", fontsize=7)
    ax.set_xlim(0, max(int((kept_n + removed_n).max()), 1) * 1.45)
    ax.set_title("cells per batch", fontsize=10)
    for ax, (metric, title, log) in zip(axes[1:], QC_METRICS, strict=True):
        values = adata.obs[metric].to_numpy(dtype=float) if metric in adata.obs else None
        ax.set_title(title, fontsize=10)
        if values is None:
            ax.text(0.5, 0.5, "not recorded", ha="center", va="center", transform=ax.transAxes, color="grey")
            continue
        groups = [values[(labels == b).to_numpy()] for b in order]
        shown = [g[np.isfinite(g)] if len(g) else np.array([np.nan]) for g in groups]
        ax.boxplot(shown, positions=positions, vert=False, widths=0.6, showfliers=False, patch_artist=True,
                   boxprops={"facecolor": "#cfe0f3", "edgecolor": "#1f77b4"}, medianprops={"color": "#1f77b4"})
        if log:
            plain_log_axis(ax)
        if thresholds.get(metric) is not None:
            ax.axvline(float(thresholds[metric]), color="#d62728", linestyle="--", linewidth=1)
    for ax in axes:
        ax.spines[["top", "right"]].set_visible(False)
        ax.tick_params(axis="x", labelsize=8)
    # the box plots set their own ticks on the shared axis: the batch names go last
    axes[0].set_yticks(positions, order, fontsize=8)
    axes[0].set_ylim(len(order) - 0.5, -0.5)
    handles, names = axes[0].get_legend_handles_labels()
    figure.legend(handles, names, loc="outside lower center", ncol=2, fontsize=8, frameon=False)
    more = f" (the {MAX_BATCHES} largest of {len(before)})" if len(before) > len(order) else ""
    figure.suptitle(f"QC per batch ({record['input_key']}): {len(before)} batches{more}", fontsize=11)
    return figure


def save_batch_figure(adata, paths: DatasetPaths) -> Path | None:
    """Draw :func:`batch_qc_figure` and save it as ``{dataset}_qc_batches.png``; nothing (``None``) for a dataset
    without ``batch_key``."""
    if not adata.uns.get(PROVENANCE_KEY, {}).get("batches"):
        return None
    return save_figure(batch_qc_figure(adata), paths.qc_batches_png)
