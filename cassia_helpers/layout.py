"""The output contract's names: the one place that knows the run folder's layout.

See ``batch_output_structure.md``: ``{output_dir}/run_{tissues}_{YYYYMMDD_HHMMSS}/{tissue}/{dataset}/``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

RUN_PREFIX = "run_"
BATCH_SUMMARY_TXT = "batch_summary.txt"
BATCH_SUMMARY_CSV = "batch_summary.csv"
TOKEN_TRACKING_JSON = "token_tracking.json"
AGGREGATE_NOTEBOOK = "aggregate_notebook.ipynb"
RUN_MANIFEST = "run_manifest.json"


def run_label(tissues: list[str], *, all_tissues: bool) -> str:
    """Tissue part of a run folder name: ``brain``, ``brain_breast`` or ``all``."""
    if all_tissues:
        return "all"
    return "_".join(_safe_component(t) for t in tissues)


def new_run_dir(output_dir: Path, label: str, *, now: datetime | None = None) -> Path:
    """Create and return a fresh ``run_{label}_{YYYYMMDD_HHMMSS}`` folder; never reuse an existing one.

    Two runs started in the same second get a later timestamp rather than sharing a folder.
    """
    output_dir.mkdir(parents=True, exist_ok=True)
    stamp = now or datetime.now()
    while True:
        candidate = output_dir / f"{RUN_PREFIX}{label}_{stamp:%Y%m%d_%H%M%S}"
        try:
            candidate.mkdir()
            return candidate
        except FileExistsError:
            stamp = stamp.replace(microsecond=0)
            stamp = datetime.fromtimestamp(stamp.timestamp() + 1)


def _safe_component(name: str) -> str:
    return re.sub(r"[^\w.-]+", "-", name, flags=re.UNICODE).strip("-") or "tissue"


@dataclass(frozen=True)
class DatasetPaths:
    """Every output path of one dataset inside a run folder."""

    run_dir: Path
    tissue: str
    dataset: str

    @property
    def folder(self) -> Path:
        return self.run_dir / self.tissue / self.dataset

    def _file(self, suffix: str) -> Path:
        return self.folder / f"{self.dataset}{suffix}"

    @property
    def markers_csv(self) -> Path:
        return self._file("_markers.csv")

    @property
    def annotated_h5ad(self) -> Path:
        return self._file("_annotated.h5ad")

    @property
    def annotation_txt(self) -> Path:
        return self._file("_annotation.txt")

    @property
    def summary_txt(self) -> Path:
        return self._file("_summary.txt")

    @property
    def cassia_csv(self) -> Path:
        """CASSIA-compatible batch table, for users of CASSIA's own tools."""
        return self._file("_cassia.csv")

    @property
    def umap_png(self) -> Path:
        return self._file("_umap.png")

    @property
    def notebook(self) -> Path:
        return self._file("_notebook.ipynb")

    @property
    def result_json(self) -> Path:
        """Written by the dataset's notebook when its outputs are complete."""
        return self._file("_result.json")

    @property
    def status_json(self) -> Path:
        """Written by the driver: the authoritative state of the dataset."""
        return self._file("_status.json")

    @property
    def llm_calls_jsonl(self) -> Path:
        """The ledger: one JSON record per request sent to the model server (or cache hit)."""
        return self._file("_llm_calls.jsonl")

    @property
    def kernel_log(self) -> Path:
        return self._file("_kernel.log")

