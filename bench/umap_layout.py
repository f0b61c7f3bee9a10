#!/usr/bin/env python
"""UMAP's layout of a large dataset: umap-learn's one-thread layout against ours on all threads.

The data are ``bench/scale_data.py``'s mixed real PBMC cells (``--cells``, default 100,000); the pipeline runs
to the kNN graph and leiden with the package's defaults, then each layout runs from the same start (the first
two PCs) for the same number of epochs (100, what the pipeline runs above 50,000 cells), ``--repeats`` times,
interleaved:

* ``umap-learn, 1 thread``: :func:`scanpy.tl.umap` with a seed (umap-learn's reproducible layout);
* ``ours, cells' order``: :func:`cassia_helpers.dataset.umap_layout.chunked_layout` with the cells in their
  own order;
* ``ours, by cluster``: what ``pp.umap`` runs: the cells laid out in memory by leiden cluster;
* ``ours, by cluster, 1 thread``: the same with numba limited to one thread (checks that the layout is the
  same, and shows what the second core brings).

For each: wall seconds (minimum and median), the silhouette of the leiden clusters in 2-D (10,000 cells),
and the share of each cell's kNN-graph neighbours among its 15 nearest cells in the picture (2,000 cells),
the same cells for every layout.

Usage::

    python bench/umap_layout.py
    python bench/umap_layout.py --cells 1000000 --repeats 1
"""

from __future__ import annotations

import argparse
import statistics
import time

import _common

_common.set_threads()
_common.ensure_path()


def _quality(adata, embedding, labels) -> tuple[float, float]:
    import numpy as np
    from sklearn.metrics import silhouette_score
    from sklearn.neighbors import NearestNeighbors

    cells = np.random.default_rng(0).choice(adata.n_obs, min(10_000, adata.n_obs), replace=False)
    silhouette = float(silhouette_score(embedding[cells], labels[cells]))
    probe = cells[:2000]
    near = NearestNeighbors(n_neighbors=16).fit(embedding).kneighbors(embedding[probe], return_distance=False)
    graph = adata.obsp["distances"].tocsr()
    kept = [len(set(near[i][1:]) & set(graph.indices[graph.indptr[c]:graph.indptr[c + 1]])) / 15
            for i, c in enumerate(probe)]
    return silhouette, float(np.mean(kept))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cells", type=int, default=100_000)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=100)
    args = parser.parse_args(argv)

    import numba
    import numpy as np
    import scale_data
    import scanpy as sc

    import cassia_helpers as ch
    from cassia_helpers.dataset.umap_layout import chunked_layout, umap_chunked

    _common.print_machine()
    adata = ch.read_dataset(str(scale_data.dataset_path(args.cells)), species="human")
    ch.pp.qc(adata)
    ch.pp.normalize(adata)
    ch.pp.reduce_dimensions(adata)
    ch.pp.neighbors(adata, seed=0)
    ch.pp.cluster(adata, seed=0)
    start = np.asarray(adata.obsm["X_pca"][:, :2], dtype=np.float32)
    labels = adata.obs["leiden"].to_numpy()
    threads = numba.get_num_threads()

    def umap_learn():
        adata.obsm["_start"] = start * (10.0 / float(np.abs(start).max()))
        sc.tl.umap(adata, random_state=0, init_pos="_start", maxiter=args.epochs)
        return adata.obsm["X_umap"].copy()

    def by_cluster(n_threads):
        def run():
            numba.set_num_threads(n_threads)
            try:
                umap_chunked(adata, start, n_epochs=args.epochs, seed=0)
            finally:
                numba.set_num_threads(threads)
            return adata.obsm["X_umap"].copy()
        return run

    variants = {
        "umap-learn, 1 thread": umap_learn,
        "ours, cells' order": lambda: chunked_layout(adata.obsp["connectivities"], start, n_epochs=args.epochs,
                                                     seed=0),
        f"ours, by cluster, {threads} threads": by_cluster(threads),
        "ours, by cluster, 1 thread": by_cluster(1),
    }
    chunked_layout(adata.obsp["connectivities"][:1000][:, :1000], start[:1000], n_epochs=2)  # compile / load
    times: dict[str, list[float]] = {name: [] for name in variants}
    results = {}
    for _ in range(args.repeats):
        for name, run in variants.items():
            began = time.perf_counter()
            results[name] = run()
            times[name].append(time.perf_counter() - began)
    rows = []
    for name in variants:
        silhouette, kept = _quality(adata, results[name], labels)
        rows.append([name, min(times[name]), statistics.median(times[name]), round(silhouette, 3), round(kept, 3)])
    print(f"\n{adata.n_obs:,} cells, {adata.obs['leiden'].nunique()} leiden clusters, {args.epochs} epochs")
    _common.print_table(rows, ["layout", "min s", "median s", "silhouette (leiden, 2-D)", "graph neighbours kept"])
    same = np.array_equal(results[f"ours, by cluster, {threads} threads"], results["ours, by cluster, 1 thread"])
    print(f"ours with {threads} threads and with 1 thread give the same layout: {same}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
