"""``--manifest datasets.csv``: heterogeneous datasets in one run, each with its own tissue, species, context,
clusters and author labels."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from tests.synthetic import make_counts, write

REPO = Path(__file__).resolve().parents[1]


def run_batch_py(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if k not in ("OPENAI_API_KEY", "OPENAI_BASE_URL")}
    return subprocess.run([sys.executable, str(REPO / "run_batch.py"), *args],
                          env={**base, "PYTHONPATH": str(REPO), **(env or {})}, capture_output=True, text=True,
                          timeout=900)


def manifest(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "lab" / "datasets.csv"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


@pytest.fixture
def inputs(tmp_path) -> Path:
    write(make_counts(120), tmp_path / "lab" / "h5" / "pbmc.h5ad")
    write(make_counts(120, mouse=True, seed=1), tmp_path / "lab" / "h5" / "mouse_pbmc.h5ad")
    return tmp_path / "lab" / "h5"


def test_rows_are_read_with_paths_relative_to_the_manifest_and_per_dataset_settings(tmp_path, inputs):
    from cassia_helpers.batch.manifest import dataset_settings, read_manifest_csv
    from cassia_helpers.settings import Settings

    # as a spreadsheet saves it: unnamed empty columns, trailing commas, a row left empty
    path = manifest(tmp_path, "path,tissue,species,context,dataset,,\n"
                              "h5/../h5/./pbmc.h5ad,blood,,,,,\n"
                              f"{inputs / 'mouse_pbmc.h5ad'},blood,mouse,\"aged, treated\",mouse,,,,\n,,,,,,\n")
    found = read_manifest_csv(path).datasets
    assert [(d.tissue, d.name, d.path) for d in found] == [  # paths as text that does not depend on the folder
        ("blood", "pbmc", inputs / "pbmc.h5ad"), ("blood", "mouse", inputs / "mouse_pbmc.h5ad")]
    run = Settings(species="human", context_file=str(tmp_path / "ctx.txt"))
    assert dataset_settings(run, found[0]) == run  # empty cells: the run-wide values
    mouse = dataset_settings(run, found[1])
    assert (mouse.species, mouse.context, mouse.context_file) == ("mouse", "aged, treated", "")


@pytest.mark.parametrize("text, phrases", [
    ("path,tissue,organ\nh5/pbmc.h5ad,blood,x\n", ["unknown column(s) 'organ'", "the columns are path, tissue"]),
    ("path,species\nh5/pbmc.h5ad,human\n", ["missing column(s) tissue"]),
    ("path,tissue\nh5/nope.h5ad,blood\n", ["line 2", "input file h5/nope.h5ad not found"]),
    ("path,tissue,species\nh5/pbmc.h5ad,blood,zebrafish\n", ["line 2", "column species", "'zebrafish' is not one"]),
    ("path,tissue\nh5/pbmc.h5ad,blood\nh5/pbmc.h5ad,blood\n", ["line 3", "blood/pbmc is already on line 2"]),
    ("path,tissue,dataset\nh5/pbmc.h5ad,blood,a\nh5/mouse_pbmc.h5ad,blood,A\n", ["line 3", "already on line 2"]),
    ("path,tissue,dataset\nh5/pbmc.h5ad,blood,a\nh5/mouse_pbmc.h5ad,Blood,A\n", ["line 3", "already on line 2"]),
    ("path,tissue\nh5/pbmc.h5ad,../../escaped\n", ["line 2", "tissue '../../escaped' is a name that is not"]),
    ("path,tissue,dataset\nh5/pbmc.h5ad,blood,../x\n", ["line 2", "dataset name '../x' is"]),
    ("path,tissue,dataset\nh5/pbmc.h5ad,blood,\"two\nlines\"\n", ["dataset name 'two\\nlines'", "control"]),
    ("path,tissue\n", ["lists no dataset"]),
    ("path,tissue,\nh5/pbmc.h5ad,blood,human\n", ["line 2", "more values than named columns"]),
])
def test_a_bad_manifest_is_a_one_line_usage_error_before_anything_runs(tmp_path, inputs, text, phrases):
    path = manifest(tmp_path, text)
    result = run_batch_py("--manifest", str(path), "--output-dir", str(tmp_path / "out"), "--annotator", "reference")
    assert result.returncode == 2, result.stderr
    [line] = result.stderr.strip().splitlines()
    assert line.startswith(f"run_batch.py: error: {path}")
    for phrase in phrases:
        assert phrase in line
    assert not (tmp_path / "out").exists() and not list(tmp_path.rglob("escaped"))


def test_manifest_with_tissues_is_a_usage_error(tmp_path, inputs):
    path = manifest(tmp_path, "path,tissue\nh5/pbmc.h5ad,blood\n")
    result = run_batch_py("--manifest", str(path), "--tissues", "blood", "--annotator", "reference")
    assert result.returncode == 2 and "without --tissues or --input" in result.stderr


def test_dry_run_lists_the_manifest_rows_with_their_own_context(tmp_path, inputs):
    path = manifest(tmp_path, "path,tissue,context,label_key,dataset\nh5/pbmc.h5ad,blood,,,short\n"
                              f"h5/pbmc.h5ad,blood,{'x' * 40_000},,long\nh5/pbmc.h5ad,blood,,celltype,typo\n")
    env = {"OPENAI_BASE_URL": "http://127.0.0.1:9/v1"}  # nothing is sent by a dry run
    result = run_batch_py("--manifest", str(path), "--dry-run", "--annotator", "llm", "--pipeline", "fast",
                          "--output-dir", str(tmp_path / "out"), env=env)
    # a label_key the input does not have is found now, not after the dataset's whole run
    assert result.returncode == 1 and "typo" in result.stdout and "cannot run" in result.stdout
    assert "label_key 'celltype' is not a column of the input's obs (its columns: truth)" in result.stdout
    rows = {line.split()[1]: line for line in result.stdout.splitlines() if line.startswith("blood ")}
    assert set(rows) == {"short", "long", "typo"}

    def low_tokens(row: str) -> int:
        return int(row.split()[-1].split("-")[0].replace(",", ""))

    # the long row's context (10,000 tokens) rides in each of its clusters' three calls; the short row has none
    assert low_tokens(rows["long"]) - low_tokens(rows["short"]) >= 3 * 10_000
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------- a lab's own heterogeneous datasets

AUTHOR = {"T cell": "T cell", "B cell": "lymphocyte", "Monocyte": "macrophage"}
CLUSTERS = {"T cell": "lab_T", "B cell": "lab_B", "Monocyte": "lab_M"}


def labelled_dataset(path: Path) -> list[str]:
    """Blood cells on the lab's own clusters with author labels whose scores are known: T cell (exact), lymphocyte
    for the B cells (partial: B cell -> lymphocyte of B lineage -> lymphocyte, 2 steps), macrophage for the
    monocytes (same myeloid lineage), 12 T cells labelled hepatocyte (wrong), 10 monocytes 'Mystery blob'
    (unmapped); 5 B cells with too few genes for QC; the lab's own UMAP."""
    import numpy as np

    adata = make_counts(300, seed=3)
    truth = adata.obs["truth"].astype(str)
    author = truth.map(AUTHOR).to_numpy(dtype=object)
    t_cells, monocytes, b_cells = (np.flatnonzero(truth.to_numpy() == t) for t in ("T cell", "Monocyte", "B cell"))
    author[t_cells[:12]] = "hepatocyte"
    author[monocytes[:10]] = "Mystery blob"
    adata.obs["lab_label"] = author
    adata.obs["lab_cluster"] = truth.map(CLUSTERS).astype("category")
    x = adata.X.tolil()
    for cell in b_cells[:5]:  # 50 genes: below --min-genes 200
        row = x[cell].toarray().ravel()
        row[np.flatnonzero(row)[50:]] = 0
        x[cell] = row
    adata.X = x.tocsr()
    adata.obsm["X_umap"] = np.column_stack([np.arange(adata.n_obs), -np.arange(adata.n_obs)]).astype(np.float32)
    write(adata, path)
    return list(adata.obs_names[b_cells[:5]])


NK = {"NK cell": ["NKG7", "GNLY", "PRF1", "GZMB", "KLRD1", "KLRF1"]}


def test_a_manifest_of_two_species_one_on_its_own_clusters_is_annotated_and_scored(tmp_path):
    """Human blood on the lab's own clusters with its labels; mouse spleen cells of two donors with a known donor
    effect, run with batch_key and without (NK cells in one donor only); a row whose batch_key the input lacks."""
    import json

    import anndata as ad
    import nbformat
    from sklearn.metrics import adjusted_rand_score

    from tests.synthetic import BLOOD_TYPES, make_donors

    damaged = labelled_dataset(tmp_path / "lab" / "h5" / "blood_lab.h5ad")
    donors = make_donors(300, cell_types={**BLOOD_TYPES, **NK}, only_in={"NK cell": "donor_B"}, seed=4, mouse=True)
    write(donors, tmp_path / "lab" / "h5" / "mouse.h5ad")
    path = manifest(tmp_path, "path,tissue,species,context,cluster_key,label_key,batch_key,dataset\n"
                              "h5/blood_lab.h5ad,blood,human,,lab_cluster,lab_label,,lab\n"
                              "h5/mouse.h5ad,spleen,mouse,aged mice,,truth,donor,\n"
                              "h5/mouse.h5ad,spleen,mouse,aged mice,,truth,,mouse_unintegrated\n"
                              "h5/mouse.h5ad,spleen,mouse,,,,patient,no_such_key\n")
    common = ("--manifest", str(path), "--annotator", "reference", "--output-dir", str(tmp_path / "out"))

    dry = run_batch_py(*common, "--dry-run")
    assert dry.returncode == 1, dry.stderr  # the row whose batch_key the input lacks is found before any run
    assert "mouse.h5ad: batch_key 'patient' is not a column of the input's obs (its columns: truth, donor)" \
        in dry.stdout
    assert [line.split()[:2] for line in dry.stdout.splitlines() if line.startswith(("blood ", "spleen "))] == [
        ["blood", "lab"], ["spleen", "mouse"], ["spleen", "mouse_unintegrated"], ["spleen", "no_such_key"]]
    lab_row = next(line for line in dry.stdout.splitlines() if line.startswith("blood "))
    assert " 3-3 " in lab_row  # the lab's own three clusters, counted, not guessed from the cells
    assert not (tmp_path / "out").exists()

    result = run_batch_py(*common, "--quiet")
    assert result.returncode == 1, result.stderr  # one dataset failed, the others ran
    run = Path(result.stdout.strip().splitlines()[-1])
    assert run.name.startswith("run_blood_spleen_")
    assert (run / "datasets.csv").read_text() == path.read_text()

    # per-dataset settings reached each notebook
    def parameters(tissue: str, name: str) -> dict:
        return nbformat.read(run / tissue / name / f"{name}_notebook.ipynb", as_version=4).metadata["papermill"][
            "parameters"]

    lab, mouse = parameters("blood", "lab"), parameters("spleen", "mouse")
    assert (lab["cluster_key"], lab["label_key"]) == ("lab_cluster", "lab_label") and "species" not in lab
    assert (mouse["species"], mouse["context"]) == ("mouse", "aged mice") and "cluster_key" not in mouse
    assert mouse["batch_key"] == "donor" and "batch_key" not in parameters("spleen", "mouse_unintegrated")

    # the lab's clusters were kept; QC's removals are reported per cluster; the lab's UMAP reused
    source = ad.read_h5ad(tmp_path / "lab" / "h5" / "blood_lab.h5ad")
    out = ad.read_h5ad(run / "blood" / "lab" / "lab_annotated.h5ad")
    removed = source.obs.loc[source.obs_names.difference(out.obs_names)]
    assert set(damaged) <= set(removed.index)
    assert (out.obs["leiden"].astype(str) == source.obs.loc[out.obs_names, "lab_cluster"].astype(str)).all()
    assert (out.obs["lab_label"] == source.obs.loc[out.obs_names, "lab_label"]).all()  # never overwritten
    record = out.uns["cassia_batch"]["leiden"]
    assert record["source"] == "input" and record["input_key"] == "lab_cluster"
    by_cluster = removed["lab_cluster"].astype(str).value_counts()
    assert dict(zip(record["clusters"], map(int, record["removed_by_qc"]), strict=True)) == {
        c: int(by_cluster.get(c, 0)) for c in ("lab_B", "lab_M", "lab_T")}
    said = f"QC removed {len(removed)} cell(s) from the input's clusters (lab_cluster): lab_B {by_cluster['lab_B']}/"
    assert any(said in w for w in out.uns["cassia_batch"]["warnings"])
    assert (out.obsm["X_umap"][:, 0] == source.obsm["X_umap"][source.obs_names.get_indexer(out.obs_names), 0]).all()

    # the self-scores: per cluster and per cell, on the answers the crafted labels give
    clusters = pd.read_csv(run / "blood" / "lab" / "lab_clusters.csv").set_index("cluster")
    assert clusters.loc["lab_T", "cell_type_ontology_term_id"] == "CL:0000084"  # the run called T cell
    assert clusters.loc["lab_B", "cell_type_ontology_term_id"] == "CL:0000236"
    assert clusters.loc["lab_M", "cell_type_lineage"] == "myeloid cell"
    assert clusters["self_score"].to_dict() == {"lab_T": "exact", "lab_B": "partial", "lab_M": "lineage"}
    assert clusters.loc["lab_B", "self_score_distance"] == 2
    assert clusters["author_label"].to_dict() == {"lab_T": "T cell", "lab_B": "lymphocyte", "lab_M": "macrophage"}

    kept = source.obs.loc[out.obs_names]
    n_t, n_b, n_m = ((kept["lab_cluster"] == c).sum() for c in ("lab_T", "lab_B", "lab_M"))
    unmapped = int((kept["lab_label"] == "Mystery blob").sum())
    wrong = int((kept["lab_label"] == "hepatocyte").sum())
    scored = out.n_obs - unmapped
    summary = pd.read_csv(run / "batch_summary.csv").set_index("dataset")
    row = summary.loc["lab"]
    assert row["self_score_key"] == "lab_label" and row["scored_cells"] == scored and row["unscored_cells"] == unmapped
    assert row["self_exact"] == pytest.approx((n_t - wrong) / scored, abs=1e-4)
    assert row["self_wrong"] == pytest.approx(wrong / scored, abs=1e-4)
    assert row["self_partial"] == pytest.approx(n_b / scored, abs=1e-4)
    assert row["self_lineage"] == pytest.approx((n_m - unmapped) / scored, abs=1e-4)
    assert row["unmapped_author_labels"] == "Mystery blob"
    as_written = pd.read_csv(run / "batch_summary.csv", dtype=str, keep_default_na=False).set_index("dataset")
    assert as_written.loc["lab", "scored_cells"] == str(scored)  # a count, not 580.0, beside a dataset without
    assert "not scored: no author label, or one not in the Cell Ontology" in (run / "batch_summary.txt").read_text()
    assert summary.loc["mouse", "self_score_key"] == "truth"
    assert pd.isna(summary.loc["no_such_key", "self_score_key"])  # failed: nothing scored
    text = (run / "batch_summary.txt").read_text()
    assert "blood/lab vs lab_label: exact" in text and "not mapped to the Cell Ontology: Mystery blob" in text
    html = (run / "report.html").read_text()
    assert "Agreement with the input&#39;s own labels" in html or "Agreement with the input's own labels" in html

    # the donors: with batch_key the clusters follow the cell types, not the donors; without it they split by donor
    def clusters_of(name: str) -> tuple[pd.Series, pd.Series]:
        out = ad.read_h5ad(run / "spleen" / name / f"{name}_annotated.h5ad")
        return out.obs["leiden"].astype(str), donors.obs.loc[out.obs_names, "truth"].astype(str)

    with_key, without_key = (adjusted_rand_score(*reversed(clusters_of(n))) for n in ("mouse", "mouse_unintegrated"))
    assert with_key > 0.9 and without_key < 0.8 and with_key > without_key, (with_key, without_key)
    integrated = ad.read_h5ad(run / "spleen" / "mouse" / "mouse_annotated.h5ad")
    assert integrated.uns["cassia_batch"]["batches"]["harmony"]["method"].startswith("harmonypy")
    assert integrated.obsm["X_pca_uncorrected"].shape == integrated.obsm["X_pca"].shape
    # each cluster's cells per donor; the NK cells' cluster (donor_B only) is the one flagged
    table = pd.read_csv(run / "spleen" / "mouse" / "mouse_clusters.csv", dtype={"cluster": str}).set_index("cluster")
    leiden, truth = clusters_of("mouse")
    nk = leiden[truth == "NK cell"].mode()[0]
    assert table["single_batch"].to_dict() == {c: c == nk for c in table.index}
    assert table.loc[nk, "batch_cells"] == f"donor_B: {int((leiden == nk).sum())}" and table.loc[nk, "n_batches"] == 1
    donor_of = donors.obs.loc[integrated.obs_names, "donor"].astype(str)
    for cluster in table.index.drop(nk):
        counts = donor_of[(leiden == cluster).to_numpy()].value_counts()
        assert set(table.loc[cluster, "batch_cells"].split("; ")) == {f"{d}: {n}" for d, n in counts.items()}
    result_json = json.loads((run / "spleen" / "mouse" / "mouse_result.json").read_text())
    assert result_json["batches"]["single_batch_clusters"] == [nk]
    assert f"made of one donor only: {nk} (donor_B)" in " ".join(result_json["warnings"])
    assert (run / "spleen" / "mouse" / "mouse_qc_batches.png").is_file()
    assert "[one batch only]" in (run / "spleen" / "mouse" / "mouse_summary.txt").read_text()
    assert not (run / "spleen" / "mouse_unintegrated" / "mouse_unintegrated_qc_batches.png").exists()
    # a batch_key the input does not have: that dataset fails with one line naming it, the batch goes on
    failed = json.loads((run / "spleen" / "no_such_key" / "no_such_key_status.json").read_text())
    assert failed["status"] == "failed" and failed["error_type"] == "InputError"
    assert "batch_key 'patient' is not a column of the input's obs" in failed["error"]
    assert "\n" not in failed["error"] and str(tmp_path / "lab" / "h5" / "mouse.h5ad") in failed["error"]
    # the report's confusion view: author labels against the run's calls, for each labelled dataset
    assert 'id="ds-blood-lab-confusion"' in html and 'id="ds-spleen-mouse-confusion"' in html
    assert 'href="#ds-blood-lab-confusion"' in html and "Quality control per batch" in html

    # --resume: the mouse dataset's outputs are damaged; it runs again with its own species and context
    (run / "spleen" / "mouse" / "mouse_annotated.h5ad").unlink()
    resumed = run_batch_py("--resume", str(run), "--quiet")
    assert resumed.returncode == 1, resumed.stderr  # the input without the batch key is still rejected as it was
    assert f"Report: {run / 'report.html'}" in resumed.stderr  # --quiet keeps the closing table, report included
    again = parameters("spleen", "mouse")
    assert (again["species"], again["context"], again["batch_key"]) == ("mouse", "aged mice", "donor")
    assert (run / "spleen" / "mouse" / "mouse_annotated.h5ad").is_file()
    assert list((run / "spleen" / "mouse" / "superseded").iterdir())


def test_cellxgene_labels_are_found_without_a_label_key_and_scored_by_their_ids():
    import anndata as ad
    import numpy as np

    from cassia_helpers.dataset.ontology import load_cell_ontology
    from cassia_helpers.dataset.self_score import compare, score_against_authors

    # as read_dataset leaves a CELLxGENE file: its own columns under author_, the run's calls beside them
    calls = ["CL:0000084"] * 4 + ["CL:0000576"] * 4 + ["unknown"] * 2
    author = ["CL:0000084", "CL:0000084", "CL:0000624", "CL:0000236",  # exact, exact, descendant, other lineage
              "CL:0000576", "CL:0000235", "CL:0000576", "not an id",  # exact, lineage, exact, unmapped
              "CL:0000084", "CL:0000084"]                              # an Unknown call earns nothing
    adata = ad.AnnData(np.zeros((10, 1), np.float32), obs=pd.DataFrame({
        "leiden": pd.Categorical(["0"] * 4 + ["1"] * 4 + ["2"] * 2),
        "cell_type_ontology_term_id": calls,
        "author_cell_type_ontology_term_id": author,
        "author_cell_type": ["whatever"] * 10}, index=[f"c{i}" for i in range(10)]))
    table = score_against_authors(adata).set_index("cluster")
    assert table["self_score"].to_dict() == {"0": "exact", "1": "exact", "2": "wrong"}
    summary = adata.uns["cassia_batch"]["self_score"]["summary"]
    assert summary["self_score_key"] == "author_cell_type_ontology_term_id"
    assert (summary["scored_cells"], summary["unscored_cells"], summary["unmapped_author_labels"]) == (
        9, 1, ["not an id"])
    assert (summary["self_exact"], summary["self_partial"], summary["self_lineage"], summary["self_wrong"]) == (
        round(4 / 9, 4), round(1 / 9, 4), round(1 / 9, 4), round(3 / 9, 4))
    onto = load_cell_ontology()
    # CD4-positive, alpha-beta T cell -> mature alpha-beta T cell -> mature T cell -> T cell, either way round
    assert compare(onto, "CL:0000084", "CL:0000624") == compare(onto, "CL:0000624", "CL:0000084") == ("partial", 3)
    assert compare(onto, "CL:0000576", "CL:0000576") == ("exact", 0)
    assert score_against_authors(ad.AnnData(np.zeros((2, 1), np.float32))) is None  # no labels: nothing scored


# --------------------------------------------------------------------------- manifest as --data-dir, Harmony missing

def test_a_data_dir_that_is_a_manifest_or_holds_datasets_csv_runs_its_rows(tmp_path, inputs):
    path = manifest(tmp_path, "path,tissue,dataset\nh5/pbmc.h5ad,blood,one\nh5/mouse_pbmc.h5ad,spleen,two\n")
    for data_dir in (path, path.parent):  # the CSV itself, or the folder holding datasets.csv
        result = run_batch_py("--data-dir", str(data_dir), "--dry-run", "--annotator", "reference",
                              "--output-dir", str(tmp_path / "out"))
        assert result.returncode == 0, result.stderr
        assert [line.split()[:2] for line in result.stdout.splitlines() if line.startswith(("blood ", "spleen "))] \
            == [["blood", "one"], ["spleen", "two"]]
    # with --tissues the folder's tissue folders run as always, datasets.csv or not
    (path.parent / "blood").mkdir()
    write(make_counts(60), path.parent / "blood" / "folder_dataset.h5ad")
    result = run_batch_py("--data-dir", str(path.parent), "--tissues", "blood", "--dry-run", "--annotator",
                          "reference", "--output-dir", str(tmp_path / "out"))
    assert result.returncode == 0, result.stderr
    assert [line.split()[1] for line in result.stdout.splitlines() if line.startswith("blood ")] == ["folder_dataset"]
    assert not (tmp_path / "out").exists()


def without_harmonypy(tmp_path: Path) -> dict:
    """The environment of a Python where harmonypy is not installed (its import fails as a missing module's
    does), for run_batch.py and the kernels it starts."""
    hidden = tmp_path / "no_harmonypy"
    hidden.mkdir(exist_ok=True)
    (hidden / "sitecustomize.py").write_text("import sys\nsys.modules['harmonypy'] = None\n")
    return {"PYTHONPATH": os.pathsep.join([str(hidden), str(REPO)])}


@pytest.mark.parametrize("how, extra", [("manifest", ("--dry-run",)), ("flag", ())])
def test_batch_key_without_harmonypy_is_a_one_line_usage_error(tmp_path, inputs, how, extra):
    path = manifest(tmp_path, "path,tissue,batch_key\nh5/pbmc.h5ad,blood,\nh5/mouse_pbmc.h5ad,blood,donor\n")
    given = ("--manifest", str(path)) if how == "manifest" else ("--input", str(inputs / "pbmc.h5ad"), "--tissue",
                                                                 "blood", "--batch-key", "donor")
    result = run_batch_py(*given, *extra, "--annotator", "reference", "--output-dir", str(tmp_path / "out"),
                          env=without_harmonypy(tmp_path))
    assert result.returncode == 2, result.stderr
    [line] = result.stderr.strip().splitlines()
    where = f"{path}: dataset blood/mouse_pbmc" if how == "manifest" else "--batch-key 'donor'"
    assert line.startswith(f"run_batch.py: error: {where}: batch_key 'donor' needs harmonypy"), line
    assert "pip install 'cassia-batch[harmony]'" in line
    assert not (tmp_path / "out").exists()


def test_a_kernel_without_harmonypy_names_what_to_install(monkeypatch):
    """A kernel whose Python lacks harmonypy (another environment on a compute node, say) says what to install."""
    from cassia_helpers.dataset.batches import check_batches
    from tests.synthetic import make_donors

    monkeypatch.setitem(sys.modules, "harmonypy", None)  # what an absent module looks like to an import
    with pytest.raises(ModuleNotFoundError, match=r"^batch_key 'donor' needs harmonypy .*cassia-batch\[harmony\]"):
        check_batches(make_donors(40), batch_key="donor")


# --------------------------------------------------------------------------- the report's confusion view

def labelled_run(tmp_path: Path, *, n_labels: int, n_calls: int) -> Path:
    """A run folder (tests/test_figures_report.py's) whose dataset was scored against ``n_labels`` long author
    labels, its cells spread over ``n_calls`` long calls."""
    import json

    from tests.test_figures_report import annotated, make_run

    run = make_run(tmp_path, annotated(), n_failed=0)
    result_path = next(run.glob("blood/*/*_result.json"))
    result = json.loads(result_path.read_text())
    labels = [f"CD{i}-positive, alpha-beta memory T cell of the lamina propria {i}" for i in range(n_labels)]
    calls = [f"Call{i}-positive, CD16-negative classical monocyte{i}" for i in range(n_calls)]
    confusion = [[label, calls[(i + j) % n_calls], 100 - 10 * j, ("exact", "partial", "lineage", "wrong")[j % 4]]
                 for i, label in enumerate(labels) for j in range(4)]
    result["self_score"] = {"self_score_key": "author_cell_type", "self_exact": 0.5, "self_partial": 0.2,
                            "self_lineage": 0.1, "self_wrong": 0.2, "scored_cells": 100, "unscored_cells": 0,
                            "unmapped_author_labels": [], "confusion": confusion}
    result_path.write_text(json.dumps(result))
    summary = pd.read_csv(run / "batch_summary.csv")
    summary["self_score_key"], summary["self_exact"], summary["scored_cells"] = "author_cell_type", 0.5, 100
    summary.to_csv(run / "batch_summary.csv", index=False)
    return run


def test_the_confusion_view_folds_the_smallest_labels_and_calls():
    from cassia_helpers.summary.self_scores import CONFUSION_COLUMNS, CONFUSION_ROWS, confusion_view

    rows = [[f"label{i}", f"call{(i + j) % 30}", 100 - i - 10 * j, "wrong" if j else "exact"]
            for i in range(30) for j in range(3)]
    rows[0][2] = 500  # label0's cells called call0: the largest label and the largest call
    view = confusion_view({"confusion": rows})
    assert view["columns"][-1] == "other calls" and len(view["columns"]) == CONFUSION_COLUMNS + 1
    assert view["rows"][-1]["label"] == "other labels" and len(view["rows"]) == CONFUSION_ROWS + 1
    assert sum(r["n"] for r in view["rows"]) == sum(r[2] for r in rows)  # no cell lost in the folding
    first = view["rows"][0]
    assert first["label"] == "label0" and first["n"] == 500 + 90 + 80 and view["columns"][0] == "call0"
    assert first["cells"][0] == {"n": 500, "pct": 100 * 500 / 670, "score": "exact",
                                 "color": "rgba(27, 140, 58, 0.71)", "dark": True}
    assert confusion_view({}) is None and confusion_view({"confusion": [["a", "b", "x", "exact"]]}) is None


@pytest.mark.skipif(shutil.which("chromium") is None,
                    reason="chromium is not installed (CI installs it with `apt-get install -y chromium`)")
def test_the_confusion_view_fits_the_screen(tmp_path):
    from cassia_helpers.summary.report import write_report
    from tests.test_figures_report import _probe

    run = labelled_run(tmp_path, n_labels=25, n_calls=16)
    html = write_report(run).read_text(encoding="utf-8")
    assert "-confusion\"" in html and "other calls" in html and "other labels" in html
    script = """var t = document.querySelector("table.confusion"), box = t.parentElement.getBoundingClientRect();
return [document.documentElement.scrollWidth, window.innerWidth, t.getBoundingClientRect().right, box.right,
        t.tHead.rows[0].cells.length, t.tBodies[0].rows.length,
        Math.min.apply(null, Array.prototype.map.call(t.tHead.rows[0].cells, function (c) {
          return c.getBoundingClientRect().width; }))];"""
    for width in (1024, 1400, 1900):
        scroll, inner, right, room, n_columns, n_rows, narrowest = _probe(run, script, width=width)
        assert scroll <= inner == width, f"the page scrolls sideways at {width} px"
        assert right <= room + 0.5, f"the confusion view overflows its section at {width} px"
        assert (n_columns, n_rows) == (1 + 10 + 1 + 1, 15 + 1)  # labels, 10 calls, other, cells
        assert narrowest >= 50, f"a column of the confusion view is {narrowest} px wide at {width} px"


def test_author_shorthand_without_the_word_cell_is_mapped_and_unmapped_labels_are_listed():
    import anndata as ad
    import numpy as np

    from cassia_helpers.dataset.self_score import score_against_authors

    # pbmc68k's bulk_labels style: "CD19+ B" is a B cell, "Dendritic" a dendritic cell; "CD4+/CD25 T Reg" is not
    adata = ad.AnnData(np.zeros((6, 1), np.float32), obs=pd.DataFrame({
        "leiden": pd.Categorical(["0", "0", "1", "1", "2", "2"]),
        "cell_type": ["B cell"] * 2 + ["Dendritic cell"] * 2 + ["T cell"] * 2,
        "cell_type_ontology_term_id": ["CL:0000236"] * 2 + ["CL:0000451"] * 2 + ["CL:0000084"] * 2,
        "bulk_labels": ["CD19+ B"] * 2 + ["Dendritic"] * 2 + ["CD4+/CD25 T Reg"] * 2}, index=list("abcdef")))
    table = score_against_authors(adata, label_key="bulk_labels", tissue="blood").set_index("cluster")
    assert table["author_term_id"].to_dict() == {"0": "CL:0001201", "1": "CL:0000451", "2": "unknown"}
    assert table["self_score"].to_dict() == {"0": "partial", "1": "exact", "2": "unscored"}
    record = adata.uns["cassia_batch"]["self_score"]
    assert record["summary"]["unmapped_author_labels"] == ["CD4+/CD25 T Reg"]
    confusion = record["confusion"].set_index("author_label")
    assert confusion.loc["Dendritic", ["call", "n_cells", "self_score"]].tolist() == ["Dendritic cell", 2, "exact"]

    # cells the author left unlabelled are not scored, nor a label "nan", even where they are the majority
    adata.obs["bulk_labels"] = pd.Series(["CD19+ B", None, None, None, "Dendritic", np.nan], index=adata.obs_names,
                                         dtype=object)
    table = score_against_authors(adata, label_key="bulk_labels", tissue="blood").set_index("cluster")
    assert table["author_label"].to_dict() == {"0": "CD19+ B", "1": "", "2": "Dendritic"}
    assert table["self_score"].to_dict() == {"0": "partial", "1": "unscored", "2": "wrong"}
    summary = adata.uns["cassia_batch"]["self_score"]["summary"]
    assert (summary["scored_cells"], summary["unscored_cells"], summary["unmapped_author_labels"]) == (2, 4, [])
    assert "nan" not in set(adata.uns["cassia_batch"]["self_score"]["confusion"]["author_label"])


def test_a_dataset_whose_labels_all_map_lists_no_unmapped_label(tmp_path):
    # batch_summary.csv read back gives NaN for an empty cell: the report and the text must not say "nan"
    from cassia_helpers.summary.self_scores import accuracy_rows, self_score_lines

    pd.DataFrame({"tissue": ["spleen"], "dataset": ["mouse"], "self_score_key": ["truth"], "self_exact": [0.7],
                  "self_partial": [0.0], "self_lineage": [0.3], "self_wrong": [0.0], "scored_cells": [300],
                  "unscored_cells": [0], "unmapped_author_labels": [""]}).to_csv(tmp_path / "summary.csv", index=False)
    table = pd.read_csv(tmp_path / "summary.csv")
    [row] = accuracy_rows(table)
    assert row["unmapped"] == "" and row["scored_cells"] == 300 and row["exact"] == "70.0%"
    assert "nan" not in "\n".join(self_score_lines(table))


def test_a_labs_own_clusters_keep_their_order_and_their_names():
    """Numbered clusters in numeric order, whole-number floats without ``.0``, and cells with no cluster kept
    apart from a cluster the lab itself named ``unassigned`` (and said)."""
    import anndata as ad

    from cassia_helpers.dataset.existing import keep_clusters

    ids = [0, 1, 2, 10, 11, 2, 10]
    adata = ad.AnnData(obs=pd.DataFrame({"numbers": ids, "floats": [float(i) for i in ids],
                                         "named": ["unassigned", None, "T", "T", "B", None, "unassigned"]},
                                        index=[f"c{i}" for i in range(7)]))
    keep_clusters(adata, cluster_key="numbers")
    assert list(adata.obs["leiden"].cat.categories) == ["0", "1", "2", "10", "11"]
    keep_clusters(adata, cluster_key="floats")
    assert list(adata.obs["leiden"].cat.categories) == ["0", "1", "2", "10", "11"]
    keep_clusters(adata, cluster_key="named")
    assert list(adata.obs["leiden"].cat.categories) == ["B", "T", "unassigned", "unassigned_"]
    assert adata.obs["leiden"].astype(str).tolist() == ["unassigned", "unassigned_", "T", "T", "B", "unassigned_",
                                                         "unassigned"]
    assert "2 cells have no cluster in obs['named']" in " ".join(adata.uns["cassia_batch"]["warnings"])


def test_a_batch_qc_mostly_removed_is_warned():
    """A failed lane: its loss is hidden in the dataset's total, so it is said by name."""
    import anndata as ad

    from cassia_helpers.dataset.batches import BATCH_COLUMN, count_batches

    obs = pd.DataFrame({"leiden": pd.Categorical(["0"] * 60 + ["1"] * 42),
                        BATCH_COLUMN: pd.Categorical(["A"] * 50 + ["B"] * 50 + ["lane3"] * 2)},
                       index=[f"c{i}" for i in range(102)])
    adata = ad.AnnData(obs=obs)
    adata.uns["cassia_batch"] = {"batches": {"input_key": "donor", "key": BATCH_COLUMN,
                                             "batches": ["A", "B", "lane3"], "cells_before_qc": [55, 50, 25]}}
    count_batches(adata)
    assert adata.uns["cassia_batch"]["warnings"] == ["QC kept under half the cells of donor lane3 2/25"]
