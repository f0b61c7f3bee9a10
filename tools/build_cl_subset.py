"""Build the offline Cell Ontology subset shipped with the package.

Usage::

    pip install "cellxgene-ontology-guide==1.11.1"   # build time only, see the ``cl-build`` extra
    python tools/build_cl_subset.py [--out cassia_helpers/dataset/data/cl_subset.json.gz]

Reads the Cell Ontology (CL) release bundled with CZI's ``cellxgene-ontology-guide`` (the release its
latest CELLxGENE schema version pins) and writes a small gzip JSON with, for every non-deprecated CL
term: its label, exact synonyms and its is-a/part-of ancestors ordered nearest first. It also records
the broad-lineage terms used for ``obs['cell_type_lineage']`` and the versions it was built from.
The package needs nothing but this file at run time (no network, no ontology package).
"""

from __future__ import annotations

import argparse
import gzip
import json
from importlib import metadata
from pathlib import Path

OUT = Path(__file__).resolve().parents[1] / "cassia_helpers" / "annotate" / "data" / "cl_subset.json.gz"

#: Broad-lineage terms: a cluster's lineage is the nearest of these among its term and its ancestors
#: (ties go to the earlier entry). Chosen to answer "which compartment is this?" across tissues.
LINEAGE_TERMS = (
    "CL:0000084",  # T cell
    "CL:0000623",  # natural killer cell
    "CL:0001065",  # innate lymphoid cell
    "CL:0000945",  # lymphocyte of B lineage (B cells and plasma cells)
    "CL:0000451",  # dendritic cell (CL does not place every dendritic cell under myeloid cell)
    "CL:0000763",  # myeloid cell
    "CL:0000232",  # erythrocyte
    "CL:0000764",  # erythroid lineage cell
    "CL:0000556",  # megakaryocyte
    "CL:0000233",  # platelet
    "CL:0008001",  # hematopoietic precursor cell
    "CL:0000988",  # hematopoietic cell
    "CL:0000540",  # neuron
    "CL:0000125",  # glial cell
    "CL:0000115",  # endothelial cell
    "CL:0000669",  # pericyte
    "CL:0000192",  # smooth muscle cell
    "CL:0000187",  # muscle cell
    "CL:0000057",  # fibroblast
    "CL:0000136",  # adipocyte (fat cell)
    "CL:0000148",  # melanocyte
    "CL:0000077",  # mesothelial cell
    "CL:0000066",  # epithelial cell
    "CL:0000499",  # stromal cell
    "CL:0000586",  # germ cell
    "CL:0000034",  # stem cell
)


def build(out: Path) -> dict:
    try:
        from cellxgene_ontology_guide.ontology_parser import OntologyParser
    except ModuleNotFoundError:
        raise SystemExit("build_cl_subset.py needs the cl-build extra: pip install -e '.[cl-build]'") from None

    parser = OntologyParser()
    schema = parser.cxg_schema
    cl = schema.ontology("CL")
    terms = {}
    for term_id, meta in cl.items():
        if meta.get("deprecated") or not term_id.startswith("CL:"):
            continue
        ancestors = meta.get("ancestors", {})
        terms[term_id] = {
            "label": meta["label"],
            "synonyms": sorted(set(meta.get("synonyms", []))),
            "ancestors": sorted(ancestors, key=lambda a: (ancestors[a], a)),
        }
    missing = [t for t in LINEAGE_TERMS if t not in terms]
    if missing:
        raise SystemExit(f"lineage terms not in this CL release: {missing}")
    doc = {
        "ontology": "CL",
        "cl_version": schema.supported_ontologies["CL"]["version"],
        "cellxgene_schema_version": schema.version,
        "built_with": f"cellxgene-ontology-guide {metadata.version('cellxgene-ontology-guide')}",
        "lineage_terms": list(LINEAGE_TERMS),
        "terms": terms,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    payload = json.dumps(doc, separators=(",", ":"), sort_keys=True).encode("utf-8")
    # mtime=0 keeps the file byte-identical between builds of the same release
    out.write_bytes(gzip.compress(payload, compresslevel=9, mtime=0))
    return doc


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args()
    doc = build(args.out)
    print(f"wrote {args.out} ({args.out.stat().st_size} bytes): {len(doc['terms'])} CL terms, "
          f"CL {doc['cl_version']}, CELLxGENE schema {doc['cellxgene_schema_version']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
