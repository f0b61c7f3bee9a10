"""What an input file is, from its HDF5 header alone (no matrix is read).

The driver checks every input this way before any kernel starts, the dry run reports it, and
:func:`cassia_helpers.dataset.read.read_dataset` starts with it: a text file named ``.h5ad``, a truncated file,
an HDF5 file that is not AnnData or an input too large for memory is rejected at once, with a one-line
reason naming the file.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from cassia_helpers.contract import TOO_LARGE

ENSEMBL_ID = re.compile(r"^ENS[A-Z]*G\d{6,}(\.\d+)?$")
# A dataset needs about this many times its matrix's size while it is processed: the pipeline holds one
# copy of the matrix, plus the marker tests' sample of it and block-sized scratch (``bench/`` measures
# about 1.6 times the matrix with the libraries included, at 100k cells × 20k genes).
MEMORY_OVERHEAD = 2.0
MAX_DETAIL = 200


class InputError(ValueError):
    """The input file cannot be processed; the message is one line naming the file."""

    def __init__(self, message: str) -> None:
        super().__init__(re.sub(r"[\r\n\t\f\v]+", " ", str(message)).strip())


def available_memory_bytes() -> int | None:
    """``MemAvailable`` from ``/proc/meminfo``; ``None`` where that is not readable."""
    try:
        with open("/proc/meminfo") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def estimate_memory_bytes(path: str | Path) -> int:
    """Memory needed to read and process an h5ad, from its HDF5 metadata only (no matrix is read).

    Everything ``anndata.read_h5ad`` loads (the sum of all stored arrays, uncompressed) plus
    ``MEMORY_OVERHEAD - 1`` working copies of the largest expression matrix (``X``, ``raw/X`` or a layer).
    """
    with h5py.File(path, "r") as handle:
        return _inspect(handle, Path(path))["needed_bytes"]


def _inspect(handle: h5py.File, path: Path) -> dict:
    """Check the file is an AnnData h5ad and read its shape and size from metadata."""
    keys = sorted(handle.keys())
    if "obs" not in handle or "var" not in handle:
        hint = ""
        if "row_attrs" in handle and "col_attrs" in handle:
            hint = "; it looks like a .loom file (convert it with scanpy.read_loom and write_h5ad)"
        elif "matrix" in handle:
            hint = "; it looks like a 10x Genomics .h5 (convert it with scanpy.read_10x_h5 and write_h5ad)"
        shown = ", ".join(keys[:5]) + (", ..." if len(keys) > 5 else "")
        raise InputError(
            f"{path}: HDF5 file but not an AnnData h5ad (no obs/var; top-level keys: {shown or 'none'}){hint}"
        )
    loaded = 0

    def add(_name: str, node: Any) -> None:
        nonlocal loaded
        if isinstance(node, h5py.Dataset):
            loaded += _dataset_bytes(node)

    handle.visititems(add)
    matrices = [handle[name] for name in ("X", "raw/X") if name in handle]
    if isinstance(handle.get("layers"), h5py.Group):
        matrices += list(handle["layers"].values())
    if not matrices:
        raise InputError(f"{path}: no expression matrix (no X, no layers, no raw)")
    working = max((_matrix_bytes(node) for node in matrices), default=0)
    return {
        "n_obs": _axis_length(handle["obs"]),
        "n_vars": _axis_length(handle["var"]),
        "needed_bytes": int(loaded + (MEMORY_OVERHEAD - 1) * working),
    }


def _dataset_bytes(node: h5py.Dataset) -> int:
    # anndata writes None (scanpy's uns['log1p']['base']) as an HDF5 null dataset: no shape, no size
    return int(node.size or 0) * int(node.dtype.itemsize)


def _matrix_bytes(node: Any) -> int:
    if isinstance(node, h5py.Dataset):
        return _dataset_bytes(node)
    if isinstance(node, h5py.Group):
        return sum(_dataset_bytes(node[key]) for key in ("data", "indices", "indptr")
                   if isinstance(node.get(key), h5py.Dataset))
    return 0


def _obs_columns(handle: h5py.File) -> list[str] | None:
    """The input's ``obs`` column names, from the header (``None`` for a layout that does not list them)."""
    order = handle["obs"].attrs.get("column-order") if isinstance(handle["obs"], h5py.Group) else None
    if order is None:
        return None
    return [c.decode() if isinstance(c, bytes) else str(c) for c in np.atleast_1d(order)]


def _n_groups(node: Any) -> int | None:
    """The distinct values of an ``obs`` column (a lab's clusters), cells without one counted as one more."""
    try:
        if isinstance(node, h5py.Group) and "codes" in node:  # categorical: -1 is a missing value
            codes = node["codes"][:]
            return len(np.unique(codes[codes >= 0])) + int((codes < 0).any())
        values = node[:]
        if values.dtype.kind == "f":
            return len(np.unique(values[~np.isnan(values)])) + int(np.isnan(values).any())
        return len(np.unique(values))
    except (TypeError, ValueError, OSError, KeyError):
        return None


def missing_column(what: str, key: str, columns: Iterable[str]) -> str:
    """The reason a setting's ``obs`` column is missing, naming the columns the input has."""
    columns = list(columns)
    listing = ", ".join(columns[:20]) + (f", ... ({len(columns)} in all)" if len(columns) > 20 else "")
    return f"{what} {key!r} is not a column of the input's obs (its columns: {listing or 'none'})"


def _axis_length(node: Any) -> int | None:
    if isinstance(node, h5py.Dataset):  # anndata < 0.7 stored obs/var as one compound dataset
        return int(node.shape[0]) if node.shape else None
    index = node.attrs.get("_index")
    if isinstance(index, bytes):
        index = index.decode()
    if isinstance(index, str) and isinstance(node.get(index), h5py.Dataset):
        return int(node[index].shape[0])
    return None


def check_input(path: str | Path, *, memory_limit: int | None = None, obs_keys: Mapping[str, str] | None = None
                ) -> dict:
    """Check an input from its header: an AnnData h5ad with cells, genes and a matrix, that fits in memory.

    Returns ``n_obs``, ``n_vars``, ``needed_bytes`` and, with a ``cluster_key`` in ``obs_keys``, ``n_clusters``
    (its clusters); raises :class:`InputError` with a one-line reason.
    ``memory_limit`` is the bytes the dataset may use (``None``: the memory available now; 0: no check).
    ``obs_keys`` maps a setting to the ``obs`` column it names (``{"label_key": "celltype"}``): a column the
    input does not have is an error now, before any work is done for the dataset.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: file not found" if not path.exists() else f"{path}: not a file")
    if path.stat().st_size == 0:
        raise InputError(f"{path}: empty file (0 bytes), not an HDF5/h5ad file")
    try:
        is_hdf5 = h5py.is_hdf5(path)
    except OSError as exc:
        raise InputError(f"{path}: cannot be read ({one_line(exc)})") from None
    if not is_hdf5:
        raise InputError(f"{path}: not an HDF5/h5ad file")
    try:
        with h5py.File(path, "r") as handle:
            layout = _inspect(handle, path)
            columns = _obs_columns(handle)
            cluster_key = (obs_keys or {}).get("cluster_key")
            if cluster_key and columns is not None and cluster_key in columns:
                layout["n_clusters"] = _n_groups(handle["obs"][cluster_key])
    except InputError:
        raise
    except Exception as exc:  # noqa: BLE001 - any other h5py failure here means a damaged file
        raise unreadable(path, exc) from None
    if layout["n_obs"] == 0:
        raise InputError(f"{path}: no cells (0 observations)")
    if layout["n_vars"] == 0:
        raise InputError(f"{path}: no genes (0 variables)")
    for what, key in (obs_keys or {}).items():
        if key and columns is not None and key not in columns:
            raise InputError(f"{path}: {missing_column(what, key, columns)}")
    limit = memory_limit if memory_limit is not None else available_memory_bytes()
    if limit and layout["needed_bytes"] > limit:
        raise InputError(
            f"{path}: {TOO_LARGE}: reading and processing it needs about "
            f"{_size(layout['needed_bytes'])}, {_size(limit)} available"
        )
    return layout


# anndata's note naming the element it failed on: "Error raised while reading key 'note' of <class ...> from /uns"
FAILED_ELEMENT = re.compile(r"reading key '(?P<key>[^']*)' of .* from (?P<parent>\S+)")
# anndata's error on an encoding it does not know (written by a newer anndata)
NEWER_ENCODING = re.compile(r"IOSpec\(encoding_type='(?P<type>[^']*)', encoding_version='(?P<version>[^']*)'\)"
                            r".*update your installation of anndata")
UNSUPPORTED_SPARSE_DTYPE = re.compile(r"scipy\.sparse does not support dtype (\w+)")


def failed_element(exc: BaseException) -> str:
    """The element (``X``, ``uns/note``) anndata's note on ``exc`` says it failed to read, else ``""``."""
    for note in getattr(exc, "__notes__", ()):
        found = FAILED_ELEMENT.search(note)
        if found:
            return f"{found['parent'].strip('/')}/{found['key']}".lstrip("/")
    return ""


def newer_encoding(exc: BaseException) -> str:
    """``"<encoding> <version>"`` when ``exc`` is anndata's error on an element it has no reader for, else ``""``."""
    found = NEWER_ENCODING.search(one_line(exc))
    return f"{found['type']} {found['version']}" if found else ""


def unreadable(path: Path, exc: BaseException) -> InputError:
    """The :class:`InputError` for an h5ad that h5py or anndata could not open or read, naming the problem:
    a file another process holds open for writing, an encoding of a newer anndata, a data type scipy cannot
    hold, else a corrupt or truncated file."""
    detail = one_line(exc)
    element = failed_element(exc)
    if isinstance(exc, BlockingIOError) or "unable to lock file" in detail:
        return InputError(f"{path}: open for writing by another process (HDF5 file lock): wait for it to finish, "
                          f"then run the dataset again ({detail})")
    encoding = newer_encoding(exc)
    if encoding:
        from importlib.metadata import version  # not anndata itself: the driver does not load it

        return InputError(f"{path}: written by a newer anndata than this one ({version('anndata')}), which cannot "
                          f"read the encoding {encoding} of {element or 'an element'}: update anndata")
    dtype = UNSUPPORTED_SPARSE_DTYPE.search(detail)
    if dtype:
        return InputError(f"{path}: data type {dtype[1]} not supported in sparse matrices "
                          f"({element or 'a matrix'}): save it as float32")
    return InputError(f"{path}: corrupt or truncated h5ad{' in ' + element if element else ''} ({detail})")


def one_line(exc: BaseException) -> str:
    detail = exc.args[0] if isinstance(exc, KeyError) and len(exc.args) == 1 else exc  # KeyError str() is a repr
    text = " ".join(str(detail).split()) or type(exc).__name__
    return text if len(text) <= MAX_DETAIL else text[: MAX_DETAIL - 3] + "..."


def _size(n_bytes: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n_bytes < 1024 or unit == "GiB":
            return f"{n_bytes:.0f} {unit}" if unit == "B" else f"{n_bytes:.1f} {unit}"
        n_bytes /= 1024
    return f"{n_bytes:.1f} GiB"
