"""Expression-based scoring for the reference annotator: lineage first, then the subtype.

Used by :class:`~cassia_helpers.dataset.annotate.reference.annotator.ReferenceAnnotator` when it is given the AnnData.
Per cluster and marker gene ``g`` (pseudobulk over the cluster's cells, see
:func:`cassia_helpers.dataset.evidence.cluster_profile`; :func:`.calls.marker_strength`)::

    m(c, g) = frac_in(c, g) * clip(mean_in(c, g) - mean_out(c, g), 0, 1)

i.e. the share of the cluster's cells expressing the gene, times how much higher (log scale, capped
at 1) its mean is than in the other cells. A type's score is the order-weighted mean of ``m`` over its
markers measured in the data (weight ``1 / (1 + order / 10)``, the most specific markers first;
one virtual unexpressed marker of weight :data:`SHRINK` is added, so thin evidence counts less),
less the mean ``m`` of its and its ancestors' ``absent_markers`` (genes that define it by their absence:
CD3 for NK cells, MS4A1 for dendritic cells and so their subtypes); markers absent from the data do not
count; a type with fewer than two measured markers cannot be called.

Resolution: (1) the *root* types (no parent) are scored on all their markers and grouped by lineage; a
root whose own markers are few in the data (fewer than two measured) or too weak to call it is also
scored through its subtypes, on their markers that no other lineage lists (CD8A, CD8B for T cells; KRT5,
KRT14, TP63 for epithelial cells), at :data:`VIA_WEIGHT` of their score, and the call records it; the
best lineage wins if its best root scores at least :data:`MIN_SCORE`; (2) within it the root whose
subtree holds the best-scoring type (on all its markers) is chosen; with the cells at hand
(:class:`CellContext`), a cluster whose cells split between lineages (the second holding at least
:data:`MIX_SHARE` of the cells that carry a lineage signature, see
:mod:`~cassia_helpers.dataset.annotate.reference.support`) stays at its majority lineage's root, the split
recorded; (3) the call then descends the reference hierarchy: children are scored on the markers that
tell them apart (those no ancestor, sibling or sibling's subtype lists: IL7R, listed for both CD4+ T cells
and MAIT cells, tells neither from the other). On the cluster, the best child is taken when it scores at
least :data:`REFINE_MIN_SCORE` and :data:`REFINE_RATIO` times its best sibling, and when the mean strength
of those markers is at least :data:`REFINE_RELATIVE` times the current type's on all its markers. On the
cells (compared with the cells of the clusters of the same lineage, so the answer does not depend on how
finely the lineage is cut), among the children whose markers the cluster expresses at all (a score above
0, whatever the cluster-level thresholds, which depend on where the boundaries fall): the child carried by
at least :data:`CELL_SUPPORT` of the cells that carry some child's signature is taken; two children each
carried by at least :data:`MIX_SHARE` make the cluster a mixture, called at the parent. A lone child in
view needs :data:`CELL_SUPPORT` of all the cluster's cells, unless the cluster's rule takes it and the
leading markers of its closest sibling are measured (else half of the cluster may be that sibling, unseen:
memory B cells in a panel without IGHD). When the cells cannot tell (few of the cluster's cells carry any
subtype's signature, or the lineage is this one cluster) the cluster's rule decides. Otherwise the call
stays at the more general type, so a call is only as specific as the data supports.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from cassia_helpers.dataset.annotate.reference.catalog import MarkerReference, ReferenceCellType
from cassia_helpers.dataset.annotate.reference.support import CELL_SUPPORT, MIN_COVERAGE, MIX_SHARE, CellContext, pick

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
#: a lineage's evidence seen through its subtypes' own markers counts this much of their score
VIA_WEIGHT = 0.8
#: a lineage scoring at least this fraction of the winner's is weighed cell by cell
LINEAGE_CONTENDER = 0.3
#: a cell carries a lineage when its signature stands this far (standardised units) above the dataset's mean
LINEAGE_CARRY = 0.5
#: a subtype call is uncertain when this many first telling markers of it or its closest sibling are not measured
LEADING = 1
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
    #: how the lineage was reached when its root's own markers did not carry it: (subtype, its markers)
    via: tuple[str, list[str]] | None = None
    #: cell-level support of each step taken: (type, fraction of the cluster's cells carrying it)
    support: list[tuple[str, float]] = field(default_factory=list)
    #: the cluster's cells split between these types (name, fraction of cells): the call stayed above them
    mixed: list[tuple[str, float]] = field(default_factory=list)
    #: the cluster's cells split between these lineages' root types (name, fraction of cells)
    lineage_split: list[tuple[str, float]] = field(default_factory=list)
    #: the most specific markers of the types weighed at the last step that the data do not measure
    unmeasured: list[tuple[str, str]] = field(default_factory=list)  # (gene, type)
    #: a subtype its markers point to but too few cells carry, its sibling's markers unmeasured: (type, share, genes)
    declined: tuple[str, float, list[tuple[str, str]]] | None = None
    blood_only: float | None = None  # the share of cells detecting PTPRC when only blood lineages were weighed
    #: the rows of the cells carrying a sibling of a step taken, in a minority (:meth:`.Support.minority`)
    minority_rows: np.ndarray | None = field(default=None, compare=False, repr=False)


class ExpressionScorer:
    """Scores reference types on one dataset's cluster profile."""

    def __init__(self, reference: MarkerReference, candidates: list[ReferenceCellType], species: str,
                 present: set[str]) -> None:
        self.reference = reference
        self.candidates = candidates
        self.species = species
        self.present = present
        self._names = {ct.name for ct in candidates}
        # the hierarchy's lookups, once per dataset (every cluster asks the same questions)
        self._below = {ct.name: [d for d in candidates if ct.name in reference.ancestors(d.name)]
                       for ct in candidates}
        self._telling: dict[tuple[str, str | None], list[tuple[int, str]]] = {}
        self._foreign: dict[str, set[str]] = {}
        self._resolved: dict[str, str | None] = {}
        self._lacking: dict[str, list[str]] = {}
        for ct in candidates:
            if ct.lineage not in self._foreign:
                self._foreign[ct.lineage] = {sym for other in candidates if other.lineage != ct.lineage
                                             for sym in other.symbols(species)}

    def distinguishing(self, ct: ReferenceCellType, children: list[ReferenceCellType]) -> list[tuple[int, str]]:
        """:meth:`MarkerReference.distinguishing_markers` of ``ct`` among ``children`` (cached)."""
        key = (ct.name, ct.parent)
        if key not in self._telling:
            self._telling[key] = self.reference.distinguishing_markers(ct, children, self.species)
        return self._telling[key]

    def resolve(self, symbol: str) -> str | None:
        """The gene name of the data for a reference symbol (the symbol or a former name)."""
        if symbol not in self._resolved:
            names = self.reference.alias_names(symbol, self.species)
            self._resolved[symbol] = next((name for name in names if name in self.present), None)
        return self._resolved[symbol]

    def genes_needed(self) -> list[str]:
        out = []
        for ct in self.candidates:
            for sym in (*ct.symbols(self.species), *ct.absent_symbols(self.species)):
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
        genes = self._lacks(ct)
        return ABSENT_WEIGHT * float(np.mean([strength.get(g, 0.0) for g in genes])) if genes else 0.0

    def type_score(self, ct: ReferenceCellType, strength: dict[str, float], *,
                   markers: list[tuple[int, str]] | None = None, shrink: float = SHRINK) -> tuple[float, int]:
        """A type's score on ``markers`` (default: all of its markers) less its absent-marker penalty."""
        if markers is None:
            markers = list(enumerate(ct.symbols(self.species)))
        sc, measured = self.score(markers, strength, shrink=shrink)
        return max(0.0, sc - self.absent_penalty(ct, strength)), measured

    def call(self, strength: dict[str, float], sub_strength: dict[str, float] | None = None, *,
             cells: CellContext | None = None) -> ExpressionCall:
        """Call one cluster: lineage and root type on ``strength``, subtypes on ``sub_strength``.

        With ``cells`` (the dataset's per-cell scores, the cluster and its lineage's clusters), a cluster
        whose cells split between lineages stays at its majority lineage's root with the split recorded,
        and each step down the hierarchy is decided on the share of the cluster's cells carrying each
        subtype's signature rather than on the cluster's mean.
        """
        sub_strength = strength if sub_strength is None else sub_strength
        roots = [ct for ct in self.candidates if ct.parent is None or ct.parent not in self._names]
        scored: list[tuple[float, ReferenceCellType]] = []
        via: dict[str, tuple[float, str, list[str]]] = {}
        for ct in roots:
            sc, measured = self.type_score(ct, strength)
            through = self._through_subtypes(ct, strength)
            if through is not None and (measured < MIN_MEASURED or sc < MIN_SCORE) and through[0] > sc:
                via[ct.name] = through
                sc, measured = through[0], MIN_MEASURED
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
        out = ExpressionCall(current, round(top_score, 4), lineages, rival=rival)
        if current.name in via:
            out.via = (via[current.name][1], via[current.name][2])
        if cells is not None:
            mixed = self._lineage_split(scored, lineages, cells)
            if mixed is not None:
                # no reference type spans two lineages: the call follows the majority lineage's cells down
                # the hierarchy and names the split (fractions of the cells carrying a lineage signature)
                (major, share), *_ = mixed
                current = next(ct for sc, ct in scored if ct.name == major)
                out.lineage_split, out.cell_type = mixed, current
                out.support.append((current.name, share))
        # 3. descend while one child clearly wins: on its cells when they can tell, else on the cluster
        while True:
            children = [ct for ct in self.candidates if ct.parent == current.name]
            options = []
            for ct in children:
                markers = self.distinguishing(ct, children)
                sc, measured = self.type_score(ct, sub_strength, markers=markers)
                if measured >= 1:
                    options.append((sc, ct, markers))
            if not options:
                break
            options.sort(key=lambda t: (-t[0], t[1].name))
            best_sc, best_ct, best_markers = options[0]
            runner = options[1][0] if len(options) > 1 else 0.0
            level = self.type_score(best_ct, sub_strength, markers=best_markers, shrink=0.0)[0]
            by_cluster = not (best_sc < REFINE_MIN_SCORE or best_sc < REFINE_RATIO * runner
                              or level < REFINE_RELATIVE * self.type_score(current, sub_strength, shrink=0.0)[0])
            # only subtypes whose markers the cluster expresses at all are weighed on its cells
            eligible = [t for t in options if t[0] > 0.0]
            decided = self._by_cells(eligible, cells) if cells is not None and eligible else None
            if decided is not None:
                step, support, mixed, minority = decided
                if out.minority_rows is None:
                    out.minority_rows = minority
                if step is None and mixed:
                    out.mixed = mixed
                    break
                # one subtype in view: its cells must carry it, unless the cluster clearly does and the
                # markers that would show the sibling instead are measured (no CD8 T cells hiding CD4 ones)
                if step is not None and (len(eligible) > 1 or support >= CELL_SUPPORT or (
                        by_cluster and not self._unmeasured(self._weighed(step, options), children))):
                    best_ct = step
                    best_sc = next(sc for sc, ct, _ in options if ct is step)
                    runner = max((sc for sc, ct, _ in options if ct is not step), default=0.0)
                    out.support.append((step.name, support))
                elif step is not None or not by_cluster:
                    if step is not None:
                        out.declined = (step.name, support, self._unmeasured(self._weighed(step, options), children))
                    break
            elif not by_cluster:
                break
            out.chain.append((best_ct.name, round(best_sc, 4), round(runner, 4)))
            out.unmeasured = self._unmeasured(self._weighed(best_ct, options), children)
            current = best_ct
        out.cell_type = current
        out.key_markers = self._key_markers(current, strength)
        return out

    def _through_subtypes(self, root: ReferenceCellType, strength: dict[str, float]
                          ) -> tuple[float, str, list[str]] | None:
        """The lineage evidence of ``root`` seen through its subtypes: the best descendant's score on its
        markers that no type of another lineage lists (CD8A, CD8B for T cells; KRT5, KRT14, TP63 for
        epithelial cells), weighted by :data:`VIA_WEIGHT`; ``None`` when no descendant has
        :data:`MIN_MEASURED` such markers measured."""
        foreign = self._foreign[root.lineage]
        best: tuple[float, str, list[str]] | None = None
        for ct in self._below[root.name]:
            markers = [(o, s) for o, s in enumerate(ct.symbols(self.species)) if s not in foreign]
            sc, measured = self.type_score(ct, strength, markers=markers)
            if measured >= MIN_MEASURED and (best is None or VIA_WEIGHT * sc > best[0]):
                genes = [g for g in (self.resolve(s) for _, s in markers) if g and strength.get(g, 0.0) > 0]
                best = (VIA_WEIGHT * sc, ct.name, sorted(genes, key=lambda g: -strength[g])[:4])
        return best

    def _lineage_split(self, scored: list[tuple[float, ReferenceCellType]], lineages: dict[str, float],
                       cells: CellContext) -> list[tuple[str, float]] | None:
        """The roots (one per lineage) whose signatures split the cluster's cells, majority first, or
        ``None`` when one lineage holds the cluster."""
        best = max(lineages.values())
        contenders: dict[str, ReferenceCellType] = {}
        for sc, ct in scored:  # best root of each lineage scoring within reach of the winner
            if sc >= LINEAGE_CONTENDER * best and ct.lineage not in contenders:
                contenders[ct.lineage] = ct
        if len(contenders) < 2:
            return None
        options = {ct.name: self._signature(ct, list(enumerate(ct.symbols(self.species))))
                   for ct in contenders.values()}
        support = cells.support.compare(cells.cluster, options, threshold=LINEAGE_CARRY)
        ranked = support.ranked()
        if support.assigned < MIN_COVERAGE or len(ranked) < 2 or support.share(ranked[1][0]) < MIX_SHARE:
            return None
        return [(name, round(support.share(name), 2)) for name, _ in ranked if support.share(name) >= MIX_SHARE]

    def _by_cells(self, options: list[tuple[float, ReferenceCellType, list[tuple[int, str]]]],
                  cells: CellContext) -> tuple[ReferenceCellType | None, float, list, np.ndarray | None] | None:
        """Decide one step down on the cluster's cells (:func:`.support.pick`): the step, its share, the split
        and the rows of a sibling's minority (:meth:`.Support.minority`); ``None`` when the cells cannot tell: no
        population to compare with, or none but the cluster itself (compared with its own average)."""
        if cells.population is None or set(cells.population) <= {cells.cluster}:
            return None
        by_name = {ct.name: ct for _, ct, _ in options}
        signatures = {ct.name: self._signature(ct, markers) for _, ct, markers in options}
        support = cells.support.compare(cells.cluster, signatures, population=cells.population)
        picked = pick(support)
        if picked is None:
            return None
        name, share, split = picked
        return (by_name[name], share, split, support.minority(name)) if name else (None, share, split, None)

    def _signature(self, ct: ReferenceCellType, markers: list[tuple[int, str]]
                   ) -> tuple[list[tuple[int, str]], list[str]]:
        """(order, data gene) markers and absent data genes of a type, for :mod:`.support`."""
        genes = [(o, g) for o, g in ((o, self.resolve(s)) for o, s in markers) if g is not None]
        return genes, self._lacks(ct)

    def _lacks(self, ct: ReferenceCellType) -> list[str]:
        """The data's genes the type or an ancestor is defined not to express (a subtype lacks what its parent
        lacks)."""
        if ct.name not in self._lacking:
            symbols = [s for t in (ct, *map(self.reference.by_name, self.reference.ancestors(ct.name)))
                       for s in t.absent_symbols(self.species)]
            self._lacking[ct.name] = [g for g in (self.resolve(s) for s in dict.fromkeys(symbols)) if g is not None]
        return self._lacking[ct.name]

    @staticmethod
    def _weighed(chosen: ReferenceCellType, options: list[tuple[float, ReferenceCellType, list[tuple[int, str]]]]
                 ) -> list[ReferenceCellType]:
        """The chosen subtype and its closest sibling among the options (best score first)."""
        rival = next((ct for _, ct, _ in options if ct is not chosen), None)
        return [chosen] + ([rival] if rival is not None else [])

    def _unmeasured(self, weighed: list[ReferenceCellType], children: list[ReferenceCellType]
                    ) -> list[tuple[str, str]]:
        """The leading telling markers (the first :data:`LEADING` of each) of the chosen subtype and its
        closest sibling that the data do not measure: without them the choice between them is a guess
        (no CD14 in the panel: classical and non-classical monocytes cannot be told apart)."""
        out = []
        for ct in weighed:
            for _, sym in self.distinguishing(ct, children)[:LEADING]:
                if self.resolve(sym) is None:
                    out.append((sym, ct.name))
        return out

    def _subtree_best(self, root: ReferenceCellType, strength: dict[str, float]) -> float:
        """Best full-marker score of ``root`` and its descendants among the candidates."""
        best = 0.0
        for ct in [root, *self._below.get(root.name, [])]:
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
