"""Cell Ontology mapping, marker evidence, expression-based reference calls and cross-dataset QC."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import scanpy as sc

from cassia_helpers.dataset.annotate import ClusterMarkers
from cassia_helpers.dataset.annotate.reference.annotator import ReferenceAnnotator
from cassia_helpers.dataset.annotate.reference.catalog import load_reference
from cassia_helpers.dataset.evidence import marker_evidence
from cassia_helpers.dataset.ontology import annotate_ontology, load_cell_ontology, map_label, validate_proposed_id
from cassia_helpers.summary.crossqc import cell_type_table, flagged_datasets, missing_types, plot_cell_type_heatmap
from tests.synthetic import BLOOD_TYPES, BRAIN_TYPES, BREAST_TYPES, make_counts

# ---------------------------------------------------------------- name -> CL


@pytest.mark.parametrize(
    ("label", "term_id", "method"),
    [
        ("T cell", "CL:0000084", "exact"),
        ("t cell", "CL:0000084", "exact"),
        ("T cells", "CL:0000084", "normalised"),
        ("T lymphocyte", "CL:0000084", "exact"),  # CL synonym
        ("NK cell", "CL:0000623", "exact"),  # CL synonym
        ("Natural killer cells", "CL:0000623", "normalised"),
        ("CD14+ monocyte", "CL:0001054", "normalised"),
        ("CD14-positive monocytes", "CL:0001054", "normalised"),
        ("Classical monocyte", "CL:0000860", "exact"),
        ("Monocyte (classical)", "CL:0000860", "normalised"),  # word order
        ("CD4+ T cell", "CL:0000624", "reference"),  # curated name of the marker reference
        ("Microglia", "CL:0000129", "reference"),
        ("ASTROCYTES", "CL:0000127", "normalised"),
        ("Oligodendrocyte precursor cells", "CL:0002453", "normalised"),
        ("Regulatory T cells", "CL:0000815", "normalised"),
        ("Tregs", "CL:0000815", "normalised"),
        ("CD8 T cells", "CL:0000625", "normalised"),  # bare CD marker read as positive
        ("Naive CD4 T cells", "CL:0000895", "normalised"),
        ("cDC2", "CL:0002399", "reference"),  # reference synonym
        ("OPCs", "CL:0002453", "normalised"),
        ("Excitatory neurons", "CL:0000679", "normalised"),
        ("pDC", "CL:0000784", "exact"),
    ],
)
def test_label_variants_map_to_cl(label, term_id, method):
    m = map_label(label)
    assert (m.term_id, m.method) == (term_id, method), m
    assert m.term_name == load_cell_ontology().name(term_id)


def test_every_match_has_a_lineage_and_lineages_are_broad():
    assert map_label("Regulatory T cells").lineage_name == "T cell"
    assert map_label("CD14+ monocyte").lineage_name == "myeloid cell"
    assert map_label("Astrocyte").lineage_name == "glial cell"
    assert map_label("Excitatory neuron").lineage_name == "neuron"
    assert map_label("Plasma cell").lineage_name == "lymphocyte of B lineage"


@pytest.mark.parametrize("typo", ["Astrocyet", "Monocyt", "T cel", "Oligodendrocyte precusor cell"])
def test_typo_matches_nothing_rather_than_a_wrong_term(typo):
    m = map_label(typo)
    assert not m.matched and m.term_id == "unknown" and m.note


def test_unknown_label_is_unmatched():
    assert map_label("Unknown").term_id == "unknown"


def test_proposed_id_is_validated():
    # the label alone does not match; a consistent proposal is accepted ...
    assert map_label("Microglial cells (homeostatic)").term_id == "unknown"
    ok = map_label("Microglial cells (homeostatic)", proposed_id="CL_0000129")
    assert (ok.term_id, ok.method) == ("CL:0000129", "proposed")
    # ... an id that does not exist is rejected, said plainly
    bad = map_label("Microglial cells (homeostatic)", proposed_id="CL:9999999")
    assert bad.term_id == "unknown" and "not a CL term" in bad.note
    # ... and so is a real id that contradicts the label
    wrong = map_label("Microglial cells (homeostatic)", proposed_id="CL:0000084")
    assert wrong.term_id == "unknown" and "contradicts" in wrong.note
    assert validate_proposed_id("Microglia", "CL:0000129").term_id == "CL:0000129"
    assert validate_proposed_id("CD4+ T cell", "CL:0000625") is None  # CD8 term for a CD4 label
    assert validate_proposed_id("Astrocyte", "CL:0000084") is None
    assert validate_proposed_id("Astrocyte", "not an id") is None


def test_reference_cl_ids_exist_and_agree_with_names():
    onto = load_cell_ontology()
    for ct in load_reference().cell_types:
        assert ct.cl_id in onto.terms, ct.name
        m = onto.match(ct.name)
        assert m.term_id == ct.cl_id, (ct.name, m)
        for synonym in ct.synonyms:
            assert onto.match(synonym).term_id == ct.cl_id, (synonym, ct.name)


def test_annotate_ontology_writes_cellxgene_columns():
    adata = make_counts(60, cell_types=BRAIN_TYPES, seed=1)
    adata.obs["leiden"] = adata.obs["truth"].astype(str)
    adata.obs["cell_type"] = adata.obs["truth"].astype(str)
    table = annotate_ontology(adata, proposed_ids={"Astrocyte": "CL:0000084"})
    assert set(adata.obs["cell_type_ontology_term_id"]) == {"CL:0000127", "CL:0000128", "CL:0000129"}
    assert set(adata.obs["cell_type_lineage"]) == {"glial cell"}
    assert table["n_cells"].sum() == adata.n_obs
    assert adata.uns["cassia_batch"]["ontology"]["cl_version"].startswith("v20")


# ---------------------------------------------------------------- marker evidence


def _normalised(adata):
    sc.pp.normalize_total(adata, target_sum=1e4)
    sc.pp.log1p(adata)
    return adata


def test_evidence_flag_fires_when_cited_markers_are_absent_and_not_when_present():
    adata = _normalised(make_counts(300, cell_types=BLOOD_TYPES, seed=2))
    adata.obs["leiden"] = adata.obs["truth"].astype(str)
    calls = {
        "T cell": {"main_cell_type": "T cell", "key_markers": ["CD3E", "CD3D", "CD2"]},
        # a confident call whose cited markers are the B cells', not this cluster's
        "Monocyte": {"main_cell_type": "B cell", "key_markers": ["MS4A1", "CD79A", "CD19"]},
        "B cell": {"main_cell_type": "Unknown", "key_markers": []},
    }
    table = marker_evidence(adata, calls)
    assert not table.loc["T cell", "flag"]
    assert table.loc["T cell", "n_enriched"] == 3
    assert table.loc["Monocyte", "flag"] and "not enriched" in table.loc["Monocyte", "flag_reason"]
    assert table.loc["T cell", "evidence_score"] > 0.5 > table.loc["Monocyte", "evidence_score"]
    assert not table.loc["B cell", "flag"]  # unknown: nothing to check
    assert adata.obs["marker_evidence_flag"].sum() == (adata.obs["leiden"] == "Monocyte").sum()


def test_evidence_uses_canonical_markers_without_cited_ones():
    adata = _normalised(make_counts(300, cell_types=BRAIN_TYPES, seed=3))
    adata.obs["leiden"] = adata.obs["truth"].astype(str)
    adata.obs["cell_type"] = adata.obs["truth"].astype(str).replace({"Microglia": "Astrocyte"})
    table = marker_evidence(adata, groupby="leiden", label_key="cell_type")
    assert table.loc["Astrocyte", "reference_type"] == "Astrocyte"
    assert not table.loc["Astrocyte", "flag"]
    assert table.loc["Microglia", "flag"]  # labelled astrocyte, no astrocyte marker enriched


def test_evidence_finds_canonical_markers_for_free_text_labels():
    adata = _normalised(make_counts(300, cell_types=BLOOD_TYPES, seed=6))
    adata.obs["leiden"] = adata.obs["truth"].astype(str)
    # an LLM-style label whose CL term (CD14-positive monocyte) has no reference type of its own:
    # the nearest ancestor with one (monocyte) supplies the canonical markers
    calls = {"Monocyte": {"main_cell_type": "CD14+ Monocytes", "key_markers": []},
             "T cell": {"main_cell_type": "CD14+ Monocytes", "key_markers": []}}
    table = marker_evidence(adata, calls)
    assert set(table["reference_type"]) == {"Monocyte"}
    assert not table.loc["Monocyte", "flag"] and table.loc["T cell", "flag"]


# ---------------------------------------------------------------- reference on expression


# the fixtures' labels that are not CL names
FIXTURE_CL = {"Luminal epithelial cell": "CL:0002326"}  # luminal epithelial cell of mammary gland


@pytest.mark.parametrize(("types", "tissue"), [(BLOOD_TYPES, "blood"), (BRAIN_TYPES, "brain"),
                                               (BREAST_TYPES, "breast")])
def test_expression_reference_on_fixtures(types, tissue):
    adata = _normalised(make_counts(300, cell_types=types, seed=4))
    adata.obs["leiden"] = adata.obs["truth"].astype(str)
    clusters = [ClusterMarkers(cluster=c, genes=[]) for c in adata.obs["leiden"].unique()]
    calls = ReferenceAnnotator().annotate(clusters, tissue=tissue, species="human", adata=adata)
    onto = load_cell_ontology()
    for cm, call in zip(clusters, calls, strict=True):
        truth = FIXTURE_CL.get(cm.cluster) or onto.match(cm.cluster).term_id
        got = onto.match(call.main_cell_type).term_id
        # the call is the truth, or a type on its ontology path (as specific as the data supports)
        assert onto.related(truth, got), (cm.cluster, call.main_cell_type, call.reasoning)
        assert call.key_markers and call.confidence > 0


def test_subtypes_are_told_apart_only_by_markers_their_siblings_do_not_share():
    """IL7R (listed for CD4+ T and MAIT cells) and GZMK (CD8+ T and MAIT) cannot name a T subtype;
    CD8A/CD8B or CD4/CD40LG can."""
    from cassia_helpers.dataset.annotate.reference.catalog import load_reference
    from cassia_helpers.dataset.annotate.reference.expression import ExpressionScorer

    reference = load_reference()
    genes = ["CD3E", "CD3D", "CD3G", "CD2", "LCK", "CD247", "CD28", "IL7R", "GZMK", "KLRB1", "CD4", "CD40LG",
             "MAL", "LTB", "CD8A", "CD8B", "CCL5", "CST7", "GZMH", "NKG7", "GNLY", "MS4A1", "CD79A", "LYZ"]
    scorer = ExpressionScorer(reference, reference.candidates("blood"), "human", set(genes))
    t_cell = {g: 0.0 for g in genes} | {g: 0.8 for g in ["CD3E", "CD3D", "CD3G", "CD2", "LCK", "CD247", "CD28"]}
    shared_only = t_cell | {"IL7R": 0.8, "GZMK": 0.8}
    assert scorer.call(shared_only).cell_type.name == "T cell"
    assert scorer.call(shared_only | {"CD8A": 0.7, "CD8B": 0.7}).cell_type.name == "CD8+ T cell"
    assert scorer.call(shared_only | {"CD4": 0.5, "CD40LG": 0.5}).cell_type.name == "CD4+ T cell"


def test_expression_reference_calls_unknown_without_marker_expression():
    adata = _normalised(make_counts(200, cell_types={"A": [f"NOVEL{i}" for i in range(6)],
                                                     "B": [f"NOVEL{i}" for i in range(6, 12)]}, seed=5))
    adata.obs["leiden"] = adata.obs["truth"].astype(str)
    clusters = [ClusterMarkers(cluster=c, genes=[]) for c in ("A", "B")]
    calls = ReferenceAnnotator().annotate(clusters, tissue="blood", species="human", adata=adata)
    assert [c.main_cell_type for c in calls] == ["Unknown", "Unknown"]


# ---------------------------------------------------------------- cross-dataset QC


def _obs(term_counts: dict[str, int]) -> pd.DataFrame:
    onto = load_cell_ontology()
    rows = []
    for term, n in term_counts.items():
        m = onto.match(term)
        rows += [{"cell_type_ontology_term_id": m.term_id, "cell_type_ontology_term": m.term_name,
                  "cell_type_lineage": m.lineage_name}] * n
    return pd.DataFrame(rows)


def test_cross_dataset_table_sums_to_cells_and_finds_missing_types(tmp_path):
    obs = {
        "b1": _obs({"Astrocyte": 30, "Oligodendrocyte": 50, "Microglia": 20}),
        "b2": _obs({"Astrocyte": 10, "Oligodendrocyte": 5, "Microglia": 7, "Unknown": 3}),
        "b3": _obs({"Astrocyte": 12, "Microglia": 4}),
        "p1": _obs({"T cell": 9}),
    }
    tissues = {"b1": "brain", "b2": "brain", "b3": "brain", "p1": "blood"}
    table = cell_type_table(obs, tissues=tissues)
    for name, frame in obs.items():
        sub = table[table["dataset"] == name]
        assert sub["n_cells"].sum() == len(frame)
        assert np.isclose(sub["fraction"].sum(), 1.0)
    assert table.loc[(table["dataset"] == "b2") & (table["cell_type_ontology_term_id"] == "unknown"),
                     "n_cells"].item() == 3
    missing = missing_types(table)
    assert missing[["dataset", "cell_type_ontology_term"]].values.tolist() == [["b3", "oligodendrocyte"]]
    png = plot_cell_type_heatmap(table, tmp_path / "qc" / "cell_types.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cross_dataset_table_from_records_and_flagged_datasets():
    records = [
        {"dataset": "d1", "term_id": "CL:0000084", "term_name": "T cell", "lineage_name": "T cell", "n_cells": 5},
        {"dataset": "d1", "term_id": "CL:0000084", "term_name": "T cell", "lineage_name": "T cell", "n_cells": 7},
        {"dataset": "d1", "term_id": "unknown", "term_name": "unknown", "lineage_name": "unknown", "n_cells": 4},
    ]
    table = cell_type_table(records=records)
    assert table["n_cells"].tolist() == [12, 4]
    clusters = pd.DataFrame({
        "dataset": ["d1", "d1", "d1", "d2", "d2"],
        "main_cell_type": ["T cell", "Unknown", "B cell", "T cell", "B cell"],
        "flag": [False, False, True, False, False],
    })
    out = flagged_datasets(clusters)
    assert out.iloc[0].to_dict() | {} == {"dataset": "d1", "n_clusters": 3, "n_unknown": 1, "n_flagged": 1,
                                          "share": pytest.approx(2 / 3), "suspect": True}
    assert not out.set_index("dataset").loc["d2", "suspect"]


def test_reference_on_pbmc68k_bulk_labels():
    """scanpy's bundled PBMC subset (offline): every sorted population at the right lineage, most at its level."""
    from bench.reference_accuracy import STRICT, TRUTH_CL

    adata = sc.datasets.pbmc68k_reduced()
    groups = [ClusterMarkers(cluster=c, genes=[]) for c in adata.obs["bulk_labels"].cat.categories]
    calls = ReferenceAnnotator().annotate(groups, tissue="pbmc", species="human", adata=adata,
                                          groupby="bulk_labels", use_raw=True)
    onto = load_cell_ontology()
    sizes = adata.obs["bulk_labels"].value_counts()
    lineage = sum(sizes[c.cluster] for c, a in zip(groups, calls, strict=True)
                  if onto.match(a.main_cell_type).lineage_id == onto.lineage(TRUTH_CL[c.cluster])[0])
    strict = sum(sizes[c.cluster] for c, a in zip(groups, calls, strict=True) if a.main_cell_type in STRICT[c.cluster])
    assert lineage / adata.n_obs >= 0.95
    assert strict / adata.n_obs >= 0.75


# ---------------------------------------------------------------- genes sent, calls against the reference


def _notebook_run(server, tmp_path, *, tissue="blood", types=BLOOD_TYPES, pipeline="fast", seed=5):
    """The template's helper calls on a synthetic dataset (clusters = the true types), LLM agents against the
    scripted server: markers, annotation, ontology, evidence, summary text."""
    import cassia_helpers as ch
    from cassia_helpers.contract import DatasetPaths
    from cassia_helpers.dataset.outputs import dataset_summary_text
    from cassia_helpers.settings import Settings

    adata = make_counts(450, cell_types=types, housekeeping=True, seed=seed)
    ch.pp.normalize(adata)
    adata.obs["leiden"] = adata.obs["truth"].astype(str).astype("category")
    markers = ch.rank_markers(adata, n_genes=None)
    clusters = ch.cluster_markers(adata, markers)
    settings = Settings(annotator="llm", model="scripted-model", base_url=server.base_url, pipeline=pipeline,
                        cache_dir=str(tmp_path / "cache"))
    annotator = ch.make_annotator(settings, dataset="d", tissue=tissue, run_dir=str(tmp_path),
                                  ledger_path=tmp_path / "calls.jsonl", markers=markers, adata=adata)
    ch.annotate_clusters(adata, clusters, annotator=annotator, tissue=tissue, species="human")
    ch.annotate_ontology(adata)
    table = ch.marker_evidence(adata, species="human")
    paths = DatasetPaths(tmp_path, tissue, "d")
    summary = dataset_summary_text(adata, paths, settings)
    paths.folder.mkdir(parents=True, exist_ok=True)
    ch.write_cluster_table(adata, paths, markers=markers)
    return adata, markers, clusters, table, summary


def test_housekeeping_genes_stay_in_the_table_but_never_reach_a_prompt(llm_env, tmp_path):
    from cassia_helpers.dataset.markers import informative
    from tests.scripted_llm_server import parse_markers
    from tests.synthetic import HOUSEKEEPING

    adata, markers, clusters, _, summary = _notebook_run(llm_env, tmp_path)
    first = markers[markers["cluster"] == "T cell"]
    # they pass the marker test of the T cells (3-fold there) and stay in the full table
    assert set(HOUSEKEEPING) <= set(first[first["pval_adj"] < 0.05]["gene"])
    assert llm_env.received
    for body in llm_env.received:
        text = json.dumps(body.get("messages", []))
        assert not [g for g in HOUSEKEEPING if g in text], body["_agent"]
        assert all(informative(g) for g in parse_markers(body))
    # the canonical markers come first (ranked by log2 fold change)
    t_cell = next(c for c in clusters if c.cluster == "T cell")
    assert set(t_cell.genes[:6]) == set(BLOOD_TYPES["T cell"])
    record = adata.uns["cassia_batch"]["marker_filter"]
    assert record["ranking"].startswith("log2 fold change") and "MALAT1" in record["excluded"]
    assert "markers sent: up to 50 per cluster, ranked by log2 fold change" in summary


def test_score_ranking_and_no_filter_are_still_available():
    import cassia_helpers as ch

    adata = make_counts(300, cell_types=BLOOD_TYPES, housekeeping=True, seed=2)
    ch.pp.normalize(adata)
    adata.obs["leiden"] = adata.obs["truth"].astype(str)
    table = ch.rank_markers(adata, n_genes=None)
    old = ch.cluster_markers(adata, table, ranking="score", informative_only=False, min_pct=0)
    assert any(g in sum((c.genes for c in old), []) for g in ("RPS27", "MT-CO1", "MALAT1"))
    with pytest.raises(ValueError, match="ranking"):
        ch.cluster_markers(adata, table, ranking="pvalue")


def test_one_implausible_type_for_every_cluster_is_flagged_and_the_summary_says_so(llm_env, tmp_path):
    llm_env.fixed_call = "Hepatocyte"
    adata, _, _, table, summary = _notebook_run(llm_env, tmp_path)
    assert set(table["label"]) == {"Hepatocyte"}
    # the model cited the clusters' real, enriched markers: the cited-marker check alone passes them
    assert all(json.loads(m)[0]["enriched"] for m in table["markers"])
    assert table["flag"].mean() >= 0.9
    assert all("contradicted" in k and "implausible_for_tissue" in k for k in table["flag_kind"])
    assert "Hepatocyte is not expected in blood" in table["flag_reason"].iloc[0]
    assert set(adata.obs["marker_evidence_flag_kind"].astype(str)) == {"contradicted, implausible_for_tissue"}
    n = len(table)
    assert f"marker evidence: {n} of {n} clusters flagged (contradicted {n}, implausible_for_tissue {n}" in summary
    assert summary.count("    FLAG ") == n
    written = pd.read_csv(next(tmp_path.rglob("d_clusters.csv")), keep_default_na=False)
    assert written["evidence_flag"].all()
    assert set(written["evidence_flag_kind"]) == {"contradicted, implausible_for_tissue"}
    assert written["evidence_flag_reason"].str.contains("implausible_for_tissue: Hepatocyte").all()
    assert adata.uns["cassia_batch"]["marker_evidence"]["flags"]["implausible_for_tissue"] == n
    # the validator was given the reference's markers of the call and of the rivals the list points to
    validator = [b for b in llm_env.received if b["_agent"] == "validator"]
    text = json.dumps(validator[0]["messages"])
    assert "called type, Hepatocyte: ALB" in text and "[not expected in blood]" in text
    assert "alternative, " in text


@pytest.mark.parametrize(("tissue", "types"), [("blood", BLOOD_TYPES), ("brain", BRAIN_TYPES)])
def test_a_clean_run_flags_no_correct_call(llm_env, tmp_path, tissue, types):
    adata, _, _, table, summary = _notebook_run(llm_env, tmp_path, tissue=tissue, types=types)
    onto = load_cell_ontology()
    truth = {t: map_label(t).term_id for t in types}
    for row in table.itertuples():
        term = adata.uns["cassia_batch"]["ontology"]["clusters"].loc[row.cluster, "term_id"]
        assert onto.related(term, truth[row.cluster]), (row.cluster, row.label)  # the call is right
    assert not table["flag"].any(), table["flag_reason"].tolist()
    assert "marker evidence: 0 of 3 clusters flagged" in summary


def test_a_dendritic_cluster_called_b_cell_is_contradicted():
    types = {**BLOOD_TYPES, "Dendritic cell": ["FCER1A", "CLEC10A", "CD1C", "CST3", "HLA-DQA1", "FLT3"]}
    adata = make_counts(500, cell_types=types, seed=4)
    sc.pp.normalize_total(adata)
    sc.pp.log1p(adata)
    calls = {"Dendritic cell": {"main_cell_type": "B cell", "key_markers": ["CST3", "HLA-DQA1"]},
             "Monocyte": {"main_cell_type": "CD14+ monocyte", "key_markers": ["CD14"]}}
    table = marker_evidence(adata, calls, groupby="truth", tissue="blood")
    assert table.loc["Dendritic cell", "flag"] and table.loc["Dendritic cell", "flag_kind"] == "contradicted"
    assert "canonical markers of B cell not enriched" in table.loc["Dendritic cell", "flag_reason"]
    assert not table.loc["Monocyte", "flag"]


@pytest.mark.parametrize(
    ("label", "tissue", "term_id", "method"),
    [
        ("Luminal epithelial cell", "breast", "CL:0002326", "tissue"),  # luminal epithelial cell of mammary gland
        ("luminal epithelial cells", "Breast", "CL:0002326", "tissue"),
        ("Luminal epithelial cell", "", "CL:0000066", "ancestor"),  # no tissue: epithelial cell
        ("Basal epithelial cell", "breast", "CL:0000066", "ancestor"),
        ("CD56dim NK cell", "blood", "CL:0000939", "reference"),  # CD16-positive, CD56-dim natural killer cell
        ("Adaptive NK cells", "blood", "CL:0000623", "ancestor"),
        ("Activated CD4+ T cells", "blood", "CL:0000624", "ancestor"),
        ("T cell", "breast", "CL:0000084", "exact"),  # an exact name is never re-qualified
    ],
)
def test_qualified_labels_reach_cell_ontology(label, tissue, term_id, method):
    m = map_label(label, tissue=tissue)
    assert (m.term_id, m.method) == (term_id, method), m
    if method == "ancestor":
        assert m.note.startswith("nearest broader term")


@pytest.mark.parametrize("label", ["Mixed T and B cells", "T/NK doublets", "Foo cells", "Cycling cells"])
def test_labels_naming_several_types_or_none_stay_unmatched(label):
    assert map_label(label).method == "unmatched"


def test_reference_note_names_the_called_type_and_its_rivals():
    from cassia_helpers.dataset.annotate.reference.retrieval import reference_note

    genes = ["FCER1A", "CLEC10A", "CD1C", "LYZ", "CST3", "S100A8", "S100A9"]
    note = reference_note("B cell", genes, tissue="blood", species="human")
    assert "called type, B cell: MS4A1, CD79A" in note and "(in the list: none)" in note
    assert "alternative, Conventional dendritic cell type 2" in note
    assert len(note.split()) < 80  # a few genes per type, not the whole reference
    assert reference_note("Gibberish", [], tissue="blood", species="human") == ""


@pytest.mark.parametrize(("gene", "sent"), [
    ("RPS27", False), ("RPL36AL", False), ("RPLP0", False), ("Rps27", False), ("MT-CO1", False), ("mt-Co1", False),
    ("MTRNR2L12", False), ("MALAT1", False), ("Eef1a1", False),
    ("RPS6KA1", True), ("Rps6kb1", True), ("RPN1", True), ("CD3E", True), ("MT1G", True),  # kinases, metallothionein
])
def test_which_genes_may_be_sent(gene, sent):
    from cassia_helpers.dataset.markers import informative

    assert informative(gene) is sent


def test_the_boost_agent_is_given_the_reference_markers_of_the_call_and_its_rivals():
    from cassia_helpers.dataset.annotate import ClusterAnnotation
    from cassia_helpers.dataset.annotate.agents.boost import boost_prompt

    markers = ClusterMarkers("3", ["FCER1A", "CLEC10A", "CD1C", "LYZ", "CST3"], n_cells=40)
    prompt = boost_prompt(markers, ClusterAnnotation("3", "B cell", reasoning="CD74 and HLA-DRA"), tissue="blood",
                          species="human")
    assert "called type, B cell: MS4A1" in prompt
    assert "alternative, Conventional dendritic cell type 2: CD1C, FCER1A, CLEC10A" in prompt


def test_b_cells_with_mhc_class_ii_are_not_contradicted_by_dendritic_cells():
    """Most dendritic-cell reference markers are MHC class II genes, which B cells express highly; DCs are
    defined not to express MS4A1 and CD79A, which these B cells do: no 'Dendritic cell fits better' flag."""
    mhc = ["HLA-DRA", "HLA-DQA1", "HLA-DQB1", "HLA-DPA1", "HLA-DPB1", "CD74"]
    types = {**BLOOD_TYPES, "B cell": ["MS4A1", "CD79A", *mhc]}
    adata = make_counts(450, cell_types=types, seed=6)
    b_cells = np.flatnonzero(adata.obs["truth"].astype(str) == "B cell")
    others = np.setdiff1d(np.arange(adata.n_obs), b_cells)
    quiet = b_cells[: int(0.6 * len(b_cells))]  # the B-cell genes seen in 40 % of the cells, as in real data
    for gene in ("MS4A1", "CD79A"):
        column = adata.var_names.get_loc(gene)
        adata.X[np.concatenate([quiet, others]), column] = 0
    _normalised(adata)
    calls = {"B cell": {"main_cell_type": "B cell", "key_markers": ["MS4A1", "CD79A"]}}
    table = marker_evidence(adata, calls, groupby="truth", tissue="blood")
    assert "Dendritic cell" not in str(table.loc["B cell", "flag_reason"]), table.loc["B cell", "flag_reason"]
    assert not table.loc["B cell", "flag"]


def test_no_non_blood_type_is_proposed_for_a_cd45_positive_cluster():
    """Lipid-laden macrophages express SPARC, CD36, FABP5 and RGCC, which also mark capillary endothelial cells:
    PTPRC in most of the cluster's cells rules an endothelial 'fits better' out, as it rules the call out."""
    mono = ["CD14", "LYZ", "FCN1", "S100A8", "S100A9", "CSF1R", "CD68", "PTPRC"]
    types = {**BLOOD_TYPES, "Monocyte": mono, "Foamy": ["PTPRC", "SPARC", "CD36", "FABP5", "RGCC", "KDR", "CD68"]}
    adata = _normalised(make_counts(600, cell_types=types, seed=7))
    calls = {"Foamy": {"main_cell_type": "Classical monocyte", "key_markers": ["CD36", "CD68"]}}
    table = marker_evidence(adata, calls, groupby="truth", tissue="lung")
    assert "endothelial" not in str(table.loc["Foamy", "flag_reason"]).lower(), table.loc["Foamy", "flag_reason"]
