"""Offline reference annotator, ranked-list route: match a cluster's ranked markers against the reference.

Used by :class:`~cassia_helpers.dataset.annotate.reference.annotator.ReferenceAnnotator` when it has no expression to
read (only the clusters' ranked marker lists).

Scoring, per candidate type ``T`` and cluster ``C``:

* each reference marker of ``T`` found among the cluster's genes contributes
  ``w(rank) * v(order) * s``, where ``w(rank) = 1 / (1 + rank / 10)`` rewards genes near the top of
  the cluster's list (rank 0 is the best marker), ``v(order) = 1 / (1 + order / 10)`` rewards the
  more specific markers of ``T`` (listed first), and ``s`` is a specificity factor
  ``(pct_in - pct_out) / pct_in`` clipped to ``[0.3, 1]`` when ``pct_in`` / ``pct_out`` are given
  (``1`` otherwise), so genes expressed as much outside the cluster as inside count little;
* only the ``N`` best contributions count, and their sum is divided by the best achievable sum for
  ``N`` markers (the type's first ``N`` markers as the cluster's first ``N`` genes), so a type does
  not win merely by having a long marker list. ``N`` is the number of the type's markers that
  appear anywhere in the dataset's marker lists (markers the dataset never reports are treated as
  not measured), clipped to ``[3, 6]``.

A type needs at least two matched markers and a score of 0.15 to be called; otherwise the cluster is
unknown. The best type becomes ``main_cell_type``, with two hierarchy rules: a descendant that scores
within 10 % of a general winner and has a matched marker of its own is preferred, and the call then
descends into a subtype while that subtype's own markers (those its ancestors do not list) score at
least 0.12 and twice as much as any sibling's. ``sub_cell_types`` are well-scoring descendants and
other same-lineage candidates within 75 % of the best score, ``mixed_cell_types`` the best candidate
of each other lineage within 75 % of it. Confidence grows with the best score and with its margin
over the best type that is neither an ancestor nor a descendant of the call.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from cassia_helpers.dataset.annotate import ClusterAnnotation, ClusterMarkers
from cassia_helpers.dataset.annotate.reference.catalog import MarkerReference, ReferenceCellType

#: rank at which a cluster gene's weight halves
RANK_SCALE = 10.0
#: position in a reference list at which a marker's weight halves
ORDER_SCALE = 10.0
#: at most this many matched markers count towards a score
TOP_N = 6
#: the score is normalised over at least this many markers
MIN_N = 3
#: below this score, or with fewer matched markers, the cluster is unknown
MIN_SCORE = 0.15
MIN_MATCHES = 2
#: a descendant within this fraction of a general winner's score is preferred
SPECIFIC_RATIO = 0.9
#: descend into a subtype when its own (not inherited) markers score at least this much ...
REFINE_MIN_SCORE = 0.12
#: ... and this many times the next subtype's
REFINE_RATIO = 2.0
#: sub / mixed cell types must reach this fraction of the best score
SUB_RATIO = 0.75
MIXED_RATIO = 0.75
#: floor of the pct_in / pct_out specificity factor
MIN_SPECIFICITY = 0.3
#: a score at or above this counts as full strength for the confidence
STRONG_SCORE = 0.6

@dataclass
class TypeScore:
    """How well one reference type matches one cluster."""

    cell_type: ReferenceCellType
    score: float
    matched: list[tuple[str, int]]  # (cluster gene, rank in cluster), best rank first

    @property
    def name(self) -> str:
        return self.cell_type.name


def _rank_weight(rank: int) -> float:
    return 1.0 / (1.0 + rank / RANK_SCALE)


def _order_weight(order: int) -> float:
    return 1.0 / (1.0 + order / ORDER_SCALE)


def _ideal(n: int) -> float:
    return sum(_rank_weight(i) * _order_weight(i) for i in range(n))


def _specificity(cluster: ClusterMarkers) -> list[float] | None:
    """Per-gene factor ``(pct_in - pct_out) / pct_in`` clipped to [0.3, 1], or None without pct data."""
    n = len(cluster.genes)
    if len(cluster.pct_in) != n or len(cluster.pct_out) != n or n == 0:
        return None
    out = []
    for p_in, p_out in zip(cluster.pct_in, cluster.pct_out, strict=True):
        try:
            p_in, p_out = float(p_in), float(p_out)
        except (TypeError, ValueError):
            out.append(1.0)
            continue
        if not (math.isfinite(p_in) and math.isfinite(p_out)):
            out.append(1.0)
            continue
        if p_in <= 0:
            out.append(MIN_SPECIFICITY)
            continue
        out.append(min(1.0, max(MIN_SPECIFICITY, (p_in - p_out) / p_in)))
    return out


class RankedScorer:
    """Scores reference types against clusters' ranked marker lists (see the module docstring)."""

    def __init__(self, reference: MarkerReference) -> None:
        self.reference = reference


    def _score_markers(
        self,
        markers: list[tuple[int, str]],
        rank: dict[str, int],
        spec: list[float] | None,
        species: str,
        universe: set[str],
    ) -> tuple[float, list[tuple[str, int]]]:
        """Normalised rank-weighted overlap of (order, symbol) markers with a cluster's ranked genes."""
        contributions: list[tuple[float, str, int]] = []
        observed = 0
        for order, symbol in markers:
            names = self.reference.alias_names(symbol, species)
            if any(n in universe for n in names):
                observed += 1
            hits = [(rank[n], n) for n in names if n in rank]
            if not hits:
                continue
            r, gene = min(hits)
            factor = spec[r] if spec is not None else 1.0
            contributions.append((_rank_weight(r) * _order_weight(order) * factor, gene, r))
        if not contributions:
            return 0.0, []
        n_norm = max(MIN_N, min(observed, TOP_N))
        contributions.sort(key=lambda t: -t[0])
        score = sum(c for c, _, _ in contributions[:n_norm]) / _ideal(n_norm)
        matched = sorted({(gene, r) for _, gene, r in contributions}, key=lambda t: t[1])
        return round(score, 4), matched

    def score_all(
        self,
        cluster: ClusterMarkers,
        candidates: list[ReferenceCellType],
        species: str,
        universe: set[str],
    ) -> list[TypeScore]:
        rank: dict[str, int] = {}
        for i, gene in enumerate(cluster.genes):
            rank.setdefault(gene, i)
        spec = _specificity(cluster)
        scores = []
        for ct in candidates:
            score, matched = self._score_markers(
                list(enumerate(ct.symbols(species))), rank, spec, species, universe
            )
            if matched:
                scores.append(TypeScore(ct, score, matched))
        # on equal scores the more general type comes first (refinement may then descend)
        scores.sort(key=lambda s: (-s.score, len(self.reference.ancestors(s.name)), s.name))
        return scores

    def _has_own_match(self, ts: TypeScore, species: str) -> bool:
        own: set[str] = set()
        for _, sym in self.reference.own_markers(ts.cell_type, species):
            own.update(self.reference.alias_names(sym, species))
        return any(gene in own for gene, _ in ts.matched)

    def _refine(
        self,
        best: TypeScore,
        cluster: ClusterMarkers,
        candidates: list[ReferenceCellType],
        species: str,
        universe: set[str],
    ) -> list[tuple[ReferenceCellType, float, list[tuple[str, int]]]]:
        """Descend from ``best`` into its subtypes while the markers that tell them apart clearly favour one.

        Returns the chain of (subtype, specific score, specific matches) chosen, outermost first.
        """
        rank: dict[str, int] = {}
        for i, gene in enumerate(cluster.genes):
            rank.setdefault(gene, i)
        spec = _specificity(cluster)
        chain: list[tuple[ReferenceCellType, float, list[tuple[str, int]]]] = []
        current = best.name
        while True:
            children = [ct for ct in candidates if ct.parent == current]
            if not children:
                return chain
            scored = []
            for ct in children:
                sc, matched = self._score_markers(
                    self.reference.telling_markers(ct, children, species), rank, spec, species, universe
                )
                scored.append((sc, ct.name, ct, matched))
            scored.sort(key=lambda t: (-t[0], t[1]))
            top_score, _, top_ct, top_matched = scored[0]
            runner_up = scored[1][0] if len(scored) > 1 else 0.0
            if top_score < REFINE_MIN_SCORE or top_score < REFINE_RATIO * runner_up:
                return chain
            chain.append((top_ct, top_score, top_matched))
            current = top_ct.name

    def annotate_one(
        self,
        cluster: ClusterMarkers,
        candidates: list[ReferenceCellType],
        species: str,
        universe: set[str],
    ) -> ClusterAnnotation:
        markers_sent = list(cluster.genes)
        # a type needs at least MIN_MATCHES matched markers to be called at all
        scores = [s for s in self.score_all(cluster, candidates, species, universe)
                  if len(s.matched) >= MIN_MATCHES]
        if not scores or scores[0].score < MIN_SCORE:
            return ClusterAnnotation.unknown(
                cluster.cluster, reason="no reference cell type matched the markers", markers_sent=markers_sent,
                kind="no_match")
        by_name = {s.name: s for s in scores}
        top = scores[0]
        best = top
        # 1. a more specific descendant that scores nearly as well as a general winner, with at least
        #    one matched marker of its own, is preferred
        promoted_from: TypeScore | None = None
        for s in scores[1:]:
            if s.score < SPECIFIC_RATIO * top.score:
                break
            if best.name in self.reference.ancestors(s.name) and self._has_own_match(s, species):
                promoted_from = promoted_from or best
                best = s
        # 2. descend further while the subtype-specific markers clearly favour one subtype
        general = best
        chain = self._refine(best, cluster, candidates, species, universe)
        if chain:
            ct = chain[-1][0]
            best = by_name.get(ct.name) or TypeScore(ct, 0.0, [])
        refined_markers = [gene for _, _, matched in chain for gene, _ in matched]

        lineage = best.cell_type.lineage
        ancestors = set(self.reference.ancestors(best.name))
        descendants = {s.name for s in scores if best.name in self.reference.ancestors(s.name)}
        family = ancestors | descendants | {best.name}
        sub = [s.name for s in scores if s.name in descendants and s.score >= SUB_RATIO * top.score]
        sub += [
            s.name
            for s in scores
            if s.name not in family
            and s.cell_type.lineage == lineage
            and s.score >= SUB_RATIO * top.score
            and len(s.matched) >= MIN_MATCHES
        ]
        sub = list(dict.fromkeys(sub))[:3]
        mixed: list[str] = []
        seen_lineages = {lineage}
        for s in scores:
            if s.cell_type.lineage in seen_lineages:
                continue
            seen_lineages.add(s.cell_type.lineage)
            if s.score >= max(MIXED_RATIO * top.score, MIN_SCORE) and len(s.matched) >= MIN_MATCHES:
                mixed.append(s.name)
        rival = next((s for s in scores if s.name not in family), None)
        margin = 1.0 if rival is None else max(0.0, (top.score - rival.score) / top.score)
        strength = min(1.0, top.score / STRONG_SCORE)
        confidence = round(100.0 * strength * (0.5 + 0.5 * margin), 1)

        matched_genes = list(dict.fromkeys([g for g, _ in general.matched] + refined_markers))
        matched_genes.sort(key=lambda g: cluster.genes.index(g))
        key_markers = matched_genes[:10]
        reasoning = self._reasoning(general, promoted_from, chain, rival, mixed, by_name)
        return ClusterAnnotation(
            cluster=cluster.cluster,
            main_cell_type=best.name,
            sub_cell_types=sub,
            mixed_cell_types=mixed,
            confidence=confidence,
            key_markers=key_markers,
            reasoning=reasoning,
            status="ok",
            markers_sent=markers_sent,
        )

    @staticmethod
    def _reasoning(
        general: TypeScore,
        promoted_from: TypeScore | None,
        chain: list[tuple[ReferenceCellType, float, list[tuple[str, int]]]],
        rival: TypeScore | None,
        mixed: list[str],
        by_name: dict[str, TypeScore],
    ) -> str:
        genes = ", ".join(gene for gene, _ in general.matched[:5])
        n_ref = len(general.cell_type.markers)
        first = (
            f"Top markers {genes} match {general.name} (score {general.score:.2f}, "
            f"{len(general.matched)} of {n_ref} reference markers"
        )
        if promoted_from is not None:
            first += f"; preferred over the more general {promoted_from.name} at {promoted_from.score:.2f}"
        first += ")"
        for ct, sc, matched in chain:
            first += (
                f", refined to {ct.name} by its own markers "
                f"{', '.join(g for g, _ in matched[:3])} (subtype score {sc:.2f})"
            )
        first += "."
        if rival is None:
            second = "No other cell type matched."
        else:
            second = f"Next best alternative: {rival.name} ({rival.score:.2f})"
            if mixed:
                second += "; similar scores for " + ", ".join(
                    f"{m} ({by_name[m].score:.2f})" for m in mixed
                ) + " suggest a mixed population"
            second += "."
        return f"{first} {second}"
