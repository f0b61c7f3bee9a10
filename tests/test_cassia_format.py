"""CASSIA / Seurat / scanpy file formats of our results, the pipeline's obs/uns columns, gene look-ups and
subclusters."""

from __future__ import annotations

import csv
import io
import json

import anndata as ad
import numpy as np
import pandas as pd
import scanpy as sc

from cassia_helpers.contract import DatasetPaths
from cassia_helpers.dataset import cassia_format as cf
from cassia_helpers.dataset.annotate import ClusterAnnotation
from cassia_helpers.dataset.annotate.agents.annotator import LLMAnnotator
from cassia_helpers.dataset.annotate.agents.boost import GeneLookup
from cassia_helpers.dataset.annotate.agents.merging import merge_from_hierarchy
from cassia_helpers.dataset.annotate.columns import pipeline_text_lines, write_pipeline_columns
from cassia_helpers.dataset.annotate.llm.options import LLMOptions
from cassia_helpers.dataset.annotate.subclusters import annotate_subclusters
from cassia_helpers.dataset.markers import rank_markers, store_rank_genes_groups, top_markers
from cassia_helpers.dataset.outputs import write_result
from tests.synthetic import make_counts


def annotated(cluster: str, main: str, **extra) -> ClusterAnnotation:
    fields = dict(cluster=cluster, main_cell_type=main, sub_cell_types=["CD8+ T cell"], markers_sent=["CD3E", "CD8A"],
                  iterations=1, score=82.0, score_reasoning="good",
                  merged_groupings=["Immune cell", "T cell", "CD8+ T cell"],
                  transcript=[{"agent": "annotator (round 1)", "content": "A\nFINAL ANNOTATION: T cell"},
                              {"agent": "formatter (json_schema)", "content": "{}"},
                              {"agent": "validator (round 1)", "content": "VALIDATION PASSED"},
                              {"agent": "scorer (call 1)", "content": "<score>82</score>"},
                              {"agent": "boost (round 1)", "content": "<check_genes>CD8A</check_genes>"},
                              {"agent": "gene look-up (round 1)", "content": "- CD8A: log2FC 2.00"},
                              {"agent": "boost (round 2)", "content": "FINAL ANNOTATION: CD8+ T cell"}])
    fields.update(extra)
    return ClusterAnnotation(**fields)


def normalised(n_cells: int = 300, **kwargs) -> ad.AnnData:
    adata = make_counts(n_cells, **kwargs)
    sc.pp.normalize_total(adata, target_sum=1e4)
    sc.pp.log1p(adata)
    adata.obs["leiden"] = pd.Categorical(adata.obs["truth"].cat.codes.astype(str))
    return adata


def test_cassia_csv_and_conversations():
    results = [annotated("0", "CD8+ T cell", kept_answer="boosted"), annotated("1", "B cell", score=None)]
    text = cf.cassia_csv(results, tissue="blood", species="human", model="m",
                         provider="https://user:secret@llm.example.org:8443/v1?key=abc")
    rows = list(csv.DictReader(io.StringIO(text)))
    assert list(rows[0]) == cf.CASSIA_COLUMNS
    assert rows[0]["Provider"] == "https://llm.example.org:8443/v1" and "secret" not in text and "abc" not in text
    assert (rows[0]["Score"], rows[1]["Score"]) == ("82", "")
    assert [rows[0][f"Merged_Grouping_{i}"] for i in (1, 2, 3)] == ["Immune cell", "T cell", "CD8+ T cell"]
    conv = json.loads(json.dumps(cf.conversations(results)))
    assert set(conv) == {"0", "1"}
    assert conv["0"]["annotations"] == ["A\nFINAL ANNOTATION: T cell", "FINAL ANNOTATION: CD8+ T cell"]
    assert conv["1"]["annotations"] == ["A\nFINAL ANNOTATION: T cell"]  # boosted answer not kept there
    assert conv["0"]["validations"] == ["VALIDATION PASSED"] and conv["0"]["scoring"] == "<score>82</score>"
    # a call the boost put in place of the first one was never validated: CASSIA must not show the first one's pass
    revised = cf.conversations([annotated("2", "CD8+ T cell", kept_answer="boosted", revised_from="Unknown")])["2"]
    assert "PASSED" not in revised["validations"][-1].upper() and "(Unknown)" in revised["validations"][-1]
    assert revised["first_call_validations"] == ["VALIDATION PASSED"]
    # the offline reference has no agents' turns: CASSIA's page shows its reasoning as the analysis
    offline = ClusterAnnotation(cluster="3", main_cell_type="B cell", reasoning="MS4A1 and CD79A are enriched")
    assert cf.conversations([offline])["3"]["annotations"] == ["MS4A1 and CD79A are enriched"]
    # CASSIA's scoring and report read the structured answer from `formatting`: the kept boost's, not the first's
    assert json.loads(conv["0"]["formatting"])["main_cell_type"] == "CD8+ T cell"
    assert conv["1"]["formatting"] == "{}"
    assert [t["agent"] for t in conv["0"]["boost"]] == ["boost (round 1)", "gene look-up (round 1)",
                                                        "boost (round 2)"]


def test_seurat_markers_and_rank_genes_groups_in_the_h5ad(tmp_path):
    adata = normalised()
    full = rank_markers(adata, n_genes=None)
    assert full.groupby("cluster").size().min() > 100  # every tested gene, not only the top
    table = top_markers(full, 20)
    seurat = cf.to_seurat_markers(table)
    assert list(seurat.columns) == cf.SEURAT_MARKER_COLUMNS
    assert seurat[["pct.1", "pct.2"]].stack().between(0, 1).all()
    pd.testing.assert_frame_equal(cf.from_seurat_markers(seurat)[table.columns], table)
    assert store_rank_genes_groups(adata, table, n_genes=10)
    adata.write_h5ad(tmp_path / "a.h5ad")
    back = ad.read_h5ad(tmp_path / "a.h5ad")
    df = sc.get.rank_genes_groups_df(back, group="0")
    expected = table[table["cluster"] == "0"].head(10)
    assert df["names"].tolist() == expected["gene"].tolist()
    assert np.allclose(df["logfoldchanges"], expected["logfoldchange"], rtol=1e-4)
    sc.pl.rank_genes_groups_dotplot(back, n_genes=3, show=False, dendrogram=False)


def test_rank_genes_groups_stays_writable_for_hundreds_of_clusters(tmp_path):
    groups = [str(i) for i in range(500)]
    table = pd.DataFrame({"cluster": np.repeat(groups, 5), "rank": np.tile(np.arange(1, 6), 500),
                          "gene": [f"G{i}" for i in range(2500)], "score": 1.0, "logfoldchange": 1.0,
                          "pval": 0.01, "pval_adj": 0.02, "pct_in_cluster": 0.5, "pct_out_cluster": 0.1})
    adata = ad.AnnData(np.zeros((2, 2), dtype=np.float32))
    assert store_rank_genes_groups(adata, table, n_genes=5)
    adata.write_h5ad(tmp_path / "many.h5ad")
    assert len(ad.read_h5ad(tmp_path / "many.h5ad").uns["rank_genes_groups"]["names"].dtype.names) == 500
    too_many = table.assign(cluster=table["cluster"] + "_" + "x" * 100)
    assert not store_rank_genes_groups(adata, too_many, key_added="other")
    assert "other" not in adata.uns and "not written" in adata.uns["cassia_batch"]["warnings"][-1]


def test_pipeline_columns_honour_key_added(tmp_path):
    adata = ad.AnnData(np.zeros((4, 2), dtype=np.float32))
    adata.obs["leiden"] = pd.Categorical(["0", "0", "1", "1"])
    results = [annotated("0", "T cell", consensus="T cell", agreement=2 / 3, runners_up=["NK cell"], disputed=True),
               annotated("1", "B cell", score=None, consensus="B cell", agreement=1.0)]
    write_pipeline_columns(adata, results, key_added="ct", settings={"pipeline": "full", "models": ("a", "b")})
    assert adata.obs["ct_score"].tolist()[:2] == [82.0, 82.0] and np.isnan(adata.obs["ct_score"].iloc[3])
    assert np.allclose(adata.obs["ct_agreement"], [2 / 3, 2 / 3, 1.0, 1.0])
    assert adata.obs["ct_disputed"].tolist() == [True, True, False, False]
    assert adata.obs["ct_broad"].tolist() == ["Immune cell"] * 4 and adata.obs["ct_fine"].iloc[0] == "CD8+ T cell"
    text = "\n".join(pipeline_text_lines(results[0]))
    assert "quality score:    82/100" in text and "agreement 67%" in text and "DISPUTED" in text
    assert "Immune cell > T cell > CD8+ T cell" in text
    adata.write_h5ad(tmp_path / "p.h5ad")
    table = ad.read_h5ad(tmp_path / "p.h5ad").uns["cassia_batch"]["pipeline"]["clusters"]
    assert table.loc["0", "runners_up"] == "NK cell" and table.loc["0", "score_reasoning"] == "good"


def test_gene_lookup_from_the_full_table_and_the_matrix():
    adata = normalised()
    full = rank_markers(adata, n_genes=None, min_pct=0.5)
    lookup = GeneLookup(full, adata=adata)
    t_cluster = str(adata.obs.loc[adata.obs["truth"] == "T cell", "leiden"].iloc[0])
    rare = next(g for g in adata.var_names if g not in set(full["gene"]))  # under the detection filter
    records = {r["gene"]: r for r in lookup.lookup(t_cluster, ["cd3e", "MS4A1", rare, "NOPE"])}
    assert records["CD3E"]["status"] == "tested" and records["CD3E"]["logfoldchange"] > 2
    assert records["MS4A1"]["status"] == "tested" and records["MS4A1"]["logfoldchange"] < -2
    assert records["NOPE"]["status"] == "not in dataset"
    untested = records[rare]
    assert untested["status"] == "not tested" and 0 <= untested["pct_in"] < 0.5
    text = lookup.describe(t_cluster, ["CD3E", "NOPE"])
    assert "CD3E: log2FC" in text and "NOPE: not in this dataset" in text


def test_merge_from_a_reference_hierarchy():
    parents = {"CD8+ T cell": "T cell", "T cell": "Lymphocyte", "Lymphocyte": None}
    results = [ClusterAnnotation("0", "CD8+ T cell"), ClusterAnnotation.unknown("1", "no markers")]
    merge_from_hierarchy(results, parents.get)
    assert results[0].merged_groupings == ["Lymphocyte", "CD8+ T cell", "CD8+ T cell"]
    assert results[1].merged_groupings == ["Unknown"] * 3
    # a cluster called at the common level because its cells split between two subtypes: fine is not a subtype
    parents["Dendritic cell"] = None
    mixed = ClusterAnnotation("2", "Dendritic cell", sub_cell_types=["Plasmacytoid dendritic cell"],
                              mixed_cell_types=["Plasmacytoid dendritic cell (42% of cells)",
                                                "Conventional dendritic cell type 1 (26% of cells)"])
    merge_from_hierarchy([mixed], parents.get)
    assert mixed.merged_groupings == ["Dendritic cell"] * 3


def test_reference_annotator_fills_score_and_levels_from_its_hierarchy():
    from cassia_helpers.dataset.annotate.agents.merging import fill_from_reference
    from cassia_helpers.dataset.annotate.reference.annotator import ReferenceAnnotator

    reference = ReferenceAnnotator(species="human")
    child = next(ct for ct in reference.reference.cell_types if ct.parent is not None)
    results = [ClusterAnnotation("0", child.name, confidence=70.0), ClusterAnnotation.unknown("1", "no markers")]
    fill_from_reference(results, reference.reference)
    top = reference.reference.ancestors(child.name)[-1]
    assert results[0].score == 70.0 and "reference" in results[0].score_reasoning
    assert results[0].merged_groupings == [top, child.name, child.name]
    assert results[1].score is None and results[1].merged_groupings == ["Unknown"] * 3


def test_subclusters_are_annotated_with_the_parent_as_context(llm_env, tmp_path):
    types = {"CD8 T": ["CD3E", "CD3D", "CD8A", "CD8B", "GZMK", "CCL5"],
             "CD4 T": ["CD3E", "CD3D", "CD4", "IL7R", "TRAC", "CD3G"],
             "B": ["MS4A1", "CD79A", "CD19", "BANK1", "CD22", "CD79B"]}
    adata = normalised(360, cell_types=types)
    adata.obs["cell_type"] = pd.Categorical(np.where(adata.obs["truth"] == "B", "B cell", "T cell"))
    annotator = LLMAnnotator(LLMOptions(model="scripted-model", base_url=llm_env.base_url,
                                        cache_dir=str(tmp_path / "c"), concurrency=2),
                             ledger_path=tmp_path / "l.jsonl")
    # "gauss" connectivities: the default ("umap") compiles numba kernels for a minute in a fresh process
    results = annotate_subclusters(adata, "T cell", annotator=annotator, tissue="blood", resolution=0.3,
                                   method="gauss")
    assert results and all(r.cluster.startswith("T cell / ") for r in results)
    column = adata.obs["cell_type_subcluster"]
    t_cells = adata.obs["truth"] != "B"
    assert set(column[~t_cells]) == {"B cell"}
    for truth, call in (("CD8 T", "CD8+ T cell"), ("CD4 T", "CD4+ T cell")):
        assert (column[adata.obs["truth"] == truth] == call).mean() > 0.9
    context = [b for b in llm_env.received if b["_agent"] == "annotator"][0]["messages"][1]["content"]
    assert "all these cells were called T cell" in context
    assert {r["cluster"] for r in json.loads(json.dumps(
        [{"cluster": r.cluster} for r in results]))} <= {f"T cell / {i}" for i in range(10)}
    # the run's report and summaries read them from the result record
    paths = DatasetPaths(tmp_path, "blood", "d")
    paths.folder.mkdir(parents=True)
    recorded = json.loads(write_result(adata, paths).read_text())["subclusters"]["T cell"]
    assert [c["cluster"] for c in recorded["clusters"]] == [r.cluster for r in results]
    assert sum(c["n_cells"] for c in recorded["clusters"]) == recorded["n_cells"] == int(t_cells.sum())
    # a parent no cluster is called (a typo) is said with the calls there are, on the terminal too
    adata.uns["cassia_batch"]["annotation"] = {"step_warnings": []}
    assert annotate_subclusters(adata, "T cel", annotator=annotator, tissue="blood") == []
    assert adata.uns["cassia_batch"]["annotation"]["step_warnings"] == [
        "--subcluster 'T cel': no cluster is called that (the calls: B cell, T cell)"]
