"""``run_batch.py --cluster slurm`` on a real single-node SLURM cluster, as an HPC user runs it.

The cluster (slurmctld, slurmd and munged on this machine, partition ``debug``) is started here when none
runs, and stopped afterwards (tests/slurm_cluster.py; CI starts it in ``.ci/run``). Every run is the user's
command in a subprocess; the tests look at what the user sees: exit codes, the terminal, the run folder's
statuses, ``squeue``, and the processes left behind.

The runs are slow (a job's worker and each dataset's kernel start; a walltime is at least a minute), so they
all start at once, in one module-scoped fixture, each in its own output folder with its own jobs (the test
partition lets jobs share a core, tests/slurm_cluster.py), and each test reads the outcome of its run.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import pytest

from tests import slurm_cluster
from tests.conftest import API_KEY, REPO
from tests.scripted_llm_server import ScriptedLLMServer
from tests.synthetic import BLOOD_TYPES, make_counts, write

pytestmark = pytest.mark.slow
NAMES = ("D_one", "D_two", "D_three")


@dataclass
class Run:
    """One user's command, what the test does while it runs, and what it gave."""

    args: list[str]
    during: Callable[[Run], None] | None = None
    llm_latency: float | None = None  # a scripted model answering after this many seconds
    out: Path = Path()
    returncode: int | None = None
    lines: list[str] = field(default_factory=list)
    took: float = 0.0
    noted: dict = field(default_factory=dict)  # what ``during`` saw (e.g. the job it cancelled)
    path_first: Path | None = None  # a folder of commands found before SLURM's own (PATH)

    @property
    def text(self) -> str:
        return "".join(self.lines)

    def statuses(self) -> dict[str, dict]:
        (run,) = self.out.iterdir()
        return {p.parent.name: json.loads(p.read_text()) for p in run.glob("*/*/*_status.json")}

    def folder(self) -> Path:
        (run,) = self.out.iterdir()
        return run


def env(**extra: str) -> dict:
    base = {k: v for k, v in os.environ.items() if k not in ("OPENAI_API_KEY", "OPENAI_BASE_URL")}
    return {**base, "PYTHONPATH": str(REPO), **extra}


def command(partition: str, data: Path, out: Path, *args: str) -> list[str]:
    return [sys.executable, str(REPO / "run_batch.py"), "--data-dir", str(data), "--output-dir", str(out),
            "--cluster", "slurm", "--slurm-queue", partition, "--slurm-python", sys.executable,
            "--scheduler-host", "127.0.0.1", *args]


def wait_for(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.5)


def execute(run: Run, partition: str, data: Path) -> Run:
    """Run the user's command to its end (``run.during`` acting on it meanwhile); fills in the outcome."""
    path = {"PATH": f"{run.path_first}{os.pathsep}{os.environ['PATH']}"} if run.path_first else {}
    environ = env(**path)
    llm = nullcontext() if run.llm_latency is None else ScriptedLLMServer(expected_api_key=API_KEY,
                                                                           latency=run.llm_latency)
    with llm as server:
        if server is not None:
            environ = env(OPENAI_API_KEY=API_KEY, OPENAI_BASE_URL=server.base_url, **path)
        started = time.monotonic()
        process = subprocess.Popen(command(partition, data, run.out, *run.args), env=environ, text=True,
                                   stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=REPO)
        reader = threading.Thread(target=lambda: run.lines.extend(iter(process.stdout.readline, "")), daemon=True)
        reader.start()
        run.noted["process"] = process
        try:
            if run.during:
                run.during(run)
            run.returncode = process.wait(timeout=600)
        finally:
            if process.poll() is None:
                process.kill()
            reader.join(timeout=10)
        run.took = time.monotonic() - started
    return run


def interrupt_once_started(run: Run) -> None:
    """Ctrl-C (SIGINT) as soon as a dataset started in a job."""
    process = run.noted["process"]
    wait_for(lambda: "started" in run.text or process.poll() is not None, 300, "a dataset to start")
    process.send_signal(signal.SIGINT)


def cancel_the_running_job(run: Run) -> None:
    """``scancel`` the run's job once it runs a dataset (its only job: the run needs a replacement)."""
    process = run.noted["process"]

    def running() -> list[str]:
        if process.poll() is not None:
            return ["-"]
        if "started" not in run.text:
            return []
        # the run's own jobs, by their logs in its folder (another run may have the same run folder name)
        ids = [log.stem.rsplit("-", 1)[-1] for log in (run.folder() / "slurm_logs").glob("*.err")]
        out = subprocess.run(["squeue", "-h", "-t", "R", "-o", "%i"], capture_output=True, text=True).stdout.split()
        return [job for job in ids if job in out]

    wait_for(running, 300, "the job to start a dataset")
    run.noted["cancelled"] = running()[0]
    subprocess.run(["scancel", run.noted["cancelled"]], check=True)


def flaky_squeue(folder: Path) -> Path:
    """A ``squeue`` that fails, as a busy or restarting controller makes it, while ``folder/down`` exists."""
    folder.mkdir(parents=True, exist_ok=True)
    script = folder / "squeue"
    script.write_text(f"""#!/bin/sh
if [ -e '{folder / "down"}' ]; then
  echo "squeue: error: slurm_load_jobs error: Socket timed out on send/recv operation" >&2
  exit 1
fi
exec '{shutil.which("squeue")}' "$@"
""")
    script.chmod(0o755)
    return folder


def squeue_fails_for_a_while(run: Run) -> None:
    """Once a dataset runs (the other waits for the job), ``squeue`` fails for 12 s."""
    process = run.noted["process"]
    wait_for(lambda: "started" in run.text or process.poll() is not None, 300, "a dataset to start")
    down = run.path_first / "down"
    down.touch()
    time.sleep(12)
    down.unlink()


def runs_of(data: Path) -> dict[str, Run]:
    blood = data / "blood"
    return {
        # three datasets in two jobs: one job runs two datasets one after another
        # with the memory estimated from the inputs (1 GB + 10 x 0.46 MB), under the 2GB cap
        "batch": Run(["--tissues", "blood", "--annotator", "reference", "--workers", "2", "--slurm-memory", "2GB",
                      "--slurm-memory-from-inputs"]),
        "ctrl_c": Run(["--tissues", "blood", "--annotator", "reference", "--workers", "1", "--slurm-memory", "2GB"],
                      during=interrupt_once_started),
        "oom": Run(["--input", str(blood / f"{NAMES[0]}.h5ad"), "--tissue", "blood", "--annotator", "reference",
                    "--slurm-memory", "450MB"]),
        # the same out-of-memory kill, then the dataset again in a new job with five times the memory
        "retry": Run(["--input", str(blood / f"{NAMES[2]}.h5ad"), "--tissue", "blood", "--annotator", "reference",
                      "--slurm-memory", "450MB", "--slurm-retries", "1", "--slurm-retry-factor", "5"]),
        # every model answer takes 40 s: the dataset outlives the job's one minute
        "walltime": Run(["--input", str(blood / f"{NAMES[1]}.h5ad"), "--tissue", "blood", "--annotator", "llm",
                         "--pipeline", "fast", "--no-cache", "--slurm-walltime", "00:01:00", "--slurm-memory", "2GB",
                         "--llm-timeout", "100", "--llm-deadline", "200"], llm_latency=40.0),
        # one job of 10 min that must have 9 min 32 s left to take a dataset: after the first dataset
        # (at least half a minute with its worker's start) it takes no other, and a new job runs the second
        "retire": Run(["--tissues", "pair", "--annotator", "reference", "--workers", "1", "--slurm-memory", "2GB",
                       "--slurm-walltime", "00:10:00", "--slurm-min-time-left", "572"]),
        # one job: once it is cancelled, only its replacement can run the second dataset
        "cancel": Run(["--tissues", "pair", "--annotator", "reference", "--workers", "1", "--slurm-memory", "2GB"],
                      during=cancel_the_running_job),
        # squeue fails a while: its job did not end, nothing is submitted in its place
        "hiccup": Run(["--tissues", "pair", "--annotator", "reference", "--workers", "1", "--slurm-memory", "2GB"],
                      during=squeue_fails_for_a_while, path_first=flaky_squeue(data.parent / "flaky_squeue")),
    }


@pytest.fixture(scope="module")
def partition():
    why = slurm_cluster.available()
    if why:
        if os.environ.get("CI"):
            pytest.fail(f"CI must run the SLURM tests: {why}")
        pytest.skip(f"no SLURM cluster here ({why}); CI starts one (.ci/run)")
    started = slurm_cluster.ensure()
    yield slurm_cluster.PARTITION
    if started:
        slurm_cluster.stop()


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("slurm_data")
    for seed, name in enumerate(NAMES):
        write(make_counts(150, cell_types=BLOOD_TYPES, seed=40 + seed), root / "blood" / f"{name}.h5ad")
    for name in NAMES[:2]:  # a two-dataset tissue, for the run that needs them one after another
        (root / "pair").mkdir(exist_ok=True)
        (root / "pair" / f"{name}.h5ad").symlink_to(root / "blood" / f"{name}.h5ad")
    return root


@pytest.fixture(scope="module")
def runs(partition, data, tmp_path_factory) -> dict[str, Run]:
    """Every run of this module, all at once; each test asserts on its own."""
    runs = runs_of(data)
    # a folder with a space in its path, as labs name them: the job scripts' log lines must still parse
    base = tmp_path_factory.mktemp("slurm_runs") / "lab runs"
    for name, run in runs.items():
        run.out = base / name
    started = time.monotonic()
    with ThreadPoolExecutor(len(runs)) as pool:
        for future in [pool.submit(execute, run, partition, data) for run in runs.values()]:
            future.result()
    print(f"\n{len(runs)} SLURM runs side by side in {time.monotonic() - started:.0f} s: "
          + ", ".join(f"{name} {run.took:.0f} s" for name, run in runs.items()))
    return runs


def assert_nothing_left(job_ids: set[str]) -> None:
    """No job of the run in the queue and no process of its jobs alive (SLURM_JOB_ID in their environment)."""
    assert job_ids

    def queued() -> set[str]:
        return set(subprocess.run(["squeue", "-h", "-o", "%i"], capture_output=True, text=True).stdout.split())

    wait_for(lambda: not queued() & job_ids, 60, f"jobs {job_ids} to leave squeue")

    def left() -> list[int]:
        found = []
        for process in psutil.process_iter():
            try:
                if process.environ().get("SLURM_JOB_ID") in job_ids:
                    found.append(process.pid)
            except (psutil.Error, OSError):
                continue
        return found

    wait_for(lambda: not left(), 30, "the jobs' processes to end")


def test_a_batch_runs_in_slurm_jobs_named_after_the_run(runs, data):
    run = runs["batch"]
    assert run.returncode == 0, run.text
    records = run.statuses()
    assert {name: r["status"] for name, r in records.items()} == dict.fromkeys(NAMES, "success")
    folder = run.folder()
    jobs = {r["slurm_job_id"] for r in records.values()}
    assert 1 <= len(jobs) <= 2 and all(jobs)
    for record in records.values():
        log = Path(record["slurm_log"])
        assert log.parent == folder / "slurm_logs" and log.is_file()
        assert log.name.startswith(f"cassia-{folder.name}-") and log.name.endswith(f"-{record['slurm_job_id']}.err")
        assert record["started_at"] and record["duration_s"] > 0
    assert (folder / "batch_summary.txt").is_file() and (folder / "report.html").is_file()
    assert "waiting for the first to start" in run.text
    largest = max(path.stat().st_size for path in (data / "blood").iterdir())
    mib = (1_000_000_000 + 10 * largest) // 2**20
    assert f"SLURM jobs request {mib}MiB of memory" in run.text and "at most --slurm-memory 2GB" in run.text
    for job in jobs:  # SLURM still knows the ended jobs (MinJobAge): each had the estimate, not the cap
        shown = subprocess.run(["scontrol", "-o", "show", "job", job], capture_output=True, text=True).stdout
        assert f"MinMemoryNode={mib}M" in shown, shown
    assert_nothing_left(jobs)
    print(f"3 datasets through --cluster slurm in {run.took:.0f} s")


def test_ctrl_c_stops_the_jobs_writes_the_summaries_and_exits_130(runs):
    run = runs["ctrl_c"]
    assert run.returncode == 130, run.text
    assert "Interrupted (SIGINT)" in run.text and "Resume with: python run_batch.py --resume" in run.text
    records = run.statuses()
    assert set(records) == set(NAMES)
    assert {r["status"] for r in records.values()} <= {"interrupted", "success"}
    assert "interrupted" in {r["status"] for r in records.values()}
    assert (run.folder() / "batch_summary.txt").is_file()
    assert_nothing_left({r.get("slurm_job_id", "") for r in records.values()} - {""})


def test_an_out_of_memory_kill_fails_the_dataset_with_its_reason_and_job(runs):
    run = runs["oom"]
    assert run.returncode == 1, run.text
    record = run.statuses()[NAMES[0]]
    assert record["status"] == "failed" and record["error_type"] == "JobOutOfMemory", record
    assert f"SLURM job {record['slurm_job_id']} was killed for exceeding its memory limit" in record["error"]
    assert "exceeded memory limit" in Path(record["slurm_log"]).read_text()
    assert record["started_at"] and record["duration_s"] > 0
    assert_nothing_left({record["slurm_job_id"]})


def test_an_out_of_memory_kill_is_retried_with_more_memory_when_asked(runs):
    run = runs["retry"]
    assert run.returncode == 0, run.text
    record = run.statuses()[NAMES[2]]
    assert record["status"] == "success", record
    (attempt,) = record["slurm_retries"]
    assert attempt["error_type"] == "JobOutOfMemory" and attempt["slurm_memory"] == "450MB"
    assert f"SLURM job {attempt['slurm_job_id']} was killed for exceeding its memory limit" in attempt["error"]
    assert attempt["slurm_job_id"] != record["slurm_job_id"]
    assert "--slurm-memory 2.10GiB" in run.text
    (aside,) = (run.folder() / "blood" / NAMES[2] / "superseded").iterdir()
    assert (aside / "REASON.txt").read_text().startswith("Set aside by --slurm-retries: SLURM job")
    assert_nothing_left({attempt["slurm_job_id"], record["slurm_job_id"]})


def test_a_walltime_kill_fails_the_dataset_with_its_reason_and_job(runs):
    run = runs["walltime"]
    assert run.returncode == 1, run.text
    record = run.statuses()[NAMES[1]]
    assert record["status"] == "failed" and record["error_type"] == "JobTimeLimit", record
    assert f"SLURM job {record['slurm_job_id']} reached its walltime" in record["error"]
    assert API_KEY not in Path(record["slurm_log"]).read_text()
    assert_nothing_left({record["slurm_job_id"]})


def test_a_cancelled_job_is_replaced_and_the_queue_drains(runs):
    run = runs["cancel"]
    first = run.noted["cancelled"]
    assert run.returncode == 1, run.text
    records = run.statuses()
    cancelled = [r for r in records.values() if r["status"] == "failed"]
    assert len(cancelled) == 1 and cancelled[0]["error_type"] == "JobCancelled", records
    assert cancelled[0]["slurm_job_id"] == first
    others = [r for r in records.values() if r["status"] == "success"]
    assert len(others) == 1 and others[0]["slurm_job_id"] != first, (records, run.text)  # run by the replacement
    assert "replacement" in run.text
    assert_nothing_left({r["slurm_job_id"] for r in records.values()})


def test_a_squeue_that_fails_a_while_is_not_taken_for_jobs_that_ended(runs):
    run = runs["hiccup"]
    assert run.returncode == 0, run.text
    assert "ended early" not in run.text and "replacement" not in run.text
    assert len(list((run.folder() / "slurm_logs").glob("*.err"))) == 1  # one job ran both datasets
    assert {s["status"] for s in run.statuses().values()} == {"success"}


def test_a_job_short_of_walltime_takes_no_new_dataset_and_a_new_job_does(runs):
    run = runs["retire"]
    assert run.returncode == 0, run.text
    records = run.statuses()
    assert {name: r["status"] for name, r in records.items()} == dict.fromkeys(NAMES[:2], "success")
    jobs = [r["slurm_job_id"] for r in sorted(records.values(), key=lambda r: r["started_at"])]
    assert len(set(jobs)) == 2, records  # the first job ran one dataset only
    assert "take no new dataset (--slurm-min-time-left): cancelled, 1 new job(s) submitted" in run.text
    assert "ended early" not in run.text  # retired by the run, not lost
    first_log = Path(records[min(records, key=lambda n: records[n]["started_at"])]["slurm_log"]).read_text()
    assert "DUE TO TIME LIMIT" not in first_log
    assert_nothing_left(set(jobs))


def test_a_job_script_sbatch_refuses_is_said_at_once(partition, data, tmp_path):
    """A partition that does not exist: sbatch's own reason on one line, in seconds, not a queue watched for
    --cluster-timeout that never starts a job."""
    started = time.monotonic()
    result = subprocess.run(command("no-such-partition", data, tmp_path / "out", "--tissues", "blood",
                                    "--annotator", "reference"), env=env(), capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 2, result.stderr
    assert "sbatch refuses the job script: invalid partition specified: no-such-partition" in result.stderr
    assert "Traceback" not in result.stderr and time.monotonic() - started < 60
    assert list((tmp_path / "out").iterdir()) == []  # the rerun makes its own: no folder of a run never started
    assert "removed: nothing ran in it" in result.stderr  # the folder named at the start is said gone


@pytest.mark.parametrize("queue", ["debug", "no-such-partition"])
def test_a_dry_run_checks_the_job_script_with_sbatch(partition, data, tmp_path, queue):
    result = subprocess.run([*command(queue, data, tmp_path / "out", "--tissues", "blood", "--annotator",
                                      "reference"), "--dry-run"], env=env(), capture_output=True, text=True,
                            timeout=120)
    if queue == partition:
        assert result.returncode == 0, result.stdout + result.stderr
        assert f"SLURM job(s) at a time in {partition}" in result.stdout and "--test-only accepts" in result.stdout
    else:
        assert result.returncode == 1, result.stdout + result.stderr
        assert "The run could not start: sbatch refuses the job script: invalid partition" in result.stdout
    assert not (tmp_path / "out").exists()  # a dry run writes nothing


def test_no_sbatch_on_path_is_said_at_once(partition, data, tmp_path):
    """On a node without SLURM's commands (or before ``module load slurm``): one line, at once."""
    result = subprocess.run(command(partition, data, tmp_path / "out", "--tissues", "blood", "--annotator",
                                    "reference"), env=env(PATH=str(tmp_path / "no-slurm-here")),
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr
    assert "sbatch is not on PATH" in result.stderr and "Traceback" not in result.stderr
    assert "Submitted" not in result.stderr + result.stdout


def test_the_queue_is_empty_once_every_run_ended(runs):
    """The runs above leave no job behind, whichever way they ended."""
    assert all(run.returncode is not None for run in runs.values())
    wait_for(lambda: not subprocess.run(["squeue", "-h", "-o", "%i"], capture_output=True,
                                        text=True).stdout.strip(), 60, "an empty squeue")


def test_a_drained_partition_is_not_taken_for_a_refused_job_script(partition, data, tmp_path):
    """Every node drained for maintenance: sbatch would queue the jobs (only --test-only says 'Requested node
    configuration is not available'), so the run is not refused as a usage error blaming correct flags."""
    nodes = subprocess.run(["sinfo", "-h", "-p", partition, "-o", "%n"], capture_output=True, text=True).stdout.split()
    for node in nodes:
        subprocess.run(["scontrol", "update", f"NodeName={node}", "State=DRAIN", "Reason=maintenance"], check=True)
    try:
        result = subprocess.run([*command(partition, data, tmp_path / "out", "--tissues", "blood", "--annotator",
                                          "reference"), "--dry-run"], env=env(), capture_output=True, text=True,
                                timeout=120)
    finally:
        for node in nodes:
            subprocess.run(["scontrol", "update", f"NodeName={node}", "State=RESUME"], check=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"every node of SLURM partition {partition} is drain" in result.stdout, result.stdout
    assert "the jobs wait in the queue" in result.stdout and "refuses" not in result.stdout + result.stderr


def test_jobs_an_earlier_session_of_the_run_left_are_cancelled(partition, tmp_path):
    """A driver killed with kill -9 cannot cancel its queued jobs: the next session of the run does, and only
    those (a job of another run, of a run of the same name in another folder, or another job of the user,
    stays)."""
    from cassia_helpers.batch.dask.slurm import cancel_leftovers

    def submit(name: str, logs: Path) -> str:
        logs.mkdir(parents=True, exist_ok=True)
        return subprocess.run(["sbatch", "--parsable", "--hold", "-p", partition, "-J", name, "-o",
                               str(logs / "job-%j.out"), "--wrap", "sleep 1"],
                              capture_output=True, text=True, check=True).stdout.strip().split(";")[0]

    logs, elsewhere = tmp_path / "run" / "slurm_logs", tmp_path / "other" / "run" / "slurm_logs"
    left = [submit("cassia-run_blood_1-0", logs), submit("cassia-run_blood_1-1", logs)]
    others = [submit("cassia-run_blood_12-0", logs), submit("cassia-run_blood_1-notes", logs),
              submit("cassia-run_blood_1-0", elsewhere)]
    try:
        assert sorted(cancel_leftovers("cassia-run_blood_1", str(logs))) == sorted(left)
        queued = subprocess.run(["squeue", "-h", "-o", "%i"], capture_output=True, text=True).stdout.split()
        assert not set(left) & set(queued) and set(others) <= set(queued)
    finally:
        subprocess.run(["scancel", *left, *others], capture_output=True)
