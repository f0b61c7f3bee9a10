#!/usr/bin/env python
"""Scale datasets for the benchmarks, built offline from real PBMC cells.

Source: scanpy's bundled ``sc.datasets.pbmc68k_reduced()`` (700 cells; ``.raw`` is log-normalised with
765 genes). Raw counts are recovered as ``round(expm1(raw.X) * obs['n_counts'] / 1e4)``; the cell types
are ``obs['bulk_labels']`` (10 types).

Each synthetic cell:

1. gets a cell type drawn with the real type frequencies;
2. mixes k = 2, 3 or 4 distinct real cells of that SAME type with Dirichlet(1, ..., 1) weights — the
   mix is taken of the cells' normalised profiles (counts / library size);
3. draws a library size from the real library sizes (of the 765 genes) of cells of that type, times a
   log-normal jitter (sigma 0.1);
4. samples its counts as Poisson(library size × mixed profile).

Why mixing and not copying: copies of real cells with added noise are each other's nearest
neighbours, so the kNN graph becomes hundreds of tiny cliques and leiden shatters into them. Mixes
fill the convex hull of each cell type, so the graph looks like real data at any size.

Stored: float32 CSR counts in ``X``, ``obs['cell_type']`` (categorical, the source type),
``obs['n_mixed']``; gene names in ``var_names``. Files are cached as
``{out}/pbmcmix_{cells}_seed{seed}.h5ad`` (default ``bench/.data/``, git-ignored) and rebuilt only with
``--force``. Large sizes are generated and appended to the h5ad in chunks (``--chunk`` cells), so the
1M-cell build never holds the whole matrix in memory.

Caveat for reading the benchmarks: these cells have 765 genes and ~250 detected genes per cell,
far fewer than real 10x data (~20-30k genes, 1-3k detected), so the matrix-bound steps (load, QC,
normalisation, markers) are 5-10x cheaper here than on real data of the same cell
count; the graph-bound steps (PCA on 50 components, kNN, leiden, UMAP) scale with cells, not genes.

``--extra-genes N`` widens the matrix to real-data proportions with N synthetic genes (named
``XG00001``, …): each gene gets a base weight drawn log-normal (sigma 2, so most are rarely detected) and
a per-cell-type factor exp(N(0, 0.5)) (so they carry some cell-type signal); each cell draws
Poisson(4 × its library size) extra counts spread over them in proportion to its type's weights. With
N = 19,235 (20,000 genes in all) a cell has ~1,700 detected genes and ~3,300 counts. Only the 765 real genes come from
real cells: figures on the wide sets measure cost, and quality is still judged on the real genes' signal.
Files: ``pbmcmix_{cells}_seed{seed}_genes{total}.h5ad``.

Usage::

    python bench/scale_data.py --cells 10000 100000 1000000
    python bench/scale_data.py --cells 3000 --out /tmp/data --seed 1
    python bench/scale_data.py --cells 100000 --extra-genes 19235

As a module: ``from scale_data import dataset_path; path = dataset_path(100_000)`` (builds if missing).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import _common

_common.set_threads()
_common.ensure_path()

import h5py  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import scipy.sparse as sp  # noqa: E402

LIB_JITTER = 0.1
EXTRA_COUNTS_PER_REAL_COUNT = 4.0
EXTRA_CELLS_AT_A_TIME = 5_000


def load_source():
    """The 700 real cells: counts (dense float64), labels, library sizes, gene names."""
    import scanpy as sc

    reduced = sc.datasets.pbmc68k_reduced()
    raw = reduced.raw
    x = raw.X.toarray() if sp.issparse(raw.X) else np.asarray(raw.X)
    counts = np.round(np.expm1(x) * reduced.obs["n_counts"].to_numpy()[:, None] / 1e4)
    labels = reduced.obs["bulk_labels"].astype(str).to_numpy()
    libs = counts.sum(axis=1)
    return counts, labels, libs, raw.var_names.to_numpy().astype(str)


def _draw_members(rng, members: np.ndarray, k: np.ndarray) -> np.ndarray:
    """(n, 4) indices into ``members`` (distinct within a row for the first k[i] columns; -1 beyond)."""
    n, m = len(k), len(members)
    idx = rng.integers(0, m, size=(n, 4))
    for _ in range(50):  # reject rows whose used slots repeat a member
        used = np.arange(4)[None, :] < np.minimum(k, m)[:, None]
        s = np.where(used, idx, -1 - np.arange(4)[None, :])
        srt = np.sort(s, axis=1)
        dup = (np.diff(srt, axis=1) == 0).any(axis=1)
        if not dup.any():
            break
        idx[dup] = rng.integers(0, m, size=(int(dup.sum()), 4))
    out = members[idx]
    out[np.arange(4)[None, :] >= k[:, None]] = -1
    return out


def plan(n_cells: int, seed: int, labels: np.ndarray, libs: np.ndarray):
    """Per-cell recipe: type, source cells (n, 4; -1 unused), weights (n, 4), library size."""
    rng = np.random.default_rng(seed)
    types, counts = np.unique(labels, return_counts=True)
    cell_type = rng.choice(len(types), size=n_cells, p=counts / counts.sum())
    k = rng.integers(2, 5, size=n_cells)
    sources = np.full((n_cells, 4), -1, dtype=np.int64)
    lib = np.empty(n_cells)
    for t, name in enumerate(types):
        rows = np.flatnonzero(cell_type == t)
        members = np.flatnonzero(labels == name)
        kk = np.minimum(k[rows], len(members))
        k[rows] = kk
        sources[rows] = _draw_members(rng, members, kk)
        lib[rows] = rng.choice(libs[members], size=len(rows))
    lib *= rng.lognormal(0.0, LIB_JITTER, size=n_cells)
    alpha = np.ones((n_cells, 4))
    weights = rng.gamma(alpha)  # Dirichlet via normalised gammas over the used slots
    weights[sources < 0] = 0.0
    weights /= weights.sum(axis=1, keepdims=True)
    return types[cell_type], k, sources, weights.astype(np.float32), lib.astype(np.float32)


def synth_chunk(rng, profiles: np.ndarray, sources: np.ndarray, weights: np.ndarray, lib: np.ndarray):
    """Counts of one chunk of cells as float32 CSR."""
    mix = np.zeros((len(lib), profiles.shape[1]), dtype=np.float32)
    for j in range(sources.shape[1]):
        used = sources[:, j] >= 0
        mix[used] += weights[used, j, None] * profiles[sources[used, j]]
    mix *= lib[:, None]
    out = np.zeros_like(mix)
    nz = mix > 0
    out[nz] = rng.poisson(mix[nz])
    return sp.csr_matrix(out)


def extra_gene_sampler(n_genes: int, n_types: int, seed: int) -> np.ndarray:
    """Per cell type, the cumulative distribution of extra counts over the ``n_genes`` synthetic genes."""
    rng = np.random.default_rng(seed + 2)
    base = rng.lognormal(0.0, 2.0, size=n_genes)
    weights = base[None, :] * np.exp(rng.normal(0.0, 0.5, size=(n_types, n_genes)))
    cdf = np.cumsum(weights, axis=1)
    return cdf / cdf[:, -1:]


def synth_extra(rng, cdf: np.ndarray, type_codes: np.ndarray, lib: np.ndarray) -> sp.csr_matrix:
    """Counts of the synthetic genes for one chunk of cells (float32 CSR)."""
    parts = []
    for lo in range(0, len(lib), EXTRA_CELLS_AT_A_TIME):
        hi = min(len(lib), lo + EXTRA_CELLS_AT_A_TIME)
        totals = rng.poisson(EXTRA_COUNTS_PER_REAL_COUNT * lib[lo:hi].astype(np.float64))
        rows = np.repeat(np.arange(hi - lo), totals)
        codes = type_codes[lo:hi][rows]
        genes = np.empty(len(rows), dtype=np.int64)
        for t in np.unique(codes):
            draw = codes == t
            genes[draw] = np.searchsorted(cdf[t], rng.random(int(draw.sum())), side="right")
        genes = np.minimum(genes, cdf.shape[1] - 1)
        ones = np.ones(len(rows), dtype=np.float32)
        parts.append(sp.csr_matrix((ones, (rows, genes)), shape=(hi - lo, cdf.shape[1])))
    return sp.vstack(parts, format="csr")


def build(n_cells: int, path: Path, *, seed: int = 0, chunk: int = 100_000, extra_genes: int = 0) -> dict:
    """Build one dataset into ``path`` (written to a temporary file, then renamed). Returns stats."""
    from anndata.io import sparse_dataset, write_elem

    start = time.perf_counter()
    counts, labels, libs, genes = load_source()
    profiles = (counts / counts.sum(axis=1, keepdims=True)).astype(np.float32)
    cell_type, k, sources, weights, lib = plan(n_cells, seed, labels, libs)
    obs = pd.DataFrame(
        {"cell_type": pd.Categorical(cell_type, categories=sorted(set(labels))), "n_mixed": k.astype(np.int8)},
        index=pd.Index([f"cell{i}" for i in range(n_cells)], dtype=object),
    )
    type_names = sorted(set(labels))
    type_codes = pd.Categorical(cell_type, categories=type_names).codes
    cdf = extra_gene_sampler(extra_genes, len(type_names), seed) if extra_genes else None
    genes = np.concatenate([genes, [f"XG{i + 1:05d}" for i in range(extra_genes)]])
    var = pd.DataFrame(index=pd.Index(genes, dtype=object))
    rng = np.random.default_rng(seed + 1)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    nnz = 0
    try:
        with h5py.File(tmp, "w") as f:
            f.attrs["encoding-type"] = "anndata"
            f.attrs["encoding-version"] = "0.1.0"
            write_elem(f, "obs", obs)
            write_elem(f, "var", var)
            for key in ("obsm", "varm", "layers", "obsp", "varp", "uns"):
                write_elem(f, key, {})
            dataset = None
            for lo in range(0, n_cells, chunk):
                hi = min(n_cells, lo + chunk)
                x = synth_chunk(rng, profiles, sources[lo:hi], weights[lo:hi], lib[lo:hi])
                if cdf is not None:
                    x = sp.hstack([x, synth_extra(rng, cdf, type_codes[lo:hi], lib[lo:hi])], format="csr")
                nnz += x.nnz
                if dataset is None:
                    write_elem(f, "X", x)
                    dataset = sparse_dataset(f["X"])
                else:
                    dataset.append(x)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return {
        "cells": n_cells,
        "genes": len(genes),
        "nnz_per_cell": nnz / n_cells,
        "median_library": float(np.median(lib)),
        "seconds": time.perf_counter() - start,
        "peak_rss_gib": _common.gib(_common.peak_rss_bytes()),
        "file_gib": _common.gib(path.stat().st_size),
        "path": str(path),
    }


def file_name(n_cells: int, seed: int, extra_genes: int = 0) -> str:
    wide = f"_genes{765 + extra_genes}" if extra_genes else ""
    return f"pbmcmix_{n_cells}_seed{seed}{wide}.h5ad"


def dataset_path(n_cells: int, *, out: str | Path = _common.DEFAULT_DATA, seed: int = 0, force: bool = False,
                 chunk: int = 100_000, extra_genes: int = 0) -> Path:
    """The cached dataset of ``n_cells`` cells, built first when missing (or ``force``)."""
    path = Path(out) / file_name(n_cells, seed, extra_genes)
    if force or not path.is_file():
        build(n_cells, path, seed=seed, chunk=chunk if not extra_genes else min(chunk, 20_000),
              extra_genes=extra_genes)
    return path


def describe_source() -> dict:
    counts, labels, libs, genes = load_source()
    return {"cells": counts.shape[0], "genes": len(genes), "nnz_per_cell": float((counts > 0).sum(1).mean()),
            "median_library": float(np.median(libs))}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=_common.HelpFormatter)
    parser.add_argument("--cells", type=int, nargs="+", default=[10_000, 100_000, 1_000_000],
                        help="dataset sizes to build")
    parser.add_argument("--out", type=Path, default=_common.DEFAULT_DATA, help="cache folder")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--chunk", type=int, default=100_000, help="cells generated and appended at a time")
    parser.add_argument("--force", action="store_true", help="rebuild even when the file exists")
    parser.add_argument("--extra-genes", type=int, default=0,
                        help="synthetic genes added to the 765 real ones (19235 gives 20,000 genes)")
    args = parser.parse_args(argv)

    _common.print_machine()
    src = describe_source()
    rows = [["source (real)", src["cells"], src["genes"], src["nnz_per_cell"], src["median_library"],
             "", "", "", "pbmc68k_reduced"]]
    for n in args.cells:
        path = args.out / file_name(n, args.seed, args.extra_genes)
        if path.is_file() and not args.force:
            with h5py.File(path, "r") as f:
                nnz = f["X"]["data"].shape[0]
                n_vars = f["X"].attrs["shape"][1]
            rows.append(["cached", n, int(n_vars), nnz / n, "", "", "", _common.gib(path.stat().st_size), str(path)])
            continue
        s = build(n, path, seed=args.seed, chunk=args.chunk if not args.extra_genes else min(args.chunk, 20_000),
                  extra_genes=args.extra_genes)
        rows.append(["built", n, s["genes"], s["nnz_per_cell"], s["median_library"], s["seconds"],
                     s["peak_rss_gib"], s["file_gib"], s["path"]])
        print(f"built {n:,} cells in {s['seconds']:.1f} s", file=sys.stderr, flush=True)
    _common.print_table(rows, ["", "cells", "genes", "nnz/cell", "median lib", "build s", "peak RSS GiB",
                               "file GiB", "path"])
    print("peak RSS is this process's running maximum (the largest build dominates).")
    return 0


if __name__ == "__main__":
    sys.exit(main())
