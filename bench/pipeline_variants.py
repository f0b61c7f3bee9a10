#!/usr/bin/env python
"""Measured alternatives for the expensive steps of our pipeline at scale (one process, one dataset).

Runs our ``read_dataset → qc → normalize → reduce_dimensions`` once (each step timed, HVG and PCA
also timed on their own), then times alternatives on the same data, each with a quality check, so a
proposed change can be judged on speed AND result:

* QC metrics: ``sc.pp.calculate_qc_metrics`` (what ``pp.qc`` calls) vs the three numbers ``pp.qc``
  uses computed directly from the CSR arrays (genes per cell = ``diff(indptr)``, totals = row sums,
  mito share = row sums over the MT columns); check: identical kept-cell mask.
* kNN graph (``sc.pp.neighbors`` on ``X_pca``): scanpy's default (PyNNDescent with n_trees =
  min(64, 5 + sqrt(n)/20), n_iters = max(5, log2 n)), the same without a random_state, a cheaper
  PyNNDescent (``--nnd-trees``, ``--nnd-iters``), 30 instead of 50 PCs, and the default once more —
  the first call in a process includes numba's JIT compilation of pynndescent, the last one does not;
  checks: recall@15 of the neighbour lists against exact
  neighbours for 2,000 random cells, leiden clusters and ARI against the known cell types.
* UMAP (``sc.tl.umap`` on the default graph): default (200 epochs above 10k cells, spectral init) vs
  ``maxiter=100`` vs init from the first two PCs (``init_pos`` = an obsm key); check: share of each
  cell's 15 nearest UMAP neighbours that are among its 15 graph neighbours (2,000 random cells) and
  the cell-type silhouette on the embedding (20,000-cell sample).
* marker ranking (as ``rank_markers`` does it: ≤1000 cells per cluster): ``rank_genes_groups`` with
  ``pts=True`` vs ``pts=False`` and the ``rank_genes_groups_df`` conversion on its own.
* memory of ``layers['counts']`` (a full copy of X) vs sharing it with the input file.

Every row gives wall s and CPU s (process user+sys during the call; when the machine is shared with
other jobs compare CPU s). Thread counts as in ``pipeline_vs_tutorial.py``.

Usage::

    python bench/pipeline_variants.py --cells 100000
    python bench/pipeline_variants.py --cells 1000000 --skip umap
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import time
from pathlib import Path

import _common


def _cpu() -> float:
    u = resource.getrusage(resource.RUSAGE_SELF)
    return u.ru_utime + u.ru_stime


class Timer:
    def __init__(self):
        self.rows: list[list] = []

    def __call__(self, section: str, name: str, func, *args, **kwargs):
        start, cpu0 = time.perf_counter(), _cpu()
        result = func(*args, **kwargs)
        wall, cpu = time.perf_counter() - start, _cpu() - cpu0
        print(f"  {section:10s} {name:45s} {wall:8.2f} s  cpu {cpu:8.2f} s  load {os.getloadavg()[0]:.1f}",
              flush=True)
        self.last = (wall, cpu)
        return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=_common.HelpFormatter)
    parser.add_argument("--cells", type=int, default=100_000)
    parser.add_argument("--out", type=Path, default=_common.DEFAULT_DATA)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--nnd-trees", type=int, default=8)
    parser.add_argument("--nnd-iters", type=int, default=6)
    parser.add_argument("--skip", nargs="*", default=[], choices=["qc", "neighbors", "umap", "markers"])
    args = parser.parse_args(argv)
    threads = _common.set_threads(args.threads or None)
    _common.ensure_path()

    import numpy as np
    import scale_data
    import scanpy as sc
    import scipy.sparse as sp
    from sklearn.metrics import adjusted_rand_score, silhouette_score

    import cassia_helpers as ch

    sc.settings.n_jobs = threads
    sc.settings.verbosity = 0
    _common.print_machine()
    path = scale_data.dataset_path(args.cells, out=args.out, seed=args.seed)
    t = Timer()
    results: list[list] = []

    def row(section, name, extra=""):
        results.append([section, name, t.last[0], t.last[1], extra])

    adata = t("pipeline", "read_dataset", ch.read_dataset, path)
    row("pipeline", "read_dataset")
    raw_counts = adata.X.copy() if "qc" not in args.skip else None
    var_names_in = adata.var_names.copy()
    t("pipeline", "pp.qc", ch.pp.qc, adata)
    row("pipeline", "pp.qc (calculate_qc_metrics + filters + counts copy)", f"{adata.n_obs:,} cells kept")
    counts_bytes = sum(a.nbytes for a in (adata.layers["counts"].data, adata.layers["counts"].indices,
                                          adata.layers["counts"].indptr)) if "counts" in adata.layers else 0
    t("pipeline", "pp.normalize", ch.pp.normalize, adata)
    row("pipeline", "pp.normalize")

    # HVG and PCA on their own (same calls as reduce_dimensions), then the real function
    probe = adata.copy()
    t("pipeline", "  highly_variable_genes(seurat) alone", sc.pp.highly_variable_genes, probe,
      n_top_genes=min(2000, probe.n_vars), flavor="seurat")
    row("pipeline", "  highly_variable_genes alone")
    t("pipeline", "  pca(covariance_eigh) alone", sc.pp.pca, probe, n_comps=50, mask_var="highly_variable",
      svd_solver="covariance_eigh", random_state=0)
    row("pipeline", "  pca(covariance_eigh, sparse) alone")
    ref_var = probe.uns["pca"]["variance"].copy()
    t("pipeline", "  pca(arpack, sparse, implicit centring)", sc.pp.pca, probe, n_comps=50,
      mask_var="highly_variable", svd_solver="arpack", random_state=0)
    row("pipeline", "  pca(arpack, sparse) alone")
    _, ev = t("pipeline", "  pca: gram of dense row chunks + eigh", chunked_gram_pca, probe, 50)
    row("pipeline", "  pca: X^T X over dense 20k-row chunks (BLAS) + eigh",
        f"max rel. diff of the 50 variances vs covariance_eigh {np.max(np.abs(ev - ref_var) / ref_var):.1e}")
    del probe
    t("pipeline", "pp.reduce_dimensions", ch.pp.reduce_dimensions, adata)
    row("pipeline", "pp.reduce_dimensions (HVG + PCA)")
    types = adata.obs["cell_type"].astype(str).to_numpy()
    rng = np.random.default_rng(0)
    sample = rng.choice(adata.n_obs, size=min(2000, adata.n_obs), replace=False)

    # ---------------------------------------------------------------- QC metrics
    if "qc" not in args.skip:
        import anndata as ad

        qa = ad.AnnData(raw_counts)
        qa.var_names = var_names_in
        qa.var["mt"] = qa.var_names.str.upper().str.startswith("MT-")
        t("qc", "calculate_qc_metrics", sc.pp.calculate_qc_metrics, qa, qc_vars=["mt"], percent_top=None,
          log1p=False, inplace=True)
        row("qc", "sc.pp.calculate_qc_metrics (as pp.qc)")
        keep_ref = (qa.obs["n_genes_by_counts"].to_numpy() >= 200) & (qa.obs["pct_counts_mt"].to_numpy() <= 20)

        def lean(x, mt):
            x = sp.csr_matrix(x)
            n_genes = np.diff(x.indptr)
            total = np.asarray(x.sum(axis=1)).ravel()
            mt_total = np.asarray(x[:, np.flatnonzero(mt)].sum(axis=1)).ravel()
            pct = np.divide(mt_total * 100, total, out=np.zeros_like(total), where=total > 0)
            return (n_genes >= 200) & (pct <= 20)

        keep = t("qc", "lean CSR metrics", lean, raw_counts, qa.var["mt"].to_numpy())
        row("qc", "CSR arrays: diff(indptr), row sums, MT row sums",
            f"same kept cells: {bool((keep == keep_ref).all())}")
        del qa, raw_counts

    # ---------------------------------------------------------------- neighbours
    if "neighbors" not in args.skip:
        from sklearn.neighbors import NearestNeighbors

        x50 = adata.obsm["X_pca"]
        exact = {}
        for npc in (50, 30):
            nn = NearestNeighbors(n_neighbors=15).fit(x50[:, :npc])
            exact[npc] = nn.kneighbors(x50[sample, :npc], return_distance=False)

        def recall(dist, npc):
            d = dist.tocsr()
            hits = 0
            for i, c in enumerate(sample):
                row_idx = d.indices[d.indptr[c]:d.indptr[c + 1]]
                got = set(row_idx.tolist()) | {c}
                hits += len(got & set(exact[npc][i].tolist()))
            return hits / (len(sample) * 15)

        from pynndescent import PyNNDescentTransformer

        n = adata.n_obs
        default_trees = min(64, 5 + round(n ** 0.5 / 20.0))
        default_iters = max(5, round(np.log2(n)))
        variants = [
            (f"default pynndescent (trees {default_trees}, iters {default_iters}), 50 PCs", {}, 50),
            (f"pynndescent default trees/iters, n_jobs={threads}, random_state=None, 50 PCs",
             {"transformer": PyNNDescentTransformer(n_neighbors=15, n_jobs=threads, metric="euclidean",
                                                    n_trees=default_trees, n_iters=default_iters,
                                                    random_state=None)}, 50),
            (f"pynndescent trees {args.nnd_trees}, iters {args.nnd_iters}, 50 PCs",
             {"transformer": PyNNDescentTransformer(n_neighbors=15, n_jobs=threads, metric="euclidean",
                                                    n_trees=args.nnd_trees, n_iters=args.nnd_iters,
                                                    random_state=0)}, 50),
            ("default pynndescent, 30 PCs", {"n_pcs": 30}, 30),
            ("default pynndescent, 50 PCs, again (numba code now compiled)", {}, 50),
        ]
        for name, kwargs, npc in variants:
            g = _graph_only(adata)
            t("neighbors", name, sc.pp.neighbors, g, n_neighbors=15, use_rep="X_pca", random_state=0, **kwargs)
            w, c = t.last
            r = recall(g.obsp["distances"], npc)
            sc.tl.leiden(g, flavor="igraph", n_iterations=2, directed=False, random_state=0)
            ari = adjusted_rand_score(types, g.obs["leiden"])
            t.last = (w, c)
            row("neighbors", name, f"recall@15 {r:.3f}; leiden {g.obs['leiden'].nunique()} cl., ARI {ari:.3f}")
            if not kwargs and "base_graph" not in locals():
                base_graph = g

    # ---------------------------------------------------------------- UMAP
    if "umap" not in args.skip and "neighbors" not in args.skip:
        from sklearn.neighbors import NearestNeighbors

        sub = rng.choice(adata.n_obs, size=min(20000, adata.n_obs), replace=False)
        d = base_graph.obsp["distances"].tocsr()
        base_graph.obsm["X_pca2"] = (base_graph.obsm["X_pca"][:, :2] / np.abs(base_graph.obsm["X_pca"][:, :2]).max()
                                     * 10).astype(np.float32)

        def quality(emb):
            nn = NearestNeighbors(n_neighbors=16).fit(emb)
            idx = nn.kneighbors(emb[sample], return_distance=False)[:, 1:]
            hits = 0
            for i, c in enumerate(sample):
                hits += len(set(idx[i].tolist()) & set(d.indices[d.indptr[c]:d.indptr[c + 1]].tolist()))
            sil = silhouette_score(emb[sub], types[sub])
            return f"kNN kept {hits / (len(sample) * 15):.3f}; type silhouette {sil:.3f}"

        for name, kwargs in [("default (200 epochs >10k cells, spectral init)", {}),
                             ("maxiter=100", {"maxiter": 100}),
                             ("init_pos = first 2 PCs (no spectral)", {"init_pos": "X_pca2"}),
                             ("maxiter=100 + PC init", {"maxiter": 100, "init_pos": "X_pca2"})]:
            t("umap", name, sc.tl.umap, base_graph, random_state=0, **kwargs)
            w, c = t.last
            q = quality(base_graph.obsm["X_umap"])
            t.last = (w, c)
            row("umap", name, q)

    # ---------------------------------------------------------------- markers
    if "markers" not in args.skip:
        import anndata as ad
        import pandas as pd

        if "neighbors" not in args.skip:
            adata.obs["leiden"] = base_graph.obs["leiden"].to_numpy()
        else:
            sc.pp.neighbors(adata, n_neighbors=15, use_rep="X_pca", random_state=0)
            sc.tl.leiden(adata, flavor="igraph", n_iterations=2, directed=False, random_state=0)
        t("markers", "rank_markers (as the pipeline)", ch.rank_markers, adata)
        row("markers", "rank_markers (pts=True, ≤1000 cells/cluster)", f"{adata.obs['leiden'].nunique()} clusters")
        labels = adata.obs["leiden"].astype(str)
        keep = ch.markers._sample_cells(labels, 1000, 0)
        groups = sorted(labels.unique(), key=ch.markers._natural_key)
        view = adata[keep]
        work = ad.AnnData(X=view.X, obs=pd.DataFrame({"leiden": pd.Categorical(labels[keep], groups)},
                                                     index=view.obs_names),
                          var=pd.DataFrame(index=adata.var_names))
        t("markers", "rank_genes_groups pts=True", sc.tl.rank_genes_groups, work, "leiden", method="wilcoxon",
          pts=True, use_raw=False)
        row("markers", "  rank_genes_groups wilcoxon, pts=True")
        t("markers", "rank_genes_groups_df", sc.get.rank_genes_groups_df, work, group=None)
        row("markers", "  rank_genes_groups_df (all genes x clusters)")
        t("markers", "rank_genes_groups pts=False", sc.tl.rank_genes_groups, work, "leiden", method="wilcoxon",
          pts=False, use_raw=False)
        row("markers", "  rank_genes_groups wilcoxon, pts=False")
        t("markers", "rank_genes_groups n_genes=100", sc.tl.rank_genes_groups, work, "leiden", method="wilcoxon",
          pts=True, use_raw=False, n_genes=100)
        row("markers", "  rank_genes_groups pts=True, n_genes=100")
        t("markers", "rank_genes_groups_df n_genes=100", sc.get.rank_genes_groups_df, work, group=None)
        row("markers", "  rank_genes_groups_df after n_genes=100")

    print()
    _common.print_table(results, ["section", "variant", "wall s", "cpu s", "check"])
    print(f"layers['counts'] (a full copy of the QC'd counts): {counts_bytes / 2**20:,.0f} MiB "
          f"= {counts_bytes / max(1, adata.n_obs):.0f} B/cell for {adata.n_obs:,} cells; "
          f"X itself is the same size again.")
    return 0


def chunked_gram_pca(adata, n_comps: int, chunk: int = 20_000):
    """PCA of the HVG columns through the covariance, its gram accumulated over densified row chunks.

    Same maths as ``svd_solver="covariance_eigh"`` but X^T X is a dense BLAS product per chunk instead of a
    sparse-sparse product (scipy's SpGEMM costs ~ n_cells x nnz_per_row^2 and is single-threaded).
    """
    import numpy as np
    import scipy.sparse as sp

    x = adata.X[:, adata.var["highly_variable"].to_numpy()]
    x = sp.csr_matrix(x)
    n, g = x.shape
    gram = np.zeros((g, g))
    total = np.zeros(g)
    for lo in range(0, n, chunk):
        block = x[lo:lo + chunk].toarray()
        gram += block.T @ block
        total += block.sum(axis=0)
    mean = total / n
    cov = (gram - n * np.outer(mean, mean)) / (n - 1)
    values, vectors = np.linalg.eigh(cov)
    order = np.argsort(values)[::-1][:n_comps]
    components = vectors[:, order]
    projected = np.asarray(x @ components) - mean @ components
    return projected.astype(np.float32), values[order]


def _graph_only(adata):
    """A small AnnData with only obs and X_pca (neighbour/UMAP variants do not need X)."""
    import anndata as ad

    g = ad.AnnData(obs=adata.obs[["cell_type"]].copy())
    g.obsm["X_pca"] = adata.obsm["X_pca"]
    return g


if __name__ == "__main__":
    sys.exit(main())
