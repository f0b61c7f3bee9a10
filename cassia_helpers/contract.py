"""The output contract: the run folder's layout, its file names, and the records passed between stages.

See ``batch_output_structure.md``: ``{output_dir}/run_{tissues}_{YYYYMMDD_HHMMSS}/{tissue}/{dataset}/``.
Records are small JSON files: the run manifest (written by the driver), each dataset's status (written by
the driver's worker: the authoritative state) and result (written last by the dataset's notebook).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from cassia_helpers.files import read_json, write_json

RUN_PREFIX = "run_"
BATCH_SUMMARY_TXT = "batch_summary.txt"
BATCH_SUMMARY_CSV = "batch_summary.csv"
TOKEN_TRACKING_JSON = "token_tracking.json"
AGGREGATE_NOTEBOOK = "aggregate_notebook.ipynb"
RUN_MANIFEST = "run_manifest.json"
DATASETS_CSV = "datasets.csv"  # a copy of the --manifest the run was started with
REPORT_HTML = "report.html"
CELL_TYPES_CSV = "cell_types.csv"  # dataset x Cell Ontology term: cells and fractions
CELL_TYPES_PNG = "cell_types.png"
RUN_LOCK = ".run.lock"
BREAKER_FILE = ".llm_breaker.json"  # the run's circuit breaker on the model server (its failures in a row)
SLURM_LOGS = "slurm_logs"  # the SLURM jobs' log files (--cluster slurm, unless --slurm-log-directory)
SUCCESS, FAILED, INTERRUPTED = "success", "failed", "interrupted"
STATUSES = (SUCCESS, FAILED, INTERRUPTED)
NOT_STARTED = "not started: the run was interrupted"  # the error of a dataset a stop kept from starting
STOPPED_RUNNING = "stopped while running: the run was interrupted at once"  # ... and of one a second Ctrl-C cut
WORKER_DIED = "the Dask worker running this dataset died"


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
    def cassia_conversations_json(self) -> Path:
        """Every agent's turns per cluster, in the form CASSIA's scoring and boost tools read."""
        return self._file("_cassia_conversations.json")

    @property
    def umap_png(self) -> Path:
        return self._file("_umap.png")

    @property
    def qc_png(self) -> Path:
        return self._file("_qc.png")

    @property
    def dotplot_png(self) -> Path:
        return self._file("_dotplot.png")

    @property
    def cluster_sizes_png(self) -> Path:
        return self._file("_cluster_sizes.png")

    @property
    def qc_batches_png(self) -> Path:
        """QC per batch (only for a dataset run with ``batch_key``)."""
        return self._file("_qc_batches.png")

    @property
    def figure_pngs(self) -> dict[str, Path]:
        """The dataset's figures by name, in the order a reader looks at them."""
        return {"umap": self.umap_png, "dotplot": self.dotplot_png, "qc": self.qc_png,
                "cluster_sizes": self.cluster_sizes_png}

    @property
    def clusters_csv(self) -> Path:
        """One row per cluster: its call, size, scores and markers (what the report's tables show)."""
        return self._file("_clusters.csv")

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

    @property
    def progress_jsonl(self) -> Path:
        """Each pipeline step's start and end, appended by the kernel as it runs (for the driver's display)."""
        return self._file("_progress.jsonl")


# The environment variable that tells a dataset's kernel where to append its progress (``progress_jsonl``).
PROGRESS_ENV = "CASSIA_PROGRESS_FILE"


def task_record(key: str, status: str, error: str, error_type: str) -> dict:
    """The record of a dataset whose task could not produce its own status (the driver writes it)."""
    return {"key": key, "status": status, "error": error, "error_type": error_type}


def now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def read_manifest(run_dir: str | Path) -> dict | None:
    """The run's manifest, or ``None`` when it is missing or unreadable."""
    manifest = read_json(Path(run_dir) / RUN_MANIFEST)
    return manifest if isinstance(manifest, dict) and isinstance(manifest.get("datasets"), list) else None


def read_status(paths: DatasetPaths) -> dict | None:
    """The driver's status record of a dataset, or ``None``."""
    record = read_json(paths.status_json)
    return record if isinstance(record, dict) and record.get("status") in STATUSES else None


def read_result(paths: DatasetPaths) -> dict | None:
    """The notebook's result record, or ``None`` when the notebook did not finish."""
    record = read_json(paths.result_json)
    return record if isinstance(record, dict) else None


def write_status(paths: DatasetPaths, status: str, *, error: str = "", error_type: str = "",
                 duration: float = 0.0, started_at: str = "", input_file: dict | None = None,
                 extra: dict | None = None) -> dict:
    """Write ``{dataset}_status.json`` atomically and return it.

    ``input_file`` (the input's ``path``, ``size``, ``mtime_ns`` and ``ctime_ns`` when the dataset started):
    ``--resume`` leaves a rejected input alone until the file changes, and runs a finished dataset again
    when its input changed since; ``extra`` adds keys (e.g. the
    SLURM job that ran the dataset: ``slurm_job_id``, ``slurm_log``). A status that cannot be
    written (a full disk) is still returned, its error saying so: the driver reports it all the same.
    """
    record = {
        "dataset": paths.dataset,
        "tissue": paths.tissue,
        "status": status,
        "error_type": error_type,
        "error": " ".join(str(error).split()),
        "duration_s": round(duration, 3),
        "started_at": started_at,
        "finished_at": now_iso(),
    }
    if input_file:
        record["input_file"] = input_file
    record.update(extra or {})
    try:
        write_json(paths.status_json, record)
    except OSError as exc:
        note = f"{paths.status_json.name} could not be written: {exc.strerror or exc}"
        record["error"] = f"{record['error']} ({note})" if record["error"] else note
        if status == SUCCESS:
            record.update(status=FAILED, error_type="OutputError")
    return record


#: the reason an input is rejected for the memory of the machine, not for what the file holds
TOO_LARGE = "too large for memory"


def input_fingerprint(path: str | Path) -> dict | None:
    """The input file's path, size, modification and status-change times (a ``chmod`` changes the latter), or
    ``None`` when it cannot be read."""
    try:
        stat = Path(path).stat()
    except OSError:
        return None
    return {"path": str(path), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "ctime_ns": stat.st_ctime_ns}


def _changes(record: dict | None, path: str | Path, keys: tuple[str, ...]) -> list[str] | None:
    """The ``keys`` of the input's fingerprint that differ from the one a status recorded; ``None`` when they
    cannot be compared (no record of it, the file gone). A key an older record lacks is not compared."""
    seen, now = (record or {}).get("input_file"), input_fingerprint(path)
    if not seen or not now:
        return None
    return [key for key in keys if key in seen and seen[key] != now[key]]


def input_changed(record: dict | None, path: str | Path) -> str:
    """Why the input of a dataset's status is no longer the file it ran on (its size or modification time
    changed since), or ``""`` when it is the same, cannot be compared (an older record) or is gone."""
    changed = _changes(record, path, ("size", "mtime_ns"))
    names = {"size": "size", "mtime_ns": "modification time"}
    return (f"its input {Path(path).name} changed since it ran ({' and '.join(names[k] for k in changed)})"
            if changed else "")


def rejected_and_unchanged(record: dict | None, path: str | Path) -> bool:
    """Whether a status records an input rejected as unreadable or invalid that has not changed since (its
    content, or its permissions); an input too large for one machine's memory may fit in the next's."""
    if not record or record.get("status") != FAILED or record.get("error_type") != "InputError":
        return False
    if TOO_LARGE in str(record.get("error", "")):
        return False
    return _changes(record, path, ("size", "mtime_ns", "ctime_ns")) == []
