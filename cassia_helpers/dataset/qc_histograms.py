"""Histograms of the QC metrics before and after the thresholds, kept in ``uns`` for the QC figure.

``pp.qc`` records them before it drops cells (the removed cells' metrics are lost afterwards); drawing is
:func:`cassia_helpers.dataset.figures.qc_figure`'s, so preprocessing does not depend on plotting.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

#: (obs column, title, log scale) of the QC metrics written by ``pp.qc``.
QC_METRICS = (
    ("n_genes_by_counts", "Genes per cell", True),
    ("total_counts", "Counts per cell", True),
    ("pct_counts_mt", "Mitochondrial counts (%)", False),
)


def qc_distributions(obs: pd.DataFrame, keep: np.ndarray, *, bins: int = 50) -> dict:
    """Histograms of the QC metrics before and after filtering, small enough for ``uns``.

    Called by ``pp.qc`` before it drops cells (the removed cells' metrics are lost afterwards). For each
    metric of :data:`QC_METRICS` in ``obs``: ``{"edges": float array (bins + 1), "before": int array,
    "after": int array}``; log-spaced bins for genes and counts.
    """
    keep = np.asarray(keep, dtype=bool)
    found = {}
    for metric, _, log in QC_METRICS:
        if metric not in obs:
            continue
        values = obs[metric].to_numpy(dtype=float)
        finite = np.isfinite(values)
        values, kept = values[finite], keep[finite]
        if not len(values):
            continue
        if log:
            low = max(1.0, float(values.min()))
            high = max(low * 1.01, float(values.max()))
            edges = np.geomspace(low, high, bins + 1)
            values = np.clip(values, low, high)
        else:
            edges = np.linspace(0.0, max(float(values.max()), 1e-6), bins + 1)
        found[metric] = {
            "edges": edges,
            "before": np.histogram(values, edges)[0].astype(np.int64),
            "after": np.histogram(values[kept], edges)[0].astype(np.int64),
        }
    return found
