#!/usr/bin/env python
"""Our per-dataset pipeline vs the scanpy tutorial pipeline, same data, same machine, same run.

What runs (each pipeline in its own subprocess, one after the other, so that peak RSS is per pipeline
and neither warms the other's caches):

ours (``cassia_helpers``, the template's order, defaults of ``settings.SETTINGS``; annotation
excluded): ``read_dataset`` → ``pp.qc`` (min_genes 200, min_cells 3, max_pct_mt 20; subset in place) →
``pp.normalize`` (1e4, log1p, in place) → ``pp.reduce_dimensions`` (2000 HVG seurat, PCA 50 comps from
a blocked covariance, no scaling) → ``pp.neighbors`` (15) → ``pp.cluster`` (leiden igraph, res 1) →
``split_mixed_clusters`` (the offline reference's split of clusters holding several populations) →
``pp.umap`` → ``rank_markers`` (wilcoxon on ≤1000 sampled cells per cluster, genes detected in ≥ 10% of
some cluster) → ``cluster_markers``. The counts layer is written with the h5ad, which this bench skips.

tutorial (the classic scanpy PBMC tutorial with defaults): ``sc.read_h5ad`` → ``filter_cells(min_genes=200)``
→ ``filter_genes(min_cells=3)`` → ``normalize_total(target_sum=1e4)`` → ``log1p`` →
``highly_variable_genes()`` (seurat, min_mean 0.0125, max_mean 3, min_disp 0.5) → ``adata.raw = adata``;
subset to HVGs → ``scale(max_value=10)`` (dense) → ``pca(svd_solver="arpack")`` → ``neighbors()`` →
``leiden(flavor="igraph", n_iterations=2)`` → ``umap()`` → ``rank_genes_groups(method="wilcoxon")`` on
all cells (``.raw``, all genes).

How to read the output:

* step table: wall seconds per step; ``tut/ours`` > 1 means ours is faster. ``peak RSS`` is the
  subprocess's ``ru_maxrss`` (from ``os.wait4``, i.e. the whole process including the interpreter and
  imports); the per-step "peak so far" column shows which step raised it. ``ours/tut`` < 1 means ours
  is leaner.
* quality table: cells kept by QC, number of leiden clusters, ARI of each clustering against the known
  cell types (``obs['cell_type']``, the source label of every synthetic cell; computed on the cells that
  pipeline kept) and ARI between the two clusterings (cells kept by both); kNN recall: the share of the
  exact 15 nearest neighbours of 2,000 random cells (brute force in that pipeline's own ``X_pca``) that its
  graph holds.
* marker table (top-50 overlap per cell type), defined precisely:

  1. each cluster of a pipeline is mapped to the cell type that is the majority of its cells;
  2. for each cell type T that is the majority of at least one cluster in BOTH pipelines, take in each
     pipeline the LARGEST cluster mapped to T and its top-50 ranked genes (the wilcoxon score order of
     ``rank_genes_groups``; for ours the ``rank`` column of ``rank_markers`` before the p-value/logFC
     filter of ``cluster_markers``, so both lists are pure rankings);
  3. ``overlap@50`` = |A ∩ B| of those two lists (0-50); ``union J`` = Jaccard index of the unions of the
     top-50 lists of ALL clusters mapped to T in each pipeline.

  Types that are the majority of no cluster in a pipeline show "-" (they were merged into other types'
  clusters, typical for the overlapping T-cell labels of pbmc68k).

Threads: OMP/OpenBLAS/MKL/NUMBA_NUM_THREADS and ``sc.settings.n_jobs`` are set to the usable cores
(2 here) in both subprocesses (override with ``--threads``).

Width: ``--extra-genes 19235`` runs both on datasets widened to 20,000 genes (``scale_data.py``), the
width of real 10x data, where the matrix-bound costs (memory above all) show as they would in practice.

The tutorial is skipped for a size when its estimated peak memory (extrapolated linearly from a smaller
size measured in the same run, else ~ cells × min(genes, 5000) × 12 bytes for the dense scaled HVG matrix
and its temporaries, plus the sparse copies) exceeds 85% of MemAvailable, or when ``--tutorial-max-cells``
is below the size; the output says which.

Usage::

    python bench/pipeline_vs_tutorial.py --cells 10000 100000
    python bench/pipeline_vs_tutorial.py --cells 1000000 --tutorial-max-cells 100000
    python bench/pipeline_vs_tutorial.py --cells 100000 --extra-genes 19235
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import _common

STEPS = ["load", "qc", "normalize", "hvg/scale/pca", "neighbors", "leiden", "split mixed", "umap", "markers"]


# --------------------------------------------------------------------------- worker side


class _Steps:
    def __init__(self):
        import psutil

        self.proc = psutil.Process()
        self.rows: list[dict] = []
        self.detail: dict[str, float] = {}

    def run(self, name, func, *args, **kwargs):
        start, cpu0 = time.perf_counter(), _cpu()
        result = func(*args, **kwargs)
        seconds, cpu = time.perf_counter() - start, _cpu() - cpu0
        self.rows.append({"step": name, "seconds": seconds, "cpu": cpu, "rss": self.proc.memory_info().rss,
                          "peak": _common.peak_rss_bytes(), "load": os.getloadavg()[0]})
        print(f"  {name:14s} {seconds:8.2f} s  cpu {cpu:8.2f} s  rss {_common.gib(self.rows[-1]['rss']):.2f} GiB"
              f"  load {os.getloadavg()[0]:.1f}", flush=True)
        return result

    def sub(self, name, func, *args, **kwargs):
        start = time.perf_counter()
        result = func(*args, **kwargs)
        self.detail[name] = time.perf_counter() - start
        return result


def _cpu() -> float:
    import resource

    u = resource.getrusage(resource.RUSAGE_SELF)
    return u.ru_utime + u.ru_stime


def _ours(path: str, steps: _Steps):
    import cassia_helpers as ch
    from cassia_helpers.settings import Settings

    p = Settings()
    adata = steps.run("load", ch.read_dataset, path, species=p.species)
    steps.run("qc", ch.pp.qc, adata, min_genes=p.min_genes, min_cells=p.min_cells, max_pct_mt=p.max_pct_mt)
    steps.run("normalize", ch.pp.normalize, adata, target_sum=p.target_sum)
    steps.run("hvg/scale/pca", ch.pp.reduce_dimensions, adata, n_top_genes=p.n_top_genes, n_pcs=p.n_pcs)
    steps.run("neighbors", ch.pp.neighbors, adata, n_neighbors=p.n_neighbors, seed=p.seed)
    steps.run("leiden", ch.pp.cluster, adata, resolution=p.resolution, seed=p.seed)
    steps.run("split mixed", ch.split_mixed_clusters, adata, species=p.species, tissue="blood", seed=p.seed)
    steps.run("umap", ch.pp.umap, adata, seed=p.seed)

    def markers():
        table = ch.rank_markers(adata, method=p.marker_method, max_cells_per_cluster=p.max_cells_per_cluster or None,
                                seed=p.seed)
        ch.cluster_markers(adata, table, n_top=p.n_markers, max_pval_adj=p.marker_max_pval_adj,
                           min_logfc=p.marker_min_logfc)
        return table

    table = steps.run("markers", markers)
    top = {str(c): rows.sort_values("rank")["gene"].head(50).astype(str).tolist()
           for c, rows in table.groupby("cluster", sort=False)}
    extra = {"n_hvg": int(adata.var["highly_variable"].sum()), "n_genes": int(adata.n_vars),
             "memory_in_adata": _adata_bytes(adata)}
    return adata, "leiden", top, extra


def _tutorial(path: str, steps: _Steps):
    import scanpy as sc

    def load():
        return sc.read_h5ad(path)

    adata = steps.run("load", load)

    def qc():
        sc.pp.filter_cells(adata, min_genes=200)
        sc.pp.filter_genes(adata, min_cells=3)

    steps.run("qc", qc)

    def normalize():
        sc.pp.normalize_total(adata, target_sum=1e4)
        sc.pp.log1p(adata)

    steps.run("normalize", normalize)

    def reduce():
        nonlocal adata
        steps.sub("hvg", sc.pp.highly_variable_genes, adata)
        adata.raw = adata
        adata = adata[:, adata.var["highly_variable"]].copy()
        steps.sub("scale", sc.pp.scale, adata, max_value=10)
        steps.sub("pca", sc.pp.pca, adata, svd_solver="arpack")

    steps.run("hvg/scale/pca", reduce)
    steps.run("neighbors", sc.pp.neighbors, adata)
    steps.run("leiden", sc.tl.leiden, adata, flavor="igraph", n_iterations=2, directed=False)
    steps.run("umap", sc.tl.umap, adata)
    steps.run("markers", sc.tl.rank_genes_groups, adata, "leiden", method="wilcoxon")
    names = adata.uns["rank_genes_groups"]["names"]
    top = {str(g): [str(x) for x in names[g][:50]] for g in names.dtype.names}
    extra = {"n_hvg": int(adata.n_vars), "n_genes": int(adata.raw.n_vars), "memory_in_adata": _adata_bytes(adata)}
    return adata, "leiden", top, extra


def _adata_bytes(adata) -> dict:
    """Bytes held by X, layers, raw and the graphs (what the AnnData itself keeps at the end)."""
    import numpy as np
    import scipy.sparse as sp

    def size(m):
        if m is None:
            return 0
        if sp.issparse(m):
            return int(m.data.nbytes + m.indices.nbytes + m.indptr.nbytes)
        return int(np.asarray(m).nbytes)

    out = {"X": size(adata.X)}
    for k in adata.layers:
        out[f"layers/{k}"] = size(adata.layers[k])
    if adata.raw is not None:
        out["raw.X"] = size(adata.raw.X)
    for k in adata.obsp:
        out[f"obsp/{k}"] = size(adata.obsp[k])
    for k in adata.obsm:
        out[f"obsm/{k}"] = size(adata.obsm[k])
    return out


def knn_recall(adata, *, n_sample: int = 2000, seed: int = 0) -> dict:
    """The share of the exact nearest neighbours (in ``obsm['X_pca']``) that ``obsp['distances']`` holds.

    Computed for ``n_sample`` random cells against all cells (brute force, float64, a few rows at a time so
    that its scratch memory stays under ~50 MB up to 100k cells and does not raise the pipeline's peak RSS); a
    cell's own row counts its stored neighbours.
    """
    import numpy as np

    x = np.asarray(adata.obsm["X_pca"], dtype=np.float64)
    graph = adata.obsp["distances"].tocsr()
    cells = np.random.default_rng(seed).choice(adata.n_obs, min(n_sample, adata.n_obs), replace=False)
    norms = np.einsum("ij,ij->i", x, x)
    found = wanted = 0
    step = max(16, 2_000_000 // adata.n_obs)
    for start in range(0, len(cells), step):
        rows = cells[start:start + step]
        distance = x[rows] @ x.T
        distance *= -2
        distance += norms[None, :]
        distance += norms[rows, None]
        distance[np.arange(len(rows)), rows] = np.inf  # a cell is not its own neighbour in scanpy's graph
        for i, cell in enumerate(rows):
            approx = graph.indices[graph.indptr[cell]:graph.indptr[cell + 1]]
            exact = np.argpartition(distance[i], len(approx))[:len(approx)]
            found += len(np.intersect1d(approx, exact))
            wanted += len(approx)
    return {"recall": found / max(wanted, 1), "cells": int(len(cells))}


def worker(kind: str, path: str, result: str, threads: int) -> int:
    import numpy as np
    import scanpy as sc

    sc.settings.n_jobs = threads
    sc.settings.verbosity = 0
    steps = _Steps()
    adata, key, top, extra = (_ours if kind == "ours" else _tutorial)(path, steps)
    index = adata.obs_names.str.replace("cell", "", regex=False).astype(np.int64).to_numpy()
    # read_dataset keeps an input's own cell_type column as author_cell_type (the run writes cell_type)
    truth = "author_cell_type" if "author_cell_type" in adata.obs else "cell_type"
    np.savez(result + ".npz", index=index, labels=adata.obs[key].astype(str).to_numpy().astype("U"),
             cell_type=adata.obs[truth].astype(str).to_numpy().astype("U"))
    payload = {"kind": kind, "steps": steps.rows, "detail": steps.detail, "n_cells": int(adata.n_obs),
               "n_clusters": int(adata.obs[key].nunique()), "top50": top, "knn": knn_recall(adata), **extra}
    Path(result).write_text(json.dumps(payload))
    return 0


# --------------------------------------------------------------------------- driver side


def _run_child(kind: str, path: Path, result: Path, threads: int, log: Path) -> dict:
    env = dict(os.environ)
    cmd = [sys.executable, __file__, "--_worker", kind, "--_data", str(path), "--_result", str(result),
           "--threads", str(threads)]
    start = time.perf_counter()
    with open(log, "w") as handle:
        proc = subprocess.Popen(cmd, stdout=handle, stderr=subprocess.STDOUT, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        return {"kind": kind, "failed": f"exit code {proc.returncode} (see {log})", "wall": wall,
                "peak_rss": usage.ru_maxrss * 1024}
    data = json.loads(result.read_text())
    data["wall"] = wall
    data["cpu_total"] = usage.ru_utime + usage.ru_stime
    data["peak_rss"] = usage.ru_maxrss * 1024
    data["npz"] = str(result) + ".npz"
    return data


def _estimate_tutorial_bytes(n_cells: int, path: Path, measured: dict[int, int]) -> tuple[int, str]:
    if measured:
        ref = max(measured)
        return int(measured[ref] * n_cells / ref), f"linear from {ref:,} cells"
    import h5py

    with h5py.File(path, "r") as f:
        nnz = f["X"]["data"].shape[0]
        n_genes = int(f["X"].attrs["shape"][1])
    # the dense scaled matrix holds the highly variable genes only (a few thousand at most)
    dense_genes = min(n_genes, 5000)
    return int(n_cells * dense_genes * 12 + nnz * 8 * 4), "cells x min(genes, 5000) x 12 B + 4 sparse copies"


def _available() -> int:
    for line in open("/proc/meminfo"):
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 0


def _ari(a, b) -> float:
    from sklearn.metrics import adjusted_rand_score

    return float(adjusted_rand_score(a, b))


def _quality(res: dict) -> dict:
    import numpy as np

    z = np.load(res["npz"])
    res["_index"], res["_labels"], res["_types"] = z["index"], z["labels"], z["cell_type"]
    return {"ari_types": _ari(res["_types"], res["_labels"])}


def _majority(res: dict) -> dict[str, tuple[str, int]]:
    import pandas as pd

    frame = pd.DataFrame({"cluster": res["_labels"], "type": res["_types"]})
    out = {}
    for cluster, rows in frame.groupby("cluster"):
        out[str(cluster)] = (rows["type"].value_counts().index[0], len(rows))
    return out


def marker_overlap(ours: dict, tut: dict) -> list[list]:
    maj_o, maj_t = _majority(ours), _majority(tut)
    types = sorted({t for t, _ in maj_o.values()} | {t for t, _ in maj_t.values()})
    rows = []
    for t in types:
        co = sorted([(n, c) for c, (tt, n) in maj_o.items() if tt == t], reverse=True)
        ct = sorted([(n, c) for c, (tt, n) in maj_t.items() if tt == t], reverse=True)
        if not co or not ct:
            rows.append([t, _desc(co), _desc(ct), "-", "-"])
            continue
        a, b = set(ours["top50"][co[0][1]]), set(tut["top50"][ct[0][1]])
        ua = set().union(*(ours["top50"][c] for _, c in co))
        ub = set().union(*(tut["top50"][c] for _, c in ct))
        rows.append([t, _desc(co), _desc(ct), f"{len(a & b)}/50", len(ua & ub) / len(ua | ub)])
    return rows


def _desc(clusters) -> str:
    if not clusters:
        return "-"
    n = sum(x for x, _ in clusters)
    return f"{len(clusters)} cl. ({n:,} cells; largest {clusters[0][1]}: {clusters[0][0]:,})"


def report(n_cells: int, ours: dict, tut: dict | None, skip_reason: str) -> None:
    gb = _common.gib
    print(f"\n=== {n_cells:,} cells ===\n")
    for name, res in (("ours", ours), ("tutorial", tut)):
        if res and res.get("failed"):
            print(f"{name} FAILED: {res['failed']}; peak RSS {gb(res['peak_rss']):.2f} GiB")
    if skip_reason:
        print(f"tutorial skipped: {skip_reason}")
    ok_t = tut is not None and not tut.get("failed")
    ok_o = not ours.get("failed")
    rows = []
    so = {r["step"]: r for r in ours.get("steps", [])}
    st = {r["step"]: r for r in tut.get("steps", [])} if ok_t else {}

    def ratio(a, b):
        return f"{a / b:.1f}x" if a is not None and b else "-"

    for step in STEPS:
        o, t = so.get(step), st.get(step)
        rows.append([step, o["seconds"] if o else "-", o.get("cpu", float("nan")) if o else "-",
                     f"{gb(o['peak']):.2f}" if o else "-",
                     t["seconds"] if t else "-", t.get("cpu", float("nan")) if t else "-",
                     f"{gb(t['peak']):.2f}" if t else "-",
                     ratio(t["seconds"] if t else None, o["seconds"] if o else None),
                     ratio(t.get("cpu") if t else None, o.get("cpu") if o else None)])
    tot_o = sum(r["seconds"] for r in ours.get("steps", [])) if ok_o else None
    tot_t = sum(r["seconds"] for r in tut.get("steps", [])) if ok_t else None
    cpu_o = sum(r.get("cpu", 0) for r in ours.get("steps", [])) if ok_o else None
    cpu_t = sum(r.get("cpu", 0) for r in tut.get("steps", [])) if ok_t else None
    rows.append(["total (steps)", tot_o if ok_o else "-", cpu_o if ok_o else "-", "", tot_t if ok_t else "-",
                 cpu_t if ok_t else "-", "", ratio(tot_t, tot_o), ratio(cpu_t, cpu_o)])
    rows.append(["subprocess", ours["wall"], ours.get("cpu_total", float("nan")), "",
                 tut["wall"] if ok_t else "-", tut.get("cpu_total", float("nan")) if ok_t else "-", "",
                 ratio(tut["wall"] if ok_t else None, ours["wall"]),
                 ratio(tut.get("cpu_total") if ok_t else None, ours.get("cpu_total"))])
    mem_ratio = f"{ours['peak_rss'] / tut['peak_rss']:.2f} (ours/tut)" if ok_t else "-"
    rows.append(["peak RSS GiB", gb(ours["peak_rss"]), "", "", gb(tut["peak_rss"]) if ok_t else "-", "", "",
                 mem_ratio, ""])
    _common.print_table(rows, ["step", "ours s", "ours cpu s", "ours peak GiB", "tut s", "tut cpu s",
                               "tut peak GiB", "tut/ours wall", "tut/ours cpu"])
    loads = [r.get("load", 0) for r in ours.get("steps", []) + (tut.get("steps", []) if ok_t else [])]
    if loads:
        print(f"1-min load average at step ends: max {max(loads):.1f} (machine has "
              f"{len(os.sched_getaffinity(0))} cores; > cores means other processes competed for the CPU, "
              f"compare cpu s then)")
    if ok_t and tut.get("detail"):
        print("tutorial hvg/scale/pca detail: " + ", ".join(f"{k} {v:.2f} s" for k, v in tut["detail"].items()))
    if ok_o:
        print("ours AnnData at the end (MiB): " + ", ".join(f"{k} {v / 2**20:.0f}" for k, v in
                                                             ours["memory_in_adata"].items()))
    if ok_t:
        print("tutorial AnnData at the end (MiB): " + ", ".join(f"{k} {v / 2**20:.0f}" for k, v in
                                                                 tut["memory_in_adata"].items()))
    print()
    if not ok_o:
        return
    q_o = _quality(ours)
    rows = [["cells after QC", ours["n_cells"]], ["genes / HVGs used for PCA", f"{ours['n_genes']} / {ours['n_hvg']}"],
            ["leiden clusters", ours["n_clusters"]], ["ARI vs cell types", q_o["ari_types"]],
            [f"kNN recall vs exact ({ours['knn']['cells']:,} cells)", ours["knn"]["recall"]]]
    if ok_t:
        import numpy as np

        q_t = _quality(tut)
        common, io, it = np.intersect1d(ours["_index"], tut["_index"], return_indices=True)
        both = _ari(ours["_labels"][io], tut["_labels"][it])
        rows = [[r[0], r[1], v] for r, v in zip(rows, [tut["n_cells"], f"{tut['n_genes']} / {tut['n_hvg']}",
                                                       tut["n_clusters"], q_t["ari_types"],
                                                       tut["knn"]["recall"]], strict=True)]
        rows.append(["ARI ours vs tutorial", f"{both:.3f} on {len(common):,} common cells", ""])
        rows.append(["ARI ours/tutorial (vs cell types)", f"{q_o['ari_types'] / max(q_t['ari_types'], 1e-12):.2f}", ""])
        _common.print_table(rows, ["quality", "ours", "tutorial"])
        _common.print_table(marker_overlap(ours, tut), ["cell type (majority)", "ours clusters", "tutorial clusters",
                                                        "overlap@50", "union J"])
    else:
        _common.print_table(rows, ["quality", "ours"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=_common.HelpFormatter)
    parser.add_argument("--cells", type=int, nargs="+", default=[10_000], help="dataset sizes")
    parser.add_argument("--out", type=Path, default=_common.DEFAULT_DATA, help="dataset cache (scale_data.py)")
    parser.add_argument("--seed", type=int, default=0, help="dataset seed")
    parser.add_argument("--threads", type=int, default=0, help="threads per pipeline (0: usable cores)")
    parser.add_argument("--tutorial-max-cells", type=int, default=0,
                        help="skip the tutorial above this many cells (0: only the memory check decides)")
    parser.add_argument("--only", choices=["both", "ours", "tutorial"], default="both")
    parser.add_argument("--extra-genes", type=int, default=0,
                        help="synthetic genes added to the 765 real ones (scale_data.py; 19235: 20,000 genes)")
    parser.add_argument("--_worker", choices=["ours", "tutorial"], help=argparse.SUPPRESS)
    parser.add_argument("--_data", help=argparse.SUPPRESS)
    parser.add_argument("--_result", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    threads = _common.set_threads(args.threads or None)
    _common.ensure_path()
    if args._worker:
        return worker(args._worker, args._data, args._result, threads)

    import scale_data

    _common.print_machine()
    print(f"threads per pipeline: {threads} (OMP/OPENBLAS/MKL/NUMBA_NUM_THREADS, sc.settings.n_jobs)")
    print()
    results_dir = args.out / "results"
    results_dir.mkdir(parents=True, exist_ok=True)
    measured_tut: dict[int, int] = {}
    for n in sorted(args.cells):
        path = scale_data.dataset_path(n, out=args.out, seed=args.seed, extra_genes=args.extra_genes)
        tag = f"{n}_genes{765 + args.extra_genes}" if args.extra_genes else str(n)
        ours = tut = None
        skip = ""
        if args.only in ("both", "ours"):
            print(f"[{n:,} cells] ours ...", flush=True)
            ours = _run_child("ours", path, results_dir / f"ours_{tag}.json", threads,
                              results_dir / f"ours_{tag}.log")
            print(f"[{n:,} cells] ours done in {ours['wall']:.1f} s", flush=True)
        if args.only in ("both", "tutorial"):
            need, how = _estimate_tutorial_bytes(n, path, measured_tut)
            avail = _available()
            if args.tutorial_max_cells and n > args.tutorial_max_cells:
                skip = (f"--tutorial-max-cells {args.tutorial_max_cells:,} "
                        f"(estimated peak {_common.gib(need):.1f} GiB, {how})")
            elif need > 0.85 * avail:
                skip = (f"estimated peak {_common.gib(need):.1f} GiB ({how}) > 85% of "
                        f"{_common.gib(avail):.1f} GiB available")
            else:
                print(f"[{n:,} cells] tutorial ...", flush=True)
                tut = _run_child("tutorial", path, results_dir / f"tutorial_{tag}.json", threads,
                                 results_dir / f"tutorial_{tag}.log")
                print(f"[{n:,} cells] tutorial done in {tut['wall']:.1f} s", flush=True)
                if not tut.get("failed"):
                    measured_tut[n] = tut["peak_rss"]
        if ours is None:
            ours = {"failed": "not run (--only tutorial)", "wall": 0.0, "peak_rss": 0}
        report(n, ours, tut, skip)
    return 0


if __name__ == "__main__":
    sys.exit(main())
