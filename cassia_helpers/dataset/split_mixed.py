"""Clusters that hold two or more populations are split before markers and annotation.

A leiden cluster at a coarse resolution can hold T and NK cells, or oligodendrocytes and pericytes: however
good the annotator, one label per cluster then loses a population. The offline reference (free, offline and
deterministic: :mod:`cassia_helpers.dataset.annotate.reference`) judges each cluster after the clustering:

1. the cluster is re-clustered with leiden on the kNN graph restricted to its cells (the same seed, at
   resolutions :data:`RESOLUTIONS` in turn until it falls into two or more pieces); a piece of fewer than
   :data:`MIN_CELLS` cells joins the piece it is most connected to;
2. the reference calls every piece, on the dataset with the cluster replaced by its pieces (the same calls
   the annotator would make: lineage, cell-level support, lineage splits and subtype mixtures);
3. pieces the reference calls alike join again: the same type, or one type the other's ancestor
   (``Monocyte`` and ``Classical monocyte``, :func:`_alike`); the split is kept when two or more remain;
4. the pieces of a kept split are examined once more (at most :data:`MAX_DEPTH` rounds): a cluster of T, NK
   and B cells may first fall into B and the rest;
5. a cluster or piece whose cells the reference found to carry a sibling's signature in a minority (at least
   a quarter of the cells carrying either: naive CD8+ T cells inside a CD4+ T cluster, which no cut of the
   graph sets apart) is tried as those cells against the rest, kept when the two are called apart; at the end
   the pieces of all rounds are judged together on the final clusters, and alike ones join again.

A pure cluster is left as it was: the reference gives every piece of one population the same call, however
finely it is cut. Nothing is done to the input's own clusters (``cluster_key``). Every decision is the
reference's, made before any request to a model, so it costs nothing with either annotator.
"""

from __future__ import annotations

import random
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from cassia_helpers.dataset.record import cluster_key as recorded_cluster_key
from cassia_helpers.dataset.record import provenance
from cassia_helpers.dataset.steps import timed

if TYPE_CHECKING:
    from anndata import AnnData

#: a piece of a split holds at least this many cells (smaller ones join their best-connected piece)
MIN_CELLS = 5
#: leiden resolutions tried in turn on a cluster's own cells, until it falls into two or more pieces
RESOLUTIONS = (0.3, 0.5, 1.0)
#: rounds of splitting: the pieces of a kept split are examined once more
MAX_DEPTH = 2
#: ``obs`` column keeping the clustering before the split is ``{key}`` + this
UNSPLIT_SUFFIX = "_unsplit"
_TRIAL = "_cassia_split_trial"


def split_mixed_clusters(adata: AnnData, *, species: str = "human", tissue: str = "", seed: int = 0,
                         cluster_key: str = "", enabled: bool = True, use_raw: bool = False,
                         layer: str | None = None, min_cells: int = MIN_CELLS) -> dict:
    """Split the clusters the offline reference sees as two or more populations (see the module docstring).

    Parameters
    ----------
    adata
        Log-normalised, clustered (``obs[key]``, the key :func:`cassia_helpers.dataset.pp.cluster` recorded),
        with the kNN graph in ``obsp['connectivities']``.
    species, tissue
        Select the reference's candidate cell types, as for the annotation.
    seed
        Leiden's random seed (the clustering's).
    cluster_key
        The input's own clusters are annotated: nothing is split.
    enabled
        ``False`` (``--no-split-mixed``): nothing is split.
    use_raw, layer
        Where the reference reads expression (``adata.raw`` / ``adata.layers[layer]``; default ``X``).
    min_cells
        The smallest piece a split may leave.

    Returns
    -------
    dict
        The record written to ``uns['cassia_batch']['split']`` (empty when nothing was examined).

    Writes, when a cluster is split: ``obs[key]`` (the refined clusters ``"0"`` … ``"n-1"``, largest first,
    categorical), ``obs[key + '_unsplit']`` (the clustering before), ``uns['cassia_batch']['leiden']['n_clusters']``
    and ``uns['cassia_batch']['split']``: ``key``, ``unsplit_key``, ``min_cells``, ``n_clusters_before``,
    ``n_clusters_after``, ``clusters`` (per split cluster: ``n_cells``, ``called`` (the reference's call
    before), ``into`` (new cluster ids), ``populations`` and ``fractions`` (the pieces' calls and their
    shares of the cluster's cells)) and ``renumbered`` (every former cluster's new ids). With nothing
    split, ``obs`` is unchanged and the record says which clusters were examined.
    """
    record = provenance(adata)
    key = recorded_cluster_key(adata)
    if cluster_key or not enabled or record.get("leiden", {}).get("source") == "input" or key not in adata.obs:
        return {}
    if "connectivities" not in adata.obsp or adata.n_obs < 2 * min_cells:
        return {}
    from cassia_helpers.dataset.annotate.reference.annotator import ReferenceAnnotator, ReferenceDataError

    try:
        annotator = ReferenceAnnotator(species=species)
    except (ReferenceDataError, ValueError):
        return {}  # a species the reference has no markers for: nothing to judge with
    return _split(adata, annotator, key=key, species=species, tissue=tissue, seed=seed, use_raw=use_raw,
                  layer=layer, min_cells=min_cells)


@timed("split")
def _split(adata: AnnData, annotator: Any, *, key: str, species: str, tissue: str, seed: int, use_raw: bool,
           layer: str | None, min_cells: int) -> dict:
    """:func:`split_mixed_clusters` once it is known to apply (a timed step of the pipeline).

    Clusters and pieces are integer ids into one table of names (``"3"``, ``"3/0"``, ``"3/0/1"``): every
    lookup over the cells compares integers, not strings (a million cells, a few hundred names)."""
    record = provenance(adata)
    before = adata.obs[key]
    original, uniques = pd.factorize(before.astype(str).to_numpy())  # ids in order of first appearance
    names = _Names(map(str, uniques))
    judge = _Judge(adata, annotator, tissue=tissue, species=species, use_raw=use_raw, layer=layer)
    first = judge.calls(original, names)
    graph = adata.obsp["connectivities"].tocsr()
    current = original.copy()
    todo = [names[i] for i, n in enumerate(np.bincount(original)) if n >= 2 * min_cells]
    split = {"key": key, "unsplit_key": key + UNSPLIT_SUFFIX, "min_cells": int(min_cells), "examined": len(todo),
             "n_clusters_before": len(uniques)}
    accepted: dict[str, dict[str, str]] = {}  # original cluster -> {its piece in `current`: the piece's call}
    for _depth in range(MAX_DEPTH):
        trial = current.copy()
        pieces_of: dict[str, list[str]] = {}
        for name in todo:
            pieces = _pieces(graph, np.flatnonzero(current == names.id(name)), seed=seed, min_cells=min_cells)
            if pieces is not None:
                pieces_of[name] = [f"{name}/{i}" for i in range(len(pieces))]
                for piece, rows in zip(pieces_of[name], pieces, strict=True):
                    trial[rows] = names.id(piece)
        if not pieces_of:
            break
        calls = judge.calls(trial, names)
        size = names.sizes(trial)
        todo = []
        for name, pieces in pieces_of.items():
            groups = _join_alike(pieces, calls, annotator.reference)
            if len(groups) < 2:
                continue
            parts = accepted.setdefault(name.split("/")[0], {})
            parts.pop(name, None)
            for i, group in enumerate(groups):
                merged = f"{name}/{i}"
                rows = np.isin(trial, [names.id(piece) for piece in group])
                current[rows] = names.id(merged)
                largest = max(group, key=size)
                parts[merged] = _label(_verdict(calls.get(largest)))
                if int(rows.sum()) >= 2 * min_cells:
                    todo.append(merged)  # a third population may still hide in a piece
    calls = judge.calls(current, names) if accepted else first  # the clusters as they now stand
    if _split_by_cells(current, names, calls, judge, accepted, annotator.reference, min_cells):
        calls = judge.calls(current, names)
    if accepted:
        # the pieces of every round judged together on the final clusters: alike ones join again
        for origin in list(accepted):
            groups = _join_alike(sorted(accepted[origin]), calls, annotator.reference)
            if len(groups) < 2:
                current[original == names.id(origin)] = names.id(origin)
                del accepted[origin]
                continue
            accepted[origin] = {}
            size = names.sizes(current)
            for group in groups:
                largest = max(group, key=size)
                current[np.isin(current, [names.id(piece) for piece in group])] = names.id(largest)
                accepted[origin][largest] = _label(_verdict(calls.get(largest)))
    if not accepted:
        split["n_clusters_after"] = split["n_clusters_before"]
        record["split"] = split
        return split
    rank = _renumber(current, original, names)  # the new cluster id of every id of `current`
    new_ids = rank[current]
    n_after = int(rank.max()) + 1
    adata.obs[key + UNSPLIT_SUFFIX] = before.copy()
    adata.obs[key] = pd.Categorical.from_codes(new_ids, categories=[str(i) for i in range(n_after)])
    record.setdefault("leiden", {})["n_clusters"] = n_after
    renumbered: dict[str, list[str]] = {}
    for old, new in np.unique(np.column_stack([original, new_ids]), axis=0):
        renumbered.setdefault(names[old], []).append(str(new))
    clusters = {}
    size = names.sizes(current)
    for origin in sorted(accepted, key=_order):
        n_cells = int(np.sum(original == names.id(origin)))
        pieces = sorted(accepted[origin].items(), key=lambda p: -size(p[0]))
        clusters[str(origin)] = {
            "n_cells": n_cells, "called": _label(_verdict(first.get(origin))),
            "into": [str(rank[names.id(piece)]) for piece, _ in pieces],
            "populations": [call for _, call in pieces],
            "fractions": [round(float(size(piece) / n_cells), 2) for piece, _ in pieces]}
    split.update(n_clusters_after=n_after, clusters=clusters,
                 renumbered={k: sorted(v, key=int) for k, v in renumbered.items()})
    record["split"] = split
    return split


def _split_by_cells(current: np.ndarray, names: _Names, calls: dict, judge: _Judge,
                    accepted: dict[str, dict[str, str]], reference: Any, min_cells: int) -> bool:
    """A minority population that no cut of the graph sets apart (naive CD8+ among CD4+ T cells, told apart by
    a few genes only): a cluster or piece whose cells the reference finds to carry a sibling's signature
    (``minority_rows`` of its call in ``calls``, made on ``current``) is tried as those cells against the rest,
    and kept when the two are called apart. Updates ``current`` and ``accepted`` in place; ``True`` when a
    split was kept."""
    trial = current.copy()
    pieces_of: dict[str, list[str]] = {}
    ids, counts = np.unique(current, return_counts=True)
    for cluster, n_cells in zip(ids, counts, strict=True):
        name = names[cluster]
        rows = getattr(calls.get(name), "minority_rows", None)
        if rows is None or len(rows) < min_cells or n_cells - len(rows) < min_cells:
            continue
        pieces_of[name] = [name, f"{name}/cells"]
        trial[rows] = names.id(pieces_of[name][1])
    if not pieces_of:
        return False
    trial_calls = judge.calls(trial, names)
    kept = False
    for name, pieces in pieces_of.items():
        if len(_join_alike(pieces, trial_calls, reference)) < 2:
            continue
        current[trial == names.id(pieces[1])] = names.id(pieces[1])
        accepted.setdefault(name.split("/")[0], {}).update(
            {piece: _label(_verdict(trial_calls.get(piece))) for piece in pieces})
        kept = True
    return kept


class _Names(list):
    """The names of clusters and pieces; a name's id is its index (new names are appended)."""

    def __init__(self, names) -> None:
        super().__init__(names)
        self._ids = {name: i for i, name in enumerate(self)}

    def id(self, name: str) -> int:
        if name not in self._ids:
            self._ids[name] = len(self)
            self.append(name)
        return self._ids[name]

    def sizes(self, ids: np.ndarray):
        """A function: a name's number of cells in ``ids`` (counted once, now)."""
        counts = np.bincount(ids, minlength=len(self))

        def size(name: str) -> int:
            i = self._ids.get(name, len(counts))  # a name given after the count has no cells in it
            return int(counts[i]) if i < len(counts) else 0

        return size


def split_summary_lines(record: dict) -> list[str]:
    """The summary's lines on the split (``uns['cassia_batch']['split']``): one per split cluster."""
    split = record.get("split") or {}
    clusters = split.get("clusters") or {}
    if not clusters:
        return []
    lines = [f"  split:     {len(clusters)} cluster(s) holding several populations split "
             f"({split.get('n_clusters_before')} -> {split.get('n_clusters_after')} clusters; "
             f"the former ones in obs['{split.get('unsplit_key')}'])"]
    for origin, info in clusters.items():
        lines.append("    " + describe_split(origin, info))
    return lines


def describe_split(origin: str, info: dict) -> str:
    """``cluster 3 (480 cells, called T cell: CD4+ T cell 52 %, NK cell 33 %, ...) split into clusters 1, 6``."""
    parts = ", ".join(f"{name} {100 * float(share):.0f} %"
                      for name, share in zip(list(info["populations"]), list(info["fractions"]), strict=True))
    into = ", ".join(map(str, info["into"]))
    return (f"cluster {origin} ({int(info['n_cells'])} cells, called {info['called']}: {parts}) split into "
            f"{len(info['into'])} clusters ({into})")


class _Judge:
    """The reference's calls of one dataset under trial clusterings, on the reference's genes read once."""

    def __init__(self, adata: AnnData, annotator: Any, *, tissue: str, species: str, use_raw: bool,
                 layer: str | None) -> None:
        self.annotator, self.options = annotator, {"tissue": tissue, "species": species}
        self.data = annotator.expression_data(adata, use_raw=use_raw, layer=layer, **self.options)

    def calls(self, ids: np.ndarray, names: list[str]) -> dict:
        """The calls, by name, of the clusters ``ids`` (every cell's index into ``names``)."""
        used = np.unique(ids)
        compact = np.searchsorted(used, ids)  # categories with cells only, as the clusters to call
        self.data.obs[_TRIAL] = pd.Categorical.from_codes(compact, categories=[names[i] for i in used])
        return self.annotator.expression_calls(self.data, groupby=_TRIAL, **self.options)


def _pieces(graph, rows: np.ndarray, *, seed: int, min_cells: int) -> list[np.ndarray] | None:
    """Leiden on the subgraph of ``rows`` at :data:`RESOLUTIONS` in turn: the first cut into two or more pieces
    of at least ``min_cells`` cells each (smaller pieces joined to their best-connected piece), as row
    indices of the dataset; ``None`` when none is."""
    import igraph

    sub = graph[rows][:, rows].tocsr()
    coo = sub.tocoo()
    upper = coo.row < coo.col  # the graph is symmetric: one edge per pair (the same modularity as both)
    edges = np.column_stack([coo.row[upper], coo.col[upper]]).astype(np.int64)
    g = igraph.Graph(n=len(rows), edges=edges, directed=False)  # from the array: no Python tuple per edge
    weights = coo.data[upper].astype(np.float64)
    for resolution in RESOLUTIONS:
        igraph.set_random_number_generator(random.Random(seed))
        try:
            membership = np.asarray(g.community_leiden(objective_function="modularity", weights=weights,
                                                       resolution=resolution, n_iterations=2).membership)
        finally:
            igraph.set_random_number_generator(random)
        membership = _absorb_small(membership, sub, min_cells)
        kinds = np.unique(membership)
        if len(kinds) >= 2:
            return [rows[membership == k] for k in kinds]
    return None


def _absorb_small(membership: np.ndarray, sub, min_cells: int) -> np.ndarray:
    """Each piece under ``min_cells`` cells, smallest first, joins the piece its cells are most connected to."""
    membership = membership.copy()
    while True:
        kinds, sizes = np.unique(membership, return_counts=True)
        if len(kinds) < 2 or sizes.min() >= min_cells:
            return membership
        small = kinds[np.argmin(sizes)]
        inside = membership == small
        links = np.asarray(sub[inside].sum(axis=0)).ravel()
        totals = {k: links[membership == k].sum() for k in kinds if k != small}
        target = max(totals, key=lambda k: (totals[k], -k))
        membership[inside] = target


def _verdict(call: Any) -> tuple[str, tuple[str, ...]]:
    """A piece's call: its type (``Unknown`` when none) and the populations it is still split between."""
    if call is None or call.cell_type is None:
        return "Unknown", ()
    mixture = tuple(name for name, _ in [*call.lineage_split, *call.mixed])
    return call.cell_type.name, mixture


def _label(verdict: tuple[str, tuple[str, ...]]) -> str:
    name, mixture = verdict
    return f"{name} (mixed: {' / '.join(mixture)})" if mixture else name


def _join_alike(names: list[str], calls: dict, reference: Any) -> list[list[str]]:
    """The pieces grouped by call (:func:`_alike`), in the order of ``names``."""
    verdicts = {n: _verdict(calls.get(n)) for n in names}
    groups: list[list[str]] = []
    for name in names:
        for group in groups:
            if any(_alike(verdicts[name], verdicts[other], reference) for other in group):
                group.append(name)
                break
        else:
            groups.append([name])
    return groups


def _alike(a: tuple[str, tuple[str, ...]], b: tuple[str, tuple[str, ...]], reference: Any) -> bool:
    """Two pieces' calls name one population: the same type, or one type an ancestor of the other's (the
    same cells seen less sharply: ``Monocyte`` and ``Classical monocyte``; ``CD4+ T cell`` split between
    naive and memory cells and ``Naive CD4+ T cell``). Only populations the reference tells apart at one
    level of its hierarchy (T and NK cells, CD4+ and CD8+ T cells, plasmacytoid and conventional dendritic
    cells) keep a split: a cut through a continuum of one type would not be the same at another resolution."""
    if a[0] == b[0]:
        return True
    if "Unknown" in (a[0], b[0]):
        return False
    return a[0] in _ancestors(reference, b[0]) or b[0] in _ancestors(reference, a[0])


def _ancestors(reference: Any, name: str) -> set[str]:
    try:
        return set(reference.ancestors(name))
    except (KeyError, ValueError):
        return set()


def _order(name: str) -> tuple[int, str]:
    """Leiden ids in numeric order (any other name after them)."""
    return (int(name), "") if str(name).isdigit() else (1 << 30, str(name))


def _renumber(refined: np.ndarray, original: np.ndarray, names: list[str]) -> np.ndarray:
    """``0``, ``1``, … by size, largest first (as leiden numbers clusters); ties in the former order. Returns
    the new number of every id of ``refined`` (ids without cells: -1)."""
    ids, first, sizes = np.unique(refined, return_index=True, return_counts=True)
    ranked = sorted(range(len(ids)), key=lambda i: (-sizes[i], _order(names[original[first[i]]]), first[i]))
    rank = np.full(len(names), -1, dtype=np.int64)
    rank[ids[ranked]] = np.arange(len(ranked))
    return rank
