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
SYMBOL_COLUMNS = ("gene_symbols", "gene_symbol", "feature_name", "gene_name", "gene_names", "symbol", "symbols")
# A dataset needs about this many times its matrix's size while it is processed (counts layer,
# normalised copy, kNN search, marker tests).
MEMORY_OVERHEAD = 3.0


class InputError(ValueError):
    """The input file cannot be processed; the message is one line naming the file."""


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
    except OSError:
        return None
    return None


def estimate_matrix_bytes(path: Path) -> int:
    """In-memory size of ``X`` as stored in the h5ad (float32 values + int32 indices when sparse)."""
    with h5py.File(path, "r") as handle:
        if "X" not in handle:
            return 0
        x = handle["X"]
        if isinstance(x, h5py.Group):
            nnz = x["data"].shape[0]
            return nnz * 8 + (x["indptr"].shape[0] * 8)
        return int(np.prod(x.shape)) * 4


def read_dataset(path: str | Path, *, species: str = "human", memory_limit: int | None = None) -> ad.AnnData:
    """Read one input h5ad and make it ready for the pipeline.

    Finds gene symbols (``var_names``, or a ``var`` column such as ``gene_symbols`` or ``feature_name``
    when ``var_names`` are Ensembl ids), makes gene names unique, and detects whether ``X`` holds raw
    counts or log-normalised values (``.layers['counts']`` or an integer ``.raw`` are used as counts
    when ``X`` is normalised).

    Writes ``uns['cassia_batch']['input']`` (file, shape, ``is_counts``, symbol source) and warnings.

    Raises
    ------
    InputError
        Not an h5ad/HDF5 file, truncated or corrupt, no cells or genes, scaled (negative) values,
        or a matrix too large for the memory available.
    """
    path = Path(path)
    start = time.perf_counter()
    if not path.is_file():
        raise InputError(f"{path}: file not found")
    if not h5py.is_hdf5(path):
        raise InputError(f"{path}: not an HDF5/h5ad file")
    limit = memory_limit if memory_limit is not None else available_memory_bytes()
    try:
        needed = estimate_matrix_bytes(path) * MEMORY_OVERHEAD
    except Exception as exc:  # noqa: BLE001 - any h5py failure here means a damaged file
        raise InputError(f"{path}: corrupt or truncated h5ad ({_one_line(exc)})") from None
    if limit and needed > limit:
        raise InputError(
            f"{path}: too large for memory: processing needs about {needed / 2**30:.1f} GiB, "
            f"{limit / 2**30:.1f} GiB available"
        )
    try:
        adata = ad.read_h5ad(path)
    except Exception as exc:  # noqa: BLE001 - anndata raises many types for damaged files
        raise InputError(f"{path}: corrupt or truncated h5ad ({_one_line(exc)})") from None
    if adata.n_obs == 0:
        raise InputError(f"{path}: no cells (0 observations)")
    if adata.n_vars == 0:
        raise InputError(f"{path}: no genes (0 variables)")

    record = provenance(adata)
    record["input"] = {"file": str(path), "n_cells": int(adata.n_obs), "n_genes": int(adata.n_vars)}
    _use_gene_symbols(adata, path)
    _find_counts(adata, path)
    if not adata.var_names.is_unique:
        n_dup = int(adata.var_names.duplicated().sum())
        adata.var_names_make_unique()
        warn(adata, f"{n_dup} duplicated gene names were made unique (suffix -1, -2, ...)")
    _check_species_case(adata, species)
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
    for column in SYMBOL_COLUMNS:
        if column in adata.var.columns:
            symbols = adata.var[column].astype(str)
            missing = symbols.isin(["", "nan", "None"]) | adata.var[column].isna().to_numpy()
            symbols = symbols.where(~missing, names)
            adata.var["gene_ids"] = names.to_numpy()
            adata.var_names = symbols.to_numpy()
            record["symbol_source"] = f"var['{column}']"
            return
    record["symbol_source"] = "ensembl_ids"
    warn(
        adata,
        f"{path.name}: gene names are Ensembl ids and no symbol column was found "
        f"(looked for {', '.join(SYMBOL_COLUMNS)}); marker names will be ids and annotation will suffer",
    )


def _sample_values(matrix) -> np.ndarray:
    rows = matrix[: min(matrix.shape[0], 2000)]
    if sp.issparse(rows):
        return np.asarray(rows.data)
    return np.asarray(rows).ravel()


def _is_counts(matrix) -> bool:
    values = _sample_values(matrix)
    if values.size == 0:
        return True
    return bool(values.min() >= 0 and np.all(np.abs(values - np.round(values)) < 1e-6))


def _find_counts(adata: ad.AnnData, path: Path) -> None:
    record = provenance(adata)["input"]
    if _is_counts(adata.X):
        record["is_counts"] = True
        record["counts_source"] = "X"
        return
    if "counts" in adata.layers and _is_counts(adata.layers["counts"]):
        adata.X = adata.layers["counts"]
        record["is_counts"] = True
        record["counts_source"] = "layers['counts']"
        return
    if adata.raw is not None and adata.raw.n_vars == adata.n_vars and _is_counts(adata.raw.X):
        adata.X = adata.raw.X.copy()
        adata.raw = None
        record["is_counts"] = True
        record["counts_source"] = "raw.X"
        return
    values = _sample_values(adata.X)
    if values.size and values.min() < 0:
        raise InputError(
            f"{path}: X holds negative values (scaled data); provide raw counts or log-normalised data"
        )
    record["is_counts"] = False
    record["counts_source"] = "none"
    warn(adata, "X is already log-normalised (non-integer values): normalisation was skipped")


def _check_species_case(adata: ad.AnnData, species: str) -> None:
    names = [n for n in adata.var_names[:3000] if n[:1].isalpha()]
    if not names:
        return
    title = np.mean([n[0].isupper() and n[1:] == n[1:].lower() and not n.isupper() for n in names])
    upper = np.mean([n.isupper() for n in names])
    if species == "human" and title > 0.5:
        warn(adata, "gene symbols look like mouse symbols (title case) but species is human")
    elif species == "mouse" and upper > 0.8:
        warn(adata, "gene symbols are upper case (human style) but species is mouse")


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text[:300]


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
