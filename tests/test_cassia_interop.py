"""CASSIA's own tools on our files: the CSV, the conversations JSON, the Seurat-style markers CSV and the h5ad.

CASSIA (``pip install cassia==1.4.0``) is a test-only dependency; without it these tests skip and say so.
Its LLM calls go to the scripted server on 127.0.0.1 (CASSIA's custom OpenAI-compatible provider: the base URL
we write in the ``Provider`` column, its key in ``CUSTOMIZED_API_KEY``).
"""

from __future__ import annotations

import html
import json
import subprocess
import sys
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scanpy as sc

from cassia_helpers.dataset import cassia_format as cf
from cassia_helpers.dataset.annotate.agents.annotator import LLMAnnotator
from cassia_helpers.dataset.annotate.agents.boost import GeneLookup
from cassia_helpers.dataset.annotate.agents.pipeline import AnnotationPipeline, PipelineSettings
from cassia_helpers.dataset.annotate.apply import annotate_clusters
from cassia_helpers.dataset.annotate.columns import write_pipeline_columns
from cassia_helpers.dataset.annotate.llm.options import LLMOptions
from cassia_helpers.dataset.markers import cluster_markers, rank_markers, store_rank_genes_groups, top_markers
from tests.conftest import API_KEY
from tests.synthetic import make_counts

CASSIA = pytest.importorskip(
    "CASSIA", reason="CASSIA is not installed: CI installs it with `pip install cassia==1.4.0`")
DATASET = "demo"


def our_outputs(server, folder: Path) -> tuple[list, dict[str, Path]]:
    """A small dataset through the full pipeline, written as the batch writes it."""
    adata = make_counts(300)
    sc.pp.normalize_total(adata, target_sum=1e4)
    sc.pp.log1p(adata)
    adata.obs["leiden"] = pd.Categorical(adata.obs["truth"].cat.codes.astype(str))
    full = rank_markers(adata, n_genes=None)
    annotator = LLMAnnotator(LLMOptions(model="scripted-model", base_url=server.base_url,
                                        cache_dir=str(folder / "cache"), concurrency=2),
                             ledger_path=folder / "ledger.jsonl")
    pipeline = AnnotationPipeline(annotator, PipelineSettings(), lookup=GeneLookup(full, adata=adata))
    sent = cluster_markers(adata, full, n_top=20)
    results = annotate_clusters(adata, sent, annotator=pipeline, tissue="blood")
    write_pipeline_columns(adata, results)
    top = top_markers(full, 50)
    store_rank_genes_groups(adata, top)
    paths = {name: folder / f"{DATASET}_{name}" for name in
             ("markers.csv", "cassia.csv", "cassia_conversations.json", "annotated.h5ad")}
    # as the batch writes it: the top ranks and every gene sent
    cf.to_seurat_markers(top_markers(full, 50, sent=sent)).to_csv(paths["markers.csv"], index=False)
    paths["cassia.csv"].write_text(cf.cassia_csv(results, tissue="blood", species="human", model="scripted-model",
                                                 provider=server.base_url))
    paths["cassia_conversations.json"].write_text(json.dumps(cf.conversations(results)))
    adata.write_h5ad(paths["annotated.h5ad"])
    return results, paths


@pytest.fixture
def outputs(llm_env, tmp_path, monkeypatch):
    monkeypatch.setenv("CUSTOMIZED_API_KEY", API_KEY)
    monkeypatch.chdir(tmp_path)
    results, paths = our_outputs(llm_env, tmp_path)
    llm_env.reset_stats()
    return results, paths


def test_html_report_and_anndata_import(outputs):
    from CASSIA.reports.generate_batch_report import generate_batch_html_report

    results, paths = outputs
    report = Path(generate_batch_html_report(str(paths["cassia.csv"])))
    text = report.read_text(encoding="utf-8")
    for r in results:
        assert f"Quality Score: {r.score:.0f}" in text and r.merged_groupings[0] in text
    # with the transcripts, as the README shows: every cluster's own conversation in the report
    from CASSIA.reports.generate_batch_report import generate_batch_html_report_from_data

    conversations = json.loads(paths["cassia_conversations.json"].read_text())
    rows = pd.read_csv(paths["cassia.csv"]).to_dict("records")
    for row in rows:
        row["Conversation History"] = conversations[str(row["Cluster ID"])]
    text = Path(generate_batch_html_report_from_data(rows, "with_history.html")).read_text(encoding="utf-8")
    for r in results:
        annotator_turn = next(t["content"] for t in r.transcript if t["agent"].startswith("annotator"))
        assert html.escape(annotator_turn.splitlines()[-1]) in text, r.cluster
    adata = ad.read_h5ad(paths["annotated.h5ad"])
    CASSIA.add_cassia_to_anndata(adata, str(paths["cassia.csv"]), cluster_col="leiden")
    assert (adata.obs["CASSIA_general_celltype"].astype(str) == adata.obs["cell_type"].astype(str)).all()
    assert np.allclose(adata.obs["CASSIA_score"].astype(float), adata.obs["cell_type_score"])
    assert (adata.obs["CASSIA_merged_grouping_1"].astype(str) == adata.obs["cell_type_broad"].astype(str)).all()
    # scanpy and CASSIA read the marker test kept in the h5ad (top 25 per cluster)
    assert len(sc.get.rank_genes_groups_df(adata, group="1")) == 25
    enhanced = CASSIA.enhance_scanpy_markers(adata, cluster_col="leiden")
    assert {"gene", "avg_log2FC", "pct.1", "pct.2"} <= set(enhanced.columns) and len(enhanced) == 75


def test_cassia_scoring_reads_our_transcripts(outputs, llm_env):
    results, paths = outputs
    # CASSIA scores only rows without a Score: blank ours, keep the conversations next to the CSV
    unscored = paths["cassia.csv"].with_name("unscored.csv")
    pd.read_csv(paths["cassia.csv"]).assign(Score=np.nan).to_csv(unscored, index=False)
    unscored.with_name("unscored_conversations.json").write_text(paths["cassia_conversations.json"].read_text())
    provider = pd.read_csv(paths["cassia.csv"])["Provider"].iloc[0]
    assert provider == llm_env.base_url
    scored = CASSIA.runCASSIA_score_batch(str(unscored), output_file=str(unscored.with_name("scored.csv")),
                                          model="scripted-model", provider=provider, max_workers=2)
    assert scored["Score"].between(0, 100).all() and llm_env.stats()["requests"] == 3
    prompts = [b["messages"][-1]["content"] for b in llm_env.received]
    # CASSIA 1.4.0 skips the history of a cluster whose id is 0 (a falsy id); every other one was read
    for r in results[1:]:
        annotator_turn = next(t["content"] for t in r.transcript if t["agent"].startswith("annotator"))
        assert any(annotator_turn in p for p in prompts), r.cluster
    assert dict(zip(scored["Cluster ID"].astype(str), scored["Score"], strict=True))["1"] == results[1].score


def test_cassia_boost_reads_our_markers_and_history(outputs, llm_env, tmp_path):
    results, paths = outputs
    # as the README shows: CASSIA 1.4.0 answers a gene with its first row in the table, so pass the cluster's own
    markers = pd.read_csv(paths["markers.csv"])
    answer = CASSIA.runCASSIA_annotationboost(
        full_result_path=str(paths["cassia.csv"]), marker=markers[markers["cluster"] == 1], cluster_name=1,
        major_cluster_info="human blood", output_name=str(tmp_path / "boost1"), num_iterations=2,
        model="scripted-model", provider=llm_env.base_url,
        conversations_json_path=str(paths["cassia_conversations.json"]), auto_convert_ids=False,
        conversation_history_mode="full")
    assert answer["status"] == "success" and Path(answer["summary_report_path"]).exists()
    first = llm_env.received[0]["messages"][-1]["content"]
    annotator_turn = next(t["content"] for t in results[1].transcript if t["agent"].startswith("annotator"))
    assert annotator_turn.splitlines()[-1] in first  # our final annotation was its starting point
    gene_answer = llm_env.received[1]["messages"][-1]["content"]
    assert "avg_log2FC" in gene_answer and "pct.1" in gene_answer and "p_val_adj" in gene_answer
    # the genes looked up are answered with cluster 1's own statistics, not another cluster's row
    rows = [line.split() for line in gene_answer.splitlines()[1:] if line.strip() and not line.startswith("Note")]
    own = markers[markers["cluster"] == 1].set_index("gene")["avg_log2FC"]
    assert rows and all(float(log2fc) == round(own[gene], 2) for gene, log2fc, *_ in rows), gene_answer


def test_cassia_validate_accepts_our_markers(outputs):
    _, paths = outputs
    run = subprocess.run(
        [sys.executable, "-c", "import sys; from CASSIA.cli import main; sys.argv = ['cassia'] + sys.argv[1:]; "
                               "sys.exit(main())", "validate", str(paths["markers.csv"]), "--json", "--strict"],
        capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stdout + run.stderr
    report = json.loads(run.stdout)
    assert report["status"] == "ok" and report["format"] == "seurat_long"
    assert report["errors"] == [] and report["warnings"] == [] and report["summary"]["cluster_count"] == 3
