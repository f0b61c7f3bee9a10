"""Batch and per-dataset settings.

:class:`DatasetParams` is exactly what papermill injects into the template's ``parameters`` cell, so
every field is a JSON-able scalar. API keys are never a field: the kernel reads them from its environment.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

DEFAULT_MODEL = "gpt-4o-mini"


@dataclass
class AnalysisParams:
    """Clustering, marker and annotation settings shared by every dataset of a batch."""

    species: str = "human"
    # QC
    min_genes: int = 200
    min_cells: int = 3
    max_pct_mt: float = 20.0
    # normalisation, features, graph
    target_sum: float = 1e4
    n_top_genes: int = 2000
    n_pcs: int = 50
    n_neighbors: int = 15
    resolution: float = 1.0
    seed: int = 0
    # marker genes
    marker_method: str = "wilcoxon"
    n_markers: int = 50
    marker_max_pval_adj: float = 0.05
    marker_min_logfc: float = 0.25
    max_cells_per_cluster: int = 1000
    # annotation
    annotator: str = "reference"
    model: str = DEFAULT_MODEL
    base_url: str = ""
    context: str = ""
    llm_concurrency: int = 8
    llm_timeout: float = 120.0
    llm_max_attempts: int = 4
    use_cache: bool = True
    cache_dir: str = ""
    max_cost: float = 0.0
    price_file: str = ""
    input_price: float | None = None
    output_price: float | None = None


@dataclass
class DatasetParams(AnalysisParams):
    """Everything one execution of the template notebook needs."""

    dataset: str = ""
    tissue: str = ""
    input_path: str = ""
    run_dir: str = ""

    def to_parameters(self) -> dict:
        return asdict(self)

    @classmethod
    def from_namespace(cls, namespace: dict) -> DatasetParams:
        """Collect the parameters a notebook holds as variables (its ``globals()``)."""
        return cls(**{f.name: namespace[f.name] for f in fields(cls) if f.name in namespace})


@dataclass
class BatchConfig:
    """What ``run_batch.py`` was asked to do."""

    data_dir: Path = Path("data")
    output_dir: Path = Path("batch_results")
    tissues: list[str] = field(default_factory=lambda: ["all"])
    workers: int = 1
    dataset_timeout: float = 0.0
    cell_timeout: float = 0.0
    resume: Path | None = None
    dry_run: bool = False
    kernel_name: str = "python3"
    analysis: AnalysisParams = field(default_factory=AnalysisParams)

    def dataset_params(self, *, dataset: str, tissue: str, input_path: Path, run_dir: Path) -> DatasetParams:
        return dataset_params(self.analysis, dataset=dataset, tissue=tissue, input_path=input_path, run_dir=run_dir)


def dataset_params(analysis: AnalysisParams, *, dataset: str, tissue: str, input_path: Path,
                   run_dir: Path) -> DatasetParams:
    """The template's parameters for one dataset of a batch."""
    values = {f.name: getattr(analysis, f.name) for f in fields(AnalysisParams)}
    return DatasetParams(**values, dataset=dataset, tissue=tissue, input_path=str(input_path), run_dir=str(run_dir))
