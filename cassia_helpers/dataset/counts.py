"""Raw counts without a second copy of the matrix in memory.

The pipeline normalises ``X`` in place (``log1p(counts / library_size * target_sum)``) and keeps each cell's
library size in ``obs['library_size']``. The counts are exactly recoverable from those two, so instead of
holding ``layers['counts']`` beside ``X`` for the whole run (twice the memory of the largest object), the
counts are rebuilt block by block when the h5ad is written and streamed into the file's
``layers/counts``. At float32 precision the rebuilt values of integer counts round back exactly
(relative error below 1e-6, so counts up to ~10^5 per gene and cell); values that were not integers are
written as rebuilt.
"""

from __future__ import annotations

from pathlib import Path

import anndata as ad
import h5py
import numpy as np
import scipy.sparse as sp

from cassia_helpers.dataset.matrix import dense_blocks, sparse_blocks
from cassia_helpers.dataset.record import provenance

LIBRARY_SIZE_KEY = "library_size"


def counts_recoverable(adata: ad.AnnData) -> bool:
    """Whether ``X`` was normalised by :func:`~.pp.normalize` from counts (so they can be rebuilt)."""
    normalize = provenance(adata).get("normalize", {})
    return "target_sum" in normalize and LIBRARY_SIZE_KEY in adata.obs


def rebuild_counts(values: np.ndarray, library_size: np.ndarray, target_sum: float, *, integer: bool = True
                   ) -> np.ndarray:
    """Counts from log-normalised ``values``; ``library_size`` broadcasts against ``values`` (per value or row).

    For ``integer`` input counts, values within float32 noise of an integer (0.01, or 10 ppm of the value)
    are rounded to it; others, and every value of non-integer input counts (ambient-corrected), are kept as
    rebuilt.
    """
    counts = np.expm1(values.astype(np.float64)) * (np.asarray(library_size, dtype=np.float64) / target_sum)
    if not integer:
        return counts.astype(np.float32)
    nearest = np.rint(counts)
    noise = np.maximum(0.01, 1e-5 * np.abs(counts))
    return np.where(np.abs(counts - nearest) < noise, nearest, counts).astype(np.float32)


def counts_layer(adata: ad.AnnData) -> sp.csr_matrix | np.ndarray:
    """The raw counts as a new matrix (same sparsity as ``X``), for interactive use on data that fits twice."""
    if not counts_recoverable(adata):
        raise ValueError("X was not normalised from counts by pp.normalize: no counts to rebuild")
    target_sum = provenance(adata)["normalize"]["target_sum"]
    library = adata.obs[LIBRARY_SIZE_KEY].to_numpy()
    x = adata.X
    if sp.issparse(x):
        x = x.tocsr()
        per_value = np.repeat(library, np.diff(x.indptr))
        rebuilt = rebuild_counts(x.data, per_value, target_sum, integer=_integer_input(adata))
        return sp.csr_matrix((rebuilt, x.indices.copy(), x.indptr.copy()), shape=x.shape)
    return rebuild_counts(np.asarray(x), library[:, None], target_sum, integer=_integer_input(adata))


def write_counts_layer(adata: ad.AnnData, h5ad: str | Path) -> bool:
    """Add ``layers/counts`` to an h5ad just written from ``adata``, rebuilding counts from ``X`` block by block.

    Memory stays at one block of rows. Nothing is written (and ``False`` returned) when ``X`` does not hold
    normalised counts (:func:`counts_recoverable`) or the file already has a counts layer.
    """
    if not counts_recoverable(adata):
        return False
    target_sum = provenance(adata)["normalize"]["target_sum"]
    library = adata.obs[LIBRARY_SIZE_KEY].to_numpy(dtype=np.float64)
    with h5py.File(h5ad, "r+") as handle:
        layers = handle.require_group("layers")
        if "counts" in layers:
            return False
        source = handle["X"]
        if isinstance(source, h5py.Group):
            _write_sparse(source, layers, library, target_sum, _integer_input(adata))
        else:
            _write_dense(source, layers, library, target_sum, _integer_input(adata))
    return True


def _integer_input(adata: ad.AnnData) -> bool:
    """Whether the input's counts were whole numbers (``uns['cassia_batch']['input']['integer_counts']``)."""
    return bool(provenance(adata).get("input", {}).get("integer_counts", True))


def _write_sparse(source: h5py.Group, layers: h5py.Group, library: np.ndarray, target_sum: float,
                  integer: bool) -> None:
    if source.attrs["encoding-type"] != "csr_matrix":
        raise ValueError(f"X is stored as {source.attrs['encoding-type']}, expected csr_matrix")
    target = layers.create_group("counts")
    for key, value in source.attrs.items():
        target.attrs[key] = value
    source.file.copy(source["indices"], target, "indices")
    source.file.copy(source["indptr"], target, "indptr")
    indptr = source["indptr"][:]
    data = target.create_dataset("data", shape=source["data"].shape, dtype=np.float32)
    for start, stop in sparse_blocks(indptr):
        lo, hi = int(indptr[start]), int(indptr[stop])
        per_value = np.repeat(library[start:stop], np.diff(indptr[start:stop + 1]))
        data[lo:hi] = rebuild_counts(source["data"][lo:hi], per_value, target_sum, integer=integer)


def _write_dense(source: h5py.Dataset, layers: h5py.Group, library: np.ndarray, target_sum: float,
                 integer: bool) -> None:
    target = layers.create_dataset("counts", shape=source.shape, dtype=np.float32)
    target.attrs["encoding-type"] = "array"
    target.attrs["encoding-version"] = "0.2.0"
    for start, stop in dense_blocks(source.shape):
        target[start:stop] = rebuild_counts(source[start:stop], library[start:stop, None], target_sum,
                                            integer=integer)
