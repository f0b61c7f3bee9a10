"""The scoring agent: an independent 0-100 quality score, with its reasoning, for one cluster's call.

The score is the agent's judgement of the whole annotation (markers, reasoning, validation), separate from
the formatter's self-reported confidence. At most ``max_calls`` logical calls per cluster: a reply without a
valid score (outside 0-100) is sent back once with the problem stated; a reply without any score is not (an
unusable scorer costs one call per cluster, and the step's failure is said in the dataset's warnings). The score is
asked for as structured output where the server accepts it, and read tolerantly
(:func:`~cassia_helpers.dataset.annotate.agents.replies.read_score`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from cassia_helpers.dataset.annotate import ClusterAnnotation, ClusterMarkers
from cassia_helpers.dataset.annotate.agents.replies import SCORE_SCHEMA, read_score, structured_chat
from cassia_helpers.dataset.annotate.llm.client import LLMClient, LLMError
from cassia_helpers.dataset.annotate.llm.untrusted import MAX_REASONING_CHARS, sanitize_label

SCORER_SYSTEM = """You are the scoring agent of a cell-type annotation team. You judge the work of the \
other agents on one cluster of a single-cell RNA-seq dataset. Weigh: is the call biologically right for \
these markers, species and tissue; does it use several markers rather than one; are higher ranked markers \
given more weight; was a likelier cell type or a mixture overlooked? Reply with your judgement inside \
<reasoning>...</reasoning>, then the quality score as a whole number from 0 (wrong or unusable) to 100 \
(correct and complete) inside <score>...</score>."""

@dataclass
class ScoreResult:
    """A score (``None`` when no valid one was obtained; ``reason`` says why) and the turns exchanged."""

    score: float | None
    reasoning: str = ""
    reason: str = ""
    turns: list[dict] = field(default_factory=list)


def parse_score(text: str) -> tuple[float | None, str, str]:
    """``(score, reasoning, problem)``: the score is ``None`` and ``problem`` non-empty when invalid
    (see :func:`~cassia_helpers.dataset.annotate.agents.replies.read_score` for the forms read)."""
    return read_score(text)


def _scored(text: str) -> bool:
    """A reply worth keeping in the cache: it gives a score, even an invalid one (it is asked again with
    the problem stated, and that exchange is cached too)."""
    score, _, problem = read_score(text)
    return score is not None or "outside" in problem


def _history(annotation: ClusterAnnotation) -> str:
    """The transcript the scorer reads: every agent turn, the formatter's reply replaced by the answer kept."""
    parts = [f"[{t.get('agent', 'turn')}]\n{str(t.get('content', '')).strip()}" for t in annotation.transcript
             if not str(t.get("agent", "")).startswith(("formatter", "scorer", "note"))]
    answer = {"main_cell_type": annotation.main_cell_type, "sub_cell_types": annotation.sub_cell_types,
              "mixed_cell_types": annotation.mixed_cell_types, "key_markers": annotation.key_markers,
              "reasoning": annotation.reasoning}
    parts.append(f"[structured answer]\n{json.dumps(answer, ensure_ascii=False)}")
    return "\n\n".join(parts)


def scoring_prompt(markers: ClusterMarkers, annotation: ClusterAnnotation, *, tissue: str, species: str,
                   context: str = "", history: str | None = None) -> str:
    """The user message of the scoring agent: cluster, markers, and the annotation to judge."""
    lines = [f"Species: {species}", f"Tissue: {tissue}", f"Cluster: {markers.cluster} ({markers.n_cells} cells)"]
    if context:
        lines.append(f"Context: {context}")
    lines.append(f"Ranked markers (best first): {', '.join(markers.genes)}")
    lines.append(f"Call to score: {annotation.main_cell_type}")
    lines.append("")
    lines.append("Annotation transcript:")
    lines.append(history if history is not None else _history(annotation))
    return "\n".join(lines)


def score_annotation(client: LLMClient, markers: ClusterMarkers, annotation: ClusterAnnotation, *,
                     tissue: str, species: str, context: str = "", max_calls: int = 2,
                     history: str | None = None, label: str = "scorer") -> ScoreResult:
    """Score one cluster's call with at most ``max_calls`` logical calls (each retried by the client).

    Raises nothing for a bad answer (``score`` is ``None`` with the reason); request failures
    (:class:`~cassia_helpers.dataset.annotate.llm.client.LLMError`, budget included) end the step the same way.
    """
    messages = [{"role": "system", "content": SCORER_SYSTEM},
                {"role": "user", "content": scoring_prompt(markers, annotation, tissue=tissue, species=species,
                                                           context=context, history=history)}]
    result = ScoreResult(None)
    problem = "not scored"
    for attempt in range(1, max(1, max_calls) + 1):
        try:
            reply = structured_chat(client, messages, schema=SCORE_SCHEMA, cluster=markers.cluster, agent="scorer",
                                    accept=_scored).content
        except LLMError as exc:
            result.reason = f"scoring request failed: {exc}"
            return result
        result.turns.append({"agent": f"{label} (call {attempt})", "content": reply})
        score, reasoning, problem = parse_score(reply)
        if score is not None:
            result.score, result.reasoning = score, sanitize_label(reasoning, max_chars=MAX_REASONING_CHARS)
            return result
        if not _scored(reply):
            break
        messages += [{"role": "assistant", "content": reply},
                     {"role": "user", "content": f"Your feedback: {problem}. Reply again with <reasoning>"
                                                 "...</reasoning> and a whole number from 0 to 100 in "
                                                 "<score>...</score>."}]
    result.reason = f"no valid score after {attempt} call{'s' if attempt > 1 else ''} ({problem})"
    return result


__all__ = ["SCORER_SYSTEM", "ScoreResult", "parse_score", "score_annotation", "scoring_prompt"]
