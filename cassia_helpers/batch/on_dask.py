"""The driver's Dask path: open the cluster, check the shared storage, run each dataset as a task, and record
how each ended and where it ran (its SLURM job and log).

Dask is imported only when :func:`run_on_dask` runs.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

from cassia_helpers.batch.discovery import Dataset
from cassia_helpers.batch.interrupts import Interrupts
from cassia_helpers.contract import FAILED, DatasetPaths, read_status, write_status
from cassia_helpers.files import write_json
from cassia_helpers.settings import Settings, UsageError

if TYPE_CHECKING:
    from cassia_helpers.batch.dask.tasks import Progress as DaskProgress

log = logging.getLogger("cassia_helpers")
Launcher = Callable[[dict, Callable[[], bool]], dict]
# Why a SLURM job ended that more memory or time may cure (``--slurm-retries``).
RETRYABLE = {"JobOutOfMemory": "memory", "JobTimeLimit": "walltime"}


def run_on_dask(settings: Settings, run_dir: Path, jobs: dict, launcher: Launcher, interrupts: Interrupts,
                 progress, finished: Callable[[Dataset, dict], None], ahead: Callable[[], None]) -> str:
    """Run the jobs as Dask tasks, one per dataset, until done or interrupted; ``ahead()`` once every
    dataset is on a worker. Returns why the run stopped early (its scheduler was lost), or ``""``."""

    def polled(state: DaskProgress) -> None:
        progress.poll()
        if state.queued == 0:
            ahead()

    from cassia_helpers.batch.dask.client import ClusterError, check_shared_storage, dashboard_link, open_client
    from cassia_helpers.batch.dask.tasks import DatasetExecutor

    slurm = settings.cluster == "slurm" and not settings.scheduler
    since = time.time()
    try:
        options = None
        if slurm:
            from cassia_helpers.batch.dask.slurm import cluster_options

            options = cluster_options(settings, run_dir)
            if options["memory_from_inputs"]:
                from cassia_helpers.batch.dask.memory import memory_for_inputs

                options["memory"] = memory_for_inputs((dataset.path for dataset, _ in jobs.values()),
                                                      cap=options["memory"])
        with open_client(workers=settings.workers, scheduler=settings.scheduler or None,
                         cluster=None if settings.scheduler else settings.cluster, cluster_options=options,
                         cluster_timeout=settings.cluster_timeout, name=f"cassia-{run_dir.name}",
                         stop=interrupts.event.is_set) as client:
            if not interrupts.event.is_set():
                problem = check_shared_storage(client, run_dir)
                if problem:
                    raise UsageError(problem)
            upkeep = ready = None
            if client.cassia_slurm is not None:
                upkeep = partial(client.cassia_slurm.upkeep, give_up_s=settings.cluster_timeout)
                ready = client.cassia_slurm.ready_workers
            executor = DatasetExecutor(client, upkeep=upkeep, ready=ready)
            interrupts.on_stop = executor.stop
            if interrupts.event.is_set():
                executor.stop()
            link = dashboard_link(client)
            if link:
                log.info("Dask dashboard: %s", link)

            retries = int(options["retries"]) if options else 0
            held: dict[str, dict] = {}  # failed records of datasets to run again
            attempts: dict[str, list[dict]] = {}  # key -> its earlier attempts (``slurm_retries`` of its status)
            size = {"memory": options["memory"], "walltime": options["walltime"]} if options else {}

            def done(key: str, record: dict) -> None:
                dataset = jobs[key][0]
                record = recorded(run_dir, dataset, record, executor.started(key), since=since,
                                  extra={"slurm_retries": attempts[key]} if key in attempts else None)
                if record.get("error_type") in RETRYABLE and len(attempts.get(key, [])) < retries:
                    held[key] = record
                else:
                    finished(dataset, record)

            todo = {key: job for key, (_, job) in jobs.items()}
            while todo:
                executor.run_jobs(launcher, todo, on_done=done, on_progress=polled)
                todo = {}
                if held and not (executor.lost or interrupts.event.is_set()):
                    todo = _retry(run_dir, jobs, held, attempts, size, float(options["retry_factor"]))
                    client.cassia_slurm.resize(jobs=min(client.cassia_slurm.jobs, len(todo)), **size)
                for key, record in held.items():
                    if key not in todo:
                        finished(jobs[key][0], record)
                held.clear()
            return executor.lost
    except ClusterError as exc:
        raise UsageError(str(exc)) from None
    finally:
        interrupts.on_stop = None


def _retry(run_dir: Path, jobs: dict, held: dict[str, dict], attempts: dict[str, list[dict]], size: dict,
           factor: float) -> dict:
    """The jobs of the held datasets, to run again with ``factor`` times the memory or walltime that they
    lacked (``size`` is updated); their failed attempts are noted and their files set aside."""
    from dask.utils import format_bytes, parse_bytes

    from cassia_helpers.batch.dask.slurm_jobs import slurm_seconds
    from cassia_helpers.batch.resume import set_aside

    before = dict(size)
    lacked = {RETRYABLE[record["error_type"]] for record in held.values()}
    if "memory" in lacked:
        size["memory"] = format_bytes(int(parse_bytes(size["memory"]) * factor)).replace(" ", "")
    if "walltime" in lacked:
        seconds = int((slurm_seconds(size["walltime"]) or 0) * factor)
        size["walltime"] = f"{seconds // 3600:02d}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"
    for key, record in held.items():
        attempt = {name: record.get(name, "") for name in ("slurm_job_id", "slurm_log", "error_type", "error")}
        attempts.setdefault(key, []).append({**attempt, "slurm_memory": before["memory"],
                                             "slurm_walltime": before["walltime"]})
        dataset = jobs[key][0]
        set_aside(DatasetPaths(run_dir, dataset.tissue, dataset.name),
                  f"{record['error']}; run again with --slurm-memory {size['memory']} "
                  f"--slurm-walltime {size['walltime']}", by="--slurm-retries")
    log.warning("%d dataset(s) ran out of SLURM memory or time; running them again in new jobs with "
                "--slurm-memory %s --slurm-walltime %s (--slurm-retries)", len(held), size["memory"],
                size["walltime"])
    return {key: jobs[key][1] for key in held}


def recorded(run_dir: Path, dataset: Dataset, record: dict, started: dict | None = None, *,
              since: float = 0.0, extra: dict | None = None) -> dict:
    """The dataset's status record, with where it ran (``started``: its SLURM job and log, start time).

    A record the executor made (a dead worker or job, a stop, a lost scheduler) is written to the status
    file here: a dead SLURM job's reason comes from the job's state and log; a dataset running when the
    scheduler was lost keeps the status its runner still records (waited for a while).
    """
    paths = DatasetPaths(run_dir, dataset.tissue, dataset.name)
    started = started or {}
    where = {key: started[key] for key in ("slurm_job_id", "slurm_log") if started.get(key)}
    where.update(extra or {})
    if "dataset" in record:
        if where and any(record.get(key) != value for key, value in where.items()):
            record = {**record, **where}
            write_json(paths.status_json, record)
        return record
    error, error_type = record.get("error", ""), record.get("error_type", "")
    if error_type == "SchedulerLost" and not error.startswith("not started"):
        deadline = time.monotonic() + 60.0
        while time.monotonic() < deadline:
            own = read_status(paths)
            if own and paths.status_json.stat().st_mtime >= since:
                return own
            time.sleep(1.0)
    if error_type == "WorkerDied" and where.get("slurm_job_id"):
        from cassia_helpers.batch.dask.slurm_jobs import job_end

        error, error_type = job_end(where["slurm_job_id"], where.get("slurm_log", ""))
    duration = time.time() - started["t0"] if started.get("t0") else 0.0
    return write_status(paths, record.get("status", FAILED), error=error, error_type=error_type,
                        duration=duration, started_at=started.get("started_at", ""), extra=where)
