"""The figures of one dataset: QC, UMAP by cell type and by cluster, marker dot plot, cluster sizes.

Every figure is drawn on its own :class:`matplotlib.figure.Figure` from :func:`cassia_helpers.canvas.new_figure`
(never pyplot's global state, never a backend switch), returned so that a notebook shows it, and saved as a PNG
by :func:`save_dataset_figures`.
Cell-type colours come from :func:`cassia_helpers.palette.run_palette`: the same label has the same colour
in every dataset of a run, ``Unknown`` is grey.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from cassia_helpers.canvas import SavedFigures, new_figure, plain_text, save_figure
from cassia_helpers.contract import DatasetPaths
from cassia_helpers.dataset.cluster_table import cluster_label
from cassia_helpers.dataset.qc_histograms import QC_METRICS, qc_distributions
from cassia_helpers.dataset.record import KEY as PROVENANCE_KEY
from cassia_helpers.dataset.umap_labels import label_spots, place_labels
from cassia_helpers.palette import PALETTE, is_no_call, run_palette


def label_colors(adata, key: str = "cell_type") -> dict[str, str]:
    """Colour of each category of ``obs[key]``: ``uns[f'{key}_colors']`` if it fits, else :func:`run_palette`."""
    column = adata.obs[key]
    categories = [str(c) for c in (column.cat.categories if hasattr(column, "cat") else sorted(set(column)))]
    stored = adata.uns.get(f"{key}_colors")
    if stored is not None and len(stored) == len(categories):
        return dict(zip(categories, map(str, stored), strict=True))
    return run_palette(categories)


def set_colors(adata, key: str = "cell_type", *, fixed: Mapping[str, str] | None = None) -> dict[str, str]:
    """Give ``obs[key]``'s categories the run's colours, as scanpy stores them.

    Makes ``obs[key]`` categorical if needed and writes ``uns[f'{key}_colors']`` (one colour per category, in
    category order), so ``sc.pl.umap(adata, color=key)`` uses the same colours as every other figure of the run.
    ``fixed`` colours win over the palette (see :func:`~cassia_helpers.palette.run_palette`).
    """
    if not hasattr(adata.obs[key], "cat"):
        adata.obs[key] = pd.Categorical(adata.obs[key].astype(str))
    categories = [str(c) for c in adata.obs[key].cat.categories]
    colors = run_palette(categories, fixed=fixed)
    adata.uns[f"{key}_colors"] = np.array([colors[c] for c in categories], dtype=object)
    return colors


#: the QC figure's titles for an input that holds no counts (its values log-normalised)
LOGNORMALISED_TITLES = {"total_counts": "Sum of log-normalised values per cell",
                        "pct_counts_mt": "Mitochondrial share of that sum (%)"}


@plain_text
def qc_figure(adata, *, distributions: Mapping | None = None):
    """Genes, counts and % mitochondrial counts per cell, before (grey) and after (blue) the QC thresholds.

    Reads ``uns['cassia_batch']['qc']`` (thresholds, cell numbers and ``distributions`` from
    :func:`qc_distributions`); without recorded distributions only the cells kept are shown (from ``obs``).
    """
    record = dict(adata.uns.get(PROVENANCE_KEY, {}).get("qc", {}))
    distributions = distributions if distributions is not None else record.get("distributions")
    if not distributions:
        kept = qc_distributions(adata.obs, np.ones(adata.n_obs, dtype=bool))
        distributions = {metric: {**part, "before": None} for metric, part in kept.items()}
    thresholds = {"n_genes_by_counts": ("min_genes", record.get("min_genes")),
                  "pct_counts_mt": ("max_pct_mt", record.get("max_pct_mt"))}
    figure = new_figure(11, 3.2)
    axes = figure.subplots(1, len(QC_METRICS))
    before_n = record.get("cells_before")
    after_n = record.get("cells_after", adata.n_obs)
    # an input without counts (log-normalised): its "counts" are sums of log values, and are called so
    lognormalised = adata.uns.get(PROVENANCE_KEY, {}).get("input", {}).get("is_counts") is False
    for ax, (metric, title, log) in zip(axes, QC_METRICS, strict=True):
        ax.set_title(LOGNORMALISED_TITLES.get(metric, title) if lognormalised else title, fontsize=10)
        ax.spines[["top", "right"]].set_visible(False)
        part = distributions.get(metric)
        if part is None:
            ax.text(0.5, 0.5, "not recorded", ha="center", va="center", transform=ax.transAxes, color="grey")
            continue
        edges = np.asarray(part["edges"], dtype=float)
        if part.get("before") is not None:
            ax.stairs(np.asarray(part["before"]), edges, fill=True, color="#d0d0d0", label="before QC")
        ax.stairs(np.asarray(part["after"]), edges, fill=True, color="#1f77b4", alpha=0.85, label="after QC")
        if log and edges[-1] > 10 * edges[0]:  # a narrower range reads better on a plain axis
            _plain_log_axis(ax)
        name, value = thresholds.get(metric, (None, None))
        if value is not None and not log and float(value) > 2 * edges[-1]:
            # every cell far below the threshold (e.g. a log-normalised input's mitochondrial share): the axis
            # keeps to the data, so the bars stay visible, and the threshold is named at the edge
            ax.set_xlim(edges[0], edges[-1] * 1.05)
            ax.annotate(f"{name} = {float(value):g} →\n(every cell below)", xy=(1, 1), xycoords="axes fraction",
                        ha="right", va="top", fontsize=8, color="#d62728")
        elif value is not None:
            ax.axvline(float(value), color="#d62728", linestyle="--", linewidth=1)
            ax.annotate(f"{name} = {float(value):g}", xy=(float(value), 1), xycoords=("data", "axes fraction"),
                        xytext=(3, -2), textcoords="offset points", va="top", fontsize=8, color="#d62728")
        ax.set_ylabel("cells", fontsize=9)
        ax.tick_params(labelsize=8)
    handles, labels = axes[0].get_legend_handles_labels()
    figure.legend(handles, labels, loc="outside lower center", ncol=2, fontsize=8, frameon=False)
    if before_n is not None:
        figure.suptitle(f"QC: {int(before_n):,} cells before, {int(after_n):,} kept "
                        f"({int(before_n) - int(after_n):,} removed)", fontsize=11)
    else:
        figure.suptitle(f"QC: {int(after_n):,} cells kept (cells before QC not recorded)", fontsize=11)
    return figure


def _plain_log_axis(ax) -> None:
    """Log x axis with ticks at 1, 2, 5 × 10^k written as plain numbers (``200``, not ``2×10²``)."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    ax.set_xscale("log")
    ax.xaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:,.0f}"))
    ax.xaxis.set_minor_formatter(NullFormatter())


def _scatter(ax, coords: np.ndarray, colors: np.ndarray, order: np.ndarray) -> None:
    size = float(np.clip(9000 / max(len(coords), 1), 0.4, 25))
    ax.scatter(coords[order, 0], coords[order, 1], c=colors[order], s=size, linewidths=0, rasterized=True)
    ax.set_xticks([])
    ax.set_yticks([])
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)
    ax.set_xlabel("UMAP1", fontsize=8, loc="left")
    ax.set_ylabel("UMAP2", fontsize=8, loc="bottom")


def cluster_palette(adata, groupby: str = "leiden", *, store: bool = False) -> list[str]:
    """One colour per cluster of ``obs[groupby]``, in category order: ``uns[f'{groupby}_colors']`` when it fits,
    else :data:`PALETTE` (then written there with ``store``, so scanpy's plots colour the clusters alike)."""
    n = len(_categories(adata.obs[groupby]))
    stored = adata.uns.get(f"{groupby}_colors")
    if stored is not None and len(stored) == n:
        return [str(c) for c in stored]
    colors = [PALETTE[i % len(PALETTE)] for i in range(n)]
    if store:
        adata.uns[f"{groupby}_colors"] = np.array(colors, dtype=object)
    return colors


@plain_text
def umap_figure(adata, *, color: str = "cell_type", groupby: str = "leiden", basis: str = "X_umap"):
    """UMAP coloured by cell type (labels on the data, ``Unknown`` grey) and by cluster (numbers on the data,
    legend ``"3: NK cell"``).

    Reads ``obsm[basis]``, ``obs[color]``, ``obs[groupby]`` and ``uns[f'{color}_colors']`` and
    ``uns[f'{groupby}_colors']`` if set.
    """
    coords = np.asarray(adata.obsm[basis])[:, :2]
    types = adata.obs[color].astype(str).to_numpy() if color in adata.obs else np.full(adata.n_obs, "Unknown")
    clusters = adata.obs[groupby].astype(str).to_numpy()
    cluster_order = [str(c) for c in _categories(adata.obs[groupby])]
    type_colors = label_colors(adata, color) if color in adata.obs else run_palette(["Unknown"])
    # no-call cells underneath, the others in a fixed random order so no label always hides another
    rng = np.random.default_rng(0)
    order = rng.permutation(adata.n_obs)
    order = order[np.argsort([not is_no_call(t) for t in types[order]], kind="stable")]
    figure = new_figure(13, 5.6)
    left, right = figure.subplots(1, 2, width_ratios=[1, 1.25])
    _scatter(left, coords, np.array([type_colors[t] for t in types]), order)
    left.set_title(f"Cell type ({len(set(types))})", fontsize=11)
    cluster_colors = dict(zip(cluster_order, cluster_palette(adata, groupby), strict=True))
    _scatter(right, coords, np.array([cluster_colors[c] for c in clusters]), rng.permutation(adata.n_obs))
    right.set_title(f"Leiden cluster ({len(cluster_order)})", fontsize=11)
    first_type = pd.Series(types).groupby(clusters).agg(lambda s: s.value_counts().index[0])
    present = [c for c in cluster_order if (clusters == c).any()]
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], marker="o", linestyle="", markersize=6, color=cluster_colors[c]) for c in present]
    right.legend(handles, [cluster_label(c, first_type[c]) for c in present], loc="center left",
                 bbox_to_anchor=(1.0, 0.5), frameon=False, fontsize=7.5, ncol=1 if len(present) <= 24 else 2,
                 handletextpad=0.2)
    # labels last: their placement needs the final layout (each on its own cells, see umap_labels)
    place_labels(left, label_spots(coords, types, clusters), coords, types,
                 fontsize=8 if len(set(types)) <= 15 else 6.5)
    place_labels(right, label_spots(coords, clusters, clusters), coords, clusters, fontsize=8)
    return figure


def _categories(column: pd.Series) -> list:
    return list(column.cat.categories) if hasattr(column, "cat") else sorted(set(column.astype(str)))


def _marker_thresholds(adata) -> tuple[float, float]:
    """The marker filter the annotator's markers passed (``uns['cassia_batch']['marker_filter']``, written by
    ``cluster_markers`` from the run's settings), else the settings' defaults: the dot plot shows the same
    kind of genes the annotator was sent."""
    from cassia_helpers.settings import BY_NAME, default

    used = adata.uns.get(PROVENANCE_KEY, {}).get("marker_filter", {})
    return (float(used.get("max_pval_adj", default(BY_NAME["marker_max_pval_adj"]))),
            float(used.get("min_logfc", default(BY_NAME["marker_min_logfc"]))))


def _marker_genes(adata, *, genes, markers, groupby: str, order: list[str], per_cluster: int) -> dict[str, list]:
    """The genes shown for each cluster: given, from the ranked marker table, or the annotator's key markers."""
    if genes is not None:
        return {str(c): list(g)[:per_cluster] for c, g in genes.items()}
    if markers is not None and len(markers):
        table = markers.copy()
        max_pval_adj, min_logfc = _marker_thresholds(adata)
        if "pval_adj" in table:
            table = table[table["pval_adj"].fillna(1) <= max_pval_adj]
        if "logfoldchange" in table:
            table = table[table["logfoldchange"].fillna(-np.inf) >= min_logfc]
        if "rank" in table:
            table = table.sort_values("rank")
        table["cluster"] = table["cluster"].astype(str)
        return {c: table.loc[table["cluster"] == c, "gene"].astype(str).head(per_cluster).tolist() for c in order}
    annotation = adata.uns.get(PROVENANCE_KEY, {}).get("annotation", {}).get("clusters")
    if isinstance(annotation, pd.DataFrame) and "key_markers" in annotation:
        keyed = dict(zip(annotation["cluster"].astype(str), annotation["key_markers"].fillna(""), strict=True))
        return {c: [g.strip() for g in keyed.get(c, "").split(",") if g.strip()][:per_cluster] for c in order}
    return {}


@plain_text
def dotplot_figure(
    adata,
    *,
    markers: pd.DataFrame | None = None,
    genes: Mapping[str, Sequence[str]] | None = None,
    groupby: str = "leiden",
    key: str = "cell_type",
    n_genes: int = 3,
    max_genes: int = 45,
):
    """Marker dot plot: rows are clusters labelled ``"3: NK cell"``, columns their top marker genes.

    Dot size is the fraction of the cluster's cells expressing the gene (``X > 0``), colour the mean of
    ``X`` scaled to 0–1 per gene. Genes are ``genes[cluster]`` if given, else the best of ``markers``
    (:func:`cassia_helpers.rank_markers`, filtered by the run's ``marker_max_pval_adj`` and ``marker_min_logfc``
    as the annotator's markers were), else the annotator's
    key markers (``uns['cassia_batch']['annotation']['clusters']``); ``n_genes`` per cluster, fewer when
    ``n_genes × clusters`` exceeds ``max_genes``.
    """
    import scipy.sparse as sp

    order = [str(c) for c in _categories(adata.obs[groupby])]
    clusters = adata.obs[groupby].astype(str).to_numpy()
    order = [c for c in order if (clusters == c).any()]
    per_cluster = max(1, min(n_genes, max_genes // max(len(order), 1)))
    chosen = _marker_genes(adata, genes=genes, markers=markers, groupby=groupby, order=order,
                           per_cluster=per_cluster)
    columns, owner = [], []
    for cluster in order:
        for gene in chosen.get(cluster, []):
            if gene in adata.var_names and gene not in columns:
                columns.append(gene)
                owner.append(cluster)
    types = adata.obs[key].astype(str).to_numpy() if key in adata.obs else np.full(adata.n_obs, "Unknown")
    first_type = pd.Series(types).groupby(clusters).agg(lambda s: s.value_counts().index[0])
    colors = label_colors(adata, key) if key in adata.obs else run_palette(["Unknown"])
    figure = new_figure(3.6 + 0.27 * max(len(columns), 4), 1.3 + 0.3 * len(order))
    ax = figure.add_subplot()
    if not columns:
        ax.text(0.5, 0.5, "no marker genes to show", ha="center", va="center", transform=ax.transAxes)
        ax.set_axis_off()
        return figure
    matrix = adata.X[:, adata.var_names.get_indexer(columns)]
    matrix = matrix.toarray() if sp.issparse(matrix) else np.asarray(matrix)
    frame = pd.DataFrame(matrix, columns=columns)
    grouped = frame.groupby(clusters)
    means = grouped.mean().reindex(order)
    fractions = (frame > 0).groupby(clusters).mean().reindex(order)
    span = (means.max() - means.min()).replace(0, 1)
    scaled = (means - means.min()) / span
    xs, ys = np.meshgrid(np.arange(len(columns)), np.arange(len(order)))
    dots = ax.scatter(xs.ravel(), ys.ravel(), s=fractions.to_numpy().ravel() * 110, c=scaled.to_numpy().ravel(),
                      cmap="Reds", vmin=0, vmax=1, edgecolors="#777777", linewidths=0.3, zorder=3)
    for i, cluster in enumerate(order):  # shade alternate clusters' gene groups
        positions = [x for x, o in enumerate(owner) if o == cluster]
        if positions and i % 2:
            ax.axvspan(min(positions) - 0.5, max(positions) + 0.5, color="#ebebeb", zorder=0)
    ax.scatter(np.full(len(order), -1.0), np.arange(len(order)), marker="s", s=60,
               c=[colors.get(first_type[c], "#bfbfbf") for c in order], zorder=3)
    ax.set_xlim(-1.6, len(columns) - 0.5)
    ax.set_ylim(len(order) - 0.5, -0.5)
    ax.set_xticks(np.arange(len(columns)), columns, rotation=90, fontsize=8)
    ax.set_yticks(np.arange(len(order)), [cluster_label(c, first_type[c]) for c in order], fontsize=8)
    ax.tick_params(length=0)
    for side in ax.spines.values():
        side.set_visible(False)
    figure.colorbar(dots, ax=ax, shrink=min(0.6, 2.0 / max(len(order) * 0.3, 1)), aspect=10, pad=0.02,
                    label="mean expression\n(scaled per gene)")
    from matplotlib.lines import Line2D

    sizes = [0.25, 0.5, 0.75, 1.0]
    handles = [Line2D([], [], marker="o", linestyle="", color="#999999", markersize=np.sqrt(f * 110)) for f in sizes]
    figure.legend(handles, [f"{f:.0%}" for f in sizes], title="cells expressing", loc="outside right lower",
                  frameon=False, fontsize=7, title_fontsize=8)
    ax.set_title("Marker genes per cluster", fontsize=10, loc="left")
    return figure


@plain_text
def cluster_sizes_figure(adata, *, groupby: str = "leiden", key: str = "cell_type"):
    """Cells per cluster, one bar per cluster labelled ``"3: NK cell"`` in the cell type's colour."""
    clusters = adata.obs[groupby].astype(str)
    order = [c for c in map(str, _categories(adata.obs[groupby])) if (clusters == c).any()]
    sizes = clusters.value_counts().reindex(order)
    types = adata.obs[key].astype(str) if key in adata.obs else pd.Series("Unknown", index=adata.obs_names)
    first_type = types.groupby(clusters.to_numpy()).agg(lambda s: s.value_counts().index[0])
    colors = label_colors(adata, key) if key in adata.obs else run_palette(["Unknown"])
    figure = new_figure(6.5, 0.9 + 0.27 * len(order))
    ax = figure.add_subplot()
    positions = np.arange(len(order))
    ax.barh(positions, sizes.to_numpy(), color=[colors.get(first_type[c], "#bfbfbf") for c in order], height=0.75)
    total = max(int(sizes.sum()), 1)
    for y, n in zip(positions, sizes.to_numpy(), strict=True):
        ax.text(n, y, f" {int(n):,} ({100 * n / total:.1f}%)", va="center", fontsize=7.5)
    ax.set_yticks(positions, [cluster_label(c, first_type[c]) for c in order], fontsize=8)
    ax.set_ylim(len(order) - 0.5, -0.5)
    ax.set_xlim(0, sizes.max() * 1.3)
    ax.set_xlabel("cells", fontsize=9)
    ax.tick_params(axis="x", labelsize=8)
    ax.spines[["top", "right"]].set_visible(False)
    ax.set_title(f"Cluster sizes ({total:,} cells)", fontsize=10, loc="left")
    return figure


def figure_paths(paths: DatasetPaths) -> dict[str, Path]:
    """Where each figure goes in the dataset folder (``DatasetPaths.figure_pngs``)."""
    return dict(paths.figure_pngs)


def save_dataset_figures(
    adata,
    paths: DatasetPaths,
    *,
    markers: pd.DataFrame | None = None,
    groupby: str = "leiden",
    key: str = "cell_type",
) -> SavedFigures:
    """Draw and save every figure of the dataset: ``{dataset}_umap.png``, ``_qc.png``, ``_dotplot.png``,
    ``_cluster_sizes.png`` (see :func:`figure_paths`).

    Sets the run's cell-type colours first (``uns[f'{key}_colors']``, see :func:`set_colors`), and the
    clusters' (``uns[f'{groupby}_colors']``, see :func:`cluster_palette`) when not set.
    Returns the paths; in a notebook the result displays the four images.
    """
    if key in adata.obs:
        set_colors(adata, key)
    if groupby in adata.obs:
        cluster_palette(adata, groupby, store=True)
    drawers = {
        "umap": lambda: umap_figure(adata, color=key, groupby=groupby),
        "qc": lambda: qc_figure(adata),
        "dotplot": lambda: dotplot_figure(adata, markers=markers, groupby=groupby, key=key),
        "cluster_sizes": lambda: cluster_sizes_figure(adata, groupby=groupby, key=key),
    }
    saved = SavedFigures()
    for name, path in figure_paths(paths).items():
        saved[name] = save_figure(drawers[name](), path)
    return saved
