"""The whole path: a multi-tissue data folder → run_batch.py → a run folder that honours the contract.

Every Python and bash example of docs/batch_output_structure.md is then executed against the run, with
only the run path (and the date in it) replaced. The runs are the session's shared batch
(tests/shared_batch.py): the offline brain and breast run read here, beside the LLM runs of blood.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import anndata as ad
import nbformat
import pandas as pd
import pytest
import scanpy as sc

from cassia_helpers.dataset.cassia_format import SEURAT_MARKER_COLUMNS
from tests.conftest import REPO
from tests.shared_batch import GOOD, run_cli
from tests.synthetic import BRAIN_TYPES, BREAST_TYPES, make_counts, write

SPEC = REPO / "docs" / "batch_output_structure.md"
# what a run folder holds beyond the contract: its examples must run as printed too
ADDITIONS = REPO / "docs" / "output_additions.md"
SPEC_RUN = "run_brain_20260216_151425"
CONTRACT_FILES = ("_markers.csv", "_annotated.h5ad", "_annotation.txt", "_summary.txt")


@pytest.fixture
def workspace(shared_batch):
    return shared_batch


@pytest.mark.slow  # the first test of the file: it may be the one that builds the shared batch
def test_exit_status_and_run_folder_names(workspace):
    multi = workspace.outcome("multi")
    assert multi["returncode"] == 1, multi["stderr"]  # four broken inputs failed, the rest succeeded
    assert workspace.outcome("llm")["returncode"] == 0, workspace.outcome("llm")["stderr"]
    names = sorted(p.name for p in workspace.results.iterdir())
    assert len(names) == 3
    assert sum(bool(re.fullmatch(r"run_brain_breast_\d{8}_\d{6}", n)) for n in names) == 1
    assert sum(bool(re.fullmatch(r"run_blood_\d{8}_\d{6}", n)) for n in names) == 2  # one tissue, twice
    # the run folder is printed on stdout for scripts
    assert multi["stdout"].strip().endswith(workspace.runs()["multi"].name)


def test_contract_layout_and_summary(workspace):
    run = workspace.runs()["multi"]
    for name in ("batch_summary.txt", "batch_summary.csv", "token_tracking.json"):
        assert (run / name).is_file()
    summary = pd.read_csv(run / "batch_summary.csv")
    assert list(summary.columns) == [
        "dataset", "tissue", "file_path", "n_cells", "n_genes", "n_clusters",
        "preprocessing_time", "annotation_time", "total_time", "status", "output_dir", "error",
    ]
    statuses = {(r.tissue, r.dataset): r.status for r in summary.itertuples()}
    assert {k for k, v in statuses.items() if v == "success"} == GOOD
    failed = summary[summary["status"] == "failed"].set_index("dataset")
    assert set(failed.index) == {"Data_Text_Brain", "Data_Truncated_Breast", "Data_Empty_Breast",
                                 "Data_NoCells_Breast"}
    for dataset, row in failed.iterrows():
        assert "\n" not in row["error"] and f"{dataset}.h5ad" in row["error"]
    assert "not an HDF5" in failed.loc["Data_Text_Brain", "error"]
    assert "truncated" in failed.loc["Data_Truncated_Breast", "error"]
    assert "empty file" in failed.loc["Data_Empty_Breast", "error"]
    assert "no cells" in failed.loc["Data_NoCells_Breast", "error"]
    for tissue, dataset in GOOD:
        folder = run / tissue / dataset
        for suffix in CONTRACT_FILES:
            assert (folder / f"{dataset}{suffix}").is_file(), f"{dataset}{suffix} missing"
        assert (folder / f"{dataset}_notebook.ipynb").is_file()
        assert (folder / f"{dataset}_umap.png").stat().st_size > 1000
        row = summary[summary["dataset"] == dataset].iloc[0]
        assert row["n_clusters"] >= 2 and row["n_cells"] > 0 and row["total_time"] > 0
    # a folder a lab shares holds outputs, not empty files (a kernel log the kernel wrote nothing to)
    # (the hidden lock files that keep a second run out of the folder are empty by nature)
    empty = [p for p in run.rglob("*") if p.is_file() and p.stat().st_size == 0 and not p.name.startswith(".")]
    assert not empty
    # inputs whose header is broken are rejected by the driver before any kernel starts for them
    for tissue, dataset in [("brain", "Data_Text_Brain"), ("breast", "Data_NoCells_Breast")]:
        status = json.loads((run / tissue / dataset / f"{dataset}_status.json").read_text())
        assert status["error_type"] == "InputError" and status["duration_s"] < 1
        assert not (run / tissue / dataset / f"{dataset}_notebook.ipynb").exists()
    text = (run / "batch_summary.txt").read_text()
    assert "Total cost: $0.00" in text
    assert "no API calls were made" in text
    assert "Succeeded: 3" in text and "Failed: 4" in text
    assert "Data_Text_Brain" in text and "not an HDF5" in text


def test_annotated_h5ad_and_markers(workspace):
    run = workspace.runs()["multi"]
    folder = run / "brain" / "Data_Filbin2018_Brain"
    adata = ad.read_h5ad(folder / "Data_Filbin2018_Brain_annotated.h5ad")
    assert {"leiden", "cell_type", "truth"} <= set(adata.obs.columns)
    assert isinstance(adata.obs["cell_type"].dtype, pd.CategoricalDtype)
    assert adata.obs["cell_type"].notna().all()
    assert {"X_pca", "X_umap"} <= set(adata.obsm)
    assert "counts" in adata.layers and float(adata.layers["counts"].sum()) > 0
    # each true type's cells get the matching label from the offline reference
    expected = {"Astrocyte": "astrocyte", "Oligodendrocyte": "oligodendrocyte", "Microglia": "microglia"}
    for truth, word in expected.items():
        called = adata.obs.loc[adata.obs["truth"] == truth, "cell_type"].value_counts().index[0]
        assert word in called.lower(), (truth, called)
    markers = pd.read_csv(folder / "Data_Filbin2018_Brain_markers.csv")
    assert list(markers.columns) == SEURAT_MARKER_COLUMNS  # what CASSIA's and Seurat users' tools read
    # scanpy's own layout is kept, so its marker plots work on the written file
    ranked = sc.get.rank_genes_groups_df(adata, group=None)
    assert set(ranked["group"].astype(str)) == set(adata.obs["leiden"].astype(str))
    # every call carries its Cell Ontology term and its marker evidence
    for column in ("cell_type_ontology_term_id", "cell_type_ontology_term", "cell_type_lineage",
                   "marker_evidence_score", "marker_evidence_flag", "cell_type_score"):
        assert column in adata.obs, column
    astrocytes = adata.obs.loc[adata.obs["truth"] == "Astrocyte", "cell_type_ontology_term_id"]
    assert astrocytes.value_counts().index[0] == "CL:0000127"
    assert adata.uns["cell_type_colors"] is not None
    assert not markers.duplicated(["cluster", "gene"]).any()
    assert set(markers["cluster"].astype(str)) == set(adata.obs["leiden"].astype(str))
    annotation = (folder / "Data_Filbin2018_Brain_annotation.txt").read_text()
    for cluster in adata.obs["leiden"].cat.categories:
        assert f"Cluster {cluster}:" in annotation
    # every gene the annotator saw has its statistics in the markers file (for a reader, and CASSIA's boost)
    rows = set(zip(markers["cluster"].astype(str), markers["gene"].astype(str), strict=True))
    sent = sent_per_cluster(annotation)
    assert set(sent) == set(adata.obs["leiden"].cat.categories) and any(sent.values())
    for cluster, genes in sent.items():
        assert not [g for g in genes if (cluster, g) not in rows], cluster
    summary = (folder / "Data_Filbin2018_Brain_summary.txt").read_text()
    assert "before QC: 400 cells" in summary and "resolution = 1.0" in summary and "min_genes = 200" in summary


def sent_per_cluster(annotation: str) -> dict[str, list[str]]:
    """The genes sent to the annotator per cluster, as the annotation text lists them."""
    sent, cluster = {}, None
    for line in annotation.splitlines():
        if header := re.match(r"Cluster (.+?): ", line):
            cluster = header.group(1)
        elif listed := re.match(r"Markers sent \(\d+\): (.*)", line):
            sent[cluster] = [] if listed.group(1) == "-" else listed.group(1).split(", ")
    return sent


def test_executed_notebook_records_parameters_and_no_key(workspace):
    run = workspace.runs()["multi"]
    notebook = nbformat.read(run / "breast" / "Data_Bassez2021_Breast" / "Data_Bassez2021_Breast_notebook.ipynb",
                             as_version=4)
    parameters = notebook.metadata["papermill"]["parameters"]
    # the injected cell holds the dataset and what differs from the template's defaults, which stay visible
    assert parameters["tissue"] == "breast" and parameters["annotator"] == "reference"
    assert "min_genes" not in parameters and "min_genes = 200" in notebook.cells[1].source
    assert not any("key" in name.lower() for name in parameters)
    tracking = json.loads((run / "token_tracking.json").read_text())
    assert tracking["total_calls"] == 0 and tracking["api_calls"] == [] and tracking["total_cost"] == 0


def spec_blocks(language: str, doc: Path = SPEC) -> list[str]:
    blocks = re.findall(rf"^( *)```{language}\n(.*?)^ *```", doc.read_text(), flags=re.DOTALL | re.MULTILINE)
    return [textwrap.dedent(code) for _, code in blocks]


def localise(code: str, run: Path) -> str:
    """Point the spec's example run at ours: the run name and its date are the only changes."""
    stamp = re.search(r"(\d{8})_(\d{6})$", run.name)
    code = code.replace(SPEC_RUN, run.name).replace("run_20260216_151425", run.name)
    return code.replace("20260216", stamp.group(1))


def test_spec_python_examples_run_verbatim(workspace):
    run = workspace.runs()["multi"]
    blocks = spec_blocks("python")
    assert len(blocks) >= 4
    blocks += spec_blocks("python", ADDITIONS)
    program = "\n".join(localise(block, run) for block in blocks)
    result = subprocess.run([sys.executable, "-c", program], cwd=workspace.root, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr
    assert "Processed 7 datasets" in result.stdout
    assert "Total API calls: 0" in result.stdout and "Total cost: $0.00" in result.stdout
    assert re.search(r"Combined: [\d,]+ cells from 3 datasets", result.stdout)
    assert "Data_Text_Brain" in result.stdout  # the failures example lists the broken input


def test_spec_bash_examples_run_verbatim(workspace, tmp_path):
    # the examples write (notes, archives): they run on a copy of the shared runs
    shutil.copytree(workspace.results, tmp_path / "batch_results", symlinks=True)
    runs = {name: tmp_path / "batch_results" / run.name for name, run in workspace.runs().items()}
    for block in spec_blocks("bash"):
        if "batch_process_all_tissues.py" in block:
            continue  # exercised on its own below
        script = localise(block, runs["multi"])
        result = subprocess.run(["bash", "-e", "-c", script], cwd=tmp_path, capture_output=True, text=True,
                                timeout=120)
        assert result.returncode == 0, (block, result.stderr)
        if "Total cost:" in block:  # one line per run, each from its own summary
            costs = dict(re.findall(r"=== batch_results/(run_[^/]+)/ ===\n\s*Total cost: \$([\d,.]+)\n",
                                    result.stdout))
            assert set(costs) == {run.name for run in runs.values()}, result.stdout
            assert costs[runs["multi"].name] == costs[runs["llm_rerun"].name] == "0.00"
    assert (runs["multi"] / "NOTES.txt").read_text().startswith("Testing resolution=0.8")


@pytest.mark.slow
def test_spec_all_tissues_script(tmp_path):
    # a small data folder of its own: one good dataset in each of two tissues
    write(make_counts(200, cell_types=BRAIN_TYPES, seed=4), tmp_path / "data" / "brain" / "Data_Small_Brain.h5ad")
    write(make_counts(200, cell_types=BREAST_TYPES, seed=5), tmp_path / "data" / "breast" / "Data_Small_Breast.h5ad")
    (block,) = [b for b in spec_blocks("bash") if "batch_process_all_tissues.py" in b]
    command = block.strip().splitlines()[-1].split()
    assert command[:2] == ["python", "batch_process_all_tissues.py"]
    result = run_cli([*command[2:], "--workers", "2"], cwd=tmp_path, script="batch_process_all_tissues.py")
    assert result.returncode == 0, result.stderr
    (run,) = (tmp_path / "batch_results_pilot_study").iterdir()
    assert re.fullmatch(r"run_all_\d{8}_\d{6}", run.name)
    summary = pd.read_csv(run / "batch_summary.csv")
    assert set(summary["tissue"]) == {"brain", "breast"} and set(summary["status"]) == {"success"}


@pytest.mark.slow
def test_explore_notebook_opens_the_run(workspace, tmp_path):
    import papermill as pm

    run = workspace.runs()["multi"]
    output = tmp_path / "explored.ipynb"
    pm.execute_notebook(str(REPO / "notebooks" / "explore_run.ipynb"), str(output), parameters={"run_dir": str(run)},
                        kernel_name="python3", progress_bar=False, cwd=str(REPO / "notebooks"))
    notebook = nbformat.read(output, as_version=4)
    text = json.dumps([c.get("outputs", []) for c in notebook.cells])
    assert "Data_Filbin2018_Brain" in text and "Data_Text_Brain" in text
    # the first successful dataset is opened and plotted (UMAP, violins, dot plot)
    for fragment in ("sc.pl.umap", "sc.pl.violin", "figures.dotplot_figure"):
        (cell,) = [c for c in notebook.cells if c.cell_type == "code" and c.source.startswith(fragment)]
        assert any("image/png" in out.get("data", {}) for out in cell.outputs), fragment
