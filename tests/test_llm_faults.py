"""A misbehaving model server never turns into a wrong result reported as success.

Every case goes through the real openai client against the scripted server on 127.0.0.1: a wrong or
missing key, empty or garbage answers (never cached), a server that trickles or hangs (bounded by the
deadline and the circuit breaker), a budget with no price or no usage, a tricky validator verdict, huge
replies, a server that echoes the key, and a kernel killed with a request in flight.
"""

from __future__ import annotations

import base64
import email.utils
import http.server
import json
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import textwrap
import threading
import time
import urllib.parse
import uuid
from pathlib import Path

import pytest

from cassia_helpers.dataset.annotate import NO_ANSWER, ClusterAnnotation, ClusterMarkers, annotation_failure
from cassia_helpers.dataset.annotate.agents.annotator import LLMAnnotator
from cassia_helpers.dataset.annotate.llm.untrusted import MAX_LABEL_CHARS, MAX_REPLY_CHARS, csv_safe, sanitize_label
from cassia_helpers.ledger import (
    CallRecord,
    Ledger,
    format_cost,
    read_ledger,
    resolve_pending,
    tracking_from_ledgers,
)
from cassia_helpers.prices import check_budget_prices
from tests.conftest import API_KEY, BLOOD_DATASETS, REPO, llm_annotator
from tests.scripted_llm_server import ScriptedLLMServer

GENES = [["CD3E", "CD8A", "CD8B", "GZMK"], ["MS4A1", "CD79A", "CD19"], ["CD14", "LYZ", "FCN1"],
         ["NKG7", "GNLY", "KLRD1"], ["PPBP", "PF4"], ["FCER1A", "CLEC10A", "CST3"]]
CLUSTERS = [ClusterMarkers(str(i), genes, n_cells=50) for i, genes in enumerate(GENES)]
EXPECTED = ["CD8+ T cell", "B cell", "Monocyte", "NK cell", "Platelet", "Dendritic cell"]


def annotator(tmp_path: Path, name: str = "ledger", **options) -> LLMAnnotator:
    settings = dict(model="scripted-model", cache_dir=str(tmp_path / "cache"), ledger_path=tmp_path / f"{name}.jsonl",
                    dataset=name, tissue="blood", concurrency=1, timeout=5.0, deadline=10.0)
    settings.update(options)
    return llm_annotator(**settings)


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


@pytest.mark.parametrize("status, error", [
    (429, {"message": "You exceeded your current quota, please check your plan and billing details.",
           "type": "insufficient_quota", "param": None, "code": "insufficient_quota"}),
    (402, {"message": "Insufficient credits. Add more using https://openrouter.ai/settings/credits", "code": 402}),
])
def test_exhausted_quota_or_credits_stop_the_dataset_at_once(llm_env, tmp_path, status, error):
    llm_env.fail_next(1000, status=status, error={"error": error})
    results = run(tmp_path)
    assert llm_env.stats()["requests"] == 1  # no retry, no other cluster: no request can succeed
    assert all(r.main_cell_type == "Unknown" and r.reason_kind == "quota" for r in results)
    reason = annotation_failure(results)
    assert reason and "quota or credits" in reason and "6 of 6" in reason and "\n" not in reason


def test_a_web_page_where_the_api_should_be_is_named_and_stops_the_dataset(llm_env, tmp_path):
    llm_env.raw_reply = b"<html><body><h1>Welcome to nginx!</h1></body></html>"
    llm_env.raw_content_type = "text/html; charset=utf-8"
    results = run(tmp_path, clusters=CLUSTERS[:3])
    assert llm_env.stats()["requests"] == 1
    assert {r.reason_kind for r in results} == {"endpoint_not_found"}
    assert "HTML page (Content-Type: text/html), not JSON" in results[0].reason
    assert "Expecting value" not in results[0].reason and "check --base-url" in annotation_failure(results)


CONTEXT_400 = ("'max_tokens' or 'max_completion_tokens' is too large: 4096. This model's maximum context length is "
               "2048 tokens and your request has 900 input tokens (4096 > 2048 - 900). Please reduce the length of "
               "the messages or completion.")
FILTER_400 = ("The response was filtered due to the prompt triggering Azure OpenAI's content management policy. "
              "Please modify your prompt and retry.")


@pytest.mark.parametrize("agent, message, code", [("", CONTEXT_400, None), ("formatter", FILTER_400, "content_filter")])
def test_a_400_about_one_request_is_not_remembered_as_a_field_the_endpoint_refuses(llm_env, tmp_path, agent,
                                                                                   message, code):
    llm_env.fail_next(1, status=400, agent=agent,
                      error={"error": {"message": message, "type": "invalid_request_error", "param": None,
                                       "code": code}})
    llm = annotator(tmp_path)
    llm.annotate(CLUSTERS[:2], tissue="blood", species="human")
    capabilities = tmp_path / "cache" / "capabilities.json"
    assert not capabilities.exists() or False not in json.loads(capabilities.read_text()).popitem()[1].values()
    assert all(b.get("max_tokens") == 4096 for b in llm_env.received)
    formatted = [b for b in llm_env.received if b["_agent"] == "formatter"]
    assert formatted[-1]["response_format"]["type"] == "json_schema"
    assert llm.describe()["max_tokens"] == 4096


def test_a_prompt_longer_than_the_models_context_names_the_way_out(llm_env, tmp_path):
    llm_env.fail_next(100, status=400, error={"error": {"message": CONTEXT_400, "type": "invalid_request_error"}})
    results = run(tmp_path, clusters=CLUSTERS[:1])
    assert results[0].main_cell_type == "Unknown" and "lower --llm-max-tokens" in results[0].reason


def test_a_refused_length_cap_moves_to_max_completion_tokens_and_is_said_not_sent_when_both_are_refused(
        llm_env, tmp_path):
    def unsupported(field: str) -> dict:
        return {"error": {"message": f"Unsupported parameter: '{field}' is not supported with this model.",
                          "type": "invalid_request_error", "param": field, "code": "unsupported_parameter"}}

    llm_env.fail_next(1, status=400, error=unsupported("max_tokens"))
    llm = annotator(tmp_path, max_attempts=4)
    llm.annotate(CLUSTERS[:1], tissue="blood", species="human")
    assert "max_completion_tokens" in llm_env.received[-1] and "max_tokens" not in llm_env.received[-1]
    assert llm.describe()["max_tokens"] == 4096
    llm_env.fail_next(1, status=400, error=unsupported("max_completion_tokens"))
    llm = annotator(tmp_path, name="again", max_attempts=4)
    llm.annotate(CLUSTERS[1:2], tissue="blood", species="human")
    assert not {"max_tokens", "max_completion_tokens"} & set(llm_env.received[-1])
    assert llm.describe()["max_tokens"] == "not sent (refused by the endpoint)"


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
    ("rate_limited", "rate_limited", "429 Too Many Requests"),
    ("error_in_body", "unreadable", "upstream provider overloaded"),
    ("no_choices", "unreadable", "not chat completions"),
    ("garbage", "invalid_answer", "named no cell type"),
    ("bad_request", "rejected", "rejected the requests"),
])
def test_a_server_that_never_gives_a_usable_answer_fails_the_dataset(llm_env, tmp_path, fault, kind, says):
    if fault == "server_error":
        llm_env.fail_next(1000, status=500)
    elif fault == "rate_limited":
        llm_env.fail_next(1000, status=429)
    elif fault == "bad_request":
        llm_env.reject_json_schema = llm_env.reject_response_format = True
        llm_env.fail_next(1000, status=400)
    else:
        setattr(llm_env, fault, True)
    results = run(tmp_path, clusters=CLUSTERS[:2], max_attempts=2)
    assert {r.reason_kind for r in results} == {kind}, [r.reason for r in results]
    reason = annotation_failure(results)
    assert reason and says in reason and "2 of 2" in reason and "\n" not in reason
    assert "IndexError" not in reason and "TypeError" not in reason and "KeyError" not in reason  # said in words
    if fault == "no_choices":
        assert "the reply holds no completion (no choices)" in results[0].reason, results[0].reason


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
    # the server answered every time, with errors: that is what the user is told, with the deadline that ended it
    assert results[0].reason_kind == "server_error" and "deadline" in results[0].reason and "503" in results[0].reason
    assert 2 <= llm_env.stats()["requests"] <= 6
    assert len(calls(tmp_path / "ledger.jsonl")) == llm_env.stats()["requests"]


@pytest.mark.parametrize("http_date", [False, True])
def test_a_429_asking_for_a_day_pauses_the_run_no_longer_than_a_call_may_last(llm_env, tmp_path, http_date):
    llm_env.fail_next(1, status=429, retry_after=email.utils.formatdate(time.time() + 86_400, usegmt=True)
                      if http_date else 86_400)
    start = time.monotonic()
    results = run(tmp_path, clusters=CLUSTERS[:3], deadline=3.0, max_attempts=5)
    assert time.monotonic() - start < 3 * 3.0 + 3.0  # bounded by the deadlines, not by the server's day
    assert sum(r.main_cell_type != "Unknown" for r in results) >= 2  # the server answered again: so do we
    assert len(calls(tmp_path / "ledger.jsonl")) == llm_env.stats()["requests"]


def test_a_retry_after_given_as_an_http_date_is_waited_for(llm_env, tmp_path):
    llm_env.fail_next(1, status=429, retry_after=email.utils.formatdate(time.time() + 4, usegmt=True))
    start = time.monotonic()
    results = run(tmp_path, clusters=CLUSTERS[:1], max_rounds=1, deadline=20.0, max_attempts=3)
    # the date has whole seconds: the wait it asks for is more than 3 s (a back-off alone is at most 1 s)
    assert time.monotonic() - start > 2.9
    assert results[0].main_cell_type == EXPECTED[0]


def test_retry_after_is_read_in_seconds_milliseconds_and_http_dates():
    from types import SimpleNamespace

    from cassia_helpers.dataset.annotate.llm.transport import retry_after_seconds

    def asked(**headers) -> float | None:
        return retry_after_seconds(SimpleNamespace(response=SimpleNamespace(headers=headers)), now=1_000_000_000)

    assert asked(**{"retry-after": "7"}) == 7.0 and asked(**{"retry-after-ms": "250"}) == 0.25
    assert asked(**{"retry-after": "Sun, 09 Sep 2001 01:46:50 GMT"}) == 10.0  # IMF-fixdate, 10 s after now
    assert asked(**{"retry-after": "Sunday, 09-Sep-01 01:46:50 GMT"}) == 10.0  # the obsolete RFC 850 form
    assert asked(**{"retry-after": "Sat, 08 Sep 2001 01:46:40 GMT"}) == 0.0  # a date past: no wait
    assert asked(**{"retry-after": "soon"}) is None and asked(**{"retry-after": "nan"}) is None and asked() is None


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
    # the dataset that met the hanging server says so; the later one, stopped by the open breaker, never
    # reached it
    assert "did not answer in time" in annotation_failure(results)
    assert "could not be reached" in annotation_failure(later)
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


@pytest.mark.parametrize("entry, bad", [({"input": "NaN", "output": 1}, "'NaN'"), ({"input": 1, "output": -5}, "-5"),
                                        ({"input": 1, "output": "Infinity"}, "'Infinity'"),
                                        ({"input": True, "output": 1}, "True")])
def test_a_price_file_with_a_price_that_is_no_price_is_a_usage_error(tmp_path, capsys, monkeypatch, entry, bad):
    """NaN or a negative price would make every cost NaN or negative: the budget would never stop a run."""
    from cassia_helpers.batch.cli import main

    prices = tmp_path / "prices.json"
    prices.write_text(json.dumps({"my-model": entry}))
    problem = check_budget_prices("my-model", 0.0, prices)  # whatever the budget
    assert problem and str(prices) in problem and "'my-model'" in problem and bad in problem, problem
    monkeypatch.setenv("OPENAI_API_KEY", "sk-x")
    code = main(["--data-dir", str(tmp_path), "--tissues", "all", "--annotator", "llm", "--model", "my-model",
                 "--price-file", str(prices), "--max-cost", "1", "--dry-run"])
    err = capsys.readouterr().err
    assert code == 2 and problem in err and "Traceback" not in err


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
    """Echoed as it is, JSON-escaped, URL-escaped, in HTML entities, hex, base64 (an HTTP Basic credential), in
    capitals, wrapped over two lines, or as the system fingerprint (which goes into the h5ad)."""
    llm_env.echo_authorization = True
    llm = annotator(tmp_path)
    results = llm.annotate(CLUSTERS[:3], tissue="blood", species="human")
    assert [r.main_cell_type for r in results] == EXPECTED[:3]
    assert API_KEY in llm_env.headers_seen[0]["Authorization"]
    (tmp_path / "results.json").write_text(json.dumps([r.to_dict() for r in results]))
    (tmp_path / "provenance.json").write_text(json.dumps(llm.describe()))
    assert llm.describe()["system_fingerprint"] == "fp_[redacted]"
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert len(files) > 5
    escaped = ("\\u0073\\u006b" + API_KEY[2:], urllib.parse.quote(API_KEY, safe=""), API_KEY.upper(),
               API_KEY.encode().hex(), "".join(f"&#{ord(c)};" for c in API_KEY),
               base64.b64encode(f"user:{API_KEY}".encode()).decode()[8:-4],  # the key's own part of a Basic
               API_KEY[8:])  # what follows a line break inside the key
    for path in files:
        text = path.read_text(errors="replace").replace("\\\\", "\\")  # JSON files: as the text they hold
        assert API_KEY not in text and not any(form in text for form in escaped), path
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


def test_a_line_torn_by_a_full_disk_does_not_swallow_the_next_sessions_first_record(tmp_path):
    path = tmp_path / "l.jsonl"
    first = CallRecord("t", "d", "blood", "0", "annotator", "m", 40, 9, 0.004, 0.1, "ok", call_id="a")
    Ledger(path).add(first)
    with open(path, "a", encoding="utf-8") as handle:
        handle.write('{"timestamp": "2026-12-08T01:09:31+00:00", "dataset": "d", "tis')  # the disk filled here
    resumed = Ledger(path)
    resumed.begin(CallRecord("t", "d", "blood", "1", "annotator", "m", 40, 0, 0.004, 0.0, "ok", call_id="b"))
    raw = read_ledger(path, resolve=False)
    assert [(r["call_id"], r["status"]) for r in raw] == [("a", "ok"), ("b", "pending")]  # the in-flight call counts


def test_a_killed_kernel_still_counts_its_request_in_flight(llm_env, tmp_path):
    llm_env.hang = True
    ledger = tmp_path / "killed.jsonl"
    script = textwrap.dedent(f"""
        from cassia_helpers.dataset.annotate import ClusterMarkers
        from cassia_helpers.dataset.annotate.agents.annotator import LLMAnnotator
        from cassia_helpers.dataset.annotate.llm.options import LLMOptions
        a = LLMAnnotator(LLMOptions(model="scripted-model", cache_dir={str(tmp_path / "c")!r}, timeout=60,
                                    deadline=60), ledger_path={str(ledger)!r}, dataset="killed", tissue="blood")
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


# --------------------------------------------------------------------------- the whole exchange is bounded


def test_trickled_headers_are_cut_at_the_deadline(llm_env, tmp_path):
    # each header byte arrives well inside the idle timeout: only a deadline held from outside the HTTP
    # library's reads stops it (the headers alone would take ~40 s)
    llm_env.trickle_headers_s = 0.4
    start = time.monotonic()
    results = run(tmp_path, clusters=CLUSTERS[:2], timeout=2.0, deadline=2.5, max_attempts=5, breaker_failures=0,
                  concurrency=2)
    elapsed = time.monotonic() - start
    assert elapsed < 2.5 + 1.5, elapsed
    assert [r.reason_kind for r in results] == ["timeout", "timeout"], [r.reason for r in results]
    assert "deadline" in results[0].reason
    records = calls(tmp_path / "ledger.jsonl")
    assert len(records) == llm_env.stats()["requests"] >= 2  # every request the server got, no more
    assert all(r["status"] == "error" and r["estimated"] and r["input_tokens"] > 0 for r in records)


# --------------------------------------------------------------------------- requests never sent are not calls


def test_a_refused_connection_is_no_call(llm_env, monkeypatch, tmp_path):
    with socket.socket() as closed:  # a port nobody listens on
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    monkeypatch.setenv("OPENAI_BASE_URL", f"http://127.0.0.1:{port}/v1")
    results = run(tmp_path, clusters=CLUSTERS[:2], max_attempts=2, breaker_failures=0)
    assert {r.reason_kind for r in results} == {"unreachable"}
    tracking = tracking_from_ledgers([tmp_path / "ledger.jsonl"])
    assert tracking["total_calls"] == 0 and tracking["total_cost"] == 0
    assert tracking["not_sent"] == 4  # two attempts per cluster, each recorded, none counted


def test_a_server_that_reads_the_request_then_hangs_up_is_named_and_its_calls_counted(monkeypatch, tmp_path):
    """The request reached the server (which may bill it): not "could not be reached", and counted."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    received = []

    def hang_up() -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            with conn:
                data = b""
                while b"\r\n\r\n" not in data:
                    data += conn.recv(65536)
                head, body = data.split(b"\r\n\r\n", 1)
                length = int(re.search(rb"content-length: *(\d+)", head, re.I).group(1))
                while len(body) < length:
                    body += conn.recv(65536)
                received.append(len(body))

    threading.Thread(target=hang_up, daemon=True).start()
    monkeypatch.setenv("OPENAI_BASE_URL", f"http://127.0.0.1:{listener.getsockname()[1]}/v1")
    try:
        results = run(tmp_path, clusters=CLUSTERS[:2], max_attempts=2, breaker_failures=0)
    finally:
        listener.close()
    assert {r.reason_kind for r in results} == {"disconnected"}
    assert "closed the connection without answering" in annotation_failure(results)
    records = calls(tmp_path / "ledger.jsonl")
    assert len(records) == len(received) >= 2 and all(r["estimated"] and r["input_tokens"] > 0 for r in records)


def test_a_kernel_killed_while_connecting_counts_no_call(tmp_path):
    # Ctrl-C in a batch kills the dataset's kernel (SIGKILL). Here the server's accept queue is full: the
    # connection never completes, the request never leaves, and the resumed run's ledger must not count it.
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    port = listener.getsockname()[1]
    filler = socket.create_connection(("127.0.0.1", port))
    ledger = tmp_path / "stopped.jsonl"
    script = textwrap.dedent(f"""
        from cassia_helpers.dataset.annotate import ClusterMarkers
        from cassia_helpers.dataset.annotate.agents.annotator import LLMAnnotator
        from cassia_helpers.dataset.annotate.llm.options import LLMOptions
        a = LLMAnnotator(LLMOptions(model="scripted-model", cache_dir={str(tmp_path / "c")!r},
                                    base_url="http://127.0.0.1:{port}/v1", timeout=60, deadline=60),
                         ledger_path={str(ledger)!r}, dataset="stopped", tissue="blood")
        print("asking", flush=True)
        a.annotate([ClusterMarkers("0", ["CD3E", "CD8A"])], tissue="blood", species="human")
    """)
    env = dict(os.environ, PYTHONPATH=str(REPO), OPENAI_API_KEY=API_KEY)
    proc = subprocess.Popen([sys.executable, "-c", script], env=env, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "asking"
        time.sleep(1.5)  # connecting
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=20)
    finally:
        proc.kill()
        proc.wait()
        filler.close()
        listener.close()
    tracking = tracking_from_ledgers([ledger])
    assert tracking["total_calls"] == 0 and tracking["interrupted_calls"] == 0 and tracking["total_cost"] == 0


# --------------------------------------------------------------------------- TLS and redirects


class _TrickleHandler(http.server.BaseHTTPRequestHandler):
    """Reads a POST, then sends its status line and headers one byte every 0.3 s (a stalling TLS proxy)."""

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        head = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}"
        try:
            for index in range(len(head)):
                self.wfile.write(head[index:index + 1])
                self.wfile.flush()
                if self.server.stopping.wait(0.3):
                    return
        except OSError:  # the client gave up
            pass

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def self_signed_server(tmp_path):
    """An HTTPS server on 127.0.0.1 with a self-signed certificate (made with the openssl command) that
    trickles its response headers: ``(base_url, certificate file)``."""
    if shutil.which("openssl") is None:
        pytest.skip("the openssl command is needed to make a test certificate")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj",
                    "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out",
                    str(cert)], check=True, capture_output=True, timeout=60)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _TrickleHandler)
    server.daemon_threads = True
    server.stopping = threading.Event()
    server.socket = context.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"https://127.0.0.1:{server.server_address[1]}/v1", cert
    server.stopping.set()
    server.shutdown()
    server.server_close()


def test_a_self_signed_certificate_is_named(llm_env, self_signed_server, tmp_path):
    results = run(tmp_path, clusters=CLUSTERS[:3], base_url=self_signed_server[0])
    assert {r.reason_kind for r in results} == {"certificate"}
    assert re.search(r"certificate verify failed: self.signed certificate", results[0].reason), results[0].reason
    reason = annotation_failure(results)
    assert "TLS certificate was refused" in reason and "Connection error" not in reason
    tracking = tracking_from_ledgers([tmp_path / "ledger.jsonl"])
    assert tracking["total_calls"] == 0 and tracking["not_sent"] == 1  # the first refusal stops the dataset


def test_the_deadline_holds_over_tls(llm_env, self_signed_server, monkeypatch, tmp_path):
    # a trusted certificate (SSL_CERT_FILE, as for a private CA) and headers trickled inside the TLS stream
    base_url, cert = self_signed_server
    monkeypatch.setenv("SSL_CERT_FILE", str(cert))
    start = time.monotonic()
    results = run(tmp_path, clusters=CLUSTERS[:1], base_url=base_url, timeout=2.0, deadline=2.5, breaker_failures=0)
    assert time.monotonic() - start < 2.5 + 1.5
    assert results[0].reason_kind == "timeout" and "deadline" in results[0].reason, results[0].reason
    assert [r["status"] for r in calls(tmp_path / "ledger.jsonl")] == ["error"]  # sent, then cut


def test_a_redirect_to_another_host_is_not_followed(llm_env, tmp_path):
    with ScriptedLLMServer(expected_api_key=API_KEY) as elsewhere:
        target = f"{elsewhere.base_url}/chat/completions"
        llm_env.redirects["/v1/chat/completions"] = (307, target)
        results = run(tmp_path, clusters=CLUSTERS[:3])
        assert elsewhere.stats()["requests"] == 0  # the prompts never went there
    assert {r.reason_kind for r in results} == {"redirect"}
    assert f"HTTP 307 to {target} (another server)" in results[0].reason
    assert results[0].reason.count("--base-url") <= 1 and "another host" not in results[0].reason
    assert "redirected the requests elsewhere" in annotation_failure(results)
    # the first redirect stops the dataset; it reached the server, so it is a call
    assert llm_env.redirected == 1 == tracking_from_ledgers([tmp_path / "ledger.jsonl"])["total_calls"]


def test_a_302_is_named_and_a_same_host_307_is_followed(llm_env, tmp_path):
    llm_env.redirects["/v1/moved/chat/completions"] = (302, "/v1/chat/completions")
    moved = f"{llm_env.base_url}/moved"
    results = run(tmp_path, clusters=CLUSTERS[:1], base_url=moved)
    assert results[0].reason_kind == "redirect" and "HTTP 302" in results[0].reason, results[0].reason
    assert llm_env.stats()["requests"] == 0  # not turned into a GET, nor sent again
    # a 307 to the same host keeps the request (e.g. a server adding a trailing slash): followed as before
    llm_env.redirects["/v1/moved/chat/completions"] = (307, "/v1/chat/completions")
    results = run(tmp_path, clusters=CLUSTERS[:2], name="followed", base_url=moved, max_rounds=1)
    assert [r.main_cell_type for r in results] == EXPECTED[:2]


# --------------------------------------------------------------------------- usage a server makes up


@pytest.mark.parametrize("usage", [{"prompt_tokens": "many"}, {"prompt_tokens": -1_000_000},
                                   {"prompt_tokens": 10**15, "completion_tokens": 10**15},
                                   {"completion_tokens": 12.5}, {"prompt_tokens": None, "completion_tokens": [3]},
                                   # whole numbers, but more than the prompt could be or than max_tokens allowed
                                   {"prompt_tokens": 9_999_999, "completion_tokens": 9_999_999},
                                   # nothing for a prompt and a reply that are not empty (Ollama, some proxies)
                                   {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}])
def test_made_up_usage_is_estimated_and_never_lowers_the_spend(llm_env, tmp_path, usage):
    llm_env.usage_override = usage
    prices = tmp_path / "prices.json"
    prices.write_text(json.dumps({"scripted-model": {"input": 1000.0, "output": 1000.0}}))
    results = run(tmp_path, max_cost=0.5, price_file=str(prices))  # no crash: every cluster has an outcome
    assert len(results) == len(CLUSTERS)
    assert any(r.reason_kind == "budget" for r in results)  # the estimates still stop the run at its budget
    assert any(r.main_cell_type in EXPECTED for r in results)  # the answers paid for are kept
    records = calls(tmp_path / "ledger.jsonl")
    assert len(records) == llm_env.stats()["requests"]
    assert all(r["estimated"] and 0 < r["input_tokens"] < 100_000 and 0 <= r["output_tokens"] < 100_000
               and r["cost"] > 0 for r in records)
    assert all("usage not a token count" in r["error"] for r in records if r["status"] == "ok")
    tracking = tracking_from_ledgers([tmp_path / "ledger.jsonl"])
    assert 0.5 <= tracking["total_cost"] < 5 and tracking["estimated_calls"] == tracking["total_calls"]


def test_thinking_tokens_a_server_counts_only_in_the_total_are_billed_as_output(llm_env, tmp_path):
    llm_env.thinking_tokens = 500  # Gemini: completion_tokens leaves the thoughts out, total_tokens has them
    prices = tmp_path / "prices.json"
    prices.write_text(json.dumps({"scripted-model": {"input": 0.0, "output": 1000.0}}))
    run(tmp_path, clusters=CLUSTERS[:2], max_rounds=1, price_file=str(prices))
    records = calls(tmp_path / "ledger.jsonl")
    stats = llm_env.stats()
    assert len(records) == stats["ok"] == stats["requests"]
    assert sum(r["output_tokens"] for r in records) == stats["completion_tokens"] + 500 * stats["ok"]
    assert sum(r["cost"] for r in records) == pytest.approx(sum(r["output_tokens"] for r in records) / 1000)
    # the server's own counts, not estimates, and the ledger line says where the output count comes from
    assert all(not r["estimated"] and "total_tokens - prompt_tokens" in r["error"] for r in records)


def test_reasoning_tokens_inside_completion_tokens_are_counted_once():
    from cassia_helpers.dataset.annotate.llm.usage import reply_tokens

    openai_style = {"prompt_tokens": 193, "completion_tokens": 552, "total_tokens": 745,
                    "completion_tokens_details": {"reasoning_tokens": 500}}
    gemini_style = dict(openai_style, completion_tokens=52)
    for usage in (openai_style, gemini_style):
        tokens = reply_tokens(usage, prompt_estimate=200, content="x" * 200, max_output=4096)
        assert (tokens.input_tokens, tokens.output_tokens, tokens.estimated) == (193, 552, False)
    # an empty reply may well cost no output token; an empty prompt no input token
    assert reply_tokens({"prompt_tokens": 0, "completion_tokens": 0}, prompt_estimate=0, content="") == (
        0, 0, "", False)


@pytest.mark.parametrize("body", [b"[" * 200_000 + b"]" * 200_000, b'{"choices": "x"}', b"12", b"null"])
def test_a_body_that_is_no_completion_is_a_paid_unreadable_reply(llm_env, tmp_path, body):
    llm_env.raw_reply = body
    results = run(tmp_path, clusters=CLUSTERS[:2], max_attempts=2)
    assert {r.reason_kind for r in results} == {"unreadable"}, [r.reason for r in results]
    records = calls(tmp_path / "ledger.jsonl")
    assert len(records) == llm_env.stats()["requests"] == 4
    assert all(r["status"] == "error" and r["input_tokens"] > 0 and r["estimated"] for r in records)


def test_replies_cut_at_the_token_limit_are_named_and_never_cached(llm_env, tmp_path):
    llm_env.cut_replies = True
    run(tmp_path, clusters=CLUSTERS[:2], max_attempts=1)
    records = calls(tmp_path / "ledger.jsonl")
    assert records and all("reply cut at the token limit" in r["error"] for r in records if r["status"] == "ok")
    assert cached_entries(tmp_path) == []  # a rerun asks again rather than reuse half an answer


def test_an_analysis_a_content_filter_cut_off_is_no_call(llm_env, tmp_path):
    """A provider's filter stops the annotator mid-analysis, before its FINAL ANNOTATION: no formatter is asked
    to make a call out of half an argument, and the cluster says why it has none."""
    llm_env.cut_replies, llm_env.cut_reason, llm_env.cut_agent = True, "content_filter", "annotator"
    results = run(tmp_path, clusters=CLUSTERS[:2], max_attempts=1)
    assert all(r.main_cell_type == "Unknown" and r.reason_kind == NO_ANSWER for r in results), results
    assert all("cut off before its conclusion (finish_reason content_filter)" in r.reason for r in results)
    assert {b["_agent"] for b in llm_env.received} == {"annotator"}
    records = calls(tmp_path / "ledger.jsonl")
    assert records and all("content filter" in r["error"] for r in records)
    assert cached_entries(tmp_path) == []


def test_content_given_as_parts_is_read_as_its_text_parts_and_a_refusal_is_kept():
    """Mistral's reasoning models answer with a list of parts: thinking parts, then the text."""
    from cassia_helpers.dataset.annotate.llm.transport import reply_fields

    body = {"choices": [{"message": {"role": "assistant", "content": [
        {"type": "thinking", "thinking": [{"type": "text", "text": "FINAL ANNOTATION: Hepatocyte?"}]},
        {"type": "text", "text": "Markers MS4A1, CD79A.\n"}, {"type": "text", "text": "FINAL ANNOTATION: B cell"}]}}]}
    assert reply_fields(body)[0] == "Markers MS4A1, CD79A.\nFINAL ANNOTATION: B cell"
    refusal = {"choices": [{"message": {"role": "assistant", "content": None, "refusal": "I can't help with that."}}]}
    assert reply_fields(refusal)[0] == "(the model refused: I can't help with that.)"  # the transcript says why


def test_a_ledger_with_made_up_numbers_still_adds_up(tmp_path):
    # lines written by an older version that trusted the server
    path = tmp_path / "old.jsonl"
    lines = [dict(status="ok", input_tokens="many", output_tokens=5, cost=0.5, call_id="a"),
             dict(status="ok", input_tokens=-1_000_000, output_tokens=-3, cost=-6.6, call_id="b"),
             dict(status="ok", input_tokens=10.0, output_tokens=2, cost="x", call_id="c"),
             dict(status="ok", input_tokens=10**15, output_tokens=10**15, cost=1.5e9, call_id="d")]
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    tracking = tracking_from_ledgers([path])
    assert tracking["total_calls"] == 4
    assert (tracking["total_input_tokens"], tracking["total_output_tokens"], tracking["total_cost"]) == (10, 7, 0.5)


@pytest.mark.parametrize("usd, shown", [(0, "$0.00"), (0.0042, "$0.0042"), (0.000012, "$0.000012"),
                                        (0.01, "$0.01"), (2.254, "$2.25"), (1234.5, "$1,234.50")])
def test_costs_under_a_cent_keep_their_digits(usd, shown):
    assert format_cost(usd) == shown


# --------------------------------------------------------------------------- a cache that cannot be written


@pytest.fixture
def read_only_dir(tmp_path):
    """A folder even root cannot write: a read-only tmpfs mounted on it, else the immutable attribute."""
    folder = tmp_path / "read-only"
    folder.mkdir()
    attempts = ((["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(folder)], ["umount", str(folder)]),
                (["chattr", "+i", str(folder)], ["chattr", "-i", str(folder)]))
    undo = next((undo for make, undo in attempts
                 if shutil.which(make[0]) and subprocess.run(make, capture_output=True).returncode == 0), None)
    if undo is None:
        pytest.skip("needs mount (CAP_SYS_ADMIN) or chattr +i (CAP_LINUX_IMMUTABLE) to make a read-only folder")
    try:
        yield folder
    finally:
        subprocess.run(undo, capture_output=True)


def test_damaged_cache_entries_are_ignored_like_unreadable_ones(llm_env, tmp_path):
    run(tmp_path, clusters=CLUSTERS[:2], max_rounds=1)
    entries = [p for p in (tmp_path / "cache").rglob("*.json") if p.name != "capabilities.json"]
    assert entries
    for damage, path in zip([{"content": 12345}, ["a list"], {"content": None}, "not json {"], entries * 4,
                            strict=False):
        path.write_text(damage if isinstance(damage, str) else json.dumps(damage))
    (tmp_path / "cache" / "capabilities.json").write_text(json.dumps({"x": 3}))
    llm_env.reset_stats()
    again = run(tmp_path, clusters=CLUSTERS[:2], name="again", max_rounds=1)
    assert [r.main_cell_type for r in again] == EXPECTED[:2]
    assert llm_env.stats()["requests"] > 0  # the damaged answers were asked again, and cached anew
    assert all(isinstance(e["content"], str) for e in cached_entries(tmp_path))


def test_a_read_only_cache_folder_turns_the_cache_off_before_any_request(llm_env, read_only_dir, tmp_path):
    annotating = annotator(tmp_path, cache_dir=str(read_only_dir / "cache"))
    results = annotating.annotate(CLUSTERS[:3], tissue="blood", species="human")
    assert [r.main_cell_type for r in results] == EXPECTED[:3]  # the run went on, without the cache
    assert len(annotating.warnings) == 1 and "cannot be written" in annotating.warnings[0]
    assert str(read_only_dir) in annotating.warnings[0]
    tracking = tracking_from_ledgers([tmp_path / "ledger.jsonl"])
    assert tracking["total_calls"] == llm_env.stats()["requests"] > 0


def test_an_unwritable_cache_dir_is_a_usage_error_before_anything_is_paid(llm_env, read_only_dir, blood_dir,
                                                                         tmp_path):
    result = subprocess.run(
        [sys.executable, str(REPO / "run_batch.py"), "--data-dir", str(blood_dir), "--output-dir",
         str(tmp_path / "out"), "--tissues", "blood", "--annotator", "llm", "--model", "scripted-model",
         "--cache-dir", str(read_only_dir)],
        env=dict(os.environ, PYTHONPATH=str(REPO)), capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr
    assert "--cache-dir" in result.stderr and str(read_only_dir) in result.stderr and "--no-cache" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert llm_env.stats()["requests"] == 0


@pytest.mark.slow
def test_a_read_only_home_runs_the_batch_without_the_cache(llm_env, read_only_dir, blood_dir, tmp_path):
    # many compute nodes mount $HOME read-only: the default cache folder cannot be written there
    for name in BLOOD_DATASETS[1:]:
        (blood_dir / "blood" / f"{name}.h5ad").unlink()
    env = dict(os.environ, PYTHONPATH=str(REPO), HOME=str(read_only_dir))
    env.pop("XDG_CACHE_HOME", None)
    result = subprocess.run(
        [sys.executable, str(REPO / "run_batch.py"), "--data-dir", str(blood_dir), "--output-dir",
         str(tmp_path / "out"), "--tissues", "blood", "--annotator", "llm", "--model", "scripted-model"],
        env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    assert "the LLM response cache cannot be written" in result.stderr and str(read_only_dir) in result.stderr
    run_dir = Path(result.stdout.strip().splitlines()[-1])
    dataset = BLOOD_DATASETS[0]
    summary = json.loads((run_dir / "blood" / dataset / f"{dataset}_result.json").read_text())
    assert any("cache cannot be written" in w for w in summary["warnings"]), summary["warnings"]
    tracking = json.loads((run_dir / "token_tracking.json").read_text())
    assert tracking["total_calls"] == llm_env.stats()["requests"] > 0


# --------------------------------------------------------------------------- what the summary says about money


def _ledger_line(status: str, cost: float = 0.0, **fields) -> str:
    record = dict(timestamp="2026-01-01T00:00:00", dataset="d1", tissue="blood", cluster="0", agent="annotator",
                  model="gpt-4o-mini", input_tokens=0, output_tokens=0, cost=cost, latency_s=0.1, status=status,
                  call_id=uuid.uuid4().hex)
    record.update(fields)
    return json.dumps(record) + "\n"


@pytest.mark.parametrize("budget_unknown", [0, 2])
def test_the_summary_tells_true_money_figures(tmp_path, budget_unknown):
    from cassia_helpers.contract import SUCCESS, DatasetPaths, write_status
    from cassia_helpers.summary.aggregate import write_run_summaries

    run_dir = tmp_path / "run_test"
    paths = DatasetPaths(run_dir, "blood", "d1")
    paths.folder.mkdir(parents=True)
    (run_dir / "run_manifest.json").write_text(json.dumps({
        "created_at": "2026-01-01T00:00:00+00:00",
        "datasets": [{"name": "d1", "tissue": "blood", "path": "d1.h5ad"}]}))
    write_status(paths, SUCCESS, duration=3.0)
    paths.result_json.write_text(json.dumps({"n_cells": 100, "n_genes": 50, "n_clusters": 3, "annotator": "llm",
                                             "unknown_clusters": budget_unknown, "warnings": [],
                                             "cell_type_terms": []}))
    kinds = ["budget"] * budget_unknown + [""] * (3 - budget_unknown)
    rows = [f"{i},{'Unknown' if kind else 'B cell'},{'unknown' if kind else 'ok'},{kind}\n"
            for i, kind in enumerate(kinds)]
    paths.clusters_csv.write_text("cluster,cell_type,status,reason_kind\n" + "".join(rows))
    # one paid call of under a cent, one budget skip (a later step: a label was kept), one refused connection
    paths.llm_calls_jsonl.write_text(_ledger_line("ok", 0.0042, input_tokens=20_000, output_tokens=2000)
                                     + _ledger_line("budget") + _ledger_line("not_sent"))
    write_run_summaries(run_dir)
    text = (run_dir / "batch_summary.txt").read_text()
    assert "Total cost: $0.0042" in text and "$0.00\n" not in text
    assert "API calls: 1 (0 failed" in text  # the refused connection is not a call...
    assert "Not sent: 1 request(s)" in text  # ...but it is told
    if budget_unknown:
        assert "2 cluster(s) are Unknown with reason 'budget'" in text
    else:
        assert "no cluster became Unknown for it" in text and "are Unknown with reason" not in text
    tracking = json.loads((run_dir / "token_tracking.json").read_text())
    assert (tracking["total_calls"], tracking["not_sent"], tracking["budget_skipped"]) == (1, 1, 1)


@pytest.mark.slow
def test_a_batch_against_a_server_trickling_its_headers_ends_in_bounded_time(llm_env, blood_dir, tmp_path):
    for name in BLOOD_DATASETS[1:]:
        (blood_dir / "blood" / f"{name}.h5ad").unlink()
    llm_env.trickle_headers_s = 0.5  # the headers alone would take ~50 s, each byte inside --llm-timeout
    result = subprocess.run(
        [sys.executable, str(REPO / "run_batch.py"), "--data-dir", str(blood_dir), "--output-dir",
         str(tmp_path / "out"), "--tissues", "blood", "--annotator", "llm", "--model", "scripted-model",
         "--cache-dir", str(tmp_path / "cache"), "--llm-timeout", "2", "--llm-deadline", "3"],
        env=dict(os.environ, PYTHONPATH=str(REPO)), capture_output=True, text=True, timeout=600)
    assert result.returncode == 1, result.stderr  # a failed dataset, told as such
    run_dir = next((tmp_path / "out").glob("run_*"))
    status = json.loads((run_dir / "blood" / BLOOD_DATASETS[0] / f"{BLOOD_DATASETS[0]}_status.json").read_text())
    assert status["status"] == "failed" and "did not answer in time" in status["error"], status
    tracking = json.loads((run_dir / "token_tracking.json").read_text())
    assert tracking["total_calls"] == llm_env.stats()["requests"] > 0
    assert max(call["latency_s"] for call in tracking["api_calls"]) < 3 + 1.0


def test_the_key_is_scrubbed_in_the_forms_a_model_echoes_it():
    from cassia_helpers.dataset.annotate.llm.untrusted import sanitize_text, scrub_secrets, untrusted_reply

    key = "sk-proj-CANARY7x9QzK3mW2pL8vN4bR6tY1uI0oE5aS"
    wrapped = base64.encodebytes(f"user:{key}".encode() * 2).decode()  # base64 as mail writes it, 76 a line
    echoes = {
        "JSON string wrapped over lines": json.dumps(key[:20] + "\n" + key[20:]),
        "wrapped with an indent": key[:15] + "\n        " + key[15:],
        "zero-width spaces": "\u200b".join(key),
        "cut in two around other text": f"T cell {key[:22]} x {key[22:]}",
        "reversed": key[::-1],
        "base64 wrapped": wrapped,
    }
    for form, text in echoes.items():
        scrubbed = scrub_secrets(f"The answer: {text} done", [key])
        assert "[redacted]" in scrubbed, form
        squeezed = "".join(scrubbed.replace("\\n", "").split()).replace("\u200b", "")
        assert key not in squeezed and key[::-1] not in squeezed and key[22:] not in squeezed, (form, scrubbed)
        assert base64.b64encode(f"user:{key}".encode()).decode()[8:-4] not in squeezed, form
    assert scrub_secrets("CD8A, CD8B, GZMK and sk-proj- keys", [key]) == "CD8A, CD8B, GZMK and sk-proj- keys"
    # what a person reads is what is there: no terminal escapes, no reversed or invisible text
    assert untrusted_reply("\x1b[2Jcleared\x1b[31m red\x1b[0m\nnext\x1b]0;title\x07") == "cleared red\nnext"
    assert sanitize_label("T cell \x1b[31mRED\x1b[0m") == "T cell RED"
    assert sanitize_label("T\u200bcell") == "Tcell" and "\u202e" not in sanitize_text("NK \u202ecell")


def test_a_deadline_passed_while_rate_limited_says_rate_limit_not_timeout(llm_env, tmp_path):
    """Every request answered at once with a 429 and a Retry-After until the deadline: the reason is the rate
    limit (what the user can act on: a lower --llm-concurrency, a higher tier), not a server too slow."""
    llm_env.fail_next(1000, status=429, retry_after=1)
    results = run(tmp_path, clusters=CLUSTERS[:1], deadline=3.0, max_attempts=50)
    assert results[0].reason_kind == "rate_limited", results[0].reason
    assert "deadline" in results[0].reason and "429" in results[0].reason, results[0].reason


@pytest.mark.parametrize(("url", "says"), [
    ("http://[::1:9/v1", "Invalid IPv6 URL"), ("http://localhost:99999/v1", "Port out of range"),
    ("http://localhost:abc/v1", "Port could not be cast"), ("ftp://host/v1", "expected http(s)://"),
    ("https://user:secret@host/v1", "must not carry credentials"),
])
def test_a_malformed_base_url_is_a_usage_error_before_anything_runs(monkeypatch, capsys, tmp_path, url, says):
    from cassia_helpers.batch.cli import main

    monkeypatch.setenv("OPENAI_API_KEY", "sk-x")
    code = main(["--data-dir", str(tmp_path), "--tissues", "all", "--annotator", "llm", "--base-url", url,
                 "--dry-run"])
    err = capsys.readouterr().err
    assert code == 2 and says in err and "Traceback" not in err, err
    assert "secret" not in err or "must not carry" in err
