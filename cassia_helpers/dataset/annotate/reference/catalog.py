"""The curated marker reference: its file format, loader and validation.

The reference (``data/markers.json``, shipped with the package) lists, for each cell type, 5-15
positive marker genes ordered from most to least specific, the tissues the type belongs to, an
optional more general parent type, a lineage, the Cell Ontology id of the type (``cl_id``), optional
``synonyms`` (other names, e.g. ``OPC``), optional ``absent_markers`` (genes that define the type by
their absence, e.g. CD3 for NK cells) and the sources the markers were taken from (cited under
``sources``). :func:`load_reference` parses and validates it; the scoring lives in
:mod:`cassia_helpers.dataset.annotate.reference.annotator`.
"""

from __future__ import annotations

import functools
import json
import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

__all__ = [
    "SUPPORTED_SPECIES",
    "MarkerReference",
    "ReferenceCellType",
    "ReferenceDataError",
    "load_reference",
    "normalise_species",
]

SUPPORTED_SPECIES = ("human", "mouse")
_SPECIES_SYNONYMS = {
    "human": "human",
    "homo sapiens": "human",
    "hs": "human",
    "hsa": "human",
    "mouse": "mouse",
    "mus musculus": "mouse",
    "mm": "mouse",
    "mmu": "mouse",
}

_REQUIRED_TOP = ("version", "sources", "tissues", "cell_types")


class ReferenceDataError(ValueError):
    """The marker reference file is missing, unreadable or malformed."""


@dataclass(frozen=True)
class ReferenceCellType:
    """One cell type of the marker reference."""

    name: str
    lineage: str
    parent: str | None
    tissues: tuple[str, ...] | None  # None means every tissue
    markers: tuple[str, ...]
    mouse_markers: tuple[str, ...]
    sources: tuple[str, ...]
    cl_id: str | None = None  # Cell Ontology term, e.g. "CL:0000084"
    absent_markers: tuple[str, ...] = ()  # genes the type does not express (human symbols)
    synonyms: tuple[str, ...] = ()  # other names of the type (abbreviations), for label -> CL mapping

    def absent_symbols(self, species: str) -> tuple[str, ...]:
        """Genes the type is defined not to express (e.g. CD3 for NK cells), for a species."""
        if species == "mouse":
            return tuple(dict.fromkeys(_title_case(m) for m in self.absent_markers))
        return self.absent_markers

    def symbols(self, species: str) -> tuple[str, ...]:
        """Return the marker symbols for a species.

        Parameters
        ----------
        species
            ``"human"`` or ``"mouse"``.

        Returns
        -------
        tuple of str
            Human symbols as listed, or the explicit mouse list (else the title-cased human symbols).
        """
        if species == "human":
            return self.markers
        if species == "mouse":
            return self.mouse_markers
        raise ValueError(f"unsupported species {species!r}; expected one of {SUPPORTED_SPECIES}")


@dataclass(frozen=True)
class MarkerReference:
    """The parsed and validated marker reference."""

    version: str
    sources: dict[str, str]
    tissue_synonyms: dict[str, tuple[str, ...]]
    aliases: dict[str, dict[str, tuple[str, ...]]]
    cell_types: tuple[ReferenceCellType, ...]
    path: str

    def by_name(self, name: str) -> ReferenceCellType:
        """Return the cell type called ``name`` (``KeyError`` if absent)."""
        for ct in self.cell_types:
            if ct.name == name:
                return ct
        raise KeyError(name)

    @functools.cached_property
    def _parents(self) -> dict[str, str | None]:
        return {ct.name: ct.parent for ct in self.cell_types}

    def ancestors(self, name: str) -> list[str]:
        """Return the chain of parent types of ``name``, nearest first."""
        parents = self._parents
        out: list[str] = []
        cur = parents.get(name)
        while cur is not None and cur not in out:
            out.append(cur)
            cur = parents.get(cur)
        return out

    def own_markers(self, cell_type: ReferenceCellType, species: str) -> list[tuple[int, str]]:
        """(order, symbol) of the markers of ``cell_type`` that none of its ancestors list: the ones that
        tell it from its parent."""
        inherited: set[str] = set()
        for name in self.ancestors(cell_type.name):
            inherited.update(self.by_name(name).symbols(species))
        return [(i, sym) for i, sym in enumerate(cell_type.symbols(species)) if sym not in inherited]

    def telling_markers(self, cell_type: ReferenceCellType, siblings: list[ReferenceCellType], species: str
                        ) -> list[tuple[int, str]]:
        """(order, symbol) of the markers that tell ``cell_type`` from its parent and from its ``siblings``:
        its :meth:`own_markers` that no sibling lists (IL7R, listed for both CD4+ T and MAIT cells, tells
        neither from the other)."""
        shared = {sym for sib in siblings if sib.name != cell_type.name for sym in sib.symbols(species)}
        return [(order, sym) for order, sym in self.own_markers(cell_type, species) if sym not in shared]

    def descendants(self, name: str) -> list[str]:
        """Return every type below ``name`` in the hierarchy (children first)."""
        return [ct.name for ct in self.cell_types if name in self.ancestors(ct.name)]

    def distinguishing_markers(self, cell_type: ReferenceCellType, siblings: list[ReferenceCellType],
                               species: str) -> list[tuple[int, str]]:
        """(order, symbol) of the :meth:`telling_markers` of ``cell_type`` that no sibling's subtype lists
        either (KLRB1, a MAIT-cell marker, is also listed for memory CD4+ T cells, so it does not tell a
        MAIT cell from a CD4+ T cell)."""
        below = {sym for sib in siblings if sib.name != cell_type.name for sub in self.descendants(sib.name)
                 for sym in self.by_name(sub).symbols(species)}
        return [(order, sym) for order, sym in self.telling_markers(cell_type, siblings, species) if sym not in below]

    def resolve_tissue(self, tissue: str) -> tuple[str, ...]:
        """Map a free-text tissue name to the reference's tissue keys.

        Parameters
        ----------
        tissue
            A dataset's tissue, e.g. a folder name such as ``"Breast"``, ``"pbmc"`` or ``"bone_marrow"``.

        Returns
        -------
        tuple of str
            The matching tissue keys (empty when nothing matches). An exact match on a key or
            synonym wins; otherwise every key with a synonym occurring as whole words in the text.
        """
        text = _normalise_text(tissue)
        if not text:
            return ()
        exact = [key for key, syns in self.tissue_synonyms.items() if text == _normalise_text(key) or text in syns]
        if exact:
            return tuple(exact)
        padded = f" {text} "
        found = [key for key, syns in self.tissue_synonyms.items() if any(f" {syn} " in padded for syn in syns)]
        return tuple(found)

    def candidates(self, tissue: str) -> list[ReferenceCellType]:
        """Return the cell types considered for a tissue.

        Parameters
        ----------
        tissue
            Free-text tissue name; see :meth:`resolve_tissue`.

        Returns
        -------
        list of ReferenceCellType
            Types of the resolved tissues plus the types found in every tissue; every type when the
            tissue is not recognised.
        """
        keys = set(self.resolve_tissue(tissue))
        if not keys:
            return list(self.cell_types)
        return [ct for ct in self.cell_types if ct.tissues is None or keys.intersection(ct.tissues)]

    def alias_names(self, symbol: str, species: str) -> tuple[str, ...]:
        """Return the symbol followed by its known former names for a species."""
        return (symbol, *self.aliases.get(species, {}).get(symbol, ()))


def _normalise_text(text: str) -> str:
    return " ".join(re.sub(r"[^0-9a-z]+", " ", str(text).lower()).split())


def _title_case(symbol: str) -> str:
    return symbol[:1].upper() + symbol[1:].lower()


def normalise_species(species: str) -> str:
    """Return ``"human"`` or ``"mouse"`` for a species name.

    Parameters
    ----------
    species
        E.g. ``"human"``, ``"Homo sapiens"``, ``"mouse"``, ``"Mus musculus"``.

    Returns
    -------
    str
        The canonical species name.

    Raises
    ------
    ValueError
        For a species the reference does not cover.
    """
    key = _normalise_text(species)
    if key not in _SPECIES_SYNONYMS:
        raise ValueError(f"unsupported species {species!r}; the marker reference covers {SUPPORTED_SPECIES}")
    return _SPECIES_SYNONYMS[key]


def _fail(where: str, message: str) -> ReferenceDataError:
    return ReferenceDataError(f"invalid marker reference {where}: {message}")


def _str_list(value: Any, where: str, field: str, *, min_len: int = 1, max_len: int | None = None) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) and v.strip() for v in value):
        raise _fail(where, f"'{field}' must be a list of non-empty strings")
    if len(value) < min_len or (max_len is not None and len(value) > max_len):
        bound = f"{min_len}-{max_len}" if max_len is not None else f"at least {min_len}"
        raise _fail(where, f"'{field}' must have {bound} entries, found {len(value)}")
    if len(set(value)) != len(value):
        raise _fail(where, f"'{field}' has duplicate entries")
    return [v.strip() for v in value]


def _parse_reference(doc: Any, path: str) -> MarkerReference:
    if not isinstance(doc, dict):
        raise _fail(path, "top level must be a JSON object")
    missing = [key for key in _REQUIRED_TOP if key not in doc]
    if missing:
        raise _fail(path, f"missing top-level field(s) {missing}")
    version = doc["version"]
    if not isinstance(version, str) or not version:
        raise _fail(path, "'version' must be a non-empty string")
    sources = doc["sources"]
    if not isinstance(sources, dict) or not sources or not all(isinstance(v, str) for v in sources.values()):
        raise _fail(path, "'sources' must be a non-empty object of citation strings")
    tissues_raw = doc["tissues"]
    if not isinstance(tissues_raw, dict) or not tissues_raw:
        raise _fail(path, "'tissues' must be a non-empty object")
    tissue_synonyms: dict[str, tuple[str, ...]] = {}
    for key, spec in tissues_raw.items():
        syns = _str_list((spec or {}).get("synonyms") if isinstance(spec, dict) else None,
                         f"{path} tissue {key!r}", "synonyms")
        tissue_synonyms[key] = tuple(dict.fromkeys([_normalise_text(key), *(_normalise_text(s) for s in syns)]))
    aliases: dict[str, dict[str, tuple[str, ...]]] = {}
    for species, table in (doc.get("aliases") or {}).items():
        if species not in SUPPORTED_SPECIES or not isinstance(table, dict):
            raise _fail(path, f"'aliases' must map {SUPPORTED_SPECIES} to objects, got key {species!r}")
        aliases[species] = {
            sym: tuple(_str_list(names, f"{path} aliases.{species}", sym)) for sym, names in table.items()
        }

    raw_types = doc["cell_types"]
    if not isinstance(raw_types, list) or not raw_types:
        raise _fail(path, "'cell_types' must be a non-empty list")
    cell_types: list[ReferenceCellType] = []
    seen: set[str] = set()
    for i, entry in enumerate(raw_types):
        label = entry.get("name") if isinstance(entry, dict) else None
        where = f"{path} cell_types[{i}] ({label})"
        if not isinstance(entry, dict):
            raise _fail(where, "each cell type must be an object")
        name = entry.get("name")
        if not isinstance(name, str) or not name.strip():
            raise _fail(where, "'name' must be a non-empty string")
        if name in seen:
            raise _fail(where, "duplicate cell type name")
        seen.add(name)
        lineage = entry.get("lineage")
        if not isinstance(lineage, str) or not lineage:
            raise _fail(where, "'lineage' must be a non-empty string")
        parent = entry.get("parent")
        if parent is not None and not isinstance(parent, str):
            raise _fail(where, "'parent' must be a string")
        tissues = entry.get("tissues")
        if tissues == "all":
            tissue_keys = None
        else:
            tissue_keys = tuple(_str_list(tissues, where, "tissues"))
            unknown = [t for t in tissue_keys if t not in tissue_synonyms]
            if unknown:
                raise _fail(where, f"unknown tissue(s) {unknown}; declare them under 'tissues'")
        markers = _str_list(entry.get("markers"), where, "markers", min_len=5, max_len=15)
        if "mouse_markers" in entry:
            mouse = _str_list(entry["mouse_markers"], where, "mouse_markers", min_len=3, max_len=15)
        else:
            mouse = list(dict.fromkeys(_title_case(m) for m in markers))
        srcs = _str_list(entry.get("sources"), where, "sources")
        unknown_src = [s for s in srcs if s not in sources]
        if unknown_src:
            raise _fail(where, f"unknown source(s) {unknown_src}; declare them under 'sources'")
        absent = _str_list(entry["absent_markers"], where, "absent_markers") if "absent_markers" in entry else []
        synonyms = _str_list(entry["synonyms"], where, "synonyms") if "synonyms" in entry else []
        cl_id = entry.get("cl_id")
        if cl_id is not None and (not isinstance(cl_id, str) or not re.fullmatch(r"CL:\d{7}", cl_id)):
            raise _fail(where, f"'cl_id' must look like 'CL:0000084', got {cl_id!r}")
        cell_types.append(
            ReferenceCellType(
                name=name,
                lineage=lineage,
                parent=parent,
                tissues=tissue_keys,
                markers=tuple(markers),
                mouse_markers=tuple(mouse),
                sources=tuple(srcs),
                cl_id=cl_id,
                absent_markers=tuple(absent),
                synonyms=tuple(synonyms),
            )
        )
    names = {ct.name for ct in cell_types}
    parents = {ct.name: ct.parent for ct in cell_types}
    for ct in cell_types:
        if ct.parent is not None and ct.parent not in names:
            raise _fail(f"{path} cell type {ct.name!r}", f"parent {ct.parent!r} is not a cell type of the file")
        chain, cur = [ct.name], ct.parent
        while cur is not None:
            if cur in chain:
                raise _fail(f"{path} cell type {ct.name!r}", f"parent cycle {chain + [cur]}")
            chain.append(cur)
            cur = parents.get(cur)
    return MarkerReference(
        version=version,
        sources=dict(sources),
        tissue_synonyms=tissue_synonyms,
        aliases=aliases,
        cell_types=tuple(cell_types),
        path=path,
    )


@functools.lru_cache(maxsize=8)
def _load_cached(path: str | None) -> MarkerReference:
    if path is None:
        resource = resources.files("cassia_helpers.dataset").joinpath("data", "markers.json")
        where = "cassia_helpers/dataset/data/markers.json"
        try:
            text = resource.read_text(encoding="utf-8")
        except (FileNotFoundError, OSError) as exc:
            raise ReferenceDataError(f"cannot read the packaged marker reference {where}: {exc}") from exc
    else:
        where = path
        try:
            text = Path(path).read_text(encoding="utf-8")
        except OSError as exc:
            raise ReferenceDataError(f"cannot read marker reference {where}: {exc}") from exc
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ReferenceDataError(f"marker reference {where} is not valid JSON: {exc}") from exc
    return _parse_reference(doc, where)


def load_reference(path: str | Path | None = None) -> MarkerReference:
    """Load and validate a marker reference, reading each file once per process.

    Parameters
    ----------
    path
        A JSON file in the format of the packaged ``data/markers.json``; ``None`` for the packaged one.

    Returns
    -------
    MarkerReference
        The parsed reference.

    Raises
    ------
    ReferenceDataError
        When the file cannot be read or does not have the expected structure.
    """
    return _load_cached(None if path is None else str(Path(path).resolve()))
