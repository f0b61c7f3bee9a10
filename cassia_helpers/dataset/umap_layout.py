"""UMAP's layout on all cores with the same result on every run, for large datasets.

umap-learn optimises the layout one edge at a time (stochastic gradient descent on the fuzzy kNN graph).
Its parallel mode lets every thread write any cell's coordinates without locks, so two runs with the same
seed differ; its serial mode is reproducible but uses one core, which is most of the time of a 1M-cell
dataset. Here the cells are cut into :data:`N_CHUNKS` fixed ranges, and each range is optimised by one
thread per epoch:

* a cell's own coordinates, and those of the cells of its range, are read and written live, in the
  order of its edges (as umap-learn does);
* the coordinates of cells of other ranges are read from a copy taken at the start of the epoch; their
  move along the edge (umap-learn's ``move_other``) is kept per edge and applied by their own range's thread
  in a second pass, through the reverse edge (the graph is symmetric), so each end gets the pull umap-learn
  gives it, one pass later (an edge writes only its reverse edge's slot, and a range reads only its own
  edges' slots, in order);
* negative samples come from a random stream per range and epoch, drawn from the seed.

Nothing depends on which thread runs which range, so the layout is the same for a seed whatever the number
of threads. The gradients, the sampling schedule (``make_epochs_per_sample``), the learning-rate decay and
the curve parameters are umap-learn's.
"""

from __future__ import annotations

import anndata as ad
import numba
import numpy as np
import scipy.sparse as sp

#: fixed number of cell ranges: the result does not depend on the number of threads
N_CHUNKS = 64
#: scanpy's UMAP defaults: the curve of the low-dimensional similarities (``uns['umap']['params']``)
MIN_DIST, SPREAD = 0.5, 1.0
_CLIP = 4.0


@numba.njit(inline="always")
def _next(state: np.uint64) -> np.uint64:
    return state * np.uint64(6364136223846793005) + np.uint64(1442695040888963407)


@numba.njit(parallel=True, cache=True)
def _epoch(embedding, snapshot, pulled, head, tail, reverse, cell_bounds, edge_bounds, epochs_per_sample,
           epochs_per_negative, next_sample, next_negative, a, b, gamma, alpha, epoch, seed):
    n_cells = embedding.shape[0]
    for chunk in numba.prange(len(cell_bounds) - 1):
        first_cell, end_cell = cell_bounds[chunk], cell_bounds[chunk + 1]
        state = _next(_next(np.uint64(seed) ^ (np.uint64(epoch) << np.uint64(20)) ^ np.uint64(chunk)))
        for edge in range(edge_bounds[chunk], edge_bounds[chunk + 1]):
            if next_sample[edge] > epoch:
                continue
            j, k = head[edge], tail[edge]
            local = first_cell <= k < end_cell
            source = embedding if local else snapshot
            dx = embedding[j, 0] - source[k, 0]
            dy = embedding[j, 1] - source[k, 1]
            dist2 = dx * dx + dy * dy
            coeff = 0.0
            if dist2 > 0.0:
                coeff = -2.0 * a * b * dist2 ** (b - 1.0) / (a * dist2 ** b + 1.0)
            gx = min(max(coeff * dx, -_CLIP), _CLIP) * alpha
            gy = min(max(coeff * dy, -_CLIP), _CLIP) * alpha
            embedding[j, 0] += gx
            embedding[j, 1] += gy
            if local:
                embedding[k, 0] -= gx
                embedding[k, 1] -= gy
            else:  # kept on the reverse edge (written by this edge only), applied by :func:`_pull_others`
                pulled[reverse[edge], 0] = -gx
                pulled[reverse[edge], 1] = -gy
            next_sample[edge] += epochs_per_sample[edge]
            n_negative = int((epoch - next_negative[edge]) / epochs_per_negative[edge])
            for _ in range(n_negative):
                state = _next(state)
                k = int((state >> np.uint64(33)) % np.uint64(n_cells))
                if k == j:
                    continue
                source = embedding if first_cell <= k < end_cell else snapshot
                dx = embedding[j, 0] - source[k, 0]
                dy = embedding[j, 1] - source[k, 1]
                dist2 = dx * dx + dy * dy
                if dist2 > 0.0:
                    coeff = 2.0 * gamma * b / ((0.001 + dist2) * (a * dist2 ** b + 1.0))
                    embedding[j, 0] += min(max(coeff * dx, -_CLIP), _CLIP) * alpha
                    embedding[j, 1] += min(max(coeff * dy, -_CLIP), _CLIP) * alpha
            next_negative[edge] += n_negative * epochs_per_negative[edge]


@numba.njit(parallel=True, cache=True)
def _pull_others(embedding, pulled, head, edge_bounds):
    for chunk in numba.prange(len(edge_bounds) - 1):
        for edge in range(edge_bounds[chunk], edge_bounds[chunk + 1]):
            if pulled[edge, 0] != 0.0 or pulled[edge, 1] != 0.0:
                embedding[head[edge], 0] += pulled[edge, 0]
                embedding[head[edge], 1] += pulled[edge, 1]
                pulled[edge, 0] = 0.0
                pulled[edge, 1] = 0.0


def _reverse_edges(head: np.ndarray, tail: np.ndarray, n_cells: int) -> np.ndarray:
    """For each edge (j, k) of a symmetric graph in CSR order, the index of (k, j)."""
    key = head * n_cells + tail
    return np.minimum(np.searchsorted(key, tail * n_cells + head), len(key) - 1).astype(np.int64)


def _boxed(start: np.ndarray) -> np.ndarray:
    """The start scaled into [0, 10] on each axis, as umap-learn scales a given start."""
    lo, hi = start.min(axis=0), start.max(axis=0)
    return np.ascontiguousarray(10.0 * (start - lo) / np.maximum(hi - lo, 1e-12), dtype=np.float32)


def chunked_layout(graph: sp.spmatrix, start: np.ndarray, *, n_epochs: int, seed: int = 0,
                   order: np.ndarray | None = None, min_dist: float = MIN_DIST, spread: float = SPREAD,
                   gamma: float = 1.0, negative_sample_rate: int = 5, initial_alpha: float = 1.0) -> np.ndarray:
    """Optimise a 2-D layout of the symmetric fuzzy graph ``graph`` (``obsp['connectivities']``) from
    ``start`` (n × 2), as umap-learn's ``simplicial_set_embedding`` with scanpy's defaults does, on all
    threads and with the same result for a seed whatever their number.

    ``order`` (a permutation of the cells) is the order in which cells are laid out in memory and cut into
    ranges: with the cells of a cluster next to each other, most edges stay inside a range and in the
    processor's cache (2.3 times faster on a 1M-cell graph of 100 clusters than in random order).

    Returns the layout (float32, n × 2, in the cells' own order); ``graph`` and ``start`` are not modified.
    """
    from cassia_helpers.dataset.numba_cache import import_umap

    import_umap()  # with numba's on-disk cache
    from umap.umap_ import find_ab_params

    a, b = find_ab_params(spread, min_dist)
    if order is not None:  # laid out in that order, returned in the cells' own
        order = np.asarray(order, dtype=np.int64)
        graph, start = sp.csr_matrix(graph)[order][:, order], np.asarray(start)[order]
    embedding = _layout(graph, start, n_epochs=n_epochs, seed=seed, a=float(a), b=float(b), gamma=gamma,
                        negative_sample_rate=negative_sample_rate, initial_alpha=initial_alpha)
    if order is None:
        return embedding
    out = np.empty_like(embedding)
    out[order] = embedding
    return out


def _layout(graph: sp.spmatrix, start: np.ndarray, *, n_epochs: int, seed: int, a: float, b: float,
            gamma: float, negative_sample_rate: int, initial_alpha: float) -> np.ndarray:
    """:func:`chunked_layout` on the cells in the order given (umap-learn imported)."""
    from umap.umap_ import make_epochs_per_sample

    coo = sp.csr_matrix(graph, dtype=np.float32, copy=True)
    coo.sum_duplicates()
    if coo.nnz == 0:  # no edges: nothing pulls or pushes
        return _boxed(start)
    coo.data[coo.data < coo.data.max() / float(n_epochs)] = 0.0
    coo.eliminate_zeros()
    coo = coo.tocoo()  # from CSR: edges in order of their head cell
    head, tail = coo.row.astype(np.int64), coo.col.astype(np.int64)
    epochs_per_sample = make_epochs_per_sample(coo.data, n_epochs)
    epochs_per_negative = epochs_per_sample / negative_sample_rate
    next_sample, next_negative = epochs_per_sample.copy(), epochs_per_negative.copy()

    embedding = _boxed(start)
    n_cells = embedding.shape[0]
    cell_bounds = np.linspace(0, n_cells, min(N_CHUNKS, n_cells) + 1).astype(np.int64)
    edge_bounds = np.searchsorted(head, cell_bounds).astype(np.int64)
    reverse = _reverse_edges(head, tail, n_cells)
    if not (np.array_equal(head[reverse], tail) and np.array_equal(tail[reverse], head)):
        raise ValueError("the UMAP graph is not symmetric")
    snapshot = np.empty_like(embedding)
    pulled = np.zeros((len(head), 2), dtype=np.float32)
    for epoch in range(n_epochs):
        snapshot[:] = embedding
        alpha = initial_alpha * (1.0 - epoch / float(n_epochs))
        _epoch(embedding, snapshot, pulled, head, tail, reverse, cell_bounds, edge_bounds, epochs_per_sample,
               epochs_per_negative, next_sample, next_negative, a, b, float(gamma), alpha, epoch,
               int(seed) & 0xFFFFFFFF)
        _pull_others(embedding, pulled, head, edge_bounds)
    return embedding


def umap_chunked(adata: ad.AnnData, start: np.ndarray, *, n_epochs: int, seed: int = 0,
                 groupby: str = "leiden") -> None:
    """:func:`chunked_layout` of ``obsp['connectivities']`` with scanpy's UMAP defaults (:data:`MIN_DIST`,
    :data:`SPREAD`), the cells laid out by cluster (``obs[groupby]``, when present), then along ``start``'s
    first axis. Writes ``obsm['X_umap']`` and ``uns['umap']`` as :func:`scanpy.tl.umap` does."""
    from umap.umap_ import find_ab_params

    a, b = find_ab_params(SPREAD, MIN_DIST)
    keys = [np.asarray(start)[:, 0]]
    if groupby in adata.obs:
        keys.append(adata.obs[groupby].astype("category").cat.codes.to_numpy())
    order = np.lexsort(keys)
    adata.obsm["X_umap"] = chunked_layout(adata.obsp["connectivities"], start, n_epochs=n_epochs, seed=seed,
                                          order=order)
    adata.uns["umap"] = {"params": {"a": float(a), "b": float(b)}}


__all__ = ["N_CHUNKS", "chunked_layout", "umap_chunked"]
