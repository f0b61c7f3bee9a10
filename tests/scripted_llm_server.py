"""A deterministic, scripted OpenAI-compatible HTTP server for offline tests and benchmarks.

The server speaks just enough of the OpenAI REST API (``POST /v1/chat/completions`` and
``GET /v1/models``) for the real ``openai`` client to talk to it over HTTP on 127.0.0.1.  Its
"model" is a small marker -> cell-type table that plays the three CASSIA-style agents
(annotator, validator, formatter), picked from the system message.  Faults (rate limits, server
errors, garbage, slow answers, malformed bodies, unsupported parameters) can be injected at any
time from the test thread.

Usage::

    with ScriptedLLMServer() as srv:
        client = openai.OpenAI(base_url=srv.base_url, api_key="sk-test", max_retries=0)
        ...

or from a shell (for benchmarks)::

    python -m tests.scripted_llm_server --port 8765 --latency 1.0

Only the standard library is used.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import random
import re
import socket
import sys
import threading
import time
import urllib.parse
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

MODEL_ID = "scripted-model"
UNKNOWN_TYPE = "Unknown cell type"

# Cell type -> (own markers, parent type or None).  A subtype also scores its parent's markers,
# but is only eligible when at least one of its own markers is present.
CELL_TYPES: dict[str, tuple[tuple[str, ...], str | None]] = {
    "T cell": (("CD3E", "CD3D", "CD2"), None),
    "CD8+ T cell": (("CD8A", "CD8B"), "T cell"),
    "CD4+ T cell": (("CD4", "IL7R"), "T cell"),
    "NK cell": (("NKG7", "GNLY", "KLRD1"), None),
    "B cell": (("MS4A1", "CD79A", "CD19"), None),
    "Plasma cell": (("JCHAIN", "MZB1"), None),
    "Monocyte": (("CD14", "LYZ", "FCN1"), None),
    "Dendritic cell": (("FCER1A", "CLEC10A", "CST3"), None),
    "Platelet": (("PPBP", "PF4"), None),
    "Astrocyte": (("GFAP", "AQP4"), None),
    "Neuron": (("SNAP25", "RBFOX3"), None),
    "Oligodendrocyte": (("MBP", "PLP1", "MOG"), None),
    "Microglia": (("P2RY12", "CX3CR1"), None),
    "Endothelial cell": (("PECAM1", "VWF"), None),
    "Fibroblast": (("COL1A1", "DCN"), None),
    "Epithelial cell": (("EPCAM", "KRT8"), None),
    "Hepatocyte": (("ALB", "APOA1"), None),
}

FORMATTER_KEYS = (
    "main_cell_type",
    "sub_cell_types",
    "mixed_cell_types",
    "confidence",
    "key_markers",
    "reasoning",
    "cell_ontology_id",
)
# Cell Ontology ids the scripted formatter proposes
CL_IDS = {"T cell": "CL:0000084", "B cell": "CL:0000236", "Monocyte": "CL:0000576", "NK cell": "CL:0000623",
          "Astrocyte": "CL:0000127", "Oligodendrocyte": "CL:0000128", "Microglia": "CL:0000129"}
INVALID_CL_ID = "CL:9999999"

_MARKER_LINE = re.compile(r"^\s*Ranked markers[^:\n]*:(.*)$", re.IGNORECASE | re.MULTILINE)
_FINAL_LINE = re.compile(r"FINAL ANNOTATION\W*?:\s*(.+)", re.IGNORECASE)
# What ``malformed_body_next`` answers: a truncated JSON document with an HTML fragment in it.
MALFORMED_BODY = b'{"id": "chatcmpl-broken", "object": "chat.completion", "choices": [<html>oops'
_GARBAGE_WORDS = (
    "lorem ipsum dolor sit amet quantum banana cathedral velvet sprocket nebula teapot "
    "marmalade oscillator pinwheel glacier syntax harmonica"
).split()


# --------------------------------------------------------------------------- the "model"


def _lineage(cell_type: str) -> str:
    parent = CELL_TYPES[cell_type][1]
    return parent if parent is not None else cell_type


def _type_markers(cell_type: str) -> tuple[str, ...]:
    own, parent = CELL_TYPES[cell_type]
    return own + (CELL_TYPES[parent][0] if parent else ())


def score_markers(markers: list[str]) -> list[tuple[str, float, list[str]]]:
    """Score every eligible cell type for a ranked marker list.

    Returns ``[(cell_type, score, supporting_markers), ...]`` best first, types with no hit omitted.
    Each hit at 0-based rank ``r`` weighs ``n / (n + r)`` (in (0.5, 1]), so more hits always win
    and earlier hits break ties.  Supporting markers keep the received spelling and rank order.
    """
    n = len(markers)
    upper = [m.upper() for m in markers]
    scored = []
    for order, (cell_type, (own, _parent)) in enumerate(CELL_TYPES.items()):
        if not any(g in upper for g in own):
            continue
        wanted = set(_type_markers(cell_type))
        hits = [(r, markers[r]) for r, g in enumerate(upper) if g in wanted]
        score = sum(n / (n + r) for r, _ in hits)
        scored.append((-score, hits[0][0], order, cell_type, score, [m for _, m in hits]))
    scored.sort()
    return [(t, s, h) for *_, t, s, h in scored]


def call_cell_type(markers: list[str]) -> tuple[str, list[str]]:
    """The deterministic call: (cell type, supporting markers); ``UNKNOWN_TYPE`` with no hit."""
    ranked = score_markers(markers)
    if not ranked:
        return UNKNOWN_TYPE, []
    return ranked[0][0], ranked[0][2]


def _content_text(content: Any) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # content parts: [{"type": "text", "text": "..."}]
        parts = []
        for part in content:
            if isinstance(part, dict) and isinstance(part.get("text"), str):
                parts.append(part["text"])
            elif isinstance(part, str):
                parts.append(part)
        return "\n".join(parts)
    return str(content)


def _messages(body: dict) -> list[dict]:
    msgs = body.get("messages")
    return [m for m in msgs if isinstance(m, dict)] if isinstance(msgs, list) else []


def detect_agent(body: dict) -> str:
    """'annotator' | 'validator' | 'formatter' | 'unknown', from the first system (or developer) message."""
    pipeline_agent = detect_pipeline_agent(body)  # scorer / boost / merger (pipeline agents section)
    if pipeline_agent:
        return pipeline_agent
    for msg in _messages(body):
        if msg.get("role") in ("system", "developer"):
            text = _content_text(msg.get("content")).lower()
            for agent in ("annotator", "validator", "formatter"):
                if f"{agent} agent" in text:
                    return agent
            return "unknown"
    return "unknown"


def parse_markers(body: dict) -> list[str]:
    """Genes of the last ``Ranked markers...: A, B, C`` line across the user messages."""
    found: list[str] | None = None
    for msg in _messages(body):
        if msg.get("role") != "user":
            continue
        for match in _MARKER_LINE.finditer(_content_text(msg.get("content"))):
            genes = [g.strip().strip("`'\"").strip() for g in match.group(1).split(",")]
            found = [g for g in genes if g]
    return found or []


def parse_final_annotation(body: dict) -> str | None:
    """The last ``FINAL ANNOTATION: X`` in non-system messages (placeholders like ``<type>`` skipped)."""
    found = None
    for msg in _messages(body):
        if msg.get("role") in ("system", "developer"):
            continue
        for match in _FINAL_LINE.finditer(_content_text(msg.get("content"))):
            value = match.group(1).strip().strip("*_`\"' ").rstrip(".").strip()
            if value and not value.startswith(("<", "[", "{")):
                found = value
    return found


def _canonical_type(name: str) -> str | None:
    for cell_type in CELL_TYPES:
        if cell_type.lower() == name.lower():
            return cell_type
    return None


def _has_feedback(body: dict) -> bool:
    users = [m for m in _messages(body) if m.get("role") == "user"]
    return any("feedback" in _content_text(m.get("content")).lower() for m in users[1:])


def _cited(markers: list[str], support: list[str]) -> list[str]:
    """2-4 received markers to cite: supporting ones first, padded with the top-ranked others."""
    cited = list(support[:4])
    for m in markers:
        if len(cited) >= 2:
            break
        if m not in cited:
            cited.append(m)
    return cited


def annotator_answer(body: dict) -> str:
    markers = parse_markers(body)
    cell_type, support = call_cell_type(markers)
    cited = _cited(markers, support)
    lines = []
    if _has_feedback(body):
        lines.append("Thank you for the feedback. I re-examined the marker evidence step by step.")
    lines.append("Let me reason step by step.")
    if not markers:
        lines.append("Step 1: No ranked marker list was provided, so there is no evidence to weigh.")
        lines.append("Step 2: Without markers no lineage can be assigned.")
    else:
        lines.append(f"Step 1: The top ranked markers are {', '.join(markers[:5])}.")
        if cell_type == UNKNOWN_TYPE:
            lines.append(
                f"Step 2: Markers such as {', '.join(cited)} do not match any canonical lineage signature."
            )
            lines.append("Step 3: The evidence is insufficient for a confident call.")
        else:
            supporting = [m for m in cited if m in support]
            extra = [m for m in cited if m not in support]
            lines.append(
                f"Step 2: {', '.join(supporting)} {'is a' if len(supporting) == 1 else 'are'} "
                f"canonical marker{'' if len(supporting) == 1 else 's'} of {cell_type}."
            )
            if extra:
                lines.append(f"Step 3: {', '.join(extra)} is also highly ranked but not lineage-defining.")
            else:
                lines.append("Step 3: The supporting markers rank near the top, strengthening the call.")
            lines.append(f"Step 4: Taken together, the most likely identity is {cell_type}.")
    lines.append(f"FINAL ANNOTATION: {cell_type}")
    return "\n".join(lines)


def validator_answer(body: dict, fail: bool) -> str:
    markers = parse_markers(body)
    claimed = parse_final_annotation(body) or call_cell_type(markers)[0]
    if fail:
        focus = ", ".join(markers[:3]) or "the ranked markers"
        return (
            f"VALIDATION FAILED: the evidence for {claimed} is not convincing.\n"
            f"Feedback: re-check the marker evidence, in particular {focus}, cite the markers that "
            "support the call, and consider alternative lineages before giving the FINAL ANNOTATION."
        )
    return f"VALIDATION PASSED\nThe annotation {claimed} is consistent with the ranked markers."


def formatter_payload(body: dict) -> dict:
    """The JSON object (:data:`FORMATTER_KEYS`) matching the annotator's call found in the conversation."""
    markers = parse_markers(body)
    ranked = score_markers(markers)
    stated = parse_final_annotation(body)
    if stated:
        canonical = _canonical_type(stated)
        main = canonical or stated
    else:
        canonical = ranked[0][0] if ranked else None
        main = canonical or UNKNOWN_TYPE
    support = next((h for t, _, h in ranked if t == canonical), [])
    if canonical is None:  # unknown or off-table call: cite the best evidence we have
        support = ranked[0][2] if ranked else []
    others = [t for t, _, _ in ranked if t != canonical]
    if canonical:
        sub = [t for t in others if _lineage(t) == _lineage(canonical)][:3]
        mixed = [t for t in others if _lineage(t) != _lineage(canonical)][:3]
    else:
        sub, mixed = [], others[:3]
    key_markers = list(support[:4]) or markers[:3]
    if main == UNKNOWN_TYPE:
        confidence = 10
    else:
        confidence = max(5, min(95, 40 + 15 * len(support) - 10 * len(mixed)))
    if key_markers:
        reasoning = f"{main} is supported by {', '.join(key_markers)} among the top ranked markers."
    else:
        reasoning = "No ranked markers were available to support a call."
    return {
        "main_cell_type": main,
        "sub_cell_types": sub,
        "mixed_cell_types": mixed,
        "confidence": int(confidence),
        "key_markers": key_markers,
        "reasoning": reasoning,
        # a known type gets its real id; any other call a made-up one, which the client must reject
        "cell_ontology_id": CL_IDS.get(main, "" if main == UNKNOWN_TYPE else INVALID_CL_ID),
    }


def formatter_answer(body: dict) -> str:
    payload = formatter_payload(body)
    rf = body.get("response_format")
    if isinstance(rf, dict) and rf.get("type") in ("json_schema", "json_object"):
        return json.dumps(payload)
    return (
        "Here is the structured summary of the annotation:\n\n```json\n"
        + json.dumps(payload, indent=2)
        + "\n```\n"
    )


def garbage_answer(body: dict) -> str:
    digest = hashlib.sha256(_canonical_json(body).encode()).digest()
    return " ".join(_GARBAGE_WORDS[b % len(_GARBAGE_WORDS)] for b in digest[:14]) + "."


def count_words(text: str) -> int:
    return len(text.split())


def prompt_token_count(body: dict) -> int:
    msgs = _messages(body)
    return sum(count_words(_content_text(m.get("content"))) for m in msgs) + 3 * len(msgs)


def _canonical_json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)


def error_body(message: str, err_type: str, code: str | None, param: str | None = None) -> dict:
    return {"error": {"message": message, "type": err_type, "param": param, "code": code}}


_STATUS_ERRORS = {
    400: ("invalid_request_error", "invalid_request"),
    401: ("invalid_request_error", "invalid_api_key"),
    403: ("permission_error", "forbidden"),
    404: ("invalid_request_error", "not_found"),
    408: ("timeout", "request_timeout"),
    409: ("conflict", "conflict"),
    429: ("rate_limit_error", "rate_limit_exceeded"),
    500: ("server_error", "internal_error"),
    502: ("server_error", "bad_gateway"),
    503: ("server_error", "service_unavailable"),
}


def _status_error(status: int) -> dict:
    default = ("server_error" if status >= 500 else "api_error", str(status))
    err_type, code = _STATUS_ERRORS.get(status, default)
    return error_body(f"Scripted fault: HTTP {status}.", err_type, code)


class _Headers(dict):
    """A plain dict of request headers with lower-case keys and case-insensitive lookups."""

    def __getitem__(self, key: str) -> str:
        return super().__getitem__(key.lower())

    def __contains__(self, key: object) -> bool:
        return super().__contains__(key.lower() if isinstance(key, str) else key)

    def get(self, key: str, default: Any = None) -> Any:
        return super().get(key.lower(), default)


# --------------------------------------------------------------------------- pipeline agents
# The scoring, boost and merging agents of the full pipeline (and CASSIA's own scoring / boost prompts),
# plus their fault knobs. Kept in this section so the core dispatch above stays as it was.

PIPELINE_AGENTS = ("scorer", "boost", "merger")
BROAD_GROUPS = {
    "Immune cell": ("T cell", "NK cell", "B cell", "Plasma cell", "Monocyte", "Dendritic cell", "Platelet",
                    "Microglia"),
    "Neural cell": ("Astrocyte", "Neuron", "Oligodendrocyte"),
    "Stromal cell": ("Endothelial cell", "Fibroblast"),
    "Epithelial cell": ("Epithelial cell", "Hepatocyte"),
}
_LOOKUP_LINE = re.compile(r"^\s*-\s*([A-Za-z0-9._\-]+):\s*log2FC\s+(-?[\d.]+)", re.MULTILINE)
_CALL_LINE = re.compile(r"^\s*Call to score:\s*(.+)$", re.MULTILINE)
_RUN_LINE = re.compile(r"independent run (\d+) of", re.IGNORECASE)
_MERGE_LINE = re.compile(r"^\s*-\s*cluster\s+(\S+):\s*([^;\n]+)", re.MULTILINE)
_CASSIA_MARKERS = re.compile(r"<marker>\s*(.*?)\s*</marker>", re.DOTALL)


def detect_pipeline_agent(body: dict) -> str | None:
    """'scorer' | 'boost' | 'merger' from the system message, or CASSIA's own scoring / boost prompts."""
    for msg in _messages(body):
        if msg.get("role") in ("system", "developer"):
            text = _content_text(msg.get("content")).lower()
            for name, phrase in (("scorer", "scoring agent"), ("boost", "boost agent"), ("merger", "merging agent")):
                if phrase in text:
                    return name
            break
    first_user = next((_content_text(m.get("content")) for m in _messages(body) if m.get("role") == "user"), "")
    if "<check_genes>" in first_user:
        return "boost"
    if "<score>" in first_user:
        return "scorer"
    return None


def _all_text(body: dict, roles=("user", "assistant")) -> str:
    return "\n".join(_content_text(m.get("content")) for m in _messages(body) if m.get("role") in roles)


def _positive_lookups(text: str) -> list[str]:
    """Genes a look-up answer reported with log2FC >= 1 (the evidence the boost gathered)."""
    return [g for g, lfc in _LOOKUP_LINE.findall(text) if float(lfc) >= 1.0]


def _evidence(body: dict) -> list[str]:
    markers = parse_markers(body)
    if not markers:
        found = _CASSIA_MARKERS.search(_all_text(body))
        markers = [g.strip() for g in found.group(1).split(",") if g.strip()] if found else []
    extra = [g for g in _positive_lookups(_all_text(body)) if g.upper() not in {m.upper() for m in markers}]
    return markers + extra


def scripted_score(body: dict) -> int:
    """0-100 from the evidence: 20 for Unknown/off-table, 35 if not the best type, else 45 + 15 per hit."""
    evidence = _evidence(body)
    stated = _CALL_LINE.findall(_all_text(body, roles=("user",)))
    claimed = stated[-1].strip() if stated else (parse_final_annotation(body) or "")
    canonical = _canonical_type(claimed)
    ranked = score_markers(evidence)
    if canonical is None or not ranked:
        return 20
    if ranked[0][0] != canonical:
        return 35
    return min(95, 45 + 15 * len(ranked[0][2]))


def boost_genes(body: dict) -> list[str]:
    """Genes the boost agent asks for: the unseen markers of the best candidates (or of every type)."""
    markers = parse_markers(body) or _evidence(body)
    seen = {m.upper() for m in markers}
    ranked = score_markers(markers)
    if ranked:
        lineage = _lineage(ranked[0][0])
        types = [t for t in CELL_TYPES if _lineage(t) == lineage]
        wanted = [g for t in types for g in _type_markers(t)]
    else:
        wanted = [own[0] for own, _ in CELL_TYPES.values()]
    return [g for g in dict.fromkeys(wanted) if g.upper() not in seen]


def merger_payload(body: dict, drop_last: bool) -> dict:
    entries = []
    for cluster, label in _MERGE_LINE.findall(_all_text(body, roles=("user",))):
        canonical = _canonical_type(label.strip())
        lineage = _lineage(canonical) if canonical else label.strip()
        broad = next((g for g, members in BROAD_GROUPS.items() if lineage in members), "Other")
        entries.append({"cluster": cluster, "broad": broad, "detailed": lineage, "fine": label.strip()})
    if drop_last and entries:
        entries.pop()
    return {"groupings": entries}


class _PipelineAgents:
    """Mixed into :class:`ScriptedLLMServer`: answers and faults of the pipeline agents.

    Knobs: ``score_out_of_range`` (the next N scorer answers give 150), ``boost_never_concludes`` (the boost
    agent asks for genes forever), ``boost_unknown_genes`` (its requests also name genes that exist nowhere),
    ``disagree_runs`` (annotator answers for "independent run k" with k in the set give the runner-up type),
    ``reply_styles`` (a set of :data:`REPLY_STYLES`: how the validator, scorer and merger deviate from their
    format; a validator or scorer asked for structured output answers JSON unless ``text_only``),
    ``disagree_models`` (same for requests naming these models), ``merge_drops`` (the next N merging answers
    leave the last cluster out), ``fixed_call`` (the annotator answers this type for every cluster).
    """

    def _init_pipeline_faults(self) -> None:
        self.score_out_of_range = 0
        self.boost_never_concludes = False
        self.boost_unknown_genes = False
        self.disagree_runs: set[int] = set()
        self.disagree_models: set[str] = set()
        self.merge_drops = 0
        self.fixed_call: str | None = None
        self.reply_styles: set[str] = set()  # see REPLY_STYLES

    def fixed_annotator(self, body: dict) -> str | None:
        """With ``fixed_call`` set, the annotator answers that one type for every cluster, citing the cluster's
        own top markers as its evidence (a model that ignores the data but sounds sure)."""
        if not self.fixed_call:
            return None
        cited = parse_markers(body)[:3]
        return (f"Let me reason step by step.\nStep 1: The top markers {', '.join(cited)} are highly specific.\n"
                f"Step 2: Together they indicate {self.fixed_call}.\nFINAL ANNOTATION: {self.fixed_call}")

    def pipeline_answer(self, body: dict, agent: str) -> str:
        if "unusable_checks" in self.reply_styles:
            return garbage_answer(body)
        if agent == "scorer":
            with self._lock:
                wrong = self.score_out_of_range > 0
                self.score_out_of_range -= 1 if wrong else 0
            score = 150 if wrong else scripted_score(body)
            return styled_score(body, score, self.reply_styles)
        if agent == "merger":
            with self._lock:
                drop = self.merge_drops > 0
                self.merge_drops -= 1 if drop else 0
            return json.dumps(styled_groupings(merger_payload(body, drop), self.reply_styles))
        return self._boost_answer(body)

    def _boost_answer(self, body: dict) -> str:
        answered = any(m.get("role") == "assistant" for m in _messages(body))
        if self.boost_never_concludes or not answered:
            genes = boost_genes(body)[:18] + (["NOTAGENE1", "FAKE2"] if self.boost_unknown_genes else [])
            return ("Hypotheses: the earlier call may be too coarse or wrong. Checking the genes that separate "
                    f"the candidates.\n<check_genes>{','.join(genes or ['GAPDH'])}</check_genes>")
        evidence = _evidence(body)
        cell_type, support = call_cell_type(evidence)
        text = (f"FINAL ANNOTATION COMPLETED\nThe checked genes {', '.join(support) or 'do not help'} settle it.\n"
                f"FINAL ANNOTATION: {cell_type}")
        system = _content_text(_messages(body)[0].get("content")).lower() if _messages(body) else ""
        if "answer as json" in system:  # asked to end with the structured answer, as a real model would
            ranked = [t for t, _, _ in score_markers(evidence) if t != cell_type]
            payload = {"main_cell_type": cell_type,
                       "sub_cell_types": [t for t in ranked if _lineage(t) == _lineage(cell_type)][:3]
                       if cell_type in CELL_TYPES else [],
                       "mixed_cell_types": [], "confidence": 80 if support else 20, "key_markers": support[:4],
                       "reasoning": f"The checked genes {', '.join(support) or 'do not help'} settle it.",
                       "cell_ontology_id": CL_IDS.get(cell_type, "")}
            text += "\n```json\n" + json.dumps(payload) + "\n```"
        return text

    def disagreeing_annotator(self, body: dict) -> str | None:
        """The annotator's answer with the runner-up type, for the runs / models told to disagree."""
        run = _RUN_LINE.findall(_all_text(body, roles=("user",)))
        if not ((run and int(run[-1]) in self.disagree_runs) or body.get("model") in self.disagree_models):
            return None
        ranked = score_markers(parse_markers(body))
        if len(ranked) < 2:
            return None
        cell_type, support = ranked[1][0], ranked[1][2]
        return (f"Let me reason step by step.\nStep 1: {', '.join(support)} point to {cell_type}.\n"
                f"FINAL ANNOTATION: {cell_type}")


# --------------------------------------------------------------------------- reply styles of real models

#: What ``reply_styles`` may hold: deviations real models make from the format each agent is given.
REPLY_STYLES = (
    "verdict_last",  # the validator reasons first and ends with its verdict line
    "both_verdicts",  # the validator names both verdicts ("... would be VALIDATION FAILED if ...")
    "score_json",  # the scorer answers {"reasoning": ..., "score": N} in plain text
    "score_slash",  # "Score: N/100"
    "score_out_of",  # "I would rate this call N out of 100."
    "groupings_key",  # the merger's entries under "merged_clusters", with cluster_id / broad_group / ...
    "junk_labels",  # the merger's labels hold newlines, CRs, formulas and 300 characters
    "text_only",  # structured output is accepted but ignored: the agents answer in their text formats
    "no_score",  # the scorer judges in words and never gives a score
    "unusable_checks",  # the annotator and formatter answer well; validator, scorer, boost, merger send garbage
)
_VERDICT_TEXT = re.compile(r"^(VALIDATION (?:PASSED|FAILED))\W*\s*(.*)$", re.DOTALL)


def _structured(body: dict) -> bool:
    rf = body.get("response_format")
    return isinstance(rf, dict) and rf.get("type") in ("json_schema", "json_object")


def styled_validator(body: dict, text: str, styles: set[str]) -> str:
    """The validator's scripted ``text`` as JSON (structured output asked for) or in a model's own style."""
    match = _VERDICT_TEXT.match(text)
    verdict, rest = (match.group(1), match.group(2).strip()) if match else ("", text)
    if _structured(body) and "text_only" not in styles:
        return json.dumps({"verdict": verdict, "feedback": rest})
    if "both_verdicts" in styles:
        other = "VALIDATION FAILED" if verdict == "VALIDATION PASSED" else "VALIDATION PASSED"
        return f"{rest}\nIt is not {other}, I think, though one could argue for it.\n{verdict}"
    if "verdict_last" in styles:
        return f"Checking the cited markers against the ranked list.\n{rest}\n\n**{verdict}**"
    return text


def styled_score(body: dict, score: int, styles: set[str]) -> str:
    reasoning = ("The call was weighed against the ranked markers and any genes checked; "
                 f"evidence strength gives {score}.")
    if "no_score" in styles:
        return "The call looks broadly reasonable given the markers, but I would rather not put a number on it."
    if (_structured(body) and "text_only" not in styles) or "score_json" in styles:
        return json.dumps({"reasoning": reasoning, "score": score})
    if "score_slash" in styles:
        return f"{reasoning}\n\nScore: {score}/100"
    if "score_out_of" in styles:
        return f"{reasoning} Overall I would rate this call {score} out of 100."
    return f"<reasoning>{reasoning}</reasoning>\n<score>{score}</score>"


def styled_groupings(payload: dict, styles: set[str]) -> dict:
    entries = payload["groupings"]
    if "junk_labels" in styles:
        entries = [dict(e, broad=f"=cmd|' /C calc'!A0\n{e['broad']}", detailed="@" + e["detailed"] * 30,
                        fine=f"+{e['fine']}\r\nline two") for e in entries]
    if "groupings_key" in styles:
        return {"merged_clusters": [{"cluster_id": e["cluster"], "broad_group": e["broad"],
                                     "detailed_group": e["detailed"], "fine_group": e["fine"]} for e in entries]}
    return {"groupings": entries}


# --------------------------------------------------------------------------- the server


class _Reply:
    __slots__ = ("status", "payload", "raw", "headers", "delay", "trickle", "hang", "trickle_head")

    def __init__(
        self,
        status: int,
        payload: dict | None = None,
        raw: bytes | None = None,
        headers: dict | None = None,
        delay: float = 0.0,
    ) -> None:
        self.status = status
        self.payload = payload
        self.raw = raw
        self.headers = headers or {}
        self.delay = delay
        self.trickle = 0.0  # seconds between body bytes (a stalling proxy)
        self.hang = False  # headers never sent: the connection stays open until the server stops
        self.trickle_head = 0.0  # seconds between the bytes of the status line and headers


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 256
    owner: ScriptedLLMServer


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "ScriptedLLM/1.0"
    server: _HTTPServer

    def setup(self) -> None:
        super().setup()
        # Headers and body go out in two writes; without NODELAY, Nagle + delayed ACK adds ~40 ms.
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.server.owner._track(self.connection, add=True)

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            self.server.owner._track(self.connection, add=False)

    def log_message(self, format: str, *args: Any) -> None:
        if self.server.owner.verbose:
            super().log_message(format, *args)

    def _path(self) -> str:
        return self.path.split("?", 1)[0].rstrip("/")

    def _read_body(self) -> bytes:
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length > 0 else b""

    def _send(self, reply: _Reply) -> None:
        owner = self.server.owner
        if reply.delay > 0 and owner._stopping.wait(reply.delay):
            self.close_connection = True
            return
        if reply.hang or reply.trickle > 0 or reply.trickle_head > 0:
            self._send_stalling(reply)
            return
        data = reply.raw if reply.raw is not None else json.dumps(reply.payload).encode()
        try:
            self._send_head(reply, data, extra=True)
            self.wfile.write(data)
            self.wfile.flush()
        except OSError:  # client gave up (timeout) or the server is stopping
            self.close_connection = True

    def _send_head(self, reply: _Reply, data: bytes, *, extra: bool) -> None:
        """Status line and headers of a JSON body; ``extra``: the reply's own headers too (Retry-After, …)."""
        self.send_response(reply.status)
        self.send_header("Content-Type", reply.headers.get("Content-Type", "application/json"))
        self.send_header("Content-Length", str(len(data)))
        for key, value in (reply.headers.items() if extra else ()):
            if key != "Content-Type":
                self.send_header(key, value)
        self.end_headers()

    def _send_stalling(self, reply: _Reply) -> None:
        """Hang (never answer), or send the headers (``reply.trickle_head``) and/or the body (``reply.trickle``)
        one byte at a time."""
        owner = self.server.owner
        self.close_connection = True
        if reply.hang:
            owner._stopping.wait()
            return
        data = reply.raw if reply.raw is not None else json.dumps(reply.payload).encode()
        try:
            if reply.trickle_head > 0:
                head = (f"HTTP/1.1 {reply.status} OK\r\nContent-Type: application/json\r\n"
                        f"Content-Length: {len(data)}\r\n\r\n").encode()
                for index in range(len(head)):
                    self.wfile.write(head[index:index + 1])
                    self.wfile.flush()
                    if owner._stopping.wait(reply.trickle_head):
                        return
            else:
                self._send_head(reply, data, extra=False)
                self.wfile.flush()
            for index in range(len(data) if reply.trickle > 0 else 0):
                self.wfile.write(data[index:index + 1])
                self.wfile.flush()
                if owner._stopping.wait(reply.trickle):
                    return
            if reply.trickle <= 0:
                self.wfile.write(data)
                self.wfile.flush()
        except OSError:  # the client gave up
            pass

    def do_GET(self) -> None:
        owner = self.server.owner
        path = self._path()
        if not owner._authorized(self.headers.get("Authorization")):
            self._send(_Reply(401, owner._auth_error()))
        elif path == "/v1/models":
            self._send(_Reply(200, {"object": "list", "data": [_model_object()]}))
        elif path == f"/v1/models/{MODEL_ID}":
            self._send(_Reply(200, _model_object()))
        else:
            self._send(_not_found(self.command, self.path))

    def do_POST(self) -> None:
        raw = self._read_body()
        owner = self.server.owner
        if self._path() in owner.redirects:
            status, location = owner.redirects[self._path()]
            with owner._lock:
                owner.redirected += 1
            self._send(_Reply(status, {}, headers={"Location": location}))
            return
        if self._path() == "/v1/chat/completions":
            headers = _Headers((k.lower(), v) for k, v in self.headers.items())
            owner = self.server.owner
            owner._in_flight_change(+1)
            try:
                self._send(owner._handle_chat(raw, headers))
            finally:
                owner._in_flight_change(-1)
        else:
            self._send(_not_found(self.command, self.path))

    def _other(self) -> None:
        self._read_body()
        self._send(_not_found(self.command, self.path))

    do_PUT = do_DELETE = do_PATCH = _other


def _model_object() -> dict:
    return {"id": MODEL_ID, "object": "model", "created": 0, "owned_by": "scripted"}


def _not_found(method: str, path: str) -> _Reply:
    return _Reply(404, error_body(f"Invalid URL ({method} {path})", "invalid_request_error", "unknown_url"))


class ScriptedLLMServer(_PipelineAgents):
    """Deterministic OpenAI-compatible chat-completions server on 127.0.0.1 (see module docstring).

    Fault knobs may be changed at any time from any thread; plain attributes (``garbage``,
    ``reject_json_schema``, ``reject_response_format``, ``reject_seed``, ``omit_usage``) are read
    once per request.

    Each chat request is counted and recorded on arrival, then answered by the first rule that
    applies: wrong API key -> 401; a pending ``fail_next`` -> that status; a pending
    ``malformed_body_next`` -> 200 with a non-JSON body; invalid JSON / missing model or messages /
    ``stream`` / rejected ``response_format`` or ``seed`` -> 400; a random fault (one draw per
    request from ``random.Random(seed)``) -> 429, 500, garbage or a ``timeout_s`` delay; otherwise
    the scripted answer (garbage if ``garbage`` is set).  ``latency`` is added to every answer.
    Stats are updated when the answer is decided, i.e. also for answers a timed-out client never reads.
    Reply faults (``hang``, ``trickle_s``, ``empty_answer``, ``huge_answer_chars``, ``echo_authorization``,
    ``tricky_verdict``, ``error_in_body``, ``no_choices``) then change how a decided answer is delivered
    (see ``_reply_faults``).
    """

    def __init__(
        self,
        *,
        latency: float = 0.0,
        expected_api_key: str | None = None,
        seed: int = 0,
        host: str = "127.0.0.1",
        port: int = 0,
        verbose: bool = False,
    ) -> None:
        self.latency = float(latency)
        self.expected_api_key = expected_api_key
        self.seed = seed
        self.host = host
        self.verbose = verbose
        self._requested_port = port
        self._lock = threading.Lock()
        self._rng = random.Random(seed)
        self._stopping = threading.Event()
        self._httpd: _HTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._connections: set[socket.socket] = set()
        # fault state
        self.garbage = False
        self.reject_json_schema = False
        self.reject_response_format = False
        self.reject_seed = False
        self.reject_temperature = False
        self.reasoning_only = False
        self.omit_usage = False
        # reply faults (see ``_reply_faults``)
        self.trickle_s = 0.0
        self.hang = False
        self.empty_answer = False
        self.cut_replies = False
        self.cut_reason = "length"  # the finish_reason of a cut reply (content_filter: a provider's filter)
        self.cut_agent = ""  # only this agent's replies are cut ("": every agent's)
        self.thinking_tokens = 0  # Gemini-style: thinking tokens counted in total_tokens only
        self.error_in_body = False
        self.no_choices = False
        self.huge_answer_chars = 0
        self.echo_authorization = False
        self.served_model = ""  # the model the replies say answered ("": the one asked)
        self.tricky_verdict = False
        self.trickle_headers_s = 0.0
        self.usage_override: dict = {}
        self.raw_reply: bytes | None = None  # the body of every 200 answer, as it is
        self.raw_content_type = "application/json"  # the Content-Type of ``raw_reply``
        # path -> (status, Location): POSTs to the path are answered with that redirect (counted in ``redirected``)
        self.redirects: dict[str, tuple[int, str]] = {}
        self.redirected = 0
        self._fail_queue: list[tuple[int, float | str | None, dict | None, str]] = []
        self._malformed_left = 0
        self._rates = (0.0, 0.0, 0.0, 0.0)
        self._timeout_s = 5.0
        self._validator_fails = 0
        self._validator_seen = 0
        # records
        self.received: list[dict] = []
        self.headers_seen: list[dict] = []
        self._init_stats()
        self._init_pipeline_faults()

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> ScriptedLLMServer:
        if self._httpd is not None:
            return self
        self._stopping.clear()
        httpd = _HTTPServer((self.host, self._requested_port), _Handler)
        httpd.owner = self
        self._httpd = httpd
        self._thread = threading.Thread(
            target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, name="scripted-llm", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        httpd, self._httpd = self._httpd, None
        if httpd is None:
            return
        self._stopping.set()  # wakes handlers sleeping on latency / timeout faults
        httpd.shutdown()
        httpd.server_close()
        with self._lock:
            conns = list(self._connections)
        for conn in conns:  # unblock keep-alive handler threads waiting for the next request
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def __enter__(self) -> ScriptedLLMServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def port(self) -> int:
        if self._httpd is None:
            raise RuntimeError("server is not running")
        return self._httpd.server_address[1]

    @property
    def base_url(self) -> str:
        host = "127.0.0.1" if self.host in ("", "0.0.0.0") else self.host
        return f"http://{host}:{self.port}/v1"

    def _track(self, conn: socket.socket, *, add: bool) -> None:
        with self._lock:
            if add:
                self._connections.add(conn)
            else:
                self._connections.discard(conn)

    # -- fault injection -----------------------------------------------------------------------

    def fail_next(self, n: int, status: int = 429, retry_after: float | str | None = None,
                  error: dict | None = None, agent: str = "") -> None:
        """The next ``n`` chat requests (after the API-key check) get ``status`` with an error body.

        ``retry_after``: a ``Retry-After`` header, seconds or a text sent as it is (an HTTP date);
        ``error``: this body (e.g. :func:`error_body` with a provider's code) instead of the generic one;
        ``agent``: only that agent's requests fail (``""``: any request).
        """
        with self._lock:
            self._fail_queue.extend([(int(status), retry_after, error, agent)] * int(n))

    def fault_rates(
        self,
        p429: float = 0.0,
        p500: float = 0.0,
        p_garbage: float = 0.0,
        p_timeout: float = 0.0,
        timeout_s: float = 5.0,
    ) -> None:
        """Random faults per request, drawn from ``random.Random(seed)`` (one draw per request)."""
        rates = (float(p429), float(p500), float(p_garbage), float(p_timeout))
        if any(p < 0 for p in rates) or sum(rates) > 1.0 + 1e-9:
            raise ValueError("fault probabilities must be >= 0 and sum to at most 1")
        with self._lock:
            self._rates = rates
            self._timeout_s = float(timeout_s)

    def malformed_body_next(self, n: int) -> None:
        """The next ``n`` chat answers are HTTP 200 with a body that is not JSON."""
        with self._lock:
            self._malformed_left += int(n)

    @property
    def validator_fails(self) -> int:
        return self._validator_fails

    @validator_fails.setter
    def validator_fails(self, n: int) -> None:
        """Setting N makes the next N validator answers ``VALIDATION FAILED`` (counter restarts)."""
        with self._lock:
            self._validator_fails = int(n)
            self._validator_seen = 0

    def clear_faults(self) -> None:
        """Drop every pending / configured fault (does not touch stats or records)."""
        with self._lock:
            self._fail_queue.clear()
            self._malformed_left = 0
            self._rates = (0.0, 0.0, 0.0, 0.0)
            self._validator_fails = 0
            self._validator_seen = 0
        self.garbage = self.reject_json_schema = self.reject_response_format = False
        self.reject_seed = self.omit_usage = self.reject_temperature = self.reasoning_only = False
        self.trickle_s, self.huge_answer_chars = 0.0, 0
        self.hang = self.empty_answer = self.echo_authorization = self.tricky_verdict = False
        self.served_model = ""
        self.error_in_body = self.no_choices = self.cut_replies = False
        self.cut_reason, self.cut_agent, self.thinking_tokens = "length", "", 0
        self.trickle_headers_s, self.usage_override, self.redirects, self.raw_reply = 0.0, {}, {}, None
        self.raw_content_type = "application/json"
        self._init_pipeline_faults()

    # -- stats --------------------------------------------------------------------------------

    def _init_stats(self) -> None:
        self._requests = 0
        self._ok = 0
        self._errors = 0
        self._prompt_tokens = 0
        self._completion_tokens = 0
        self._by_agent: Counter[str] = Counter()
        self._by_status: Counter[int] = Counter()
        self._faults: Counter[str] = Counter()
        self._in_flight = 0
        self._max_in_flight = 0

    def _in_flight_change(self, delta: int) -> None:
        with self._lock:
            self._in_flight += delta
            self._max_in_flight = max(self._max_in_flight, self._in_flight)

    def stats(self) -> dict:
        """A snapshot: requests, ok, errors, prompt_tokens, completion_tokens, by_agent, by_status, faults."""
        with self._lock:
            return {
                "requests": self._requests,
                "ok": self._ok,
                "errors": self._errors,
                "prompt_tokens": self._prompt_tokens,
                "completion_tokens": self._completion_tokens,
                "total_tokens": self._prompt_tokens + self._completion_tokens,
                "by_agent": dict(self._by_agent),
                "by_status": dict(self._by_status),
                "faults": dict(self._faults),
                "max_in_flight": self._max_in_flight,
            }

    def reset_stats(self) -> None:
        """Zero the counters and clear ``received`` / ``headers_seen`` (faults are kept)."""
        with self._lock:
            self._init_stats()
            self.received.clear()
            self.headers_seen.clear()

    # -- request handling -----------------------------------------------------------------------

    def _authorized(self, authorization: str | None) -> bool:
        if self.expected_api_key is None:
            return True
        return authorization == f"Bearer {self.expected_api_key}"

    def _auth_error(self) -> dict:
        return error_body("Incorrect API key provided.", "invalid_request_error", "invalid_api_key")

    def _handle_chat(self, raw: bytes, headers: _Headers) -> _Reply:
        try:
            body = json.loads(raw.decode("utf-8"))
            parse_error = None if isinstance(body, dict) else "request body must be a JSON object"
        except (UnicodeDecodeError, ValueError) as exc:
            body, parse_error = None, f"could not parse the JSON body of your request ({exc})"
        agent = detect_agent(body) if isinstance(body, dict) else "unknown"
        record = dict(body) if isinstance(body, dict) else {"_raw": raw.decode("utf-8", "replace")}
        record["_agent"] = agent
        with self._lock:
            self._requests += 1
            self._by_agent[agent] += 1
            self.received.append(record)
            self.headers_seen.append(headers)
        reply = self._decide(body, parse_error, agent, headers)
        reply = self._reply_faults(reply, agent, headers)
        reply.delay += self.latency
        self._account(reply, agent)
        return reply

    def _decide(self, body: Any, parse_error: str | None, agent: str, headers: _Headers) -> _Reply:
        if not self._authorized(headers.get("authorization")):
            return _Reply(401, self._auth_error())
        with self._lock:
            mine = [i for i, failure in enumerate(self._fail_queue) if failure[3] in ("", agent)]
            injected = self._fail_queue.pop(mine[0])[:3] if mine else None
            malformed = False
            if injected is None and self._malformed_left > 0:
                self._malformed_left -= 1
                malformed = True
        if injected is not None:
            status, retry_after, error = injected
            extra = {"Retry-After": _fmt_seconds(retry_after)} if retry_after is not None else {}
            self._note_fault(f"fail_{status}")
            return _Reply(status, error or _status_error(status), headers=extra)
        if malformed:
            self._note_fault("malformed")
            return _Reply(200, raw=MALFORMED_BODY)
        if parse_error:
            return _Reply(400, error_body(parse_error, "invalid_request_error", None))
        invalid = self._validate(body)
        if invalid is not None:
            return invalid
        fault = self._draw_fault()
        if fault in ("429", "500"):
            self._note_fault(f"random_{fault}")
            return _Reply(int(fault), _status_error(int(fault)))
        delay = 0.0
        if fault == "timeout":
            self._note_fault("timeout")
            delay = self._timeout_s
        garbage = self.garbage or fault == "garbage"
        if garbage:
            self._note_fault("garbage")
        return _Reply(200, self._completion(body, agent, garbage), delay=delay)

    def _reply_faults(self, reply: _Reply, agent: str, headers: _Headers) -> _Reply:
        """Misbehaviour of a reachable server, applied to a decided answer.

        ``hang``: accept the request, never answer. ``trickle_s``: send the body one byte every
        ``trickle_s`` seconds. ``trickle_headers_s``: send the status line and headers one byte every
        ``trickle_headers_s`` seconds. ``usage_override``: these ``usage`` fields in every 200 answer;
        ``raw_reply``: this body instead (``raw_content_type``).
        On a 200 answer: ``empty_answer`` -> empty content; ``huge_answer_chars``
        -> the content padded to that many characters; ``echo_authorization`` -> the request's
        Authorization header appended to the content (also JSON- and URL-escaped), its key as the fingerprint;
        ``cut_replies`` -> half the content, finish_reason ``cut_reason`` ("length"), for ``cut_agent`` or all;
        ``thinking_tokens`` -> that many more tokens in ``total_tokens`` only (as Gemini counts its thoughts);
        ``tricky_verdict`` -> a validator answer that fails but mentions "VALIDATION PASSED" later in its
        first line; ``error_in_body`` -> an error object in place of the completion (as some proxies send
        with status 200); ``no_choices`` -> a completion whose ``choices`` list is empty.
        """
        if self.hang:
            self._note_fault("hang")
            reply.hang = True
            return reply
        if self.trickle_s > 0:
            self._note_fault("trickle")
            reply.trickle = float(self.trickle_s)
        if self.trickle_headers_s > 0:
            self._note_fault("trickle_headers")
            reply.trickle_head = float(self.trickle_headers_s)
        if reply.status != 200 or not reply.payload:
            return reply
        if self.raw_reply is not None:
            self._note_fault("raw_reply")
            reply.raw = self.raw_reply
            reply.headers["Content-Type"] = self.raw_content_type
            return reply
        if self.error_in_body:
            self._note_fault("error_in_body")
            reply.payload = error_body("upstream provider overloaded", "server_error", None)
            return reply
        if self.no_choices:
            self._note_fault("no_choices")
            reply.payload["choices"] = []
            return reply
        message = reply.payload["choices"][0]["message"]
        content = message.get("content") or ""
        if self.tricky_verdict and agent == "validator":
            self._note_fault("tricky_verdict")
            content = ("VALIDATION FAILED: the annotation would only be VALIDATION PASSED if the cited markers "
                       "were lineage-defining.\nFeedback: re-check the markers.")
        if self.echo_authorization:
            self._note_fault("echo_authorization")
            authorization = headers.get("authorization", "")
            token = authorization.split()[-1] if authorization else ""
            escaped = "".join(f"\\u{ord(c):04x}" for c in token[:2]) + token[2:]
            basic = base64.b64encode(f"user:{token}".encode()).decode()
            content += (f"\nDebug: Authorization: {authorization}; as JSON \"{escaped}\"; "
                        f"in a URL ?key={urllib.parse.quote(token, safe='')}; upstream: Basic {basic}; "
                        f"as HTML {''.join(f'&#{ord(c)};' for c in token)}; hex {token.encode().hex()}; "
                        f"shouted {token.upper()}; wrapped {token[:8]}\n{token[8:]}")
            reply.payload["system_fingerprint"] = f"fp_{token}"
        if self.huge_answer_chars:
            self._note_fault("huge")
            filler = " lorem ipsum"
            content += "\n" + filler * max(0, (self.huge_answer_chars - len(content)) // len(filler))
        if self.empty_answer:
            self._note_fault("empty")
            content = ""
        if self.cut_replies and self.cut_agent in ("", agent):  # the token limit (or a filter) halfway through
            self._note_fault("cut")
            content = content[: len(content) // 2]
            reply.payload["choices"][0]["finish_reason"] = self.cut_reason
        message["content"] = content
        usage = reply.payload.get("usage")
        if usage:
            usage["completion_tokens"] = count_words(content)
            usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"] + self.thinking_tokens
            if self.thinking_tokens:
                usage["completion_tokens_details"] = {"reasoning_tokens": self.thinking_tokens}
            if self.usage_override:
                self._note_fault("usage_override")
                usage.update(self.usage_override)
        return reply

    def _validate(self, body: dict) -> _Reply | None:
        def bad(message: str, param: str | None, code: str | None = None) -> _Reply:
            return _Reply(400, error_body(message, "invalid_request_error", code, param))

        if not isinstance(body.get("model"), str) or not body["model"]:
            return bad("you must provide a model parameter", "model", "missing_required_parameter")
        msgs = body.get("messages")
        if not isinstance(msgs, list) or not msgs:
            return bad("'messages' must be a non-empty array", "messages", "missing_required_parameter")
        if body.get("stream"):
            return bad(
                "stream=true is not supported by the scripted server", "stream", "unsupported_parameter"
            )
        rf = body.get("response_format")
        if rf is not None:
            rf_type = rf.get("type") if isinstance(rf, dict) else None
            if self.reject_response_format:
                return bad(
                    "response_format is not supported by this model",
                    "response_format",
                    "unsupported_parameter",
                )
            if rf_type == "json_schema" and self.reject_json_schema:
                return bad(
                    "Invalid parameter: 'response_format' of type 'json_schema' is not supported "
                    "with this model",
                    "response_format",
                    "unsupported_parameter",
                )
            if rf_type not in ("text", "json_object", "json_schema"):
                return bad(
                    f"Invalid value for 'response_format.type': {rf_type!r}",
                    "response_format.type",
                    "invalid_value",
                )
        if self.reject_temperature and body.get("temperature", 1) != 1:
            return bad(
                "Unsupported value: 'temperature' does not support 0 with this model. Only the default (1) "
                "value is supported.",
                "temperature",
            )
        if self.reject_seed and "seed" in body:
            return bad(
                "Unsupported parameter: 'seed' is not supported with this model",
                "seed",
                "unsupported_parameter",
            )
        return None

    def _draw_fault(self) -> str | None:
        with self._lock:
            p429, p500, p_garbage, p_timeout = self._rates
            if p429 + p500 + p_garbage + p_timeout <= 0:
                return None
            u = self._rng.random()
        for name, p in (("429", p429), ("500", p500), ("garbage", p_garbage), ("timeout", p_timeout)):
            if u < p:
                return name
            u -= p
        return None

    def _note_fault(self, name: str) -> None:
        with self._lock:
            self._faults[name] += 1

    def _completion(self, body: dict, agent: str, garbage: bool) -> dict:
        if garbage:
            content = garbage_answer(body)
        elif agent in PIPELINE_AGENTS:
            content = self.pipeline_answer(body, agent)
        elif agent == "validator":
            with self._lock:
                fail = self._validator_seen < self._validator_fails
                self._validator_seen += 1
            content = styled_validator(body, validator_answer(body, fail), self.reply_styles)
            if "unusable_checks" in self.reply_styles:
                content = garbage_answer(body)
        elif agent == "formatter" or _wants_json(body):
            content = formatter_answer(body)
        else:  # annotator and unknown
            content = self.fixed_annotator(body) or self.disagreeing_annotator(body) or annotator_answer(body)
        digest = hashlib.sha256(_canonical_json(body).encode()).hexdigest()[:24]
        payload: dict[str, Any] = {
            "id": f"chatcmpl-{digest}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": self.served_model or body["model"],
            "choices": [
                {
                    "index": 0,
                    "message": (
                        {"role": "assistant", "content": None, "reasoning_content": f"<think>hmm</think>{content}"}
                        if self.reasoning_only
                        else {"role": "assistant", "content": content, "refusal": None}
                    ),
                    "logprobs": None,
                    "finish_reason": "stop",
                }
            ],
            "system_fingerprint": "fp_scripted",
        }
        if not self.omit_usage:
            prompt, completion = prompt_token_count(body), count_words(content)
            payload["usage"] = {
                "prompt_tokens": prompt,
                "completion_tokens": completion,
                "total_tokens": prompt + completion,
            }
        return payload

    def _account(self, reply: _Reply, agent: str) -> None:
        usage = reply.payload.get("usage") if reply.status == 200 and reply.payload else None
        with self._lock:
            self._by_status[reply.status] += 1
            if reply.status == 200:
                self._ok += 1
                if usage and not self.usage_override:
                    self._prompt_tokens += usage["prompt_tokens"]
                    self._completion_tokens += usage["completion_tokens"]
            else:
                self._errors += 1


def _wants_json(body: dict) -> bool:
    """An unknown agent asked for JSON mode: answer with the formatter JSON, as a real model would."""
    rf = body.get("response_format")
    return (
        detect_agent(body) == "unknown"
        and isinstance(rf, dict)
        and rf.get("type") in ("json_object", "json_schema")
    )


def _fmt_seconds(value: float | str) -> str:
    if isinstance(value, str):
        return value
    return str(int(value)) if float(value).is_integer() else str(value)


# --------------------------------------------------------------------------- command line


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Run the scripted OpenAI-compatible LLM server.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8765, help="0 picks a free port")
    parser.add_argument("--latency", type=float, default=0.0, help="seconds slept before each answer")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--api-key", default=None, help="require this bearer key (401 otherwise)")
    parser.add_argument("--p429", type=float, default=0.0)
    parser.add_argument("--p500", type=float, default=0.0)
    parser.add_argument("--p-garbage", type=float, default=0.0)
    parser.add_argument("--p-timeout", type=float, default=0.0)
    parser.add_argument("--timeout-s", type=float, default=5.0)
    parser.add_argument("--validator-fails", type=int, default=0)
    parser.add_argument("--verbose", action="store_true", help="log every request")
    args = parser.parse_args(argv)

    srv = ScriptedLLMServer(
        latency=args.latency,
        expected_api_key=args.api_key,
        seed=args.seed,
        host=args.host,
        port=args.port,
        verbose=args.verbose,
    )
    srv.fault_rates(
        p429=args.p429,
        p500=args.p500,
        p_garbage=args.p_garbage,
        p_timeout=args.p_timeout,
        timeout_s=args.timeout_s,
    )
    srv.validator_fails = args.validator_fails
    srv.start()
    host = srv.host if srv.host not in ("0.0.0.0", "") else "127.0.0.1"
    print(f"http://{host}:{srv.port}/v1", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        srv.stop()
        print(json.dumps(srv.stats()), file=sys.stderr, flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
