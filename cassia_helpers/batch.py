"""The batch driver: make (or resume) the run folder, run every dataset, then aggregate.

Each dataset runs in its own worker process (``python -m cassia_helpers.runner``), in its own process
group, so a timeout or Ctrl-C can stop exactly the datasets that are running and nothing else.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from tqdm.auto import tqdm

from .config import AnalysisParams, BatchConfig, dataset_params
from .discovery import Dataset, UsageError, discover
from .io import write_json
from .layout import RUN_MANIFEST, DatasetPaths, new_run_dir, run_label
from .runner import FAILED, INTERRUPTED, SUCCESS, now_iso, read_status, rejected_and_unchanged, write_status


@dataclass
class BatchResult:
    """What a batch did: its folder and each dataset's final status."""

    run_dir: Path
    statuses: dict[tuple[str, str], str] = field(default_factory=dict)
    interrupted: bool = False

    @property
    def exit_code(self) -> int:
        if self.interrupted:
            return 130
        return 0 if all(s == SUCCESS for s in self.statuses.values()) else 1


@dataclass
class _Running:
    dataset: Dataset
    process: subprocess.Popen
    started: float
    started_at: str


def _manifest(config: BatchConfig, datasets: list[Dataset], run_dir: Path) -> dict:
    analysis = asdict(config.analysis)
    return {
        "run_dir": str(run_dir),
        "created_at": now_iso(),
        "data_dir": str(config.data_dir),
        "tissues": config.tissues,
        "workers": config.workers,
        "dataset_timeout": config.dataset_timeout,
        "cell_timeout": config.cell_timeout,
        "kernel_name": config.kernel_name,
        "analysis": analysis,
        "datasets": [{"name": d.name, "tissue": d.tissue, "path": str(d.path)} for d in datasets],
        "sessions": [],
    }


def prepare_run(config: BatchConfig) -> tuple[Path, list[Dataset], dict]:
    """Create a new run folder, or reopen ``config.resume``; return it with its datasets and manifest."""
    if config.resume is not None:
        run_dir = Path(config.resume)
        manifest_path = run_dir / RUN_MANIFEST
        if not manifest_path.is_file():
            raise UsageError(f"{run_dir}: not a run folder (no {RUN_MANIFEST})")
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        datasets = [Dataset(d["name"], d["tissue"], Path(d["path"])) for d in manifest["datasets"]]
        return run_dir, datasets, manifest
    datasets = discover(config.data_dir, config.tissues)
    tissues = sorted({d.tissue for d in datasets}, key=[d.tissue for d in datasets].index)
    label = run_label(tissues, all_tissues="all" in config.tissues)
    run_dir = new_run_dir(config.output_dir, label)
    manifest = _manifest(config, datasets, run_dir)
    write_json(run_dir / RUN_MANIFEST, manifest)
    return run_dir, datasets, manifest


def _start(config: BatchConfig, analysis: AnalysisParams, run_dir: Path, dataset: Dataset) -> _Running:
    params = dataset_params(analysis, dataset=dataset.name, tissue=dataset.tissue, input_path=dataset.path,
                            run_dir=run_dir.resolve())
    paths = DatasetPaths(run_dir, dataset.tissue, dataset.name)
    paths.folder.mkdir(parents=True, exist_ok=True)
    # Whatever status is found after the worker ends was written by this worker.
    paths.status_json.unlink(missing_ok=True)
    job = {
        "parameters": params.to_parameters(),
        "kernel_name": config.kernel_name,
        "cell_timeout": config.cell_timeout,
    }
    process = subprocess.Popen(
        [sys.executable, "-m", "cassia_helpers.runner", json.dumps(job)],
        env=worker_environment(config.workers),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    return _Running(dataset, process, time.monotonic(), now_iso())


THREAD_VARIABLES = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS")


def worker_environment(workers: int, environ: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of a worker: the driver's, with BLAS/OpenMP/numba threads shared out among workers.

    Each worker gets ``cores // workers`` threads (at least one), or fewer if the user asked for fewer,
    so that ``--workers 2`` on two cores runs two single-threaded kernels instead of four threads
    fighting over two cores.
    """
    env = dict(os.environ if environ is None else environ)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    share = max(1, cores // max(1, workers))
    for name in THREAD_VARIABLES:
        try:
            asked = int(env[name])
        except (KeyError, ValueError):
            asked = share
        env[name] = str(max(1, min(asked, share)))
    return env


def _stop(running: _Running) -> None:
    try:
        os.killpg(running.process.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    try:
        running.process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(running.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        running.process.wait()


def _finish(run_dir: Path, running: _Running, *, forced: str = "", reason: str = "") -> str:
    paths = DatasetPaths(run_dir, running.dataset.tissue, running.dataset.name)
    duration = time.monotonic() - running.started
    if forced:
        return write_status(paths, forced, error=reason, error_type=forced.capitalize(), duration=duration,
                            started_at=running.started_at)["status"]
    record = read_status(paths)
    if record is None:
        code = running.process.returncode
        how = f"was killed by signal {-code}" if code is not None and code < 0 else f"exited with code {code}"
        return write_status(paths, FAILED, error=f"dataset worker {how} before recording a status",
                            error_type="WorkerDied", duration=duration,
                            started_at=running.started_at)["status"]
    return record["status"]


class _Interrupts:
    """First Ctrl-C/SIGTERM: stop starting datasets and wind down; second: stop at once."""

    def __init__(self) -> None:
        self.count = 0
        self._previous: dict[int, object] = {}

    def __enter__(self) -> _Interrupts:
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum, frame) -> None:
        self.count += 1
        if self.count == 1:
            print("\nInterrupted: stopping the running datasets and writing the summaries "
                  "(press Ctrl-C again to stop at once).", file=sys.stderr)
        else:
            raise KeyboardInterrupt


def run_batch(config: BatchConfig) -> BatchResult:
    """Run every selected dataset, then the aggregation notebook. The API behind ``run_batch.py``."""
    from .summary import aggregate

    run_dir, datasets, manifest = prepare_run(config)
    result = BatchResult(run_dir=run_dir)
    manifest.setdefault("sessions", []).append({"started_at": now_iso(), "resumed": config.resume is not None})
    write_json(run_dir / RUN_MANIFEST, manifest)

    todo, rejected = [], []
    for dataset in datasets:
        status = read_status(DatasetPaths(run_dir, dataset.tissue, dataset.name))
        if status and status.get("status") == SUCCESS:
            result.statuses[(dataset.tissue, dataset.name)] = SUCCESS
        elif rejected_and_unchanged(status, dataset.path):
            # the same file would be rejected again: it runs once it has been replaced or fixed
            result.statuses[(dataset.tissue, dataset.name)] = FAILED
            rejected.append(f"{dataset.path}: {status.get('error', '')}")
        else:
            todo.append(dataset)
    print(f"Run folder: {run_dir}", file=sys.stderr)
    if len(todo) < len(datasets):
        done = len(datasets) - len(todo) - len(rejected)
        print(f"Resuming: {done} dataset(s) already complete, {len(todo)} to run", file=sys.stderr)
    for line in rejected:
        print(f"Not re-run (input unchanged since it was rejected): {line}", file=sys.stderr)

    # The analysis settings are the run's own (a resumed run keeps them); how to execute may change.
    analysis = AnalysisParams(**manifest["analysis"])
    workers, timeout = max(1, config.workers), config.dataset_timeout
    running: list[_Running] = []
    queue = list(todo)
    with _Interrupts() as interrupts, tqdm(total=len(todo), unit="dataset", desc="datasets",
                                           disable=None) as bar:
        try:
            while (queue or running) and not interrupts.count:
                while queue and len(running) < workers and not interrupts.count:
                    running.append(_start(config, analysis, run_dir, queue.pop(0)))
                time.sleep(0.2)
                for job in list(running):
                    if job.process.poll() is not None:
                        status = _finish(run_dir, job)
                    elif timeout and time.monotonic() - job.started > timeout:
                        _stop(job)
                        status = _finish(run_dir, job, forced=FAILED,
                                         reason=f"dataset timed out after {timeout:g} s (--dataset-timeout)")
                    else:
                        continue
                    running.remove(job)
                    result.statuses[(job.dataset.tissue, job.dataset.name)] = status
                    bar.set_postfix_str(f"{job.dataset.name}: {status}", refresh=False)
                    bar.update(1)
        except KeyboardInterrupt:
            interrupts.count = max(interrupts.count, 2)
        if interrupts.count:
            result.interrupted = True
            for job in running:
                _stop(job)
                # A worker that recorded its status before it was stopped had finished its dataset.
                recorded = read_status(DatasetPaths(run_dir, job.dataset.tissue, job.dataset.name))
                result.statuses[(job.dataset.tissue, job.dataset.name)] = (
                    recorded["status"] if recorded else
                    _finish(run_dir, job, forced=INTERRUPTED, reason="interrupted by the user"))
            for dataset in queue:
                paths = DatasetPaths(run_dir, dataset.tissue, dataset.name)
                paths.folder.mkdir(parents=True, exist_ok=True)
                write_status(paths, INTERRUPTED, error="not started: the run was interrupted",
                             error_type="Interrupted")
                result.statuses[(dataset.tissue, dataset.name)] = INTERRUPTED
    if interrupts.count >= 2:
        print(f"Stopped at once. Resume with: python run_batch.py --resume {run_dir}", file=sys.stderr)
        return result
    aggregate(run_dir, kernel_name=config.kernel_name)
    if result.interrupted:
        print(f"Resume with: python run_batch.py --resume {run_dir}", file=sys.stderr)
    return result
