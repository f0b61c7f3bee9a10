"""Map free-text cell-type labels to Cell Ontology (CL) terms, offline.

The ontology is a subset of CL (every non-deprecated term: label, exact synonyms, ancestors) shipped
as ``cassia_helpers/dataset/data/cl_subset.json.gz``; ``tools/build_cl_subset.py`` regenerates it and
the file records the CL release it came from. Nothing is fetched at run time.

A label is matched in this order, the first stage that gives exactly one term wins:

1. ``exact``: the CL label or an exact CL synonym (case-insensitive);
2. ``reference``: a name or synonym of the packaged marker reference, whose types carry a curated
   ``cl_id`` (``"CD4+ T cell"``, ``"OPC"``, ``"cDC2"``);
3. ``normalised``: the same comparisons after normalising both sides: case, punctuation, plurals
   (``"T cells"``), ``"+"``/``"pos"``/``"positive"`` and ``"-"``/``"negative"`` after a marker
   (``"CD14+ monocyte"`` = ``"CD14-positive monocyte"``; a bare CD marker before a word is read as
   positive, ``"CD8 T cells"`` = ``"CD8+ T cells"``), and word order
   (``"Monocyte (classical)"`` = ``"classical monocyte"``);
4. ``tissue``: with the sample's tissue, the tissue-qualified term (breast: ``"Luminal epithelial cell"``
   → luminal epithelial cell of mammary gland), by the same comparisons;
5. ``proposed``: an id proposed by the annotator (e.g. an LLM's ``cell_ontology_id``), accepted only
   when the id exists in CL and does not contradict the label (:func:`validate_proposed_id`);
6. ``ancestor``: the most specific term whose every word is in the label, when there is one
   (``"Adaptive NK cell"`` → natural killer cell, ``"Basal epithelial cell"`` → epithelial cell): the
   nearest broader term, and the note names the words left out.

CL's related and broad synonyms are not in the CL release the subset is built from (its one synonym list is
what the subset carries), so qualifiers CL does not name end at the nearest broader term (stage 6).

There is no fuzzy matching: a misspelt label stays unmatched rather than land on a wrong term.
Unmatched labels get the id and name ``"unknown"`` (CELLxGENE's value for an unknown cell type).
Every matched term also gets a broad lineage: the nearest of a fixed list of high-level CL terms
(T cell, natural killer cell, myeloid cell, neuron, glial cell, epithelial cell, ...) among the term
and its ancestors.
"""

from __future__ import annotations

import functools
import gzip
import json
import re
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from cassia_helpers.dataset import broader_terms, label_text

__all__ = [
    "UNMATCHED",
    "CellOntology",
    "OntologyMatch",
    "annotate_ontology",
    "load_cell_ontology",
    "map_label",
    "validate_proposed_id",
]

#: id and name written for a label without a CL term (the CELLxGENE schema's value)
UNMATCHED = "unknown"
_ID_RE = re.compile(r"^\s*CL[:_ ]?(\d{7})\s*$", re.IGNORECASE)
_UNKNOWN_LABELS = frozenset({"", "unknown", "unassigned", "na", "nan", "none", "unclassified", "other"})


@dataclass(frozen=True)
class OntologyMatch:
    """The CL term a label was mapped to.

    ``term_id`` and ``term_name`` are ``"unknown"`` when nothing matched; ``method`` says how the match
    was made (``exact``, ``reference``, ``normalised``, ``tissue``, ``proposed``, ``ancestor`` or
    ``unmatched``) and ``note`` what a broader (``ancestor``) match left out,
    why a proposed id was rejected or a label left unmatched.
    """

    label: str
    term_id: str
    term_name: str
    lineage_id: str
    lineage_name: str
    method: str
    note: str = ""

    @property
    def matched(self) -> bool:
        return self.method != "unmatched"

    def to_dict(self) -> dict:
        return asdict(self)


class CellOntology:
    """The packaged CL subset with label/synonym indexes.

    Parameters
    ----------
    doc
        The parsed subset file (see ``tools/build_cl_subset.py``).
    reference_names
        Extra curated ``name -> CL id`` pairs (the marker reference's ``cl_id`` fields).
    """

    def __init__(self, doc: dict[str, Any], reference_names: dict[str, str] | None = None) -> None:
        self.version: str = doc["cl_version"]
        self.schema_version: str = doc.get("cellxgene_schema_version", "")
        self.terms: dict[str, dict[str, Any]] = doc["terms"]
        self.lineage_terms: tuple[str, ...] = tuple(doc["lineage_terms"])
        self._exact: dict[str, set[str]] = {}
        label_ids: dict[str, set[str]] = {}
        for term_id, term in self.terms.items():
            label_ids.setdefault(term["label"].lower(), set()).add(term_id)
            for name in (term["label"], *term.get("synonyms", ())):
                self._exact.setdefault(name.lower().strip(), set()).add(term_id)
        # a term's own label beats another term's synonym
        for name, ids in label_ids.items():
            self._exact[name] = set(ids)
        self._reference = {k.lower().strip(): v for k, v in (reference_names or {}).items() if v in self.terms}

    @functools.cached_property
    def _normalised(self) -> tuple[dict[str, set[str]], dict[str, set[str]], dict[str, set[str]]]:
        """Term ids by the normalised form of every name and synonym (in order, and as a bag of words),
        and the reference's names by both forms; built on the first label that has no exact match."""
        norm: dict[str, set[str]] = {}
        bags: dict[str, set[str]] = {}
        for term_id, term in self.terms.items():
            for name in (term["label"], *term.get("synonyms", ())):
                norm.setdefault(label_text.key(name), set()).add(term_id)
                bags.setdefault(label_text.bag(name), set()).add(term_id)
        reference: dict[str, set[str]] = {}
        for name, term_id in self._reference.items():
            reference.setdefault(label_text.key(name), set()).add(term_id)
            reference.setdefault(label_text.bag(name), set()).add(term_id)
        return norm, bags, reference

    # ------------------------------------------------------------ terms

    def normalise_id(self, term_id: str) -> str | None:
        """Return ``"CL:NNNNNNN"`` for an id written as ``CL:…``, ``CL_…`` or ``cl …``; else ``None``."""
        m = _ID_RE.match(str(term_id or ""))
        return f"CL:{m.group(1)}" if m else None

    def name(self, term_id: str) -> str:
        """Return the canonical CL label of a term id (``KeyError`` if absent)."""
        return self.terms[term_id]["label"]

    def ancestors(self, term_id: str) -> list[str]:
        """Return the ancestors of a term, nearest first."""
        return list(self.terms[term_id]["ancestors"])

    def is_ancestor(self, ancestor: str, term_id: str) -> bool:
        """Whether ``ancestor`` is a (strict) ancestor of ``term_id``."""
        return term_id in self.terms and ancestor in self.terms[term_id]["ancestors"]

    def related(self, a: str, b: str) -> bool:
        """Whether two terms are equal or one is an ancestor of the other."""
        return a == b or self.is_ancestor(a, b) or self.is_ancestor(b, a)

    def lineage(self, term_id: str) -> tuple[str, str]:
        """Return the broad-lineage term ``(id, name)`` of a term: the nearest lineage term at or above it."""
        if term_id not in self.terms:
            return UNMATCHED, UNMATCHED
        chain = [term_id, *self.terms[term_id]["ancestors"]]
        for term in chain:
            if term in self.lineage_terms:
                return term, self.name(term)
        return UNMATCHED, UNMATCHED

    # ------------------------------------------------------------ matching

    def _result(self, label: str, term_id: str, method: str, note: str = "") -> OntologyMatch:
        lin_id, lin_name = self.lineage(term_id)
        return OntologyMatch(label, term_id, self.name(term_id), lin_id, lin_name, method, note)

    def _unmatched(self, label: str, note: str) -> OntologyMatch:
        return OntologyMatch(label, UNMATCHED, UNMATCHED, UNMATCHED, UNMATCHED, "unmatched", note)

    def _deterministic(self, label: str) -> tuple[str | None, str, str]:
        """(term id or None, method, note) from stages 1-3."""
        text = label.lower().strip()
        notes = []

        def stages():
            yield "exact", self._exact.get(text, set())
            yield "reference", {self._reference[text]} if text in self._reference else set()
            norm, bags, reference = self._normalised
            key, bag = label_text.key(label), label_text.bag(label)
            yield "normalised", norm.get(key, set()) | reference.get(key, set())
            yield "normalised", bags.get(bag, set()) | reference.get(bag, set())

        for method, candidates in stages():
            if len(candidates) == 1:
                return next(iter(candidates)), method, ""
            if len(candidates) > 1:
                notes.append(f"ambiguous {method} match: {', '.join(sorted(candidates))}")
        return None, "unmatched", "; ".join(notes)

    def consistent(self, label: str, term_id: str) -> bool:
        """Whether a label can name ``term_id``: it maps to a related term, or its words agree with the term's.

        With no deterministic match, every marker-like word of the label (``cd4``, ``foxp3``) must occur
        in the term's label or synonyms (or its ancestors'), and at least one other informative word must
        be shared, e.g. ``"Microglia"`` with ``"microglial cell"``; ``"CD4+ T cell"`` with a CD8 term fails.
        """
        if term_id not in self.terms:
            return False
        found, _, _ = self._deterministic(label)
        if found is not None:
            return self.related(found, term_id)
        words = label_text.content_words(label_text.tokens(label))
        if not words:
            return False
        names = [self.terms[term_id]["label"], *self.terms[term_id].get("synonyms", ())]
        own = {t for n in names for t in label_text.tokens(n)}
        wider = own | {t for a in self.terms[term_id]["ancestors"][:3] for t in label_text.tokens(self.name(a))}
        if any(label_text.marker_like(word) and word not in own for word in words):
            return False
        informative = [word for word in words if not label_text.marker_like(word)]
        if not informative:
            return words <= own
        return any(label_text.similar(word, t) for word in informative for t in wider)

    def match(self, label: str, *, proposed_id: str | None = None, tissue: str = "") -> OntologyMatch:
        """Map one label (and optionally an annotator-proposed CL id) to a term.

        Parameters
        ----------
        label
            The cell-type label as written by the annotator.
        proposed_id
            A CL id proposed for it (``"CL:0000084"``); used only when the label itself does not match,
            and only when :meth:`consistent` accepts it.
        tissue
            The sample's tissue, for tissue-qualified terms.

        Returns
        -------
        OntologyMatch
            ``method="unmatched"`` with a note when nothing matched.
        """
        label = str(label or "").strip()
        if label.lower() in _UNKNOWN_LABELS:
            return self._unmatched(label, "no cell type was called")
        found, method, note = self._deterministic(label)
        if found is not None:
            return self._result(label, found, method)
        qualified = broader_terms.tissue_qualified(self, label, tissue)
        if qualified is not None:
            return self._result(label, qualified, "tissue", f"the {tissue} term of the label")
        if proposed_id:
            term = self.normalise_id(proposed_id)
            if term is None or term not in self.terms:
                note = "; ".join(filter(None, [note, f"proposed id {proposed_id!r} is not a CL term"]))
            elif not self.consistent(label, term):
                note = "; ".join(filter(None, [note, f"proposed {term} ({self.name(term)}) contradicts the label"]))
            else:
                return self._result(label, term, "proposed")
        broader = broader_terms.broader(self, label)
        if broader is not None:
            term, left_out = broader
            return self._result(label, term, "ancestor", "nearest broader term; CL has no term for "
                                + (", ".join(left_out) if left_out else "the label's qualifiers"))
        return self._unmatched(label, note or "no CL term with this name or synonym")


def _reference_ids() -> dict[str, str]:
    try:
        from cassia_helpers.dataset.annotate.reference.catalog import load_reference
    except ImportError:  # pragma: no cover - the reference module is part of the package
        return {}
    names = {}
    for ct in load_reference().cell_types:
        if ct.cl_id:
            for name in (ct.name, *ct.synonyms):
                names[name] = ct.cl_id
    return names


@functools.lru_cache(maxsize=4)
def _load(path: str | None) -> CellOntology:
    if path is None:
        raw = resources.files("cassia_helpers.dataset").joinpath("data", "cl_subset.json.gz").read_bytes()
    else:
        raw = Path(path).read_bytes()
    doc = json.loads(gzip.decompress(raw).decode("utf-8"))
    return CellOntology(doc, _reference_ids())


def load_cell_ontology(path: str | Path | None = None) -> CellOntology:
    """Load the packaged CL subset (or another file built by ``tools/build_cl_subset.py``), once per process."""
    return _load(None if path is None else str(Path(path).resolve()))


def map_label(label: str, proposed_id: str | None = None, *, tissue: str = "") -> OntologyMatch:
    """Map a label to a CL term with the packaged ontology; see :meth:`CellOntology.match`."""
    return load_cell_ontology().match(label, proposed_id=proposed_id, tissue=tissue)


def validate_proposed_id(label: str, cl_id: str) -> OntologyMatch | None:
    """Accept an annotator-proposed CL id for a label, or reject it.

    Parameters
    ----------
    label
        The label the annotator gave.
    cl_id
        The id it proposed (``"CL:0000127"``; ``"CL_0000127"`` is accepted too).

    Returns
    -------
    OntologyMatch or None
        The term (``method="proposed"``) when the id exists in the packaged CL and is consistent with the
        label (see :meth:`CellOntology.consistent`); ``None`` for an unknown id or one that contradicts it.
    """
    onto = load_cell_ontology()
    term = onto.normalise_id(cl_id)
    if term is None or term not in onto.terms or not onto.consistent(label, term):
        return None
    return onto._result(str(label), term, "proposed")


def annotate_ontology(
    adata: Any,
    *,
    label_key: str | None = None,
    groupby: str | None = None,
    proposed_ids: dict[str, str] | None = None,
    key_added: str | None = None,
) -> Any:
    """Map every cluster's label to a CL term and write the CELLxGENE-style columns.

    Parameters
    ----------
    adata
        Annotated data with ``obs[label_key]`` (one label per cluster of ``obs[groupby]``).
    label_key
        Column holding the free-text labels (kept unchanged); default: the annotation's ``key_added``.
    groupby
        Cluster column; mapping is done once per cluster; default: the clustering's ``key_added``.
    proposed_ids
        ``{cluster: CL id}`` proposed by the annotator (validated, see :func:`validate_proposed_id`);
        default: the ids the LLM agents proposed, from ``uns['cassia_batch']['annotation']``.
    key_added
        Prefix of the written columns; default: ``label_key``.

    Returns
    -------
    pandas.DataFrame
        One row per cluster: ``cluster``, ``label``, ``term_id``, ``term_name``, ``lineage_id``,
        ``lineage_name``, ``method``, ``note``, ``n_cells``.

    Notes
    -----
    Writes ``obs[f"{key_added}_ontology_term_id"]`` (CL id or ``"unknown"``),
    ``obs[f"{key_added}_ontology_term"]`` (canonical CL name), ``obs[f"{key_added}_lineage"]`` (broad
    lineage name), ``obs[f"{key_added}_ontology_match"]`` (method) and
    ``uns['cassia_batch']['ontology']`` with ``cl_version``, ``key_added`` and the per-cluster table
    (``clusters``). With the default ``key_added="cell_type"`` the columns are CELLxGENE's
    ``cell_type_ontology_term_id`` with the raw label in ``obs['cell_type']``.
    """
    import pandas as pd

    from cassia_helpers.dataset.record import KEY, cluster_key, provenance
    from cassia_helpers.dataset.record import label_key as annotation_key

    label_key = label_key or annotation_key(adata)
    groupby = groupby or cluster_key(adata)
    key_added = key_added or label_key
    if proposed_ids is None:
        import json

        calls = json.loads(provenance(adata).get("annotation", {}).get("results_json", "[]") or "[]")
        proposed_ids = {str(c["cluster"]): c.get("cell_ontology_id", "") for c in calls if c.get("cell_ontology_id")}
    onto = load_cell_ontology()
    tissue = str(provenance(adata).get("annotation", {}).get("tissue", ""))
    clusters = adata.obs[groupby].astype(str)
    labels = adata.obs[label_key].astype(str)
    proposed = {str(k): v for k, v in (proposed_ids or {}).items()}
    rows = []
    by_cluster: dict[str, OntologyMatch] = {}
    for cluster in pd.unique(clusters):
        mask = (clusters == cluster).to_numpy()
        label = labels[mask].mode().iloc[0]
        m = onto.match(label, proposed_id=proposed.get(cluster), tissue=tissue)
        by_cluster[cluster] = m
        rows.append({"cluster": cluster, **{k: v for k, v in m.to_dict().items()}, "n_cells": int(mask.sum())})
    table = pd.DataFrame(rows, columns=["cluster", "label", "term_id", "term_name", "lineage_id",
                                        "lineage_name", "method", "note", "n_cells"])
    table.index = table["cluster"].to_numpy()
    for suffix, attr in (("ontology_term_id", "term_id"), ("ontology_term", "term_name"),
                         ("lineage", "lineage_name"), ("ontology_match", "method")):
        adata.obs[f"{key_added}_{suffix}"] = pd.Categorical(clusters.map({c: getattr(m, attr)
                                                                          for c, m in by_cluster.items()}))
    adata.uns.setdefault(KEY, {})["ontology"] = {
        "cl_version": onto.version,
        "cellxgene_schema_version": onto.schema_version,
        "key_added": key_added,
        "clusters": table,
    }
    return table
