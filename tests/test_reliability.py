"""What a long batch meets: a killed kernel, a dataset timeout, an input rejected until it changes, a full
disk. Real signals to real subprocesses (Ctrl-C and resume, and the LLM side, are in test_llm_reliability.py;
the helpers here are shared with it)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from cassia_helpers.contract import DatasetPaths
from tests.conftest import BLOOD_DATASETS as DATASETS
from tests.conftest import REPO
from tests.synthetic import BLOOD_TYPES, make_counts, write
from tests.waiting import wait_for

pytestmark = pytest.mark.slow  # real batches: every test here starts run_batch.py

def keep_only(data: Path, count: int) -> None:
    for name in DATASETS[count:]:
        (data / "blood" / f"{name}.h5ad").unlink()


def start(tmp_path: Path, *args: str, offline: bool = True) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    if offline:
        env.pop("OPENAI_API_KEY", None)
        env.pop("OPENAI_BASE_URL", None)
    return subprocess.Popen(
        [sys.executable, str(REPO / "run_batch.py"), "--data-dir", str(tmp_path / "data"),
         "--output-dir", str(tmp_path / "out"), *args],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )


def status(run: Path, dataset: str) -> dict | None:
    try:
        return json.loads((run / "blood" / dataset / f"{dataset}_status.json").read_text())
    except (OSError, ValueError):
        return None


def the_run(tmp_path: Path) -> Path:
    return wait_for(lambda: next(iter((tmp_path / "out").glob("run_*")), None) if (tmp_path / "out").exists()
                    else None, timeout=240, what="the run folder")


def interrupt_after_first_dataset(tmp_path: Path, *args: str, offline: bool = True) -> Path:
    process = start(tmp_path, "--tissues", "blood", *args, offline=offline)
    run = the_run(tmp_path)
    wait_for(lambda: (status(run, DATASETS[0]) or {}).get("status") == "success", timeout=240,
             what=f"{DATASETS[0]} to succeed")
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 130, err
    assert f"--resume {run}" in err
    return run


def resume(tmp_path: Path, run: Path, *args: str, offline: bool = True) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    if offline:
        env.pop("OPENAI_API_KEY", None)
        env.pop("OPENAI_BASE_URL", None)
    return subprocess.run([sys.executable, str(REPO / "run_batch.py"), "--resume", str(run), *args], env=env,
                          capture_output=True, text=True, timeout=600)


def kernel_pids_under(pid: int) -> list[int]:
    parents = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
                cmdline = (entry / "cmdline").read_bytes()
            except OSError:
                continue
            parents[int(entry.name)] = (int(stat.rsplit(")", 1)[1].split()[1]), b"ipykernel" in cmdline)

    def descends(child: int) -> bool:
        while child in parents and child != pid:
            child = parents[child][0]
        return child == pid

    return [p for p, (_, kernel) in parents.items() if kernel and descends(p)]


def test_a_killed_kernel_fails_its_dataset_only(blood_dir, tmp_path):
    keep_only(blood_dir, 2)  # one dataset whose kernel is killed, one that must not notice
    process = start(tmp_path, "--tissues", "blood")
    run = the_run(tmp_path)
    # the kernel is inside the notebook once it has reported its first step (datasets run one at a time)
    wait_for(DatasetPaths(run, "blood", DATASETS[0]).progress_jsonl.exists, timeout=240,
             what=f"{DATASETS[0]}'s kernel to report a step")
    kernels = wait_for(lambda: kernel_pids_under(process.pid), timeout=60, what="the kernel process")
    os.kill(kernels[0], signal.SIGKILL)
    _, err = process.communicate(timeout=400)
    assert process.returncode == 1, err
    summary = pd.read_csv(run / "batch_summary.csv").set_index("dataset")
    assert summary.loc[DATASETS[0], "status"] == "failed"
    assert "kernel died" in summary.loc[DATASETS[0], "error"]
    assert status(run, DATASETS[0])["error_type"] == "DeadKernelError"
    assert summary.loc[DATASETS[1], "status"] == "success"
    assert not (run / "blood" / DATASETS[0] / f"{DATASETS[0]}_result.json").exists()


def test_dataset_timeout(blood_dir, tmp_path):
    keep_only(blood_dir, 1)
    process = start(tmp_path, "--tissues", "blood", "--dataset-timeout", "2")
    _, err = process.communicate(timeout=120)
    assert process.returncode == 1, err
    summary = pd.read_csv(the_run(tmp_path) / "batch_summary.csv")
    assert summary.loc[0, "status"] == "failed" and "timed out after 2 s" in summary.loc[0, "error"]


def test_resume_leaves_a_rejected_input_alone_until_the_file_changes(blood_dir, tmp_path):
    keep_only(blood_dir, 0)  # the rejected input alone: no kernel runs until it is replaced
    broken = blood_dir / "blood" / "Data_Z_Blood.h5ad"
    broken.write_text("not an h5ad\n")
    first = subprocess.run([sys.executable, str(REPO / "run_batch.py"), "--data-dir", str(blood_dir),
                            "--output-dir", str(tmp_path / "out"), "--tissues", "blood", "--annotator", "reference"],
                           env=dict(os.environ, PYTHONPATH=str(REPO)), capture_output=True, text=True, timeout=600)
    assert first.returncode == 1, first.stderr
    run = Path(first.stdout.strip())
    rejected = status(run, "Data_Z_Blood")
    assert rejected["status"] == "failed" and rejected["error_type"] == "InputError"

    again = resume(tmp_path, run)
    assert again.returncode == 1
    assert f"Not re-run (input unchanged since it was rejected): {broken}" in again.stderr
    assert status(run, "Data_Z_Blood")["finished_at"] == rejected["finished_at"]  # no worker ran for it
    assert "Data_Z_Blood" in pd.read_csv(run / "batch_summary.csv")["dataset"].tolist()

    write(make_counts(300, cell_types=BLOOD_TYPES, seed=29), broken)  # the user replaces the file
    fixed = resume(tmp_path, run)
    assert fixed.returncode == 0, fixed.stderr
    assert status(run, "Data_Z_Blood")["status"] == "success"


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("unshare"),
                    reason="a small full filesystem is mounted in a private mount namespace: needs root and unshare "
                    "(both in CI)")
def test_a_full_disk_fails_the_dataset_and_never_crashes_the_driver(blood_dir, tmp_path):
    keep_only(blood_dir, 1)
    out = tmp_path / "small"
    out.mkdir()
    # 1 MiB holds the run's small records but not the dataset's h5ad and figures
    script = ('mount -t tmpfs -o size=1m tmpfs "$0" && "$1" "$2" --data-dir "$3" --tissues blood --output-dir "$0" '
              '> "$0/../stdout" 2> "$0/../stderr"; echo "exit=$?" > "$0/../code"; '
              'cat "$0"/run_*/batch_summary.csv > "$0/../summary.csv" 2>/dev/null; true')
    subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c", script, str(out),
                    sys.executable, str(REPO / "run_batch.py"), str(blood_dir)],
                   env=dict(os.environ, PYTHONPATH=str(REPO)), timeout=600, check=True)
    err = (tmp_path / "stderr").read_text()
    assert (tmp_path / "code").read_text().strip() == "exit=1", err
    assert "Traceback" not in err
    assert "failed" in err and "No space left on device" in err
