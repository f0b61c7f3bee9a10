"""``--manifest datasets.csv``: heterogeneous datasets in one run, each with its own tissue, species, context,
clusters and author labels."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

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

    path = manifest(tmp_path, "path,tissue,species,context,dataset\n"
                              "h5/pbmc.h5ad,blood,,,\n"
                              f"{inputs / 'mouse_pbmc.h5ad'},blood,mouse,\"aged, treated\",mouse\n")
    found = read_manifest_csv(path).datasets
    assert [(d.tissue, d.name, d.path) for d in found] == [
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
    ("path,tissue\nh5/pbmc.h5ad,../../escaped\n", ["line 2", "tissue '../../escaped' is a name that is not"]),
    ("path,tissue,dataset\nh5/pbmc.h5ad,blood,../x\n", ["line 2", "dataset name '../x' is"]),
    ("path,tissue,dataset\nh5/pbmc.h5ad,blood,\"two\nlines\"\n", ["dataset name 'two\\nlines'", "control"]),
    ("path,tissue\n", ["lists no dataset"]),
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
    path = manifest(tmp_path, "path,tissue,context,dataset\nh5/pbmc.h5ad,blood,,short\n"
                              f"h5/pbmc.h5ad,blood,{'x' * 40_000},long\n")
    env = {"OPENAI_BASE_URL": "http://127.0.0.1:9/v1"}  # nothing is sent by a dry run
    result = run_batch_py("--manifest", str(path), "--dry-run", "--annotator", "llm", "--pipeline", "fast",
                          "--output-dir", str(tmp_path / "out"), env=env)
    assert result.returncode == 0, result.stderr
    rows = {line.split()[1]: line for line in result.stdout.splitlines() if line.startswith("blood ")}
    assert set(rows) == {"short", "long"}

    def low_tokens(row: str) -> int:
        return int(row.split()[-1].split("-")[0].replace(",", ""))

    # the long row's context (10,000 tokens) rides in each of its clusters' three calls; the short row has none
    assert low_tokens(rows["long"]) - low_tokens(rows["short"]) >= 3 * 10_000
    assert not (tmp_path / "out").exists()
