"""The Wilcoxon rank-sum test of every group against the rest, for all groups at once.

The same statistics as ``sc.tl.rank_genes_groups(method="wilcoxon", reference="rest", pts=True)``
(scores, p-values, log fold changes, detection fractions), computed on the sparse matrix directly: within a
gene every zero has the same rank, so only the stored values are sorted (one sort per gene, all groups
at once) and each group's rank sum is its stored values' ranks plus its zeros times the zeros' shared rank.
scanpy densifies the cells × genes block, ranks every value, and then goes over the block once per group
for the rank sums and twice more per group for the means and detection fractions of the group and the rest.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp
from scipy import stats


@dataclass(frozen=True)
class RankSums:
    """Per group × gene (rows in the order of the group codes): the test and the descriptive statistics."""

    scores: np.ndarray  # the z-score of the rank sum (0 where undefined, as scanpy sets it)
    pvals: np.ndarray  # two-sided, normal approximation
    logfoldchanges: np.ndarray  # log2 of the ratio of expm1(mean) in the group and in the rest
    pts: np.ndarray  # fraction of the group's cells where the gene is non-zero
    pts_rest: np.ndarray  # the same in the rest


def rank_sum_test(x, codes: np.ndarray, n_groups: int, *, tie_correct: bool = False) -> RankSums:
    """Each group of cells against all other cells, every gene (column) of ``x``.

    Parameters
    ----------
    x
        Cells × genes, sparse or dense (log-normalised expression).
    codes
        The group (``0 … n_groups - 1``) of every row of ``x``.
    n_groups
        How many groups; a group with no cell, or with every cell, gets scores of 0.
    tie_correct
        Scale the variance by the tie correction, as scanpy's ``tie_correct=True``; scanpy's default
        (and this one's) is not to.
    """
    x = sp.csc_matrix(x, dtype=np.float64, copy=True)
    x.eliminate_zeros()
    x.sort_indices()
    n_cells, n_genes = x.shape
    codes = np.asarray(codes, dtype=np.int64)
    sizes = np.bincount(codes, minlength=n_groups).astype(np.float64)[:, None]
    rest = n_cells - sizes

    column = np.repeat(np.arange(n_genes), np.diff(x.indptr))
    order = np.lexsort((x.data, column))
    values, column = x.data[order], column[order]
    flat = codes[x.indices[order]] * n_genes + column  # (group, gene) of every stored value

    # average 1-based ranks of the stored values among the stored values of their gene, ties shared
    position = np.arange(len(values)) - x.indptr[column]
    first = np.ones(len(values), dtype=bool)
    first[1:] = (values[1:] != values[:-1]) | (column[1:] != column[:-1])
    tie = np.cumsum(first) - 1
    starts = np.flatnonzero(first)
    counts = np.diff(np.append(starts, len(values))).astype(np.float64)
    ranks = (position[starts] + (counts + 1) / 2)[tie]
    # the zeros of a gene rank after its negative values and before its positive ones
    stored = np.diff(x.indptr).astype(np.float64)
    zeros = n_cells - stored
    negative = np.bincount(column[values < 0], minlength=n_genes)
    ranks += np.where(values > 0, zeros[column], 0.0)
    zero_rank = negative + (zeros + 1) / 2

    shape = (n_groups, n_genes)
    stored_in = np.bincount(flat, minlength=n_groups * n_genes).reshape(shape).astype(np.float64)
    rank_sums = np.bincount(flat, weights=ranks, minlength=n_groups * n_genes).reshape(shape)
    rank_sums += (sizes - stored_in) * zero_rank

    correction = 1.0
    if tie_correct and n_cells >= 2:
        tied = np.bincount(column[starts], weights=counts**3 - counts, minlength=n_genes) + zeros**3 - zeros
        correction = 1.0 - tied / (float(n_cells) ** 3 - n_cells)
    with np.errstate(divide="ignore", invalid="ignore"):
        spread = np.sqrt(correction * sizes * rest * (n_cells + 1) / 12.0)
        scores = (rank_sums - sizes * (n_cells + 1) / 2.0) / spread
    scores[~np.isfinite(scores)] = 0
    pvals = 2 * stats.norm.sf(np.abs(scores))

    sums = np.bincount(flat, weights=values, minlength=n_groups * n_genes).reshape(shape)
    total = sums.sum(axis=0)
    with np.errstate(divide="ignore", invalid="ignore"):
        mean_in, mean_rest = sums / sizes, (total - sums) / rest
        logfoldchanges = np.log2((np.expm1(mean_in) + 1e-9) / (np.expm1(mean_rest) + 1e-9))
        pts, pts_rest = stored_in / sizes, (stored - stored_in) / rest
    return RankSums(scores=scores, pvals=pvals, logfoldchanges=logfoldchanges, pts=pts, pts_rest=pts_rest)
