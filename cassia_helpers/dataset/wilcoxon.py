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

import numba
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
    x = sp.csc_matrix(x, copy=sp.issparse(x) and x.format == "csc")  # a copy of ours: zeros are dropped
    if not np.issubdtype(x.dtype, np.floating):
        x = x.astype(np.float64)
    x.eliminate_zeros()  # a stored zero is a zero: it shares the zeros' rank
    n_cells, n_genes = x.shape
    codes = np.asarray(codes, dtype=np.int64)
    sizes = np.bincount(codes, minlength=n_groups).astype(np.float64)[:, None]
    rest = n_cells - sizes
    rank_sums, stored_in, sums, tied, negative = _stored_rank_sums(
        x.indptr.astype(np.int64), x.indices.astype(np.int64), x.data, codes, n_groups, n_cells)
    # every zero of a gene shares one rank, after the gene's negative values and before its positive ones
    stored = stored_in.sum(axis=0)
    zeros = n_cells - stored
    rank_sums += (sizes - stored_in) * (negative + (zeros + 1) / 2)

    correction = 1.0
    if tie_correct and n_cells >= 2:
        correction = 1.0 - (tied + zeros**3 - zeros) / (float(n_cells) ** 3 - n_cells)
    with np.errstate(divide="ignore", invalid="ignore"):
        spread = np.sqrt(correction * sizes * rest * (n_cells + 1) / 12.0)
        scores = (rank_sums - sizes * (n_cells + 1) / 2.0) / spread
    scores[~np.isfinite(scores)] = 0
    pvals = 2 * stats.norm.sf(np.abs(scores))

    total = sums.sum(axis=0)
    with np.errstate(divide="ignore", invalid="ignore"):
        mean_in, mean_rest = sums / sizes, (total - sums) / rest
        logfoldchanges = np.log2((np.expm1(mean_in) + 1e-9) / (np.expm1(mean_rest) + 1e-9))
        pts, pts_rest = stored_in / sizes, (stored - stored_in) / rest
    return RankSums(scores=scores, pvals=pvals, logfoldchanges=logfoldchanges, pts=pts, pts_rest=pts_rest)


@numba.njit(parallel=True, cache=True)
def _stored_rank_sums(indptr, indices, data, codes, n_groups, n_cells):
    """Per group × gene of a CSC matrix: the rank sum, count and sum of the stored non-zero values, ranked
    within their gene with the gene's zeros counted in (ties share their average rank); per gene, the
    tie term sum(t³ - t) of the stored values and the number of negative values.

    Genes are independent, so the loop over them runs on all threads and gives the same result on every
    run: each gene's sums are written by one thread, in the sorted order of its values.
    """
    n_genes = len(indptr) - 1
    rank_sums = np.zeros((n_groups, n_genes))
    stored_in = np.zeros((n_groups, n_genes))
    sums = np.zeros((n_groups, n_genes))
    tied = np.zeros(n_genes)
    negative = np.zeros(n_genes)
    for gene in numba.prange(n_genes):
        lo, hi = indptr[gene], indptr[gene + 1]
        values = data[lo:hi]
        order = np.argsort(values)
        zeros = n_cells - (hi - lo)
        first = 0
        while first < hi - lo:
            value = values[order[first]]
            last = first
            while last + 1 < hi - lo and values[order[last + 1]] == value:
                last += 1
            count = float(last - first + 1)
            rank = first + (count + 1) / 2 + (zeros if value > 0 else 0)
            if value < 0:
                negative[gene] += count
            tied[gene] += count**3 - count
            for k in range(first, last + 1):
                row = indices[lo + order[k]]
                group = codes[row]
                rank_sums[group, gene] += rank
                stored_in[group, gene] += 1
                sums[group, gene] += values[order[k]]
            first = last + 1
    return rank_sums, stored_in, sums, tied, negative
