"""Where datasets run: an in-process local cluster, an existing Dask scheduler, or SLURM jobs.

Nothing here imports Dask at module level: importing the package or the CLI stays cheap.
"""

from __future__ import annotations

import logging
import os
import re
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from contextlib import ExitStack, contextmanager
from pathlib import Path

from cassia_helpers.dataset.annotate.llm.limits import LEASE_SETTINGS, SCHEDULER_ENV

WORKER_PRELOAD = "cassia_helpers.batch.dask.plugin"

_SECRET_NAME = re.compile(r"(KEY|TOKEN|SECRET|PASSWORD)", re.IGNORECASE)


class ClusterError(RuntimeError):
    """The cluster could not be built or reached (one line, for the user)."""


def dask_settings() -> dict:
    """Dask settings of every cluster this package starts (and of the driver's own client)."""
    return {
        # a dataset whose worker died is reported failed, never started again elsewhere
        "distributed.scheduler.allowed-failures": 0,
        # a worker holds one dataset at a time: the others stay queued on the scheduler (cancellable)
        "distributed.scheduler.worker-saturation": 1.0,
        **LEASE_SETTINGS,
        # the workers' environment is the driver's: no thread caps slipped in (nor into the driver)
        "distributed.nanny.pre-spawn-environ": {"MALLOC_TRIM_THRESHOLD_": 65536},
    }


def secret_values(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """Environment variables that look like credentials (name has KEY/TOKEN/SECRET/PASSWORD)."""
    env = os.environ if environ is None else environ
    return {name: value for name, value in env.items() if _SECRET_NAME.search(name) and len(value) >= 8}


@contextmanager
def open_client(*, workers: int, scheduler: str | None = None, cluster: str | None = None,
                cluster_options: Mapping | None = None, dashboard: bool = False,
                connect_timeout: float = 30.0, processes: bool = False, cluster_timeout: float = 300.0,
                name: str = "cassia", stop: Callable[[], bool] = lambda: False) -> Iterator:
    """A ``distributed.Client`` for a run, closed (with any cluster it started) on exit.

    Parameters
    ----------
    workers
        Datasets at once: the local cluster's worker processes, or the SLURM jobs (unless ``jobs``).
    scheduler
        Address of an existing scheduler (``tcp://host:8786``): its workers run the datasets.
    cluster
        ``None``/``"local"``: a local cluster on 127.0.0.1 started in this process (one thread per
        worker); ``"slurm"``: SLURM jobs built from ``cluster_options`` (see
        :func:`~cassia_helpers.batch.dask.slurm.load_cluster_options`), named ``{name}-{slot}``; the
        client's ``cassia_slurm`` is then their :class:`~cassia_helpers.batch.dask.slurm_jobs.SlurmJobs`.
    dashboard
        Serve the Dask dashboard (local cluster: on 127.0.0.1 only).
    connect_timeout
        Seconds to wait for the scheduler.
    processes
        Local cluster only: run each worker in a process of its own (behind a nanny), as remote
        workers are, instead of as a thread of this process. Each dataset runs in its own processes
        either way; worker processes only add seconds of start-up (each imports Dask and this
        package), so the default is threads.
    cluster_timeout
        Seconds to wait for the first worker (SLURM: for the first job to start), then
        :class:`ClusterError` naming the queue or the scheduler.
    stop
        Polled while waiting for the jobs: true (e.g. Ctrl-C) returns the client at once, perhaps without
        workers.
    """
    import dask
    from distributed import Client, LocalCluster

    from cassia_helpers.batch.dask.plugin import WorkerSetup

    if scheduler and cluster not in (None, "local"):
        raise ClusterError("give either a scheduler address or a cluster kind, not both")
    with ExitStack() as stack:
        stack.enter_context(dask.config.set(dask_settings()))
        # the datasets' own records report every failure; Dask's logs (e.g. an Event wait cut short when a
        # task ends) would only print tracebacks on the user's terminal
        for logger in ("distributed", "distributed.scheduler", "distributed.worker", "distributed.nanny",
                       "distributed.event", "distributed.utils", "distributed.core", "distributed.client"):
            logging.getLogger(logger).setLevel(logging.CRITICAL)
        slurm_jobs = None
        if scheduler:
            try:
                client = Client(scheduler, timeout=connect_timeout)
            except OSError as exc:
                raise ClusterError(f"cannot reach the Dask scheduler at {scheduler}: {exc}") from None
            stack.enter_context(client)
            _wait_for_a_worker(client, scheduler, cluster_timeout, stop)
        elif cluster == "slurm":
            from cassia_helpers.batch.dask.slurm import (
                cancel_leftovers,
                check_job_script,
                load_cluster_options,
                slurm_cluster,
            )
            from cassia_helpers.batch.dask.slurm_jobs import SlurmJobs

            options = load_cluster_options(overrides=cluster_options)
            jobs = max(1, int(options["jobs"] or workers))
            built = stack.enter_context(slurm_cluster(options, dashboard=dashboard, name=name))
            waits, left = check_job_script(built), cancel_leftovers(name, options["log_directory"])
            said = logging.getLogger("cassia_helpers")
            if waits:
                said.warning("%s%s", waits[0].upper(), waits[1:])
            if left:
                said.warning("Cancelled the SLURM job(s) an earlier session of this run left: %s", " ".join(left))
            client = stack.enter_context(Client(built, timeout=connect_timeout))
            built.scale(jobs=jobs)
            slurm_jobs = SlurmJobs(built, client, options, jobs)
            slurm_jobs.wait_for_workers(cluster_timeout, stop)
        elif cluster in (None, "local"):
            if not processes:
                # the workers set the scheduler's address in this process's environment (for the
                # kernels they start): it must not outlive the cluster
                stack.callback(_restore_environ, SCHEDULER_ENV, os.environ.get(SCHEDULER_ENV))
            built = stack.enter_context(LocalCluster(
                n_workers=max(1, int(workers)), threads_per_worker=1, processes=processes,
                # TCP even for threads: a dataset's kernel (another process) reaches the scheduler for
                # the run-wide LLM limits, which the in-process transport would not allow
                protocol="tcp://", host="127.0.0.1",
                dashboard_address="127.0.0.1:0", silence_logs=logging.CRITICAL,
                # worker processes must survive the terminal's Ctrl-C; threads leave signals to the driver
                preload=[WORKER_PRELOAD] if processes else [], scheduler_kwargs={"dashboard": dashboard}))
            client = Client(built, timeout=connect_timeout)
        else:
            raise ClusterError(f"unknown cluster kind {cluster!r} (known: local, slurm)")
        if slurm_jobs is None and not scheduler:
            stack.enter_context(client)
        client.cassia_slurm = slurm_jobs
        client.register_plugin(WorkerSetup())
        yield client


def _wait_for_a_worker(client, address: str, timeout: float, stop: Callable[[], bool]) -> None:
    """Return once the scheduler has a worker (or ``stop()``); :class:`ClusterError` after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while not client.nthreads() and not stop():
        if time.monotonic() > deadline:
            raise ClusterError(f"no Dask worker connected to the scheduler at {address} within {timeout:g} s "
                               "(--cluster-timeout)")
        time.sleep(0.5)


def _restore_environ(name: str, value: str | None) -> None:
    """Put ``os.environ[name]`` back to ``value`` (``None``: unset)."""
    if value is None:
        os.environ.pop(name, None)
    else:
        os.environ[name] = value


def dashboard_link(client) -> str:
    """The scheduler's dashboard address, or ``""`` when it serves none (not asked for, or no bokeh)."""
    cached = getattr(client, "_cassia_dashboard", None)
    if cached is not None:
        return cached
    try:
        # the scheduler imports its dashboard module only when it serves the dashboard
        serving = client.run_on_scheduler(lambda: "distributed.dashboard.scheduler" in __import__("sys").modules)
        link = client.dashboard_link if serving else ""
    except Exception:  # noqa: BLE001 - only a convenience
        link = ""
    client._cassia_dashboard = link or ""
    return client._cassia_dashboard


def _write_probe(folder: str, name: str) -> str:
    """On a worker: write the probe file; return an error line or ``""``."""
    try:
        path = Path(folder) / name
        with open(path, "w", encoding="utf-8") as handle:
            handle.write(name)
        return ""
    except OSError as exc:
        return f"{type(exc).__name__}: {exc.strerror or exc}"


def check_shared_storage(client, folder: str | Path, *, wait_s: float = 10.0) -> str | None:
    """Whether every worker writes into ``folder`` where this process sees it; a one-line problem or None.

    Each worker writes a probe file; this process must see them all (within ``wait_s``: network file
    systems may cache directory listings for a while). The probes are removed afterwards.
    """
    folder = Path(folder).resolve()
    folder.mkdir(parents=True, exist_ok=True)
    token = uuid.uuid4().hex[:12]
    try:
        names = {address: f".cassia_probe_{token}_{index}"
                 for index, address in enumerate(sorted(client.nthreads()))}  # asked now, not a cached view
    except Exception as exc:  # noqa: BLE001
        return f"cannot list the Dask workers: {exc}"
    if not names:
        return "no Dask worker is connected to the scheduler"
    try:
        futures = {address: client.submit(_write_probe, str(folder), name, workers=[address],
                                          allow_other_workers=False, pure=False)
                   for address, name in names.items()}
        errors = {address: future.result(timeout=60) for address, future in futures.items()}
    except Exception as exc:  # noqa: BLE001
        return f"the Dask workers could not write into {folder}: {type(exc).__name__}: {exc}"
    try:
        failed = {address: error for address, error in errors.items() if error}
        if failed:
            address, error = next(iter(failed.items()))
            return (f"{len(failed)} Dask worker(s) cannot write into {folder} ({address}: {error}); "
                    "it must be on storage every worker sees")
        deadline = time.monotonic() + wait_s
        while True:
            missing = [address for address, name in names.items() if not (folder / name).is_file()]
            if not missing or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        if missing:
            return (f"{folder} is not shared: files written there by {len(missing)} Dask worker(s) "
                    f"(e.g. {missing[0]}) are not visible here; put it on storage every worker sees")
        return None
    finally:
        for name in names.values():
            (folder / name).unlink(missing_ok=True)
