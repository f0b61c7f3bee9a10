"""The vectorised rank-sum test gives scanpy's wilcoxon statistics, gene for gene and group for group."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scanpy as sc
import scipy.sparse as sp

from cassia_helpers.dataset.wilcoxon import rank_sum_test


def _expression(seed: int, *, negative: bool = False) -> tuple[sp.csr_matrix, np.ndarray]:
    """Log-normalised-looking counts with many zeros and many tied values, in 5 unequal groups."""
    rng = np.random.default_rng(seed)
    n_cells, n_genes = 300, 60
    codes = rng.choice(5, size=n_cells, p=[0.4, 0.25, 0.2, 0.1, 0.05])
    rate = rng.gamma(0.5, 1.0, size=(5, n_genes)) * rng.uniform(0.2, 3, size=n_genes)
    counts = rng.poisson(rate[codes]).astype(np.float64)
    x = np.log1p(counts)  # small integer counts: ties everywhere
    if negative:  # scaled data has negative values: the zeros no longer rank first
        x[:, ::3] -= 0.5 * (counts[:, ::3] == 1)
    x[:, 7] = 0.0  # a gene nobody expresses
    return sp.csr_matrix(x), codes


def _scanpy(x, codes: np.ndarray, *, tie_correct: bool) -> dict[str, pd.DataFrame]:
    labels = pd.Categorical(codes.astype(str), categories=[str(c) for c in range(codes.max() + 1)])
    adata = ad.AnnData(X=x, obs=pd.DataFrame({"group": labels}, index=[f"c{i}" for i in range(x.shape[0])]))
    sc.tl.rank_genes_groups(adata, "group", method="wilcoxon", reference="rest", pts=True, use_raw=False,
                            tie_correct=tie_correct, n_genes=x.shape[1])
    tables = {}
    for group in labels.categories:
        table = sc.get.rank_genes_groups_df(adata, group=group).set_index("names")
        tables[group] = table.loc[adata.var_names]  # back in gene order
    return tables


@pytest.mark.parametrize(("tie_correct", "negative", "dense"),
                         [(False, False, False), (True, False, False), (True, True, False), (False, True, True)])
def test_rank_sum_test_equals_scanpy_wilcoxon(tie_correct, negative, dense):
    x, codes = _expression(3, negative=negative)
    ours = rank_sum_test(x.toarray() if dense else x, codes, 5, tie_correct=tie_correct)
    expected = _scanpy(x, codes, tie_correct=tie_correct)
    for group, table in expected.items():
        g = int(group)
        # scanpy stores scores and fold changes as float32
        np.testing.assert_allclose(ours.scores[g].astype(np.float32), table["scores"], rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(ours.pvals[g], table["pvals"], rtol=1e-6, atol=1e-300)
        np.testing.assert_allclose(ours.logfoldchanges[g].astype(np.float32), table["logfoldchanges"],
                                   rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(ours.pts[g], table["pct_nz_group"], rtol=1e-12)
        np.testing.assert_allclose(ours.pts_rest[g], table["pct_nz_reference"], rtol=1e-12)
        assert ours.scores[g, 7] == 0 and ours.pvals[g, 7] == 1  # the unexpressed gene, as scanpy reports it
    # the test is not trivially satisfied: groups differ, and some genes separate them strongly
    assert np.abs(ours.scores).max() > 5 and (ours.pvals < 1e-6).any()


def test_rank_sum_test_rank_sums_by_hand():
    """A single gene, ties across zero and non-zero values: the z-score from the rank sum written out."""
    x = np.array([[0.0], [1.0], [1.0], [0.0], [2.0], [0.0]])
    codes = np.array([0, 0, 0, 1, 1, 1])
    # ranks: zeros (3 of them) share 2, the two 1.0 share 4.5, 2.0 is 6; group 0 holds 2 + 4.5 + 4.5 = 11
    expected = (11 - 3 * 7 / 2) / np.sqrt(3 * 3 * 7 / 12)
    result = rank_sum_test(x, codes, 2)
    np.testing.assert_allclose(result.scores[:, 0], [expected, -expected])
    np.testing.assert_allclose(result.pts[:, 0], [2 / 3, 1 / 3])
    # a zero stored in a sparse matrix is a zero like the others
    stored = sp.csc_matrix((x[:, 0] + 1, (np.arange(6), np.zeros(6, int))), shape=(6, 1))
    stored.data -= 1
    assert (stored.data == 0).sum() == 3
    again = rank_sum_test(stored, codes, 2)
    np.testing.assert_allclose(again.scores[:, 0], [expected, -expected])
    np.testing.assert_allclose(again.pts[:, 0], [2 / 3, 1 / 3])


@pytest.mark.parametrize("method", ["wilcoxon", "t-test"])
def test_rank_markers_equals_scanpy_for_its_methods(method):
    """rank_markers on every cell and gene: scanpy's statistics, whichever test computes them."""
    from cassia_helpers.dataset.markers import rank_markers

    x, codes = _expression(11)
    labels = pd.Categorical(codes.astype(str))
    adata = ad.AnnData(X=x, obs=pd.DataFrame({"leiden": labels}, index=[f"c{i}" for i in range(x.shape[0])]))
    table = rank_markers(adata, groupby="leiden", method=method, n_genes=None, max_cells_per_cluster=None,
                         min_pct=0, gene_chunk=25, key_added=None)
    expected = adata.copy()
    sc.tl.rank_genes_groups(expected, "leiden", method=method, reference="rest", pts=True, use_raw=False)
    for group in labels.categories:
        ours = table[table["cluster"] == group].set_index("gene")
        theirs = sc.get.rank_genes_groups_df(expected, group=group).set_index("names").loc[ours.index]
        np.testing.assert_allclose(ours["score"], theirs["scores"], rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(ours["pval"], theirs["pvals"], rtol=1e-5, atol=1e-300)
        np.testing.assert_allclose(ours["pct_out_cluster"], theirs["pct_nz_reference"], rtol=1e-12)
        assert ours["score"].is_monotonic_decreasing
