"""The run's SLURM jobs once submitted: waiting for the first to start, replacing the ones that end early,
retiring the ones whose walltime is nearly over, and why a job ended."""

from __future__ import annotations

import logging
import subprocess
import time
from collections.abc import Callable, Mapping

from cassia_helpers.batch.dask.client import ClusterError
from cassia_helpers.batch.dask.slurm import slot_number

log = logging.getLogger("cassia_helpers")
# A job takes a new dataset only with at least this many times the run's longest dataset left of its walltime.
TIME_MARGIN = 1.25
_ENDED = {"COMPLETED", "FAILED", "TIMEOUT", "CANCELLED", "OUT_OF_MEMORY", "NODE_FAIL", "PREEMPTED",
          "BOOT_FAIL", "DEADLINE"}


def _run(command: list[str]) -> str | None:
    """The command's output, or None when it could not run or failed (a busy or restarting controller)."""
    try:
        out = subprocess.run(command, capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout if out.returncode == 0 else None


def slurm_seconds(text: str) -> float | None:
    """SLURM's time (``M``, ``M:S``, ``H:M:S``, ``D-H``, ``D-H:M``, ``D-H:M:S``) in seconds; None when it is
    not a time (``UNLIMITED``, ``NOT_SET``, empty)."""
    days, _, clock = str(text).strip().rpartition("-")
    parts = clock.split(":")
    if not 1 <= len(parts) <= 3 or not all(part.isdigit() for part in parts) or (days and not days.isdigit()):
        return None
    units = (3600, 60, 1)[:len(parts)] if days else {1: (60,), 2: (60, 1), 3: (3600, 60, 1)}[len(parts)]
    return float(sum(int(part) * unit for part, unit in zip(parts, units, strict=True)) + int(days or 0) * 86400)


def queue_states(job_ids: list[str]) -> dict[str, str]:
    """``squeue``'s state of each job still in the queue (PENDING, RUNNING, ...); ended jobs are absent, and
    so is every job while ``squeue`` does not answer."""
    return {job_id: state for job_id, (state, _left) in (_squeue(job_ids) or {}).items()}


def _squeue(job_ids: list[str]) -> dict[str, tuple[str, float | None]] | None:
    """Each queued job's state and the seconds left of its walltime (None: not running, or no limit); None
    when ``squeue`` failed: a controller that does not answer says nothing of the jobs, they did not end."""
    if not job_ids:
        return {}
    out = _run(["squeue", "-h", "-j", ",".join(job_ids), "-o", "%i %T %L"])
    if out is None:
        return None
    found = {}
    for line in out.splitlines():
        fields = line.split()
        if len(fields) >= 2:
            left = slurm_seconds(fields[2]) if len(fields) > 2 and fields[1] == "RUNNING" else None
            found[fields[0]] = (fields[1], left)
    return found


def takes_a_dataset(left_s: float | None, needed_s: float, walltime_s: float | None) -> bool:
    """Whether a job with ``left_s`` seconds of walltime left (None: unknown yet, or no limit) takes a new
    dataset that may need ``needed_s`` seconds, when a fresh job gets ``walltime_s``.

    A job too short for the dataset takes none: it would be killed mid-dataset. Unless a fresh job would be
    too short as well: then every job takes datasets (a new job gains nothing).
    """
    if left_s is None or not needed_s or (walltime_s is not None and walltime_s < needed_s):
        return True
    return left_s >= needed_s


def job_end(job_id: str, log_path: str = "", *, wait_s: float = 30.0) -> tuple[str, str]:
    """Why a SLURM job ended, as ``(error, error_type)``: from its state (``scontrol``) and its log file.

    Waits up to ``wait_s`` for the job to leave the running states (its worker is seen dead first).
    """
    deadline = time.monotonic() + wait_s
    state, text = "", ""
    while True:
        fields = dict(item.split("=", 1) for item in (_run(["scontrol", "-o", "show", "job", job_id]) or "").split()
                      if "=" in item)
        state = fields.get("JobState", "")
        log_path = log_path or fields.get("StdErr", "")
        try:
            with open(log_path, "rb") as handle:
                handle.seek(0, 2)
                handle.seek(max(0, handle.tell() - 20_000))
                text = handle.read().decode("utf-8", "replace")
        except OSError:
            text = ""
        if "exceeded memory limit" in text.lower() or state in _ENDED or time.monotonic() > deadline:
            break
        time.sleep(1.0)
    where = f"; its log: {log_path}" if log_path else ""
    if "exceeded memory limit" in text.lower() or state == "OUT_OF_MEMORY":
        return (f"SLURM job {job_id} was killed for exceeding its memory limit (raise --slurm-memory){where}",
                "JobOutOfMemory")
    if state == "TIMEOUT" or "DUE TO TIME LIMIT" in text:
        return f"SLURM job {job_id} reached its walltime (raise --slurm-walltime){where}", "JobTimeLimit"
    if state == "CANCELLED" or "CANCELLED AT" in text:
        return f"SLURM job {job_id} was cancelled (scancel){where}", "JobCancelled"
    return f"SLURM job {job_id} ended ({state or 'state unknown'}) while running this dataset{where}", "JobDied"


class SlurmJobs:
    """The run's SLURM jobs: wait for the first to start, and replace jobs that end while datasets wait.

    Parameters
    ----------
    cluster, client
        The ``SLURMCluster`` (already scaled to ``jobs``) and the run's client.
    options
        The cluster options (:func:`load_cluster_options`).
    jobs
        Jobs the run keeps while datasets are queued.
    """

    def __init__(self, cluster, client, options: Mapping, jobs: int) -> None:
        self.cluster, self.client, self.jobs = cluster, client, jobs
        self.queue = options["queue"] or "the default partition"
        limit = int(options["replacements"])
        self.replacements_left = 3 * jobs if limit < 0 else limit
        self.replaced = 0
        self._seen: dict = {}  # worker-spec name -> SLURM job id
        self.walltime_s = slurm_seconds(options["walltime"])
        self.min_time_left = float(options["min_time_left"] or 0)
        self._ends: dict[str, float] = {}  # job id -> when its walltime ends (time.monotonic())
        self.retired: set = set()  # worker-spec names of the jobs cancelled for their short walltime
        self._last_upkeep = 0.0
        self._no_worker_since: float | None = None

    def job_ids(self) -> list[str]:
        ids = []
        for name, job in list(self.cluster.workers.items()):
            job_id = getattr(job, "job_id", None)
            if job_id:
                self._seen[name] = str(job_id)
                ids.append(str(job_id))
        return ids

    def _connected(self) -> int:
        try:
            return len(self.client.nthreads())
        except Exception:  # noqa: BLE001 - the scheduler is busy: count none for now
            return 0

    def wait_for_workers(self, timeout: float, stop: Callable[[], bool]) -> None:
        """Return once a worker is connected (or ``stop()``); :class:`ClusterError` after ``timeout`` s."""
        started = last_note = time.monotonic()
        log.info("Submitted %d SLURM job(s) to %s; waiting for the first to start (up to %g s, --cluster-timeout)",
                 self.jobs, self.queue, timeout)
        while not self._connected() and not stop():
            states = queue_states(self.job_ids())
            pending = sum(1 for s in states.values() if s == "PENDING")
            if time.monotonic() - started > timeout:
                raise ClusterError(f"no SLURM job started within {timeout:g} s in {self.queue} ({pending} still "
                                   f"pending, squeue -j {','.join(states) or '-'}); raise --cluster-timeout or "
                                   "choose another --slurm-queue")
            if time.monotonic() - last_note >= 15:
                last_note = time.monotonic()
                log.info("Waiting for SLURM jobs to start: %d pending in %s", pending, self.queue)
            time.sleep(1.0)

    def _resubmit(self, names: list) -> None:
        """Forget the jobs of these worker-spec names (ended, or cancelled here) and submit new ones."""
        for name in names:
            self._seen.pop(name, None)
            self.cluster.worker_spec.pop(name, None)
            self.cluster.workers.pop(name, None)
        # a new job gets a slot name never used in this run: Dask forgets a lost worker's name late
        # (``lost-worker-timeout``) and would then take the new one for it
        used = [slot_number(n) for n in (*self.cluster.worker_spec, *names)]
        self.cluster._i = max([self.cluster._i, *(n + 1 for n in used if isinstance(n, int))])
        self.cluster.scale(jobs=self.jobs)

    def resize(self, *, memory: str, walltime: str, jobs: int) -> None:
        """Cancel the run's jobs (all idle) and submit ``jobs`` new ones with this memory and walltime."""
        names = list(self.cluster.worker_spec)
        self.retired.update(names)  # their workers may stay connected a moment: they take no dataset
        self.cluster.new_spec["options"].update(memory=memory, walltime=walltime)
        self.walltime_s = slurm_seconds(walltime)
        self.jobs = jobs
        self._resubmit(names)

    def ready_workers(self, longest_s: float, busy: set[str]) -> list[str]:
        """The connected workers that may take a new dataset: those whose job has enough walltime left
        (:func:`takes_a_dataset`): ``--slurm-min-time-left``, or :data:`TIME_MARGIN` times the run's longest
        dataset so far (``longest_s``). An idle worker with too little left is retired (its job cancelled, a
        new one submitted) rather than killed by its walltime in the middle of a dataset; a worker running a
        dataset is left alone.
        """
        needed = self.min_time_left or TIME_MARGIN * longest_s
        try:
            names = {address: info.get("name") for address, info in self.client.scheduler_info()["workers"].items()}
        except Exception:  # noqa: BLE001 - the scheduler is busy: none for now
            return []
        now, ready, short = time.monotonic(), [], []
        for address, name in names.items():
            if name in self.retired:  # its job is being cancelled
                continue
            job_id = self._seen.get(name) or str(getattr(self.cluster.workers.get(name), "job_id", "") or "")
            end = self._ends.get(job_id)
            if takes_a_dataset(None if end is None else end - now, needed, self.walltime_s):
                ready.append(address)
            elif address not in busy and name in self.cluster.worker_spec and job_id:
                short.append((name, job_id))
        if short:
            _run(["scancel", *(job_id for _name, job_id in short)])
            self.retired.update(name for name, _job_id in short)
            self._resubmit([name for name, _job_id in short])
            log.info("%d SLURM job(s) with less than %.0f s of walltime left take no new dataset "
                     "(--slurm-min-time-left): cancelled, %d new job(s) submitted", len(short), needed, len(short))
        return ready

    def upkeep(self, queued: int, give_up_s: float) -> str | None:
        """While ``queued`` datasets wait (for the executor or for a worker), replace jobs that ended; a reason
        to give up on the waiting ones, or None.

        Gives up when no worker was connected for ``give_up_s`` seconds, or when jobs ended and no
        replacement is left.
        """
        now = time.monotonic()
        if self._connected():
            self._no_worker_since = None
        else:
            self._no_worker_since = self._no_worker_since or now
        if not queued or now - self._last_upkeep < 3.0:
            return None
        self._last_upkeep = now
        queued_jobs = _squeue(self.job_ids())
        if queued_jobs is None:  # squeue failed this time: no job is taken for ended (nor replaced) on that
            return self._give_up(ended=False, alive=True, give_up_s=give_up_s, now=now)
        alive = {job_id: state for job_id, (state, _left) in queued_jobs.items()}
        for job_id, (_state, left) in queued_jobs.items():
            if left is not None:
                self._ends[job_id] = now + left
        ended = [name for name, job_id in self._seen.items()
                 if job_id not in alive and name in self.cluster.worker_spec]
        if ended and self.replacements_left > 0:
            ended = ended[:self.replacements_left]
            self.replacements_left -= len(ended)
            self.replaced += len(ended)
            self._resubmit(ended)
            log.warning("%d SLURM job(s) ended early; submitted %d replacement(s) (%d left)", len(ended),
                        len(ended), self.replacements_left)
            self._no_worker_since = None if self._no_worker_since is None else now
            return None
        return self._give_up(ended=bool(ended), alive=bool(alive), give_up_s=give_up_s, now=now)

    def _give_up(self, *, ended: bool, alive: bool, give_up_s: float, now: float) -> str | None:
        """Why the waiting datasets are given up once no worker was connected for ``give_up_s`` s, or None."""
        if self._no_worker_since is not None and now - self._no_worker_since > give_up_s:
            if ended and not alive:
                return (f"no SLURM job left to run it: {self.replaced} job(s) already replaced "
                        "(--slurm-replacements); see the logs in the run folder")
            return f"no SLURM job was running for {give_up_s:g} s in {self.queue} (--cluster-timeout)"
        return None
