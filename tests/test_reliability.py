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
import time
from pathlib import Path

import anndata as ad
import h5py
import numpy as np
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


def working_dir(pid: int) -> Path | None:
    try:
        return Path(os.readlink(f"/proc/{pid}/cwd"))
    except OSError:
        return None


def test_a_second_ctrl_c_stops_at_once_and_tells_the_running_dataset_from_the_queued_one(blood_dir, tmp_path):
    from cassia_helpers.contract import NOT_STARTED

    keep_only(blood_dir, 2)
    process = start(tmp_path, "--tissues", "blood")
    run = the_run(tmp_path)
    wait_for(DatasetPaths(run, "blood", DATASETS[0]).progress_jsonl.exists, timeout=240,
             what=f"{DATASETS[0]}'s kernel to report a step")
    process.send_signal(signal.SIGINT)
    time.sleep(0.5)  # a user's second press (two signals at once would arrive as one)
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 130, err
    assert "Stopped at once. Resume with: python run_batch.py --resume" in err
    running, queued = status(run, DATASETS[0]), status(run, DATASETS[1])
    assert running["status"] == queued["status"] == "interrupted"
    assert running["error"] != NOT_STARTED and queued["error"] == NOT_STARTED


def test_a_killed_kernel_fails_its_dataset_only(blood_dir, tmp_path):
    keep_only(blood_dir, 2)  # one dataset whose kernel is killed, one that must not notice
    process = start(tmp_path, "--tissues", "blood")
    run = the_run(tmp_path)
    # the kernel is inside the notebook once it has reported its first step (datasets run one at a time)
    wait_for(DatasetPaths(run, "blood", DATASETS[0]).progress_jsonl.exists, timeout=240,
             what=f"{DATASETS[0]}'s kernel to report a step")
    # the next dataset's kernel may be running too (started ahead): kill the one in the first dataset's folder
    folder = DatasetPaths(run, "blood", DATASETS[0]).folder.resolve()
    kernels = wait_for(lambda: [pid for pid in kernel_pids_under(process.pid) if working_dir(pid) == folder],
                       timeout=60, what="the kernel process")
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
    # a write the timeout cuts short leaves a temporary file: the driver removes it with the failure
    folder = wait_for(lambda: next(iter((tmp_path / "out").glob(f"run_*/blood/{DATASETS[0]}")), None)
                      if (tmp_path / "out").exists() else None, timeout=60, what="the dataset folder")
    leftover = folder / f".{DATASETS[0]}_annotated.h5ad.x7q2.tmp"
    leftover.write_bytes(b"\0" * 4096)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 1, err
    summary = pd.read_csv(the_run(tmp_path) / "batch_summary.csv")
    assert summary.loc[0, "status"] == "failed" and "timed out after 2 s" in summary.loc[0, "error"]
    assert not leftover.exists()


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
              'cat "$0"/run_*/batch_summary.csv > "$0/../summary.csv" 2>/dev/null; '
              'find "$0" -name ".*.tmp" > "$0/../leftovers"; true')
    subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c", script, str(out),
                    sys.executable, str(REPO / "run_batch.py"), str(blood_dir)],
                   env=dict(os.environ, PYTHONPATH=str(REPO)), timeout=600, check=True)
    err = (tmp_path / "stderr").read_text()
    assert (tmp_path / "code").read_text().strip() == "exit=1", err
    assert "Traceback" not in err
    assert "failed" in err and "No space left on device" in err
    assert (tmp_path / "leftovers").read_text() == ""  # no temporary file fills the disk for the next dataset


def _cellxgene_like(seed: int):
    """An input carrying its author's annotations under the names a run writes (as CELLxGENE files do)."""
    adata = make_counts(300, cell_types=BLOOD_TYPES, seed=seed)
    adata.obs["cell_type"] = adata.obs["truth"].astype(str).str.upper()
    adata.obs["cell_type_ontology_term_id"] = "CL:0000000"
    adata.obs["leiden"] = pd.Categorical([str(i % 4) for i in range(adata.n_obs)])
    adata.obsm["X_umap"] = np.arange(2 * adata.n_obs, dtype=np.float32).reshape(-1, 2)
    return adata


def test_author_annotations_kept_odd_names_and_a_resume_that_checks_the_files(tmp_path):
    """One LLM run and its resume: the input's own annotations survive under author_, a dataset named -rf reads
    back as -rf, a file name with a newline is skipped on one line, a corrupt matrix fails on one line, a
    140 KB --context-file reaches the model, and --resume re-runs a 'success' whose h5ad was deleted (old files
    set aside, the summary says why) and removes a left-over temporary file."""
    from cassia_helpers.dataset.author import written_by_run
    from tests.conftest import API_KEY
    from tests.scripted_llm_server import ScriptedLLMServer

    blood = tmp_path / "data" / "blood"
    author = _cellxgene_like(31)
    write(author, blood / "-rf.h5ad")
    corrupt = write(make_counts(200, cell_types=BLOOD_TYPES, seed=32), blood / "Data_Corrupt_Blood.h5ad")
    with h5py.File(corrupt, "r+") as handle:
        indices = handle["X/indices"][:]
        indices[11] = 10**7
        handle["X/indices"][:] = indices
    (blood / "bad\nname.h5ad").write_bytes((blood / "-rf.h5ad").read_bytes())
    context = tmp_path / "context.txt"
    context.write_text("CONTEXT-SENTINEL peripheral blood of a healthy donor. " * 2600)  # ~140 KB
    with ScriptedLLMServer(expected_api_key=API_KEY) as server:
        env = dict(os.environ, PYTHONPATH=str(REPO), OPENAI_API_KEY=API_KEY, OPENAI_BASE_URL=server.base_url)
        first = subprocess.run(
            [sys.executable, str(REPO / "run_batch.py"), "--data-dir", str(tmp_path / "data"), "--tissues", "blood",
             "--output-dir", str(tmp_path / "out"), "--model", "scripted-model", "--pipeline", "fast",
             "--cache-dir", str(tmp_path / "cache"), "--context-file", str(context)],
            env=env, capture_output=True, text=True, timeout=600)
        assert first.returncode == 1, first.stderr  # the corrupt input failed, the rest succeeded
        run = Path(first.stdout.strip())
        assert "Traceback" not in first.stderr and "IndexError" not in first.stderr
        lines = [x for x in first.stderr.splitlines() if "corrupt sparse matrix" in x]
        assert lines and all("Data_Corrupt_Blood.h5ad: corrupt sparse matrix in X: index 10000000 outside" in x
                             for x in lines)
        assert "bad\\nname.h5ad" in first.stderr and "bad\nname" not in first.stderr  # skipped, on one line
        prompts = [json.dumps(r.get("messages", "")) for r in server.received]
        assert prompts and all("CONTEXT-SENTINEL" in p for p in prompts if '"role": "user"' in p)
        assert max(map(len, prompts)) > 140_000  # more than one command-line argument may hold

        summary = pd.read_csv(run / "batch_summary.csv").set_index("dataset")
        assert summary.loc["-rf", "status"] == "success" and "'-rf" not in summary.index
        assert summary.loc["Data_Corrupt_Blood", "status"] == "failed"
        paths = DatasetPaths(run, "blood", "-rf")
        out = ad.read_h5ad(paths.annotated_h5ad)
        kept = author.obs.loc[out.obs_names]
        assert out.obs["author_cell_type"].astype(str).tolist() == kept["cell_type"].tolist()
        assert out.obs["author_leiden"].astype(str).tolist() == kept["leiden"].astype(str).tolist()
        assert set(out.obs["author_cell_type_ontology_term_id"]) == {"CL:0000000"}
        assert np.array_equal(out.obsm["author_X_umap"], author[out.obs_names].obsm["X_umap"])
        assert "cell_type" in out.obs and "X_umap" in out.obsm  # the run's own calls beside the author's
        for slot in ("obs", "var", "obsm", "varm", "obsp", "uns"):  # RUN_WRITES declares every name it adds
            added = set(getattr(out, slot).keys()) - set(getattr(author, slot).keys()) - {"cassia_batch"}
            assert {n for n in added if not n.startswith("author_") and not written_by_run(slot, n)} == set(), slot
        summary_txt = paths.summary_txt.read_text()
        assert "Warnings (0)" not in summary_txt and "cell_type -> author_cell_type" in summary_txt

        paths.annotated_h5ad.unlink()  # a user deletes a finished dataset's h5ad ...
        leftover = paths.folder / f".{paths.annotated_h5ad.name}.k3j9.tmp"
        leftover.write_bytes(b"\0" * 4096)  # ... and a write cut short left its temporary file
        old_result = paths.result_json.read_text()
        again = subprocess.run(
            [sys.executable, str(REPO / "run_batch.py"), "--resume", str(run)], env=env, capture_output=True,
            text=True, timeout=600)
    assert again.returncode == 1, again.stderr  # the corrupt input is still rejected
    assert status(run, "-rf")["status"] == "success" and paths.annotated_h5ad.is_file()
    assert not leftover.exists()
    [aside] = list((paths.folder / "superseded").iterdir())
    assert (aside / "-rf_result.json").read_text() == old_result  # set aside, not deleted
    assert f"missing {paths.annotated_h5ad.name}" in (aside / "REASON.txt").read_text()
    assert f"blood/-rf runs again: recorded success but missing {paths.annotated_h5ad.name}" in again.stderr
    text = (run / "batch_summary.txt").read_text()
    assert "Re-run on resume" in text and f"blood/-rf: recorded success but missing {paths.annotated_h5ad.name}" in text
