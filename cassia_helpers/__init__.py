"""cassia_helpers: the logic behind the cassia-batch notebooks.

The template notebook reads like a scanpy tutorial::

    import cassia_helpers as ch
    adata = ch.read_dataset(input_path, species=species)
    ch.pp.qc(adata, min_genes=200)
    ...
"""

from . import preprocess as pp
from .annotate import ClusterAnnotation, ClusterMarkers
from .annotate.apply import annotate_clusters, make_annotator
from .config import AnalysisParams, BatchConfig, DatasetParams
from .io import InputError, read_dataset
from .layout import DatasetPaths
from .markers import cluster_markers, rank_markers
from .outputs import save_umap, write_annotated, write_annotation, write_markers, write_result, write_summary

__all__ = [
    "AnalysisParams",
    "BatchConfig",
    "ClusterAnnotation",
    "ClusterMarkers",
    "DatasetParams",
    "DatasetPaths",
    "InputError",
    "annotate_clusters",
    "annotator_for",
    "cluster_markers",
    "make_annotator",
    "pp",
    "rank_markers",
    "read_dataset",
    "save_umap",
    "write_annotated",
    "write_annotation",
    "write_markers",
    "write_result",
    "write_summary",
]


def annotator_for(params: DatasetParams, paths: DatasetPaths):
    """The annotator a template run asked for, wired to the dataset's ledger, cache and run budget."""
    if params.annotator != "llm":
        return make_annotator("reference", species=params.species)
    return make_annotator(
        "llm",
        species=params.species,
        model=params.model,
        base_url=params.base_url,
        concurrency=params.llm_concurrency,
        timeout=params.llm_timeout,
        max_attempts=params.llm_max_attempts,
        use_cache=params.use_cache,
        cache_dir=params.cache_dir,
        max_cost=params.max_cost,
        price_file=params.price_file,
        input_price=params.input_price,
        output_price=params.output_price,
        ledger_path=paths.llm_calls_jsonl,
        dataset=params.dataset,
        tissue=params.tissue,
        run_dir=params.run_dir,
    )
