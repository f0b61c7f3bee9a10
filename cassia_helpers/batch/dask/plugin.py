"""What runs inside Dask workers: their setup, and the wrapper around each dataset's task.

Imported by workers and by the driver once it uses Dask (it imports ``distributed``); the package's
light modules import it only inside functions.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable

from distributed import Event, WorkerPlugin, get_client, get_worker

from cassia_helpers.batch.dask.process import THREAD_VARIABLES, THREADS_ENV
from cassia_helpers.contract import FAILED, INTERRUPTED, NOT_STARTED, WORKER_DIED, now_iso, task_record
from cassia_helpers.dataset.annotate.llm.limits import SCHEDULER_ENV

PLUGIN_NAME = "cassia-worker-setup"
# Set by a SLURM job's script: the job's log file, recorded with each dataset the job runs.
SLURM_LOG_ENV = "CASSIA_SLURM_LOG"


def ignore_terminal_signals() -> None:
    """Let a worker survive the terminal's Ctrl-C (SIGINT) and hang-up (SIGHUP).

    Both reach the whole foreground process group, workers included; the driver decides what stops
    and the workers must live to report it. Only possible from the main thread (ignored elsewhere).
    """
    for sig in (signal.SIGINT, signal.SIGHUP):
        try:
            signal.signal(sig, signal.SIG_IGN)
        except ValueError:  # not the main thread
            return


def apply_dataset_threads() -> None:
    """With ``CASSIA_DATASET_THREADS`` set (a SLURM job's cores), give the datasets that many threads.

    Dask's nanny caps BLAS/OpenMP threads at 1 in its worker's environment, which the dataset's kernel
    would inherit.
    """
    threads = os.environ.get(THREADS_ENV, "")
    if threads.isdigit() and int(threads) > 0:
        for name in THREAD_VARIABLES:
            os.environ[name] = threads


def dask_setup(worker) -> None:
    """Preload hook (``--preload cassia_helpers.batch.dask.plugin``): runs as the worker starts."""
    ignore_terminal_signals()
    apply_dataset_threads()


class WorkerSetup(WorkerPlugin):
    """Registered by the driver on every worker, present and future (restarted ones too)."""

    idempotent = True
    name = PLUGIN_NAME

    def setup(self, worker) -> None:
        ignore_terminal_signals()
        apply_dataset_threads()
        os.environ[SCHEDULER_ENV] = worker.scheduler.address


def start_info() -> dict:
    """Where and when a dataset starts: kept on the scheduler, so that the driver can tell even if its worker
    dies (the SLURM job id and log are empty outside SLURM)."""
    return {"started_at": now_iso(), "t0": time.time(), "slurm_job_id": os.environ.get("SLURM_JOB_ID", ""),
            "slurm_log": os.environ.get(SLURM_LOG_ENV, "")}


class _StopWatch:
    """``stop()`` for one task: true once the run's stop Event is set or this task was cancelled.

    A background thread waits on the scheduler's Event, so that calling ``stop()`` costs nothing.
    """

    def __init__(self, event: Event, key: str, *, give_up_s: float = 60.0) -> None:
        self._event, self._key, self._give_up_s = event, key, give_up_s
        self._flag, self._done = threading.Event(), threading.Event()
        self._worker = get_worker()
        self._thread = threading.Thread(target=self._watch, name=f"stop-watch-{key}", daemon=True)
        self._thread.start()

    def _cancelled(self) -> bool:
        task = self._worker.state.tasks.get(self._key)
        return task is None or task.state in ("cancelled", "released", "forgotten")

    def _watch(self) -> None:
        unreachable_since = None
        while not self._done.is_set():
            try:
                if self._event.wait(timeout=0.5):
                    break
                unreachable_since = None
            except Exception:  # noqa: BLE001 - the scheduler is unreachable (for now)
                unreachable_since = unreachable_since or time.monotonic()
                if time.monotonic() - unreachable_since > self._give_up_s:
                    break
                self._done.wait(1.0)
            if self._cancelled():
                break
        self._flag.set()

    def __call__(self) -> bool:
        return self._flag.is_set()

    def close(self) -> None:
        self._done.set()


def execute(task: Callable[[dict, Callable[[], bool]], dict], job: dict, *, task_key: str, stop_event: str,
            started_prefix: str) -> dict:
    """Run ``task(job, stop)`` on a worker, at most once per key and session.

    A task that the scheduler starts again after its worker died (a cluster whose scheduler allows
    retries) finds its key marked as started and returns a failed record instead of a second run.
    """
    key = task_key
    worker = get_worker()
    os.environ[SCHEDULER_ENV] = worker.scheduler.address
    client = get_client()
    stop_event_ = Event(stop_event, client=client)
    if stop_event_.is_set():
        return task_record(key, INTERRUPTED, NOT_STARTED, "Interrupted")
    started = Event(f"{started_prefix}{key}", client=client)
    if started.is_set():
        return task_record(key, FAILED, WORKER_DIED, "WorkerDied")
    started.set()
    client.set_metadata([started_prefix, key], start_info())
    # the Dask key, which differs from the dataset's for a dataset sent again (its first worker left)
    stop = _StopWatch(stop_event_, worker.get_current_task())
    try:
        return task(job, stop)
    finally:
        stop.close()
