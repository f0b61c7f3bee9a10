"""``python -m cassia_helpers.dataset.warm_up``: compile and cache, once per installation, the numba code
every dataset's kernel runs (kNN graph, leiden, UMAP); ``make install`` runs it.

It runs the pipeline's own steps (:mod:`cassia_helpers.dataset.pp`) on a small random count matrix, with
umap-learn and pynndescent imported through :func:`~cassia_helpers.dataset.numba_cache.import_umap`. It lives
apart from :mod:`~cassia_helpers.dataset.numba_cache` because it drives the pipeline, which itself uses that
module.
"""

from __future__ import annotations


def warm_up() -> None:
    """Run normalize, PCA, neighbours, leiden and UMAP once, so that not even the first dataset of the first
    run pays the compilation."""
    import anndata as ad
    import numpy as np
    import scipy.sparse as sp

    from cassia_helpers.dataset import pp
    from cassia_helpers.dataset.record import provenance

    rng = np.random.default_rng(0)
    adata = ad.AnnData(sp.csr_matrix(rng.poisson(rng.gamma(0.5, 2.0, size=(400, 300))).astype(np.float32)))
    provenance(adata)["input"] = {"is_counts": True}
    pp.normalize(adata)
    pp.reduce_dimensions(adata, n_pcs=10)
    pp.neighbors(adata)
    pp.cluster(adata)
    pp.umap(adata)


if __name__ == "__main__":
    warm_up()
