"""Dataset kernels started ahead of their datasets (the fixed cost of a dataset): the next dataset's kernel
is ready while the current one runs, gives the same results as a kernel started for its dataset, serves one
dataset only, and nothing started ahead outlives the run, even one stopped with Ctrl-C."""

from __future__ import annotations

import signal
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest

from cassia_helpers.contract import DatasetPaths
from tests.conftest import BLOOD_DATASETS as DATASETS
from tests.test_reliability import keep_only, kernel_pids_under, start, status, the_run, working_dir
from tests.waiting import wait_for

pytestmark = pytest.mark.slow  # real batches


def processes_of(run: Path) -> list[int]:
    """Processes working for ``run``: kernels (in the run folder or a dataset's) and their worker processes
    (the run folder is on their command line)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        cwd = working_dir(int(entry.name))
        if state != "Z" and (str(run) in cmdline or (cwd is not None and cwd.is_relative_to(run))):
            found.append(int(entry.name))
    return found


def test_the_next_datasets_kernel_is_ready_ahead_and_gives_the_same_results(blood_dir, tmp_path):
    keep_only(blood_dir, 2)
    process = start(tmp_path, "--tissues", "blood", "--workers", "1", "--annotator", "reference")
    run = the_run(tmp_path).resolve()
    first = DatasetPaths(run, "blood", DATASETS[0])
    wait_for(first.progress_jsonl.exists, timeout=240, what=f"{DATASETS[0]}'s kernel to report a step")
    # while the first dataset runs, the second one's kernel is already up, waiting in the run folder
    waiting = wait_for(lambda: [pid for pid in kernel_pids_under(process.pid) if working_dir(pid) == run],
                       timeout=120, what="a kernel started ahead for the next dataset")
    assert (status(run, DATASETS[0]) or {}).get("status") is None
    second = DatasetPaths(run, "blood", DATASETS[1])
    wait_for(lambda: working_dir(waiting[0]) == second.folder, timeout=600,
             what="the kernel started ahead to take the next dataset")
    _, err = process.communicate(timeout=600)
    assert process.returncode == 0, err

    # the dataset that ran in it against the same notebook in a kernel started for it alone, without warm-up
    from cassia_helpers.batch.execute import NotebookKernel, execute_dataset
    from cassia_helpers.settings import Settings, notebook_parameters

    alone = tmp_path / "alone"
    mine = DatasetPaths(alone, "blood", DATASETS[1])
    mine.folder.mkdir(parents=True)
    parameters = notebook_parameters(Settings(annotator="reference"), dataset=DATASETS[1], tissue="blood",
                                     input_path=blood_dir / "blood" / f"{DATASETS[1]}.h5ad", run_dir=alone)
    record = execute_dataset(parameters, kernel=NotebookKernel("python3", mine.folder))
    assert record["status"] == "success", record["error"]
    ahead, fresh = ad.read_h5ad(second.annotated_h5ad), ad.read_h5ad(mine.annotated_h5ad)
    assert ahead.obs["leiden"].tolist() == fresh.obs["leiden"].tolist()
    assert ahead.obs["cell_type"].tolist() == fresh.obs["cell_type"].tolist()
    np.testing.assert_array_equal(ahead.obsm["X_umap"], fresh.obsm["X_umap"])
    pd.testing.assert_frame_equal(pd.read_csv(second.markers_csv), pd.read_csv(mine.markers_csv))
    # the notebook is the whole audit trail: the parameters, then every helper call, numbered from 1
    import nbformat

    cells = [c for c in nbformat.read(second.notebook, as_version=4).cells if c.cell_type == "code"]
    assert "injected-parameters" in cells[1].metadata.get("tags", [])
    assert [c.execution_count for c in cells] == list(range(1, len(cells) + 1))
    assert "import scanpy as sc" in cells[2].source
    assert any(o.get("data", {}).get("image/png") for c in cells for o in c.outputs)
    assert wait_for(lambda: not processes_of(run), timeout=30, what="the run's processes to end")


def test_ctrl_c_leaves_no_kernel_started_ahead(blood_dir, tmp_path):
    process = start(tmp_path, "--tissues", "blood", "--workers", "2", "--annotator", "reference")
    run = the_run(tmp_path).resolve()
    # two datasets running, the third one's kernel started ahead by one of them
    wait_for(DatasetPaths(run, "blood", DATASETS[0]).progress_jsonl.exists, timeout=240,
             what=f"{DATASETS[0]}'s kernel to report a step")
    wait_for(lambda: any(working_dir(pid) == run for pid in kernel_pids_under(process.pid)), timeout=120,
             what="a kernel started ahead")
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 130, err
    assert status(run, DATASETS[2])["status"] == "interrupted"
    assert wait_for(lambda: not processes_of(run), timeout=30, what="the run's processes to end")
