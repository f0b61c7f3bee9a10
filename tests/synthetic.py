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

# ribosomal, mitochondrial and ubiquitous genes (see make_counts(housekeeping=True))
HOUSEKEEPING = ["RPS27", "RPL32", "RPS12", "RPL13", "RPLP1", "MT-CO1", "MT-ND1", "MT-ATP6", "MALAT1", "EEF1A1",
                "TPT1", "TMSB4X"]


def make_counts(
    n_cells: int = 400,
    *,
    cell_types: dict[str, list[str]] | None = None,
    n_background: int = 400,
    seed: int = 0,
    mouse: bool = False,
    housekeeping: bool = False,
) -> ad.AnnData:
    """Poisson counts: a shared background profile, each cell type's markers raised 60-fold.

    ``obs['truth']`` holds the cell type each cell was drawn from. With ``housekeeping``, ribosomal,
    mitochondrial and ubiquitous genes (``HOUSEKEEPING``) are highly expressed everywhere and raised 3-fold
    in the first cell type, as in cells with more RNA: they pass any marker test for that type.
    """
    rng = np.random.default_rng(seed)
    cell_types = cell_types or BLOOD_TYPES
    markers = list(dict.fromkeys(g for genes in cell_types.values() for g in genes))
    extra = [g for g in HOUSEKEEPING if g not in ("MT-CO1", "MT-ND1", "MT-ATP6")] if housekeeping else []
    genes = markers + [f"GENE{i}" for i in range(n_background)] + ["MT-CO1", "MT-ND1", "MT-ATP6"] + extra
    base = rng.lognormal(0.0, 1.0, len(genes))
    index = {g: i for i, g in enumerate(genes)}
    if housekeeping:
        base[[index[g] for g in HOUSEKEEPING]] *= 20
    base /= base.sum()
    names = list(cell_types)
    labels = rng.choice(names, n_cells)
    profiles = {}
    for name, type_markers in cell_types.items():
        profile = base.copy()
        profile[[index[g] for g in type_markers]] *= 60
        if housekeeping and name == names[0]:
            profile[[index[g] for g in HOUSEKEEPING]] *= 3
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


def make_donors(
    n_cells: int = 400,
    *,
    donors: tuple[str, ...] = ("donor_A", "donor_B"),
    cell_types: dict[str, list[str]] | None = None,
    only_in: dict[str, str] | None = None,
    donor_genes: int = 20,
    donor_fold: float = 3.0,
    seed: int = 0,
    mouse: bool = False,
) -> ad.AnnData:
    """Poisson counts of several donors with a known donor effect, as :func:`make_counts` draws cell types.

    Each donor raises its own ``donor_genes`` background genes ``donor_fold``-fold in every cell: with the
    defaults, clustering without integration splits every cell type by donor, and Harmony removes the effect
    (a much stronger one, e.g. 150 genes 12-fold, separates the donors more than the cell types and Harmony
    does not remove it either).
    ``only_in`` maps a cell type to the one donor that has it (a patient's own tumour cells, say).
    ``obs['truth']`` holds the cell type, ``obs['donor']`` the donor.
    """
    rng = np.random.default_rng(seed)
    cell_types = cell_types or BLOOD_TYPES
    only_in = only_in or {}
    markers = list(dict.fromkeys(g for genes in cell_types.values() for g in genes))
    n_background = max(400, donor_genes * len(donors) + 100)
    genes = markers + [f"GENE{i}" for i in range(n_background)] + ["MT-CO1", "MT-ND1", "MT-ATP6"]
    index = {g: i for i, g in enumerate(genes)}
    base = rng.lognormal(0.0, 1.0, len(genes))
    background = rng.permutation(np.arange(len(markers), len(markers) + n_background))
    names = list(cell_types)
    donor_of = rng.choice(list(donors), n_cells)
    labels = np.empty(n_cells, dtype=object)
    for donor in donors:
        here = [t for t in names if only_in.get(t, donor) == donor]
        cells = np.flatnonzero(donor_of == donor)
        labels[cells] = rng.choice(here, len(cells))
    profiles = {}
    for d, donor in enumerate(donors):
        shifted = base.copy()
        shifted[background[d * donor_genes:(d + 1) * donor_genes]] *= donor_fold
        for name, type_markers in cell_types.items():
            profile = shifted.copy()
            profile[[index[g] for g in type_markers]] *= 60
            profiles[donor, name] = profile / profile.sum()
    library = rng.integers(1500, 3500, n_cells)
    rows = np.stack([rng.poisson(profiles[donor, label] * size)
                     for donor, label, size in zip(donor_of, labels, library, strict=True)])
    if mouse:
        genes = [g.capitalize() if not g.startswith("MT-") else "mt-" + g[3:].capitalize() for g in genes]
    return ad.AnnData(
        X=sp.csr_matrix(rows.astype(np.float32)),
        obs=pd.DataFrame({"truth": pd.Categorical(labels.astype(str)), "donor": pd.Categorical(donor_of)},
                         index=[f"cell{i}" for i in range(n_cells)]),
        var=pd.DataFrame(index=genes),
    )
