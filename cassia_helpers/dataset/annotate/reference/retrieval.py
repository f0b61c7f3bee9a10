"""Look-ups in the marker reference for a call: the reference type a label names, the types a cluster's
marker list points to instead, and the short note that gives both to the validator and the boost agent.

A label reaches a reference type by its name or synonym, else through its Cell Ontology term: the reference
type with that term, else with the term's nearest ancestor (``"Luminal epithelial cell"`` → luminal
epithelial cell of mammary gland → ... → epithelial cell → the reference's ``Epithelial cell``).
"""

from __future__ import annotations

from cassia_helpers.dataset.annotate.reference.catalog import ReferenceCellType, load_reference

__all__ = ["NOTE_GENES", "expected_in_tissue", "reference_note", "reference_type", "related_types", "rival_types"]

#: canonical genes per type given in a prompt (the reference lists them most specific first)
NOTE_GENES = 6
#: rival types given in a prompt
NOTE_RIVALS = 2


def _species(species: str) -> str:
    return "mouse" if str(species).strip().lower() in ("mouse", "mus musculus", "mm", "mmu") else "human"


def reference_type(label: str) -> ReferenceCellType | None:
    """The reference type a free-text label names (by name or synonym, else through its CL term and the
    term's ancestors, nearest first); ``None`` when the label reaches no reference type."""
    from cassia_helpers.dataset.ontology import load_cell_ontology

    text = str(label or "").strip().lower()
    if not text:
        return None
    ref = load_reference()
    for ct in ref.cell_types:
        if text == ct.name.lower() or text in (s.lower() for s in ct.synonyms):
            return ct
    onto = load_cell_ontology()
    match = onto.match(label)
    if not match.matched:
        return None
    by_id = {ct.cl_id: ct for ct in ref.cell_types if ct.cl_id}
    for term in [match.term_id, *onto.ancestors(match.term_id)]:
        if term in by_id:
            return by_id[term]
    return None


def related_types(cell_type: ReferenceCellType) -> set[str]:
    """Names of the reference types that are ``cell_type`` itself, a parent or a descendant of it (in the
    reference's hierarchy or in Cell Ontology): not rivals of a call of ``cell_type``."""
    from cassia_helpers.dataset.ontology import load_cell_ontology

    ref, onto = load_reference(), load_cell_ontology()
    names = {cell_type.name, *ref.ancestors(cell_type.name)}
    for ct in ref.cell_types:
        if cell_type.name in ref.ancestors(ct.name):
            names.add(ct.name)
        elif cell_type.cl_id and ct.cl_id and cell_type.cl_id in onto.terms and ct.cl_id in onto.terms \
                and onto.related(cell_type.cl_id, ct.cl_id):
            names.add(ct.name)
    return names


def expected_in_tissue(cell_type: ReferenceCellType, tissue: str) -> bool | None:
    """Whether the reference expects ``cell_type`` in ``tissue``; ``None`` when the tissue is not one the
    reference knows (nothing can be said)."""
    keys = load_reference().resolve_tissue(tissue)
    if not keys:
        return None
    return cell_type.tissues is None or bool(set(keys) & set(cell_type.tissues))


def rival_types(genes: list[str], tissue: str, species: str, *, exclude: set[str] | None = None,
                n: int = NOTE_RIVALS) -> list[ReferenceCellType]:
    """The ``n`` reference types of the tissue whose markers best match a ranked gene list (hits weighted
    by rank, at least two hits), leaving out the names in ``exclude``."""
    ref, species = load_reference(), _species(species)
    rank = {g.upper(): i for i, g in enumerate(genes)}
    scored = []
    for order, ct in enumerate(ref.candidates(tissue)):
        if exclude and ct.name in exclude:
            continue
        hits = [rank[g.upper()] for g in ct.symbols(species) if g.upper() in rank]
        if len(hits) >= 2:
            weight = sum(1.0 / (1.0 + r / 10.0) for r in hits)
            scored.append((-weight, order, ct))
    scored.sort(key=lambda item: item[:2])
    return [ct for *_, ct in scored[:n]]


def _line(ct: ReferenceCellType, species: str, present: set[str]) -> str:
    genes = ct.symbols(species)[:NOTE_GENES]
    found = [g for g in genes if g.upper() in present]
    return f"{ct.name}: {', '.join(genes)} (in the list: {', '.join(found) or 'none'})"


def reference_note(call: str, genes: list[str], *, tissue: str, species: str) -> str:
    """Canonical markers of the called type and of its nearest rivals, from the marker reference, for a
    prompt; empty when the call reaches no reference type and the list points to none."""
    species = _species(species)
    called = reference_type(call)
    exclude = related_types(called) if called is not None else set()
    rivals = rival_types(genes, tissue, species, exclude=exclude)
    if called is None and not rivals:
        return ""
    present = {g.upper() for g in genes}
    lines = ["Reference markers (offline marker database; check the call against them):"]
    if called is not None:
        expected = expected_in_tissue(called, tissue)
        where = "" if expected is not False else f" [not expected in {tissue}]"
        lines.append(f"- called type, {_line(called, species, present)}{where}")
    lines += [f"- alternative, {_line(ct, species, present)}" for ct in rivals]
    return "\n".join(lines)
