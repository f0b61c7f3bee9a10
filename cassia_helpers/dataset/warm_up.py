"""``python -m cassia_helpers.dataset.warm_up``: compile and cache, once per installation, the numba code
every dataset's kernel runs (kNN graph, leiden, UMAP, the marker ranking); ``make install`` runs it.

It runs the pipeline's own steps (:mod:`cassia_helpers.dataset.pp`) on a small random count matrix, with
umap-learn and pynndescent imported through :func:`~cassia_helpers.dataset.numba_cache.import_umap`. It lives
apart from :mod:`~cassia_helpers.dataset.numba_cache` because it drives the pipeline, which itself uses that
module.

:func:`prepare_kernel` is what a dataset's kernel started ahead of its dataset runs while it waits: the
imports of a fresh process and the first calls of the pipeline (numba's cache loads), paid while the driver
starts or while the worker's previous dataset runs instead of inside the dataset's notebook.
"""

from __future__ import annotations


def warm_up(*, markers: bool = False) -> None:
    """Run normalize, PCA, neighbours, leiden and UMAP once (and the marker ranking if ``markers``), so that
    not even the first dataset of the first run pays the compilation."""
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
    pp.umap(adata, large=0)  # the layout of large datasets
    if markers and adata.obs["leiden"].nunique() > 1:
        from cassia_helpers.dataset.markers import rank_markers

        rank_markers(adata, n_genes=None)


def import_template_modules() -> None:
    """Import what the template notebook uses: what a kernel started for its dataset does as it starts,
    while its worker imports papermill. Nothing is left in the notebook's namespace; a failure here only
    means that the notebook imports them itself, so it is never raised."""
    import importlib

    try:
        import matplotlib.pyplot  # noqa: F401 - with the kernel's own (inline) backend, as the notebook's plots
        import scanpy  # noqa: F401

        import cassia_helpers as ch

        for module in {*ch._EXPORTS.values(), *ch._SUBMODULES.values()}:
            if module.startswith(".dataset."):  # the helpers a dataset's notebook calls
                importlib.import_module(module, "cassia_helpers")
    except Exception:  # noqa: BLE001, S110 - an optimisation only
        pass


def prepare_kernel() -> None:
    """:func:`import_template_modules`, then the pipeline once on a small random matrix: what a kernel
    started ahead of its dataset does while it waits (numba's cache loads, the ontology's index).

    No figure is opened, no file is written and the progress file is not set yet. The notebook's results
    are the same: every step takes its seed from the notebook's parameters. A failure here only means that
    the notebook pays these costs itself, so it is never raised.
    """
    import_template_modules()
    try:
        from cassia_helpers.dataset.ontology import load_cell_ontology

        load_cell_ontology()
        warm_up(markers=True)
    except Exception:  # noqa: BLE001, S110 - an optimisation only
        pass


if __name__ == "__main__":
    warm_up(markers=True)
