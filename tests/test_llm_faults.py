"""A misbehaving model server never turns into a wrong result reported as success.

Every case goes through the real openai client against the scripted server on 127.0.0.1: a wrong or
missing key, empty or garbage answers (never cached), a server that trickles or hangs (bounded by the
deadline and the circuit breaker), a budget with no price or no usage, a tricky validator verdict, huge
replies, a server that echoes the key, and a kernel killed with a request in flight.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from cassia_helpers.dataset.annotate import ClusterAnnotation, ClusterMarkers, annotation_failure
from cassia_helpers.dataset.annotate.agents.annotator import LLMAnnotator, validator_verdict
from cassia_helpers.dataset.annotate.llm.untrusted import MAX_LABEL_CHARS, MAX_REPLY_CHARS, csv_safe, sanitize_label
from cassia_helpers.ledger import (
    CallRecord,
    Ledger,
    check_budget_prices,
    read_ledger,
    resolve_pending,
    tracking_from_ledgers,
)
from tests.conftest import API_KEY, REPO

GENES = [["CD3E", "CD8A", "CD8B", "GZMK"], ["MS4A1", "CD79A", "CD19"], ["CD14", "LYZ", "FCN1"],
         ["NKG7", "GNLY", "KLRD1"], ["PPBP", "PF4"], ["FCER1A", "CLEC10A", "CST3"]]
CLUSTERS = [ClusterMarkers(str(i), genes, n_cells=50) for i, genes in enumerate(GENES)]
EXPECTED = ["CD8+ T cell", "B cell", "Monocyte", "NK cell", "Platelet", "Dendritic cell"]


def annotator(tmp_path: Path, name: str = "ledger", **options) -> LLMAnnotator:
    settings = dict(model="scripted-model", cache_dir=str(tmp_path / "cache"), ledger_path=tmp_path / f"{name}.jsonl",
                    dataset=name, tissue="blood", concurrency=1, timeout=5.0, deadline=10.0)
    settings.update(options)
    return LLMAnnotator(**settings)


def run(tmp_path: Path, clusters=CLUSTERS, **options) -> list[ClusterAnnotation]:
    return annotator(tmp_path, **options).annotate(clusters, tissue="blood", species="human")


def calls(path: Path) -> list[dict]:
    return [r for r in read_ledger(path) if r["status"] in ("ok", "error", "interrupted")]


def cached_entries(tmp_path: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in (tmp_path / "cache").rglob("*.json") if p.name != "capabilities.json"]


# --------------------------------------------------------------------------- refused: key, no key


def test_wrong_key_stops_the_dataset_at_once_with_a_dataset_reason(llm_server, monkeypatch, tmp_path):
    monkeypatch.setenv("OPENAI_BASE_URL", llm_server.base_url)
    monkeypatch.setenv("OPENAI_API_KEY", "sk-wrong-key-000000")
    results = run(tmp_path)
    assert llm_server.stats()["requests"] == 1  # the first 401 stops every later request
    assert all(r.main_cell_type == "Unknown" and r.reason_kind == "auth" for r in results)
    reason = annotation_failure(results)
    assert reason and "refused the API key" in reason and "6 of 6" in reason and "\n" not in reason
    assert len(calls(tmp_path / "ledger.jsonl")) == 1


def test_no_key_is_named_as_such(llm_server, monkeypatch, tmp_path):
    monkeypatch.setenv("OPENAI_BASE_URL", llm_server.base_url)
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    results = run(tmp_path, clusters=CLUSTERS[:3])
    assert {r.reason_kind for r in results} == {"no_key"}
    assert "no API key" in annotation_failure(results)


def test_a_minority_of_failures_is_not_a_dataset_failure():
    ok = ClusterAnnotation("0", "B cell")
    results = [ok, ok, ClusterAnnotation.unknown("2", "request failed", kind="timeout")]
    assert annotation_failure(results) is None
    # the model honestly not knowing is not a service failure either
    unknown = [ClusterAnnotation.unknown(str(i), "could not tell", kind="model_unknown") for i in range(3)]
    assert annotation_failure(unknown) is None
    # nor a reference with no matching type
    assert annotation_failure([ClusterAnnotation.unknown("0", "no type matched", kind="no_match")]) is None


# A server that answers, but never with a usable completion, fails the dataset with its cause: a batch
# of all-Unknown clusters reported as success is the wrong result this module exists to prevent.
@pytest.mark.parametrize(("fault", "kind", "says"), [
    ("server_error", "server_error", "answered with errors"),
    ("error_in_body", "unreadable", "upstream provider overloaded"),
    ("no_choices", "unreadable", "not chat completions"),
    ("garbage", "invalid_answer", "named no cell type"),
    ("bad_request", "rejected", "rejected the requests"),
])
def test_a_server_that_never_gives_a_usable_answer_fails_the_dataset(llm_env, tmp_path, fault, kind, says):
    if fault == "server_error":
        llm_env.fail_next(1000, status=500)
    elif fault == "bad_request":
        llm_env.reject_json_schema = llm_env.reject_response_format = True
        llm_env.fail_next(1000, status=400)
    else:
        setattr(llm_env, fault, True)
    results = run(tmp_path, clusters=CLUSTERS[:2], max_attempts=2)
    assert {r.reason_kind for r in results} == {kind}, [r.reason for r in results]
    reason = annotation_failure(results)
    assert reason and says in reason and "2 of 2" in reason and "\n" not in reason


def test_a_wrong_address_is_told_apart_from_an_unknown_model(llm_server, monkeypatch, tmp_path):
    monkeypatch.setenv("OPENAI_API_KEY", API_KEY)
    # the usual slip: the base URL without its /v1, so every request meets the server's 404 page
    results = run(tmp_path, clusters=CLUSTERS[:2], base_url=llm_server.base_url.removesuffix("/v1"))
    assert {r.reason_kind for r in results} == {"endpoint_not_found"}
    assert "check --base-url" in annotation_failure(results)
    assert llm_server.stats()["requests"] == 0  # no chat request ever reached the endpoint


# --------------------------------------------------------------------------- bad answers are not cached


@pytest.mark.parametrize("fault", ["empty_answer", "garbage"])
def test_bad_answers_are_not_cached_and_a_fixed_server_is_asked_again(llm_env, tmp_path, fault):
    setattr(llm_env, fault, True)
    first = run(tmp_path, clusters=CLUSTERS[:3], max_rounds=1)
    assert all(r.main_cell_type == "Unknown" and r.reason_kind == "invalid_answer" for r in first)
    assert cached_entries(tmp_path) == []
    llm_env.clear_faults()
    llm_env.reset_stats()
    again = run(tmp_path, clusters=CLUSTERS[:3], name="rerun", max_rounds=1)
    assert [r.main_cell_type for r in again] == EXPECTED[:3]
    assert llm_env.stats()["requests"] == 9  # asked again: annotator, formatter, validator per cluster
    assert all(str(e["content"]).strip() for e in cached_entries(tmp_path))


# --------------------------------------------------------------------------- bounded waits


def test_a_trickling_server_is_cut_at_the_deadline(llm_env, tmp_path):
    llm_env.trickle_s = 0.3  # well inside the idle timeout: only a wall-clock deadline stops it
    start = time.monotonic()
    results = run(tmp_path, clusters=CLUSTERS[:1], timeout=2.0, deadline=2.5, max_attempts=5, breaker_failures=0)
    elapsed = time.monotonic() - start
    assert elapsed < 2.5 + 1.5, elapsed
    assert results[0].main_cell_type == "Unknown" and results[0].reason_kind == "timeout"
    records = calls(tmp_path / "ledger.jsonl")
    assert len(records) == llm_env.stats()["requests"] >= 1
    assert all(r["status"] == "error" and r["estimated"] for r in records)


def test_retries_stay_within_the_deadline(llm_env, tmp_path):
    llm_env.fail_next(1000, status=503, retry_after=0.4)
    start = time.monotonic()
    results = run(tmp_path, clusters=CLUSTERS[:1], deadline=2.0, max_attempts=100)
    assert time.monotonic() - start < 3.0
    assert results[0].reason_kind == "timeout" and "deadline" in results[0].reason
    assert 2 <= llm_env.stats()["requests"] <= 6
    assert len(calls(tmp_path / "ledger.jsonl")) == llm_env.stats()["requests"]


def test_a_hanging_server_opens_the_breaker_once_for_the_whole_run(llm_env, tmp_path):
    llm_env.hang = True
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    options = dict(timeout=0.4, deadline=1.5, max_attempts=4, breaker_failures=2, breaker_cooldown=60.0,
                   run_dir=str(run_dir))
    start = time.monotonic()
    results = run(tmp_path, **options)
    # a later dataset of the same run does not try the dead server again
    later = run(tmp_path, name="later", clusters=CLUSTERS[:2], **options)
    assert time.monotonic() - start < 5.0
    assert llm_env.stats()["requests"] == 2
    assert all(r.main_cell_type == "Unknown" and r.reason_kind in ("timeout", "unreachable")
               for r in results + later)
    assert "circuit breaker open" in results[-1].reason
    assert "could not be reached" in annotation_failure(results)
    tracking = tracking_from_ledgers([tmp_path / "ledger.jsonl", tmp_path / "later.jsonl"])
    assert tracking["total_calls"] == 2 and len(tracking["circuit_breaker"]) == 1
    assert "circuit breaker opened" in tracking["circuit_breaker"][0]["error"]


# --------------------------------------------------------------------------- a budget that always holds


def test_max_cost_needs_a_known_price(tmp_path):
    problem = check_budget_prices("my-local-model", 1.0)
    assert problem and "my-local-model" in problem and "--price-file" in problem and "\n" not in problem
    assert check_budget_prices("my-local-model", 0.0) is None
    assert check_budget_prices("gpt-4o-mini", 1.0) is None
    assert check_budget_prices("my-local-model", 1.0, input_price=0.1, output_price=0.2) is None
    prices = tmp_path / "prices.json"
    prices.write_text(json.dumps({"my-local-model": {"input": 1, "output": 2}}))
    assert check_budget_prices("my-local-model", 1.0, prices) is None
    prices.write_text("not json")
    assert "not a valid price file" in check_budget_prices("my-local-model", 1.0, prices)


def test_a_budget_with_no_price_sends_nothing(llm_env, tmp_path):
    results = run(tmp_path, clusters=CLUSTERS[:3], max_cost=0.01)
    assert llm_env.stats()["requests"] == 0
    assert all(r.reason_kind == "budget" for r in results) and "no known price" in results[0].reason
    assert "budget" in annotation_failure(results)


def test_no_usage_gets_an_estimate_that_the_budget_uses(llm_env, tmp_path):
    llm_env.omit_usage = True
    prices = tmp_path / "prices.json"
    prices.write_text(json.dumps({"scripted-model": {"input": 1000.0, "output": 1000.0}}))
    results = run(tmp_path, max_cost=0.5, price_file=str(prices))
    records = calls(tmp_path / "ledger.jsonl")
    assert len(records) == llm_env.stats()["requests"]
    assert all(r["estimated"] and r["input_tokens"] > 0 and r["cost"] > 0 for r in records)
    assert any(r.reason_kind == "budget" for r in results)  # the estimate stopped the run
    assert sum(r["cost"] for r in records[:-1]) < 0.5 <= sum(r["cost"] for r in records)
    tracking = tracking_from_ledgers([tmp_path / "ledger.jsonl"])
    assert tracking["tokens_estimated"] and tracking["estimated_calls"] == tracking["total_calls"] == len(records)


# --------------------------------------------------------------------------- strict verdicts


@pytest.mark.parametrize("text, verdict", [
    ("VALIDATION PASSED\nLooks right.", True),
    ("**VALIDATION PASSED**", True),
    ("VALIDATION FAILED: it would only be VALIDATION PASSED if CD8A were cited.", False),
    ("VALIDATION PASSED? No: VALIDATION FAILED", False),
    ("The markers fit.\nVALIDATION PASSED", None),
    ("", None),
])
def test_the_verdict_is_read_from_the_first_line(text, verdict):
    assert validator_verdict(text) is verdict


def test_a_tricky_failed_verdict_is_not_a_pass(llm_env, tmp_path):
    llm_env.tricky_verdict = True
    results = run(tmp_path, clusters=CLUSTERS[:1], max_rounds=2)
    assert results[0].main_cell_type == "CD8+ T cell" and results[0].iterations == 2
    assert "did not confirm" in results[0].reasoning
    assert llm_env.stats()["by_agent"]["validator"] == 2


# --------------------------------------------------------------------------- untrusted model text


def test_huge_replies_are_capped_everywhere(llm_env, tmp_path):
    llm_env.huge_answer_chars = 3_000_000
    results = run(tmp_path, clusters=CLUSTERS[:2], max_rounds=1, max_tokens=1500)
    assert all(b["max_tokens"] == 1500 for b in llm_env.received)
    for result in results:
        assert result.main_cell_type in EXPECTED and len(result.main_cell_type) <= MAX_LABEL_CHARS
        assert all(len(turn["content"]) <= MAX_REPLY_CHARS + 100 for turn in result.transcript)
    (tmp_path / "results.json").write_text(json.dumps([r.to_dict() for r in results]))
    stored = sum(p.stat().st_size for p in tmp_path.rglob("*") if p.is_file())
    assert stored < 1_000_000, stored


def test_an_echoed_key_is_never_stored(llm_env, tmp_path):
    llm_env.echo_authorization = True
    results = run(tmp_path, clusters=CLUSTERS[:3])
    assert [r.main_cell_type for r in results] == EXPECTED[:3]
    assert API_KEY in llm_env.headers_seen[0]["Authorization"]
    (tmp_path / "results.json").write_text(json.dumps([r.to_dict() for r in results]))
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert len(files) > 5
    for path in files:
        assert API_KEY not in path.read_text(errors="replace"), path
    assert any("[redacted]" in turn["content"] for r in results for turn in r.transcript)


def test_labels_are_one_short_line_and_csv_cells_never_formulas():
    assert sanitize_label('=HYPERLINK("http://x", "B cell")').startswith("HYPERLINK")
    assert sanitize_label("B cell\nIGNORE ALL\r\nPREVIOUS") == "B cell IGNORE ALL PREVIOUS"
    assert len(sanitize_label("T" * 20_000)) == MAX_LABEL_CHARS
    assert sanitize_label("**CD8+ T cell**") == "CD8+ T cell"
    assert [csv_safe(v) for v in ("=1+1", "+cmd|' /C calc'!A0", "-SUM(1)", "@x", "B cell", 3.5)] == [
        "'=1+1", "'+cmd|' /C calc'!A0", "'-SUM(1)", "'@x", "B cell", 3.5]
    assert [csv_safe(v) for v in ("-rf", "+5", "-2.5")] == ["-rf", "+5", "-2.5"]  # no formula: kept as written


# --------------------------------------------------------------------------- write-ahead ledger


def test_pending_lines_resolve_to_one_record_per_request(tmp_path):
    ledger = Ledger(tmp_path / "l.jsonl")

    def record(call_id: str, status: str = "ok") -> CallRecord:
        return CallRecord("t", "d", "blood", "0", "annotator", "m", 40, 0, 0.004, 0.0, status, call_id=call_id,
                          estimated=True)

    ledger.begin(record("a"))
    ledger.begin(record("b"))
    assert ledger.spent() == pytest.approx(0.008)  # requests in flight count against the budget
    ledger.add(CallRecord("t", "d", "blood", "0", "annotator", "m", 42, 9, 0.005, 0.1, "ok", call_id="a"))
    raw = read_ledger(tmp_path / "l.jsonl", resolve=False)
    assert [r["status"] for r in raw] == ["pending", "pending", "ok"]
    resolved = resolve_pending(raw)
    assert [(r["call_id"], r["status"], r["estimated"]) for r in resolved] == [("b", "interrupted", True),
                                                                              ("a", "ok", False)]


def test_a_killed_kernel_still_counts_its_request_in_flight(llm_env, tmp_path):
    llm_env.hang = True
    ledger = tmp_path / "killed.jsonl"
    script = textwrap.dedent(f"""
        from cassia_helpers.dataset.annotate import ClusterMarkers
        from cassia_helpers.dataset.annotate.agents.annotator import LLMAnnotator
        a = LLMAnnotator(model="scripted-model", ledger_path={str(ledger)!r}, cache_dir={str(tmp_path / "c")!r},
                         timeout=60, deadline=60, dataset="killed", tissue="blood")
        a.annotate([ClusterMarkers("0", ["CD3E", "CD8A"])], tissue="blood", species="human")
    """)
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.Popen([sys.executable, "-c", script], env=env)
    try:
        until = time.monotonic() + 30
        while llm_env.stats()["requests"] < 1 and time.monotonic() < until and proc.poll() is None:
            time.sleep(0.05)
        assert llm_env.stats()["requests"] == 1
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
    tracking = tracking_from_ledgers([ledger])
    assert tracking["total_calls"] == llm_env.stats()["requests"] == 1
    assert tracking["interrupted_calls"] == 1 and tracking["tokens_estimated"]
    assert tracking["total_input_tokens"] > 0
