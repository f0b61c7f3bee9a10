"""Offline reference annotator: call each cluster from a curated marker table, with no API calls.

The reference (``data/markers.json``, shipped with the package) lists, for each cell type, 5-15
positive marker genes ordered from most to least specific, the tissues the type belongs to, an
optional more general parent type and a lineage. :class:`ReferenceAnnotator` scores every candidate
type of the dataset's tissue on the expression of its markers when it is given the AnnData
(:mod:`~cassia_helpers.dataset.annotate.reference.expression`), or on the clusters' ranked marker lists
alone (:mod:`~cassia_helpers.dataset.annotate.reference.ranked`), and reports the best match.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from cassia_helpers.dataset.annotate import ClusterAnnotation, ClusterMarkers
from cassia_helpers.dataset.annotate.reference.catalog import (
    SUPPORTED_SPECIES,
    MarkerReference,
    ReferenceCellType,
    ReferenceDataError,
    load_reference,
    normalise_species,
)
from cassia_helpers.dataset.annotate.reference.ranked import RankedScorer, TypeScore

__all__ = [
    "SUPPORTED_SPECIES",
    "MarkerReference",
    "ReferenceAnnotator",
    "ReferenceCellType",
    "ReferenceDataError",
    "TypeScore",
    "load_reference",
    "normalise_species",
]


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
    reads_expression = True  # annotate_clusters passes the AnnData

    def __init__(self, *, species: str = "human", reference_path: str | Path | None = None) -> None:
        self.species = normalise_species(species)
        self.reference = load_reference(reference_path)
        self._ranked = RankedScorer(self.reference)
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

    def annotate(self, clusters: list[ClusterMarkers], *, tissue: str, species: str, context: str = "",
                 adata: Any = None, groupby: str = "leiden", use_raw: bool = False,
                 layer: str | None = None) -> list[ClusterAnnotation]:
        """Annotate each cluster from its marker expression (with ``adata``) or its ranked marker genes.

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
        adata
            The dataset (log-normalised expression, clusters in ``obs[groupby]``). When given, every
            reference type is scored on the expression of its markers in each cluster against the other
            cells, lineage first, then the subtype (see
            :mod:`cassia_helpers.dataset.annotate.reference.expression`); the ranked lists are only kept as
            ``markers_sent``. ``None`` scores the ranked lists alone.
        groupby
            Cluster column of ``adata.obs`` (its values are the ``cluster`` names of ``clusters``).
        use_raw, layer
            Where to read expression from (``adata.raw`` / ``adata.layers[layer]``; default ``X``).

        Returns
        -------
        list of ClusterAnnotation
            One per input cluster, in the same order; ``status="unknown"`` when nothing matched well.
        """
        sp = normalise_species(species) if species and species.strip() else self.species
        self._last_species = sp
        candidates = self.reference.candidates(tissue)
        if adata is not None:
            from cassia_helpers.dataset.annotate.reference.calls import annotate_expression

            results = annotate_expression(self.reference, clusters, candidates, sp, adata, groupby=groupby,
                                          use_raw=use_raw, layer=layer)
        else:
            universe = {g for c in clusters for g in c.genes}
            results = [self._ranked.annotate_one(c, candidates, sp, universe) for c in clusters]
        from cassia_helpers.dataset.annotate.agents.merging import fill_from_reference

        return fill_from_reference(results, self.reference)  # its own score and its hierarchy's levels

    def expression_calls(self, adata: Any, *, tissue: str, species: str = "", groupby: str = "leiden",
                         use_raw: bool = False, layer: str | None = None) -> dict:
        """The reference's call of every cluster of ``adata.obs[groupby]`` before it is worded: an
        :class:`~cassia_helpers.dataset.annotate.reference.expression.ExpressionCall` per cluster name, with
        the type, the cell-level split between lineages (``lineage_split``) or subtypes (``mixed``).
        The same calls :meth:`annotate` reports with ``adata``."""
        from cassia_helpers.dataset.annotate.reference.calls import expression_calls

        sp = normalise_species(species) if species and species.strip() else self.species
        return expression_calls(self.reference, self.reference.candidates(tissue), sp, adata, groupby=groupby,
                                use_raw=use_raw, layer=layer)

    def expression_data(self, adata: Any, *, tissue: str, species: str = "", use_raw: bool = False,
                        layer: str | None = None) -> Any:
        """The part of ``adata`` :meth:`expression_calls` reads (its cells, the reference's genes): calls on
        it equal calls on ``adata`` and cost less when made several times."""
        from cassia_helpers.dataset.annotate.reference.calls import expression_data

        sp = normalise_species(species) if species and species.strip() else self.species
        return expression_data(self.reference, self.reference.candidates(tissue), sp, adata, use_raw=use_raw,
                               layer=layer)

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
        return self._ranked.score_all(cluster, candidates, sp,
                                      universe if universe is not None else set(cluster.genes))
