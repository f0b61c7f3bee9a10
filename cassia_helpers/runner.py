"""Execute the template notebook for one dataset and record its status.

The status file ``{dataset}_status.json`` is the authoritative record of a dataset: ``success`` only
when the notebook ran to its end *and* wrote its result record. Run as a module
(``python -m cassia_helpers.runner JOB_JSON``) it is the per-dataset worker the batch driver starts
in its own process group, so a dataset can be stopped (timeout, Ctrl-C) without touching the others.
"""

from __future__ import annotations

import json
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

from .io import write_json
from .layout import DatasetPaths

SUCCESS, FAILED, INTERRUPTED = "success", "failed", "interrupted"
TEMPLATE = Path(__file__).resolve().parent.parent / "templates" / "annotate_dataset.ipynb"
REQUIRED_OUTPUTS = ("markers_csv", "annotated_h5ad", "annotation_txt", "summary_txt", "result_json")


def template_path(name: str = "annotate_dataset.ipynb") -> Path:
    """A template notebook shipped with the project (``templates/`` beside the package)."""
    candidates = [TEMPLATE.parent / name, Path(sys.prefix) / "share" / "cassia-batch" / "templates" / name]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"template notebook {name} not found (looked in {candidates[0].parent})")


def now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def write_status(paths: DatasetPaths, status: str, *, error: str = "", error_type: str = "",
                 duration: float = 0.0, started_at: str = "", input_file: dict | None = None) -> dict:
    """Write ``{dataset}_status.json`` atomically and return it.

    ``input_file`` (the input's ``path``, ``size`` and ``mtime_ns``) is recorded when the input itself was
    rejected, so that ``--resume`` can leave it alone until the file changes.
    """
    record = {
        "dataset": paths.dataset,
        "tissue": paths.tissue,
        "status": status,
        "error_type": error_type,
        "error": error,
        "duration_s": round(duration, 3),
        "started_at": started_at,
        "finished_at": now_iso(),
    }
    if input_file:
        record["input_file"] = input_file
    write_json(paths.status_json, record)
    return record


def input_fingerprint(path: str | Path) -> dict | None:
    """The input file's path, size and modification time, or ``None`` when it cannot be read."""
    try:
        stat = Path(path).stat()
    except OSError:
        return None
    return {"path": str(path), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def rejected_and_unchanged(record: dict | None, path: str | Path) -> bool:
    """Whether a status records an input rejected as unreadable or invalid that has not changed since."""
    if not record or record.get("status") != FAILED or record.get("error_type") != "InputError":
        return False
    seen, now = record.get("input_file"), input_fingerprint(path)
    return bool(seen and now) and (seen["size"], seen["mtime_ns"]) == (now["size"], now["mtime_ns"])


def read_status(paths: DatasetPaths) -> dict | None:
    try:
        return json.loads(paths.status_json.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def describe_failure(exc: BaseException) -> tuple[str, str]:
    """A one-line reason and an error type for a failed execution."""
    from nbclient.exceptions import CellTimeoutError, DeadKernelError
    from papermill.exceptions import PapermillExecutionError

    if isinstance(exc, PapermillExecutionError):
        evalue = " ".join(str(exc.evalue).split())
        if exc.ename == "InputError":
            return evalue, exc.ename
        return f"{exc.ename}: {evalue} (notebook cell {exc.exec_count})", exc.ename
    if isinstance(exc, DeadKernelError):
        return "the notebook's kernel died (often out of memory)", "DeadKernelError"
    if isinstance(exc, CellTimeoutError):
        return f"a notebook cell timed out ({' '.join(str(exc).split())[:200]})", "CellTimeoutError"
    return f"{type(exc).__name__}: {' '.join(str(exc).split())[:300]}", type(exc).__name__


def missing_outputs(paths: DatasetPaths) -> list[str]:
    return [getattr(paths, name).name for name in REQUIRED_OUTPUTS if not getattr(paths, name).is_file()]


def execute_dataset(parameters: dict, *, kernel_name: str = "python3", cell_timeout: float = 0.0) -> dict:
    """Run the template for one dataset into its folder; write and return its status record."""
    import papermill as pm

    paths = DatasetPaths(Path(parameters["run_dir"]), parameters["tissue"], parameters["dataset"])
    paths.folder.mkdir(parents=True, exist_ok=True)
    started_at, start = now_iso(), time.perf_counter()
    paths.result_json.unlink(missing_ok=True)
    try:
        with open(paths.kernel_log, "w", encoding="utf-8") as log:
            pm.execute_notebook(
                str(template_path()),
                str(paths.notebook),
                parameters=parameters,
                kernel_name=kernel_name,
                cwd=str(paths.folder),
                progress_bar=False,
                log_output=False,
                stdout_file=log,
                stderr_file=log,
                execution_timeout=cell_timeout or None,
            )
    except KeyboardInterrupt:
        return write_status(paths, INTERRUPTED, error="interrupted by the user", error_type="KeyboardInterrupt",
                            duration=time.perf_counter() - start, started_at=started_at)
    except Exception as exc:  # noqa: BLE001 - every failure of one dataset is recorded, never raised
        reason, kind = describe_failure(exc)
        rejected = input_fingerprint(parameters["input_path"]) if kind == "InputError" else None
        return write_status(paths, FAILED, error=reason, error_type=kind, input_file=rejected,
                            duration=time.perf_counter() - start, started_at=started_at)
    missing = missing_outputs(paths)
    if missing:
        return write_status(paths, FAILED, error=f"notebook finished without writing {', '.join(missing)}",
                            error_type="MissingOutputs", duration=time.perf_counter() - start,
                            started_at=started_at)
    return write_status(paths, SUCCESS, duration=time.perf_counter() - start, started_at=started_at)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    job = json.loads(args[0])
    record = execute_dataset(job["parameters"], kernel_name=job.get("kernel_name", "python3"),
                             cell_timeout=job.get("cell_timeout", 0.0))
    return 0 if record["status"] == SUCCESS else 1


if __name__ == "__main__":
    sys.exit(main())
