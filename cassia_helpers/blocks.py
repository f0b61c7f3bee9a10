"""Row blocks of a matrix sized by how many values they hold, so per-block temporaries stay small."""

from __future__ import annotations

from collections.abc import Iterator

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
