"""Offline reference annotator: match each cluster's ranked markers against a curated marker table.

The reference (``data/markers.json``, shipped with the package) lists, for each cell type, 5-15
positive marker genes ordered from most to least specific, the tissues the type belongs to, an
optional more general parent type and a lineage. :class:`ReferenceAnnotator` scores every candidate
type of the dataset's tissue against a cluster's ranked marker genes and reports the best match.

Scoring, per candidate type ``T`` and cluster ``C``:

* each reference marker of ``T`` found among the cluster's genes contributes
  ``w(rank) * v(order) * s``, where ``w(rank) = 1 / (1 + rank / 10)`` rewards genes near the top of
  the cluster's list (rank 0 is the best marker), ``v(order) = 1 / (1 + order / 10)`` rewards the
  more specific markers of ``T`` (listed first), and ``s`` is a specificity factor
  ``(pct_in - pct_out) / pct_in`` clipped to ``[0.3, 1]`` when ``pct_in`` / ``pct_out`` are given
  (``1`` otherwise), so genes expressed as much outside the cluster as inside count little;
* only the ``N`` best contributions count, and their sum is divided by the best achievable sum for
  ``N`` markers (the type's first ``N`` markers as the cluster's first ``N`` genes), so a type does
  not win merely by having a long marker list. ``N`` is the number of the type's markers that
  appear anywhere in the dataset's marker lists (markers the dataset never reports are treated as
  not measured), clipped to ``[3, 6]``.

A type needs at least two matched markers and a score of 0.15 to be called; otherwise the cluster is
unknown. The best type becomes ``main_cell_type``, with two hierarchy rules: a descendant that scores
within 10 % of a general winner and has a matched marker of its own is preferred, and the call then
descends into a subtype while that subtype's own markers (those its ancestors do not list) score at
least 0.12 and twice as much as any sibling's. ``sub_cell_types`` are well-scoring descendants and
other same-lineage candidates within 75 % of the best score, ``mixed_cell_types`` the best candidate
of each other lineage within 75 % of it. Confidence grows with the best score and with its margin
over the best type that is neither an ancestor nor a descendant of the call.
"""

from __future__ import annotations

import functools
import json
import math
import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from . import ClusterAnnotation, ClusterMarkers

__all__ = [
    "MarkerReference",
    "ReferenceAnnotator",
    "ReferenceCellType",
    "ReferenceDataError",
    "TypeScore",
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

#: rank at which a cluster gene's weight halves
RANK_SCALE = 10.0
#: position in a reference list at which a marker's weight halves
ORDER_SCALE = 10.0
#: at most this many matched markers count towards a score
TOP_N = 6
#: the score is normalised over at least this many markers
MIN_N = 3
#: below this score, or with fewer matched markers, the cluster is unknown
MIN_SCORE = 0.15
MIN_MATCHES = 2
#: a descendant within this fraction of a general winner's score is preferred
SPECIFIC_RATIO = 0.9
#: descend into a subtype when its own (not inherited) markers score at least this much ...
REFINE_MIN_SCORE = 0.12
#: ... and this many times the next subtype's
REFINE_RATIO = 2.0
#: sub / mixed cell types must reach this fraction of the best score
SUB_RATIO = 0.75
MIXED_RATIO = 0.75
#: floor of the pct_in / pct_out specificity factor
MIN_SPECIFICITY = 0.3
#: a score at or above this counts as full strength for the confidence
STRONG_SCORE = 0.6

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

    def ancestors(self, name: str) -> list[str]:
        """Return the chain of parent types of ``name``, nearest first."""
        parents = {ct.name: ct.parent for ct in self.cell_types}
        out: list[str] = []
        cur = parents.get(name)
        while cur is not None and cur not in out:
            out.append(cur)
            cur = parents.get(cur)
        return out

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


@dataclass
class TypeScore:
    """How well one reference type matches one cluster."""

    cell_type: ReferenceCellType
    score: float
    matched: list[tuple[str, int]]  # (cluster gene, rank in cluster), best rank first

    @property
    def name(self) -> str:
        return self.cell_type.name


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
        cell_types.append(
            ReferenceCellType(
                name=name,
                lineage=lineage,
                parent=parent,
                tissues=tissue_keys,
                markers=tuple(markers),
                mouse_markers=tuple(mouse),
                sources=tuple(srcs),
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
        resource = resources.files("cassia_helpers.annotate").joinpath("data", "markers.json")
        where = "cassia_helpers/annotate/data/markers.json"
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


def _rank_weight(rank: int) -> float:
    return 1.0 / (1.0 + rank / RANK_SCALE)


def _order_weight(order: int) -> float:
    return 1.0 / (1.0 + order / ORDER_SCALE)


def _ideal(n: int) -> float:
    return sum(_rank_weight(i) * _order_weight(i) for i in range(n))


def _specificity(cluster: ClusterMarkers) -> list[float] | None:
    """Per-gene factor ``(pct_in - pct_out) / pct_in`` clipped to [0.3, 1], or None without pct data."""
    n = len(cluster.genes)
    if len(cluster.pct_in) != n or len(cluster.pct_out) != n or n == 0:
        return None
    out = []
    for p_in, p_out in zip(cluster.pct_in, cluster.pct_out, strict=True):
        try:
            p_in, p_out = float(p_in), float(p_out)
        except (TypeError, ValueError):
            out.append(1.0)
            continue
        if not (math.isfinite(p_in) and math.isfinite(p_out)):
            out.append(1.0)
            continue
        if p_in <= 0:
            out.append(MIN_SPECIFICITY)
            continue
        out.append(min(1.0, max(MIN_SPECIFICITY, (p_in - p_out) / p_in)))
    return out


class ReferenceAnnotator:
    """Annotate clusters offline by matching their ranked markers against the curated marker reference.

    Parameters
    ----------
    species
        Default species (``"human"`` or ``"mouse"``), used when :meth:`annotate` gets an empty one.
    reference_path
        A marker reference JSON file; ``None`` uses the one shipped with the package.
    """

    name = "reference"

    def __init__(self, *, species: str = "human", reference_path: str | Path | None = None) -> None:
        self.species = normalise_species(species)
        self.reference = load_reference(reference_path)
        self._last_species = self.species

    def describe(self) -> dict:
        """Return the provenance recorded with the annotations.

        Returns
        -------
        dict
            ``annotator``, ``reference_version``, ``species`` (of the latest call) and ``api_calls`` (0).
        """
        return {
            "annotator": self.name,
            "reference_version": self.reference.version,
            "species": self._last_species,
            "api_calls": 0,
        }

    def annotate(
        self,
        clusters: list[ClusterMarkers],
        *,
        tissue: str,
        species: str,
        context: str = "",
    ) -> list[ClusterAnnotation]:
        """Annotate each cluster from its ranked marker genes.

        Parameters
        ----------
        clusters
            One :class:`ClusterMarkers` per cluster, genes ranked best first.
        tissue
            The dataset's tissue (free text); selects the candidate cell types.
        species
            ``"human"`` or ``"mouse"``; empty means the annotator's default species.
        context
            Ignored by this annotator (kept for the protocol).

        Returns
        -------
        list of ClusterAnnotation
            One per input cluster, in the same order; ``status="unknown"`` when nothing matched well.
        """
        sp = normalise_species(species) if species and species.strip() else self.species
        self._last_species = sp
        candidates = self.reference.candidates(tissue)
        universe = {g for c in clusters for g in c.genes}
        return [self._annotate_one(c, candidates, sp, universe) for c in clusters]

    def score_cluster(
        self,
        cluster: ClusterMarkers,
        *,
        tissue: str,
        species: str | None = None,
        universe: set[str] | None = None,
    ) -> list[TypeScore]:
        """Score every candidate type for one cluster, best first (for inspection and tests).

        Parameters
        ----------
        cluster
            The cluster's ranked markers.
        tissue
            The dataset's tissue (free text).
        species
            ``"human"`` or ``"mouse"``; ``None`` for the annotator's default.
        universe
            All genes reported for the dataset; defaults to the cluster's own genes.

        Returns
        -------
        list of TypeScore
            Candidates with a positive score, highest first.
        """
        sp = normalise_species(species) if species else self.species
        candidates = self.reference.candidates(tissue)
        return self._score_all(cluster, candidates, sp, universe if universe is not None else set(cluster.genes))

    # ------------------------------------------------------------------ internals

    def _specific_markers(self, ct: ReferenceCellType, species: str) -> list[tuple[int, str]]:
        """(order, symbol) of the markers of ``ct`` that none of its ancestors list."""
        inherited: set[str] = set()
        for name in self.reference.ancestors(ct.name):
            inherited.update(self.reference.by_name(name).symbols(species))
        return [(i, sym) for i, sym in enumerate(ct.symbols(species)) if sym not in inherited]

    def _score_markers(
        self,
        markers: list[tuple[int, str]],
        rank: dict[str, int],
        spec: list[float] | None,
        species: str,
        universe: set[str],
    ) -> tuple[float, list[tuple[str, int]]]:
        """Normalised rank-weighted overlap of (order, symbol) markers with a cluster's ranked genes."""
        contributions: list[tuple[float, str, int]] = []
        observed = 0
        for order, symbol in markers:
            names = self.reference.alias_names(symbol, species)
            if any(n in universe for n in names):
                observed += 1
            hits = [(rank[n], n) for n in names if n in rank]
            if not hits:
                continue
            r, gene = min(hits)
            factor = spec[r] if spec is not None else 1.0
            contributions.append((_rank_weight(r) * _order_weight(order) * factor, gene, r))
        if not contributions:
            return 0.0, []
        n_norm = max(MIN_N, min(observed, TOP_N))
        contributions.sort(key=lambda t: -t[0])
        score = sum(c for c, _, _ in contributions[:n_norm]) / _ideal(n_norm)
        matched = sorted({(gene, r) for _, gene, r in contributions}, key=lambda t: t[1])
        return round(score, 4), matched

    def _score_all(
        self,
        cluster: ClusterMarkers,
        candidates: list[ReferenceCellType],
        species: str,
        universe: set[str],
    ) -> list[TypeScore]:
        rank: dict[str, int] = {}
        for i, gene in enumerate(cluster.genes):
            rank.setdefault(gene, i)
        spec = _specificity(cluster)
        scores = []
        for ct in candidates:
            score, matched = self._score_markers(
                list(enumerate(ct.symbols(species))), rank, spec, species, universe
            )
            if matched:
                scores.append(TypeScore(ct, score, matched))
        # on equal scores the more general type comes first (refinement may then descend)
        scores.sort(key=lambda s: (-s.score, len(self.reference.ancestors(s.name)), s.name))
        return scores

    def _has_own_match(self, ts: TypeScore, species: str) -> bool:
        own: set[str] = set()
        for _, sym in self._specific_markers(ts.cell_type, species):
            own.update(self.reference.alias_names(sym, species))
        return any(gene in own for gene, _ in ts.matched)

    def _refine(
        self,
        best: TypeScore,
        cluster: ClusterMarkers,
        candidates: list[ReferenceCellType],
        species: str,
        universe: set[str],
    ) -> list[tuple[ReferenceCellType, float, list[tuple[str, int]]]]:
        """Descend from ``best`` into its subtypes while their own markers clearly favour one of them.

        Returns the chain of (subtype, specific score, specific matches) chosen, outermost first.
        """
        rank: dict[str, int] = {}
        for i, gene in enumerate(cluster.genes):
            rank.setdefault(gene, i)
        spec = _specificity(cluster)
        chain: list[tuple[ReferenceCellType, float, list[tuple[str, int]]]] = []
        current = best.name
        while True:
            children = [ct for ct in candidates if ct.parent == current]
            if not children:
                return chain
            scored = []
            for ct in children:
                sc, matched = self._score_markers(
                    self._specific_markers(ct, species), rank, spec, species, universe
                )
                scored.append((sc, ct.name, ct, matched))
            scored.sort(key=lambda t: (-t[0], t[1]))
            top_score, _, top_ct, top_matched = scored[0]
            runner_up = scored[1][0] if len(scored) > 1 else 0.0
            if top_score < REFINE_MIN_SCORE or top_score < REFINE_RATIO * runner_up:
                return chain
            chain.append((top_ct, top_score, top_matched))
            current = top_ct.name

    def _annotate_one(
        self,
        cluster: ClusterMarkers,
        candidates: list[ReferenceCellType],
        species: str,
        universe: set[str],
    ) -> ClusterAnnotation:
        markers_sent = list(cluster.genes)
        # a type needs at least MIN_MATCHES matched markers to be called at all
        scores = [s for s in self._score_all(cluster, candidates, species, universe)
                  if len(s.matched) >= MIN_MATCHES]
        if not scores or scores[0].score < MIN_SCORE:
            return ClusterAnnotation.unknown(
                cluster.cluster, reason="no reference cell type matched the markers", markers_sent=markers_sent
            )
        by_name = {s.name: s for s in scores}
        top = scores[0]
        best = top
        # 1. a more specific descendant that scores nearly as well as a general winner, with at least
        #    one matched marker of its own, is preferred
        promoted_from: TypeScore | None = None
        for s in scores[1:]:
            if s.score < SPECIFIC_RATIO * top.score:
                break
            if best.name in self.reference.ancestors(s.name) and self._has_own_match(s, species):
                promoted_from = promoted_from or best
                best = s
        # 2. descend further while the subtype-specific markers clearly favour one subtype
        general = best
        chain = self._refine(best, cluster, candidates, species, universe)
        if chain:
            ct = chain[-1][0]
            best = by_name.get(ct.name) or TypeScore(ct, 0.0, [])
        refined_markers = [gene for _, _, matched in chain for gene, _ in matched]

        lineage = best.cell_type.lineage
        ancestors = set(self.reference.ancestors(best.name))
        descendants = {s.name for s in scores if best.name in self.reference.ancestors(s.name)}
        family = ancestors | descendants | {best.name}
        sub = [s.name for s in scores if s.name in descendants and s.score >= SUB_RATIO * top.score]
        sub += [
            s.name
            for s in scores
            if s.name not in family
            and s.cell_type.lineage == lineage
            and s.score >= SUB_RATIO * top.score
            and len(s.matched) >= MIN_MATCHES
        ]
        sub = list(dict.fromkeys(sub))[:3]
        mixed: list[str] = []
        seen_lineages = {lineage}
        for s in scores:
            if s.cell_type.lineage in seen_lineages:
                continue
            seen_lineages.add(s.cell_type.lineage)
            if s.score >= max(MIXED_RATIO * top.score, MIN_SCORE) and len(s.matched) >= MIN_MATCHES:
                mixed.append(s.name)
        rival = next((s for s in scores if s.name not in family), None)
        margin = 1.0 if rival is None else max(0.0, (top.score - rival.score) / top.score)
        strength = min(1.0, top.score / STRONG_SCORE)
        confidence = round(100.0 * strength * (0.5 + 0.5 * margin), 1)

        matched_genes = list(dict.fromkeys([g for g, _ in general.matched] + refined_markers))
        matched_genes.sort(key=lambda g: cluster.genes.index(g))
        key_markers = matched_genes[:10]
        reasoning = self._reasoning(general, promoted_from, chain, rival, mixed, by_name)
        return ClusterAnnotation(
            cluster=cluster.cluster,
            main_cell_type=best.name,
            sub_cell_types=sub,
            mixed_cell_types=mixed,
            confidence=confidence,
            key_markers=key_markers,
            reasoning=reasoning,
            status="ok",
            markers_sent=markers_sent,
        )

    @staticmethod
    def _reasoning(
        general: TypeScore,
        promoted_from: TypeScore | None,
        chain: list[tuple[ReferenceCellType, float, list[tuple[str, int]]]],
        rival: TypeScore | None,
        mixed: list[str],
        by_name: dict[str, TypeScore],
    ) -> str:
        genes = ", ".join(gene for gene, _ in general.matched[:5])
        n_ref = len(general.cell_type.markers)
        first = (
            f"Top markers {genes} match {general.name} (score {general.score:.2f}, "
            f"{len(general.matched)} of {n_ref} reference markers"
        )
        if promoted_from is not None:
            first += f"; preferred over the more general {promoted_from.name} at {promoted_from.score:.2f}"
        first += ")"
        for ct, sc, matched in chain:
            first += (
                f", refined to {ct.name} by its own markers "
                f"{', '.join(g for g, _ in matched[:3])} (subtype score {sc:.2f})"
            )
        first += "."
        if rival is None:
            second = "No other cell type matched."
        else:
            second = f"Next best alternative: {rival.name} ({rival.score:.2f})"
            if mixed:
                second += "; similar scores for " + ", ".join(
                    f"{m} ({by_name[m].score:.2f})" for m in mixed
                ) + " suggest a mixed population"
            second += "."
        return f"{first} {second}"
