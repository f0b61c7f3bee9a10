"""Robust reading of one input h5ad, and atomic writes.

Reading answers every bad input with an :class:`InputError` whose message is one line naming the file
and the problem, so the driver can report it and go on with the other datasets.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import wraps
from pathlib import Path
from typing import Any

import anndata as ad
import h5py
import numpy as np
import scipy.sparse as sp

PROVENANCE_KEY = "cassia_batch"
ENSEMBL_ID = re.compile(r"^ENS[A-Z]*G\d{6,}(\.\d+)?$")
# var columns that may hold gene symbols when var_names are ids, matched case-insensitively, first found wins
SYMBOL_COLUMNS = (
    "gene_symbols", "gene_symbol", "feature_name", "feature_names", "gene_name", "gene_names",
    "gene_short_name", "symbol", "symbols",
)
# A dataset needs about this many times its matrix's size while it is processed: the pipeline holds one
# copy of the matrix, plus the marker tests' sample of it and block-sized scratch (``bench/`` measures
# about 1.6 times the matrix with the libraries included, at 100k cells × 20k genes).
MEMORY_OVERHEAD = 2.0
# Rows (and at most this many values of a dense matrix) sampled to decide whether a matrix holds counts,
# log-normalised or scaled values.
SAMPLE_ROWS = 2000
SAMPLE_DENSE_VALUES = 4_000_000
MAX_DETAIL = 200


class InputError(ValueError):
    """The input file cannot be processed; the message is one line naming the file."""

    def __init__(self, message: str) -> None:
        super().__init__(re.sub(r"[\r\n\t\f\v]+", " ", str(message)).strip())


def provenance(adata: ad.AnnData) -> dict:
    """The ``uns['cassia_batch']`` record that every helper adds to (created on first use)."""
    record = adata.uns.setdefault(PROVENANCE_KEY, {})
    record.setdefault("warnings", [])
    record.setdefault("timings", {})
    return record


def warn(adata: ad.AnnData, message: str) -> None:
    """Record a warning for the dataset's summary (``uns['cassia_batch']['warnings']``)."""
    warnings = list(provenance(adata)["warnings"])
    warnings.append(message)
    provenance(adata)["warnings"] = warnings


def timed(step: str) -> Callable:
    """Record the wall time of a helper in ``uns['cassia_batch']['timings'][step]`` (seconds)."""

    def decorate(func: Callable) -> Callable:
        @wraps(func)
        def wrapper(adata, *args, **kwargs):
            start = time.perf_counter()
            result = func(adata, *args, **kwargs)
            timings = provenance(adata)["timings"]
            timings[step] = round(timings.get(step, 0.0) + time.perf_counter() - start, 3)
            return result

        return wrapper

    return decorate


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
        if "matrix" in handle:
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
    working = max((_matrix_bytes(node) for node in matrices), default=0)
    return {
        "n_obs": _axis_length(handle["obs"]),
        "n_vars": _axis_length(handle["var"]),
        "needed_bytes": int(loaded + (MEMORY_OVERHEAD - 1) * working),
    }


def _dataset_bytes(node: h5py.Dataset) -> int:
    return int(node.size) * int(node.dtype.itemsize)


def _matrix_bytes(node: Any) -> int:
    if isinstance(node, h5py.Dataset):
        return _dataset_bytes(node)
    if isinstance(node, h5py.Group):
        return sum(_dataset_bytes(node[key]) for key in ("data", "indices", "indptr")
                   if isinstance(node.get(key), h5py.Dataset))
    return 0


def _axis_length(node: Any) -> int | None:
    if isinstance(node, h5py.Dataset):  # anndata < 0.7 stored obs/var as one compound dataset
        return int(node.shape[0]) if node.shape else None
    index = node.attrs.get("_index")
    if isinstance(index, bytes):
        index = index.decode()
    if isinstance(index, str) and isinstance(node.get(index), h5py.Dataset):
        return int(node[index].shape[0])
    return None


def read_dataset(path: str | Path, *, species: str = "human", memory_limit: int | None = None) -> ad.AnnData:
    """Read one input h5ad and make it ready for the pipeline.

    Finds gene symbols (``var_names``, or a ``var`` column such as ``gene_symbols`` or ``feature_name``
    when ``var_names`` are Ensembl ids), makes gene and cell names unique, and detects whether ``X`` holds
    raw counts or log-normalised values (``.layers['counts']`` or an integer ``.raw`` are used as counts
    when ``X`` is normalised or scaled). ``X`` is returned as float32, dense or CSR.

    Before anything is loaded the file is checked from its HDF5 metadata alone: that it is an AnnData
    h5ad, that it has cells and genes, and that reading and processing it fits in memory. The file is
    then read once.

    Parameters
    ----------
    path
        The h5ad file.
    species
        ``"human"`` or ``"mouse"``; a gene-symbol case that does not match is recorded as a warning.
    memory_limit
        Bytes the dataset may use; ``None`` uses the memory available now (``MemAvailable``).

    Returns
    -------
    The AnnData, with ``uns['cassia_batch']['input']`` (``file``, ``n_cells``, ``n_genes``,
    ``symbol_source``, ``is_counts``, ``counts_source``), ``uns['cassia_batch']['warnings']`` and
    ``uns['cassia_batch']['timings']['load']`` written.

    Raises
    ------
    InputError
        Not an h5ad/HDF5 file, truncated or corrupt, no cells or genes, scaled (negative) or non-finite
        values, or too large for the memory available. The message is one line starting with the path.
    """
    path = Path(path)
    start = time.perf_counter()
    if not path.is_file():
        raise InputError(f"{path}: file not found" if not path.exists() else f"{path}: not a file")
    if path.stat().st_size == 0:
        raise InputError(f"{path}: empty file (0 bytes), not an HDF5/h5ad file")
    try:
        is_hdf5 = h5py.is_hdf5(path)
    except OSError as exc:
        raise InputError(f"{path}: cannot be read ({_one_line(exc)})") from None
    if not is_hdf5:
        raise InputError(f"{path}: not an HDF5/h5ad file")
    try:
        with h5py.File(path, "r") as handle:
            layout = _inspect(handle, path)
    except InputError:
        raise
    except Exception as exc:  # noqa: BLE001 - any h5py failure here means a damaged file
        raise InputError(f"{path}: corrupt or truncated h5ad ({_one_line(exc)})") from None
    if layout["n_obs"] == 0:
        raise InputError(f"{path}: no cells (0 observations)")
    if layout["n_vars"] == 0:
        raise InputError(f"{path}: no genes (0 variables)")
    limit = memory_limit if memory_limit is not None else available_memory_bytes()
    if limit and layout["needed_bytes"] > limit:
        raise InputError(
            f"{path}: too large for memory: reading and processing it needs about "
            f"{_size(layout['needed_bytes'])}, {_size(limit)} available"
        )
    try:
        adata = ad.read_h5ad(path)
    except MemoryError:
        raise InputError(f"{path}: too large for memory: ran out of memory while reading it") from None
    except Exception as exc:  # noqa: BLE001 - anndata raises many types for damaged files
        raise InputError(f"{path}: corrupt or truncated h5ad ({_one_line(exc)})") from None
    if adata.n_obs == 0:
        raise InputError(f"{path}: no cells (0 observations)")
    if adata.n_vars == 0:
        raise InputError(f"{path}: no genes (0 variables)")

    adata.uns.pop(PROVENANCE_KEY, None)  # an input written by an earlier run: this run keeps its own record
    adata, counts = _select_matrix(adata, path)
    record = provenance(adata)
    record["input"] = {"file": str(path), "n_cells": int(adata.n_obs), "n_genes": int(adata.n_vars), **counts}
    if not counts["is_counts"]:
        source = "X" if counts["counts_source"] == "none" else "raw.X"
        warn(adata, f"{source} is already log-normalised (non-integer values, no raw counts found): "
                    "normalisation was skipped")
    if not adata.obs_names.is_unique:
        n_dup = int(adata.obs_names.duplicated().sum())
        adata.obs_names_make_unique()
        warn(adata, f"{n_dup} duplicated cell names (obs_names) were made unique (suffix -1, -2, ...)")
    _use_gene_symbols(adata, path)
    if not adata.var_names.is_unique:
        n_dup = int(adata.var_names.duplicated().sum())
        adata.var_names_make_unique()
        warn(adata, f"{n_dup} duplicated gene names were made unique (suffix -1, -2, ...)")
    _check_species_case(adata, species)
    if sp.issparse(adata.X) and adata.X.format != "csr":
        adata.X = sp.csr_matrix(adata.X)
    if adata.X.dtype != np.float32:
        adata.X = adata.X.astype(np.float32)
    record["timings"]["load"] = round(time.perf_counter() - start, 3)
    return adata


def _use_gene_symbols(adata: ad.AnnData, path: Path) -> None:
    names = adata.var_names.astype(str)
    ensembl_share = np.mean([bool(ENSEMBL_ID.match(n)) for n in names[:2000]])
    record = provenance(adata)["input"]
    record["symbol_source"] = "var_names"
    if ensembl_share < 0.5:
        return
    columns = {str(column).lower(): column for column in adata.var.columns}
    for wanted in SYMBOL_COLUMNS:
        column = columns.get(wanted)
        if column is None:
            continue
        values = adata.var[column]
        symbols = values.astype(str).to_numpy(dtype=object)
        missing = values.isna().to_numpy() | np.isin(symbols, ["", "nan", "None", "NaN"])
        if missing.all() or np.mean([bool(ENSEMBL_ID.match(s)) for s in symbols[~missing][:2000]]) >= 0.5:
            continue  # empty, or ids again
        adata.var["gene_ids"] = names.to_numpy()
        adata.var_names = np.where(missing, names.to_numpy(dtype=object), symbols)
        record["symbol_source"] = f"var['{column}']"
        return
    record["symbol_source"] = "ensembl_ids"
    warn(
        adata,
        f"{path.name}: gene names are Ensembl ids and no symbol column was found "
        f"(looked for {', '.join(SYMBOL_COLUMNS)}); marker names will be ids and annotation will suffer",
    )


def _sample_values(matrix) -> np.ndarray:
    n_rows = min(matrix.shape[0], SAMPLE_ROWS)
    if not sp.issparse(matrix):
        n_rows = min(n_rows, max(1, SAMPLE_DENSE_VALUES // max(1, matrix.shape[1])))
    rows = matrix[:n_rows]
    if sp.issparse(rows):
        return np.asarray(rows.data)
    return np.asarray(rows).ravel()


def _kind(matrix) -> str:
    """``"counts"``, ``"lognorm"`` (non-negative, non-integer), ``"negative"`` or ``"nonfinite"``."""
    values = _sample_values(matrix)
    if values.size == 0:
        return "counts"
    if not np.issubdtype(values.dtype, np.number) or np.issubdtype(values.dtype, np.complexfloating):
        return "nonfinite"
    if np.issubdtype(values.dtype, np.integer):
        return "counts" if values.min() >= 0 else "negative"
    if not np.isfinite(values).all():
        return "nonfinite"
    if values.min() < 0:
        return "negative"
    return "counts" if np.all(np.abs(values - np.round(values)) < 1e-6) else "lognorm"


def _select_matrix(adata: ad.AnnData, path: Path) -> tuple[ad.AnnData, dict]:
    """Put counts in ``X`` when any are found, else log-normalised values; return the choice made."""
    x_kind = _kind(adata.X) if adata.X is not None else "missing"
    if x_kind == "counts":
        return adata, {"is_counts": True, "counts_source": "X"}
    if "counts" in adata.layers and _kind(adata.layers["counts"]) == "counts":
        adata.X = adata.layers["counts"]
        del adata.layers["counts"]  # qc stores a copy of the filtered counts there again
        return adata, {"is_counts": True, "counts_source": "layers['counts']"}
    raw_kind = _kind(adata.raw.X) if adata.raw is not None else "missing"
    if raw_kind == "counts":
        return _from_raw(adata), {"is_counts": True, "counts_source": "raw.X"}
    if x_kind == "lognorm" and not (raw_kind == "lognorm" and adata.raw.n_vars > adata.n_vars):
        return adata, {"is_counts": False, "counts_source": "none"}
    if raw_kind == "lognorm":  # X scaled, or a gene subset of raw (as after HVG selection)
        return _from_raw(adata), {"is_counts": False, "counts_source": "none (log-normalised raw.X)"}
    if x_kind == "missing":
        raise InputError(f"{path}: no expression matrix (X is empty and there is no counts layer or raw)")
    if x_kind == "nonfinite":
        raise InputError(f"{path}: X holds NaN, infinite or non-numeric values; provide raw counts")
    raise InputError(
        f"{path}: X holds negative values (scaled data) and no counts were found in layers['counts'] or raw; "
        "provide raw counts or log-normalised data"
    )


def _from_raw(adata: ad.AnnData) -> ad.AnnData:
    """``adata`` with ``raw.X`` as ``X`` (and ``raw.var`` as ``var`` when raw holds other genes)."""
    raw = adata.raw
    if raw.n_vars == adata.n_vars and raw.var_names.equals(adata.var_names):
        adata.X = raw.X.copy()
        adata.raw = None
        return adata
    return ad.AnnData(
        X=raw.X.copy(),
        obs=adata.obs,
        var=raw.var.copy(),
        uns=dict(adata.uns),
        obsm=dict(adata.obsm),
    )


def _check_species_case(adata: ad.AnnData, species: str) -> None:
    names = [n for n in adata.var_names[:3000] if n[:1].isalpha() and not ENSEMBL_ID.match(n)]
    if not names:
        return
    title = np.mean([n[0].isupper() and n[1:] == n[1:].lower() and not n.isupper() for n in names])
    upper = np.mean([n.isupper() for n in names])
    species = species.lower()
    if species == "human" and title > 0.5:
        warn(adata, "gene symbols look like mouse symbols (title case) but species is human")
    elif species == "mouse" and upper > 0.8:
        warn(adata, "gene symbols are upper case (human style) but species is mouse")


def _one_line(exc: BaseException) -> str:
    detail = exc.args[0] if isinstance(exc, KeyError) and len(exc.args) == 1 else exc  # KeyError str() is a repr
    text = " ".join(str(detail).split()) or type(exc).__name__
    return text if len(text) <= MAX_DETAIL else text[: MAX_DETAIL - 3] + "..."


def _size(n_bytes: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n_bytes < 1024 or unit == "GiB":
            return f"{n_bytes:.0f} {unit}" if unit == "B" else f"{n_bytes:.1f} {unit}"
        n_bytes /= 1024
    return f"{n_bytes:.1f} GiB"


@contextmanager
def atomic_path(target: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``target``; on success it is renamed onto ``target``."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, target)
    finally:
        tmp_path.unlink(missing_ok=True)


def write_text(target: str | Path, text: str) -> None:
    """Write text atomically."""
    with atomic_path(target) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(target: str | Path, payload: Any) -> None:
    """Write JSON atomically (UTF-8, indented)."""
    write_text(target, json.dumps(payload, indent=2, ensure_ascii=False, default=_json_default) + "\n")


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")
