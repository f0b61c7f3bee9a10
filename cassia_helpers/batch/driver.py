"""The batch driver: make (or resume) the run folder, run every dataset, then aggregate.

The driver takes the function that runs one dataset (the *launcher*, by default
:func:`cassia_helpers.batch.runner.run_dataset`), so scheduling, statuses, resume and interrupts are the same
whatever runs the datasets, and tests can pass a fast fake. A run folder is locked while a driver works
in it: a second driver on the same run is a usage error, and the lock of a killed driver is released by
the operating system, so ``--resume`` takes it over.
"""

from __future__ import annotations

import fcntl
import logging
import shutil
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

from cassia_helpers.batch.discovery import Dataset, discover, single_input
from cassia_helpers.batch.interrupts import Interrupts
from cassia_helpers.batch.manifest import dataset_settings
from cassia_helpers.batch.on_dask import Launcher, recorded, run_on_dask
from cassia_helpers.contract import (
    BREAKER_FILE,
    DATASETS_CSV,
    FAILED,
    INTERRUPTED,
    NOT_STARTED,
    RUN_LOCK,
    RUN_MANIFEST,
    STOPPED_RUNNING,
    SUCCESS,
    DatasetPaths,
    input_fingerprint,
    new_run_dir,
    now_iso,
    read_manifest,
    read_status,
    rejected_and_unchanged,
    run_label,
    write_status,
)
from cassia_helpers.files import absolute, remove_temporary, write_json, write_text
from cassia_helpers.settings import RESUME_MAY_CHANGE, RUN, Settings, UsageError, notebook_parameters

if TYPE_CHECKING:
    from cassia_helpers.batch.execute import AggregationNotebook

log = logging.getLogger("cassia_helpers")


@dataclass
class BatchResult:
    """What a batch did: its folder and each dataset's final status."""

    run_dir: Path
    statuses: dict[tuple[str, str], str] = field(default_factory=dict)
    errors: dict[tuple[str, str], str] = field(default_factory=dict)
    interrupted: bool = False
    cause: str = ""  # why the run stopped early without being interrupted (e.g. its scheduler was lost)
    summaries: str = ""  # which run summaries could not be written, and why (a full disk)

    @property
    def exit_code(self) -> int:
        done = all(s == SUCCESS for s in self.statuses.values()) and not self.summaries
        return 130 if self.interrupted else 0 if done else 1


def _lock(run_dir: Path):
    """Hold the run folder's lock for this process's lifetime; a usage error if another driver holds it."""
    try:
        handle = open(run_dir / RUN_LOCK, "a+")  # noqa: SIM115 - held open for the whole run
    except OSError as exc:
        raise UsageError(f"{run_dir}: cannot write in the run folder ({exc.strerror})") from None
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        handle.close()
        raise UsageError(f"{run_dir}: another driver is working on this run (wait for it, or stop it first)") from None
    return handle


def prepare_run(settings: Settings) -> tuple[Path, list[Dataset], dict, Settings]:
    """Create a new run folder, or reopen ``settings.resume``; return it with its datasets, manifest and the
    settings the datasets run with (a resumed run keeps its analysis settings)."""
    if settings.resume is not None:
        run_dir = Path(settings.resume)
        manifest = read_manifest(run_dir)
        if not run_dir.is_dir():
            raise UsageError(f"{run_dir}: run folder not found" if not run_dir.exists() else f"{run_dir}: not a folder")
        if manifest is None:
            reason = "no" if not (run_dir / RUN_MANIFEST).exists() else "an unreadable"
            raise UsageError(f"{run_dir}: not a run folder ({reason} {RUN_MANIFEST})")
        from cassia_helpers.batch.resume import manifest_analysis, manifest_datasets

        datasets = manifest_datasets(manifest, run_dir / RUN_MANIFEST)
        analysis = manifest_analysis(manifest, run_dir / RUN_MANIFEST)
        given = {name: value for name, value in settings.changed().items() if name in RESUME_MAY_CHANGE}
        if given:  # this session's, recorded with it
            analysis.update(given)
            manifest["analysis"] = {**manifest.get("analysis", {}), **given}
        run_settings = Settings.with_analysis(analysis, **settings.values(RUN))
        from cassia_helpers.dataset.annotate.factory import check_llm_setup

        check_llm_setup(run_settings)
        return run_dir, datasets, manifest, run_settings
    if settings.manifest is not None:
        from cassia_helpers.batch.manifest import read_manifest_csv

        found = read_manifest_csv(settings.manifest)
        label = run_label(list(dict.fromkeys(d.tissue for d in found.datasets)), all_tissues=False)
    elif settings.input is not None:
        found = single_input(settings.input, settings.tissue)
        label = run_label([settings.tissue], all_tissues=False)
    else:
        found = discover(settings.data_dir, settings.tissues)
        tissues = list(dict.fromkeys(d.tissue for d in found.datasets))
        label = run_label(tissues, all_tissues="all" in settings.tissues)
    for line in found.skipped:
        log.warning(line)
    try:
        run_dir = new_run_dir(settings.output_dir, label)
    except OSError as exc:
        output = Path(settings.output_dir)
        if output.exists() and not output.is_dir():
            raise UsageError(f"{output}: --output-dir is a file, not a folder") from None
        raise UsageError(f"{output}: cannot create the run folder there ({exc.strerror})") from None
    manifest = {
        "run_dir": str(run_dir),
        "created_at": now_iso(),
        "data_dir": str(settings.data_dir),
        "tissues": settings.tissues or [settings.tissue],
        "analysis": settings.values(),
        "datasets": [{"name": d.name, "tissue": d.tissue, "path": str(d.path), **({"options": dict(d.options)}
                      if d.options else {})} for d in found.datasets],
        "skipped_inputs": found.skipped,
        "sessions": [],
    }
    if settings.manifest is not None:  # the user's own list, as given, beside the run's record of it
        manifest["manifest"] = str(absolute(settings.manifest))
        write_text(run_dir / DATASETS_CSV, Path(settings.manifest).read_text(encoding="utf-8-sig"))
    write_json(run_dir / RUN_MANIFEST, manifest)
    return run_dir, found.datasets, manifest, settings


def _job(settings: Settings, run_dir: Path, dataset: Dataset) -> dict:
    # a local cluster shares this machine's cores among its workers; a SLURM job has its own
    share = settings.workers if settings.cluster == "local" and not settings.scheduler else 1
    return {
        "parameters": notebook_parameters(dataset_settings(settings, dataset), dataset=dataset.name,
                                          tissue=dataset.tissue, input_path=dataset.path, run_dir=run_dir.resolve()),
        "kernel_name": settings.kernel_name,
        "cell_timeout": settings.cell_timeout,
        "dataset_timeout": settings.dataset_timeout,
        "workers": share,
    }


def _pending(run_dir: Path, datasets: list[Dataset], result: BatchResult) -> list[Dataset]:
    """Datasets still to run; completed ones and inputs rejected and unchanged since are recorded as they are."""
    todo = []
    for dataset in datasets:
        key = (dataset.tissue, dataset.name)
        status = read_status(DatasetPaths(run_dir, dataset.tissue, dataset.name))
        if status and status["status"] == SUCCESS:
            result.statuses[key] = SUCCESS
        elif rejected_and_unchanged(status, dataset.path):
            result.statuses[key], result.errors[key] = FAILED, status.get("error", "")
            log.warning("Not re-run (input unchanged since it was rejected): %s", status.get("error", ""))
        else:
            todo.append(dataset)
    if len(todo) < len(datasets):
        log.info("Resuming: %d dataset(s) already complete or rejected, %d to run", len(datasets) - len(todo),
                 len(todo))
    return todo


def run_batch(settings: Settings, *, launcher: Launcher | None = None,
              aggregate: Callable[[Path, str], None] | None = None) -> BatchResult:
    """Run every selected dataset, then the aggregation. The API behind ``run_batch.py``.

    Each dataset is one Dask task (:mod:`cassia_helpers.batch.dask`): on a local cluster of
    ``settings.workers`` processes by default, on the workers of ``settings.scheduler``, or in SLURM jobs
    (``settings.cluster == "slurm"``). ``launcher(job, should_stop)`` runs one dataset and returns its
    status record (default: :func:`cassia_helpers.batch.runner.run_dataset`); ``aggregate(run_dir,
    kernel_name)`` writes the run-level summaries (default: the aggregation notebook, or the summaries
    directly when it fails).
    """
    return _batch(settings, launcher, aggregate, in_process=False)


def _batch(settings: Settings, launcher: Launcher | None, aggregate: Callable[[Path, str], None] | None, *,
           in_process: bool) -> BatchResult:
    """:func:`run_batch`; ``in_process`` runs the launcher in threads of this process instead of Dask tasks
    (the driver's own logic, tested with a fast fake launcher)."""
    if launcher is None:
        from cassia_helpers.batch.runner import run_dataset as launcher
    run_dir, datasets, manifest, settings = prepare_run(settings)
    lock = _lock(run_dir)
    try:
        return _run_locked(settings, run_dir, datasets, manifest, launcher, aggregate or _aggregate, in_process)
    except UsageError:
        if settings.resume is None:
            _discard_unstarted(run_dir)
        raise
    finally:
        lock.close()


def _discard_unstarted(run_dir: Path) -> None:
    """Remove a new run folder that holds nothing but the driver's own records (its cluster could not start,
    say): the rerun with mended options makes its own, and this one would only be mistaken for a run. A
    dataset's status or a SLURM job's log keeps it."""
    own = {RUN_MANIFEST, RUN_LOCK, DATASETS_CSV}
    if all(path.name in own for path in run_dir.rglob("*") if not path.is_dir()):
        shutil.rmtree(run_dir, ignore_errors=True)
        log.info("Run folder %s removed: nothing ran in it", run_dir)  # it was named at the start


def _run_locked(settings: Settings, run_dir: Path, datasets: list[Dataset], manifest: dict,
                launcher: Launcher, aggregate: Callable[[Path, str], str | None], in_process: bool) -> BatchResult:
    notebook = None
    if aggregate is _aggregate:
        from cassia_helpers.batch.execute import AggregationNotebook

        # its kernel starts while the last datasets run (the runners call ``ahead``), not after them
        notebook = AggregationNotebook(run_dir, settings.kernel_name)
        aggregate = partial(_aggregate, notebook=notebook)
    try:
        return _run_session(settings, run_dir, datasets, manifest, launcher, aggregate, in_process,
                            ahead=notebook.prepare if notebook else None)
    finally:
        if notebook is not None:
            notebook.close()
        from cassia_helpers.batch import runner

        if launcher is runner.run_dataset:  # the workers started ahead that no dataset took
            runner.stop_ahead()


def _run_session(settings: Settings, run_dir: Path, datasets: list[Dataset], manifest: dict, launcher: Launcher,
                 aggregate: Callable[[Path, str], None], in_process: bool,
                 ahead: Callable[[], None] | None) -> BatchResult:
    from cassia_helpers.batch.progress import Progress

    result = BatchResult(run_dir=run_dir)
    manifest.setdefault("sessions", []).append({"started_at": now_iso(), "resumed": settings.resume is not None})
    write_json(run_dir / RUN_MANIFEST, manifest)
    log.info("Run folder: %s", run_dir)
    if settings.resume is not None:  # check what the folder says before trusting it
        from cassia_helpers.batch.resume import recheck

        recheck(run_dir, datasets, manifest, max_cost=settings.max_cost)
        (run_dir / BREAKER_FILE).unlink(missing_ok=True)  # a resume tries the server again, cool-down or not
    todo = _pending(run_dir, datasets, result)
    for dataset in todo:  # an interrupted session's progress would be shown again as this session's
        DatasetPaths(run_dir, dataset.tissue, dataset.name).progress_jsonl.unlink(missing_ok=True)
    progress = Progress(run_dir, todo, quiet=settings.quiet)

    def finished(dataset: Dataset, record: dict) -> None:
        key = (dataset.tissue, dataset.name)
        result.statuses[key], result.errors[key] = record["status"], record.get("error", "")
        if record["status"] != SUCCESS:  # a write cut short (a full disk, a killed kernel) leaves its temporary
            remove_temporary(DatasetPaths(run_dir, dataset.tissue, dataset.name).folder)
        progress.done(dataset, record)
        if "No space left on device" in str(record.get("error", "")) and not result.cause:
            # every dataset after it would fail the same way, one line each: stop starting them
            result.cause = f"no space left on the device of {run_dir} (free space, then resume)"
            log.error("%s: no more datasets are started", result.cause[0].upper() + result.cause[1:])
            interrupts.event.set()
            if interrupts.on_stop is not None:  # the Dask executor's
                interrupts.on_stop()

    with Interrupts() as interrupts:
        try:
            jobs = {}
            for dataset in todo:  # an input its header rejects never reaches a worker
                rejected = _check_header(run_dir, dataset, dataset_settings(settings, dataset))
                if rejected:
                    finished(dataset, rejected)
                else:
                    jobs[_task_key(run_dir, dataset)] = (dataset, _job(settings, run_dir, dataset))
            if jobs and not interrupts.event.is_set():
                _start_ahead(settings, launcher, [job for _, job in jobs.values()], in_process)
                run = _run_in_threads if in_process else run_on_dask
                result.cause = run(settings, run_dir, jobs, launcher, interrupts, progress, finished,
                                   ahead or _nothing) or result.cause
        except KeyboardInterrupt:
            interrupts.count = max(interrupts.count, 2)
        if interrupts.count or result.cause:
            result.interrupted = bool(interrupts.count)
            for dataset in todo:
                key = (dataset.tissue, dataset.name)
                if key not in result.statuses:
                    paths = DatasetPaths(run_dir, dataset.tissue, dataset.name)
                    # its kernel had reported a step (this session cleared the files): it was running
                    error = STOPPED_RUNNING if paths.progress_jsonl.exists() else NOT_STARTED
                    try:
                        record = read_status(paths) or write_status(paths, INTERRUPTED, error=error,
                                                                    error_type="Interrupted")
                    except OSError:  # a full disk: the closing table still says it, the resume runs it
                        record = {"status": INTERRUPTED}
                    result.statuses[key] = record["status"]
    progress.close()
    from cassia_helpers.batch.resume import resume_command, say_unanswered

    resume = resume_command(run_dir, settings)
    with Interrupts() as late:  # a Ctrl-C during the summaries counts on from those before
        late.count = interrupts.count
        try:
            if late.count < 2:
                result.summaries = aggregate(run_dir, settings.kernel_name) or ""
        except KeyboardInterrupt:
            late.count = 2
    if late.count >= 2:
        result.interrupted = True
        log.warning("Stopped at once. Resume with: %s", resume)
        return result
    progress.table(result)

    say_unanswered(run_dir, [k for k, s in result.statuses.items() if s == SUCCESS], resume, cached=settings.use_cache)
    unfinished = any(status != SUCCESS for status in result.statuses.values())
    if result.cause and unfinished:  # a scheduler lost after every dataset finished stopped nothing
        log.warning("Stopped early: %s. Resume with: %s", result.cause, resume)
    elif result.interrupted:
        log.warning("Resume with: %s", resume)
    elif unfinished:
        log.warning("Once their cause is fixed, %s runs the failed datasets again", resume)
    return result


def _start_ahead(settings: Settings, launcher: Launcher, jobs: list[dict], in_process: bool) -> None:
    """On the default local cluster (its workers are threads of this process), start the first datasets'
    worker processes and kernels now, while Dask starts, and have each dataset start its successor's."""
    from cassia_helpers.batch import runner

    if launcher is runner.run_dataset and not in_process and settings.cluster == "local" and not settings.scheduler:
        runner.start_ahead(jobs, max(1, settings.workers))


def _task_key(run_dir: Path, dataset: Dataset) -> str:
    return f"{run_dir.name}/{dataset.tissue}/{dataset.name}"


def _nothing() -> None:
    """No preparation while the last datasets run."""


def _run_in_threads(settings: Settings, run_dir: Path, jobs: dict, launcher: Launcher, interrupts: Interrupts,
                    progress, finished: Callable[[Dataset, dict], None], ahead: Callable[[], None]) -> None:
    """Run the jobs in ``settings.workers`` threads of this process until done or interrupted; ``ahead()``
    once every dataset has started."""
    queue = list(jobs.values())
    with ThreadPoolExecutor(max_workers=max(1, settings.workers), thread_name_prefix="dataset") as pool:
        running: dict = {}
        while queue or running:
            while queue and len(running) < settings.workers and not interrupts.event.is_set():
                dataset, job = queue.pop(0)
                running[pool.submit(launcher, job, interrupts.event.is_set)] = dataset
            if not running:
                break
            if not queue:
                ahead()
            done, _ = wait(running, timeout=0.5, return_when=FIRST_COMPLETED)
            progress.poll()
            for future in done:
                dataset = running.pop(future)
                try:
                    record = future.result()
                except Exception as exc:  # noqa: BLE001 - a launcher bug fails its dataset, not the batch
                    record = {"status": FAILED, "error": f"{type(exc).__name__}: {exc}", "error_type": "LauncherError"}
                finished(dataset, recorded(run_dir, dataset, record))


def _check_header(run_dir: Path, dataset: Dataset, settings: Settings) -> dict | None:
    """The failed status of an input its header already rejects (no kernel is started for it), else ``None``:
    not an h5ad, no cells or genes, or no ``obs`` column of the name a ``*_key`` setting gives."""
    from cassia_helpers.inputs import InputError, check_input

    paths = DatasetPaths(run_dir, dataset.tissue, dataset.name)
    paths.folder.mkdir(parents=True, exist_ok=True)
    try:
        # memory is checked by the kernel, when it reads the file
        check_input(dataset.path, memory_limit=0, obs_keys=settings.obs_keys())
    except InputError as exc:
        return write_status(paths, FAILED, error=str(exc), error_type="InputError",
                            input_file=input_fingerprint(dataset.path))
    return None


def _aggregate(run_dir: Path, kernel_name: str, notebook: AggregationNotebook | None = None) -> str:
    """The run-level summaries (:meth:`~cassia_helpers.batch.execute.AggregationNotebook.write`; ``notebook``
    perhaps prepared ahead): ``""``, or which could not be written and why."""
    from cassia_helpers.batch.execute import AggregationNotebook

    return (notebook or AggregationNotebook(run_dir, kernel_name)).write()
