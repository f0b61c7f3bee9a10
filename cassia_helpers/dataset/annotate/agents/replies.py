"""Reading the agents' machine-read answers: the validator's verdict, the scorer's score, the merger's
groupings and the boost agent's conclusion.

Where the server accepts it, the answer is asked for as structured output (a JSON schema, else JSON mode, the
same fallbacks as the formatter's, remembered per endpoint and model); whatever comes back is read tolerantly,
because real models deviate from the format they are given: a verdict on the last line instead of the first,
a score as ``Score: 85/100`` or ``85 out of 100`` or JSON, groupings under another key. Every label read here
goes through :func:`~cassia_helpers.dataset.annotate.llm.untrusted.sanitize_label`.
"""

from __future__ import annotations

import ast
import json
import re
from collections.abc import Callable
from typing import TYPE_CHECKING

from cassia_helpers.dataset.annotate.llm.untrusted import sanitize_label

if TYPE_CHECKING:  # the LLM client (and openai) is imported only when an agent asks
    from cassia_helpers.dataset.annotate.llm.client import ChatAnswer, LLMClient

THINKING = re.compile(r"<think>.*?</think>", re.DOTALL | re.IGNORECASE)
THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
LEVELS = ("broad", "detailed", "fine")


def without_thinking(text: str | None) -> str:
    """A reply without a reasoning model's thoughts: every ``<think>...</think>`` block; everything before a
    lone ``</think>`` (a chat template that opened the block itself, as served R1 distills do); everything from
    a ``<think>`` never closed (a reply cut off while thinking). The thoughts may name other cell types, scores
    and verdicts: only what follows them is the answer."""
    text = THINKING.sub("", text or "")
    lower = text.lower()
    if THINK_CLOSE in lower:
        text = text[lower.rindex(THINK_CLOSE) + len(THINK_CLOSE):]
        lower = text.lower()
    if THINK_OPEN in lower:
        text = text[:lower.index(THINK_OPEN)]
    return text


def _schema(name: str, properties: dict) -> dict:
    return {"type": "json_schema", "json_schema": {"name": name, "strict": True, "schema": {
        "type": "object", "properties": properties, "required": list(properties), "additionalProperties": False}}}


VERDICT_SCHEMA = _schema("validation", {
    "verdict": {"type": "string", "enum": ["VALIDATION PASSED", "VALIDATION FAILED"]},
    "feedback": {"type": "string"}})
SCORE_SCHEMA = _schema("quality_score", {"reasoning": {"type": "string"}, "score": {"type": "integer"}})
GROUPINGS_SCHEMA = _schema("merged_groupings", {"groupings": {"type": "array", "items": {
    "type": "object", "properties": {k: {"type": "string"} for k in ("cluster", *LEVELS)},
    "required": ["cluster", *LEVELS], "additionalProperties": False}}})
# Said to the model in JSON mode, which (unlike a schema) carries no shape of its own.
JSON_SHAPES = {
    "validation": '{"verdict": "VALIDATION PASSED" or "VALIDATION FAILED", "feedback": "..."}',
    "quality_score": '{"reasoning": "...", "score": <whole number 0-100>}',
    "merged_groupings": '{"groupings": [{"cluster": "<id>", "broad": "...", "detailed": "...", "fine": "..."}]}',
}


def structured_chat(client: LLMClient, messages: list[dict], *, schema: dict, cluster: str, agent: str,
                    accept: Callable[[str], bool] | None = None) -> ChatAnswer:
    """One logical call asking for ``schema`` (a ``json_schema`` response format), then JSON mode, then
    plain text, each only where the endpoint has not refused it before (a refusal is remembered)."""
    from cassia_helpers.dataset.annotate.llm.client import RequestRejected

    # JSON mode needs the shape (and the word JSON) in the instructions: added to the system message, which
    # some servers accept only first
    hint = f"\n\nReply with one JSON object only: {JSON_SHAPES[schema['json_schema']['name']]}"
    first = messages[0] if messages and messages[0].get("role") == "system" else None
    in_json = ([dict(first, content=f"{first['content']}{hint}"), *messages[1:]] if first is not None
               else [{"role": "system", "content": hint.strip()}, *messages])
    for feature, response_format, sent in (("json_schema", schema, messages),
                                           ("json_object", {"type": "json_object"}, in_json),
                                           ("prose", None, messages)):
        if response_format is not None and not client.supports(feature):
            continue
        try:
            return client.chat(sent, cluster=cluster, agent=agent, response_format=response_format, accept=accept)
        except RequestRejected as exc:
            if response_format is None:
                raise
            if exc.refused:  # remembered only when the endpoint refuses the format itself, not this request
                client.mark_unsupported(feature)
    raise AssertionError("unreachable: the plain-text request either answers or raises")


def json_candidates(text: str) -> list[str]:
    """Where a reply's JSON may be: the whole text, a fenced block, the first whole object in prose (with more
    prose after it, braces included), or the outermost ``{...}``."""
    candidates = [text, *re.findall(r"```(?:json)?\s*(\{.*?\})\s*```", text, flags=re.DOTALL)]
    start, end = text.find("{"), text.rfind("}")
    if 0 <= start < end:
        try:
            candidates.append(text[start:start + json.JSONDecoder().raw_decode(text[start:])[1]])
        except ValueError:
            pass
        candidates.append(text[start:end + 1])
    return candidates


_TRAILING_COMMA = re.compile(r",\s*([}\]])")


def loads_leniently(candidate: str) -> object:
    """JSON as small models write it too: strict JSON, else with trailing commas dropped, else a Python
    literal (single quotes, ``True``/``None``), read by :func:`ast.literal_eval` (literals only, never code).
    ``ValueError`` when none of them reads."""
    try:
        return json.loads(candidate)
    except ValueError:
        pass
    try:
        return json.loads(_TRAILING_COMMA.sub(r"\1", candidate))
    except ValueError:
        pass
    if len(candidate) > 20_000 or not candidate.lstrip().startswith(("{", "[")):
        raise ValueError("not JSON")
    try:
        return ast.literal_eval(candidate.strip())
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        raise ValueError("not JSON") from None


def json_object(text: str) -> object | None:
    """The JSON value of a reply (see :func:`json_candidates` and :func:`loads_leniently`)."""
    for candidate in json_candidates(without_thinking(text)):
        try:
            return loads_leniently(candidate)
        except ValueError:
            continue
    return None


# --------------------------------------------------------------------------- the validator's verdict

_VERDICT_WORD = re.compile(r"VALIDATION\W{0,3}(?:STATUS\W{0,3}|RESULT\W{0,3})?(PASSED|PASS|FAILED|FAIL)\b",
                           re.IGNORECASE)
# a line that is a verdict: optional markdown and a "Verdict:" / "Final verdict:" lead-in, then the verdict
_VERDICT_LINE = re.compile(r"^[\s*_#>`|-]*(?:(?:final\s+)?(?:verdict|decision|result|conclusion)\W{0,3})?"
                           r"VALIDATION\W{0,3}(?:STATUS\W{0,3}|RESULT\W{0,3})?(PASSED|PASS|FAILED|FAIL)\b",
                           re.IGNORECASE)
# a verdict line without the word VALIDATION: "**Verdict:** ✅ PASS", "Final decision - FAIL"
_BARE_VERDICT = re.compile(r"^[\s*_#>`|-]*(?:final\s+)?(?:verdict|decision)[\s*_]*[:\-][^A-Za-z\n]{0,8}"
                           r"(PASSED|PASS|FAILED|FAIL)\b", re.IGNORECASE | re.MULTILINE)
_JSON_VERDICT_KEYS = ("verdict", "validation", "result", "status", "decision", "validation_result")
_JSON_BOOL_KEYS = ("passed", "valid", "validated", "approved")


def _kind(word: str) -> str:
    return "passed" if word.upper().startswith("PASS") else "failed"


def verdict_words(text: str) -> set[str]:
    """The verdicts a reply names anywhere (``{"passed", "failed"}``, one of them, or none)."""
    return {_kind(w) for w in _VERDICT_WORD.findall(without_thinking(text))}


def read_verdict(text: str) -> bool | None:
    """The validator's verdict: ``True`` (passed), ``False`` (failed) or ``None`` (undetermined).

    Read from a JSON answer (``{"verdict": "VALIDATION PASSED"}``, ``{"passed": true}``), else from the
    first or the last non-empty line, or a line of its own that starts with the verdict. A reply that names
    both verdicts anywhere is undetermined, never passed ("VALIDATION FAILED: it would only be VALIDATION
    PASSED if ...").
    """
    text = without_thinking(text)
    data = json_object(text)
    if isinstance(data, dict):
        lowered = {str(k).lower(): v for k, v in data.items()}
        for key in _JSON_BOOL_KEYS:
            if isinstance(lowered.get(key), bool):
                return lowered[key]
        for key in _JSON_VERDICT_KEYS:
            value = str(lowered.get(key, "")).strip().upper()
            if value in ("PASSED", "PASS", "FAILED", "FAIL"):
                return value.startswith("PASS")
            kinds = {_kind(w) for w in _VERDICT_WORD.findall(value)}
            if len(kinds) == 1:
                return kinds == {"passed"}
    named = verdict_words(text)
    if not named:
        bare = {_kind(word) for word in _BARE_VERDICT.findall(text)}
        return bare == {"passed"} if len(bare) == 1 else None
    if len(named) != 1:
        return None
    lines = [line for line in text.splitlines() if line.strip()]
    if not lines:
        return None
    if (_VERDICT_WORD.search(lines[0]) or _VERDICT_WORD.search(lines[-1])
            or any(_VERDICT_LINE.match(line) for line in lines)):
        return named == {"passed"}
    return None


# --------------------------------------------------------------------------- the scorer's score

_NUMBER = r"([-+]?\d+(?:\.\d+)?)"
_SCORE_TAG = re.compile(rf"<score>\s*{_NUMBER}\s*(?:/\s*100\s*)?</score>", re.IGNORECASE)
_SCORE_WORD = r"\b(?:score|rating)\b"
_SCORE_FORMS = (  # (pattern, scale): the last match of the first form found counts
    (re.compile(rf"{_NUMBER}\s*(?:/|out\s+of)\s*100\b", re.IGNORECASE), 1.0),
    (re.compile(rf"{_SCORE_WORD}[^0-9\n+-]{{0,30}}{_NUMBER}\s*(?:/|out\s+of)\s*10\b(?!\s*\d)", re.IGNORECASE), 10.0),
    (re.compile(rf"{_SCORE_WORD}[^0-9\n+-]{{0,30}}{_NUMBER}\s*%", re.IGNORECASE), 1.0),
    # "Score: 85", "**Score**: 85", "Final score - 85", "score of 85"
    (re.compile(rf"{_SCORE_WORD}(?:\s+(?:is|of))?[\s*_]*[:=\-\u2013]?[\s*_]*{_NUMBER}\b(?!\s*(?:/|out\s+of|%))",
                re.IGNORECASE), 1.0),
)
_JSON_SCORE_KEYS = ("score", "quality_score", "final_score", "rating")
_REASONING_TAG = re.compile(r"<reasoning>(.*?)</reasoning>", re.IGNORECASE | re.DOTALL)


def read_score(text: str) -> tuple[float | None, str, str]:
    """``(score, reasoning, problem)`` of a scorer's reply; ``score`` is ``None`` and ``problem`` says why
    when no valid score (a number within 0-100) is found.

    Read from ``<score>85</score>``, a JSON answer (``{"score": 85}``), ``85/100``, ``85 out of 100``,
    ``Score: 8.5/10``, ``Rating: 9/10``, ``Score: 85%``, ``**Score**: 85`` or ``Final score - 85``; a
    fraction below 1 (``0.85``) is a share of 100.
    """
    text = without_thinking(text)
    value: float | None = None
    shown = ""
    reasoning = ""
    data = json_object(text)
    if isinstance(data, dict):
        lowered = {str(k).lower(): v for k, v in data.items()}
        reasoning = str(lowered.get("reasoning") or lowered.get("justification") or "")
        for key in _JSON_SCORE_KEYS:
            raw = lowered.get(key)
            if isinstance(raw, int | float) and not isinstance(raw, bool):
                value, shown = float(raw), str(raw)
                break
            if isinstance(raw, str) and re.fullmatch(rf"\s*{_NUMBER}\s*(?:/\s*100)?\s*", raw):
                value, shown = float(re.match(rf"\s*{_NUMBER}", raw).group(1)), raw.strip()
                break
    if value is None:
        tags = _SCORE_TAG.findall(text)
        if tags:
            value, shown = float(tags[-1]), tags[-1]
    if value is None:
        for pattern, scale in _SCORE_FORMS:
            found = pattern.findall(text)
            if found:
                value, shown = float(found[-1]) * scale, found[-1]
                break
    if not reasoning:
        match = _REASONING_TAG.search(text)
        reasoning = match.group(1) if match else _SCORE_TAG.sub("", text)
    reasoning = reasoning.strip()
    if value is None:
        return None, reasoning, "no <score> was given"
    if 0 < value < 1 and "." in shown:  # a share, as models scoring 0-1 write it (0.88), as for confidences
        value *= 100
    if not 0 <= value <= 100:
        return None, reasoning, f"the score {shown} is outside 0-100"
    return value, reasoning, ""


# --------------------------------------------------------------------------- the merger's groupings

_CLUSTER_KEYS = ("cluster", "cluster_id", "clusterid", "id", "cluster_name", "name")


def _levels(entry: object) -> list[str] | None:
    """``[broad, detailed, fine]`` of one grouping entry (a dict with those keys or keys containing them,
    or a list of three labels), sanitised; ``None`` when a level is missing."""
    if isinstance(entry, list | tuple):
        values = list(entry)[:3]
    elif isinstance(entry, dict):
        lowered = {str(k).lower(): v for k, v in entry.items()}
        values = []
        for number, level in enumerate(LEVELS, start=1):
            key = next((k for k in lowered if level in k or k in (f"level_{number}", f"level{number}",
                                                                   f"merged_grouping_{number}")), None)
            values.append(lowered.get(key) if key else None)
    else:
        return None
    labels = [sanitize_label(v) if isinstance(v, str | int | float) and not isinstance(v, bool) else ""
              for v in values]
    return labels if len(labels) == 3 and all(labels) else None


def _entries(data: object, wanted: set[str], depth: int = 0) -> dict[str, list[str]]:
    """Groupings found anywhere in a JSON value: lists of entries naming their cluster, or a mapping
    ``cluster -> entry``; under ``groupings`` or any other key."""
    found: dict[str, list[str]] = {}
    if depth > 4:
        return found
    if isinstance(data, list):
        for entry in data:
            if isinstance(entry, dict):
                lowered = {str(k).lower(): v for k, v in entry.items()}
                key = next((k for k in _CLUSTER_KEYS if k in lowered), None)
                cluster = str(lowered[key]).strip() if key else ""
                cluster = re.sub(r"^cluster\s+", "", cluster, flags=re.IGNORECASE)
                levels = _levels(entry)
                if cluster in wanted and levels:
                    found.setdefault(cluster, levels)
                    continue
            found.update({k: v for k, v in _entries(entry, wanted, depth + 1).items() if k not in found})
    elif isinstance(data, dict):
        for key, value in data.items():
            cluster = re.sub(r"^cluster\s+", "", str(key).strip(), flags=re.IGNORECASE)
            levels = _levels(value) if cluster in wanted else None
            if levels:
                found.setdefault(cluster, levels)
            else:
                found.update({k: v for k, v in _entries(value, wanted, depth + 1).items() if k not in found})
    return found


def read_groupings(text: str, clusters: list[str]) -> dict[str, list[str]]:
    """``cluster -> [broad, detailed, fine]`` for the clusters of ``clusters`` found in a reply (others left
    out), every label sanitised and capped like the calls."""
    return _entries(json_object(text), {str(c) for c in clusters})


# --------------------------------------------------------------------------- the boost's conclusion

_DONE = re.compile(r"FINAL\s+ANNOTATION\s+COMPLETED", re.IGNORECASE)
# the label on the line itself ([ \t], never across lines), or on the next ones (a code fence, a ranked list)
_FINAL = re.compile(r"FINAL[ \t]+(?:ANNOTATION|CELL[ \t]+TYPE|ANSWER)[ \t*_]*[:\-][ \t*_]*([^\n]*)", re.IGNORECASE)
_FENCE = re.compile(r"^\s*(```|~~~)\w*\s*$")
_LIST_MARK = re.compile(r"^\s*(?:\d{1,2}[.)]|[-*•])\s+")
# what follows a label on its line: the reasons for it ("B cell, based on MS4A1"), another sentence
_AFTER_LABEL = re.compile(
    r"(?:\s*[,;:(\u2013\u2014]\s*|\s+-\s+|\s+)(?:based on|because|given|due to|supported by|as (?:shown|evidenced|"
    r"indicated|suggested) by|indicated by|with (?:high|moderate|low|medium)\b|confidence\b).*$"
    r"|\.(?:\s.*)?$", re.IGNORECASE)


def final_annotation(text: str | None) -> str | None:
    """The cell type of the last ``FINAL ANNOTATION: <type>`` line of a reply (also ``**Final annotation:**``,
    ``Final cell type:``), ``None`` when there is none. A label put on the lines below (in a code fence, or the
    first of a ranked list) is read there; list numbering, a closing full stop and the reasons or sentences
    that follow the label on its line are not part of it."""
    lines = without_thinking(text).splitlines()
    found = None
    for i, line in enumerate(lines):
        match = _FINAL.search(line)
        if not match:
            continue
        rest = match.group(1)
        # "**CD8+ T cells** (cytotoxic)": the bold part is the label, what follows it a note
        rest = next((part for part in re.split(r"\*\*|__", rest) if part.strip(" *_`")), rest)
        if not rest.strip(" *_`"):
            rest = next((below for below in lines[i + 1:i + 6] if below.strip() and not _FENCE.match(below)), "")
        label = sanitize_label(_AFTER_LABEL.sub("", _LIST_MARK.sub("", sanitize_label(rest))))
        if label and not label.startswith("<") and not label.upper().startswith("COMPLETED"):
            found = label
    return found


def read_conclusion(text: str) -> str | None:
    """The boost agent's concluding cell type, or ``None`` when the reply does not conclude.

    Read from the last ``FINAL ANNOTATION: <type>`` line (also ``**Final annotation:** <type>``,
    ``Final cell type: <type>``) or a JSON answer with ``main_cell_type``; a reply that says ``FINAL
    ANNOTATION COMPLETED`` without such a line concludes too (its prose goes to the formatter), as ``""``.
    """
    text = without_thinking(text)
    found = final_annotation(text)
    if found:
        return found
    data = json_object(text)
    if isinstance(data, dict) and sanitize_label(data.get("main_cell_type", "")):
        return sanitize_label(data["main_cell_type"])
    return "" if _DONE.search(text) else None


__all__ = ["GROUPINGS_SCHEMA", "SCORE_SCHEMA", "VERDICT_SCHEMA", "final_annotation", "json_object",
           "read_conclusion", "read_groupings",
           "read_score", "read_verdict", "structured_chat", "verdict_words"]
