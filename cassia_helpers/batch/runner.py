"""Run one dataset: the launcher the driver calls, and the worker process that executes the notebook.

:func:`run_dataset` is the launcher: it hands the job to a worker process (``python -m
cassia_helpers.batch.runner``, in its own process group; :mod:`cassia_helpers.batch.spares`), waits for it
while watching the stop request and the dataset timeout, and returns the dataset's status record. It never
raises for a dataset's failure. The worker process runs papermill
(:func:`~cassia_helpers.batch.execute.execute_dataset`), which writes ``{dataset}_status.json``.

A worker starts its dataset's kernel (which imports the analysis modules and warms the pipeline up) and
imports papermill *before* it is given its job, so it can be started ahead of its dataset: on the default
local cluster the driver starts the first datasets' workers while it starts Dask (:func:`start_ahead`), and
each dataset starts the next one's. Each worker and kernel serve one dataset only, so nothing of a dataset
(its memory, a crash) reaches the next.
"""

from __future__ import annotations

import os
import signal
import socket
import sys
import time
from collections.abc import Callable
from pathlib import Path

from cassia_helpers.batch.dask.process import THREAD_VARIABLES
from cassia_helpers.batch.spares import SPARES, Worker, WorkerSpec, receive, stop_group
from cassia_helpers.contract import (
    FAILED,
    INTERRUPTED,
    PROGRESS_ENV,
    SUCCESS,
    DatasetPaths,
    now_iso,
    read_status,
    write_status,
)
from cassia_helpers.dataset.annotate.llm.limits import SCHEDULER_ENV

# Variables the kernel must not inherit: the endpoint travels as a notebook parameter, and plots must use
# the kernel's own inline backend so that the executed notebook shows them.
KERNEL_UNSET = ("OPENAI_BASE_URL", "MPLBACKEND")
# How long a dataset waits for an earlier runner of it (e.g. left by a killed driver, dying with it) to end.
RUNNER_WAIT_S = 90.0
RUNNER_LOCK = ".runner.lock"
# Set in the kernel when its dataset comes, not in the worker's environment (unknown when a worker is started
# ahead): the dataset's progress file, and the scheduler of the run-wide LLM limits (known once Dask is up).
LATE_VARIABLES = (PROGRESS_ENV, SCHEDULER_ENV)


def worker_environment(workers: int, environ: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of a dataset's worker: the driver's, with BLAS/OpenMP/numba threads shared out.

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
    for name in KERNEL_UNSET:
        env.pop(name, None)
    return env


def worker_spec(job: dict) -> WorkerSpec:
    """What the job's worker is started with (a worker started ahead serves jobs of an equal spec)."""
    env = worker_environment(int(job.get("workers", 1)))
    for name in LATE_VARIABLES:
        env.pop(name, None)
    return WorkerSpec.of(env, job.get("kernel_name", "python3"), str(Path(job["parameters"]["run_dir"])))


def start_ahead(jobs: list[dict], workers: int) -> None:
    """Start the workers of the first ``workers`` of ``jobs`` now, and mark each job after which its Dask worker
    (one of ``workers`` threads of this process, taking ``jobs`` in order) still has a dataset to run: that
    dataset starts the next one's worker (``prepare_next``). Stopped by :func:`stop_ahead`."""
    for index, job in enumerate(jobs):
        job["prepare_next"] = len(jobs) - 1 - index >= workers
    for job in jobs[:workers]:
        SPARES.prepare(worker_spec(job))


def stop_ahead() -> None:
    """Stop the workers started ahead that no dataset took."""
    SPARES.close()


def run_dataset(job: dict, should_stop: Callable[[], bool] = lambda: False) -> dict:
    """Run one dataset's notebook in a worker process; return its status record.

    ``job`` holds ``parameters`` (the notebook's), ``kernel_name``, ``cell_timeout``, ``dataset_timeout``
    and ``workers`` (to share the cores). The dataset is stopped and marked ``interrupted`` as soon as
    ``should_stop()`` is true, and ``failed`` when it runs past ``dataset_timeout`` seconds.
    """
    parameters = job["parameters"]
    paths = DatasetPaths(Path(parameters["run_dir"]), parameters["tissue"], parameters["dataset"])
    paths.folder.mkdir(parents=True, exist_ok=True)
    started, started_at = time.monotonic(), now_iso()
    with open(paths.folder / RUNNER_LOCK, "a+") as lock:
        if not _take(lock, should_stop):
            return write_status(paths, FAILED, error_type="RunnerBusy", started_at=started_at,
                                error=f"another runner of this dataset did not end within {RUNNER_WAIT_S:g} s")
        return _run_locked(job, paths, lock, should_stop, started, started_at)


def _take(lock, should_stop: Callable[[], bool]) -> bool:
    """Hold the dataset's runner lock (never two runners in one folder), waiting for an earlier one to end."""
    import fcntl

    deadline = time.monotonic() + RUNNER_WAIT_S
    while True:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except OSError:
            if time.monotonic() > deadline or should_stop():
                return False
            time.sleep(0.5)


def _run_locked(job: dict, paths: DatasetPaths, lock, should_stop: Callable[[], bool], started: float,
                started_at: str) -> dict:
    paths.status_json.unlink(missing_ok=True)  # whatever status is found afterwards was written by this worker
    timeout = float(job.get("dataset_timeout") or 0)
    paths.progress_jsonl.unlink(missing_ok=True)
    spec = worker_spec(job)
    environ = {PROGRESS_ENV: str(paths.progress_jsonl), SCHEDULER_ENV: os.environ.get(SCHEDULER_ENV)}
    # the job goes through a socket, never the command line (a process listing shows arguments); the worker
    # holds the runner lock too, until it has ended
    worker = SPARES.take(spec)
    if worker is None or not worker.hand(job, environ, lock.fileno()):
        worker = Worker.start(spec)
        worker.hand(job, environ, lock.fileno())
    if job.get("prepare_next"):
        SPARES.prepare(spec)
    process = worker.process
    forced = reason = ""
    while process.poll() is None:
        if should_stop():
            forced, reason = INTERRUPTED, "interrupted by the user"
        elif timeout and time.monotonic() - started > timeout:
            forced, reason = FAILED, f"dataset timed out after {timeout:g} s (--dataset-timeout)"
        if forced:
            stop_group(process)
            break
        time.sleep(0.2)
    duration = time.monotonic() - started
    recorded = read_status(paths)
    if recorded is not None and not (forced and recorded["status"] != SUCCESS):
        return recorded  # the worker finished its dataset (possibly just before it was stopped)
    if forced:
        return write_status(paths, forced, error=reason, error_type=forced.capitalize(), duration=duration,
                            started_at=started_at)
    code = process.returncode
    how = f"was killed by signal {-code}" if code is not None and code < 0 else f"exited with code {code}"
    hint = " (often out of memory)" if code == -signal.SIGKILL else ""
    return write_status(paths, FAILED, error=f"dataset worker {how}{hint} before recording a status",
                        error_type="WorkerDied", duration=duration, started_at=started_at)


def _stop_on_signal(signum, frame) -> None:
    # the driver (or its death) stops this worker: take the kernel down with it
    raise KeyboardInterrupt


def main() -> int:
    """The worker process: start the dataset's kernel, wait for the job on stdin (a socket), execute the
    dataset; exit 0 on success."""
    from cassia_helpers.batch.execute import dataset_kernel, execute_dataset

    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _stop_on_signal)
    # the kernel's name, where it starts (the run folder), and whether this worker was started ahead
    arguments = sys.argv[1:]
    kernel_name = arguments[0] if arguments else "python3"
    kernel_cwd = arguments[1] if len(arguments) > 1 else os.getcwd()
    ahead = arguments[2:3] == ["ahead"]
    kernel = record = None
    try:
        try:
            kernel = dataset_kernel(kernel_name, kernel_cwd, ahead=ahead)
        except Exception:  # noqa: BLE001 - execute_dataset starts one itself, and records why it cannot
            kernel = None
        import papermill  # noqa: F401 - while the kernel starts

        received = receive(socket.socket(fileno=sys.stdin.fileno()))
        if received is None:  # no dataset for this worker: the run ended
            return 0
        job, environ, _lock = received  # the lock stays open until this process ends
        given, kernel = kernel, None  # execute_dataset kills it
        record = execute_dataset(job["parameters"], kernel_name=job.get("kernel_name", kernel_name),
                                 cell_timeout=job.get("cell_timeout", 0.0), kernel=given, environ=environ)
    except KeyboardInterrupt:  # stopped before its dataset came
        return 130
    finally:
        if kernel is not None:
            kernel.close()
        if os.getpgrp() == os.getpid():  # started by run_dataset: the group is this worker and its kernel
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            try:
                os.killpg(os.getpgrp(), signal.SIGTERM)  # the kernel, if papermill left it behind
            except OSError:
                pass
    return 0 if record["status"] == SUCCESS else 1


if __name__ == "__main__":
    sys.exit(main())
