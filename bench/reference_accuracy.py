"""Accuracy of the offline reference annotator on scanpy's bundled PBMC 68k subset and a synthetic brain set.

Run with ``python bench/reference_accuracy.py`` (offline: the PBMC data ship with scanpy); it ends with the
stability table of ``bench/reference_stability.py`` (``--stability-only``, ``--save FILE``, ``--before FILE``).

Measurements on ``sc.datasets.pbmc68k_reduced()`` (700 cells, 765 genes, ``.raw`` log-normalised), the
annotator scoring each group on the expression of the reference markers (``adata=`` given):

(a) the ground-truth ``bulk_labels`` groups are annotated, each group's call is checked against the
    accepted labels below, and cell-weighted figures are reported (strict, and at lineage level);
(b) leiden clusters (on the stored PCA; the clusters that hold several populations split as the pipeline
    does, unless ``--no-split-mixed``) are annotated, every cell inherits its cluster's call, and the
    cell-level accuracy against ``bulk_labels`` is reported (accepted, strict, lineage level).

"Lineage level" compares Cell Ontology broad lineages (:mod:`cassia_helpers.dataset.ontology`): the call's
against the bulk label's CL term (``TRUTH_CL``).

(c) a second tissue: a synthetic brain dataset built from the reference's own cited markers (see
    ``synthetic_brain``: each type expresses a random half of its markers at 3-12x over background,
    Poisson counts), clustered with leiden and annotated; accuracy is the share of cells whose call
    has the truth's CL term, and at lineage level. Being built from the reference's markers it tests
    the method (lineage, hierarchy, thin evidence) rather than the marker lists themselves.

Markers per group (kept as ``markers_sent``): ``sc.tl.rank_genes_groups(method="wilcoxon", use_raw=True,
pts=True)``, keeping the top 50 genes with adjusted p < 0.05 and log fold change > 0.25, best first.

``bulk_labels`` come from correlating each cell with purified (FACS-sorted) populations, so they are
noisy; in particular the large "Dendritic" group contains many monocyte-like cells, and leiden
cluster 0's "CD14+ Monocyte" cells express FCGR3A in every cell (the strict mapping does not accept
"Non-classical monocyte" for them).
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import scanpy as sc

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cassia_helpers.dataset.annotate import ClusterMarkers  # noqa: E402
from cassia_helpers.dataset.annotate.reference.annotator import ReferenceAnnotator  # noqa: E402
from cassia_helpers.dataset.ontology import load_cell_ontology  # noqa: E402
from cassia_helpers.dataset.split_mixed import split_mixed_clusters  # noqa: E402

TOP_N = 50
MAX_PADJ = 0.05
MIN_LFC = 0.25

# Which predicted labels count as correct for each bulk label, and why. STRICT holds the narrower
# reading (the sorted population's own name and its direct generalisation); ACCEPTED adds calls that
# are biologically consistent with how the population was sorted (noted per label).
STRICT: dict[str, tuple[str, ...]] = {
    # sorted CD14+ cells: classical monocytes, or the generic monocyte call
    "CD14+ Monocyte": ("Classical monocyte", "Monocyte"),
    # sorted CD19+ cells: any B-cell call
    "CD19+ B": ("B cell", "Naive B cell", "Memory B cell"),
    # sorted CD4+CD25+ cells: regulatory T cells, or CD4 T cells in general
    "CD4+/CD25 T Reg": ("Regulatory T cell", "CD4+ T cell"),
    # sorted CD4+CD45RO+ cells: memory CD4 T cells, or CD4 T cells in general
    "CD4+/CD45RO+ Memory": ("Memory CD4+ T cell", "CD4+ T cell"),
    # sorted CD4+CD45RA+CD25- cells: naive CD4 T cells, or CD4 T cells in general
    "CD4+/CD45RA+/CD25- Naive T": ("Naive CD4+ T cell", "CD4+ T cell"),
    # sorted CD8+ cells: CD8 T cells, naive or effector/memory
    "CD8+ Cytotoxic T": ("CD8+ T cell", "Effector memory CD8+ T cell", "Naive CD8+ T cell"),
    # sorted CD8+CD45RA+ cells: naive CD8 T cells, or CD8 T cells in general
    "CD8+/CD45RA+ Naive Cytotoxic": ("Naive CD8+ T cell", "CD8+ T cell"),
    # sorted CD56+ cells: NK cells of either subset
    "CD56+ NK": ("NK cell", "CD56dim NK cell", "CD56bright NK cell"),
    # sorted CD34+ cells: haematopoietic stem/progenitor cells and committed progenitors
    "CD34+": ("Hematopoietic stem/progenitor cell", "Myeloid progenitor", "Erythroid progenitor"),
    # sorted CD11c+ cells ("Dendritic"): any dendritic-cell call
    "Dendritic": (
        "Dendritic cell",
        "Conventional dendritic cell type 1",
        "Conventional dendritic cell type 2",
        "Plasmacytoid dendritic cell",
        "Mature regulatory dendritic cell",
    ),
}
EXTRA: dict[str, tuple[str, ...]] = {
    # a CD14 sort also collects intermediate (CD14+ CD16+) monocytes, which express FCGR3A
    "CD14+ Monocyte": ("Non-classical monocyte",),
    # circulating plasmablasts are CD19+ and fall into a CD19 sort
    "CD19+ B": ("Plasma cell",),
}
ACCEPTED: dict[str, tuple[str, ...]] = {k: v + EXTRA.get(k, ()) for k, v in STRICT.items()}
# Each bulk label's Cell Ontology term; a call is right "at lineage level" when its CL broad lineage
# (cassia_helpers.dataset.ontology) is the label's.
TRUTH_CL: dict[str, str] = {
    "CD14+ Monocyte": "CL:0001054",  # CD14-positive monocyte
    "CD19+ B": "CL:0000236",  # B cell
    "CD4+/CD25 T Reg": "CL:0000815",  # regulatory T cell
    "CD4+/CD45RO+ Memory": "CL:0000897",  # CD4-positive, alpha-beta memory T cell
    "CD4+/CD45RA+/CD25- Naive T": "CL:0000895",  # naive thymus-derived CD4-positive, alpha-beta T cell
    "CD8+ Cytotoxic T": "CL:0000625",  # CD8-positive, alpha-beta T cell
    "CD8+/CD45RA+ Naive Cytotoxic": "CL:0000900",  # naive thymus-derived CD8-positive, alpha-beta T cell
    "CD56+ NK": "CL:0000623",  # natural killer cell
    "CD34+": "CL:0008001",  # hematopoietic precursor cell
    "Dendritic": "CL:0000451",  # dendritic cell
}


def lineage_correct(pred: list[str], truth: list[str]) -> np.ndarray:
    """Whether each predicted label's CL broad lineage equals its truth label's."""
    onto = load_cell_ontology()
    lin = {p: onto.match(p).lineage_id for p in set(pred)}
    want = {t: onto.lineage(TRUTH_CL[t])[0] for t in set(truth)}
    return np.array([lin[p] != "unknown" and lin[p] == want[t] for p, t in zip(pred, truth, strict=True)])


def strict_ceiling(clusters: pd.Series, truth: pd.Series) -> float:
    """The best strict cell-level accuracy any annotator could reach with one label per cluster."""
    labels = sorted({label for accepted in STRICT.values() for label in accepted})
    best = 0
    for cluster in clusters.unique():
        in_cluster = truth[(clusters == cluster).to_numpy()]
        best += max(sum(label in STRICT[t] for t in in_cluster) for label in labels)
    return best / len(truth)


def _to_array(x) -> np.ndarray:
    return np.asarray(x.toarray() if hasattr(x, "toarray") else x)


def cluster_markers(adata, groupby: str) -> list[ClusterMarkers]:
    """Rank genes per group and turn the significant ones into ClusterMarkers (best first)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sc.tl.rank_genes_groups(adata, groupby, method="wilcoxon", use_raw=True, pts=True, key_added="rgg")
    res = adata.uns["rgg"]
    pts = res["pts"]
    pts_rest = res["pts_rest"]
    sizes = adata.obs[groupby].value_counts()
    out = []
    for group in res["names"].dtype.names:
        df = pd.DataFrame(
            {
                "gene": res["names"][group],
                "lfc": res["logfoldchanges"][group],
                "padj": res["pvals_adj"][group],
            }
        )
        df = df[(df["padj"] < MAX_PADJ) & (df["lfc"] > MIN_LFC)].head(TOP_N)
        genes = [str(g) for g in df["gene"]]
        out.append(
            ClusterMarkers(
                cluster=str(group),
                genes=genes,
                logfoldchanges=[float(v) for v in df["lfc"]],
                pct_in=[float(pts.loc[g, group]) for g in genes],
                pct_out=[float(pts_rest.loc[g, group]) for g in genes],
                n_cells=int(sizes[group]),
            )
        )
    return out


# Second tissue: a synthetic brain dataset. Each population expresses a random 60 % of its reference
# markers (drawn per population with a fixed seed), each at its own 4-20x fold over a shared log-normal
# background, and neurons also a random 60 % of the generic neuron markers; counts are Poisson with
# library sizes of 1000-4000, so many markers drop out per cell. The types and their truth CL terms:
BRAIN_TRUTH: dict[str, str] = {
    "Excitatory neuron": "CL:0000679",
    "Inhibitory neuron": "CL:0000617",
    "Astrocyte": "CL:0000127",
    "Oligodendrocyte": "CL:0000128",
    "Oligodendrocyte precursor cell": "CL:0002453",
    "Microglia": "CL:0000129",
    "Endothelial cell": "CL:0000115",
    "Pericyte": "CL:0000669",
}


# A third tissue for the stability table: a synthetic breast set built the same way, except for two
# populations with fixed programmes (BREAST_FIXED): CD8+ T cells of which only CD3D is a marker of the
# "T cell" root, and basal cells expressing none of the root epithelial markers (which the luminal cells
# do express): the lineage can only be seen through the subtypes' markers.
BREAST_TRUTH: dict[str, str] = {
    "Hormone-sensing luminal cell": "CL:4033058",
    "Luminal progenitor cell": "CL:4033057",
    "Basal/myoepithelial cell": "CL:0002324",
    "Fibroblast": "CL:0000057",
    "Endothelial cell": "CL:0000115",
    "Macrophage": "CL:0000235",
    "CD8+ T cell": "CL:0000625",
}
BREAST_FIXED: dict[str, list[str]] = {
    "CD8+ T cell": ["CD3D", "CD8A", "CD8B", "GZMK", "CCL5", "CST7", "GZMH"],
    "Basal/myoepithelial cell": ["KRT5", "KRT14", "TP63", "KRT17", "OXTR", "MYLK", "ACTA2"],
}


def synthetic_tissue(truth_types: dict[str, str], n_cells: int = 1600, seed: int = 0,
                     fixed: dict[str, list[str]] | None = None):
    """Counts for ``truth_types`` from the reference's cited markers (each type and its parent, see above);
    the types in ``fixed`` express exactly the genes listed."""
    import anndata as ad
    import scipy.sparse as sp

    from cassia_helpers.dataset.annotate.reference.catalog import load_reference

    ref = load_reference()
    rng = np.random.default_rng(seed)
    programme = {}
    for name in truth_types:
        markers = list(ref.by_name(name).markers)
        parent = ref.by_name(name).parent
        if parent is not None:
            markers += list(ref.by_name(parent).markers)
        keep = rng.choice(len(markers), max(3, int(0.5 * len(markers))), replace=False)
        programme[name] = {markers[i]: float(rng.uniform(3, 12)) for i in sorted(keep)}
        if fixed and name in fixed:
            programme[name] = {gene: float(rng.uniform(3, 12)) for gene in fixed[name]}
    marker_genes = sorted({g for p in programme.values() for g in p})
    genes = marker_genes + [f"BG{i}" for i in range(2000)]
    base = rng.lognormal(0.0, 1.2, len(genes))
    base /= base.sum()
    index = {g: i for i, g in enumerate(genes)}
    labels = rng.choice(list(truth_types), n_cells, p=None)
    rows = []
    for label in labels:
        profile = base.copy()
        for gene, fold in programme[label].items():
            profile[index[gene]] *= fold
        rows.append(rng.poisson(profile / profile.sum() * rng.integers(1000, 4000)))
    adata = ad.AnnData(X=sp.csr_matrix(np.array(rows, dtype=np.float32)), var=pd.DataFrame(index=genes))
    adata.obs["truth"] = pd.Categorical(labels)
    adata.obs_names = [f"cell{i}" for i in range(n_cells)]
    return adata


def synthetic_brain(n_cells: int = 1600, seed: int = 0):
    """The synthetic brain set (BRAIN_TRUTH's types)."""
    return synthetic_tissue(BRAIN_TRUTH, n_cells, seed)


def prepared(adata):
    """Log-normalised, ``.raw`` set, PCA (30 components) computed: what the clustering runs on."""
    sc.pp.normalize_total(adata, target_sum=1e4)
    sc.pp.log1p(adata)
    adata.raw = adata
    sc.pp.pca(adata, n_comps=30, random_state=0)
    return adata


def term_correct(truth_types: dict[str, str]):
    """A call is right when its CL term is the truth's."""
    onto = load_cell_ontology()
    return lambda call, truth: onto.match(call).term_id == truth_types[truth]


def brain_accuracy(annotator: ReferenceAnnotator, *, split: bool = True) -> tuple[float, float]:
    """Cell-level (exact-or-ancestor CL term, lineage) accuracy on the synthetic brain set's leiden clusters."""
    adata = prepared(synthetic_brain())
    sc.pp.neighbors(adata, random_state=0)
    sc.tl.leiden(adata, flavor="igraph", n_iterations=2, resolution=0.5, random_state=0)
    if split:
        split_mixed_clusters(adata, species="human", tissue="brain", seed=0)
    clusters = cluster_markers(adata, "leiden")
    calls = annotator.annotate(clusters, tissue="brain", species="human", adata=adata, groupby="leiden")
    onto = load_cell_ontology()
    label_of = {c.cluster: a.main_cell_type for c, a in zip(clusters, calls, strict=True)}
    pred = adata.obs["leiden"].astype(str).map(label_of)
    truth = adata.obs["truth"].astype(str)
    term = {p: onto.match(p).term_id for p in set(pred)}
    exact = np.array([term[p] == BRAIN_TRUTH[t] for p, t in zip(pred, truth, strict=True)])
    lineage = np.array([term[p] != "unknown" and onto.lineage(term[p])[0] == onto.lineage(BRAIN_TRUTH[t])[0]
                        for p, t in zip(pred, truth, strict=True)])
    print("(c) synthetic brain, leiden clusters")
    for cm, call in zip(clusters, calls, strict=True):
        mask = (adata.obs["leiden"].astype(str) == cm.cluster).to_numpy()
        counts = truth[mask].value_counts()
        print(f"  {cm.cluster:7s} {mask.sum():4d}  {call.main_cell_type:36s} {call.confidence:5.1f}  "
              f"{counts.index[0]} ({counts.iloc[0] / mask.sum():.2f})")
    print(f"brain cell-level accuracy: exact CL term {exact.mean():.2f}, lineage level {lineage.mean():.2f}")
    groups = cluster_markers(adata, "truth")
    calls = annotator.annotate(groups, tissue="brain", species="human", adata=adata, groupby="truth")
    right = sum(onto.match(a.main_cell_type).term_id == BRAIN_TRUTH[c.cluster] for c, a in zip(groups, calls,
                                                                                               strict=True))
    print(f"brain truth groups annotated from their marker expression: {right}/{len(groups)} exact CL term; "
          + ", ".join(f"{c.cluster} -> {a.main_cell_type}" for c, a in zip(groups, calls, strict=True)
                      if onto.match(a.main_cell_type).term_id != BRAIN_TRUTH[c.cluster]))
    return float(exact.mean()), float(lineage.mean())


def unlabelled_counts(path: Path):
    """Real counts without labels, prepared as the clustering needs them: an ``.h5ad`` (X or ``.raw`` holding
    counts) or a ``.csv`` of cells × genes (cells in rows, gene symbols as columns, as celltypist's sample
    ``celltypist/data/samples/sample_cell_by_gene.csv``). Genes seen in fewer than 3 cells are dropped; the
    data are log-normalised (kept in ``.raw``), and PCA (30 components) runs on 2,000 highly variable genes."""
    import anndata as ad
    import scipy.sparse as sp

    if path.suffix == ".h5ad":
        adata = ad.read_h5ad(path)
        adata = adata.raw.to_adata() if adata.raw is not None else adata
    else:
        frame = pd.read_csv(path, index_col=0)
        adata = ad.AnnData(sp.csr_matrix(frame.to_numpy(dtype=np.float32)),
                           obs=pd.DataFrame(index=frame.index.astype(str)), var=pd.DataFrame(index=frame.columns))
    adata.var_names_make_unique()
    sc.pp.filter_genes(adata, min_cells=3)
    sc.pp.normalize_total(adata, target_sum=1e4)
    sc.pp.log1p(adata)
    sc.pp.highly_variable_genes(adata, n_top_genes=2000)
    hvg = adata[:, adata.var["highly_variable"]].copy()
    hvg.raw = adata
    sc.pp.pca(hvg, n_comps=30, random_state=0)
    return hvg


def stability_datasets(unlabelled: list[Path] = (), tissue: str = "") -> list:
    """The stability table's datasets (see bench/reference_stability.py), then each ``unlabelled`` file (real
    counts without labels, :func:`unlabelled_counts`: agreement only) annotated as ``tissue``."""
    import functools

    from bench.reference_stability import Dataset

    def pbmc():
        adata = sc.datasets.pbmc68k_reduced()
        adata.obs["truth"] = adata.obs["bulk_labels"].astype(str)
        return adata

    return [
        Dataset("pbmc68k_reduced (bulk_labels, accepted mapping)", "pbmc", pbmc,
                lambda call, truth: call in ACCEPTED[truth], use_raw=True),
        Dataset("synthetic brain (CL term)", "brain", lambda: prepared(synthetic_brain()),
                term_correct(BRAIN_TRUTH)),
        Dataset("synthetic breast (CL term)", "breast",
                lambda: prepared(synthetic_tissue(BREAST_TRUTH, fixed=BREAST_FIXED)),
                term_correct(BREAST_TRUTH)),
        *(Dataset(f"{path.name} (no labels, tissue {tissue or 'not given'})", tissue,
                  _copies(functools.lru_cache(maxsize=1)(functools.partial(unlabelled_counts, path))),
                  None, use_raw=True) for path in unlabelled),
    ]


def _copies(build):
    """``build`` prepared once: each call returns a fresh copy (every run clusters its own)."""
    return lambda: build().copy()


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stability-only", action="store_true", help="print only the stability table")
    parser.add_argument("--save", help="write every stability run's per-cell labels to this JSON file")
    parser.add_argument("--before", help="a file written by --save: print accuracy before/after per run")
    parser.add_argument("--no-split-mixed", dest="split", action="store_false",
                        help="annotate the leiden clusters as they are (no split of the clusters that hold "
                             "several populations, as with run_batch.py --no-split-mixed)")
    parser.add_argument("--unlabelled", type=Path, action="append", default=[], metavar="FILE",
                        help="also tabulate the stability on real counts without labels (.h5ad, or .csv of "
                             "cells x genes); repeatable")
    parser.add_argument("--unlabelled-tissue", default="", metavar="TISSUE",
                        help="the tissue those files are annotated as (default: not given, every type)")
    args = parser.parse_args(argv)
    if not args.stability_only:
        accuracy(split=args.split)
    from bench.reference_stability import stability

    stability(stability_datasets(args.unlabelled, args.unlabelled_tissue), save=args.save, before=args.before,
              split=args.split)
    return 0


def accuracy(*, split: bool = True) -> None:
    adata = sc.datasets.pbmc68k_reduced()
    truth = adata.obs["bulk_labels"].astype(str)
    annotator = ReferenceAnnotator(species="human")

    print("Accepted predictions per bulk label (strict list, then [extra] accepted by the main figures):")
    for label, accepted in STRICT.items():
        extra = f"  [{', '.join(EXTRA[label])}]" if label in EXTRA else ""
        print(f"  {label:30s} <- {', '.join(accepted)}{extra}")
    print()

    # (a) ground-truth groups
    groups = cluster_markers(adata, "bulk_labels")
    calls = annotator.annotate(groups, tissue="pbmc", species="human", adata=adata, groupby="bulk_labels",
                               use_raw=True)
    print("(a) bulk_labels groups annotated from their marker expression")
    print(f"  {'group':30s} {'n':>4s}  {'prediction':36s} {'conf':>5s}  ok")
    n_ok = n_strict = 0
    for cm, call in zip(groups, calls, strict=True):
        ok = call.main_cell_type in ACCEPTED[cm.cluster]
        n_ok += ok
        n_strict += call.main_cell_type in STRICT[cm.cluster]
        print(f"  {cm.cluster:30s} {cm.n_cells:4d}  {call.main_cell_type:36s} {call.confidence:5.1f}  "
              f"{'yes' if ok else 'NO'}")
    print(f"group-level accuracy: {n_ok}/{len(groups)}  (strict mapping: {n_strict}/{len(groups)})")
    pred_a = truth.map({c.cluster: a.main_cell_type for c, a in zip(groups, calls, strict=True)})
    strict_a = np.array([p in STRICT[t] for p, t in zip(pred_a, truth, strict=True)])
    lineage_a = lineage_correct(list(pred_a), list(truth))
    print(f"cells: strict {strict_a.mean():.2f}, lineage level {lineage_a.mean():.2f}")
    print()

    # (b) leiden clusters
    sc.pp.neighbors(adata, use_rep="X_pca")
    sc.tl.leiden(adata, flavor="igraph", n_iterations=2, resolution=1.0, random_state=0)
    if split:  # the pipeline's step after the clustering
        split_mixed_clusters(adata, species="human", tissue="pbmc", seed=0, use_raw=True)
    clusters = cluster_markers(adata, "leiden")
    calls = annotator.annotate(clusters, tissue="pbmc", species="human", adata=adata, groupby="leiden",
                               use_raw=True)
    label_of = {c.cluster: a.main_cell_type for c, a in zip(clusters, calls, strict=True)}
    pred = adata.obs["leiden"].astype(str).map(label_of)
    correct = np.array([p in ACCEPTED[t] for p, t in zip(pred, truth, strict=True)])
    correct_strict = np.array([p in STRICT[t] for p, t in zip(pred, truth, strict=True)])
    print("(b) leiden clusters")
    print(f"  {'cluster':7s} {'n':>4s}  {'prediction':36s} {'conf':>5s}  {'majority bulk label (share)':36s} "
          f"cell acc")
    for cm, call in zip(clusters, calls, strict=True):
        mask = (adata.obs["leiden"].astype(str) == cm.cluster).to_numpy()
        counts = truth[mask].value_counts()
        major = f"{counts.index[0]} ({counts.iloc[0] / mask.sum():.2f})"
        print(f"  {cm.cluster:7s} {mask.sum():4d}  {call.main_cell_type:36s} {call.confidence:5.1f}  "
              f"{major:36s} {correct[mask].mean():.2f}")
    print()
    print("per bulk label (cell-level, leiden):")
    for label in ACCEPTED:
        mask = (truth == label).to_numpy()
        print(f"  {label:30s} {mask.sum():4d} cells  {correct[mask].mean():.2f}")
    print(f"leiden clusters: {len(clusters)}")
    lineage = lineage_correct(list(pred), list(truth))
    print(f"cell-level accuracy: {correct.mean():.2f}  (strict mapping: {correct_strict.mean():.2f}; "
          f"lineage level: {lineage.mean():.2f})")
    ceiling = strict_ceiling(adata.obs["leiden"].astype(str), truth)
    print(f"strict ceiling of these clusters: {ceiling:.2f} (each cluster given the one strict label that is "
          "right for most of its cells)")
    print()
    brain_accuracy(annotator, split=split)
    print()


if __name__ == "__main__":
    raise SystemExit(main())
