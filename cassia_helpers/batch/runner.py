"""Run one dataset: the launcher the driver calls, and the worker process that executes the notebook.

:func:`run_dataset` is the launcher: it starts ``python -m cassia_helpers.batch.runner JOB`` in its own process
group (the notebook's kernel joins that group), waits for it while watching the stop request and the
dataset timeout, and returns the dataset's status record. It never raises for a dataset's failure.
The worker process runs papermill (:func:`~cassia_helpers.batch.execute.execute_dataset`), which writes
``{dataset}_status.json``.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from cassia_helpers.batch.dask.process import THREAD_VARIABLES, die_with_parent
from cassia_helpers.batch.execute import STOP_GRACE_S, execute_dataset
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

# Variables the kernel must not inherit: the endpoint travels as a notebook parameter, and plots must use
# the kernel's own inline backend so that the executed notebook shows them.
KERNEL_UNSET = ("OPENAI_BASE_URL", "MPLBACKEND")
# How long a dataset waits for an earlier runner of it (e.g. left by a killed driver, dying with it) to end.
RUNNER_WAIT_S = 90.0
RUNNER_LOCK = ".runner.lock"


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


def _stop_group(process: subprocess.Popen) -> None:
    """SIGTERM the worker's process group (worker and kernel), then SIGKILL what is left."""
    for sig, wait in ((signal.SIGTERM, STOP_GRACE_S), (signal.SIGKILL, None)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        try:
            process.wait(timeout=wait)
            # the kernel may outlive the worker by a moment: make sure the group is gone
            os.killpg(process.pid, signal.SIGKILL)
            return
        except subprocess.TimeoutExpired:
            continue
        except ProcessLookupError:
            return


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
    env = worker_environment(int(job.get("workers", 1)))
    env[PROGRESS_ENV] = str(paths.progress_jsonl)
    process = subprocess.Popen(
        [sys.executable, "-m", "cassia_helpers.batch.runner"],
        env=env,
        stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        start_new_session=True, preexec_fn=die_with_parent,
        pass_fds=(lock.fileno(),),  # the worker holds the runner lock too, until it has ended
    )
    # the job goes through a pipe, never the command line (a process listing shows arguments)
    process.stdin.write(json.dumps(job).encode())
    process.stdin.close()
    forced = reason = ""
    while process.poll() is None:
        if should_stop():
            forced, reason = INTERRUPTED, "interrupted by the user"
        elif timeout and time.monotonic() - started > timeout:
            forced, reason = FAILED, f"dataset timed out after {timeout:g} s (--dataset-timeout)"
        if forced:
            _stop_group(process)
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
    """The worker process: read the job from stdin, execute the dataset, exit 0 on success."""
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _stop_on_signal)
    job = json.loads(sys.stdin.read())
    try:
        record = execute_dataset(job["parameters"], kernel_name=job.get("kernel_name", "python3"),
                                 cell_timeout=job.get("cell_timeout", 0.0))
    finally:
        if os.getpgrp() == os.getpid():  # started by run_dataset: the group is this worker and its kernel
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            try:
                os.killpg(os.getpgrp(), signal.SIGTERM)  # the kernel, if papermill left it behind
            except OSError:
                pass
    return 0 if record["status"] == SUCCESS else 1


if __name__ == "__main__":
    sys.exit(main())
