"""The CASSIA-style agents through the real openai client against the scripted server on 127.0.0.1."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cassia_helpers.dataset.annotate import ClusterMarkers
from cassia_helpers.dataset.annotate.agents.annotator import LLMAnnotator, parse_answer
from cassia_helpers.dataset.annotate.agents.replies import read_groupings, read_score, read_verdict
from cassia_helpers.dataset.annotate.llm.transport import reply_fields
from cassia_helpers.ledger import read_ledger
from tests.conftest import API_KEY, llm_annotator

CLUSTERS = [
    ClusterMarkers("0", ["CD3E", "CD8A", "CD8B", "GZMK", "CCL5"], n_cells=120),
    ClusterMarkers("1", ["MS4A1", "CD79A", "CD19", "BANK1"], n_cells=80),
    ClusterMarkers("2", ["CD14", "LYZ", "FCN1", "S100A8"], n_cells=60),
]
# rounds x (annotator + up to 3 formatter + validator)
MAX_LOGICAL_CALLS = 2 * 5


def annotator(server, tmp_path: Path, name: str = "ledger", **options) -> LLMAnnotator:
    settings = dict(model="scripted-model", base_url=server.base_url, cache_dir=str(tmp_path / "cache"),
                    ledger_path=tmp_path / f"{name}.jsonl", dataset="pbmc", tissue="blood", concurrency=4)
    settings.update(options)
    return llm_annotator(**settings)


def sent(records: list[dict]) -> list[dict]:
    return [r for r in records if r["status"] in ("ok", "error")]


def test_labels_and_ledger_equal_the_servers_count(llm_env, tmp_path):
    results = annotator(llm_env, tmp_path).annotate(CLUSTERS, tissue="blood", species="human")
    assert [r.main_cell_type for r in results] == ["CD8+ T cell", "B cell", "Monocyte"]
    for result, markers in zip(results, CLUSTERS, strict=True):
        assert result.status == "ok" and 0 <= result.confidence <= 100
        assert result.key_markers and set(result.key_markers) <= set(markers.genes)
        assert result.markers_sent == markers.genes
        assert [t["agent"].split()[0] for t in result.transcript] == ["annotator", "formatter", "validator"]
    records = read_ledger(tmp_path / "ledger.jsonl")
    stats = llm_env.stats()
    assert len(sent(records)) == stats["requests"] == 9
    assert sum(r["input_tokens"] for r in records) == stats["prompt_tokens"]
    assert sum(r["output_tokens"] for r in records) == stats["completion_tokens"]
    assert sum(r.input_tokens for r in results) == stats["prompt_tokens"]
    assert {r["agent"] for r in records} == {"annotator", "formatter", "validator"}
    assert all(r["dataset"] == "pbmc" and r["tissue"] == "blood" and r["model"] == "scripted-model" for r in records)
    # structured outputs were asked for with a JSON schema naming the six fields
    formatter = [b for b in llm_env.received if b["_agent"] == "formatter"][0]
    assert formatter["response_format"]["type"] == "json_schema"
    assert set(formatter["response_format"]["json_schema"]["schema"]["required"]) == {
        "main_cell_type", "sub_cell_types", "mixed_cell_types", "confidence", "key_markers", "reasoning",
        "cell_ontology_id"}
    assert all(b["temperature"] == 0 and b["seed"] == 0 for b in llm_env.received)


def test_rerun_is_served_from_the_cache(llm_env, tmp_path):
    first = annotator(llm_env, tmp_path).annotate(CLUSTERS, tissue="blood", species="human")
    llm_env.reset_stats()
    again = annotator(llm_env, tmp_path, name="rerun").annotate(CLUSTERS, tissue="blood", species="human")
    assert llm_env.stats()["requests"] == 0
    assert [r.main_cell_type for r in again] == [r.main_cell_type for r in first]
    records = read_ledger(tmp_path / "rerun.jsonl")
    assert records and all(r["status"] == "cache_hit" and r["input_tokens"] == 0 and r["cost"] == 0
                           for r in records)
    llm_env.reset_stats()
    annotator(llm_env, tmp_path, name="nocache", use_cache=False).annotate(CLUSTERS[:1], tissue="blood",
                                                                           species="human")
    assert llm_env.stats()["requests"] == 3


def test_json_schema_refused_falls_back_to_json_object(llm_env, tmp_path):
    llm_env.reject_json_schema = True
    results = annotator(llm_env, tmp_path, concurrency=1).annotate(CLUSTERS, tissue="blood", species="human")
    assert [r.main_cell_type for r in results] == ["CD8+ T cell", "B cell", "Monocyte"]
    formats = [b.get("response_format", {}).get("type") for b in llm_env.received if b["_agent"] == "formatter"]
    # refused once, then json_object for every cluster
    assert formats == ["json_schema", "json_object", "json_object", "json_object"]
    assert len(sent(read_ledger(tmp_path / "ledger.jsonl"))) == llm_env.stats()["requests"]


def test_no_response_format_at_all_falls_back_to_prose(llm_env, tmp_path):
    llm_env.reject_response_format = True
    results = annotator(llm_env, tmp_path, concurrency=1).annotate(CLUSTERS, tissue="blood", species="human")
    assert [r.main_cell_type for r in results] == ["CD8+ T cell", "B cell", "Monocyte"]
    formats = [b.get("response_format", {}).get("type") for b in llm_env.received if b["_agent"] == "formatter"]
    assert formats == ["json_schema", "json_object", None, None, None]


def test_calls_stay_bounded_when_the_model_talks_garbage(llm_env, tmp_path):
    llm_env.garbage = True
    results = annotator(llm_env, tmp_path).annotate(CLUSTERS, tissue="blood", species="human")
    assert all(r.main_cell_type == "Unknown" and r.status == "unknown" and r.reason for r in results)
    per_cluster = {}
    for record in read_ledger(tmp_path / "ledger.jsonl"):
        per_cluster[record["cluster"]] = per_cluster.get(record["cluster"], 0) + 1
    assert set(per_cluster) == {"0", "1", "2"}
    assert max(per_cluster.values()) <= MAX_LOGICAL_CALLS
    assert sum(per_cluster.values()) == llm_env.stats()["requests"]


def test_rate_limits_and_server_errors_are_retried_and_each_attempt_recorded(llm_env, tmp_path):
    llm_env.fail_next(2, status=429, retry_after=0.2)
    results = annotator(llm_env, tmp_path, concurrency=1).annotate(CLUSTERS[:1], tissue="blood", species="human")
    assert results[0].main_cell_type == "CD8+ T cell"
    llm_env.fail_next(1, status=500)
    annotator(llm_env, tmp_path, name="second", concurrency=1).annotate(CLUSTERS[1:2], tissue="blood",
                                                                        species="human")
    records = read_ledger(tmp_path / "ledger.jsonl") + read_ledger(tmp_path / "second.jsonl")
    errors = [r for r in records if r["status"] == "error"]
    assert len(errors) == 3 and all(r["input_tokens"] == 0 and r["cost"] == 0 for r in errors)
    assert "RateLimitError 429" in errors[0]["error"] and "500" in errors[2]["error"]
    assert [r["attempt"] for r in records if r["agent"] == "annotator"][:3] == [1, 2, 3]
    assert len(sent(records)) == llm_env.stats()["requests"]


def test_timeouts_and_unreadable_bodies_end_in_unknown_not_a_crash(llm_env, tmp_path):
    llm_env.fault_rates(p_timeout=1.0, timeout_s=3.0)
    results = annotator(llm_env, tmp_path, timeout=0.3, max_attempts=2, concurrency=1).annotate(
        CLUSTERS[:1], tissue="blood", species="human")
    assert results[0].main_cell_type == "Unknown" and "request failed" in results[0].reason
    records = read_ledger(tmp_path / "ledger.jsonl")
    assert [r["status"] for r in records] == ["error", "error"] and "Timeout" in records[0]["error"]
    llm_env.fault_rates()
    llm_env.malformed_body_next(1)
    results = annotator(llm_env, tmp_path, name="malformed").annotate(CLUSTERS[1:2], tissue="blood",
                                                                      species="human")
    assert results[0].main_cell_type == "B cell"
    assert read_ledger(tmp_path / "malformed.jsonl")[0]["error"].startswith("unreadable response")


def test_wrong_key_stops_early_with_a_clear_reason(llm_server, monkeypatch, tmp_path):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-wrong")
    results = annotator(llm_server, tmp_path).annotate(CLUSTERS, tissue="blood", species="human")
    assert all(r.main_cell_type == "Unknown" and "AuthenticationError 401" in r.reason for r in results)
    assert llm_server.stats()["requests"] <= len(CLUSTERS)


def test_budget_stops_requests(llm_env, tmp_path):
    prices = tmp_path / "prices.json"
    prices.write_text(json.dumps({"scripted-model": {"input": 1000.0, "output": 1000.0}}))
    results = annotator(llm_env, tmp_path, concurrency=1, max_cost=0.5, price_file=str(prices)).annotate(
        CLUSTERS, tissue="blood", species="human")
    # one annotator call (~200 tokens at $1000/1M = ~$0.2) ... then the budget is reached
    assert results[-1].main_cell_type == "Unknown" and results[-1].reason_kind == "budget"
    records = read_ledger(tmp_path / "ledger.jsonl")
    spent = sum(r["cost"] for r in sent(records))
    assert len(sent(records)) == llm_env.stats()["requests"]
    before_last = sum(r["cost"] for r in sent(records)[:-1])
    assert before_last < 0.5 <= spent  # nothing was sent once the budget was reached
    assert any(r["status"] == "budget" for r in records)


def test_seed_refused_is_dropped(llm_env, tmp_path):
    llm_env.reject_seed = True
    results = annotator(llm_env, tmp_path, concurrency=1).annotate(CLUSTERS[:2], tissue="blood", species="human")
    assert [r.main_cell_type for r in results] == ["CD8+ T cell", "B cell"]
    assert sum("seed" in b for b in llm_env.received) == 1


def test_key_never_written(llm_env, tmp_path):
    annotator(llm_env, tmp_path).annotate(CLUSTERS, tissue="blood", species="human")
    llm_env.fail_next(1, status=429)
    annotator(llm_env, tmp_path, name="again", use_cache=False).annotate(CLUSTERS[:1], tissue="blood",
                                                                         species="human")
    assert llm_env.headers_seen[0]["Authorization"] == f"Bearer {API_KEY}"
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert len(files) > 3
    for path in files:
        assert API_KEY not in path.read_text(errors="replace"), path


@pytest.mark.parametrize("text, expected", [
    ('{"main_cell_type": "NK cell", "confidence": 0.9}', ("NK cell", 90.0)),
    ('Sure!\n```json\n{"main_cell_type": "B cell", "key_markers": "MS4A1, CD79A"}\n```', ("B cell", 50.0)),
    ("Reasoning...\nFINAL ANNOTATION: **Astrocyte**", ("Astrocyte", 50.0)),
    ("I cannot tell.", None),
    # the schema's 0-100 scale: 1 is 1, 2 is 2; a share below 1 is a fraction; text or NaN is not a number
    ('{"main_cell_type": "B cell", "confidence": 1}', ("B cell", 1.0)),
    ('{"main_cell_type": "B cell", "confidence": "95%"}', ("B cell", 95.0)),
    ('{"main_cell_type": "B cell", "confidence": NaN}', ("B cell", 50.0)),
    ('{"main_cell_type": "B cell", "confidence": true}', ("B cell", 50.0)),
    ('{"main_cell_type": "B cell", "confidence": "high"}', ("B cell", 50.0)),
    # JSON as small models write it: Python quotes and literals, trailing commas
    ("{'main_cell_type': 'B cell', 'confidence': 80, 'key_markers': ['MS4A1',],}", ("B cell", 80.0)),
    ('{"main_cell_type": "NK cell", "confidence": 70, "sub_cell_types": [],}', ("NK cell", 70.0)),
    # a first final line the model moved past is not its answer
    ("FINAL ANNOTATION: Neuron, but on reflection the markers are immune.\nFINAL ANNOTATION: B cell", ("B cell", 50.0)),
    # the final line as models write it: the label below it (ranked, fenced), with its reasons or more sentences
    ("FINAL ANNOTATION:\n1. B cell\n2. Plasma cell", ("B cell", 50.0)),
    ("FINAL ANNOTATION:\n```\nNK cell\n```", ("NK cell", 50.0)),
    ("FINAL ANNOTATION: B cell.", ("B cell", 50.0)),
    ("FINAL ANNOTATION: B cell, based on MS4A1 and CD79A", ("B cell", 50.0)),
    ("FINAL ANNOTATION: Neuron. Hmm, wait, check again", ("Neuron", 50.0)),
    ("**Final annotation:** CD8+ T cell (cytotoxic) with high confidence", ("CD8+ T cell (cytotoxic)", 50.0)),
    ("FINAL ANNOTATION: T cells, CD4+", ("T cells, CD4+", 50.0)),
    ("FINAL ANNOTATION: **CD8+ T cells** (cytotoxic)", ("CD8+ T cells", 50.0)),
    # the formatter's JSON with a note after it, braces and all
    ('Here:\n\n{"main_cell_type": "B cell", "confidence": 77}\n\nNote: the {markers} seen.', ("B cell", 77.0)),
])
def test_tolerant_parsing(text, expected):
    parsed = parse_answer(text)
    assert (parsed["main_cell_type"], parsed["confidence"]) == expected if expected else parsed is None


# R1-style: the chat template opened <think>, so the reply holds only its end; the thoughts name other answers
THOUGHTS = ('Could this be a hepatocyte?\nFINAL ANNOTATION: Hepatocyte\nVALIDATION FAILED maybe? {"score": 3} '
            "Score: 3/100. Wait.\n</think>\n\n")


def test_a_reasoning_models_thoughts_before_a_lone_closing_tag_are_never_its_answer():
    assert parse_answer(THOUGHTS + "The markers are B-cell markers.\nFINAL ANNOTATION: B cell")["main_cell_type"] \
        == "B cell"
    assert read_verdict(THOUGHTS + "VALIDATION PASSED") is True
    assert read_score(THOUGHTS + "<score>88</score>")[0] == 88
    assert parse_answer("<think>cut off while thinking: FINAL ANNOTATION: Hepatocyte") is None


def test_thoughts_alone_are_never_the_answer():
    """A reasoning model cut off while thinking (or a server that files the whole reply as thoughts): only
    what follows a closing tag is an answer."""
    def body(message: dict) -> dict:
        return {"choices": [{"message": {"role": "assistant", **message}, "finish_reason": "length"}]}

    thinking = "The markers suggest... FINAL ANNOTATION: Neuron. Hmm, wait, check again"
    assert reply_fields(body({"content": "", "reasoning_content": thinking}))[0] == ""
    assert reply_fields(body({"content": None, "reasoning": thinking}))[0] == ""
    assert reply_fields(body({"content": None, "reasoning_content": f"<think>{thinking}</think>\nFINAL ANNOTATION: "
                                                                   "B cell"}))[0] == "FINAL ANNOTATION: B cell"
    assert reply_fields(body({"content": "FINAL ANNOTATION: NK cell", "reasoning_content": thinking}))[0] \
        == "FINAL ANNOTATION: NK cell"


def test_scores_and_groupings_in_python_style_json_are_read():
    assert read_score("{'score': 85, 'reasoning': 'markers fit',}")[0] == 85
    groupings = read_groupings("{'groupings': {'0': ['Immune cell', 'T cell', 'CD8+ T cell',],},}", ["0"])
    assert groupings == {"0": ["Immune cell", "T cell", "CD8+ T cell"]}


def test_reasoning_models_without_temperature_and_with_reasoning_content(llm_env, tmp_path):
    llm_env.reject_temperature = True
    llm_env.reasoning_only = True
    results = annotator(llm_env, tmp_path, concurrency=1).annotate(CLUSTERS[:2], tissue="blood", species="human")
    assert [r.main_cell_type for r in results] == ["CD8+ T cell", "B cell"]
    assert sum("temperature" in b for b in llm_env.received) == 1  # refused once, then left out
    assert len(sent(read_ledger(tmp_path / "ledger.jsonl"))) == llm_env.stats()["requests"]


def test_the_model_that_answered_is_recorded_and_another_than_asked_is_said(llm_env, tmp_path):
    llm = annotator(llm_env, tmp_path / "same")
    llm.annotate(CLUSTERS[:1], tissue="blood", species="human")
    assert llm.describe()["served_model"] == "scripted-model" and llm.notices == []
    llm_env.served_model = "anthropic/claude-fallback"  # a router's fallback
    llm = annotator(llm_env, tmp_path / "other")
    llm.annotate(CLUSTERS[:1], tissue="blood", species="human")
    assert llm.describe()["served_model"] == "anthropic/claude-fallback"
    assert llm.notices == ["the server answered with model anthropic/claude-fallback, not scripted-model (a fallback "
                           "or an alias: the prices and provenance are those of the model asked)"]


@pytest.mark.parametrize("served, warned", [("gpt-4o-2024-08-06", False), ("GPT-4o", False),
                                            ("gpt-4o-mini-2024-07-18", True), ("gpt-4o-mini", True)])
def test_a_dated_snapshot_of_the_model_asked_is_that_model_and_another_model_is_said(llm_env, tmp_path, served,
                                                                                   warned):
    llm_env.served_model = served  # gpt-4o-mini's name starts with gpt-4o's: a router's cheaper fallback
    llm = annotator(llm_env, tmp_path, model="openai/gpt-4o", max_rounds=1)
    llm.annotate(CLUSTERS[:1], tissue="blood", species="human")
    assert llm.describe()["served_model"] == served
    assert bool(llm.notices) == warned, llm.notices


def test_an_answer_is_kept_when_the_validator_cannot_be_reached(llm_env, tmp_path):
    prices = tmp_path / "prices.json"
    # the budget runs out after the annotator and formatter calls of the first cluster
    prices.write_text(json.dumps({"scripted-model": {"input": 1000.0, "output": 1000.0}}))
    results = annotator(llm_env, tmp_path, concurrency=1, max_cost=0.35, price_file=str(prices)).annotate(
        CLUSTERS[:2], tissue="blood", species="human")
    assert results[0].main_cell_type == "CD8+ T cell" and "not confirm" in results[0].reasoning
    assert results[1].main_cell_type == "Unknown" and results[1].reason_kind == "budget"


def test_an_answer_paid_for_is_read_from_its_final_line_when_the_formatter_cannot_be_asked(llm_env, tmp_path):
    prices = tmp_path / "prices.json"
    # the budget runs out after the first annotator call (about 0.21 USD at these prices)
    prices.write_text(json.dumps({"scripted-model": {"input": 1000.0, "output": 1000.0}}))
    results = annotator(llm_env, tmp_path, concurrency=1, max_cost=0.2, price_file=str(prices)).annotate(
        CLUSTERS[:2], tissue="blood", species="human")
    assert results[0].main_cell_type == "CD8+ T cell" and not results[0].validated
    assert any("formatter unavailable" in turn["content"] for turn in results[0].transcript)
    assert results[1].main_cell_type == "Unknown" and results[1].reason_kind == "budget"


# --------------------------------------------------------------------------- replies as real models give them


@pytest.mark.parametrize("text, verdict", [
    ('{"verdict": "VALIDATION PASSED", "feedback": "fits"}', True),
    ('{"passed": false, "feedback": "CD8A is not cited"}', False),
    ("The cited markers are all in the list and support the call.\n\n**VALIDATION PASSED**", True),
    ("Checking...\nVerdict: VALIDATION FAILED\nCite CD8A next time.", False),
    ("VALIDATION PASSED\nThough one could argue for VALIDATION FAILED.", None),
    ("The markers fit well.", None),
    ("VALIDATION PASSED\nLooks right.", True),
    ("**VALIDATION PASSED**", True),
    # naming both verdicts is undetermined, never a pass
    ("VALIDATION FAILED: it would only be VALIDATION PASSED if CD8A were cited.", None),
    ("VALIDATION PASSED? No: VALIDATION FAILED", None),
    ("", None),
    # a verdict line without the word VALIDATION, as chat models write it
    ("The markers fit.\n\n**Verdict:** \u2705 PASS", True),
    ("Final decision - FAIL\nCD8A is missing.", False),
    ("Verdict: PASS\nVerdict: FAIL", None),
    ("The verdict: pass or fail is unclear.", None),
])
def test_the_verdict_is_read_from_json_or_the_first_or_last_line(text, verdict):
    assert read_verdict(text) is verdict


@pytest.mark.parametrize("text, score", [
    ("<reasoning>ok</reasoning><score>85</score>", 85.0),
    ('{"reasoning": "ok", "score": 85}', 85.0),
    ('```json\n{"score": "85/100"}\n```', 85.0),
    ("Solid call.\n\nScore: 85/100", 85.0),
    ("Overall I would rate this call 85 out of 100.", 85.0),
    ("**Score:** 8.5/10", 85.0),
    # as GPT and Claude write it: bold around the word, a percentage, a share, a rating, a dash
    ("**Score**: 88", 88.0),
    ("**Final Score**: 90", 90.0),
    ("Score: 85%", 85.0),
    ("Score: 0.88", 88.0),
    ('{"score": 0.9}', 90.0),
    ("Rating: 9/10", 90.0),
    ("Score - 85", 85.0),
    ("Score: 150/100", None),
    ('{"score": -3}', None),
    ("A fine call, scoring well on most criteria.", None),
])
def test_scores_are_read_in_every_common_form_and_validated(text, score):
    assert read_score(text)[0] == score


def test_groupings_are_read_under_another_key_and_sanitised():
    reply = json.dumps({"result": {"merged_clusters": [
        {"cluster_id": "0", "broad_group": "=cmd|' /C calc'!A0\nImmune", "detailed_group": "T cell" * 60,
         "fine_group": "+CD8+ T cell\r\nx"},
        {"cluster_id": "cluster 1", "broad_group": "Immune", "detailed_group": "B cell", "fine_group": ""}]}})
    found = read_groupings(reply, ["0", "1"])
    assert list(found) == ["0"]  # cluster 1 lacks its fine level: left to the next call
    broad, detailed, fine = found["0"]
    assert all("\n" not in x and "\r" not in x and len(x) <= 100 and x[0] not in "=+-@" for x in found["0"])
    assert broad.endswith("Immune") and fine.startswith("CD8+ T cell") and detailed.endswith("…")
    assert read_groupings('{"0": {"broad": "Immune", "detailed": "T cell", "fine": "CD8+ T cell"}}', ["0"]) == {
        "0": ["Immune", "T cell", "CD8+ T cell"]}


def test_a_verdict_on_the_last_line_needs_no_second_round_and_a_rerun_sends_nothing(llm_env, tmp_path):
    llm_env.reply_styles = {"verdict_last", "text_only"}
    results = annotator(llm_env, tmp_path).annotate(CLUSTERS, tissue="blood", species="human")
    assert [r.main_cell_type for r in results] == ["CD8+ T cell", "B cell", "Monocyte"]
    assert all(r.validated is True and r.iterations == 1 and "not confirm" not in r.reasoning for r in results)
    assert llm_env.stats()["requests"] == 3 * len(CLUSTERS)  # annotator, formatter, validator: one round each
    assert llm_env.stats()["by_agent"]["validator"] == len(CLUSTERS)
    # the validator was asked for structured output first (it answered in text anyway)
    assert all(b["response_format"]["type"] == "json_schema" for b in llm_env.received if b["_agent"] == "validator")
    llm_env.reset_stats()
    again = annotator(llm_env, tmp_path, name="rerun").annotate(CLUSTERS, tissue="blood", species="human")
    assert llm_env.stats()["requests"] == 0
    assert [(r.main_cell_type, r.validated) for r in again] == [(r.main_cell_type, True) for r in results]


def test_a_reply_naming_both_verdicts_is_never_a_pass_and_is_cached(llm_env, tmp_path):
    llm_env.reply_styles = {"both_verdicts", "text_only"}
    results = annotator(llm_env, tmp_path).annotate(CLUSTERS[:2], tissue="blood", species="human")
    assert [r.main_cell_type for r in results] == ["CD8+ T cell", "B cell"]
    assert all(r.validated is False and "did not confirm" in r.reasoning for r in results)
    llm_env.reset_stats()
    annotator(llm_env, tmp_path, name="rerun").annotate(CLUSTERS[:2], tissue="blood", species="human")
    assert llm_env.stats()["requests"] == 0  # cached whatever the verdict


@pytest.mark.parametrize("style", ["score_json", "score_slash", "score_out_of", "structured"])
def test_scores_in_other_forms_are_read_and_a_rerun_sends_nothing(llm_env, tmp_path, style):
    from tests.test_pipeline import CLUSTERS as PIPELINE_CLUSTERS
    from tests.test_pipeline import pipeline

    llm_env.reply_styles = {"groupings_key"} | ({style, "text_only"} if style != "structured" else set())
    results = pipeline(llm_env, tmp_path).annotate(PIPELINE_CLUSTERS, tissue="blood", species="human")
    assert [r.score for r in results[:2]] == [90, 90]
    assert all(r.score is not None and not any(n.startswith("score:") for n in r.notes) for r in results)
    assert [r.merged_groupings for r in results][:2] == [["Immune cell", "T cell", "CD8+ T cell"],
                                                         ["Immune cell", "B cell", "B cell"]]
    assert not any(n.startswith("merging:") for r in results for n in r.notes)
    assert llm_env.stats()["by_agent"]["scorer"] == 2 + 2 * 2  # every cluster once, the two boosted again
    llm_env.reset_stats()
    pipeline(llm_env, tmp_path, name="rerun").annotate(PIPELINE_CLUSTERS, tissue="blood", species="human")
    assert llm_env.stats()["requests"] == 0


def test_unusable_model_costs_at_most_five_requests_per_cluster_and_stops_asking(llm_env, tmp_path):
    from tests.test_pipeline import pipeline

    clusters = [ClusterMarkers(str(i), m.genes, n_cells=50) for i, m in enumerate(CLUSTERS * 3)]  # 9 clusters
    llm_env.garbage = True
    for name, mode, concurrency in (("fast", "fast", 1), ("full", "full", 1), ("parallel", "full", 4)):
        llm_env.reset_stats()
        run = pipeline(llm_env, tmp_path, name=name, cache=name, concurrency=concurrency, pipeline=mode)
        results = run.annotate(clusters, tissue="blood", species="human")
        stats = llm_env.stats()
        assert all(r.main_cell_type == "Unknown" and r.score is None and not r.boosted for r in results)
        assert stats["requests"] <= 5 * len(clusters), (name, stats)
        assert set(stats["by_agent"]) == {"annotator", "formatter"}, name  # no score, boost or merge asked
        assert len(sent(read_ledger(tmp_path / f"{name}.jsonl"))) == stats["requests"]
        assert [n for n in run.notices if "not sent" in n] == [
            "the model's replies named no cell type for 3 clusters in a row: the remaining clusters of this "
            "dataset were not sent"], name
        if concurrency == 1:  # 3 clusters x 2 rounds x (annotator + formatter), the other 6 never sent
            assert stats["requests"] == 12 and sum("not sent" in r.reason for r in results) == 6


# 6 clusters with clear markers and 3 with a single canonical one (scored weak and boosted): a third boosted
DONE_WHEN_CLUSTERS = [ClusterMarkers(str(i), genes, n_cells=100) for i, genes in enumerate([
    ["CD3E", "CD8A", "CD8B", "GZMK"], ["MS4A1", "CD79A", "CD19", "BANK1"], ["CD14", "LYZ", "FCN1", "S100A8"],
    ["NKG7", "GNLY", "KLRD1", "PRF1"], ["FCER1A", "CLEC10A", "CST3", "HLA-DRA"], ["PPBP", "PF4", "GNG11"],
    ["GENE1", "CD3E", "GENE2", "GENE3"], ["GENE4", "MS4A1", "GENE5"], ["GENE6", "CD14", "GENE7"]])]
DONE_WHEN_DE = {"6": {"CD3D": 2.0, "CD8A": 2.5, "CD8B": 2.1}, "7": {"CD79A": 2.0, "CD19": 2.2},
                "8": {"LYZ": 2.0, "FCN1": 1.5}}


@pytest.mark.parametrize("styles", [set(), {"verdict_last", "score_slash", "groupings_key", "text_only"}],
                         ids=["structured", "text-with-deviations"])
def test_requests_per_cluster_meet_the_goal_and_a_rerun_sends_none(llm_env, tmp_path, styles):
    """fast <= 3.1 and full <= 5 requests per cluster with a third of the clusters boosted, a rerun 0, against
    a model that answers in JSON where asked, or one that ignores structured output and deviates as real
    models do (verdict on the last line, "Score: N/100", groupings under another key)."""
    import pandas as pd

    from cassia_helpers.dataset.annotate.agents.boost import GeneLookup
    from cassia_helpers.dataset.annotate.agents.pipeline import AnnotationPipeline, PipelineSettings

    table = pd.DataFrame([dict(cluster=c, rank=50 + i, gene=g, score=4.0, logfoldchange=lfc, pval=1e-6,
                               pval_adj=1e-5, pct_in_cluster=0.7, pct_out_cluster=0.1)
                          for c, genes in DONE_WHEN_DE.items() for i, (g, lfc) in enumerate(genes.items())])
    lookup = GeneLookup(table, var_names=sorted({g for genes in DONE_WHEN_DE.values() for g in genes}))
    llm_env.reply_styles = set(styles)
    n = len(DONE_WHEN_CLUSTERS)
    for mode, goal in (("fast", 3.1), ("full", 5.0)):
        for run in ("first", "rerun"):
            llm_env.reset_stats()
            agents = annotator(llm_env, tmp_path, name=f"{mode}-{run}", cache_dir=str(tmp_path / mode))
            results = AnnotationPipeline(agents, PipelineSettings(pipeline=mode), lookup=lookup).annotate(
                DONE_WHEN_CLUSTERS, tissue="blood", species="human")
            requests = llm_env.stats()["requests"]
            assert requests / n <= (goal if run == "first" else 0), (mode, run, llm_env.stats())
            assert all(r.status == "ok" and (r.validated or r.revised_from) for r in results)  # a revision is re-scored
            if mode == "full":
                assert sum(r.boosted for r in results) == n // 3
                assert all(r.score is not None and len(r.merged_groupings) == 3 for r in results)


def test_unusable_checks_cost_at_most_five_requests_per_cluster_and_are_warned(llm_env, tmp_path):
    """Good calls, but a validator, scorer, boost agent and merger that answer unusable text: no second
    round, no second scoring call, the boost ends at its first reply, and the failed steps are warned."""
    from tests.test_pipeline import CLUSTERS as PIPELINE_CLUSTERS
    from tests.test_pipeline import pipeline

    llm_env.reply_styles = {"unusable_checks"}
    run = pipeline(llm_env, tmp_path)
    results = run.annotate(PIPELINE_CLUSTERS, tissue="blood", species="human")
    stats = llm_env.stats()
    assert stats["requests"] <= 5 * len(PIPELINE_CLUSTERS), stats
    assert stats["by_agent"]["validator"] == stats["by_agent"]["annotator"] == len(PIPELINE_CLUSTERS)
    assert stats["by_agent"]["scorer"] == len(PIPELINE_CLUSTERS) and stats["by_agent"].get("boost", 0) <= 1
    assert [r.main_cell_type for r in results[:2]] == ["CD8+ T cell", "B cell"]
    assert all(r.validated is False and r.score is None for r in results if r.status == "ok")
    assert any(n.startswith("scoring failed for 4 of 4 clusters") for n in run.notices), run.notices
    assert any(n.startswith("merging failed for") for n in run.notices), run.notices


def test_a_refused_schema_falls_back_to_json_mode_for_the_verdict_with_its_shape_in_the_instructions(llm_env,
                                                                                                    tmp_path):
    llm_env.reject_json_schema = True
    results = annotator(llm_env, tmp_path, concurrency=1).annotate(CLUSTERS, tissue="blood", species="human")
    assert all(r.validated is True for r in results)
    validator = [b for b in llm_env.received if b["_agent"] == "validator"]
    assert [b["response_format"]["type"] for b in validator] == ["json_object"] * len(CLUSTERS)
    system = validator[0]["messages"][0]
    assert system["role"] == "system" and '"verdict": "VALIDATION PASSED"' in system["content"]


def test_the_price_flags_are_the_primary_models_and_every_model_needs_a_price_for_a_budget(tmp_path):
    """--input-price/--output-price price --model only: a model of --models is priced from the price file or
    the known prices, and --max-cost with one of no known price is a usage error (it would count as free)."""
    from cassia_helpers.dataset.annotate.factory import check_llm_setup
    from cassia_helpers.settings import Settings, UsageError

    primary = llm_annotator(model="lab-model", input_price=1.0, output_price=2.0, cache_dir=str(tmp_path / "c"),
                            ledger_path=tmp_path / "ledger.jsonl")
    assert primary.price_known and not primary.sibling(model="other-model").price_known
    assert primary.sibling(seed=7).price_known  # another run of the same model keeps its prices
    settings = Settings(annotator="llm", base_url="http://127.0.0.1:9/v1", model="lab-model", input_price=1.0,
                        output_price=2.0, max_cost=1.0, models="other-model", cache_dir=str(tmp_path / "c"))
    with pytest.raises(UsageError, match="no known price for model 'other-model'"):
        check_llm_setup(settings)
    check_llm_setup(settings.replace(models="gpt-4o-mini"))  # a model with a known price
