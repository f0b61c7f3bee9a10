"""The reference's expression route for a whole dataset: profile, lineage pass, cell-level calls, confidence.

Used by :class:`~cassia_helpers.dataset.annotate.reference.annotator.ReferenceAnnotator` when it is given the
AnnData. Pass 1 finds each cluster's lineage on the whole-dataset contrast
(:mod:`~cassia_helpers.dataset.annotate.reference.expression`); pass 2 calls every cluster again, weighing
its cells (:mod:`~cassia_helpers.dataset.annotate.reference.support`) against the cells of the clusters of
the same lineage, so a subtype call does not depend on where the cluster boundaries fall. A cluster in which
most cells detect PTPRC (CD45) is called among the blood-cell lineages only (:data:`BLOOD_SHARE`).

Confidence (0-100) is the lineage score's strength (full at 0.4) times its margin over the next lineage
(``0.5 + 0.5 * margin``), times the smallest cell-level support of the steps taken (the share of the
cluster's cells carrying the chosen subtype's signature), halved for a mixture (cells split between two
subtypes: called at their common parent; between two lineages: called down the majority lineage, since
no reference type spans both). A subtype chosen while the leading marker of it or of its closest sibling
is not measured is capped at :data:`UNCERTAIN`, and the reasoning names the missing markers.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from cassia_helpers.dataset.annotate import ClusterAnnotation, ClusterMarkers
from cassia_helpers.dataset.annotate.reference.catalog import MarkerReference, ReferenceCellType
from cassia_helpers.dataset.annotate.reference.expression import (
    MIN_MEASURED,
    MIN_SCORE,
    MIXED_RATIO,
    ExpressionCall,
    ExpressionScorer,
)
from cassia_helpers.dataset.annotate.reference.support import CellContext, CellSupport

#: cap of the mean difference (log scale) counted per marker
MAX_DELTA = 1.0
#: the confidence of a subtype call whose telling markers the data do not measure is at most this
UNCERTAIN = 35.0
#: a lineage score at or above this counts as full strength
STRONG_SCORE = 0.4
#: a cluster whose cells detect PTPRC (CD45, on blood cells and no others) at least this often is called among
#: the blood lineages only: markers shared with stromal or endothelial types (SPARC, FABP5) cannot carry it there
BLOOD_SHARE = 0.5
#: PTPRC (CD45) as each species names it
CD45 = {"human": "PTPRC", "mouse": "Ptprc"}
BLOOD_LINEAGES = frozenset({"T", "B", "NK/ILC", "myeloid", "megakaryocyte/erythroid", "progenitor"})


def expression_calls(
    reference: MarkerReference,
    candidates: list[ReferenceCellType],
    species: str,
    adata: Any,
    *,
    groupby: str = "leiden",
    use_raw: bool = False,
    layer: str | None = None,
) -> dict[str, ExpressionCall]:
    """The scorer's call for every cluster of ``obs[groupby]`` (lineage pass, then cell-level calls), by
    cluster name: what :func:`annotate_expression` reports, before it is worded."""
    from cassia_helpers.dataset.evidence import cluster_profile

    names = set(map(str, adata.raw.var_names if use_raw else adata.var_names))
    scorer = ExpressionScorer(reference, candidates, species, names)
    needed = scorer.genes_needed()
    cd45 = _cd45(scorer, species)
    profile = cluster_profile(adata, [*needed, cd45] if cd45 else needed, groupby=groupby, use_raw=use_raw,
                              layer=layer)
    cells = CellSupport(adata, needed, groupby=groupby, use_raw=use_raw, layer=layer)
    row_of = {c: i for i, c in enumerate(profile.clusters)}
    blood = {c: float(profile.frac_in[i, profile.column(cd45)]) for c, i in row_of.items()} if cd45 else {}
    blood = {c: share for c, share in blood.items() if share >= BLOOD_SHARE}
    blood_scorer = ExpressionScorer(reference, [ct for ct in candidates if ct.lineage in BLOOD_LINEAGES], species,
                                    names) if blood else scorer

    def scorer_of(cluster: str) -> ExpressionScorer:
        return blood_scorer if cluster in blood else scorer

    # said in the reasoning only where it changed the lineage
    changed = {c for c in blood if getattr(scorer.call(marker_strength(profile, row_of[c])).cell_type, "lineage",
                                           None) not in (None, *BLOOD_LINEAGES)}

    first = {c: scorer_of(c).call(marker_strength(profile, i)) for c, i in row_of.items()}
    lineage = {c: (call.cell_type.lineage if call.cell_type is not None else None) for c, call in first.items()}
    out = {}
    for cluster, row in row_of.items():
        same = [c for c, lin in lineage.items() if lin is not None and lin == lineage[cluster]]
        peers = [row_of[c] for c in same if c != cluster]
        out[cluster] = scorer_of(cluster).call(marker_strength(profile, row), subtype_strength(profile, row, peers),
                                               cells=CellContext(cells, cluster, tuple(same) or None))
        if cluster in changed:
            out[cluster].blood_only = blood[cluster]
    return out


def expression_data(reference: MarkerReference, candidates: list[ReferenceCellType], species: str, adata: Any, *,
                    use_raw: bool = False, layer: str | None = None) -> Any:
    """The expression :func:`expression_calls` reads, alone: an AnnData of ``adata``'s cells (``obs`` holds
    their names only) and the reference's genes the data measure, from ``raw`` / ``layer`` / ``X``.

    Every per-gene statistic of the calls is computed gene by gene, so the calls on it are those on
    ``adata``; a caller that asks for calls several times (the split of mixed clusters) reads the genes'
    columns out of the whole matrix once instead of at every call.
    """
    import anndata as ad
    import pandas as pd
    import scipy.sparse as sp

    from cassia_helpers.dataset.evidence import matrix_of

    x, names = matrix_of(adata, use_raw=use_raw, layer=layer)
    scorer = ExpressionScorer(reference, candidates, species, set(names))
    index = {g: i for i, g in enumerate(names)}
    genes = [g for g in dict.fromkeys([*scorer.genes_needed(), _cd45(scorer, species)]) if g in index]
    columns = x[:, [index[g] for g in genes]]
    return ad.AnnData(columns.tocsr() if sp.issparse(columns) else sp.csr_matrix(columns),
                      obs=pd.DataFrame(index=adata.obs_names.copy()), var=pd.DataFrame(index=genes))


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


def _cd45(scorer: ExpressionScorer, species: str) -> str | None:
    """The data's name of PTPRC (CD45), or ``None`` when it is not measured."""
    return scorer.resolve(CD45.get(species, CD45["human"]))


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
    """Call every cluster from the expression of the candidates' markers (one call per input cluster)."""
    calls = expression_calls(reference, candidates, species, adata, groupby=groupby, use_raw=use_raw, layer=layer)
    out = []
    for cm in clusters:
        call = calls.get(cm.cluster)
        if call is None:
            out.append(ClusterAnnotation.unknown(cm.cluster, f"cluster not found in obs[{groupby!r}]",
                                                 cm.genes))
        elif call.cell_type is None:
            out.append(ClusterAnnotation.unknown(
                cm.cluster, "no reference cell type's markers stand out in the cluster against the dataset's "
                "other cells", cm.genes, "no_match"))
        else:
            out.append(_annotation(cm, call))
    if len(out) > 1 and all(r.reason_kind == "no_match" for r in out):
        _say_nothing_matched(adata, candidates, species, use_raw=use_raw)
    return out


def _say_nothing_matched(adata: Any, candidates: list[ReferenceCellType], species: str, *, use_raw: bool) -> None:
    """Warn why no cluster matched: the reference's genes are in the data in another species' case (CD3E for
    Cd3e); too few of them are measured to score any cell type (genes named by Ensembl ids, say); or they
    are there but stand out nowhere (markers are weighed against the other cells: a sorted population)."""
    from cassia_helpers.dataset.record import warn

    names = set(map(str, adata.raw.var_names if use_raw else adata.var_names))
    symbols = {symbol for ct in candidates for symbol in ct.symbols(species)}
    found = len(symbols & names)
    in_other_case = len({s.upper() for s in symbols} & {n.upper() for n in names}) - found
    # the scorer leaves out a type with fewer markers measured: when that is every type, the clusters were
    # never compared, and advice about how they compare would point the user the wrong way
    scorable = any(len(set(ct.symbols(species)) & names) >= MIN_MEASURED for ct in candidates)
    if in_other_case > found:
        warn(adata, f"the offline reference matched no cluster: {found} of its {species} marker genes are in "
                    f"the data as it names them, {in_other_case} more in another case (check --species)")
    elif not scorable:
        warn(adata, f"the offline reference matched no cluster: only {found} of its {len(symbols)} {species} "
                    "marker genes are among the data's gene names, too few to score any cell type (the genes "
                    "need gene symbols as names, or a symbol column)")
    else:
        warn(adata, "the offline reference matched no cluster: it weighs each cluster's markers against the "
                    "dataset's other cells, so a dataset of one cell type (a sorted population) shows none; "
                    "give the dataset as one cluster (--cluster-key of a column with one value) or use the LLM")


def _percent(share: float) -> str:
    return f"{100 * share:.0f}%"


def _annotation(cm: ClusterMarkers, call: ExpressionCall) -> ClusterAnnotation:
    """The call as an annotation: confidence, mixture and reasoning (see the module docstring)."""
    ordered = sorted(call.lineage_scores.items(), key=lambda kv: -kv[1])
    runner = ordered[1][1] if len(ordered) > 1 else 0.0
    margin = max(0.0, (call.score - runner) / call.score) if call.score > 0 else 0.0
    confidence = min(1.0, call.score / STRONG_SCORE) * (0.5 + 0.5 * margin)
    if call.support:
        confidence *= min(share for _, share in call.support)
    if call.mixed or call.lineage_split:
        confidence *= 0.5
    confidence = 100.0 * confidence
    if call.unmeasured:
        confidence = min(confidence, UNCERTAIN)
    split = [f"{name} ({_percent(share)} of cells)" for name, share in call.lineage_split]
    # below a lineage split the subtypes' shares are of the majority lineage's cells: said so, not summed with it
    whole = "within " + call.cell_type.name if split and call.cell_type is not None else "of cells"
    within = [f"{name} ({_percent(share)} {whole})" for name, share in call.mixed]
    if split or within:
        mixed = split + within
    else:
        mixed = [f"{lin} lineage" for lin, sc in ordered[1:]
                 if sc >= MIXED_RATIO * call.score and sc >= MIN_SCORE]
    assert call.cell_type is not None
    parts = [f"Lineage {call.cell_type.lineage} (best root type score {call.score:.2f})"]
    if call.via is not None:
        parts[0] += (f", reached through {call.via[0]}'s markers ({', '.join(call.via[1])}): its root's own "
                     "markers are few or weak in this data")
    support = dict(call.support)
    for name, own, rival in call.chain:
        step = f"refined to {name} (own markers {own:.2f} vs {rival:.2f}"
        if name in support:
            step += f"; {_percent(support[name])} of the cells that carry a subtype signature carry its"
        parts.append(step + ")")
    text = ", ".join(parts) + f"; expressed markers: {', '.join(call.key_markers[:5])}."
    if split:
        text += (" The cluster's cells split between lineages: " + " and ".join(split)
                 + "; the call follows the majority's cells.")
    if within:
        text += (" The cluster's cells split between " + " and ".join(within)
                 + f", so it is called at the common level ({call.cell_type.name}).")
    if call.unmeasured:
        missing = ", ".join(f"{gene} ({name})" for gene, name in call.unmeasured)
        text += (f" Uncertain subtype: the data do not measure {missing}, so the subtypes cannot be "
                 "told apart reliably.")
    if call.declined:
        name, share, missing = call.declined
        text += f" Not refined to {name}: {_percent(share)} of the cells carry its signature"
        if missing:
            text += ", and the data do not measure " + ", ".join(f"{gene} ({of})" for gene, of in missing)
        text += "."
    if call.blood_only is not None:
        text += (f" PTPRC (CD45) is detected in {_percent(call.blood_only)} of the cells: only blood-cell lineages "
                 "were weighed.")
    if call.rival:
        text += f" Next lineage: {call.rival[0]} ({call.rival[1]:.2f})."
    return ClusterAnnotation(
        cluster=cm.cluster,
        main_cell_type=call.cell_type.name,
        # a cluster called at the parent of the subtypes its cells split between: those are its likely subtypes
        sub_cell_types=[name for name, _ in call.mixed][:3],
        mixed_cell_types=mixed,
        confidence=round(confidence, 1),
        key_markers=call.key_markers,
        reasoning=text,
        markers_sent=list(cm.genes),
    )
