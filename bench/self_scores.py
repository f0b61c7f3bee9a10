"""Self-scores of a folder of labelled h5ads, with and without ``batch_key``: the run scored against the labels the
data already carry, and its clusters against the true cell types.

The folder (written here, offline): scanpy's bundled ``pbmc68k_reduced`` with its raw counts recovered and its
published ``bulk_labels`` as the author labels, and synthetic multi-donor data with a known donor effect
(``tests/synthetic.py``'s ``make_donors``: each donor raises its own 20 genes 3-fold in every cell) whose true
cell types are the author labels. Every multi-donor dataset is listed twice in one manifest: with
``batch_key=donor`` (genes per batch, Harmony) and without. One real ``run_batch.py --manifest`` run (offline
reference annotator), then per dataset: the shares of cells whose call is exact / partially correct / of the
same lineage / wrong through the Cell Ontology (``batch_summary.csv``), and the adjusted Rand index of the
clusters against the true cell types (``{dataset}_annotated.h5ad``).

    .venv/bin/python bench/self_scores.py [--workers 1] [--keep DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import _common

#: name -> (make_donors options); each is run with and without batch_key
DONOR_DATASETS = {
    "two_donors": {"n_cells": 400, "seed": 0},
    "three_donors_nk_in_one": {"n_cells": 600, "donors": ("donor_A", "donor_B", "donor_C"),
                               "only_in": {"NK cell": "donor_C"}, "seed": 1},
}
NK = {"NK cell": ["NKG7", "GNLY", "PRF1", "GZMB", "KLRD1", "KLRF1"]}


def write_inputs(folder: Path) -> tuple[Path, dict[str, tuple[Path, str]]]:
    """The h5ads and their manifest; returns the manifest and, per dataset, its input and true-label column."""
    from cassia_helpers.example_data import pbmc68k_counts
    from tests.synthetic import BLOOD_TYPES, make_donors, write

    truth: dict[str, tuple[Path, str]] = {}
    rows = ["path,tissue,label_key,batch_key,dataset"]
    pbmc = write(pbmc68k_counts(), folder / "pbmc68k.h5ad")
    rows.append("pbmc68k.h5ad,blood,bulk_labels,,pbmc68k")
    truth["pbmc68k"] = (pbmc, "bulk_labels")
    for name, options in DONOR_DATASETS.items():
        adata = make_donors(cell_types={**BLOOD_TYPES, **NK}, **options)
        path = write(adata, folder / f"{name}.h5ad")
        rows += [f"{path.name},blood,truth,donor,{name}", f"{path.name},blood,truth,,{name}_without_batch_key"]
        truth[name] = truth[f"{name}_without_batch_key"] = (path, "truth")
    manifest = folder / "datasets.csv"
    manifest.write_text("\n".join(rows) + "\n")
    return manifest, truth


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--keep", type=Path, help="write the inputs and the run folder here (default: a temp dir)")
    args = parser.parse_args()
    _common.ensure_path()
    import anndata as ad
    import pandas as pd
    from sklearn.metrics import adjusted_rand_score

    with tempfile.TemporaryDirectory() as scratch:
        root = (args.keep or Path(scratch)).resolve()
        root.mkdir(parents=True, exist_ok=True)
        manifest, truth = write_inputs(root / "inputs")
        start = time.perf_counter()
        env = {**{k: v for k, v in os.environ.items() if k not in ("OPENAI_API_KEY", "OPENAI_BASE_URL")},
               "PYTHONPATH": str(_common.ROOT)}
        done = subprocess.run([sys.executable, str(_common.ROOT / "run_batch.py"), "--manifest", str(manifest),
                               "--annotator", "reference", "--min-genes", "100", "--workers", str(args.workers),
                               "--output-dir", str(root / "runs"), "--quiet"], env=env, capture_output=True,
                              text=True)
        seconds = time.perf_counter() - start
        if done.returncode != 0:
            print(done.stderr, file=sys.stderr)
            return done.returncode
        run = Path(done.stdout.strip().splitlines()[-1])
        summary = pd.read_csv(run / "batch_summary.csv").set_index("dataset")
        rows = []
        for name in summary.index:
            path, column = truth[name]
            out = ad.read_h5ad(run / "blood" / name / f"{name}_annotated.h5ad")
            labels = ad.read_h5ad(path).obs.loc[out.obs_names, column].astype(str)
            row = summary.loc[name]
            batches = json.loads((run / "blood" / name / f"{name}_result.json").read_text()).get("batches")
            rows.append([name, batches["batch_key"] if batches else "-", int(row["n_cells"]), int(row["n_clusters"]),
                         int(row["scored_cells"]),
                         *(f"{100 * row[f'self_{s}']:.1f}%" for s in ("exact", "partial", "lineage", "wrong")),
                         f"{adjusted_rand_score(labels, out.obs['leiden'].astype(str)):.3f}",
                         len(batches["single_batch_clusters"]) if batches else "-"])
    _common.print_table(rows, ["dataset", "batch_key", "cells", "clusters", "scored", "exact", "partial", "lineage",
                               "wrong", "ARI vs truth", "one-donor clusters"])
    print(f"one run_batch.py run of {len(rows)} datasets in {seconds:.0f} s (reference annotator, offline)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
