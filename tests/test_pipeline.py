"""The full annotation pipeline (score, boost, consensus, merge) through the real openai client against the
scripted server on 127.0.0.1."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pandas as pd
import pytest

from cassia_helpers.dataset.annotate import ClusterMarkers
from cassia_helpers.dataset.annotate.agents.boost import GeneLookup
from cassia_helpers.dataset.annotate.agents.consensus import consensus, normalise_label
from cassia_helpers.dataset.annotate.agents.pipeline import AnnotationPipeline, PipelineSettings, estimate_calls
from cassia_helpers.dataset.annotate.agents.scoring import parse_score
from cassia_helpers.ledger import read_ledger
from tests.conftest import llm_annotator

CLUSTERS = [
    ClusterMarkers("0", ["CD3E", "CD8A", "CD8B", "GZMK", "CCL5"], n_cells=120),  # strong: scored 90
    ClusterMarkers("1", ["MS4A1", "CD79A", "CD19", "BANK1"], n_cells=80),  # strong: scored 90
    ClusterMarkers("2", ["GENE1", "CD3E", "GENE2", "GENE3"], n_cells=50),  # weak T cell call: scored 60
    ClusterMarkers("3", ["GENE5", "GENE6", "GENE7"], n_cells=40),  # Unknown: scored 20
]
# The full differential expression the boost is answered from: cluster 2 has the CD8 genes, cluster 3 the
# endothelial ones, though none of them was among the markers first sent.
FULL_DE = {"2": {"CD3D": 2.0, "CD8A": 2.5, "CD8B": 2.1, "CD4": -1.0}, "3": {"PECAM1": 3.0, "VWF": 2.2}}
VAR_NAMES = ["CD3E", "CD3D", "CD8A", "CD8B", "CD4", "PECAM1", "VWF", "GENE1", "GENE5"]


def full_table() -> pd.DataFrame:
    rows = [dict(cluster=c, rank=50 + i, gene=g, score=4.0, logfoldchange=lfc, pval=1e-6, pval_adj=1e-5,
                 pct_in_cluster=0.7, pct_out_cluster=0.1)
            for c, genes in FULL_DE.items() for i, (g, lfc) in enumerate(genes.items())]
    return pd.DataFrame(rows)


def pipeline(server, tmp_path: Path, name: str = "ledger", *, prices: dict | None = None, max_cost: float = 0.0,
             cache: str = "cache", concurrency: int = 4, **settings) -> AnnotationPipeline:
    options = dict(model="scripted-model", base_url=server.base_url, cache_dir=str(tmp_path / cache),
                   ledger_path=tmp_path / f"{name}.jsonl", dataset="pbmc", tissue="blood", concurrency=concurrency,
                   max_cost=max_cost)
    if prices:
        (tmp_path / "prices.json").write_text(json.dumps(prices))
        options["price_file"] = str(tmp_path / "prices.json")
    annotator = llm_annotator(**options)
    return AnnotationPipeline(annotator, PipelineSettings.from_options(**settings),
                              lookup=GeneLookup(full_table(), var_names=VAR_NAMES))


def sent(path: Path) -> list[dict]:
    return [r for r in read_ledger(path) if r["status"] in ("ok", "error")]


def by_cluster_agent(records: list[dict]) -> Counter:
    return Counter((r["cluster"], r["agent"]) for r in records)


def test_full_pipeline_scores_boosts_the_weak_and_merges(llm_env, tmp_path):
    results = pipeline(llm_env, tmp_path).annotate(CLUSTERS, tissue="blood", species="human")
    assert all(r.score is not None and 0 <= r.score <= 100 for r in results)
    assert [r.score for r in results[:2]] == [90, 90] and not any(r.boosted for r in results[:2])
    # the two weak clusters were boosted from the full DE, re-scored, and the better answer kept
    weak, unknown = results[2], results[3]
    assert weak.boosted and weak.kept_answer == "boosted" and weak.main_cell_type == "CD8+ T cell"
    assert weak.score == weak.boost_score == 95 and "replaced 'T cell'" in weak.notes[0]
    assert unknown.boosted and unknown.kept_answer == "boosted" and unknown.main_cell_type == "Endothelial cell"
    # a revised call says what it replaced, and carries nothing of the first call's verdicts
    assert (weak.revised_from, unknown.revised_from) == ("T cell", "Unknown")
    assert unknown.status == "ok" and unknown.reason_kind == "" and unknown.validated is None
    assert not results[0].revised_from
    lookups = [t["content"] for t in weak.transcript if t["agent"].startswith("gene look-up")]
    assert lookups and "CD8A: log2FC 2.50" in lookups[0] and "CD4: log2FC -1.00" in lookups[0]
    # merging placed every cluster at three levels
    assert [r.merged_groupings for r in results] == [
        ["Immune cell", "T cell", "CD8+ T cell"], ["Immune cell", "B cell", "B cell"],
        ["Immune cell", "T cell", "CD8+ T cell"], ["Stromal cell", "Endothelial cell", "Endothelial cell"]]
    records = sent(tmp_path / "ledger.jsonl")
    assert len(records) == llm_env.stats()["requests"]
    counts = by_cluster_agent(records)
    assert {c for c, a in counts if a == "boost"} == {"2", "3"}
    assert counts[("(dataset)", "merger")] == 1
    # each step stayed within its bound
    bounds = estimate_calls(PipelineSettings(), n_clusters=4)
    for cluster in ("0", "1", "2", "3"):
        assert counts[(cluster, "scorer")] <= 2 * bounds["score"][1]
        assert counts[(cluster, "boost")] <= 3 + 1
        total = sum(n for (c, _), n in counts.items() if c == cluster)
        assert bounds["annotate"][0] + 1 <= total <= bounds["annotate"][1] + bounds["score"][1] + bounds["boost"][1]
    assert sum(r.input_tokens for r in results) + sum(
        r["input_tokens"] for r in records if r["cluster"] == "(dataset)") == llm_env.stats()["prompt_tokens"]


def test_rerun_with_the_same_cache_sends_nothing(llm_env, tmp_path):
    first = pipeline(llm_env, tmp_path, n_runs=2).annotate(CLUSTERS, tissue="blood", species="human")
    llm_env.reset_stats()
    again = pipeline(llm_env, tmp_path, "rerun", n_runs=2).annotate(CLUSTERS, tissue="blood", species="human")
    assert llm_env.stats()["requests"] == 0
    assert [(r.main_cell_type, r.score, r.merged_groupings, r.agreement) for r in again] == [
        (r.main_cell_type, r.score, r.merged_groupings, r.agreement) for r in first]
    assert all(r["status"] == "cache_hit" for r in read_ledger(tmp_path / "rerun.jsonl"))


def test_fast_pipeline_is_the_single_pass(llm_env, tmp_path):
    results = pipeline(llm_env, tmp_path, pipeline="fast").annotate(CLUSTERS, tissue="blood", species="human")
    assert all(r.score is None and not r.boosted and not r.merged_groupings for r in results)
    assert set(llm_env.stats()["by_agent"]) == {"annotator", "formatter", "validator"}


def test_boost_only_under_the_threshold(llm_env, tmp_path):
    results = pipeline(llm_env, tmp_path, boost_below=95).annotate(CLUSTERS, tissue="blood", species="human")
    assert [r.boosted for r in results] == [True, True, True, True]
    # a boost that confirms the first call leaves it in place without asking the scorer again, and says so
    assert results[0].kept_answer == "initial" and results[0].main_cell_type == "CD8+ T cell"
    assert "confirmed the initial call" in results[0].notes[-1] and results[0].boost_score is None
    assert llm_env.stats()["by_agent"]["scorer"] == 4 + 2  # re-scored: only the two boosts that changed the call
    llm_env.reset_stats()
    results = pipeline(llm_env, tmp_path, "none", cache="other", boost_below=0).annotate(
        CLUSTERS[:3], tissue="blood", species="human")
    assert not any(r.boosted for r in results) and "boost" not in llm_env.stats()["by_agent"]


def test_a_boost_that_never_concludes_is_cut_at_its_bound(llm_env, tmp_path):
    llm_env.boost_never_concludes = True
    llm_env.boost_unknown_genes = True
    results = pipeline(llm_env, tmp_path, boost_rounds=2).annotate(CLUSTERS, tissue="blood", species="human")
    weak = results[2]
    assert weak.boosted and weak.kept_answer == "initial" and weak.main_cell_type == "T cell"
    assert "did not conclude in 3 calls" in weak.notes[-1]
    counts = by_cluster_agent(sent(tmp_path / "ledger.jsonl"))
    assert counts[("2", "boost")] == counts[("3", "boost")] == 3  # 2 rounds + the forced conclusion
    lookup = next(t["content"] for t in weak.transcript if t["agent"].startswith("gene look-up"))
    assert "NOTAGENE1: not in this dataset" in lookup
    assert len(sent(tmp_path / "ledger.jsonl")) == llm_env.stats()["requests"]


def test_a_score_out_of_range_is_asked_again_then_given_up(llm_env, tmp_path):
    llm_env.score_out_of_range = 1
    results = pipeline(llm_env, tmp_path, concurrency=1).annotate(CLUSTERS[:1], tissue="blood", species="human")
    assert results[0].score == 90
    assert [b["_agent"] for b in llm_env.received].count("scorer") == 2
    llm_env.score_out_of_range = 100
    results = pipeline(llm_env, tmp_path, "bad", cache="other", concurrency=1).annotate(
        CLUSTERS[1:2], tissue="blood", species="human")
    assert results[0].score is None and results[0].main_cell_type == "B cell"
    assert "outside 0-100" in results[0].notes[0]
    assert not results[0].boosted  # an unscored call is not boosted


def test_consensus_follows_the_scripted_disagreement(llm_env, tmp_path):
    llm_env.disagree_runs = {2}
    results = pipeline(llm_env, tmp_path, n_runs=3, agreement_threshold=0.75).annotate(
        CLUSTERS[:2], tissue="blood", species="human")
    cd8, b = results
    assert (cd8.consensus, cd8.agreement, cd8.runners_up, cd8.disputed) == ("CD8+ T cell", 0.6667, ["T cell"], True)
    assert (b.consensus, b.agreement, b.runners_up, b.disputed) == ("B cell", 1.0, [], False)  # no runner-up type
    llm_env.reset_stats()
    llm_env.disagree_runs = set()
    llm_env.disagree_models = {"second-model"}
    results = pipeline(llm_env, tmp_path, "models", cache="other", models="scripted-model,second-model").annotate(
        CLUSTERS[:1], tissue="blood", species="human")
    assert (results[0].agreement, results[0].disputed, results[0].runners_up) == (0.5, False, ["T cell"])
    models = Counter(b["model"] for b in llm_env.received if b["_agent"] == "annotator")
    assert models == {"scripted-model": 1, "second-model": 1}
    assert len(sent(tmp_path / "models.jsonl")) == llm_env.stats()["requests"]


def test_merging_asks_again_for_clusters_left_out(llm_env, tmp_path):
    llm_env.merge_drops = 1
    results = pipeline(llm_env, tmp_path).annotate(CLUSTERS[:3], tissue="blood", species="human")
    assert all(len(r.merged_groupings) == 3 and all(r.merged_groupings) for r in results)
    assert llm_env.stats()["by_agent"]["merger"] == 2
    llm_env.merge_drops = 10
    results = pipeline(llm_env, tmp_path, "again", cache="other").annotate(CLUSTERS[:3], tissue="blood",
                                                                            species="human")
    assert llm_env.stats()["by_agent"]["merger"] == 4  # bounded: two more
    left_out = [r for r in results if r.notes and "merging" in r.notes[-1]]
    assert len(left_out) == 1 and left_out[0].merged_groupings[1] == left_out[0].main_cell_type


def test_a_budget_stop_mid_boost_keeps_the_earlier_answers(llm_env, tmp_path):
    prices = {"scripted-model": {"input": 1000.0, "output": 1000.0}}
    pipeline(llm_env, tmp_path, "measure", prices=prices, cache="measure", concurrency=1).annotate(
        CLUSTERS[2:3], tissue="blood", species="human")
    spent, limit = 0.0, None
    for record in sent(tmp_path / "measure.jsonl"):
        spent += record["cost"]
        if record["agent"] == "boost":
            limit = spent - 1e-9  # the first boost request is sent, the next one is not
            break
    llm_env.reset_stats()
    results = pipeline(llm_env, tmp_path, prices=prices, max_cost=limit, concurrency=1).annotate(
        CLUSTERS[2:3], tissue="blood", species="human")
    weak = results[0]
    assert weak.main_cell_type == "T cell" and weak.status == "ok" and weak.score == 60
    assert weak.boosted and weak.kept_answer == "initial" and "budget" in weak.notes[-1]
    records = read_ledger(tmp_path / "ledger.jsonl")
    assert any(r["status"] == "budget" for r in records)
    assert len(sent(tmp_path / "ledger.jsonl")) == llm_env.stats()["requests"]


def test_estimate_calls_bounds_and_goal():
    bounds = estimate_calls(PipelineSettings(), max_rounds=2, n_clusters=30)
    assert bounds["annotate"] == (3, 10) and bounds["score"] == (1, 2) and bounds["boost"] == (3, 9)
    assert bounds["per_cluster"][0] <= 6  # the goal at one third boosted, in the usual case
    fast = estimate_calls(PipelineSettings(pipeline="fast"), n_clusters=30)
    assert set(fast) == {"annotate", "per_cluster", "per_dataset"}
    runs = estimate_calls(PipelineSettings(pipeline="fast", n_runs=3), n_clusters=1)
    assert runs["consensus"] == (6, 20)
    # --models b with --model a: both annotate every cluster (a listed again counts once)
    models = PipelineSettings(pipeline="fast", models=("b", "a"))
    assert estimate_calls(models, model="a", n_clusters=1)["consensus"] == (3, 10)
    assert estimate_calls(PipelineSettings(pipeline="fast", models=("a",)), model="a")["per_cluster"] == (3, 10)
    with pytest.raises(ValueError):
        PipelineSettings(boost_below=120)


@pytest.mark.parametrize("text, expected", [
    ("<reasoning>fine</reasoning><score>88</score>", (88.0, "fine", "")),
    ("<score>150</score>", (None, "", "the score 150 is outside 0-100")),
    ("Score: 70", (70.0, "Score: 70", "")),
    ("no idea", (None, "no idea", "no <score> was given")),
])
def test_parse_score(text, expected):
    assert parse_score(text) == expected


def test_consensus_normalises_names():
    assert normalise_label("CD8-positive T cells") == normalise_label("CD8+ T cell")
    assert normalise_label("T lymphocytes") == normalise_label("t cell")
    result = consensus(["T cells", "T cell", "B cell", "Unknown"], threshold=0.6)
    assert (result.label, result.agreement, result.runners_up, result.disputed) == ("T cells", 0.5,
                                                                                   ["B cell", "Unknown"], True)
    assert consensus(["Unknown", "Unknown", "NK cell"]).label == "NK cell"
    # spellings of one Cell Ontology term agree, as models and papers write them; a broader type does not
    agreed = consensus(["Monocyte", "Classical monocytes", "Mono (classical)"])
    assert (agreed.label, agreed.agreement, agreed.disputed) == ("Classical monocytes", 0.6667, False)
    assert consensus(["CD4+ T cell", "T cells, CD4+", "CD4-positive, alpha-beta T cell"]).agreement == 1.0
    assert consensus(["Tregs", "regulatory T cell"]).agreement == 1.0
    assert consensus(["CD4+ T cell", "CD8+ T cell"]).agreement == 0.5


def test_the_dry_run_counts_and_prices_each_model_of_models():
    from cassia_helpers.batch.dry_run import per_cluster
    from cassia_helpers.settings import Settings

    one = per_cluster(Settings(model="a", pipeline="fast"), tissue="blood")
    two = per_cluster(Settings(model="a", models="b,a", pipeline="fast"), tissue="blood")
    assert two["calls"] == (2 * one["calls"][0], 2 * one["calls"][1])  # b annotates every cluster too
    assert two["shares"] == {"b": (0.5, 0.5), "a": (0.5, 0.5)}  # each model's part, priced at its own price
