"""Tests for the scripted OpenAI-compatible server, driven through the real ``openai`` client."""

from __future__ import annotations

import json
import re
import threading
import time
import urllib.error
import urllib.request

import openai
import pytest

from cassia_helpers.dataset.annotate.agents.annotator import ANSWER_SCHEMA
from tests.scripted_llm_server import FORMATTER_KEYS, MALFORMED_BODY, ScriptedLLMServer

ANNOTATOR_SYSTEM = "You are the Annotator Agent, an expert in single-cell biology."
VALIDATOR_SYSTEM = "You are the Validator Agent. Check the annotation."
FORMATTER_SYSTEM = "You are the Formatter Agent. Summarise the annotation as JSON."

# the schema our formatter agent sends
SCHEMA = ANSWER_SCHEMA


def user_prompt(markers: str, tissue: str = "blood") -> str:
    return f"Species: human\nTissue: {tissue}\nRanked markers (best first): {markers}\nWhich cell type?"


def conv(system: str, *user_and_assistant: str) -> list[dict]:
    msgs = [{"role": "system", "content": system}]
    for i, text in enumerate(user_and_assistant):
        msgs.append({"role": "user" if i % 2 == 0 else "assistant", "content": text})
    return msgs


@pytest.fixture()
def srv():
    with ScriptedLLMServer() as server:
        yield server


@pytest.fixture()
def client(srv):
    with openai.OpenAI(base_url=srv.base_url, api_key="sk-test", max_retries=0, timeout=10) as c:
        yield c


def ask(client, messages, **kw):
    return client.chat.completions.create(model=kw.pop("model", "gpt-test"), messages=messages, **kw)


def final_annotation(text: str) -> str:
    last = text.strip().splitlines()[-1]
    assert last.startswith("FINAL ANNOTATION: "), text
    return last.removeprefix("FINAL ANNOTATION: ")


# --------------------------------------------------------------------------- agents


@pytest.mark.parametrize(
    ("markers", "expected"),
    [
        ("CD3E, CD8A, GZMK", "CD8+ T cell"),
        ("CD3D, CD3E, CD2, LTB", "T cell"),
        ("IL7R, CD3E, CCR7", "CD4+ T cell"),
        ("NKG7, GNLY, KLRD1, CD3E", "NK cell"),
        ("MS4A1, CD79A, HLA-DRA", "B cell"),
        ("LYZ, CD14, S100A8", "Monocyte"),
        ("Gfap, Aqp4, Slc1a3", "Astrocyte"),  # mouse genes, title case
        ("Mbp, Plp1, Mog, Gfap", "Oligodendrocyte"),
        ("ALB, APOA1, TTR", "Hepatocyte"),
        ("FOO1, BAR2, BAZ3", "Unknown cell type"),
    ],
)
def test_annotator_calls_expected_type(client, markers, expected):
    resp = ask(client, conv(ANNOTATOR_SYSTEM, user_prompt(markers)))
    text = resp.choices[0].message.content
    assert final_annotation(text) == expected
    assert "step by step" in text.lower()
    assert resp.choices[0].finish_reason == "stop"
    assert resp.model == "gpt-test"
    assert resp.system_fingerprint == "fp_scripted"


def test_annotator_cites_only_received_markers(client):
    markers = ["Cd3e", "Cd8b", "Ccl5", "Gzmk", "Cd8a"]
    text = ask(client, conv(ANNOTATOR_SYSTEM, user_prompt(", ".join(markers)))).choices[0].message.content
    step2 = next(line for line in text.splitlines() if line.startswith("Step 2: "))
    cited = step2.removeprefix("Step 2: ").split(" are canonical")[0].split(", ")
    assert 2 <= len(cited) <= 4 and set(cited) <= set(markers)
    assert final_annotation(text) == "CD8+ T cell"


def test_last_marker_line_wins_and_feedback_round_is_well_formed(client):
    first = user_prompt("MS4A1, CD79A")
    retry = "The validator gave this feedback: reconsider.\nRanked markers (best first): PECAM1, VWF, CDH5"
    msgs = conv(ANNOTATOR_SYSTEM, first, "...\nFINAL ANNOTATION: B cell", retry)
    text = ask(client, msgs).choices[0].message.content
    assert "feedback" in text.lower()
    assert final_annotation(text) == "Endothelial cell"


def test_unknown_agent_answers_like_annotator(client):
    text = ask(client, [{"role": "user", "content": user_prompt("PPBP, PF4")}]).choices[0].message.content
    assert final_annotation(text) == "Platelet"


def test_validator_passes_then_scripted_failures(srv, client):
    msgs = conv(VALIDATOR_SYSTEM, user_prompt("CD14, LYZ") + "\nAnnotation:\nFINAL ANNOTATION: Monocyte")
    assert ask(client, msgs).choices[0].message.content.startswith("VALIDATION PASSED")
    srv.validator_fails = 2
    answers = [ask(client, msgs).choices[0].message.content for _ in range(3)]
    assert answers[0].startswith("VALIDATION FAILED: ") and "feedback" in answers[0].lower()
    assert answers[1].startswith("VALIDATION FAILED: ")
    assert answers[2].startswith("VALIDATION PASSED")


def test_formatter_json_schema_returns_six_keys(client):
    annot = "Step 1 ...\nFINAL ANNOTATION: CD8+ T cell"
    msgs = conv(FORMATTER_SYSTEM, user_prompt("CD8A, CD3E, NKG7, GZMK") + "\n\nAnnotator output:\n" + annot)
    resp = ask(client, msgs, response_format=SCHEMA)
    data = json.loads(resp.choices[0].message.content)
    assert tuple(data) == FORMATTER_KEYS
    assert data["main_cell_type"] == "CD8+ T cell"
    assert isinstance(data["confidence"], int) and 0 <= data["confidence"] <= 100
    assert data["key_markers"] and set(data["key_markers"]) <= {"CD8A", "CD3E", "NKG7", "GZMK"}
    assert len(data["sub_cell_types"]) <= 3
    assert "NK cell" in data["mixed_cell_types"]
    assert isinstance(data["reasoning"], str)


def test_formatter_follows_stated_annotation_over_markers(client):
    msgs = conv(FORMATTER_SYSTEM, user_prompt("CD14, LYZ") + "\n**FINAL ANNOTATION:** Dendritic cell.")
    data = json.loads(ask(client, msgs, response_format={"type": "json_object"}).choices[0].message.content)
    assert data["main_cell_type"] == "Dendritic cell"
    assert set(data["key_markers"]) <= {"CD14", "LYZ"}


def test_formatter_without_response_format_uses_fenced_json(client):
    msgs = conv(FORMATTER_SYSTEM, user_prompt("SNAP25, RBFOX3"))
    text = ask(client, msgs).choices[0].message.content
    block = re.search(r"```json\n(.*?)\n```", text, re.S)
    assert block, text
    assert json.loads(block.group(1))["main_cell_type"] == "Neuron"


def test_chat_completions_parse_with_json_schema(client):
    pydantic = pytest.importorskip("pydantic")

    class Annotation(pydantic.BaseModel):
        main_cell_type: str
        sub_cell_types: list[str]
        mixed_cell_types: list[str]
        confidence: int
        key_markers: list[str]
        reasoning: str

    msgs = conv(FORMATTER_SYSTEM, user_prompt("P2RY12, CX3CR1, CSF1R"))
    parsed = client.chat.completions.parse(model="gpt-test", messages=msgs, response_format=Annotation)
    assert parsed.choices[0].message.parsed.main_cell_type == "Microglia"


def test_deterministic_answers(client):
    msgs = conv(ANNOTATOR_SYSTEM, user_prompt("EPCAM, KRT8, KRT18"))
    a, b = ask(client, msgs), ask(client, msgs)
    assert a.choices[0].message.content == b.choices[0].message.content
    assert a.id == b.id


# --------------------------------------------------------------------------- accounting


def test_stats_count_requests_and_tokens(srv, client):
    usages = []
    for markers in ("CD3E, CD2", "GFAP, AQP4", "COL1A1, DCN"):
        resp = ask(client, conv(ANNOTATOR_SYSTEM, user_prompt(markers)))
        usages.append(resp.usage)
        text = resp.choices[0].message.content
        assert resp.usage.completion_tokens == len(text.split())
        assert resp.usage.total_tokens == resp.usage.prompt_tokens + resp.usage.completion_tokens
    ask(client, conv(FORMATTER_SYSTEM, user_prompt("CD3E")), response_format=SCHEMA)
    srv.fail_next(1, status=500)
    with pytest.raises(openai.InternalServerError):
        ask(client, conv(VALIDATOR_SYSTEM, "x"))
    st = srv.stats()
    assert st["requests"] == 5 and st["ok"] == 4 and st["errors"] == 1
    assert st["by_agent"] == {"annotator": 3, "formatter": 1, "validator": 1}
    formatter_usage = srv.received[3]
    assert formatter_usage["_agent"] == "formatter"
    assert st["prompt_tokens"] > sum(u.prompt_tokens for u in usages)
    assert st["completion_tokens"] > sum(u.completion_tokens for u in usages)
    # prompt token rule: words across contents + 3 per message
    msgs = conv(ANNOTATOR_SYSTEM, user_prompt("CD3E, CD2"))
    expected = sum(len(m["content"].split()) for m in msgs) + 3 * len(msgs)
    assert usages[0].prompt_tokens == expected
    assert len(srv.received) == len(srv.headers_seen) == 5
    assert srv.headers_seen[0]["Authorization"] == "Bearer sk-test"
    assert srv.received[0]["messages"] == msgs
    srv.reset_stats()
    assert srv.stats()["requests"] == 0 and srv.received == [] and srv.headers_seen == []


def test_stats_tokens_equal_returned_usage(srv, client):
    total_p = total_c = 0
    for markers in ("CD19, MS4A1", "JCHAIN, MZB1", "PECAM1"):
        u = ask(client, conv(ANNOTATOR_SYSTEM, user_prompt(markers))).usage
        total_p, total_c = total_p + u.prompt_tokens, total_c + u.completion_tokens
    st = srv.stats()
    assert (st["prompt_tokens"], st["completion_tokens"]) == (total_p, total_c)


def test_concurrent_requests_are_all_counted():
    with ScriptedLLMServer(latency=0.05) as server:
        with openai.OpenAI(base_url=server.base_url, api_key="sk-test", max_retries=0) as c:
            errors = []

            def work():
                try:
                    ask(c, conv(ANNOTATOR_SYSTEM, user_prompt("CD3E")))
                except Exception as exc:  # pragma: no cover - surfaced below
                    errors.append(exc)

            threads = [threading.Thread(target=work) for _ in range(16)]
            t0 = time.monotonic()
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            elapsed = time.monotonic() - t0
        assert not errors
        assert server.stats()["requests"] == server.stats()["ok"] == 16
        assert elapsed < 16 * 0.05  # served in parallel


def test_omit_usage(srv, client):
    srv.omit_usage = True
    resp = ask(client, conv(ANNOTATOR_SYSTEM, user_prompt("CD3E")))
    assert resp.usage is None
    assert srv.stats()["ok"] == 1 and srv.stats()["prompt_tokens"] == 0


# --------------------------------------------------------------------------- faults


def test_fail_next_429_with_retry_after(srv, client):
    srv.fail_next(2, status=429, retry_after=7)
    for _ in range(2):
        with pytest.raises(openai.RateLimitError) as err:
            ask(client, conv(ANNOTATOR_SYSTEM, user_prompt("CD3E")))
        assert err.value.status_code == 429
        assert err.value.response.headers["retry-after"] == "7"
        assert err.value.code == "rate_limit_exceeded"
    ask(client, conv(ANNOTATOR_SYSTEM, user_prompt("CD3E")))
    assert srv.stats()["errors"] == 2 and srv.stats()["ok"] == 1


def test_client_retries_honour_retry_after(srv):
    srv.fail_next(1, status=429, retry_after=0.2)
    with openai.OpenAI(base_url=srv.base_url, api_key="sk-test", max_retries=1) as c:
        t0 = time.monotonic()
        resp = ask(c, conv(ANNOTATOR_SYSTEM, user_prompt("CD14")))
        assert time.monotonic() - t0 >= 0.2
    assert final_annotation(resp.choices[0].message.content) == "Monocyte"
    assert srv.stats()["requests"] == 2


def test_reject_json_schema(srv, client):
    srv.reject_json_schema = True
    msgs = conv(FORMATTER_SYSTEM, user_prompt("CD3E"))
    with pytest.raises(openai.BadRequestError) as err:
        ask(client, msgs, response_format=SCHEMA)
    assert "json_schema" in err.value.message
    # json_object still works, the fallback path
    data = json.loads(ask(client, msgs, response_format={"type": "json_object"}).choices[0].message.content)
    assert data["main_cell_type"] == "T cell"
    srv.reject_response_format = True
    with pytest.raises(openai.BadRequestError):
        ask(client, msgs, response_format={"type": "json_object"})


def test_reject_seed(srv, client):
    srv.reject_seed = True
    with pytest.raises(openai.BadRequestError) as err:
        ask(client, conv(ANNOTATOR_SYSTEM, user_prompt("CD3E")), seed=1)
    assert "seed" in err.value.message
    ask(client, conv(ANNOTATOR_SYSTEM, user_prompt("CD3E")))


def test_timeout_fault_raises_api_timeout_error(srv):
    srv.fault_rates(p_timeout=1.0, timeout_s=5.0)
    with openai.OpenAI(base_url=srv.base_url, api_key="sk-test", max_retries=0, timeout=0.5) as c:
        t0 = time.monotonic()
        with pytest.raises(openai.APITimeoutError):
            ask(c, conv(ANNOTATOR_SYSTEM, user_prompt("CD3E")))
        assert time.monotonic() - t0 < 2.0


def test_latency_is_applied():
    with ScriptedLLMServer(latency=0.3) as server:
        with openai.OpenAI(base_url=server.base_url, api_key="k", max_retries=0) as c:
            t0 = time.monotonic()
            ask(c, conv(ANNOTATOR_SYSTEM, user_prompt("CD3E")))
            assert time.monotonic() - t0 >= 0.3


def test_malformed_body_raises_json_decode_error(srv, client):
    # The installed openai parses application/json bodies with response.json() and lets the
    # json.JSONDecodeError (a ValueError, *not* an openai.APIError) escape; it is not retried.
    srv.malformed_body_next(1)
    with pytest.raises(json.JSONDecodeError) as err:
        ask(client, conv(ANNOTATOR_SYSTEM, user_prompt("CD3E")))
    assert not isinstance(err.value, openai.OpenAIError)
    assert srv.stats()["ok"] == 1 and srv.stats()["faults"] == {"malformed": 1}
    resp = ask(client, conv(ANNOTATOR_SYSTEM, user_prompt("CD3E")))
    assert final_annotation(resp.choices[0].message.content) == "T cell"


def test_malformed_body_is_not_json_over_raw_http(srv):
    srv.malformed_body_next(1)
    req = urllib.request.Request(
        srv.base_url + "/chat/completions",
        data=json.dumps({"model": "m", "messages": [{"role": "user", "content": "hi"}]}).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=5) as resp:
        assert resp.status == 200
        raw = resp.read()
    assert raw == MALFORMED_BODY
    with pytest.raises(ValueError):
        json.loads(raw)


def test_garbage_answers(srv, client):
    srv.garbage = True
    for system in (ANNOTATOR_SYSTEM, FORMATTER_SYSTEM):
        resp = ask(client, conv(system, user_prompt("CD3E")), response_format={"type": "json_object"})
        text = resp.choices[0].message.content
        assert "FINAL ANNOTATION" not in text
        with pytest.raises(ValueError):
            json.loads(text)
        assert resp.usage.completion_tokens == len(text.split())


def test_random_faults_are_seeded():
    def run(seed):
        outcomes = []
        with ScriptedLLMServer(seed=seed) as server:
            server.fault_rates(p429=0.3, p500=0.2, p_garbage=0.2)
            with openai.OpenAI(base_url=server.base_url, api_key="k", max_retries=0) as c:
                for _ in range(20):
                    try:
                        text = ask(c, conv(ANNOTATOR_SYSTEM, user_prompt("CD3E"))).choices[0].message.content
                        outcomes.append("ok" if "FINAL ANNOTATION" in text else "garbage")
                    except openai.RateLimitError:
                        outcomes.append("429")
                    except openai.InternalServerError:
                        outcomes.append("500")
            st = server.stats()
        assert st["requests"] == 20 and st["errors"] == outcomes.count("429") + outcomes.count("500")
        return outcomes

    first = run(1)
    assert first == run(1)
    assert {"ok", "garbage", "429", "500"} <= set(first)


def test_wrong_api_key_gives_authentication_error():
    with ScriptedLLMServer(expected_api_key="sk-right") as server:
        with openai.OpenAI(base_url=server.base_url, api_key="sk-wrong", max_retries=0) as c:
            with pytest.raises(openai.AuthenticationError) as err:
                ask(c, conv(ANNOTATOR_SYSTEM, user_prompt("CD3E")))
            assert err.value.status_code == 401 and err.value.code == "invalid_api_key"
        with openai.OpenAI(base_url=server.base_url, api_key="sk-right", max_retries=0) as c:
            ask(c, conv(ANNOTATOR_SYSTEM, user_prompt("CD3E")))
        st = server.stats()
        assert (st["requests"], st["ok"], st["errors"]) == (2, 1, 1)
        assert [h["authorization"] for h in server.headers_seen] == ["Bearer sk-wrong", "Bearer sk-right"]


def test_models_endpoint_and_404(srv, client):
    assert [m.id for m in client.models.list()] == ["scripted-model"]
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(srv.base_url + "/nope", timeout=5)
    assert err.value.code == 404
    assert "error" in json.loads(err.value.read())
    assert srv.stats()["requests"] == 0


def test_start_stop_without_context_manager():
    server = ScriptedLLMServer().start()
    try:
        assert re.fullmatch(r"http://127\.0\.0\.1:\d+/v1", server.base_url)
        with urllib.request.urlopen(server.base_url + "/models", timeout=5) as resp:
            assert json.loads(resp.read())["data"][0]["id"] == "scripted-model"
    finally:
        server.stop()
    with pytest.raises(RuntimeError):
        _ = server.base_url
