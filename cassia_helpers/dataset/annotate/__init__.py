"""Cell-type annotation of clusters from their ranked marker genes.

Every annotator takes the same input (one :class:`ClusterMarkers` per cluster) and returns one
:class:`ClusterAnnotation` per cluster, so the offline reference annotator and the LLM agents are
interchangeable in the template notebook.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Protocol

UNKNOWN = "Unknown"
# Said wherever a dataset or run was annotated by the offline reference.
REFERENCE_NOTE = "The offline marker reference was used: no API calls were made."


@dataclass
class ClusterMarkers:
    """The ranked marker genes of one cluster, as sent to an annotator.

    ``genes`` is ranked best first (already filtered by adjusted p-value and log fold change).
    ``logfoldchanges``, ``pct_in`` and ``pct_out`` are aligned with ``genes`` (may be empty).
    """

    cluster: str
    genes: list[str]
    logfoldchanges: list[float] = field(default_factory=list)
    pct_in: list[float] = field(default_factory=list)
    pct_out: list[float] = field(default_factory=list)
    n_cells: int = 0


@dataclass
class ClusterAnnotation:
    """One cluster's call.

    ``status`` is ``"ok"`` for a real call and ``"unknown"`` when no valid answer was obtained;
    then ``main_cell_type`` is ``"Unknown"``, ``reason`` says why in words and ``reason_kind`` in one
    of :data:`REASON_KINDS` (empty for a real call).
    ``transcript`` holds the readable turns (``{"agent": ..., "content": ...}``) for the annotation text.

    The full pipeline adds: ``score`` (0-100 from the scoring agent, ``None`` when not scored) and
    ``score_reasoning``; ``boosted`` (the boost agent ran) and ``kept_answer`` (``"initial"`` or
    ``"boosted"``: the higher-scoring answer is kept) with ``boost_score``, and ``revised_from`` (the call
    a kept boosted answer replaced); ``consensus``, ``agreement``
    (fraction of runs agreeing with it), ``runners_up`` and ``disputed``; ``merged_groupings`` (broad,
    detailed, fine); ``notes`` (why a step left the earlier result in place).
    ``validated`` is ``True`` when the LLM validator confirmed the call, ``False`` when it did not (failed,
    or gave no readable verdict), ``None`` when no validator ran (the offline reference, or no call).
    """

    cluster: str
    main_cell_type: str
    sub_cell_types: list[str] = field(default_factory=list)
    mixed_cell_types: list[str] = field(default_factory=list)
    confidence: float = 0.0
    key_markers: list[str] = field(default_factory=list)
    reasoning: str = ""
    cell_ontology_id: str = ""  # proposed by the model; validated against the ontology before use
    status: str = "ok"
    reason: str = ""
    reason_kind: str = ""
    iterations: int = 0
    markers_sent: list[str] = field(default_factory=list)
    transcript: list[dict] = field(default_factory=list)
    input_tokens: int = 0
    output_tokens: int = 0
    score: float | None = None
    score_reasoning: str = ""
    boosted: bool = False
    kept_answer: str = ""
    boost_score: float | None = None
    revised_from: str = ""
    consensus: str = ""
    agreement: float | None = None
    runners_up: list[str] = field(default_factory=list)
    disputed: bool = False
    merged_groupings: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    validated: bool | None = None

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def unknown(cls, cluster: str, reason: str, markers_sent: list[str] | None = None,
                kind: str = "error") -> ClusterAnnotation:
        return cls(
            cluster=cluster,
            main_cell_type=UNKNOWN,
            status="unknown",
            reason=reason,
            reason_kind=kind,
            reasoning=f"No valid annotation: {reason}",
            markers_sent=list(markers_sent or []),
        )


# Why a cluster is Unknown. The first group means the service gave no usable answer: a dataset where
# most clusters end so is failed. The others are results: the model or the reference could not tell.
SERVICE_FAILURES = {
    "auth": "the model server refused the API key",
    "quota": "the account's quota or credits at the model server are exhausted",
    "no_key": "no API key is set (OPENAI_API_KEY) and the server requires one",
    "unreachable": "the model server could not be reached",
    "timeout": "the model server did not answer in time",
    "disconnected": "the model server closed the connection without answering",
    "budget": "the --max-cost budget was reached or cannot be enforced",
    "model_not_found": "the model server does not know the model",
    "endpoint_not_found": "the server has no chat completions endpoint at this address (check --base-url)",
    "redirect": "the model server redirected the requests elsewhere (not followed; check --base-url)",
    "certificate": "the model server's TLS certificate was refused",
    "server_error": "the model server answered with errors",
    "rate_limited": "the model server kept refusing with 429 Too Many Requests (its rate limit)",
    "unreadable": "the model server's replies were not chat completions",
    "rejected": "the model server rejected the requests",
    "invalid_answer": "the model's replies named no cell type",
    "error": "the annotator failed",
}
REASON_KINDS = (*SERVICE_FAILURES, "model_unknown", "no_match", "no_markers")
# The kind of Unknown that means the model's replies gave no usable answer (not "the model could not tell").
NO_ANSWER = "invalid_answer"


def annotation_failure(results: list[ClusterAnnotation]) -> str | None:
    """A one-line dataset-level reason when more than half of the clusters got no usable answer (any kind
    of :data:`SERVICE_FAILURES`: auth, no key, unreachable or silent server, budget, unknown model or
    address, server errors, unreadable replies, rejected requests, replies naming no cell type), else
    ``None``. Clusters the model or the reference honestly could not name do not count.

    The most frequent service cause is named, with one example of its per-cluster message.
    """
    failed = [r for r in results if r.status != "ok" and r.reason_kind in SERVICE_FAILURES]
    if not results or len(failed) * 2 <= len(results):
        return None
    kinds = [r.reason_kind for r in failed]
    kind = max(SERVICE_FAILURES, key=kinds.count)
    example = next(r.reason for r in failed if r.reason_kind == kind)
    example = " ".join(example.split())[:200]
    return (f"annotation failed for {len(failed)} of {len(results)} clusters: {SERVICE_FAILURES[kind]} "
            f"[{kind}] ({example})")


class Annotator(Protocol):
    """What the template notebook needs from an annotator."""

    name: str

    def annotate(
        self,
        clusters: list[ClusterMarkers],
        *,
        tissue: str,
        species: str,
        context: str = "",
    ) -> list[ClusterAnnotation]:
        """Return one annotation per input cluster, in the same order."""
        ...

    def describe(self) -> dict:
        """Provenance recorded in ``uns`` (annotator name, model, versions, ...)."""
        ...


__all__ = ["NO_ANSWER", "REASON_KINDS", "REFERENCE_NOTE", "SERVICE_FAILURES", "UNKNOWN", "Annotator",
           "ClusterAnnotation", "ClusterMarkers", "annotation_failure"]
