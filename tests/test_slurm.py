"""``run_batch.py --cluster slurm`` on a real single-node SLURM cluster, as an HPC user runs it.

The cluster (slurmctld, slurmd and munged on this machine, partition ``debug``) is started here when none
runs, and stopped afterwards (tests/slurm_cluster.py; CI starts it in ``.ci/run``). Every run is the user's
command in a subprocess; the tests look at what the user sees: exit codes, the terminal, the run folder's
statuses, ``squeue``, and the processes left behind.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest

from tests import slurm_cluster
from tests.conftest import API_KEY, REPO
from tests.scripted_llm_server import ScriptedLLMServer
from tests.synthetic import BLOOD_TYPES, make_counts, write

pytestmark = pytest.mark.slow
NAMES = ("D_one", "D_two", "D_three")


@pytest.fixture(scope="module")
def cluster():
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
    for name in NAMES[:2]:  # a two-dataset tissue, for the test that runs them one after another
        (root / "pair").mkdir(exist_ok=True)
        (root / "pair" / f"{name}.h5ad").symlink_to(root / "blood" / f"{name}.h5ad")
    return root


def env(**extra: str) -> dict:
    base = {k: v for k, v in os.environ.items() if k not in ("OPENAI_API_KEY", "OPENAI_BASE_URL")}
    return {**base, "PYTHONPATH": str(REPO), **extra}


def command(cluster: str, data: Path, out: Path, *args: str) -> list[str]:
    return [sys.executable, str(REPO / "run_batch.py"), "--data-dir", str(data), "--output-dir", str(out),
            "--cluster", "slurm", "--slurm-queue", cluster, "--slurm-python", sys.executable,
            "--scheduler-host", "127.0.0.1", "--slurm-memory", "2GB", *args]


def start(cmd: list[str], environ: dict | None = None) -> tuple[subprocess.Popen, list[str]]:
    """The driver in a subprocess, its terminal collected line by line into the returned list."""
    process = subprocess.Popen(cmd, env=environ or env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True, cwd=REPO)
    lines: list[str] = []
    threading.Thread(target=lambda: lines.extend(iter(process.stdout.readline, "")), daemon=True).start()
    return process, lines


def wait_for(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.5)


def statuses(out: Path) -> dict[str, dict]:
    import json

    (run,) = out.iterdir()
    return {p.parent.name: json.loads(p.read_text()) for p in run.glob("*/*/*_status.json")}


def assert_nothing_left(job_ids: set[str]) -> None:
    """No job of the run in the queue and no process of its jobs alive (SLURM_JOB_ID in their environment)."""
    wait_for(lambda: not subprocess.run(["squeue", "-h", "-o", "%i"], capture_output=True, text=True).stdout.strip(),
             60, "an empty squeue")

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


def test_a_batch_runs_in_slurm_jobs_named_after_the_run(cluster, data, tmp_path):
    cmd = command(cluster, data, tmp_path / "out", "--tissues", "blood", "--annotator", "reference", "--workers", "2")
    started = time.monotonic()
    process, lines = start(cmd)
    assert process.wait(timeout=600) == 0, "".join(lines)
    took = time.monotonic() - started
    records = statuses(tmp_path / "out")
    assert {name: r["status"] for name, r in records.items()} == dict.fromkeys(NAMES, "success")
    (run,) = (tmp_path / "out").iterdir()
    jobs = {r["slurm_job_id"] for r in records.values()}
    assert 1 <= len(jobs) <= 2 and all(jobs)
    for record in records.values():
        log = Path(record["slurm_log"])
        assert log.parent == run / "slurm_logs" and log.is_file()
        assert log.name.startswith(f"cassia-{run.name}-") and log.name.endswith(f"-{record['slurm_job_id']}.err")
        assert record["started_at"] and record["duration_s"] > 0
    assert (run / "batch_summary.txt").is_file() and (run / "report.html").is_file()
    assert any("waiting for the first to start" in line for line in lines)
    assert_nothing_left(jobs)
    print(f"3 datasets through --cluster slurm in {took:.0f} s")


def test_ctrl_c_stops_the_jobs_writes_the_summaries_and_exits_130(cluster, data, tmp_path):
    process, lines = start(command(cluster, data, tmp_path / "out", "--tissues", "blood", "--annotator",
                                   "reference", "--workers", "2"))
    wait_for(lambda: any("started" in line for line in lines) or process.poll() is not None, 300,
             "a dataset to start")
    process.send_signal(signal.SIGINT)
    assert process.wait(timeout=120) == 130, "".join(lines)
    text = "".join(lines)
    assert "Interrupted (SIGINT)" in text and "Resume with: python run_batch.py --resume" in text
    records = statuses(tmp_path / "out")
    assert set(records) == set(NAMES)
    assert {r["status"] for r in records.values()} <= {"interrupted", "success"}
    assert "interrupted" in {r["status"] for r in records.values()}
    (run,) = (tmp_path / "out").iterdir()
    assert (run / "batch_summary.txt").is_file()
    assert_nothing_left({r.get("slurm_job_id", "") for r in records.values()} - {""})


def test_an_out_of_memory_kill_fails_the_dataset_with_its_reason_and_job(cluster, data, tmp_path):
    cmd = command(cluster, data, tmp_path / "out", "--input", str(data / "blood" / f"{NAMES[0]}.h5ad"),
                  "--tissue", "blood", "--annotator", "reference")
    cmd[cmd.index("2GB")] = "450MB"
    process, lines = start(cmd)
    assert process.wait(timeout=600) == 1, "".join(lines)
    record = statuses(tmp_path / "out")[NAMES[0]]
    assert record["status"] == "failed" and record["error_type"] == "JobOutOfMemory", record
    assert f"SLURM job {record['slurm_job_id']} was killed for exceeding its memory limit" in record["error"]
    assert "exceeded memory limit" in Path(record["slurm_log"]).read_text()
    assert record["started_at"] and record["duration_s"] > 0
    assert_nothing_left({record["slurm_job_id"]})


def test_a_walltime_kill_fails_the_dataset_with_its_reason_and_job(cluster, data, tmp_path):
    # every model answer takes 40 s: the dataset outlives the job's one minute
    with ScriptedLLMServer(expected_api_key=API_KEY, latency=40.0) as server:
        cmd = command(cluster, data, tmp_path / "out", "--input", str(data / "blood" / f"{NAMES[1]}.h5ad"),
                      "--tissue", "blood", "--annotator", "llm", "--pipeline", "fast", "--no-cache",
                      "--slurm-walltime", "00:01:00", "--llm-timeout", "100", "--llm-deadline", "200")
        process, lines = start(cmd, env(OPENAI_API_KEY=API_KEY, OPENAI_BASE_URL=server.base_url))
        assert process.wait(timeout=600) == 1, "".join(lines)
    record = statuses(tmp_path / "out")[NAMES[1]]
    assert record["status"] == "failed" and record["error_type"] == "JobTimeLimit", record
    assert f"SLURM job {record['slurm_job_id']} reached its walltime" in record["error"]
    assert API_KEY not in Path(record["slurm_log"]).read_text()
    assert_nothing_left({record["slurm_job_id"]})


def test_a_cancelled_job_is_replaced_and_the_queue_drains(cluster, data, tmp_path):
    # one job: once it is cancelled, only its replacement can run the second dataset
    process, lines = start(command(cluster, data, tmp_path / "out", "--tissues", "pair", "--annotator",
                                   "reference", "--workers", "1"))
    first: list[str] = []

    def running_job() -> bool:
        out = subprocess.run(["squeue", "-h", "-t", "R", "-o", "%i"], capture_output=True, text=True).stdout.split()
        first.extend(out[:1])
        return bool(out) and any("started" in line for line in lines)

    wait_for(running_job, 300, "the job to start a dataset")
    subprocess.run(["scancel", first[0]], check=True)
    assert process.wait(timeout=600) == 1, "".join(lines)
    records = statuses(tmp_path / "out")
    cancelled = [r for r in records.values() if r["status"] == "failed"]
    assert len(cancelled) == 1 and cancelled[0]["error_type"] == "JobCancelled", records
    assert cancelled[0]["slurm_job_id"] == first[0]
    others = [r for r in records.values() if r["status"] == "success"]
    assert len(others) == 1 and others[0]["slurm_job_id"] != first[0]  # run by the replacement
    assert any("replacement" in line for line in lines)
    assert_nothing_left({r["slurm_job_id"] for r in records.values()})
