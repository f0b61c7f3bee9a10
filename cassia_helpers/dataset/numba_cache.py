"""Compile umap-learn's and pynndescent's numba code once per installation, not once per kernel.

Both libraries decorate most of their numba functions without ``cache=True``, and pynndescent compiles
many of them eagerly at import: every fresh process (each dataset's kernel) paid about 30 s of compilation
before the kNN graph and UMAP could start (``python -X importtime -c "import umap"``;
``bench/batch_overhead.py``). Importing them once with numba's on-disk cache switched on as the default
makes the first kernel on a machine compile and store the machine code beside the libraries (numba's
``__pycache__``, or ``NUMBA_CACHE_DIR``), and every later kernel load it.
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def quiet_uncachable() -> Iterator[None]:
    """Silence numba's notice that a function cannot be cached (e.g. pynndescent's search on large data,
    compiled at its first call): it is compiled as before, and the notice means nothing to a user."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*[Cc]annot cache.*")
        yield


@contextmanager
def _cache_by_default() -> Iterator[None]:
    import numba

    njit, jit = numba.njit, numba.jit

    def cached(decorator):
        def decorate(*args, **kwargs):
            kwargs.setdefault("cache", True)
            return decorator(*args, **kwargs)

        return decorate

    numba.njit, numba.jit = cached(njit), cached(jit)
    try:
        with quiet_uncachable():
            yield
    finally:
        numba.njit, numba.jit = njit, jit


def import_umap() -> None:
    """Import ``umap`` (and ``pynndescent``) with numba's cache on; nothing to do once they are imported."""
    if "umap" in sys.modules:
        return
    with _cache_by_default():
        import umap  # noqa: F401
