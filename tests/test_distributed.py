"""Datasets on Dask: a real LocalCluster (and real scheduler/worker processes) on 127.0.0.1."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import psutil
import pytest

from cassia_helpers.batch.dask import DatasetExecutor, check_shared_storage, open_client, run_limits
from cassia_helpers.batch.dask.process import die_with_parent
from cassia_helpers.dataset.annotate.llm.limits import DaskRunBudget, DaskRunThrottle
from tests import dask_fakes
from tests.dask_fakes import read_lines
from tests.waiting import wait_for

pytest.importorskip("distributed", reason="dask[distributed] is a dependency of the package")
REPO = Path(__file__).resolve().parent.parent
WORKERS = 3


@pytest.fixture(scope="module")
def local_cluster():
    """One local cluster of worker processes for the tests of this module, standing in for remote workers
    (they can be killed and signalled apart from this process; starting them takes seconds)."""
    with open_client(workers=WORKERS, processes=True) as client:
        yield client


@pytest.fixture
def client(local_cluster):
    local_cluster.wait_for_workers(WORKERS, timeout=120)  # a test may have killed one: its nanny restarts it
    return local_cluster


@pytest.fixture(autouse=True)
def time_limit():
    """Each test here is bounded: a hung cluster fails the test instead of the whole run."""
    def expire(signum, frame):
        raise TimeoutError("test took too long")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(240)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)


def tagged(tag: str) -> list[psutil.Process]:
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        try:
            if tag in (proc.info["cmdline"] or []) and proc.status() != psutil.STATUS_ZOMBIE:
                found.append(proc)
        except psutil.Error:
            continue
    return found


def jobs_for(folder: Path, names: list[str], seconds: float, tag: str) -> dict[str, dict]:
    return {f"run/tissue/{name}": {"dir": str(folder), "name": name, "seconds": seconds, "tag": tag,
                                   "key": f"run/tissue/{name}"} for name in names}


def run_collecting(executor: DatasetExecutor, task, jobs) -> list[tuple[str, dict]]:
    done: list[tuple[str, dict]] = []
    executor.run_jobs(task, jobs, on_done=lambda key, record: done.append((key, record)))
    return done


def test_every_dataset_runs_once_and_reports_once(client, tmp_path):
    tag = f"cassia-fake-{os.getpid()}-all"
    names = ["a", "b", "c", "d", "e", "f", "g"]
    jobs = jobs_for(tmp_path, names, 0.3, tag)
    progress = []
    assert client.scheduler.address.startswith("tcp://127.0.0.1:")
    workers = client.scheduler_info()["workers"]
    assert len(workers) == WORKERS and all(w["nthreads"] == 1 for w in workers.values())
    assert all(w["host"] == "127.0.0.1" for w in workers.values())
    worker_pids = set(client.run(os.getpid).values())
    assert check_shared_storage(client, tmp_path / "run") is None
    executor = DatasetExecutor(client)
    done = []
    executor.run_jobs(dask_fakes.sleeper, jobs, on_done=lambda k, r: done.append((k, r)),
                      on_progress=progress.append, progress_every_s=0.05)
    assert sorted(key for key, _ in done) == sorted(jobs)
    assert all(record["status"] == "success" and record["key"] == key for key, record in done)
    assert {record["pid"] for _, record in done} <= worker_pids
    for name in names:
        assert len((tmp_path / f"{name}.runs").read_text().splitlines()) == 1
    assert progress[-1].done == len(names) and progress[-1].total == len(names) and progress[-1].queued == 0
    assert max(p.running for p in progress) == WORKERS  # one dataset per worker, the others queued
    assert any(p.queued > 0 for p in progress)
    assert progress[-1].dashboard == ""  # no dashboard unless asked for
    assert not list((tmp_path / "run").iterdir())  # probe files removed


def test_default_local_cluster_is_threads_of_this_process_reachable_over_tcp(tmp_path):
    tag = f"cassia-fake-{os.getpid()}-threads"
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    address_before = os.environ.get("CASSIA_DASK_SCHEDULER")
    jobs = jobs_for(tmp_path, ["a", "b", "c"], 0.2, tag)
    with open_client(workers=2) as client:
        assert client.scheduler.address.startswith("tcp://127.0.0.1:")  # kernels reach it from their processes
        assert set(client.run(os.getpid).values()) == {os.getpid()}
        assert list(client.nthreads().values()) == [1, 1]
        done = run_collecting(DatasetExecutor(client), dask_fakes.sleeper, jobs)
        assert os.environ["CASSIA_DASK_SCHEDULER"] == client.scheduler.address
    assert sorted(record["status"] for _, record in done) == ["success"] * 3
    assert all(len((tmp_path / f"{n}.runs").read_text().splitlines()) == 1 for n in "abc")
    # the driver keeps its Ctrl-C/SIGTERM/SIGHUP handling, and no stale scheduler address is left behind
    assert {sig: signal.getsignal(sig) for sig in handlers} == handlers
    assert os.environ.get("CASSIA_DASK_SCHEDULER") == address_before


def test_stop_mid_run_survives_ctrl_c_and_leaves_no_process(client, tmp_path):
    tag = f"cassia-fake-{os.getpid()}-stop"
    names = ["a", "b", "c", "d", "e", "f"]
    jobs = jobs_for(tmp_path, names, 60, tag)
    worker_pids = list(client.run(os.getpid).values())
    executor = DatasetExecutor(client)
    done: list[tuple[str, dict]] = []
    stopped_at: list[float] = []

    def interrupt():
        wait_for(lambda: len(tagged(tag)) == WORKERS, what="a running dataset per worker")
        for pid in worker_pids:  # what a terminal's Ctrl-C / hang-up does to the process group
            os.kill(pid, signal.SIGINT)
            os.kill(pid, signal.SIGHUP)
        # a round trip through every worker's event loop: the signals arrived before it and were handled
        wait_for(lambda: set(client.run(os.getpid).values()) == set(worker_pids), what="the workers to answer")
        stopped_at.append(time.monotonic())
        executor.stop()

    threading.Thread(target=interrupt, daemon=True).start()
    executor.run_jobs(dask_fakes.sleeper, jobs, on_done=lambda k, r: done.append((k, r)))
    returned = time.monotonic() - stopped_at[0]
    assert all(psutil.pid_exists(pid) for pid in worker_pids), "a worker died of the signals"
    assert returned < 5, f"run_jobs returned {returned:.1f} s after stop()"
    assert sorted(key for key, _ in done) == sorted(jobs)
    ran = [name for name in names if (tmp_path / f"{name}.runs").exists()]
    assert len(ran) == WORKERS
    for name in ran:  # the running ones saw stop() themselves and reported through their task
        assert (tmp_path / f"{name}.stopped").exists()
    records = dict(done)
    for name in names:
        record = records[f"run/tissue/{name}"]
        assert record["status"] == "interrupted"
        assert (record["error"] == "stopped") == (name in ran)
    wait_for(lambda: tagged(tag) == [], timeout=10, what="the stopped datasets' children to be gone")


def _kill_when_running(folder: Path, name: str) -> int:
    runs = folder / f"{name}.runs"
    wait_for(runs.exists, what=f"{name} to start")
    pid = int(runs.read_text().split()[0])
    os.kill(pid, signal.SIGKILL)
    return pid


def test_killed_worker_fails_its_dataset_once_and_kills_its_child(client, tmp_path):
    tag = f"cassia-fake-{os.getpid()}-kill"
    jobs = jobs_for(tmp_path, ["doomed"], 60, tag) | jobs_for(tmp_path, ["fine"], 0.5, tag)
    threading.Thread(target=_kill_when_running, args=(tmp_path, "doomed"), daemon=True).start()
    done = run_collecting(DatasetExecutor(client), dask_fakes.sleeper, jobs)
    # a retry would be assigned when the scheduler drops the dead worker, before the restarted one joins:
    # once the cluster is whole again and idle, a retry would have run (or still be processing)
    wait_for(lambda: len(client.scheduler_info()["workers"]) == WORKERS and not any(client.processing().values()),
             timeout=120, what="the restarted worker and an idle cluster")
    records = dict(done)
    assert len(done) == 2
    assert records["run/tissue/doomed"]["status"] == "failed"
    assert records["run/tissue/doomed"]["error_type"] == "WorkerDied"
    assert records["run/tissue/fine"]["status"] == "success"
    assert len((tmp_path / "doomed.runs").read_text().splitlines()) == 1
    wait_for(lambda: tagged(tag) == [], timeout=15, what="the dead worker's child to die")


@contextmanager
def dask_processes(tmp_path: Path, workers: int, private_dir: Path | None = None):
    """``dask scheduler`` and ``dask worker`` processes on 127.0.0.1 (random ports), as a user starts them.

    With ``private_dir``, one more worker runs in its own mount namespace with a fresh file system
    mounted there: a worker that does not share that folder with the driver.
    """
    scheduler_file = tmp_path / "scheduler.json"
    env = dict(os.environ, PYTHONPATH=str(REPO))
    procs = [subprocess.Popen([sys.executable, "-m", "distributed.cli.dask_scheduler", "--host", "127.0.0.1",
                               "--port", "0", "--no-dashboard", "--scheduler-file", str(scheduler_file)],
                              env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)]
    try:
        wait_for(scheduler_file.exists, what="the scheduler file")
        worker = [sys.executable, "-m", "distributed.cli.dask_worker", "--scheduler-file", str(scheduler_file),
                  "--nthreads", "1", "--host", "127.0.0.1", "--no-dashboard"]
        commands = [worker] * workers
        if private_dir is not None:
            commands.append(["unshare", "--mount", "--propagation", "private", "sh", "-c",
                             'mount -t tmpfs tmpfs "$0" && exec "$@"', str(private_dir), *worker])
        for command in commands:
            procs.append(subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        yield json.loads(scheduler_file.read_text())["address"]
    finally:
        for proc in reversed(procs):
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("unshare"),
                    reason="simulating unshared storage needs root and unshare (both in CI)")
@pytest.mark.slow
def test_existing_scheduler_runs_datasets_checks_storage_and_never_reruns_a_dead_workers_dataset(tmp_path):
    tag = f"cassia-fake-{os.getpid()}-ext"
    run = tmp_path / "run"
    run.mkdir()
    jobs = jobs_for(tmp_path, ["doomed"], 60, tag) | jobs_for(tmp_path, ["x", "y"], 0.3, tag)
    # two workers, and a third that sees its own (empty, private) file system at the run folder
    with dask_processes(tmp_path, 2, private_dir=run) as address, open_client(workers=1, scheduler=address) as client:
        assert address.startswith("tcp://127.0.0.1:")
        client.wait_for_workers(3, timeout=120)
        problem = check_shared_storage(client, run, wait_s=1.0)
        assert problem is not None and "\n" not in problem
        assert str(run) in problem and "1 Dask worker(s)" in problem
        assert not list(run.iterdir())
        assert check_shared_storage(client, tmp_path / "shared") is None
        threading.Thread(target=_kill_when_running, args=(tmp_path, "doomed"), daemon=True).start()
        # this scheduler keeps Dask's default of retrying a dead worker's task elsewhere
        done = run_collecting(DatasetExecutor(client), dask_fakes.sleeper, jobs)
    records = dict(done)
    assert sorted(records) == sorted(jobs)
    assert records["run/tissue/x"]["status"] == records["run/tissue/y"]["status"] == "success"
    assert records["run/tissue/doomed"]["status"] == "failed"
    assert records["run/tissue/doomed"]["error_type"] == "WorkerDied"
    assert len((tmp_path / "doomed.runs").read_text().splitlines()) == 1
    wait_for(lambda: tagged(tag) == [], timeout=15, what="the dead worker's child to die")


@pytest.mark.slow
def test_a_lost_scheduler_keeps_true_statuses_and_names_the_cause(tmp_path):
    from tests.synthetic import BLOOD_TYPES, make_counts, write

    for seed, name in enumerate(("L1", "L2", "L3")):
        write(make_counts(150, cell_types=BLOOD_TYPES, seed=60 + seed), tmp_path / "data" / "blood" / f"{name}.h5ad")
    env = {k: v for k, v in os.environ.items() if k not in ("OPENAI_API_KEY", "OPENAI_BASE_URL")}
    with dask_processes(tmp_path, 1) as address:
        (scheduler,) = [p for p in tagged(str(tmp_path / "scheduler.json"))
                        if "dask_scheduler" in " ".join(p.cmdline())]
        driver = subprocess.Popen(
            [sys.executable, str(REPO / "run_batch.py"), "--data-dir", str(tmp_path / "data"), "--tissues", "blood",
             "--output-dir", str(tmp_path / "out"), "--annotator", "reference", "--scheduler", address],
            env=dict(env, PYTHONPATH=str(REPO)), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        lines: list[str] = []
        threading.Thread(target=lambda: lines.extend(iter(driver.stdout.readline, "")), daemon=True).start()
        try:
            wait_for(lambda: any("started" in line for line in lines), timeout=180, what="the first dataset to start")
        except AssertionError:
            raise AssertionError("".join(lines)) from None
        scheduler.kill()
        assert driver.wait(timeout=200) == 1, "".join(lines)
    text = "".join(lines)
    (run,) = (tmp_path / "out").iterdir()
    records = {p.parent.name: json.loads(p.read_text()) for p in run.glob("blood/*/*_status.json")}
    assert len(records) == 3, text
    not_started = [r for r in records.values() if r["error"].startswith("not started")]
    assert len(not_started) == 2 and {r["status"] for r in not_started} == {"interrupted"}
    assert all("Dask scheduler" in r["error"] and "was lost" in r["error"] for r in not_started)
    (ran,) = [r for r in records.values() if not r["error"].startswith("not started")]
    assert ran["status"] in ("success", "failed", "interrupted") and ran["started_at"]  # what its runner recorded
    assert (f"Stopped early: the Dask scheduler ({address}) was lost. "
            f"Resume with: python run_batch.py --resume {run} --scheduler {address}") in text  # there, not here
    for name, record in records.items():  # the closing table says what the records say
        assert any(name in line and record["status"] in line for line in lines)


def test_llm_slots_hold_across_workers_for_separate_kernel_processes(client, tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    names = ["k1", "k2", "k3"]
    jobs = {f"run/t/{n}": {"dir": str(tmp_path), "name": n, "run_dir": str(run_dir), "limit": 1,
                           "requests": 3, "hold_s": 0.15, "key": f"run/t/{n}"} for n in names}
    done = run_collecting(DatasetExecutor(client), dask_fakes.kernel_user, jobs)
    address = client.scheduler.address
    assert all(record["status"] == "success" for _, record in done), [r["error"] for _, r in done]
    assert {record["kernel_env"] for _, record in done} == {address}
    intervals, connects = [], []
    for name in names:
        lines = read_lines(tmp_path / f"{name}.slots")
        assert lines[0]["kind"] == "DaskRunThrottle"
        connects.append(lines[0]["connect_s"])
        intervals += [(line["in"], line["out"]) for line in lines[1:]]
    assert len(intervals) == 9
    events = sorted([(t_in, 1) for t_in, _ in intervals] + [(t_out, -1) for _, t_out in intervals])
    level = peak = 0
    for _, step in events:
        level += step
        peak = max(peak, level)
    assert peak == 1, f"{peak} requests in flight at once with a limit of 1"
    print(f"kernel import+connect: {min(connects):.2f}-{max(connects):.2f} s")


KERNEL_HOLDING_SLOTS = """
import sys, threading, time
from cassia_helpers.dataset.annotate.llm.limits import run_limits
throttle, _ = run_limits(sys.argv[1], 2, 0.0)
held = threading.Semaphore(0)
def hold():
    with throttle.slot():
        held.release()
        time.sleep(600)  # a request that never ends: the kernel is killed during it
for _ in range(2):
    threading.Thread(target=hold, daemon=True).start()
held.acquire(); held.acquire()
print("holding", flush=True)
time.sleep(600)
"""


def test_a_killed_kernels_llm_slots_are_free_again_within_seconds(client, tmp_path):
    # a dataset's kernel holds every run-wide LLM slot in two long requests, then is killed (kill -9)
    kernel = subprocess.Popen([sys.executable, "-c", KERNEL_HOLDING_SLOTS, str(tmp_path)], stdout=subprocess.PIPE,
                              text=True, env=dict(os.environ, PYTHONPATH=str(REPO),
                                                  CASSIA_DASK_SCHEDULER=client.scheduler.address))
    assert kernel.stdout.readline().strip() == "holding"
    throttle, _ = run_limits(tmp_path, 2, 0.0)  # another dataset of the same run
    time.sleep(8)  # a live kernel keeps its slots however long its requests take
    got, done = threading.Event(), threading.Event()

    def other_request() -> None:
        with throttle.slot():
            got.set()
            done.wait()

    threading.Thread(target=other_request, daemon=True).start()
    assert not got.wait(1.0), "a slot was free while the live kernel held both"
    kernel.kill()
    kernel.wait()
    killed = time.monotonic()
    try:
        assert got.wait(30)
        with throttle.slot():  # the second slot too
            freed_s = time.monotonic() - killed
    finally:
        done.set()
    assert freed_s < 10, f"the dead kernel's slots were held {freed_s:.1f} s"
    print(f"a killed kernel's LLM slots free again after {freed_s:.1f} s")


def test_budget_is_exceeded_by_at_most_the_requests_in_flight(client, tmp_path):
    run_dir = tmp_path / "run"
    ledger = run_dir / "t" / "old" / "old_llm_calls.jsonl"
    ledger.parent.mkdir(parents=True)
    ledger.write_text(json.dumps({"cost": 3.0, "status": "ok"}) + "\n")  # an earlier session's spend
    limit, cost, max_cost = 2, 0.5, 8.0
    jobs = {f"run/t/{n}": {"run_dir": str(run_dir), "limit": limit, "max_cost": max_cost, "cost": cost,
                           "key": f"run/t/{n}"} for n in ("a", "b", "c")}
    done = run_collecting(DatasetExecutor(client), dask_fakes.spender, jobs)
    throttle, budget = run_limits(run_dir, limit, max_cost)
    spent = budget.spent()
    assert all(record["kinds"] == ["DaskRunThrottle", "DaskRunBudget"] for _, record in done)
    sent = sum(record["sent"] for _, record in done)
    assert spent == pytest.approx(3.0 + sent * cost)  # seeded from the ledger, then counted
    assert max_cost <= spent <= max_cost + limit * cost
    assert sent >= 2  # the three datasets really competed for it


def test_back_off_and_spend_are_shared(client, tmp_path):
    first, _ = run_limits(tmp_path, 2, 1.0)
    second, budget = run_limits(tmp_path, 2, 1.0)
    assert isinstance(second, DaskRunThrottle) and isinstance(budget, DaskRunBudget)
    first.back_off(0.8)
    start = time.monotonic()
    with second.slot():
        waited = time.monotonic() - start
    assert waited >= 0.6
    run_limits(tmp_path, 2, 1.0)[1].add(0.75)  # another dataset's spend
    assert budget.spent() == pytest.approx(0.75) and not budget.exhausted()
    budget.add(0.25)
    assert budget.exhausted()
    other_run, other_budget = run_limits(tmp_path / "elsewhere", 2, 1.0)
    assert other_budget.spent() == 0.0  # each run folder has its own limits


def test_without_a_scheduler_the_file_limits_are_used(tmp_path):
    # a notebook run by hand: no Dask client in the process, no scheduler address in the environment
    code = ("import sys\n"
            "from cassia_helpers.batch.dask import run_limits\n"
            "throttle, budget = run_limits(sys.argv[1], 3, 1.0)\n"
            "print(type(throttle).__name__, type(budget).__name__, throttle.limit, budget.max_cost,\n"
            "      'distributed' in sys.modules)\n")
    env = {k: v for k, v in os.environ.items() if k != "CASSIA_DASK_SCHEDULER"}
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, check=True,
                         env=dict(env, PYTHONPATH=str(REPO)), timeout=120)
    assert out.stdout.split() == ["RunThrottle", "RunBudget", "3", "1.0", "False"]


def test_child_dies_when_its_parent_is_killed(tmp_path):
    parent_code = (
        "import subprocess, sys, time\n"
        "from cassia_helpers.batch.dask.process import die_with_parent\n"
        "kw = {'preexec_fn': die_with_parent} if sys.argv[1] == 'yes' else {}\n"
        "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'], "
        "start_new_session=True, **kw)\n"
        "print(child.pid, flush=True)\n"
        "time.sleep(60)\n")
    env = dict(os.environ, PYTHONPATH=str(REPO))
    children = {}
    # "no" first: its child is checked only after the "yes" child is seen dead, by when a signal sent to the
    # "no" child on its parent's death would have killed it too
    for mode in ("no", "yes"):
        parent = subprocess.Popen([sys.executable, "-c", parent_code, mode], stdout=subprocess.PIPE, text=True,
                                  env=env)
        children[mode] = int(parent.stdout.readline())
        parent.kill()
        parent.wait()

    def alive(pid: int) -> bool:
        try:
            return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return False

    try:
        wait_for(lambda: not alive(children["yes"]), timeout=10, what="the child of the killed parent to die")
        survivors = {mode: alive(pid) for mode, pid in children.items()}
    finally:
        for pid in children.values():
            if alive(pid):
                psutil.Process(pid).kill()
    assert survivors == {"yes": False, "no": True}
    assert die_with_parent() is None  # harmless in the calling process too


def test_importing_the_package_does_not_import_dask():
    code = ("import sys, cassia_helpers.batch.dask\n"
            "print(sorted(m for m in ('dask', 'distributed', 'dask_jobqueue') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env=dict(os.environ, PYTHONPATH=str(REPO)), cwd=REPO)
    # ``cassia_helpers/__init__`` imports anndata, which imports dask.array when dask is installed;
    # what matters here is that the distributed machinery is not loaded.
    assert "distributed" not in out.stdout and "dask_jobqueue" not in out.stdout


def test_slurm_job_script_has_the_resources_and_no_key(tmp_path, monkeypatch):
    pytest.importorskip("dask_jobqueue", reason="the [slurm] extra (dask-jobqueue) is installed in CI")
    from cassia_helpers.batch.dask.client import ClusterError
    from cassia_helpers.batch.dask.slurm import load_cluster_options, slurm_cluster

    secret = "sk-test-SLURM-0123456789abcdef"
    monkeypatch.setenv("OPENAI_API_KEY", secret)
    config = tmp_path / "slurm.yaml"
    config.write_text("queue: bigmem\naccount: lab42\nwalltime: '02:30:00'\ncores: 4\nmemory: 32GB\n"
                      "python: /shared/venv/bin/python\nprologue: ['module load gcc/12']\n"
                      "job_extra: ['--qos=normal']\n")
    options = load_cluster_options(config, {"cores": 8, "jobs": 5, "queue": None, "scheduler_host": "127.0.0.1"})
    assert options["cores"] == 8 and options["queue"] == "bigmem" and options["jobs"] == 5  # flags win, None = unset
    with slurm_cluster(options) as cluster:
        script = cluster.job_script()
    header = [line for line in script.splitlines() if line.startswith("#SBATCH")]
    assert "#SBATCH -p bigmem" in header and "#SBATCH -A lab42" in header
    assert "#SBATCH -t 02:30:00" in header and "#SBATCH --qos=normal" in header
    assert "#SBATCH --cpus-per-task=8" in header and "#SBATCH -n 1" in header
    assert any(line.startswith("#SBATCH --mem=") and line.endswith("G") for line in header)
    assert "module load gcc/12" in script
    assert "export CASSIA_DATASET_THREADS=8" in script
    assert "/shared/venv/bin/python -m distributed.cli.dask_worker tcp://127.0.0.1:" in script
    assert "--nthreads 1" in script and "--nworkers" not in script  # one dataset per job
    assert any(line.startswith("#SBATCH -J cassia-") for line in header)  # the run's name, then the slot
    assert "--preload cassia_helpers.batch.dask.plugin" in script
    assert secret not in script and "OPENAI_API_KEY" not in script

    leaky = dict(options, prologue=[f"export OPENAI_API_KEY={secret}"])
    with pytest.raises(ClusterError, match="OPENAI_API_KEY"):
        slurm_cluster(leaky)
    with pytest.raises(ClusterError, match="unknown cluster option"):
        load_cluster_options(overrides={"partition": "x"})


def test_a_slurm_job_takes_a_dataset_only_with_enough_walltime_left():
    from cassia_helpers.batch.dask.slurm_jobs import slurm_seconds, takes_a_dataset

    # squeue's time left and sbatch's walltimes, as SLURM writes them
    assert [slurm_seconds(t) for t in ("45", "9:30", "1:02:03", "2-03:04:05", "1-2", "UNLIMITED", "")] == [
        2700.0, 570.0, 3723.0, 183845.0, 93600.0, None, None]
    assert takes_a_dataset(600.0, 500.0, 3600.0)
    assert not takes_a_dataset(400.0, 500.0, 3600.0)  # it would be killed in the middle of the dataset
    assert takes_a_dataset(None, 500.0, 3600.0)  # its time left is not known yet (or unlimited)
    assert takes_a_dataset(10.0, 0.0, 3600.0)  # nothing to go by: no dataset ended yet, no --slurm-min-time-left
    assert takes_a_dataset(400.0, 5000.0, 3600.0)  # a new job would be too short as well: no point waiting


def test_slurm_memory_from_the_inputs_sizes_is_capped(tmp_path):
    from cassia_helpers.batch.dask.memory import memory_estimate, memory_for_inputs

    small, folder = tmp_path / "small.h5ad", tmp_path / "matrix"
    small.write_bytes(b"x" * 1000)
    folder.mkdir()
    for name in ("matrix.mtx.gz", "features.tsv.gz", "barcodes.tsv.gz"):  # a 10x folder counts all its files
        (folder / name).write_bytes(b"x" * 50_000_000)
    assert memory_estimate(150_000_000) == 2_500_000_000
    assert memory_for_inputs([small], cap="8GB") == "953MiB"  # 1 GB + 10 kB
    assert memory_for_inputs([small, folder], cap="8GB") == "2384MiB"  # the largest input: 1 GB + 1.5 GB
    assert memory_for_inputs([small, folder], cap="2GB") == "1907MiB"  # never above --slurm-memory


def test_a_dataset_sent_to_a_worker_that_left_before_it_started_goes_to_another(client, tmp_path):
    # With SLURM, the driver sends each dataset to one chosen worker. The list it chose from can be a second old:
    # a cancelled job's worker may be in it. The dataset must go to another worker, not wait for that one forever.
    tag = f"cassia-fake-{os.getpid()}-stranded"
    jobs = jobs_for(tmp_path, ["a", "b"], 2.0, tag)  # long enough for a wrongly raised stop to be seen
    gone = "tcp://127.0.0.1:9"  # a worker that left: nothing listens there
    offered = []

    def ready(longest_s: float, busy: set[str]) -> list[str]:
        live = sorted(client.scheduler_info()["workers"])
        offered.append(live)
        return [gone] if len(offered) == 1 else live

    done = run_collecting(DatasetExecutor(client, ready=ready), dask_fakes.sleeper, jobs)
    assert sorted(key for key, _ in done) == sorted(jobs)
    assert all(record["status"] == "success" for _, record in done), done
    for name in ("a", "b"):  # each ran once, on a live worker, to its end
        assert len((tmp_path / f"{name}.runs").read_text().splitlines()) == 1
        assert not (tmp_path / f"{name}.stopped").exists()
