#!/usr/bin/env python
"""What the split of mixed clusters (``ch.split_mixed_clusters``) costs on a large dataset, next to leiden.

The data are ``bench/scale_data.py``'s mixed real PBMC cells (``--cells``; ``--extra-genes`` widens them); the
pipeline runs with the package's defaults to the leiden clusters, then the split runs as the template runs it.
Prints the seconds of leiden and of the split, and the clusters before and after.

Usage::

    python bench/split_cost.py --cells 100000 --extra-genes 19235
    python bench/split_cost.py --cells 1000000
"""

from __future__ import annotations

import argparse
import time

import _common

_common.set_threads()
_common.ensure_path()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cells", type=int, default=100_000)
    parser.add_argument("--extra-genes", type=int, default=0)
    args = parser.parse_args(argv)

    import scale_data

    import cassia_helpers as ch

    _common.print_machine()
    adata = ch.read_dataset(str(scale_data.dataset_path(args.cells, extra_genes=args.extra_genes)), species="human")
    ch.pp.qc(adata)
    ch.pp.normalize(adata)
    ch.pp.reduce_dimensions(adata)
    ch.pp.neighbors(adata, seed=0)
    began = time.perf_counter()
    ch.pp.cluster(adata, seed=0)
    leiden = time.perf_counter() - began
    before = adata.obs["leiden"].nunique()
    began = time.perf_counter()
    record = ch.split_mixed_clusters(adata, species="human", tissue="blood", seed=0)
    split = time.perf_counter() - began
    print(f"\n{adata.n_obs:,} cells after QC")
    _common.print_table([["leiden", round(leiden, 1), before],
                         ["split of mixed clusters", round(split, 1), record.get("n_clusters_after", before)]],
                        ["step", "s", "clusters after it"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
