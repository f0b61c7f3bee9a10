"""What ``bench/llm_annotation.py --selection`` measures: which genes reach the model, and what they cost.

For each dataset (scanpy's bundled ``pbmc68k_reduced``, leiden clusters, truth = the cluster's majority
``bulk_labels``; the synthetic blood, brain and breast tissues of ``tests/synthetic.py`` with ribosomal,
mitochondrial and ubiquitous genes raised in one type, clusters = the true types) the full marker table
of ``rank_markers`` is turned into the lists sent by ``cluster_markers`` in three ways:

* ``before``: the wilcoxon score order after the p-value/logFC filters (the previous behaviour);
* ``cassia``: CASSIA's choice, log2 fold change order after the filters (detected in >= 10 % of the cluster);
* ``after``: the same without ribosomal, mitochondrial and ubiquitous genes (the default now).

Reported per dataset and selection: canonical markers of the true type among the genes sent (the marker
reference's markers of the type and its parents), ribosomal/mitochondrial/ubiquitous genes sent, and for the
``fast`` and ``full`` pipelines against the scripted server: requests, prompt and completion tokens per
cluster and the calls that agree with the truth (same Cell Ontology term or one on its path); and the offline
reference annotator's correct calls on the same lists (it reads the expression too, so should not move).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

# bulk_labels of pbmc68k_reduced -> the marker reference's type
PBMC_TRUTH = {
    "CD14+ Monocyte": "Classical monocyte", "CD19+ B": "B cell", "CD34+": "Hematopoietic stem/progenitor cell",
    "CD4+/CD25 T Reg": "Regulatory T cell", "CD4+/CD45RA+/CD25- Naive T": "Naive CD4+ T cell",
    "CD4+/CD45RO+ Memory": "Memory CD4+ T cell", "CD56+ NK": "NK cell", "CD8+ Cytotoxic T": "CD8+ T cell",
    "CD8+/CD45RA+ Naive Cytotoxic": "Naive CD8+ T cell", "Dendritic": "Dendritic cell",
}
# synthetic tissue types -> the marker reference's type
SYNTHETIC_TRUTH = {"Luminal epithelial cell": "Epithelial cell"}
SELECTIONS = {"before": {"ranking": "score", "informative_only": False, "min_pct": 0.0},
              "cassia": {"ranking": "logfc", "informative_only": False, "min_pct": 0.1},
              "after": {"ranking": "logfc", "informative_only": True, "min_pct": 0.1}}


def pbmc():
    import anndata as ad
    import scanpy as sc

    sc.settings.verbosity = 0
    reduced = sc.datasets.pbmc68k_reduced()
    adata = ad.AnnData(X=reduced.raw.X.copy(), obs=reduced.obs[["bulk_labels"]].copy(), var=reduced.raw.var[[]].copy())
    adata.obsp["connectivities"] = reduced.obsp["connectivities"]
    adata.obsp["distances"] = reduced.obsp["distances"]
    adata.uns["neighbors"] = reduced.uns["neighbors"]
    sc.tl.leiden(adata, resolution=1.0, flavor="igraph", n_iterations=2, directed=False, random_state=0)
    truth = adata.obs.groupby("leiden", observed=True)["bulk_labels"].agg(lambda s: s.value_counts().index[0])
    return adata, "leiden", {str(c): PBMC_TRUTH[t] for c, t in truth.items()}, "blood"


def synthetic(tissue: str):
    import scanpy as sc

    from tests.synthetic import BLOOD_TYPES, BRAIN_TYPES, BREAST_TYPES, make_counts

    types = {"blood": BLOOD_TYPES, "brain": BRAIN_TYPES, "breast": BREAST_TYPES}[tissue]
    adata = make_counts(600, cell_types=types, housekeeping=True, seed=1)
    sc.pp.normalize_total(adata, target_sum=1e4)
    sc.pp.log1p(adata)
    adata.obs["cluster"] = adata.obs["truth"].astype(str)
    return adata, "cluster", {t: SYNTHETIC_TRUTH.get(t, t) for t in types}, tissue


def canonical(type_name: str) -> set[str]:
    from cassia_helpers.dataset.annotate.reference.catalog import load_reference

    ref = load_reference()
    names = [type_name, *ref.ancestors(type_name)]
    return {g for n in names for g in ref.by_name(n).symbols("human")}


def correct(call: str, truth_type: str) -> bool:
    from cassia_helpers.dataset.annotate.reference.catalog import load_reference
    from cassia_helpers.dataset.ontology import load_cell_ontology

    onto = load_cell_ontology()
    m = onto.match(call)
    truth = load_reference().by_name(truth_type).cl_id
    return m.matched and onto.related(m.term_id, truth)


def measure(server, run_pipeline, name, adata, groupby, truth, tissue) -> list[list]:
    import cassia_helpers as ch
    from cassia_helpers.dataset.annotate.agents.boost import GeneLookup
    from cassia_helpers.dataset.annotate.reference.annotator import ReferenceAnnotator
    from cassia_helpers.dataset.markers import informative

    table = ch.rank_markers(adata, groupby=groupby, n_genes=None, key_added=None)
    lookup = GeneLookup(table, adata=adata, groupby=groupby)
    rows = []
    with tempfile.TemporaryDirectory(prefix="selection_") as tmp:
        for selection, options in SELECTIONS.items():
            clusters = ch.cluster_markers(adata, table, groupby=groupby, n_top=50, **options)
            n = len(clusters)
            hits = sum(len(canonical(truth[c.cluster]) & set(c.genes)) for c in clusters) / n
            total = sum(len(canonical(truth[c.cluster])) for c in clusters) / n
            top = sum(len(canonical(truth[c.cluster]) & set(c.genes[:15])) for c in clusters) / n
            noise = sum(not informative(g) for c in clusters for g in c.genes) / n
            reference = ReferenceAnnotator().annotate(clusters, tissue=tissue, species="human", adata=adata,
                                                      groupby=groupby)
            ref_right = sum(correct(r.main_cell_type, truth[r.cluster]) for r in reference)
            row = [name, selection, f"{hits:.1f}/{total:.1f}", top, noise, f"{ref_right}/{n}"]
            for pipeline in ("fast", "full"):
                run = run_pipeline(server, clusters, lookup, pipeline=pipeline, concurrency=4,
                                   cache_dir=Path(tmp) / f"c_{selection}_{pipeline}",
                                   ledger=Path(tmp) / f"l_{selection}_{pipeline}.jsonl", model="gpt-4o-mini",
                                   tissue=tissue)
                st = run["stats"]
                right = sum(correct(r.main_cell_type, truth[r.cluster]) for r in run["results"])
                row += [st["requests"] / n, st["prompt_tokens"] / n, st["completion_tokens"] / n, f"{right}/{n}"]
            rows.append(row)
    return rows


def main(server, run_pipeline, print_table) -> None:
    rows = []
    for name, make in (("pbmc68k_reduced", pbmc), ("synthetic blood", lambda: synthetic("blood")),
                       ("synthetic brain", lambda: synthetic("brain")),
                       ("synthetic breast", lambda: synthetic("breast"))):
        print(f"measuring {name} ...", flush=True)
        adata, groupby, truth, tissue = make()
        rows += measure(server, run_pipeline, name, adata, groupby, truth, tissue)
    print_table(rows, ["data", "genes sent", "canonical sent", "canonical in top 15", "ribo/mt/ubiq sent",
                       "reference correct",
                       "fast req/cl", "fast prompt tok/cl", "fast compl tok/cl", "fast correct",
                       "full req/cl", "full prompt tok/cl", "full compl tok/cl", "full correct"])
    print("canonical sent: mean per cluster of the true type's reference markers (type and parents) among the "
          "genes sent / their number (and among the first 15 sent); token counts are the scripted server's word counts")
