"""Expression-based scoring for the reference annotator: lineage first, then the subtype.

Used by :class:`~cassia_helpers.dataset.annotate.reference.annotator.ReferenceAnnotator` when it is given the AnnData.
Per cluster and marker gene ``g`` (pseudobulk over the cluster's cells, see
:func:`cassia_helpers.dataset.evidence.cluster_profile`)::

    m(c, g) = frac_in(c, g) * clip(mean_in(c, g) - mean_out(c, g), 0, 1)

i.e. the share of the cluster's cells expressing the gene, times how much higher (log scale, capped
at 1) its mean is than in the other cells. A type's score is the order-weighted mean of ``m`` over its
markers measured in the data (weight ``1 / (1 + order / 10)``, the most specific markers first;
one virtual unexpressed marker of weight :data:`SHRINK` is added, so thin evidence counts less),
less the mean ``m`` of its ``absent_markers`` (genes that define it by their absence, e.g. CD3 for NK
cells); markers absent from the data do not count; a type with fewer than two measured markers
cannot be called.

Resolution: (1) the *root* types (no parent) are scored on all their markers and grouped by lineage;
the best lineage wins if its best root scores at least :data:`MIN_SCORE`; (2) within it the root
whose subtree holds the best-scoring type (on all its markers) is chosen; (3) the call then descends
the reference hierarchy: children are scored on the markers that tell them apart (those neither an
ancestor nor a sibling lists: IL7R, listed for both CD4+ T cells and MAIT cells, tells neither from
the other), and the best child is taken when it scores at least :data:`REFINE_MIN_SCORE` and
:data:`REFINE_RATIO` times its best sibling, and when the mean strength of those markers is at least
:data:`REFINE_RELATIVE` times the current type's on all its markers (both unshrunk: the few markers
that tell siblings apart are thin evidence by construction, which the ratio to the sibling already
weighs); otherwise the call stays at the more general type, so a call is only as specific as the
data supports.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from cassia_helpers.dataset.annotate import ClusterAnnotation, ClusterMarkers
from cassia_helpers.dataset.annotate.reference.catalog import MarkerReference, ReferenceCellType

#: a cluster whose best root type scores less is unknown
MIN_SCORE = 0.08
#: a type needs this many markers measured in the data to be scored
MIN_MEASURED = 2
#: descend into a child when its own markers score at least this ...
REFINE_MIN_SCORE = 0.05
#: ... and this many times the best sibling's
REFINE_RATIO = 1.5
#: ... and its markers' mean strength at least this fraction of the refined type's (on all its markers)
REFINE_RELATIVE = 0.25
#: weight of the absent markers' mean strength subtracted from a type's score
ABSENT_WEIGHT = 1.0
#: another lineage scoring at least this fraction of the call's is reported as a possible mixture
MIXED_RATIO = 0.75
#: cap of the mean difference (log scale) counted per marker
MAX_DELTA = 1.0
ORDER_SCALE = 10.0
#: weight of the virtual unexpressed marker added to every score's denominator
SHRINK = 1.0


@dataclass
class ExpressionCall:
    """The outcome for one cluster."""

    cell_type: ReferenceCellType | None
    score: float
    lineage_scores: dict[str, float]
    chain: list[tuple[str, float, float]] = field(default_factory=list)  # (type, own score, runner-up)
    key_markers: list[str] = field(default_factory=list)
    rival: tuple[str, float] | None = None


def marker_strength(profile, row: int, peers: list[int] | None = None) -> dict[str, float]:
    """``m(c, g)`` for every profiled gene of one cluster.

    Against every other cell by default; with ``peers`` (rows of other clusters) against the
    cell-weighted mean of those clusters only.
    """
    if peers:
        w = profile.n_cells[peers].astype(float)
        out = (profile.mean_in[peers] * w[:, None]).sum(axis=0) / w.sum()
    else:
        out = profile.mean_out[row]
    delta = np.clip(profile.mean_in[row] - out, 0.0, MAX_DELTA) / MAX_DELTA
    return {g: float(v) for g, v in zip(profile.genes, profile.frac_in[row] * delta, strict=True)}


def subtype_strength(profile, row: int, peers: list[int]) -> dict[str, float]:
    """Strength used below the root: the mean of the whole-dataset and the same-lineage contrasts.

    A subtype marker must stand out both from the dataset and from the other clusters of the lineage,
    e.g. CD8A among T-cell clusters; without peers it is the whole-dataset contrast.
    """
    overall = marker_strength(profile, row)
    if not peers:
        return overall
    within = marker_strength(profile, row, peers)
    return {g: 0.5 * (v + within[g]) for g, v in overall.items()}


class ExpressionScorer:
    """Scores reference types on one dataset's cluster profile."""

    def __init__(self, reference: MarkerReference, candidates: list[ReferenceCellType], species: str,
                 present: set[str]) -> None:
        self.reference = reference
        self.candidates = candidates
        self.species = species
        self.present = present
        self._names = {ct.name for ct in candidates}

    def resolve(self, symbol: str) -> str | None:
        """The gene name of the data for a reference symbol (the symbol or a former name)."""
        for name in self.reference.alias_names(symbol, self.species):
            if name in self.present:
                return name
        return None

    def genes_needed(self) -> list[str]:
        out = []
        for ct in self.candidates:
            for sym in ct.symbols(self.species):
                out.extend(self.reference.alias_names(sym, self.species))
        return list(dict.fromkeys(out))

    def score(self, markers: list[tuple[int, str]], strength: dict[str, float], *, shrink: float = SHRINK
              ) -> tuple[float, int]:
        """Order-weighted mean strength over measured markers, and how many were measured.

        The mean is shrunk towards 0 by :data:`SHRINK` (a virtual unexpressed marker), so a type seen
        through one or two measured markers needs stronger evidence than one seen through eight;
        ``shrink=0`` gives the plain weighted mean.
        """
        num = den = 0.0
        measured = 0
        for order, sym in markers:
            gene = self.resolve(sym)
            if gene is None:
                continue
            w = 1.0 / (1.0 + order / ORDER_SCALE)
            num += w * strength.get(gene, 0.0)
            den += w
            measured += 1
        return (num / (den + shrink) if den else 0.0), measured

    def absent_penalty(self, ct: ReferenceCellType, strength: dict[str, float]) -> float:
        """Mean strength of the genes the type is defined not to express (0 when none is measured)."""
        genes = [g for g in (self.resolve(s) for s in ct.absent_symbols(self.species)) if g is not None]
        return ABSENT_WEIGHT * float(np.mean([strength.get(g, 0.0) for g in genes])) if genes else 0.0

    def type_score(self, ct: ReferenceCellType, strength: dict[str, float], *,
                   markers: list[tuple[int, str]] | None = None, shrink: float = SHRINK) -> tuple[float, int]:
        """A type's score on ``markers`` (default: all of its markers) less its absent-marker penalty."""
        if markers is None:
            markers = list(enumerate(ct.symbols(self.species)))
        sc, measured = self.score(markers, strength, shrink=shrink)
        return max(0.0, sc - self.absent_penalty(ct, strength)), measured

    def call(self, strength: dict[str, float], sub_strength: dict[str, float] | None = None) -> ExpressionCall:
        """Call one cluster: lineage and root type on ``strength``, subtypes on ``sub_strength``."""
        sub_strength = strength if sub_strength is None else sub_strength
        roots = [ct for ct in self.candidates if ct.parent is None or ct.parent not in self._names]
        scored: list[tuple[float, ReferenceCellType]] = []
        for ct in roots:
            sc, measured = self.type_score(ct, strength)
            if measured >= MIN_MEASURED:
                scored.append((sc, ct))
        lineages: dict[str, float] = {}
        for sc, ct in scored:
            lineages[ct.lineage] = max(lineages.get(ct.lineage, 0.0), sc)
        if not scored:
            return ExpressionCall(None, 0.0, lineages)
        scored.sort(key=lambda t: (-t[0], t[1].name))
        best_lineage = max(lineages, key=lambda k: (lineages[k], k))
        if lineages[best_lineage] < MIN_SCORE:
            return ExpressionCall(None, lineages[best_lineage], lineages)
        # 2. the root type of the winning lineage whose subtree holds the best-scoring type (a
        #    microglia-like cluster goes to macrophage, not monocyte, even if the roots score alike)
        in_lineage = [(sc, ct) for sc, ct in scored if ct.lineage == best_lineage]
        top_score, current = max(in_lineage, key=lambda t: (self._subtree_best(t[1], strength), t[0], t[1].name))
        rival = next(((ct.name, sc) for sc, ct in scored if ct.lineage != best_lineage), None)
        chain: list[tuple[str, float, float]] = []
        # 3. descend while one child's telling markers clearly win
        while True:
            children = [ct for ct in self.candidates if ct.parent == current.name]
            options = []
            for ct in children:
                markers = self.reference.telling_markers(ct, children, self.species)
                sc, measured = self.type_score(ct, sub_strength, markers=markers)
                if measured >= 1:
                    options.append((sc, ct, markers))
            if not options:
                break
            options.sort(key=lambda t: (-t[0], t[1].name))
            best_sc, best_ct, best_markers = options[0]
            runner = options[1][0] if len(options) > 1 else 0.0
            level = self.type_score(best_ct, sub_strength, markers=best_markers, shrink=0.0)[0]
            if (best_sc < REFINE_MIN_SCORE or best_sc < REFINE_RATIO * runner
                    or level < REFINE_RELATIVE * self.type_score(current, sub_strength, shrink=0.0)[0]):
                break
            chain.append((best_ct.name, round(best_sc, 4), round(runner, 4)))
            current = best_ct
        key = self._key_markers(current, strength)
        return ExpressionCall(current, round(top_score, 4), lineages, chain, key, rival)

    def _subtree_best(self, root: ReferenceCellType, strength: dict[str, float]) -> float:
        """Best full-marker score of ``root`` and its descendants among the candidates."""
        best = 0.0
        for ct in self.candidates:
            if ct.name == root.name or root.name in self.reference.ancestors(ct.name):
                sc, measured = self.type_score(ct, strength)
                if measured >= MIN_MEASURED:
                    best = max(best, sc)
        return best

    def _key_markers(self, ct: ReferenceCellType, strength: dict[str, float]) -> list[str]:
        """The called type's (and its ancestors') measured markers, strongest first."""
        syms = list(ct.symbols(self.species))
        for name in self.reference.ancestors(ct.name):
            syms += self.reference.by_name(name).symbols(self.species)
        genes = [g for g in (self.resolve(s) for s in dict.fromkeys(syms)) if g is not None]
        genes = [g for g in dict.fromkeys(genes) if strength.get(g, 0.0) > 0]
        genes.sort(key=lambda g: -strength.get(g, 0.0))
        return genes[:8]


def annotate_expression(
    reference: MarkerReference,
    clusters: list[ClusterMarkers],
    candidates: list[ReferenceCellType],
    species: str,
    adata: Any,
    *,
    groupby: str = "leiden",
    use_raw: bool = False,
    layer: str | None = None,
) -> list[ClusterAnnotation]:
    """Call every cluster from the expression of the candidates' markers (one call per input cluster).

    Pass 1 finds each cluster's lineage on the whole-dataset contrast; pass 2 resolves subtypes with
    :func:`subtype_strength` against the other clusters of the same lineage.
    """
    from cassia_helpers.dataset.evidence import cluster_profile

    names = adata.raw.var_names if use_raw else adata.var_names
    scorer = ExpressionScorer(reference, candidates, species, set(map(str, names)))
    profile = cluster_profile(adata, scorer.genes_needed(), groupby=groupby, use_raw=use_raw, layer=layer)
    row_of = {c: i for i, c in enumerate(profile.clusters)}
    # pass 1: lineage of every cluster on the whole-dataset contrast; pass 2: subtypes against the
    # clusters of the same lineage as well
    first = {c: scorer.call(marker_strength(profile, i)) for c, i in row_of.items()}
    lineage = {c: (call.cell_type.lineage if call.cell_type is not None else None) for c, call in first.items()}
    out = []
    for cm in clusters:
        if cm.cluster not in row_of:
            out.append(ClusterAnnotation.unknown(cm.cluster, f"cluster not found in obs[{groupby!r}]",
                                                 cm.genes))
            continue
        row = row_of[cm.cluster]
        peers = [row_of[c] for c, lin in lineage.items() if lin is not None and lin == lineage[cm.cluster]
                 and c != cm.cluster]
        call = scorer.call(marker_strength(profile, row), subtype_strength(profile, row, peers))
        if call.cell_type is None:
            out.append(ClusterAnnotation.unknown(
                cm.cluster, "no reference cell type's markers are expressed in the cluster", cm.genes, "no_match"))
            continue
        ordered = sorted(call.lineage_scores.items(), key=lambda kv: -kv[1])
        runner = ordered[1][1] if len(ordered) > 1 else 0.0
        margin = max(0.0, (call.score - runner) / call.score) if call.score > 0 else 0.0
        confidence = round(100.0 * min(1.0, call.score / 0.4) * (0.5 + 0.5 * margin), 1)
        mixed = [
            f"{lin} lineage" for lin, sc in ordered[1:] if sc >= MIXED_RATIO * call.score and sc >= MIN_SCORE
        ]
        steps = "".join(f", refined to {n} (own markers {s:.2f} vs {r:.2f})" for n, s, r in call.chain)
        rival = f" Next lineage: {call.rival[0]} ({call.rival[1]:.2f})." if call.rival else ""
        reasoning = (
            f"Lineage {call.cell_type.lineage} (best root type score {call.score:.2f}){steps}; "
            f"expressed markers: {', '.join(call.key_markers[:5])}.{rival}"
        )
        out.append(ClusterAnnotation(
            cluster=cm.cluster,
            main_cell_type=call.cell_type.name,
            sub_cell_types=[],
            mixed_cell_types=mixed,
            confidence=confidence,
            key_markers=call.key_markers,
            reasoning=reasoning,
            markers_sent=list(cm.genes),
        ))
    return out
