"""SLURM jobs as the run's Dask workers: their options and the job script, checked by ``sbatch --test-only``
before any job is submitted (the jobs once submitted: :mod:`cassia_helpers.batch.dask.slurm_jobs`).

``dask_jobqueue`` is imported only when a SLURM cluster is built, and without its SIGINT handler: it
installs one on import (exiting at once), which would replace the driver's Ctrl-C handling.
"""

from __future__ import annotations

import json
import logging
import re
import shlex
import signal
import subprocess
import threading
from collections.abc import Mapping
from pathlib import Path

from cassia_helpers.batch.dask.client import WORKER_PRELOAD, ClusterError, secret_values
from cassia_helpers.batch.dask.plugin import SLURM_LOG_ENV
from cassia_helpers.batch.dask.process import THREADS_ENV
from cassia_helpers.settings import BY_NAME, SETTINGS, SLURM_DEFAULTS, UsageError

log = logging.getLogger("cassia_helpers")
# Cluster-file key -> setting: every ``--slurm-X`` flag is the file's ``X``; the scheduler's address too.
FILE_KEYS: dict[str, str] = {
    **{s.name.removeprefix("slurm_"): s.name for s in SETTINGS if s.name.startswith("slurm_")},
    "scheduler_host": "scheduler_host",
}


def load_cluster_options(path: str | Path | None = None, overrides: Mapping | None = None) -> dict:
    """The ``--cluster slurm`` options by file key: a YAML/JSON file's, then ``overrides`` (the flags; a
    value equal to its setting's default is unset), then the defaults.

    Raises
    ------
    ClusterError
        An unknown option or a value of the wrong type.
    """
    options: dict = {}
    if path:
        try:
            text = Path(path).read_text(encoding="utf-8")
        except OSError as exc:
            raise ClusterError(f"{path}: cannot read the cluster options ({exc.strerror})") from None
        if str(path).endswith(".json"):
            loaded = json.loads(text)
        else:
            import yaml

            loaded = yaml.safe_load(text) or {}
        if not isinstance(loaded, dict):
            raise ClusterError(f"{path}: expected a mapping of cluster options")
        options.update(loaded)
    unknown = sorted((set(options) | set(overrides or {})) - set(FILE_KEYS))
    if unknown:
        raise ClusterError(f"unknown cluster option(s): {', '.join(unknown)} (known: {', '.join(FILE_KEYS)})")
    for key, value in (overrides or {}).items():
        if value is not None and value != BY_NAME[FILE_KEYS[key]].default:
            options[key] = value
    result = {}
    for key, name in FILE_KEYS.items():
        setting = BY_NAME[name]
        value = options.get(key, setting.default)
        if setting.repeat and isinstance(value, str):
            value = [value]
        try:
            value = setting.check(value)
        except UsageError as exc:
            raise ClusterError(f"cluster option {key}: {exc}") from None
        result[key] = SLURM_DEFAULTS.get(key, value) if value == setting.default else value
    return result


def cluster_options(settings, run_dir: Path | None = None) -> dict:
    """The run's ``--cluster slurm`` options: ``--cluster-config``'s, then the flags; logs in the run folder."""
    options = load_cluster_options(settings.cluster_config or None,
                                   {key: getattr(settings, name) for key, name in FILE_KEYS.items()})
    if not options["log_directory"] and run_dir is not None:
        from cassia_helpers.contract import SLURM_LOGS

        options["log_directory"] = str((run_dir / SLURM_LOGS).resolve())
    elif options["log_directory"]:  # recorded in each dataset's status: a path that means the same anywhere
        options["log_directory"] = str(Path(options["log_directory"]).expanduser().resolve())
    return options


def _slurm_classes():
    """``(SLURMCluster, SLURMJob)``, imported with this process's signal handlers kept."""
    saved = {}
    if threading.current_thread() is threading.main_thread():
        saved = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    try:
        from dask_jobqueue import SLURMCluster
        from dask_jobqueue.slurm import SLURMJob
    except ImportError:
        raise ClusterError("--cluster slurm needs dask-jobqueue: pip install 'cassia-batch[slurm]'") from None
    finally:
        for sig, handler in saved.items():
            if handler is not None:
                signal.signal(sig, handler)
    return SLURMCluster, SLURMJob


def _default_host() -> str:
    """This machine's address on its default route: the one compute nodes reach, not every interface."""
    from distributed.utils import get_ip

    try:
        return get_ip()
    except OSError:
        return "127.0.0.1"


def slurm_cluster(options: Mapping, *, dashboard: bool = False, name: str = "cassia"):
    """A ``dask_jobqueue.SLURMCluster`` running one dataset per job at a time, not yet scaled.

    Each job is one worker with one thread holding ``cores`` CPUs and ``memory`` for the dataset's kernel;
    its SLURM name is ``{name}-{slot}``. Secrets reach the jobs through the environment sbatch exports
    from the driver (its default), never through the job script: a script that would contain the value
    of a credential-like variable is refused.
    """
    cluster_cls, job_cls = _slurm_classes()
    opts = load_cluster_options(overrides=options)

    class SlotJob(job_cls):
        """A job named after the run and its slot (the worker's number in the cluster)."""

        def __init__(self, *args, name=None, job_name=None, **kwargs):
            super().__init__(*args, name=name, job_name=f"{job_name}-{slot_number(name)}", **kwargs)

    cores = max(1, int(opts["cores"]))
    # the job's worker gives its datasets the job's cores (Dask's nanny would cap BLAS/OpenMP threads at 1)
    prologue = [f"export {THREADS_ENV}={cores}"]
    directives = list(opts["job_extra"])
    if opts["log_directory"]:
        logs = opts["log_directory"]
        if '"' in logs:
            raise ClusterError(f"{logs}: a SLURM log folder cannot have a double quote in its path "
                               "(give --slurm-log-directory)")
        Path(logs).mkdir(parents=True, exist_ok=True)
        prologue.append(f'export {SLURM_LOG_ENV}={shlex.quote(logs)}/"$SLURM_JOB_NAME-$SLURM_JOB_ID.err"')
        # quoted, unlike dask-jobqueue's own -e/-o lines: a run folder may have spaces in its path
        directives += [f'-e "{logs}/%x-%j.err"', f'-o "{logs}/%x-%j.out"']
    host = opts["scheduler_host"] or ("" if opts["interface"] else _default_host())
    kwargs = {
        "queue": opts["queue"] or None, "account": opts["account"] or None, "walltime": opts["walltime"],
        "cores": 1, "processes": 1, "job_cpu": cores, "memory": opts["memory"],
        "python": opts["python"] or None, "job_script_prologue": [*prologue, *opts["prologue"]],
        "job_extra_directives": directives, "interface": opts["interface"] or None,
        "local_directory": opts["local_directory"] or None,
        "worker_extra_args": ["--preload", WORKER_PRELOAD], "job_name": name, "job_cls": SlotJob,
        # no dashboard: the scheduler's HTTP server (health, metrics) on a free local port, not 8787
        "scheduler_options": {"dashboard": dashboard, **({"host": host} if host else {}),
                              **({} if dashboard else {"dashboard_address": "127.0.0.1:0"})},
    }
    cluster = cluster_cls(**{k: v for k, v in kwargs.items() if v is not None})
    script = cluster.job_script()
    leaked = [var for var, value in secret_values().items() if value in script]
    if leaked:
        cluster.close()
        raise ClusterError(f"the SLURM job script would contain the value of {', '.join(leaked)}: "
                           "remove it from the cluster options (jobs get secrets from the environment)")
    return cluster


def check_job_script(cluster) -> str:
    """:class:`ClusterError` when ``sbatch --test-only`` refuses the cluster's job script (an unknown partition,
    a walltime it cannot read, a directive it cannot parse), when there is no ``sbatch`` to submit jobs with, or
    when the SLURM controller cannot be reached: said at once, before any job is submitted, rather than by a
    queue that never starts one. Nothing is said when sbatch does not answer in time (a busy controller).
    Returns ``""``, or, when every node of the partition is out of service (drained for maintenance: the jobs
    would wait in the queue), a sentence saying so."""
    try:
        out = subprocess.run(["sbatch", "--test-only"], input=cluster.job_script(), capture_output=True,
                             text=True, timeout=30)
    except FileNotFoundError:
        raise ClusterError("sbatch is not on PATH: run on a node with SLURM's commands (a login node), or load "
                           "them first (e.g. module load slurm)") from None
    except (OSError, subprocess.TimeoutExpired):
        return ""
    if out.returncode != 0:
        errors = [line.removeprefix("sbatch: error: ").strip() for line in out.stderr.splitlines() if line.strip()]
        said = "; ".join(errors[:2]) or str(out.returncode)
        if "unable to contact slurm controller" in said.lower():
            raise ClusterError(f"the SLURM controller does not answer ({said}): try again once it is back "
                               "(sinfo tells)")
        if "node configuration is not available" in said.lower():  # also what a drained partition answers
            partition, states = _out_of_service(cluster.job_script())
            if states:
                return (f"every node of SLURM partition {partition} is {states} (sinfo): the jobs wait in the queue "
                        "until the nodes return (--cluster-timeout bounds the wait for the first)")
        raise ClusterError(f"sbatch refuses the job script: {said} (check --slurm-queue, --slurm-walltime, "
                           "--slurm-memory, --slurm-account, --slurm-job-extra)")
    return ""


def cancel_leftovers(name: str, log_directory: str = "") -> list[str]:
    """Cancel this user's SLURM jobs named ``{name}-{slot}`` (this run's) that are still queued or running, and
    whose log is in ``log_directory`` (when given: two runs of the same name in other folders keep theirs): a
    driver killed with ``kill -9`` could not cancel them, and a queued one would start later, wait for its dead
    scheduler and fail. Only one driver works on a run at a time (its lock), so they are an earlier session's.
    Returns their job ids (none when squeue does not answer)."""
    import getpass

    try:
        out = subprocess.run(["squeue", "-h", "-u", getpass.getuser(), "-O", "JobID:|,Name:|,STDOUT:|"],
                             capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return []
    pattern = re.compile(re.escape(name) + r"-\d+")
    rows = [line.split("|")[:3] for line in out.stdout.splitlines() if line.count("|") >= 3]
    jobs = [job for job, job_name, log in rows if out.returncode == 0 and pattern.fullmatch(job_name.strip())
            and (not log_directory or log.startswith(log_directory.rstrip("/") + "/"))]
    if jobs:
        subprocess.run(["scancel", *jobs], capture_output=True, timeout=30, check=False)
    return jobs


def _out_of_service(job_script: str) -> tuple[str, str]:
    """The job script's partition (or the default one) and, when none of its nodes can take a job now (all
    drained, down, in maintenance), their states as sinfo names them; ``""`` otherwise or when sinfo cannot tell."""
    named = re.search(r"^#SBATCH\s+(?:-p\s*|--partition[= ])\s*(\S+)", job_script, re.MULTILINE)
    try:
        out = subprocess.run(["sinfo", "-h", "-o", "%P %t"], capture_output=True, text=True, timeout=15).stdout
    except (OSError, subprocess.TimeoutExpired):
        return "", ""
    rows = [line.split() for line in out.splitlines() if len(line.split()) == 2]
    wanted = named.group(1) if named else next((p.rstrip("*") for p, _ in rows if p.endswith("*")), "")
    states = {state.rstrip("*~#!%$@^-") for p, state in rows if p.rstrip("*") == wanted}
    usable = {"idle", "mix", "alloc", "comp", "plnd"}  # may run a job now or soon
    return wanted, ", ".join(sorted(states)) if states and not states & usable else ""


def slot_number(name) -> int | str:
    """A worker's slot: the number ending its name (``SLURMCluster-3`` -> 3)."""
    tail = str(name).rsplit("-", 1)[-1]
    return int(tail) if tail.isdigit() else tail
