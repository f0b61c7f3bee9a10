"""cassia_helpers: the logic behind the cassia-batch notebooks.

The template notebook reads like a scanpy tutorial::

    import cassia_helpers as ch
    adata = ch.read_dataset(input_path, species=species)
    ch.pp.qc(adata, min_genes=200)
    ...

Importing the package loads nothing heavy and changes no global state (no plotting backend is chosen):
each name below is imported from its module on first use.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

# public name -> module that defines it (relative to this package)
_EXPORTS = {
    "Settings": ".settings",
    "context_text": ".settings",
    "DatasetPaths": ".contract",
    "InputError": ".dataset.read",
    "read_dataset": ".dataset.read",
    "keep_clusters": ".dataset.existing",
    "cluster_or_keep": ".dataset.existing",
    "umap_or_keep": ".dataset.existing",
    "split_mixed_clusters": ".dataset.split_mixed",
    "score_against_authors": ".dataset.self_score",
    "check_batches": ".dataset.batches",
    "integrate_batches": ".dataset.batches",
    "count_batches": ".dataset.batches",
    "save_batch_figure": ".dataset.batch_figure",
    "ClusterAnnotation": ".dataset.annotate",
    "ClusterMarkers": ".dataset.annotate",
    "annotate_clusters": ".dataset.annotate.apply",
    "annotate_subclusters": ".dataset.annotate.subclusters",
    "annotate_ontology": ".dataset.ontology",
    "marker_evidence": ".dataset.evidence",
    "make_annotator": ".dataset.annotate.factory",
    "rank_markers": ".dataset.markers",
    "cluster_markers": ".dataset.markers",
    "write_markers": ".dataset.outputs",
    "write_annotated": ".dataset.outputs",
    "write_annotation": ".dataset.outputs",
    "write_summary": ".dataset.outputs",
    "write_result": ".dataset.outputs",
    "save_dataset_figures": ".dataset.figures",
    "plain_text_figures": ".canvas",
    "write_cluster_table": ".dataset.cluster_table",
    "run_batch": ".batch.driver",
}
_SUBMODULES = {"pp": ".dataset.pp", "figures": ".dataset.figures", "explore": ".summary.explore"}

__all__ = [
    "ClusterAnnotation", "ClusterMarkers", "DatasetPaths", "InputError", "Settings", "annotate_clusters",
    "annotate_ontology", "annotate_subclusters", "cluster_or_keep", "context_text", "keep_clusters",
    "marker_evidence", "score_against_authors", "umap_or_keep",
    "check_batches", "count_batches", "integrate_batches", "save_batch_figure",
    "cluster_markers", "explore", "figures", "make_annotator", "plain_text_figures", "pp", "rank_markers",
    "read_dataset", "run_batch",
    "save_dataset_figures", "split_mixed_clusters", "write_annotated", "write_annotation", "write_cluster_table",
    "write_markers", "write_result", "write_summary",
]

if TYPE_CHECKING:
    from cassia_helpers.batch.driver import run_batch
    from cassia_helpers.canvas import plain_text_figures
    from cassia_helpers.contract import DatasetPaths
    from cassia_helpers.dataset import figures, pp
    from cassia_helpers.dataset.annotate import ClusterAnnotation, ClusterMarkers
    from cassia_helpers.dataset.annotate.apply import annotate_clusters
    from cassia_helpers.dataset.annotate.factory import make_annotator
    from cassia_helpers.dataset.annotate.subclusters import annotate_subclusters
    from cassia_helpers.dataset.batch_figure import save_batch_figure
    from cassia_helpers.dataset.batches import check_batches, count_batches, integrate_batches
    from cassia_helpers.dataset.cluster_table import write_cluster_table
    from cassia_helpers.dataset.evidence import marker_evidence
    from cassia_helpers.dataset.existing import cluster_or_keep, keep_clusters, umap_or_keep
    from cassia_helpers.dataset.figures import save_dataset_figures
    from cassia_helpers.dataset.markers import cluster_markers, rank_markers
    from cassia_helpers.dataset.ontology import annotate_ontology
    from cassia_helpers.dataset.outputs import (
        write_annotated,
        write_annotation,
        write_markers,
        write_result,
        write_summary,
    )
    from cassia_helpers.dataset.read import InputError, read_dataset
    from cassia_helpers.dataset.self_score import score_against_authors
    from cassia_helpers.dataset.split_mixed import split_mixed_clusters
    from cassia_helpers.settings import Settings, context_text
    from cassia_helpers.summary import explore


def __getattr__(name: str) -> Any:
    if name in _SUBMODULES:
        return import_module(_SUBMODULES[name], __name__)
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return __all__
