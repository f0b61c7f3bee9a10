"""The run scored against the labels the input already carries, deterministically, through the Cell Ontology.

The author labels are ``obs[label_key]`` or, found automatically, a CELLxGENE file's ``cell_type`` and
``cell_type_ontology_term_id`` (kept by :mod:`cassia_helpers.dataset.author` as ``author_cell_type`` and
``author_cell_type_ontology_term_id``). They are never changed. Free-text labels are mapped to CL the same way
the run's calls are (:meth:`CellOntology.match`; a label that maps to nothing is tried again with the word ``cell``
appended, for shorthand such as ``CD19+ B`` or ``Dendritic``); CL ids are taken as they are. Each of the run's calls is
compared with the author's CL term:

- ``exact``: the same term;
- ``partial``: one is an ancestor of the other; ``distance`` counts the ``is_a`` steps between them on the
  most specific chain (the transitive reduction of CL's ancestors);
- ``lineage``: the same broad lineage (:meth:`CellOntology.lineage`), neither an ancestor of the other;
- ``wrong``: anything else, the run's ``Unknown`` included (an unmapped call earns nothing);
- ``unscored``: the author's label is not mapped to CL (such labels are listed).

Per cluster the call is compared with the label most of its cells carry; per dataset every cell is scored by
its cluster's call against its own label, and the shares are of the scored cells.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING

import pandas as pd

from cassia_helpers.dataset.existing import input_column, kept_as
from cassia_helpers.dataset.ontology import UNMATCHED, CellOntology, load_cell_ontology
from cassia_helpers.dataset.record import cluster_key, provenance
from cassia_helpers.dataset.record import label_key as calls_key

if TYPE_CHECKING:
    from anndata import AnnData

SCORES = ("exact", "partial", "lineage", "wrong")
UNSCORED = "unscored"
#: the input's own columns of CELLxGENE's schema scored against without a label_key, the term ids first
CELLXGENE_LABELS = ("cell_type_ontology_term_id", "cell_type")
#: author labels that mean "no label" (as text, lower case): those cells are not scored
MISSING_LABELS = frozenset({"", "nan", "none", "na", "n/a", "null"})


def _parents(onto: CellOntology, term: str) -> frozenset[str]:
    ancestors = set(onto.ancestors(term))
    implied = set()
    for other in ancestors:
        implied.update(a for a in onto.ancestors(other) if a != other)
    return frozenset(ancestors - implied)


def distance(onto: CellOntology, descendant: str, ancestor: str) -> int:
    """``is_a`` steps from ``descendant`` up to ``ancestor`` (0 for the same term) on the transitive reduction."""
    level, frontier, seen = 0, {descendant}, set()
    while frontier:
        if ancestor in frontier:
            return level
        seen |= frontier
        frontier = {p for t in frontier for p in _parents(onto, t)} - seen
        level += 1
    raise ValueError(f"{ancestor} is not an ancestor of {descendant}")


def compare(onto: CellOntology, call: str, author: str) -> tuple[str, int | None]:
    """``(score, distance)`` of the run's CL term ``call`` against the author's ``author`` (see the module)."""
    if author == UNMATCHED or author not in onto.terms:
        return UNSCORED, None
    if call == UNMATCHED or call not in onto.terms:
        return "wrong", None
    if call == author:
        return "exact", 0
    if onto.is_ancestor(author, call):
        return "partial", distance(onto, call, author)
    if onto.is_ancestor(call, author):
        return "partial", distance(onto, author, call)
    lineage = onto.lineage(call)[0]
    if lineage != UNMATCHED and lineage == onto.lineage(author)[0]:
        return "lineage", None
    return "wrong", None


def _author_terms(onto: CellOntology, labels: pd.Series, *, ids: bool, tissue: str) -> dict[str, str]:
    match = functools.partial(onto.match, tissue=tissue)
    terms = {}
    for label in pd.unique(labels):
        if ids:
            term = onto.normalise_id(label)
            terms[label] = term if term in onto.terms else UNMATCHED
        else:
            term = match(label).term_id
            if term == UNMATCHED and not str(label).strip().lower().endswith(("cell", "cells")):
                # author shorthand names the cell without the word: "CD19+ B", "CD56+ NK", "Dendritic"
                term = match(f"{label} cell").term_id
            terms[label] = term
    return terms


def score_against_authors(adata: AnnData, *, label_key: str = "", tissue: str = "") -> pd.DataFrame | None:
    """Score the run's calls (``obs['cell_type_ontology_term_id']``) against the author labels; ``None`` when
    the input has none.

    Writes ``uns['cassia_batch']['self_score']``: ``label_key`` (the column scored against), ``clusters``
    (one row per cluster: ``cluster``, ``author_label``, ``author_label_fraction``, ``author_term_id``,
    ``call_term_id``, ``self_score``, ``self_score_distance``), ``summary`` (shares of the scored cells per
    score, ``scored_cells``, ``unscored_cells``, ``unmapped_author_labels``) and ``confusion`` (cells per pair of
    author label and call: ``author_label``, ``call``, ``n_cells``, ``self_score``; what the report's confusion
    view shows).
    """
    if label_key:
        column = input_column(adata, label_key, what="label_key")
    else:
        column = next(filter(None, (kept_as(adata, "obs", c) for c in CELLXGENE_LABELS)), "")
        if not column:
            return None
    onto = load_cell_ontology()
    values = adata.obs[column]
    labels = values.astype(str)
    # a cell the author left without a label is not scored (nor listed as the label "nan")
    labelled = (values.notna() & ~labels.str.strip().str.lower().isin(MISSING_LABELS)).to_numpy()
    terms = _author_terms(onto, labels[labelled], ids=column.endswith("ontology_term_id"), tissue=tissue)
    author = labels.map(terms).where(labelled, UNMATCHED)
    clusters = adata.obs[cluster_key(adata)].astype(str)
    calls = adata.obs["cell_type_ontology_term_id"].astype(str)
    rows, per_cell = [], pd.Series(UNSCORED, index=adata.obs_names, dtype=object)
    for cluster in pd.unique(clusters):
        mask = (clusters == cluster).to_numpy()
        call = calls[mask].iloc[0]
        counts = labels[mask & labelled].value_counts()
        top = counts.index[0] if len(counts) else ""
        score, steps = compare(onto, call, terms.get(top, UNMATCHED))
        rows.append({"cluster": cluster, "author_label": top,
                     "author_label_fraction": round(float(counts.iloc[0] / mask.sum()) if len(counts) else 0.0, 4),
                     "author_term_id": terms.get(top, UNMATCHED), "call_term_id": call, "self_score": score,
                     "self_score_distance": float("nan") if steps is None else float(steps)})
        outcome = {term: compare(onto, call, term)[0] for term in pd.unique(author[mask])}
        per_cell[mask] = author[mask].map(outcome).to_numpy()
    table = pd.DataFrame(rows)
    scored = per_cell[per_cell != UNSCORED]
    summary = {f"self_{s}": round(float((scored == s).mean()), 4) if len(scored) else float("nan") for s in SCORES}
    summary.update(self_score_key=column, scored_cells=int(len(scored)),
                   unscored_cells=int((per_cell == UNSCORED).sum()),
                   unmapped_author_labels=sorted(label for label, term in terms.items() if term == UNMATCHED))
    called = adata.obs[calls_key(adata)].astype(str) if calls_key(adata) in adata.obs else calls
    pairs = pd.DataFrame({"author_label": labels.to_numpy(), "call": called.to_numpy(),
                          "self_score": per_cell.to_numpy()})[labelled]
    confusion = (pairs.groupby(["author_label", "call", "self_score"], observed=True).size()
                 .rename("n_cells").reset_index().sort_values("n_cells", ascending=False, kind="stable"))
    provenance(adata)["self_score"] = {"label_key": column, "clusters": table, "summary": summary,
                                       "confusion": confusion.reset_index(drop=True)}
    return table
