"""Run one Dask task per dataset, report each as it ends, and stop them all on request.

The task function is the driver's: ``task(job, stop) -> dict`` runs one dataset (a small JSON-able
``job``, never a secret) and returns its status record; it polls ``stop()`` and stops its dataset
when it turns true. It never raises for a dataset failure.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from .cluster import dashboard_link

INTERRUPTED, FAILED = "interrupted", "failed"

Task = Callable[[dict, Callable[[], bool]], dict]


@dataclass
class Progress:
    """Datasets of the current ``run_jobs`` call across the cluster."""

    total: int = 0
    done: int = 0
    running: int = 0
    queued: int = 0
    dashboard: str = ""

    def __str__(self) -> str:
        text = f"{self.done}/{self.total} done, {self.running} running, {self.queued} queued"
        return f"{text} (dashboard: {self.dashboard})" if self.dashboard else text


def _record(key: str, status: str, error: str, error_type: str) -> dict:
    return {"key": key, "status": status, "error": error, "error_type": error_type}


class DatasetExecutor:
    """Submit datasets to a ``distributed.Client``, one task each, keyed so none runs twice.

    Parameters
    ----------
    client
        A client from :func:`~cassia_helpers.distributed.cluster.open_client`.
    stop_grace_s
        After a stop, how long running datasets get to stop and report before being given up.
    poll_s
        How often the wait loop looks for a stop request.
    """

    def __init__(self, client, *, stop_grace_s: float = 20.0, poll_s: float = 0.1) -> None:
        self.client = client
        self.stop_grace_s = stop_grace_s
        self.poll_s = poll_s
        self.session = uuid.uuid4().hex[:12]
        self.stop_event_name = f"cassia-stop-{self.session}"
        self._stop_requested = threading.Event()
        self._futures: dict = {}
        self._reported: set = set()
        self._lock = threading.Lock()

    def stop(self) -> None:
        """Ask the running ``run_jobs`` to stop everything. Safe to call from a signal handler."""
        self._stop_requested.set()

    @property
    def stopped(self) -> bool:
        return self._stop_requested.is_set()

    def progress(self) -> Progress:
        """Datasets done / running (being executed by a worker) / queued, and the dashboard link."""
        with self._lock:
            futures = dict(self._futures)
            done = len(self._reported)
        try:
            processing = {key for keys in self.client.processing().values() for key in keys}
        except Exception:  # noqa: BLE001 - progress is best effort
            processing = set()
        running = sum(1 for key in futures if key in processing and key not in self._reported)
        return Progress(total=len(futures), done=done, running=running,
                        queued=max(0, len(futures) - done - running), dashboard=dashboard_link(self.client))

    def run_jobs(self, task: Task, jobs: Mapping[str, dict], *, on_done: Callable[[str, dict], None],
                 on_progress: Callable[[Progress], None] | None = None, progress_every_s: float = 1.0) -> None:
        """Run ``task(job, stop)`` for every job; call ``on_done(key, record)`` once per key as each ends.

        ``jobs`` maps a key (``run/tissue/dataset``, used as the Dask key) to its job. A dataset whose
        task could not report gets a record made here: ``failed`` / ``WorkerDied`` when its worker
        died, ``interrupted`` when it was stopped before it started or did not stop in time; such
        records carry ``key``, ``status``, ``error`` and ``error_type`` only (nothing was written for
        that dataset: the caller writes its status file).
        """
        from distributed import Event, as_completed
        from distributed.client import FutureCancelledError

        from .workers import execute

        stop_event = Event(self.stop_event_name, client=self.client)
        started_prefix = f"cassia-started-{self.session}-"
        with self._lock:
            self._reported = set()
            self._futures = {
                key: self.client.submit(execute, task, job, key=key, pure=False, retries=0,
                                        stop_event=self.stop_event_name, started_prefix=started_prefix)
                for key, job in jobs.items()
            }
        futures = dict(self._futures)
        by_future = {future: key for key, future in futures.items()}
        pending = as_completed(list(futures.values()))
        last_progress = 0.0

        def report(future, record: dict | None = None) -> None:
            key = by_future[future]
            with self._lock:
                if key in self._reported:
                    return
                self._reported.add(key)
            on_done(key, record or self._outcome(key, future, FutureCancelledError))

        try:
            while not pending.is_empty():
                for future in pending.next_batch(block=False):
                    report(future)
                if self._stop_requested.is_set():
                    break
                if on_progress and time.monotonic() - last_progress >= progress_every_s:
                    last_progress = time.monotonic()
                    on_progress(self.progress())
                time.sleep(self.poll_s)
            if self._stop_requested.is_set():
                self._wind_down(stop_event, futures, pending, report)
        finally:
            if on_progress:
                on_progress(self.progress())
            self.client.cancel([f for f in futures.values() if not f.done()], force=True)
            for key in futures:
                try:
                    Event(f"{started_prefix}{key}", client=self.client).clear()
                except Exception:  # noqa: BLE001 - only tidying the scheduler
                    pass

    def _wind_down(self, stop_event, futures: dict, pending, report) -> None:
        """Stop: tell running tasks, cancel queued ones, wait a little for the running ones to report."""
        stop_event.set()
        try:
            processing = {key for keys in self.client.processing().values() for key in keys}
        except Exception:  # noqa: BLE001
            processing = set(futures)
        queued = [f for key, f in futures.items() if key not in processing and not f.done()]
        # a queued task that starts before it is cancelled sees the stop Event and does nothing
        self.client.cancel(queued)
        deadline = time.monotonic() + self.stop_grace_s
        while not pending.is_empty() and time.monotonic() < deadline:
            for future in pending.next_batch(block=False):
                report(future)
            time.sleep(self.poll_s)
        late = _record("", INTERRUPTED, f"did not stop within {self.stop_grace_s:g} s of the interruption",
                       "Interrupted")
        for key, future in futures.items():
            report(future, {**late, "key": key})

    def _outcome(self, key: str, future, cancelled_error) -> dict:
        status = future.status
        if status == "finished":
            try:
                result = future.result(timeout=30)
            except Exception as exc:  # noqa: BLE001
                return _record(key, FAILED, f"its result could not be fetched: {exc}", type(exc).__name__)
            return result if isinstance(result, dict) else _record(
                key, FAILED, f"the task returned {type(result).__name__}, not a status record", "BadResult")
        if status == "cancelled":
            return _record(key, INTERRUPTED, "not started: the run was interrupted", "Interrupted")
        try:
            exc = future.exception(timeout=30)
        except cancelled_error:
            return _record(key, INTERRUPTED, "not started: the run was interrupted", "Interrupted")
        except Exception as other:  # noqa: BLE001
            exc = other
        if type(exc).__name__ == "KilledWorker":
            return _record(key, FAILED, "the Dask worker running this dataset died", "WorkerDied")
        text = " ".join(str(exc).split())[:300]
        return _record(key, FAILED, f"{type(exc).__name__}: {text}", type(exc).__name__)
