"""Example input built offline from the small PBMC dataset that ships inside scanpy's wheel."""

from __future__ import annotations

from pathlib import Path

import anndata as ad
import numpy as np
import scanpy as sc
import scipy.sparse as sp


def pbmc68k_counts() -> ad.AnnData:
    """scanpy's ``pbmc68k_reduced`` (700 cells, 765 genes) with its raw counts recovered.

    ``.raw`` holds ``log1p(counts / n_counts * 1e4)``, so ``round(expm1(raw.X) * n_counts / 1e4)`` gives
    back the integer counts. ``obs['bulk_labels']`` (the published cell types) is kept.
    """
    reduced = sc.datasets.pbmc68k_reduced()
    raw = reduced.raw.to_adata()
    x = raw.X.toarray() if sp.issparse(raw.X) else np.asarray(raw.X)
    counts = np.round(np.expm1(x) * reduced.obs["n_counts"].to_numpy()[:, None] / 1e4)
    return ad.AnnData(
        X=sp.csr_matrix(counts.astype(np.float32)),
        obs=reduced.obs[["bulk_labels"]].copy(),
        var=raw.var[[]].copy(),
    )


def write_example_data(data_dir: str | Path) -> list[Path]:
    """Write the example batch: ``{data_dir}/blood/`` with the counts and a log-normalised copy.

    Returns the files written (existing files are left as they are).
    """
    folder = Path(data_dir) / "blood"
    folder.mkdir(parents=True, exist_ok=True)
    counts = pbmc68k_counts()
    lognorm = counts.copy()
    sc.pp.normalize_total(lognorm, target_sum=1e4)
    sc.pp.log1p(lognorm)
    lognorm.uns = {}
    written = []
    for name, data in (("PBMC68k_counts", counts), ("PBMC68k_lognorm", lognorm)):
        path = folder / f"{name}.h5ad"
        if not path.exists():
            data.write_h5ad(path)
        written.append(path)
    return written


if __name__ == "__main__":
    import sys

    for path in write_example_data(sys.argv[1] if len(sys.argv) > 1 else "example_data"):
        print(path)
