"""Merging: one agent per dataset groups the clusters' calls into broad, detailed and fine levels.

At most ``max_calls`` logical calls per dataset (default 2: the second only to fill clusters the first reply
left out or could not be read). A cluster the agent never placed keeps its own call at every level, with the
reason in its ``notes``. :func:`merge_from_hierarchy` fills the same levels without an LLM (the reference
annotator's hook).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from cassia_helpers.dataset.annotate import UNKNOWN, ClusterAnnotation
from cassia_helpers.dataset.annotate.agents.replies import GROUPINGS_SCHEMA, read_groupings, structured_chat
from cassia_helpers.dataset.annotate.llm.untrusted import sanitize_label

if TYPE_CHECKING:  # the LLM client (and openai) is imported only when the merging agent is asked
    from cassia_helpers.dataset.annotate.llm.client import LLMClient

LEVELS = ("broad", "detailed", "fine")
MERGER_SYSTEM = """You are the merging agent of a cell-type annotation team. You receive every cluster's \
call for one single-cell RNA-seq dataset. Group the calls at three levels: broad (major lineages, e.g. \
immune, epithelial, stromal cells, or T cells / B cells / myeloid cells), detailed (cell types, e.g. CD8+ \
T cells, classical monocytes) and fine (the most specific state the call supports). Clusters with the same \
identity must get the same names. Reply with JSON only: {"groupings": [{"cluster": "<id>", "broad": "...", \
"detailed": "...", "fine": "..."}, ...]} with one entry for every cluster."""
MERGE_CLUSTER = "(dataset)"


def merging_prompt(results: list[ClusterAnnotation], *, tissue: str, species: str, only: set[str] | None = None) -> str:
    lines = [f"Species: {species}", f"Tissue: {tissue}", "Clusters:"]
    for r in results:
        if only is not None and r.cluster not in only:
            continue
        sub = f"; sub types: {', '.join(r.sub_cell_types)}" if r.sub_cell_types else ""
        lines.append(f"- cluster {r.cluster}: {r.main_cell_type}{sub}")
    return "\n".join(lines)


def parse_groupings(text: str, clusters: list[str]) -> dict[str, list[str]]:
    """``cluster -> [broad, detailed, fine]`` for the clusters found in a JSON reply (others left out), under
    ``groupings`` or another key (see :func:`~cassia_helpers.dataset.annotate.agents.replies.read_groupings`),
    every label sanitised and capped like the calls."""
    return read_groupings(text, clusters)


def _own_levels(r: ClusterAnnotation) -> list[str]:
    fine = r.sub_cell_types[0] if r.sub_cell_types else r.main_cell_type
    return [sanitize_label(x) for x in (r.main_cell_type, r.main_cell_type, fine)]


def merge_annotations(client: LLMClient, results: list[ClusterAnnotation], *, tissue: str, species: str,
                      max_calls: int = 2) -> list[ClusterAnnotation]:
    """Fill ``merged_groupings`` of every result (in place; also returned).

    Unknown clusters are not sent and get ``Unknown`` at every level. Request failures (budget included)
    leave the clusters not yet grouped with their own call, the reason in ``notes``.
    """
    from cassia_helpers.dataset.annotate.llm.client import LLMError

    known = [r for r in results if r.main_cell_type != UNKNOWN]
    for r in results:
        if r.main_cell_type == UNKNOWN:
            r.merged_groupings = [UNKNOWN] * 3
    pending = {r.cluster for r in known}
    placed: dict[str, list[str]] = {}
    problem = ""
    for _ in range(max(1, max_calls)):
        if not pending:
            break
        messages = [{"role": "system", "content": MERGER_SYSTEM},
                    {"role": "user", "content": merging_prompt(known, tissue=tissue, species=species,
                                                               only=None if not placed else pending)}]
        try:
            wanted = sorted(pending)
            reply = structured_chat(client, messages, schema=GROUPINGS_SCHEMA, cluster=MERGE_CLUSTER,
                                    agent="merger", accept=lambda text, w=wanted: bool(read_groupings(text, w))
                                    ).content
        except LLMError as exc:
            problem = f"merging request failed: {exc}"
            break
        found = parse_groupings(reply, sorted(pending))
        placed.update(found)
        pending -= set(found)
        problem = "the merging agent left this cluster out" if pending else ""
    for r in known:
        if r.cluster in placed:
            r.merged_groupings = placed[r.cluster]
        else:
            r.merged_groupings = _own_levels(r)
            r.notes.append(f"merging: {problem or 'not grouped'}; own call kept at every level")
    return results


def merge_from_hierarchy(results: list[ClusterAnnotation],
                         parent: Callable[[str], str | None]) -> list[ClusterAnnotation]:
    """Merging without an LLM: ``parent(label)`` gives a label's parent type (``None`` at the top).

    broad = the top ancestor of the call, detailed = the call, fine = its best sub type or the call. A sub type
    that is one share of a mixture (also named in ``mixed_cell_types``, ``Plasmacytoid dendritic cell (42% of
    cells)``) is not a call: the cluster was called at the common level because its cells split, so fine stays
    the call.
    """
    for r in results:
        if r.main_cell_type == UNKNOWN:
            r.merged_groupings = [UNKNOWN] * 3
            continue
        chain = [r.main_cell_type]
        while (up := parent(chain[-1])) and up not in chain and len(chain) < 10:
            chain.append(up)
        shares = {m.split(" (")[0] for m in r.mixed_cell_types}
        fine = r.sub_cell_types[0] if r.sub_cell_types and r.sub_cell_types[0] not in shares else r.main_cell_type
        r.merged_groupings = [sanitize_label(x) for x in (chain[-1], r.main_cell_type, fine)]
    return results


def fill_from_reference(results: list[ClusterAnnotation], reference) -> list[ClusterAnnotation]:
    """What the offline reference annotator can fill of the full pipeline's columns (in place).

    ``reference`` is a :class:`~..reference.catalog.MarkerReference` (``ReferenceAnnotator
    .reference``). ``score`` is the reference's own marker-match confidence (said so in ``score_reasoning``;
    not an LLM judgement) and the merged levels come from the reference's parent types. Boost, consensus
    and the agreement stay empty: they need an LLM.
    """
    for r in results:
        if r.main_cell_type != UNKNOWN:
            r.score = float(r.confidence)
            r.score_reasoning = "marker-match confidence of the offline reference (no LLM scoring)"
    return merge_from_hierarchy(results, lambda name: next(iter(reference.ancestors(name)), None))


__all__ = ["LEVELS", "MERGER_SYSTEM", "fill_from_reference", "merge_annotations", "merge_from_hierarchy",
           "merging_prompt", "parse_groupings"]
