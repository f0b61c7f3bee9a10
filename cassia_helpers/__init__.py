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
    "DatasetPaths": ".contract",
    "InputError": ".read",
    "read_dataset": ".read",
    "ClusterAnnotation": ".annotate",
    "ClusterMarkers": ".annotate",
    "annotate_clusters": ".annotate.apply",
    "annotate_subclusters": ".annotate.subclusters",
    "annotate_ontology": ".ontology",
    "marker_evidence": ".evidence",
    "make_annotator": ".annotate.factory",
    "rank_markers": ".markers",
    "cluster_markers": ".markers",
    "write_markers": ".outputs",
    "write_annotated": ".outputs",
    "write_annotation": ".outputs",
    "write_summary": ".outputs",
    "write_result": ".outputs",
    "save_dataset_figures": ".figures",
    "write_cluster_table": ".clusters",
    "run_batch": ".driver",
}
_SUBMODULES = {"pp": ".pp", "figures": ".figures"}

__all__ = [
    "ClusterAnnotation", "ClusterMarkers", "DatasetPaths", "InputError", "Settings", "annotate_clusters",
    "annotate_ontology", "annotate_subclusters", "marker_evidence",
    "cluster_markers", "figures", "make_annotator", "pp", "rank_markers", "read_dataset", "run_batch",
    "save_dataset_figures", "write_annotated", "write_annotation", "write_cluster_table", "write_markers",
    "write_result", "write_summary",
]

if TYPE_CHECKING:
    from . import figures, pp
    from .annotate import ClusterAnnotation, ClusterMarkers
    from .annotate.apply import annotate_clusters
    from .annotate.factory import make_annotator
    from .annotate.subclusters import annotate_subclusters
    from .clusters import write_cluster_table
    from .contract import DatasetPaths
    from .driver import run_batch
    from .evidence import marker_evidence
    from .figures import save_dataset_figures
    from .markers import cluster_markers, rank_markers
    from .ontology import annotate_ontology
    from .outputs import write_annotated, write_annotation, write_markers, write_result, write_summary
    from .read import InputError, read_dataset
    from .settings import Settings


def __getattr__(name: str) -> Any:
    if name in _SUBMODULES:
        return import_module(_SUBMODULES[name], __name__)
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return __all__
