"""What the CASSIA-style agents are told: their system prompts, the structured answer's schema, and the
message every agent sees for one cluster. Plain text only (no client import), so the dry run can size
the requests without loading the OpenAI client."""

from __future__ import annotations

import hashlib
import json

from cassia_helpers.dataset.annotate import ClusterMarkers

ANNOTATOR_SYSTEM = """You are the annotator agent of a cell-type annotation team, an expert in single-cell \
RNA-seq biology. You receive the ranked marker genes (best first) of one cluster, with the species and \
tissue. Reason step by step:
1. Name the key functional markers among them and what they indicate.
2. Name the canonical cell-type markers among them.
3. Compare with what is known of this tissue's cell types (marker databases and literature).
4. Decide the most likely general cell type.
5. Give up to three more specific sub types, most likely first.
6. Say whether the markers suggest a mixture of cell types, and which.
Cite only genes that appear in the marker list you were given. End with one line:
FINAL ANNOTATION: <main cell type>"""

FORMATTER_SYSTEM = """You are the formatter agent of a cell-type annotation team. Turn the annotator's \
analysis into JSON with exactly these fields: main_cell_type (string), sub_cell_types (list of up to 3 \
strings, most likely first), mixed_cell_types (list of strings), confidence (integer 0-100), key_markers \
(list of genes from the marker list that support the call), reasoning (one or two sentences), \
cell_ontology_id (the Cell Ontology id of main_cell_type, such as CL:0000236 for B cell, or an empty string \
when unsure). Reply with the JSON object only."""

VALIDATOR_SYSTEM = """You are the validator agent of a cell-type annotation team. Check the annotation \
against the cluster's marker genes, the species and the tissue: are the cited markers really in the list, \
do they support the call, is a more likely cell type ignored? Reply with VALIDATION PASSED or \
VALIDATION FAILED on the first line, then specific feedback in a few sentences."""

ANSWER_FIELDS = ("main_cell_type", "sub_cell_types", "mixed_cell_types", "confidence", "key_markers", "reasoning",
                 "cell_ontology_id")
ANSWER_SCHEMA = {
    "type": "json_schema",
    "json_schema": {
        "name": "cell_type_annotation",
        "strict": True,
        "schema": {
            "type": "object",
            "properties": {
                "main_cell_type": {"type": "string"},
                "sub_cell_types": {"type": "array", "items": {"type": "string"}},
                "mixed_cell_types": {"type": "array", "items": {"type": "string"}},
                "confidence": {"type": "integer"},
                "key_markers": {"type": "array", "items": {"type": "string"}},
                "reasoning": {"type": "string"},
                "cell_ontology_id": {"type": "string"},
            },
            "required": list(ANSWER_FIELDS),
            "additionalProperties": False,
        },
    },
}
PROMPT_VERSION = hashlib.sha256(
    "\n".join([ANNOTATOR_SYSTEM, FORMATTER_SYSTEM, VALIDATOR_SYSTEM, json.dumps(ANSWER_SCHEMA)]).encode()
).hexdigest()[:12]


def cluster_prompt(markers: ClusterMarkers, *, tissue: str, species: str, context: str) -> str:
    """The user message every agent sees for one cluster."""
    lines = [f"Species: {species}", f"Tissue: {tissue}",
             f"Cluster: {markers.cluster} ({markers.n_cells} cells)"]
    if context:
        lines.append(f"Context: {context}")
    lines.append(f"Ranked markers (best first): {', '.join(markers.genes)}")
    return "\n".join(lines)


#: typical size in characters of the :func:`reference_check` note (the called type and two rivals, six genes
#: each), for estimates made before any data is read
REFERENCE_NOTE_CHARS = 400


def _prompt_field(prompt: str, name: str) -> str:
    """A ``Name: value`` line of a :func:`cluster_prompt` message."""
    for line in prompt.splitlines():
        if line.startswith(f"{name}: "):
            return line[len(name) + 2:].strip()
    return ""


def reference_check(call: str, prompt: str, genes: list[str]) -> str:
    """The marker reference's canonical markers of the called type and of its nearest rivals (the types the
    cluster's list points to), for the validator and the boost agent: a blank line and the note, or ``""``.

    ``prompt`` is the cluster's :func:`cluster_prompt` message (its species and tissue are read from it).
    """
    from cassia_helpers.dataset.annotate.reference.retrieval import reference_note

    note = reference_note(call, genes, tissue=_prompt_field(prompt, "Tissue"),
                          species=_prompt_field(prompt, "Species"))
    return f"\n\n{note}" if note else ""
