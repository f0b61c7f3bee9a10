"""Tiny synthetic count datasets with known cell types, made in memory for the tests."""

from __future__ import annotations

from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

BLOOD_TYPES = {
    "T cell": ["CD3E", "CD3D", "CD2", "IL7R", "TRAC", "CD3G"],
    "B cell": ["MS4A1", "CD79A", "CD79B", "CD19", "BANK1", "CD22"],
    "Monocyte": ["CD14", "LYZ", "FCN1", "S100A8", "S100A9", "CSF1R"],
}
BRAIN_TYPES = {
    "Astrocyte": ["GFAP", "AQP4", "SLC1A3", "ALDH1L1", "SLC1A2", "GJA1"],
    "Oligodendrocyte": ["MBP", "PLP1", "MOG", "MOBP", "MAG", "CLDN11"],
    "Microglia": ["P2RY12", "CX3CR1", "TMEM119", "CSF1R", "C1QA", "AIF1"],
}
BREAST_TYPES = {
    "Luminal epithelial cell": ["KRT8", "KRT18", "EPCAM", "KRT19", "ESR1", "PGR"],
    "Fibroblast": ["COL1A1", "COL1A2", "DCN", "LUM", "PDGFRA", "COL3A1"],
    "Endothelial cell": ["PECAM1", "VWF", "CDH5", "CLDN5", "KDR", "EMCN"],
}


def make_counts(
    n_cells: int = 400,
    *,
    cell_types: dict[str, list[str]] | None = None,
    n_background: int = 400,
    seed: int = 0,
    mouse: bool = False,
) -> ad.AnnData:
    """Poisson counts: a shared background profile, each cell type's markers raised 60-fold.

    ``obs['truth']`` holds the cell type each cell was drawn from.
    """
    rng = np.random.default_rng(seed)
    cell_types = cell_types or BLOOD_TYPES
    markers = list(dict.fromkeys(g for genes in cell_types.values() for g in genes))
    genes = markers + [f"GENE{i}" for i in range(n_background)] + ["MT-CO1", "MT-ND1", "MT-ATP6"]
    base = rng.lognormal(0.0, 1.0, len(genes))
    base /= base.sum()
    index = {g: i for i, g in enumerate(genes)}
    names = list(cell_types)
    labels = rng.choice(names, n_cells)
    profiles = {}
    for name, type_markers in cell_types.items():
        profile = base.copy()
        profile[[index[g] for g in type_markers]] *= 60
        profiles[name] = profile / profile.sum()
    library = rng.integers(1500, 3500, n_cells)
    rows = np.stack([rng.poisson(profiles[label] * size) for label, size in zip(labels, library, strict=True)])
    if mouse:
        genes = [g.capitalize() if not g.startswith("MT-") else "mt-" + g[3:].capitalize() for g in genes]
    return ad.AnnData(
        X=sp.csr_matrix(rows.astype(np.float32)),
        obs=pd.DataFrame({"truth": pd.Categorical(labels)}, index=[f"cell{i}" for i in range(n_cells)]),
        var=pd.DataFrame(index=genes),
    )


def write(adata: ad.AnnData, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    adata.write_h5ad(path)
    return path
