"""Cell-level support for the reference's calls: which share of a cluster's cells carry each option's signature.

A cluster-level contrast depends on where the cluster boundaries fall (a naive CD4+ T population split in
two clusters no longer stands out from its own other half), so the reference decides between siblings —
and between lineages — on the cells themselves. For a set of options (each a list of ``(order, gene)``
markers and the genes it is defined not to express), every cell of the cluster gets one score per option::

    s(cell, option) = sum_g w_g * z(cell, g) / (sum_g w_g + SHRINK) - mean_a max(z(cell, a), 0)

where ``z`` is the gene's expression standardised over a *population* of cells (the whole dataset for
lineages; the cells of the clusters of the same lineage for subtypes), clipped to ``[-Z_CLIP, Z_CLIP]``,
``w_g = 1 / (1 + order / 10)`` (the most specific markers weigh most) and the second term covers the
absent markers. A cell carries the option with the highest score when that score is above the
population's average (``> 0``); the cluster's support for an option is the fraction of its cells that carry
it. The population is the same whatever the resolution, so a cell's assignment does not depend on how
the clusters are cut.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

#: standardised values are clipped to this (one rare gene does not decide a cell alone)
Z_CLIP = 3.0
#: floor of a gene's standard deviation (genes almost never detected stay near 0)
MIN_SD = 0.1
#: weight of the virtual unexpressed marker in each option's mean (few markers: more caution)
SHRINK = 1.0
ORDER_SCALE = 10.0
#: an option is taken when at least this share of the cells carrying some option's signature carry it
CELL_SUPPORT = 0.6
#: a second option carried by at least this share of those cells makes the cluster a mixture
MIX_SHARE = 0.25
#: the cells decide only when at least this fraction of the cluster's cells carry some signature
MIN_COVERAGE = 0.25
#: a cluster's cells x genes are kept dense up to this many values (about 200 MB), else read sparse each time
DENSE_BLOCK = 25_000_000


@dataclass
class Support:
    """The outcome of one comparison on one cluster."""

    fractions: dict[str, float]  # option -> fraction of the cluster's cells carrying it
    assigned: float  # fraction of the cluster's cells carrying any option
    n_cells: int
    carriers: dict[str, np.ndarray] = field(default_factory=dict)  # option -> rows of the cells carrying it

    def ranked(self) -> list[tuple[str, float]]:
        """Options by support, best first."""
        return sorted(self.fractions.items(), key=lambda kv: (-kv[1], kv[0]))

    def share(self, name: str) -> float:
        """An option's fraction of the cells that carry some option (0 when none does)."""
        return self.fractions.get(name, 0.0) / self.assigned if self.assigned > 0 else 0.0

    def minority(self, taken: str) -> np.ndarray | None:
        """The rows of the cells carrying the option after ``taken``, when at least :data:`MIX_SHARE` of the
        cells carrying some option carry it."""
        runners = [name for name, _ in self.ranked() if name != taken]
        if not runners or self.share(runners[0]) < MIX_SHARE:
            return None
        return self.carriers[runners[0]]


@dataclass
class CellContext:
    """What a call needs to weigh one cluster's cells: the dataset's :class:`CellSupport`, the cluster and
    the clusters of its lineage (``None``: the cells are not compared, the cluster-level rule decides)."""

    support: CellSupport
    cluster: str
    population: tuple[str, ...] | None


class CellSupport:
    """Per-cell signature scores of one dataset (log-normalised expression, clusters in ``obs[groupby]``)."""

    def __init__(self, adata: Any, genes: list[str], *, groupby: str, use_raw: bool = False,
                 layer: str | None = None) -> None:
        import scipy.sparse as sp

        from cassia_helpers.dataset.evidence import matrix_of

        x, names = matrix_of(adata, use_raw=use_raw, layer=layer)
        index = {g: i for i, g in enumerate(names)}
        self.genes = [g for g in dict.fromkeys(genes) if g in index]
        self._col = {g: i for i, g in enumerate(self.genes)}
        cols = np.array([index[g] for g in self.genes], dtype=int)
        sub = x[:, cols] if len(cols) else np.zeros((adata.n_obs, 0), dtype=np.float32)
        self._x = sp.csr_matrix(sub, dtype=np.float64) if not sp.issparse(sub) else sub.tocsr().astype(np.float64)
        self.labels = adata.obs[groupby].astype(str).to_numpy()
        self._stats: dict[tuple[str, ...], tuple[np.ndarray, np.ndarray]] = {}
        # each cluster's rows, once: a call looks clusters up about a thousand times on a large dataset
        codes, clusters = pd.factorize(self.labels)
        order = np.argsort(codes, kind="stable")
        bounds = np.searchsorted(codes[order], np.arange(len(clusters) + 1))
        self._rows = {str(name): order[bounds[i]:bounds[i + 1]] for i, name in enumerate(clusters)}
        self._block: tuple[str, np.ndarray] | None = None

    def cells(self, clusters: list[str] | tuple[str, ...]) -> np.ndarray:
        """Row indices of the cells of ``clusters``, in increasing order."""
        parts = [self._rows[c] for c in dict.fromkeys(map(str, clusters)) if c in self._rows]
        return np.sort(np.concatenate(parts)) if parts else np.zeros(0, dtype=np.int64)

    def _population(self, population: tuple[str, ...] | None) -> tuple[np.ndarray, np.ndarray]:
        """Mean and standard deviation of every gene over the population's cells (``None``: all cells)."""
        key = population or ("*",)
        if key not in self._stats:
            x = self._x if population is None else self._x[self.cells(population)]
            n = max(x.shape[0], 1)
            mean = np.asarray(x.sum(axis=0)).ravel() / n
            sq = np.asarray(x.multiply(x).sum(axis=0)).ravel() / n
            sd = np.sqrt(np.maximum(sq - mean**2, 0.0))
            self._stats[key] = (mean, np.maximum(sd, MIN_SD))
        return self._stats[key]

    def measured(self, gene: str) -> bool:
        return gene in self._col

    def compare(self, cluster: str, options: dict[str, tuple[list[tuple[int, str]], list[str]]], *,
                population: tuple[str, ...] | None = None, threshold: float = 0.0) -> Support:
        """The fraction of ``cluster``'s cells that carry each option's signature (see the module docstring).

        ``options`` maps a name to its ``(order, gene)`` markers and its absent genes (data gene names);
        genes the data do not measure are skipped, and an option with no measured marker is left out. A cell
        carries an option when its score is the highest and above ``threshold``.
        """
        rows = self.cells([cluster])
        block = self._cluster_block(cluster, rows)
        mean, sd = self._population(tuple(sorted(population)) if population is not None else None)
        names, scores = [], []
        for name, (markers, absent) in options.items():
            kept = [(o, g) for o, g in markers if g in self._col]
            if not kept:
                continue
            cols = [self._col[g] for _, g in kept]
            w = np.array([1.0 / (1.0 + o / ORDER_SCALE) for o, _ in kept])
            z = self._z(block, rows, cols, mean, sd)
            score = z @ w / (w.sum() + SHRINK)
            absent_cols = [self._col[g] for g in absent if g in self._col]
            if absent_cols:
                score = score - np.maximum(self._z(block, rows, absent_cols, mean, sd), 0.0).mean(axis=1)
            names.append(name)
            scores.append(score)
        if not names or len(rows) == 0:
            return Support({}, 0.0, len(rows))
        stacked = np.vstack(scores)  # options x cells
        best = stacked.argmax(axis=0)
        carried = stacked.max(axis=0) > threshold
        fractions = {name: float(np.mean(carried & (best == i))) for i, name in enumerate(names)}
        carriers = {name: rows[carried & (best == i)] for i, name in enumerate(names)}
        return Support(fractions, float(carried.mean()), len(rows), carriers)

    def _cluster_block(self, cluster: str, rows: np.ndarray) -> np.ndarray | None:
        """The cluster's cells x every gene, dense, kept for the next comparisons of the same cluster (a call
        compares one cluster several times in a row); ``None`` above :data:`DENSE_BLOCK` values."""
        if self._block is not None and self._block[0] == cluster:
            return self._block[1]
        self._block = None
        if len(rows) * len(self.genes) > DENSE_BLOCK:
            return None
        self._block = (cluster, self._x[rows].toarray())
        return self._block[1]

    def _z(self, block: np.ndarray | None, rows: np.ndarray, cols: list[int], mean: np.ndarray,
           sd: np.ndarray) -> np.ndarray:
        block = block[:, cols] if block is not None else self._x[rows][:, cols].toarray()
        return np.clip((block - mean[cols]) / sd[cols], -Z_CLIP, Z_CLIP)


def pick(support: Support) -> tuple[str | None, float, list[tuple[str, float]]] | None:
    """The cells' verdict on one comparison: ``(option, its share, [])`` when one option is carried by at least
    :data:`CELL_SUPPORT` of the cells carrying any (a lone option: the share of all the cluster's cells, which
    may be below it), ``(None, 0, split)`` when two or more are each carried by at least :data:`MIX_SHARE`
    (``split``: names and shares, else empty), ``None`` when fewer than :data:`MIN_COVERAGE` of the cells
    carry any option."""
    ranked = support.ranked()
    if support.assigned < MIN_COVERAGE or not ranked:
        return None
    first = ranked[0][0]
    if len(ranked) == 1:
        return first, round(support.fractions[first], 2), []
    if support.share(first) >= CELL_SUPPORT:
        return first, round(support.share(first), 2), []
    split = [(name, round(support.share(name), 2)) for name, _ in ranked if support.share(name) >= MIX_SHARE]
    return None, 0.0, split if len(split) >= 2 else []
