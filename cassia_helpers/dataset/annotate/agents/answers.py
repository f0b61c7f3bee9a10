"""The annotator's structured answer: read from JSON (whole, fenced or inside prose) or from its
``FINAL ANNOTATION:`` line, and normalised (labels sanitised, lists bounded, confidence on 0-100)."""

from __future__ import annotations

import math
import re

from cassia_helpers.dataset.annotate.agents.replies import (
    final_annotation,
    json_candidates,
    loads_leniently,
    without_thinking,
)
from cassia_helpers.dataset.annotate.llm.untrusted import MAX_REASONING_CHARS, sanitize_label

# The confidence of an answer that gives none as a number.
NO_CONFIDENCE = 50.0


def parse_answer(text: str) -> dict | None:
    """The structured answer from JSON, a fenced JSON block, a JSON object inside prose, or a
    ``FINAL ANNOTATION:`` line; ``None`` when no cell type can be found."""
    text = without_thinking(text)
    for candidate in json_candidates(text):
        try:
            data = loads_leniently(candidate)
        except ValueError:
            continue
        if isinstance(data, dict) and sanitize_label(data.get("main_cell_type", "")):
            return _normalise(data)
    label = final_annotation(text)  # the last one: an earlier one was a thought the annotator moved past
    if label:
        return _normalise({"main_cell_type": label, "confidence": None,
                           "reasoning": "Parsed from the annotator's final line."})
    return None


def _as_list(value) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        value = [v for v in re.split(r"[;,]", value)]
    elif not isinstance(value, list | tuple):
        value = [value]
    return [label for label in (sanitize_label(v) for v in value[:20]) if label]


def _confidence(value: object) -> float:
    """The model's 0-100 confidence: a number, or text holding one ("95%"); a fraction below 1 is read as a
    share (0.8 -> 80). Anything else (missing, NaN, true, "high") is :data:`NO_CONFIDENCE`, as the README says."""
    if isinstance(value, str):
        found = re.search(r"-?\d+(?:\.\d+)?", value)
        value = found.group() if found else None
    if isinstance(value, bool) or value is None:
        return NO_CONFIDENCE
    try:
        confidence = float(value)
    except (TypeError, ValueError):
        return NO_CONFIDENCE
    if not math.isfinite(confidence):
        return NO_CONFIDENCE
    if 0 < confidence < 1:
        confidence *= 100
    return max(0.0, min(100.0, confidence))


def _normalise(data: dict) -> dict:
    confidence = _confidence(data.get("confidence"))
    return {
        "main_cell_type": sanitize_label(data.get("main_cell_type", "")),
        "sub_cell_types": _as_list(data.get("sub_cell_types"))[:3],
        "mixed_cell_types": _as_list(data.get("mixed_cell_types")),
        "confidence": confidence,
        "key_markers": _as_list(data.get("key_markers")),
        "reasoning": sanitize_label(data.get("reasoning", ""), max_chars=MAX_REASONING_CHARS),
        # a proposal only: checked against the ontology before it is used (cassia_helpers.dataset.ontology)
        "cell_ontology_id": sanitize_label(data.get("cell_ontology_id", ""), max_chars=20),
    }


__all__ = ["NO_CONFIDENCE", "parse_answer"]
