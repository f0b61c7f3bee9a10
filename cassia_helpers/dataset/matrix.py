"""Memory-lean work on the expression matrix: row blocks sized by the values they hold, in-place subsetting.

Each helper touches one block of rows at a time, so its temporaries stay small whatever the matrix size.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator

import anndata as ad
import numpy as np
import scipy.sparse as sp

VALUES_PER_BLOCK = 4_000_000  # 32 MB as float64: temporaries of this size are cheap next to any real matrix


def row_blocks(x, *, max_values: int = VALUES_PER_BLOCK) -> Iterator[tuple[int, int]]:
    """``(start, stop)`` row ranges covering all rows of ``x`` (CSR or dense), each of about ``max_values`` values."""
    if sp.issparse(x) and x.format == "csr":
        return sparse_blocks(x.indptr, max_values=max_values)
    return dense_blocks(x.shape, max_values=max_values)


def sparse_blocks(indptr: np.ndarray, *, max_values: int = VALUES_PER_BLOCK) -> Iterator[tuple[int, int]]:
    """Row ranges of a CSR matrix, cut where ``indptr`` crosses multiples of ``max_values``.

    A single row holding more values than that is a block of its own.
    """
    n_rows = len(indptr) - 1
    targets = np.arange(max_values, int(indptr[-1]), max_values)
    cuts = np.searchsorted(indptr, targets, side="right") - 1
    edges = np.unique(np.concatenate([[0], cuts[(cuts > 0) & (cuts < n_rows)], [n_rows]]))
    yield from zip(edges[:-1].tolist(), edges[1:].tolist(), strict=True)


def dense_blocks(shape: tuple[int, ...], *, max_values: int = VALUES_PER_BLOCK) -> Iterator[tuple[int, int]]:
    """Row ranges of a dense ``shape`` matrix, ``max_values // n_columns`` rows each (at least one)."""
    n_rows, n_columns = shape[0], (shape[1] if len(shape) > 1 else 1)
    step = max(1, max_values // max(1, n_columns))
    for start in range(0, n_rows, step):
        yield start, min(start + step, n_rows)


def subset_in_place(adata: ad.AnnData, cells: np.ndarray, genes: np.ndarray) -> None:
    """Keep the ``cells`` × ``genes`` (boolean masks) of ``adata``, in place.

    A CSR ``X`` is compacted inside its own buffers a block of rows at a time, so the peak is one block
    instead of a second matrix (``adata[cells, genes].copy()`` holds both). Other ``X`` types and all
    annotations are subset by anndata.
    """
    x = adata.X
    if sp.issparse(x) and x.format == "csr":
        adata.X = None
        # Compacting rewrites the buffers, so only when nothing else holds the matrix or its arrays
        # (a reference count of 2 is getrefcount's own argument and the local name).
        data, indices = _owner(x.data), _owner(x.indices)
        if sys.getrefcount(x) == 2 and data is not None and indices is not None:
            adata._inplace_subset_obs(cells)
            adata._inplace_subset_var(genes)
            adata.X = _compact_csr(data, indices, x.indptr, x.shape, cells, genes)
            return
        adata.X = x
    adata._inplace_subset_obs(cells)
    adata._inplace_subset_var(genes)


def _owner(array: np.ndarray) -> np.ndarray | None:
    """The array owning ``array``'s whole buffer (itself, or a base only it re-wraps), else ``None``.

    ``None`` too when anything but the matrix holds ``array`` (3 references: the matrix's attribute, this
    parameter and getrefcount's argument) or its base (the view, the local name, getrefcount's argument).
    """
    if sys.getrefcount(array) != 3:
        return None
    if array.flags.owndata:
        return array
    base = array.base
    if (isinstance(base, np.ndarray) and base.flags.owndata and base.shape == array.shape
            and base.dtype == array.dtype and base.ctypes.data == array.ctypes.data
            and sys.getrefcount(base) == 3):
        return base
    return None


def _compact_csr(data: np.ndarray, indices: np.ndarray, indptr: np.ndarray, shape: tuple[int, int],
                 rows: np.ndarray, columns: np.ndarray) -> sp.csr_matrix:
    new_column = (np.cumsum(columns) - 1).astype(indices.dtype)
    new_indptr = np.zeros(int(rows.sum()) + 1, dtype=indptr.dtype)
    written = row_out = 0
    for start, stop in sparse_blocks(indptr):
        lo, hi = int(indptr[start]), int(indptr[stop])
        row_of_entry = np.repeat(np.arange(stop - start), np.diff(indptr[start:stop + 1]))
        keep = rows[start:stop][row_of_entry] & columns[indices[lo:hi]]
        kept = int(keep.sum())
        # the write position never passes the read position, so earlier entries are never overwritten
        data[written:written + kept] = data[lo:hi][keep]
        indices[written:written + kept] = new_column[indices[lo:hi][keep]]
        per_row = np.bincount(row_of_entry[keep], minlength=stop - start)[rows[start:stop]]
        new_indptr[row_out + 1:row_out + 1 + len(per_row)] = written + np.cumsum(per_row)
        written += kept
        row_out += len(per_row)
    data.resize(written, refcheck=False)
    indices.resize(written, refcheck=False)
    return sp.csr_matrix((data, indices, new_indptr), shape=(row_out, int(columns.sum())))


def cells_per_gene(x, cells: np.ndarray) -> np.ndarray:
    """How many of the ``cells`` (boolean mask) express each gene."""
    if sp.issparse(x) and x.format == "csr":
        counts = np.zeros(x.shape[1], dtype=np.int64)
        for start, stop in sparse_blocks(x.indptr):
            lo, hi = x.indptr[start], x.indptr[stop]
            expressed = np.repeat(cells[start:stop], np.diff(x.indptr[start:stop + 1])) & (x.data[lo:hi] != 0)
            counts += np.bincount(x.indices[lo:hi][expressed], minlength=x.shape[1])
        return counts
    return np.asarray((x[cells] != 0).sum(axis=0)).ravel()


def sparse_problem(x) -> str:
    """Why a CSR/CSC matrix's structure is corrupt (``indptr`` not a valid sequence of offsets, ``indices`` out
    of range, ``data``/``indices`` lengths not matching ``indptr``), or ``""`` when it is sound.

    scipy checks only the lengths when a matrix is built from its arrays; a bad ``indices`` or ``indptr``
    would otherwise surface as an ``IndexError`` (or silently wrong values) deep inside the pipeline.
    """
    if not (sp.issparse(x) and x.format in ("csr", "csc")):
        return ""
    n_major, n_minor = (x.shape[0], x.shape[1]) if x.format == "csr" else (x.shape[1], x.shape[0])
    indptr, indices = np.asarray(x.indptr), np.asarray(x.indices)
    if indptr.ndim != 1 or len(indptr) != n_major + 1:
        return f"indptr has {len(indptr)} entries for {n_major} {'rows' if x.format == 'csr' else 'columns'}"
    if len(indptr) and int(indptr[0]) != 0:
        return f"indptr starts at {int(indptr[0])}, not 0"
    if np.any(np.diff(indptr) < 0):
        return "indptr decreases"
    if int(indptr[-1]) != len(indices) or len(indices) != len(x.data):
        return f"indptr ends at {int(indptr[-1])} but there are {len(indices)} indices and {len(x.data)} values"
    for start in range(0, len(indices), VALUES_PER_BLOCK):
        block = indices[start:start + VALUES_PER_BLOCK]
        if block.size and (int(block.min()) < 0 or int(block.max()) >= n_minor):
            bad = int(block.min()) if int(block.min()) < 0 else int(block.max())
            return f"index {bad} outside 0..{n_minor - 1}"
    return ""
