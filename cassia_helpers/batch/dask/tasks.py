"""Run one Dask task per dataset, report each as it ends, and stop them all on request.

The task function is the driver's: ``task(job, stop) -> dict`` runs one dataset (a small JSON-able
``job``, never a secret) and returns its status record; it polls ``stop()`` and stops its dataset
when it turns true. It never raises for a dataset failure.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from cassia_helpers.batch.dask.client import dashboard_link
from cassia_helpers.contract import FAILED, INTERRUPTED, NOT_STARTED, WORKER_DIED, task_record

# How long the scheduler may stay unreachable before the run counts it as lost.
SCHEDULER_LOST_S = 10.0

Task = Callable[[dict, Callable[[], bool]], dict]

log = logging.getLogger("cassia_helpers")


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


class DatasetExecutor:
    """Submit datasets to a ``distributed.Client``, one task each, keyed so none runs twice.

    Datasets wait here, not on the scheduler: one is submitted whenever a worker thread is free,
    so that each worker runs one dataset at a time and none waits behind another's long dataset.

    Parameters
    ----------
    client
        A client from :func:`~cassia_helpers.batch.dask.client.open_client`.
    stop_grace_s
        After a stop, how long running datasets get to stop and report before being given up.
    poll_s
        How often, at most, the wait loop looks for a free worker and reports progress (it wakes at once
        when a dataset ends or a stop is asked for).
    upkeep
        ``upkeep(queued)``, called while waiting: keeps the workers up (e.g. replaces ended SLURM jobs) and
        returns why the queued datasets cannot run any more, or ``None``.
    ready
        ``ready(longest_s, busy)``: the addresses of the workers that may take a new dataset, given the
        longest dataset of this run so far and the workers running one (e.g. SLURM jobs with enough walltime
        left). Each dataset then goes to one free such worker. ``None``: any worker with a free thread.
    """

    def __init__(self, client, *, stop_grace_s: float = 20.0, poll_s: float = 0.1,
                 upkeep: Callable[[int], str | None] | None = None,
                 ready: Callable[[float, set[str]], list[str]] | None = None) -> None:
        self.client = client
        self.address = client.scheduler.address
        self.upkeep = upkeep
        self.ready = ready
        self.longest_s = 0.0  # the longest dataset of this run so far, from its submission to its end
        self.lost = ""  # why the run lost its scheduler, if it did
        self.stop_grace_s = stop_grace_s
        self.poll_s = poll_s
        self.session = uuid.uuid4().hex[:12]
        self.stop_event_name = f"cassia-stop-{self.session}"
        self._stop_requested = threading.Event()
        # set when a task ends or a stop is asked for: the wait loop wakes at once instead of at its next poll
        self._wake = threading.Event()
        self._total = self._done = 0
        self._queue: list[tuple[str, dict]] = []
        self._running: dict = {}  # future -> key
        self._lock = threading.Lock()
        self._started_prefix = f"cassia-started-{self.session}-"

    def started(self, key: str) -> dict:
        """Where and when a dataset started (:func:`~cassia_helpers.batch.dask.plugin.start_info`), or ``{}``."""
        if self.lost:
            return {}
        try:
            info = self.client.get_metadata([self._started_prefix, key], None)
        except Exception:  # noqa: BLE001 - the scheduler is gone: nothing is known
            return {}
        return info if isinstance(info, dict) else {}

    def stop(self) -> None:
        """Ask the running ``run_jobs`` to stop everything. Safe to call from a signal handler."""
        self._stop_requested.set()
        self._wake.set()

    def progress(self) -> Progress:
        """Datasets done / running (submitted to a worker) / queued, and the dashboard link."""
        with self._lock:
            return Progress(total=self._total, done=self._done, running=len(self._running),
                            queued=len(self._queue), dashboard=dashboard_link(self.client))

    def _capacity(self) -> int:
        try:
            return sum(self.client.nthreads().values())
        except Exception:  # noqa: BLE001 - the scheduler is busy or briefly unreachable: wait
            return 0

    def run_jobs(self, task: Task, jobs: Mapping[str, dict], *, on_done: Callable[[str, dict], None],
                 on_progress: Callable[[Progress], None] | None = None, progress_every_s: float = 1.0) -> None:
        """Run ``task(job, stop)`` for every job; call ``on_done(key, record)`` once per key as each ends.

        ``jobs`` maps a key (``run/tissue/dataset``, used as the Dask key) to its job. A dataset whose
        task could not report gets a record made here: ``failed`` / ``WorkerDied`` when its worker
        died, ``interrupted`` when it was stopped before it started or did not stop in time; such
        records carry ``key``, ``status``, ``error`` and ``error_type`` only (nothing was written for
        that dataset: the caller writes its status file). Returns when every key was reported, or
        within about ``stop_grace_s`` of :meth:`stop`.
        """
        from distributed import Event, as_completed
        from distributed.client import FutureCancelledError

        from cassia_helpers.batch.dask.plugin import execute

        started_prefix = self._started_prefix
        with self._lock:
            self._queue = list(jobs.items())
            self._total, self._done, self._running = len(self._queue), 0, {}
        finished = as_completed()
        submitted: list[str] = []
        last_progress = last_capacity = 0.0
        capacity = 0
        ready: list[str] = []
        placed: dict = {}  # future -> (its worker's address or None, when it was submitted)
        unreachable_since = None

        def report(key: str, record: dict) -> None:
            with self._lock:
                self._done += 1
            on_done(key, record)

        vanished = []  # futures cancelled by no stop of ours: their scheduler went away, not their datasets
        requeued: set = set()  # futures withdrawn by us: their dataset went back to the queue
        submissions: dict[str, int] = {}

        def collect() -> None:
            for future in finished.next_batch(block=False):
                if future in requeued:
                    continue
                if future.status in ("cancelled", "lost") and not self._stop_requested.is_set():
                    vanished.append(future)
                    continue
                with self._lock:
                    key = self._running.pop(future, None)
                _address, since = placed.pop(future, (None, time.monotonic()))
                if future.status == "finished":
                    self.longest_s = max(self.longest_s, time.monotonic() - since)
                if key is not None:
                    report(key, self._outcome(key, future, FutureCancelledError))

        try:
            while self._queue or self._running:
                if self._stop_requested.is_set():
                    break
                if self.client.status != "running" or vanished:
                    unreachable_since = unreachable_since or time.monotonic()
                    if time.monotonic() - unreachable_since > SCHEDULER_LOST_S:
                        self.lost = f"the Dask scheduler ({self.address}) was lost"
                        break
                else:
                    unreachable_since = None
                if time.monotonic() - last_capacity > 1.0:
                    capacity, last_capacity = self._capacity(), time.monotonic()
                    # datasets handed to the scheduler wait for a worker too (one may have left meanwhile)
                    waiting = len(self._queue) + len(self._running)
                    reason = self.upkeep(waiting) if self.upkeep and unreachable_since is None else None
                    if reason:
                        with self._lock:
                            queued, self._queue = self._queue, []
                            stranded = list(self._running.items()) if not capacity else []
                            for future, _key in stranded:
                                self._running.pop(future, None)
                        if stranded:
                            self.client.cancel([future for future, _ in stranded], force=True)
                        for key in [key for key, _job in queued] + [key for _, key in stranded]:
                            report(key, task_record(key, FAILED, f"not started: {reason}", "NoWorker"))
                    if self.ready:
                        self._requeue_stranded(placed, requeued, jobs)
                    if self.ready and self._queue:
                        ready = self.ready(self.longest_s, {where for where, _ in placed.values() if where})
                while self._queue and len(self._running) < capacity and not self._stop_requested.is_set():
                    where = None
                    if self.ready:
                        busy = {address for address, _ in placed.values()}
                        where = next((address for address in ready if address not in busy), None)
                        if where is None:
                            break
                    with self._lock:
                        key, job = self._queue.pop(0)
                        # a dataset sent again (its worker left before it started) needs a fresh Dask key
                        submissions[key] = submissions.get(key, 0) + 1
                        dask_key = key if submissions[key] == 1 else f"{key}#{submissions[key]}"
                        future = self.client.submit(execute, task, job, task_key=key, key=dask_key, pure=False,
                                                    retries=0, stop_event=self.stop_event_name,
                                                    started_prefix=started_prefix,
                                                    **({"workers": [where], "allow_other_workers": False}
                                                       if where else {}))
                        self._running[future] = key
                        placed[future] = (where, time.monotonic())
                    submitted.append(key)
                    finished.add(future)
                    future.add_done_callback(lambda _: self._wake.set())
                collect()
                if on_progress and time.monotonic() - last_progress >= progress_every_s:
                    last_progress = time.monotonic()
                    on_progress(self.progress())
                self._wake.wait(self.poll_s)
                self._wake.clear()
            if self.lost:
                self._orphan(report)
            elif self._stop_requested.is_set():
                self._wind_down(collect, report)
        finally:
            leftover = list(self._running)
            if leftover and not self.lost:
                self.client.cancel(leftover, force=True)
            if on_progress:
                on_progress(self.progress())
            for key in [*submitted, self.stop_event_name]:
                name = key if key == self.stop_event_name else f"{started_prefix}{key}"
                try:
                    if not self.lost:
                        Event(name, client=self.client).clear()
                        self.client.set_metadata([started_prefix, key], None)
                except Exception:  # noqa: BLE001 - only tidying the scheduler
                    pass

    def _requeue_stranded(self, placed: dict, requeued: set, jobs: Mapping[str, dict]) -> None:
        """Datasets sent to a worker that left before they started (its SLURM job ended meanwhile) go back to
        the front of the queue: pinned to that worker, the scheduler would keep them waiting for it forever."""
        try:
            connected = set(self.client.scheduler_info()["workers"])
        except Exception:  # noqa: BLE001 - the scheduler is busy: look again at the next round
            return
        for future, (where, _since) in list(placed.items()):
            if where is None or where in connected or future.done():
                continue
            with self._lock:
                key = self._running.get(future)
            if key is None or self.started(key):  # it ran there: its worker's death is its outcome
                continue
            requeued.add(future)
            placed.pop(future, None)
            with self._lock:
                self._running.pop(future, None)
                self._queue.insert(0, (key, jobs[key]))
            self.client.cancel([future], force=True)
            log.info("%s: its worker left before it started; it goes to another", key)

    def _orphan(self, report) -> None:
        """The scheduler is lost: the queued datasets were not started; the running ones are reported as
        ``SchedulerLost`` (their runners may still finish and record their own status)."""
        with self._lock:
            queued, self._queue = self._queue, []
            running, self._running = list(self._running.values()), {}
        for key, _job in queued:
            report(key, task_record(key, INTERRUPTED, f"not started: {self.lost}", "SchedulerLost"))
        for key in running:
            report(key, task_record(key, INTERRUPTED, f"{self.lost} while it ran", "SchedulerLost"))

    def _wind_down(self, collect, report) -> None:
        """Stop: tell the running tasks, report the queued ones, give the running ones time to report."""
        from distributed import Event

        Event(self.stop_event_name, client=self.client).set()
        with self._lock:
            queued, self._queue = self._queue, []
        for key, _job in queued:
            report(key, task_record(key, INTERRUPTED, NOT_STARTED, "Interrupted"))
        deadline = time.monotonic() + self.stop_grace_s
        while self._running and time.monotonic() < deadline:
            collect()
            time.sleep(self.poll_s)
        with self._lock:
            late, self._running = list(self._running.values()), {}
        for key in late:
            report(key, task_record(key, INTERRUPTED, f"did not stop within {self.stop_grace_s:g} s of the "
                                "interruption", "Interrupted"))

    def _outcome(self, key: str, future, cancelled_error) -> dict:
        status = future.status
        if status == "finished":
            try:
                result = future.result(timeout=30)
            except Exception as exc:  # noqa: BLE001
                return task_record(key, FAILED, f"its result could not be fetched: {exc}", type(exc).__name__)
            return result if isinstance(result, dict) else task_record(
                key, FAILED, f"the task returned {type(result).__name__}, not a status record", "BadResult")
        if status == "cancelled":
            return task_record(key, INTERRUPTED, NOT_STARTED, "Interrupted")
        try:
            exc = future.exception(timeout=30)
        except cancelled_error:
            return task_record(key, INTERRUPTED, NOT_STARTED, "Interrupted")
        except Exception as other:  # noqa: BLE001
            exc = other
        if type(exc).__name__ == "KilledWorker":
            return task_record(key, FAILED, WORKER_DIED, "WorkerDied")
        text = " ".join(str(exc).split())[:300]
        return task_record(key, FAILED, f"{type(exc).__name__}: {text}", type(exc).__name__)
