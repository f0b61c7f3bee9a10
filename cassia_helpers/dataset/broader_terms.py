"""The last-resort stages of the label -> Cell Ontology mapping (:mod:`cassia_helpers.dataset.ontology`): the
tissue-qualified term of a label, and the nearest broader term a qualified label names."""

from __future__ import annotations

from typing import TYPE_CHECKING

from cassia_helpers.dataset import label_text

if TYPE_CHECKING:
    from cassia_helpers.dataset.ontology import CellOntology

#: how a tissue of the marker reference is named in tissue-qualified CL terms ("... of mammary gland")
TISSUE_QUALIFIERS = {
    "breast": ("mammary gland",), "lung": ("lung",), "liver": ("liver",), "kidney": ("kidney",),
    "pancreas": ("pancreas",), "intestine": ("small intestine", "colon", "intestine"), "skin": ("epidermis", "skin"),
    "heart": ("heart",), "brain": ("brain",), "bone_marrow": ("bone marrow",), "blood": ("blood",),
    "lymphoid_organ": ("spleen", "lymph node"),
}


def tissue_qualified(onto: CellOntology, label: str, tissue: str) -> str | None:
    """The term of ``"{label} of {organ}"`` for the sample's tissue (stages 1-3 on the qualified name)."""
    from cassia_helpers.dataset.annotate.reference.catalog import load_reference

    for key in load_reference().resolve_tissue(tissue) if tissue else ():
        for organ in TISSUE_QUALIFIERS.get(key, ()):
            found, _, _ = onto._deterministic(f"{label} of {organ}")
            if found is not None:
                return found
    return None

def broader(onto: CellOntology, label: str) -> tuple[str, list[str]] | None:
    """The term named by the longest tail of the label's words (``"Adaptive NK cell"`` → ``"NK cell"``), when
    it names one term, and the label's words it leaves out; ``None`` for a label naming several types
    (``"T and B cells"``, ``"mixed"``, ``"doublet"``) or with no such tail."""
    words = label_text.tokens(label)
    if {"and", "or", "mixed", "mixture", "doublet", "doublets"} & set(words) or "/" in label:
        return None
    norm, _, reference = onto._normalised
    for start in range(1, len(words) - 1 + 1):
        tail = words[start:]
        if not label_text.content_words(tail):
            break
        ids = norm.get(" ".join(tail), set()) | reference.get(" ".join(tail), set())
        if len(ids) == 1:
            return next(iter(ids)), words[:start]
        if ids:
            return None
    return None
