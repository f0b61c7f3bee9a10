"""Per-dataset figures, run-wide colours, the per-cluster table, report.html and the explore notebook."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from cassia_helpers.contract import DatasetPaths
from cassia_helpers.dataset import figures
from cassia_helpers.dataset.cluster_table import cluster_table, write_cluster_table
from cassia_helpers.palette import PALETTE, UNKNOWN_COLOR, run_palette
from cassia_helpers.summary.report import load_summary, write_report
from tests.synthetic import BLOOD_TYPES, make_counts

REPO = Path(__file__).resolve().parent.parent
SCREENSHOT = REPO / "tools" / "report_screenshot.py"
FAILURE = "bad_sample.h5ad: not an HDF5 file (the first bytes are text); is it an h5ad? (OSError)"


def annotated(n_cells: int = 300, *, seed: int = 0):
    """A tiny dataset as the template leaves it: log-normalised X, QC metrics and distributions, leiden,
    cell types (one cluster Unknown), a UMAP (one blob per cluster) and the annotation record."""
    from cassia_helpers.dataset.pp import qc_metrics

    adata = make_counts(n_cells, cell_types={**BLOOD_TYPES, "NK cell": ["NKG7", "GNLY", "PRF1", "GZMB"]}, seed=seed)
    qc_metrics(adata, mito=np.asarray(adata.var_names.str.startswith("MT-")))
    keep = adata.obs["n_genes_by_counts"].to_numpy() >= np.quantile(adata.obs["n_genes_by_counts"], 0.1)
    distributions = figures.qc_distributions(adata.obs, keep)
    adata = adata[keep].copy()
    adata.X = adata.X.log1p()
    truth = adata.obs["truth"].astype(str).to_numpy()
    names = sorted(set(truth))
    clusters = np.array([str(names.index(t)) for t in truth])
    adata.obs["leiden"] = pd.Categorical(clusters, categories=[str(i) for i in range(len(names))])
    calls = {str(i): ("Unknown" if name == "Monocyte" else name) for i, name in enumerate(names)}
    adata.obs["cell_type"] = pd.Categorical([calls[c] for c in clusters])
    rng = np.random.default_rng(seed)
    centres = rng.uniform(-10, 10, (len(names), 2))
    adata.obsm["X_umap"] = centres[[int(c) for c in clusters]] + rng.normal(0, 0.8, (adata.n_obs, 2))
    table = pd.DataFrame([{
        "cluster": c, "main_cell_type": t, "sub_cell_types": "", "mixed_cell_types": "",
        "confidence": 0.0 if t == "Unknown" else 87.5, "key_markers": ", ".join(BLOOD_TYPES.get(t, ["NKG7"])[:3]),
        "status": "unknown" if t == "Unknown" else "ok", "reason": "no valid answer" if t == "Unknown" else "",
        "iterations": 1, "n_cells": int((clusters == c).sum())} for c, t in calls.items()])
    results = [{"cluster": c, "reasoning": f"<b>{t}</b> markers are high in cluster {c}."} for c, t in calls.items()]
    adata.uns["cassia_batch"] = {
        "qc": {"min_genes": 120, "max_pct_mt": 20.0, "cells_before": n_cells, "cells_after": int(adata.n_obs),
               "distributions": distributions},
        "annotation": {"clusters": table, "results_json": json.dumps(results)},
        "warnings": ["no mitochondrial genes (MT-/mt-) found"],
    }
    return adata


@pytest.fixture(scope="module")
def tiny():
    return annotated()


def make_run(root: Path, adata, *, n_success: int = 1, n_failed: int = 1) -> Path:
    """A run folder as the driver leaves it: summaries, statuses, results, figures and clusters tables."""
    run = root / "run_blood_20260216_151425"
    rows, by_dataset = [], {}
    drawn = None
    for i in range(n_success + n_failed):
        ok = i < n_success
        name = f"Data_{'Good' if ok else 'Bad'}{i:03d}_Blood"
        paths = DatasetPaths(run, "blood", name)
        paths.folder.mkdir(parents=True)
        status = {"dataset": name, "tissue": "blood", "status": "success" if ok else "failed",
                  "error_type": "" if ok else "InputError", "error": "" if ok else FAILURE, "duration_s": 38.3,
                  "started_at": "2026-02-16T15:14:25+00:00", "finished_at": "2026-02-16T15:16:25+00:00"}
        paths.status_json.write_text(json.dumps(status))
        if ok:
            if drawn is None:
                drawn = figures.save_dataset_figures(adata, paths)
                write_cluster_table(adata, paths)
            else:  # the same figures again: drawing 100 datasets would make the test slow
                for key, path in drawn.items():
                    shutil.copy(path, figures.figure_paths(paths)[key])
                shutil.copy(drawn["umap"].parent / f"{drawn['umap'].parent.name}_clusters.csv",
                            paths.folder / f"{name}_clusters.csv")
            paths.result_json.write_text(json.dumps({
                "dataset": name, "tissue": "blood", "n_cells": adata.n_obs, "n_cells_input": 300,
                "annotator": "llm", "model": "gpt-4o-mini", "unknown_clusters": 1, "warnings": ["a warning"],
                "cell_types": {str(k): int(v) for k, v in adata.obs["cell_type"].value_counts().items()}}))
            by_dataset[f"blood/{name}"] = {"calls": 8, "input_tokens": 9000, "output_tokens": 1000,
                                           "total_tokens": 10000, "cost": 0.0123}
        rows.append({"dataset": name, "tissue": "blood", "file_path": f"/data/blood/{name}.h5ad",
                     "n_cells": adata.n_obs if ok else None, "n_genes": adata.n_vars if ok else None,
                     "n_clusters": 4 if ok else None, "preprocessing_time": 20.0 if ok else None,
                     "annotation_time": 10.0 if ok else None, "total_time": 38.3, "status": status["status"],
                     "output_dir": str(paths.folder), "error": status["error"]})
    pd.DataFrame(rows).to_csv(run / "batch_summary.csv", index=False)
    (run / "batch_summary.txt").write_text("CASSIA batch summary\n")
    (run / "token_tracking.json").write_text(json.dumps({
        "total_calls": 8 * n_success, "failed_calls": 0, "total_input_tokens": 9000 * n_success,
        "total_output_tokens": 1000 * n_success, "total_tokens": 10000 * n_success,
        "total_cost": 0.0123 * n_success, "currency": "USD", "cache_hits": 0, "by_dataset": by_dataset}))
    return run


# --- colours ---------------------------------------------------------------------------------------------

def test_run_palette_is_stable_distinct_and_unknown_is_grey():
    labels = ["NK cell", "B cell", "CD4+ T cell", "Unknown", "Monocyte"] + [f"type {i}" for i in range(35)]
    colors = run_palette(labels)
    assert colors == run_palette(list(reversed(labels)) + ["B cell"])  # order and duplicates do not matter
    assert colors["Unknown"] == UNKNOWN_COLOR and UNKNOWN_COLOR not in PALETTE
    named = [c for label, c in colors.items() if label != "Unknown"]
    assert len(set(named)) == len(named)  # no two cell types of a dataset share a colour
    # a label keeps its colour in another dataset with other labels
    assert run_palette(["NK cell", "Fibroblast"])["NK cell"] == colors["NK cell"] == run_palette(["NK cell"])["NK cell"]


def test_set_colors_writes_scanpy_colours(tiny):
    adata = tiny.copy()
    colors = figures.set_colors(adata, "cell_type")
    stored = list(adata.uns["cell_type_colors"])
    categories = list(adata.obs["cell_type"].cat.categories)
    assert len(stored) == len(categories) and stored[categories.index("Unknown")] == UNKNOWN_COLOR
    assert dict(zip(categories, stored, strict=True)) == colors == run_palette(categories)


# --- figures ---------------------------------------------------------------------------------------------

def test_dataset_figures_are_sane_pngs_without_pyplot(tiny, tmp_path):
    import matplotlib
    import matplotlib.pyplot as plt
    from matplotlib.figure import Figure
    from PIL import Image

    backend = matplotlib.get_backend()
    open_before = plt.get_fignums()
    adata = tiny.copy()
    paths = DatasetPaths(tmp_path, "blood", "Tiny")
    saved = figures.save_dataset_figures(adata, paths)
    assert set(saved) == {"umap", "qc", "dotplot", "cluster_sizes"}
    for name, path in saved.items():
        assert path == paths.folder / f"Tiny_{name}.png"
        with Image.open(path) as image:
            assert image.format == "PNG"
            assert 400 <= image.width <= 2500 and 200 <= image.height <= 1600, (name, image.size)
        assert 5_000 < path.stat().st_size < 600_000, name
    # the run's colours are in the UMAP: every cell type, and Unknown grey
    with Image.open(saved["umap"]) as image:
        rgb = np.asarray(image.convert("RGB")).reshape(-1, 3)
    pixels = {"#{:02x}{:02x}{:02x}".format(*p) for p in np.unique(rgb, axis=0)}
    assert set(figures.label_colors(adata, "cell_type").values()) <= pixels
    assert UNKNOWN_COLOR in pixels
    # the same data draw the same figure, whatever the machine's speed (labels placed in a fixed number of steps)
    again = figures.save_dataset_figures(adata, DatasetPaths(tmp_path, "blood", "Again"))
    assert again["umap"].read_bytes() == saved["umap"].read_bytes()
    # explicit Figures: pyplot knows none of them and the backend is untouched
    assert isinstance(figures.dotplot_figure(adata), Figure)
    assert plt.get_fignums() == open_before and matplotlib.get_backend() == backend
    # a returned figure shows itself in a notebook
    assert figures.cluster_sizes_figure(adata)._repr_png_().startswith(b"\x89PNG")


def test_qc_distributions_keep_the_removed_cells():
    obs = pd.DataFrame({"n_genes_by_counts": [50, 300, 400, 2000], "total_counts": [60, 900, 1000, 8000],
                        "pct_counts_mt": [40.0, 2.0, 3.0, 1.0]})
    keep = np.array([False, True, True, True])
    found = figures.qc_distributions(obs, keep, bins=10)
    assert set(found) == set(obs.columns)
    for part in found.values():
        assert part["before"].sum() == 4 and part["after"].sum() == 3 and len(part["edges"]) == 11
    assert found["pct_counts_mt"]["before"][-1] == 1 and found["pct_counts_mt"]["after"][-1] == 0


def test_cluster_table_labels_scores_and_reasoning(tiny, tmp_path):
    table = cluster_table(tiny)
    assert list(table["cluster"]) == list(tiny.obs["leiden"].cat.categories)
    unknown = table[table["cell_type"] == "Unknown"].iloc[0]
    assert unknown["label"] == f"{unknown['cluster']}: Unknown" and unknown["reason"] == "no valid answer"
    assert unknown["color"] == UNKNOWN_COLOR
    assert table["n_cells"].sum() == tiny.n_obs and table["reasoning"].str.contains("markers are high").all()
    path = write_cluster_table(tiny, DatasetPaths(tmp_path, "blood", "Tiny"))
    assert path.name == "Tiny_clusters.csv" and len(pd.read_csv(path)) == len(table)
    # the first markers the annotator read (its filtered list), not the ranking's: RPS genes are not sent
    sent = tiny.copy()
    results = json.loads(sent.uns["cassia_batch"]["annotation"]["results_json"])
    results[0]["markers_sent"] = ["CD3E", "CD3D", "IL7R", "LTB", "CD2", "TRAC"]
    sent.uns["cassia_batch"]["annotation"]["results_json"] = json.dumps(results)
    ranked = pd.DataFrame({"cluster": results[0]["cluster"], "rank": [1, 2], "gene": ["RPS27", "CD3E"]})
    top = cluster_table(sent, markers=ranked).set_index("cluster")["top_markers"]
    assert top[results[0]["cluster"]] == "CD3E, CD3D, IL7R, LTB, CD2"


# --- report ----------------------------------------------------------------------------------------------

def test_report_is_self_contained(tiny, tmp_path):
    run = make_run(tmp_path, tiny)
    html = write_report(run).read_text(encoding="utf-8")
    assert "<title>Cell-type annotation report: run_blood_20260216_151425</title>" in html
    assert "Run overview" in html and "Cell-type composition" in html
    assert FAILURE in html  # the failure's one-line reason, in full
    assert html.count("data:image/png;base64,") == 4  # the successful dataset's four figures
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:)?//""", html, re.I)  # nothing fetched at view time
    assert "<link" not in html and "@import" not in html and not re.search(r"<script[^>]*\bsrc", html, re.I)
    assert "&lt;b&gt;" in html and "markers are high" in html  # reasoning escaped, in its folded row
    # figures and the notebook are links to the files in the run folder, relative so the folder can move
    assert 'href="blood/Data_Good000_Blood/Data_Good000_Blood_umap.png">full size</a>' in html
    # what the scores mean, said once above the table; one number format per measure
    assert "Confidence</strong> (0–100)" in html and ">87.5<" not in html and ">88<" in html
    assert "0.01 USD" in html and "10,000" in html  # cost and tokens from token_tracking.json
    assert not re.search(r">\s*\d+\.0\s*<", html)  # counts are integers, not 700.0
    assert load_summary(run)["n_cells"].dtype == "Int64"


def test_report_lists_the_subclusters_of_a_dataset(tiny, tmp_path):
    run = make_run(tmp_path, tiny, n_failed=0)
    result = DatasetPaths(run, "blood", "Data_Good000_Blood").result_json
    result.write_text(json.dumps({**json.loads(result.read_text()), "subclusters": {"CD4+ T cell": {
        "n_cells": 113, "resolution": 0.5, "clusters": [
            {"cluster": "CD4+ T cell / 0", "cell_type": "Unknown", "n_cells": 29, "status": "unknown",
             "reason": "no reference cell type matched the markers", "score": None},
            {"cluster": "CD4+ T cell / 1", "cell_type": "Naive CD4+ T cell", "n_cells": 84, "status": "ok",
             "reason": "", "score": 26.7}]}}}))
    html = write_report(run).read_text(encoding="utf-8")
    assert ("Subclusters of CD4+ T cell (113 cells, re-clustered at resolution 0.5): CD4+ T cell / 0: Unknown (no "
            "reference cell type matched the markers), 29 cells; CD4+ T cell / 1: Naive CD4+ T cell, 84 cells, "
            "score 27.") in html


def test_report_links_and_anchors_work_for_any_dataset_name():
    from urllib.parse import unquote

    from cassia_helpers.summary.report import _anchor, _link

    for name in ("#1 sample", "ctrl%20a", "what?", "B {x} \u00fc"):
        link = _link("blood", name, Path(f"{name}_umap.png"))
        assert not set(link) & set("#? ") and unquote(link) == f"blood/{name}/{name}_umap.png"
        assert re.fullmatch(r"[A-Za-z0-9_-]+", _anchor("blood", name))
    assert _anchor("blood", "a b") != _anchor("blood", "a_b") and _anchor("blood", "lab") == "ds-blood-lab"


def test_report_names_the_kind_of_each_flagged_call(tiny, tmp_path):
    run = make_run(tmp_path, tiny)
    table_path = run / "blood" / "Data_Good000_Blood" / "Data_Good000_Blood_clusters.csv"
    table = pd.read_csv(table_path, dtype={"cluster": str})
    kinds = ["contradicted", "implausible_for_tissue", "markers_not_enriched, implausible_for_tissue"]
    table["evidence_flag"] = [True] * len(kinds) + [False] * (len(table) - len(kinds))
    table["evidence_flag_kind"] = kinds + [""] * (len(table) - len(kinds))
    table["evidence_flag_reason"] = [f"reason {i}" for i in range(len(table))]
    table.loc[2, "evidence_flag_reason"] = "markers_not_enriched: 2 of 3 not enriched; implausible_for_tissue: no"
    table["revised_from"] = ["T cell"] + [""] * (len(table) - 1)
    table.to_csv(table_path, index=False)
    html = write_report(run).read_text(encoding="utf-8")
    # each badge with its own reason, in words (not the record's kind names)
    assert ('markers not enriched</span> <span class="why">2 of 3 not enriched</span>' in html
            and 'unexpected in tissue</span> <span class="why">no</span>' in html)
    assert "markers_not_enriched:" not in html
    assert "revised by the boost agent (first call: T cell)" in html
    badges = re.findall(r'<span class="badge flagged"[^>]*>([^<]*)</span>', html)
    assert "contradicted by markers" in badges and "unexpected in tissue" in badges
    assert badges.count("markers not enriched") == 1 and badges.count("unexpected in tissue") == 2  # one per kind
    assert badges.count("contradicted by markers") == 1  # not said to lack enrichment as well


def test_report_stays_small_for_100_datasets(tiny, tmp_path):
    run = make_run(tmp_path, tiny, n_success=100, n_failed=3)
    html = write_report(run).read_text(encoding="utf-8")
    size = len(html.encode("utf-8"))
    figure_bytes = sum(p.stat().st_size for p in run.glob("blood/*/*.png"))
    embedded = sum(len(m) for m in re.findall(r"data:image/png;base64,[A-Za-z0-9+/=]+", html))
    print(f"report.html for 100 datasets: {size / 1e6:.1f} MB, of which images {embedded / 1e6:.1f} MB "
          f"(figures on disk {figure_bytes / 1e6:.1f} MB)")
    assert size < 8e6 and embedded < figure_bytes / 3


@pytest.mark.skipif(shutil.which("chromium") is None,
                    reason="chromium is not installed (CI installs it with `apt-get install -y chromium`)")
def test_report_renders_in_a_headless_browser(tiny, tmp_path):
    from PIL import Image, ImageStat

    run = make_run(tmp_path, tiny)
    write_report(run)
    shot = tmp_path / "shot.png"
    done = subprocess.run([sys.executable, str(SCREENSHOT), str(run), "--output", str(shot), "--width", "1200",
                           "--height", "1600"], capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr
    with Image.open(shot) as image:
        assert image.size == (1200, 1600)
        spread = ImageStat.Stat(image.convert("L")).stddev[0]
    assert spread > 20  # text, tables and figures, not a blank page
    sys.path.insert(0, str(SCREENSHOT.parent))
    try:
        from report_screenshot import dump_dom
    finally:
        sys.path.remove(str(SCREENSHOT.parent))
    dom = dump_dom(run / "report.html")
    assert "<title>Cell-type annotation report: run_blood_20260216_151425</title>" in dom
    assert dom.count("<img") == 4 and FAILURE in dom


def _probe(run: Path, script: str, *, width: int) -> dict:
    sys.path.insert(0, str(SCREENSHOT.parent))
    try:
        from report_screenshot import probe
    finally:
        sys.path.remove(str(SCREENSHOT.parent))
    return probe(run / "report.html", script, width=width, height=1000)


#: on a narrow screen: the width of the key markers' column and of each composition bar, and the cluster table's
#: box (its scrolled width against its visible width)
NARROW = """
var t = document.getElementById("cluster-table");
var markers = Array.prototype.filter.call(t.tHead.rows[0].cells, function (h) {
  return h.textContent === "Key markers"; })[0];
return {markers: markers.getBoundingClientRect().width, box: [t.parentElement.scrollWidth, t.parentElement.clientWidth],
        bars: Array.prototype.map.call(document.querySelectorAll(".barrow .bar"), function (b) {
          return b.getBoundingClientRect().width; }),
        figures: Array.prototype.map.call(document.querySelectorAll("figure.wide img, #cross-dataset img"),
          function (i) { return [i.getBoundingClientRect().width, i.parentElement.clientWidth]; })};
"""
LONG_TERM = "CD14-positive, CD16-negative classical monocyte"  # 47 characters, as Cell Ontology names go
#: what a reader does in the page, in the real browser: filter, search, sort, open a reasoning row
INTERACT = """
var t = document.getElementById("cluster-table");
function shown() { return Array.prototype.filter.call(t.tBodies, function (b) { return !b.hidden; }); }
function set(id, value, event) { var c = document.getElementById(id); c.value = value;
  c.dispatchEvent(new Event(event || "change")); }
var out = {all: shown().length, images: Array.prototype.map.call(document.images, function (i) {
  return i.complete && i.naturalWidth > 0; })};
set("f-show", "low"); out.low = shown().map(function (b) { return b.dataset.type; });
set("f-show", "unknown"); out.unknown = shown().map(function (b) { return b.dataset.type; });
set("f-show", "attention"); out.attention = shown().length; set("f-show", "");
set("f-dataset", document.getElementById("f-dataset").options[2].value);
out.dataset = shown().map(function (b) { return b.dataset.dataset; }); set("f-dataset", "");
set("f-search", "nk  cell", "input"); out.search = shown().map(function (b) { return b.dataset.type; });
set("f-search", "", "input");
var th = t.querySelector("th[data-key=cells]");
th.click(); out.ascending = shown().map(function (b) { return +b.dataset.cells; });
th.click(); out.descending = shown().map(function (b) { return +b.dataset.cells; });
var body = t.tBodies[0], detail = body.querySelector("tr.detail");
out.closed = detail.hidden; body.querySelector("button.more").click();
out.open = !detail.hidden; out.detail_width = detail.getBoundingClientRect().width;
out.table_width = t.getBoundingClientRect().width;
out.scroll_width = document.documentElement.scrollWidth; out.inner_width = window.innerWidth;
return out;
"""


@pytest.mark.skipif(shutil.which("chromium") is None,
                    reason="chromium is not installed (CI installs it with `apt-get install -y chromium`)")
def test_report_fits_the_screen_and_its_cluster_table_works(tiny, tmp_path):
    """No sideways scrolling at the widths people use, even with long ontology names, long reasoning and long
    dataset names; the cluster table filters, searches and sorts; every image loads."""
    run = make_run(tmp_path, tiny, n_success=2)
    for path in run.glob("blood/*/*_clusters.csv"):
        table = pd.read_csv(path, dtype={"cluster": str}, keep_default_na=False)
        table["cell_type_ontology_term"] = LONG_TERM
        table["reasoning"] = table["reasoning"] + " Because " + "the markers agree with the reference " * 20
        table["key_markers"] = "HLA-DRB1,HLA-DQA1,HLA-DPB1,CD74,LYZ,S100A8,S100A9,FCN1,VCAN,CTSS,LST1,AIF1"
        # an LLM run's every column: its score, the annotator's own confidence, the marker evidence
        table["score"] = pd.to_numeric(table["confidence"]).where(lambda c: c < 75, 80.0)
        table["evidence_score"], table["evidence_flag"] = 0.5, False
        table.to_csv(path, index=False)
    from cassia_helpers.summary.crossqc import cell_type_table, plot_cell_type_heatmap

    records = [{"dataset": f"Data_Good{j:03d}_Blood", "term_id": f"CL:{i}", "term_name": name, "n_cells": 5 + i}
               for j in range(2) for i, name in enumerate(CL_NAMES)]
    plot_cell_type_heatmap(cell_type_table(records=records), run / "cell_types.png")
    skipped = "'/data/" + "very_long_folder_name_" * 8 + "/sample.h5ad.gz': skipped: compressed h5ad (gunzip it)"
    (run / "run_manifest.json").write_text(json.dumps({"skipped_inputs": [skipped]}))
    html = write_report(run).read_text(encoding="utf-8")
    assert "1 entry of the input folders not run" in html and "sample.h5ad.gz&#39;: skipped" in html
    assert html.count("data:image/png;base64,") == 2 * 4 + 1  # each dataset's four figures and the heatmap
    # 500 px: headless Chromium's narrowest window, a large phone's width
    for width in (500, 768, 1024, 1400, 1900):
        found = _probe(run, "return [document.documentElement.scrollWidth, window.innerWidth];", width=width)
        assert found[0] <= found[1] == width, f"the page scrolls sideways at {width} px: {found}"
    for width in (500, 768, 1024, 1280):  # a phone, a tablet or half a laptop's screen, a laptop
        found = _probe(run, NARROW, width=width)
        assert found["markers"] >= 150, f"the key markers are crushed at {width} px: {found}"
        if width > 800:
            continue
        assert found["box"][0] > found["box"][1], f"the cluster table does not scroll in its box at {width} px"
        assert min(found["bars"]) >= 100, f"the composition bars are crushed at {width} px: {found}"
        # the UMAP, dot plot and heatmap keep a readable size, scrolling in their box, not shrunk to the phone
        assert len(found["figures"]) == 2 * 2 + 1 and all(w >= 700 for w, _ in found["figures"]), found
    found = _probe(run, INTERACT, width=1280)
    assert "error" not in found, found
    n_types = tiny.obs["leiden"].nunique()
    assert found["all"] == 2 * n_types and found["images"] and all(found["images"])
    assert found["low"] == found["unknown"] == ["Unknown", "Unknown"]  # confidence 0 < 75; 87.5 is not low
    assert found["attention"] == 2
    assert found["dataset"] == ["blood/Data_Good001_Blood"] * n_types
    assert found["search"] == ["NK cell", "NK cell"]  # a phrase, any spacing, any case
    assert found["ascending"] == sorted(found["ascending"]) and found["descending"] == sorted(found["ascending"])[::-1]
    assert found["closed"] and found["open"]
    assert found["detail_width"] > 0.9 * found["table_width"]  # the reasoning gets the table's width
    assert found["scroll_width"] <= found["inner_width"]  # still no sideways scrolling with it open


# --- notebooks (real kernel) -----------------------------------------------------------------------------

def test_notebook_importing_the_package_shows_plots(tmp_path):
    import nbformat
    from nbclient import NotebookClient

    notebook = nbformat.v4.new_notebook(cells=[
        nbformat.v4.new_code_cell("import anndata as ad, numpy as np, pandas as pd\n"
                                  "import scanpy as sc\n"
                                  "from cassia_helpers import figures"),
        nbformat.v4.new_code_cell("adata = ad.AnnData(np.ones((60, 3), dtype=np.float32))\n"
                                  "adata.obsm['X_umap'] = np.random.default_rng(0).normal(size=(60, 2))\n"
                                  "adata.obs['cell_type'] = pd.Categorical(['B cell', 'Unknown', 'NK cell'] * 20)\n"
                                  "adata.obs['leiden'] = pd.Categorical(adata.obs['cell_type'].cat.codes.astype(str))\n"
                                  "figures.set_colors(adata, 'cell_type')"),
        nbformat.v4.new_code_cell("sc.pl.umap(adata, color='cell_type')"),
        nbformat.v4.new_code_cell("figures.umap_figure(adata)"),
    ])
    NotebookClient(notebook, kernel_name="python3", timeout=180,
                   resources={"metadata": {"path": str(tmp_path)}}).execute()
    for cell in notebook.cells[2:]:
        assert any("image/png" in output.get("data", {}) for output in cell.outputs), cell.source


def test_explore_helpers_show_a_run(tiny, tmp_path):
    """What notebooks/explore_run.ipynb's cells display (the notebook itself runs on a real run in
    test_end_to_end.py)."""
    from cassia_helpers.summary import explore

    run = make_run(tmp_path, tiny)
    tiny.write_h5ad(DatasetPaths(run, "blood", "Data_Good000_Blood").annotated_h5ad)
    summary = explore.summary_table(run).to_html()
    assert f">{tiny.n_obs}<" in summary and f">{tiny.n_obs}.0<" not in summary  # numbers as numbers
    failures = explore.failures(run).to_html()
    assert FAILURE.replace("'", "&#39;") in failures or FAILURE in failures
    adata = explore.load_dataset(run, "blood/Data_Good000_Blood")
    scores = explore.cluster_scores(adata).to_html()
    assert "87.5" in scores and "no valid answer" in scores and "no mitochondrial genes" in scores
    # every dataset has its cost row, zeros for one that sent nothing (not an empty table)
    costs = explore.cost_by_dataset(run)
    assert list(costs.index) == ["blood/Data_Good000_Blood", "blood/Data_Bad001_Blood"]
    assert costs.loc["blood/Data_Bad001_Blood", ["calls", "cost"]].tolist() == [0, 0]


# --- the run's cross-dataset heatmap (cell_types.png) ----------------------------------------------------

CL_NAMES = [LONG_TERM, "naive thymus-derived CD4-positive, alpha-beta T cell", "oligodendrocyte precursor cell",
            "CD1c-positive myeloid dendritic cell", "astrocyte of the cerebral cortex", "microglial cell",
            "L2/3-6 intratelencephalic projecting glutamatergic neuron", "unknown"]


@pytest.mark.parametrize("datasets", [["Brain_Sample_01"], ["Brain_Sample_01", "Breast_Biopsy_Long_Name_0042"]])
def test_cell_type_heatmap_is_sized_from_its_long_labels(tmp_path, datasets):
    """One or two datasets with 47+ character Cell Ontology names: the cells keep a readable size, the labels
    neither overlap nor get cut off, and matplotlib does not warn that the layout collapsed."""
    import warnings

    from PIL import Image

    from cassia_helpers.summary.crossqc import cell_type_heatmap_figure, cell_type_table, plot_cell_type_heatmap

    records = [{"dataset": d, "tissue": "brain", "term_id": f"CL:{i:07d}", "term_name": name, "lineage_name": "",
                "n_cells": 10 + 7 * i + j} for j, d in enumerate(datasets) for i, name in enumerate(CL_NAMES)]
    table = cell_type_table(records=records)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # "constrained_layout not applied because axes sizes collapsed to zero"
        figure = cell_type_heatmap_figure(table)
        figure.canvas.draw()
        png = plot_cell_type_heatmap(table, tmp_path / "cell_types.png")
    renderer = figure.canvas.get_renderer()
    ax = figure.axes[0]
    box = ax.get_window_extent(renderer)
    assert box.height >= 0.25 * figure.dpi * len(datasets) and box.width >= 0.25 * figure.dpi * len(CL_NAMES)
    figure_box = figure.bbox
    for label in ax.get_xticklabels() + ax.get_yticklabels():  # every label whole, inside the figure
        extent = label.get_window_extent(renderer)
        assert extent.x0 >= figure_box.x0 - 1 and extent.y0 >= figure_box.y0 - 1, label.get_text()
        assert extent.x1 <= figure_box.x1 + 1 and extent.y1 <= figure_box.y1 + 1, label.get_text()
    rows = [label.get_window_extent(renderer) for label in ax.get_yticklabels()]
    assert not any(a.overlaps(b) for a, b in zip(rows, rows[1:], strict=False))  # dataset names apart
    with Image.open(png) as image:
        assert image.height >= 300 and image.width >= 500 and image.height < 4000, image.size


# --- UMAP labels and colours that do not mislead -----------------------------------------------------------

CROWDED = ["Conventional dendritic cell type 1", "Memory B cell", "Naive CD4+ T cell", "NK cell",
           "CD14-positive, CD16-negative classical monocyte", "Plasmacytoid dendritic cell", "Platelet",
           "Effector memory CD8-positive, alpha-beta T cell", "Unknown"]


def crowded_umap(seed: int = 3):
    """Nine cell types in touching blobs of very different sizes, most with long names: where free-moving
    labels used to end up on a neighbour's cells."""
    import anndata as ad

    rng = np.random.default_rng(seed)
    sizes = [40, 400, 300, 150, 500, 30, 25, 250, 60]
    centres = np.array([(x, y) for y in (0, 3, 6) for x in (0, 3, 6)], dtype=float)
    coords = np.concatenate([c + rng.normal(0, 0.6, (n, 2)) for c, n in zip(centres, sizes, strict=True)])
    types = np.repeat(CROWDED, sizes)
    adata = ad.AnnData(np.zeros((len(types), 1), dtype=np.float32))
    adata.obsm["X_umap"] = coords
    adata.obs["cell_type"] = pd.Categorical(types)
    adata.obs["leiden"] = pd.Categorical(np.repeat([str(i) for i in range(len(CROWDED))], sizes))
    return adata


def packed_umap():
    """Five small types with long names side by side in one corner of a wide picture (the T and NK cells of a
    PBMC sample): no spot on their own cells leaves room for every label."""
    import anndata as ad

    rng = np.random.default_rng(0)
    names = ["CD4+ T cell", "Effector memory CD8+ T cell", "CD56dim NK cell", "CD8+ T cell", "Naive B cell",
             "Classical monocyte", "Plasma cell"]
    centres = [(0, 0), (0.5, 0.2), (1.0, 0.0), (0.5, -0.3), (0.2, -0.6), (9, 9), (4, -8)]
    sizes = [60, 40, 30, 40, 30, 300, 40]
    coords = np.concatenate([c + rng.normal(0, 0.1, (n, 2)) for c, n in zip(centres, sizes, strict=True)])
    adata = ad.AnnData(np.zeros((len(coords), 1), dtype=np.float32))
    adata.obsm["X_umap"] = coords
    adata.obs["cell_type"] = pd.Categorical(np.repeat(names, sizes))
    adata.obs["leiden"] = pd.Categorical(np.repeat([str(i) for i in range(len(names))], sizes))
    return adata


@pytest.mark.parametrize("make", [crowded_umap, packed_umap])
def test_umap_labels_sit_on_their_own_cells(make):
    from scipy.spatial import cKDTree

    adata = make()
    figure = figures.umap_figure(adata)
    coords = np.asarray(adata.obsm["X_umap"])
    types = adata.obs["cell_type"].astype(str).to_numpy()
    clusters = adata.obs["leiden"].astype(str).to_numpy()
    tree = cKDTree(coords)
    renderer = figure.canvas.get_renderer()
    for ax, groups in zip(figure.axes[:2], (types, clusters), strict=True):
        texts = [t for t in ax.texts if t.get_text()]
        # every group labelled once (a long name may be broken onto two lines)
        assert sorted(t.get_text().replace("\n", " ") for t in texts) == sorted(set(groups))
        for text in texts:
            name = text.get_text().replace("\n", " ")
            # a label with no free spot on its cells stands beside them, its line pointing at them
            point = text.xy if getattr(text, "arrow_patch", None) else text.get_position()
            _, nearest = tree.query(point, k=15)
            own = float(np.mean(groups[nearest] == name))
            assert own >= 0.7, f"label {name!r} sits on other cells ({own:.0%} of its 15 nearest are its own)"
        from matplotlib.text import Text

        boxes = [Text.get_window_extent(t, renderer) for t in texts]  # the words (an annotation's: without its line)
        assert not any(a.overlaps(b) for i, a in enumerate(boxes) for b in boxes[i + 1:]), "labels overlap"


def test_run_palette_keeps_a_dataset_s_colours_apart():
    from cassia_helpers.palette import MIN_DISTANCE, color_distance

    assert color_distance("#000000", "#000000") == 0 and color_distance("#000000", "#ffffff") > 99
    assert color_distance("#555522", "#446600") < MIN_DISTANCE  # the two olives the issue saw side by side
    pool = sorted({*CROWDED, *BLOOD_TYPES, "Astrocyte", "Microglial cell", "Oligodendrocyte", "Fibroblast",
                   "Endothelial cell", "Pericyte", "Luminal epithelial cell", "Basal cell", "Adipocyte",
                   "Mast cell", "Macrophage", "Neutrophil", "Regulatory T cell", "Erythrocyte"} - {"Unknown"})
    rng = np.random.default_rng(0)
    for n in (2, 5, 10, 15, 20):
        for _ in range(20):
            labels = list(rng.choice(pool, n, replace=False))
            colors = list(run_palette(labels).values())
            closest = min(color_distance(a, b) for i, a in enumerate(colors) for b in colors[i + 1:])
            assert closest >= MIN_DISTANCE, (n, labels, closest)
    # the two types the issue found in the same olive stay apart, and a label alone keeps its hashed colour
    pair = run_palette(["Memory B cell", "Conventional dendritic cell type 1"])
    assert color_distance(*pair.values()) >= MIN_DISTANCE
    alone = run_palette(["Memory B cell"])["Memory B cell"]
    assert alone == run_palette(["Memory B cell", "Platelet"])["Memory B cell"]


# --- QC figure without recorded histograms, dot plot filters, preprocessing without plotting ------------------

def test_qc_figure_without_recorded_histograms_shows_the_cells_kept(tiny):
    adata = tiny.copy()
    adata.uns["cassia_batch"] = {"qc": {"min_genes": 120}}  # an h5ad from elsewhere: no distributions
    figure = figures.qc_figure(adata)
    for ax in figure.axes:
        texts = [t.get_text() for t in ax.texts]
        assert "not recorded" not in texts, ax.get_title()
        bars = [p for p in ax.patches if p.get_label() == "after QC"]
        assert len(bars) == 1 and not [p for p in ax.patches if p.get_label() == "before QC"], ax.get_title()


def test_qc_figure_of_an_input_without_counts_names_what_it_shows(tiny):
    adata = tiny.copy()
    titles = [ax.get_title() for ax in figures.qc_figure(adata).axes]
    assert titles == ["Genes per cell", "Counts per cell", "Mitochondrial counts (%)"]
    adata.uns["cassia_batch"] = {**adata.uns["cassia_batch"], "input": {"is_counts": False}}
    titles = [ax.get_title() for ax in figures.qc_figure(adata).axes]
    assert titles == ["Genes per cell", "Sum of log-normalised values per cell", "Mitochondrial share of that sum (%)"]


def test_dotplot_filters_markers_as_the_run_did(tiny):
    adata = tiny.copy()
    clusters = [str(c) for c in adata.obs["leiden"].cat.categories]
    genes = list(adata.var_names[:2])
    # per cluster: a weak gene ranked first (log fold change 0.1), a strong one second
    markers = pd.DataFrame([{"cluster": c, "rank": r, "gene": g, "logfoldchange": lfc, "pval_adj": 0.001}
                            for c in clusters for r, (g, lfc) in enumerate(zip(genes, (0.1, 2.0), strict=True))])

    def shown(**used):
        adata.uns["cassia_batch"]["marker_filter"] = used
        figure = figures.dotplot_figure(adata, markers=markers)
        return [label.get_text() for label in figure.axes[0].get_xticklabels()]

    assert shown(max_pval_adj=0.05, min_logfc=0.25) == [genes[1]]  # the run's filter: the weak gene is out
    assert shown(max_pval_adj=0.05, min_logfc=0.05) == genes  # a run with a looser filter shows it
    assert shown() == [genes[1]]  # no record: the settings' defaults (0.05, 0.25)


def test_preprocessing_does_not_import_plotting():
    code = "import sys, cassia_helpers.dataset.pp; print('cassia_helpers.dataset.figures' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "False"


# --- JupyterLab ----------------------------------------------------------------------------------------------

@pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")
@pytest.mark.parametrize("uid", ["0", "1000"])
def test_make_lab_opens_the_project_folder_and_runs_as_root(tmp_path, uid):
    """`make lab`'s command: rooted at the project folder (run folders and notebooks/ both visible), the explore
    notebook open, and Jupyter's --allow-root exactly when run as root (`id -u` answers as root or not)."""
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "id").write_text(f"#!/bin/sh\necho {uid}\n")
    (fake / "id").chmod(0o755)
    done = subprocess.run(["make", "-n", "lab", "LAB_ARGS=--no-browser"], cwd=REPO, capture_output=True,
                          text=True, timeout=60, env={**os.environ, "PATH": f"{fake}:{os.environ['PATH']}"})
    assert done.returncode == 0, done.stderr
    command = [line for line in done.stdout.splitlines() if "jupyter lab" in line][-1].split()
    assert ("--allow-root" in command) == (uid == "0")
    assert "--ServerApp.root_dir=." in command and "--no-browser" in command
    assert command[-1] == "notebooks/explore_run.ipynb" and (REPO / command[-1]).is_file()


def test_explore_opens_the_newest_finished_run(tiny, tmp_path):
    from cassia_helpers.summary import explore

    run = make_run(tmp_path, tiny)  # run_blood_20260216_151425
    broken = tmp_path / "run_blood_20260301_090000"  # newer, stopped before its summaries
    broken.mkdir()
    (broken / "run_manifest.json").write_text("{}")
    assert explore.latest_run(tmp_path) == run
    (run / "batch_summary.csv").unlink()
    with pytest.raises(FileNotFoundError, match="no run has a batch_summary.csv yet"):
        explore.latest_run(tmp_path)


@pytest.mark.skipif(shutil.which("chromium") is None,
                    reason="chromium is not installed (CI installs it with `apt-get install -y chromium`)")
def test_explore_cluster_scores_wrap_between_words(tiny, tmp_path):
    """The explore notebook's per-cluster table, as Jupyter shows it in a 900 px column: text breaks between
    words, never a letter per line."""
    from cassia_helpers.summary import explore

    adata = tiny.copy()
    table = adata.uns["cassia_batch"]["annotation"]["clusters"]
    table["reason"] = table["reason"].where(table["reason"] == "", "no valid answer after 3 attempts: " * 3)
    for i in range(16):  # as many columns as a full pipeline's table (scores, ontology, evidence, levels)
        table[f"check_{i}"] = f"a few words of check {i}"
    page = tmp_path / "scores.html"
    page.write_text(f"<html><body>{explore.cluster_scores(adata).to_html()}</body></html>", encoding="utf-8")
    found = _probe_page(page, "return Array.prototype.map.call(document.querySelectorAll('td'), function (td) {"
                              " return [td.textContent.trim(), td.getBoundingClientRect().width]; });", width=900)
    squeezed = [(text, width) for text, width in found if len(text) > 12 and width < 60]
    assert not squeezed, squeezed


def _probe_page(page: Path, script: str, *, width: int):
    sys.path.insert(0, str(SCREENSHOT.parent))
    try:
        from report_screenshot import probe
    finally:
        sys.path.remove(str(SCREENSHOT.parent))
    return probe(page, script, width=width, height=900)


def test_qc_mito_panel_stays_readable_when_every_cell_is_far_below_the_threshold(tiny):
    """A log-normalised input: mitochondrial shares of a fraction of a percent against max_pct_mt = 20. The
    panel's axis keeps to the data (bars wider than a pixel) and still names the threshold."""
    adata = tiny.copy()
    adata.obs["pct_counts_mt"] = np.random.default_rng(0).uniform(0, 0.6, adata.n_obs)
    adata.uns["cassia_batch"] = {"qc": {"min_genes": 120, "max_pct_mt": 20.0}}
    figure = figures.qc_figure(adata)
    mito = figure.axes[2]
    figure.canvas.draw()
    assert mito.get_xlim()[1] < 1.0
    bar = [p for p in mito.patches if p.get_label() == "after QC"][0].get_window_extent()
    assert bar.width > 100  # the histogram spans the panel, not a sliver at its left edge
    assert any("max_pct_mt = 20" in t.get_text() for t in mito.texts)


def test_the_clusters_have_the_same_colours_in_our_figures_and_in_scanpys(tiny, tmp_path):
    adata = tiny.copy()
    adata.uns.pop("leiden_colors", None)
    figures.save_dataset_figures(adata, DatasetPaths(tmp_path, "blood", "Tiny"))
    stored = list(adata.uns["leiden_colors"])  # what sc.pl.umap(color='leiden') will use
    assert len(stored) == adata.obs["leiden"].cat.categories.size
    assert figures.cluster_palette(adata, "leiden") == stored
    adata.uns["leiden_colors"] = np.array(["#000000"] * len(stored), dtype=object)  # the lab's own colours
    assert figures.cluster_palette(adata, "leiden", store=True) == ["#000000"] * len(stored)


def test_explore_tables_escape_what_models_servers_and_file_names_wrote(tiny):
    """A label, a reason, a warning, a dataset name or a column from a model, a server or a file name is shown
    as text in JupyterLab, never run: a notebook's own output is trusted there."""
    from cassia_helpers.summary import explore

    evil = '<img src=x onerror="alert(1)">'
    page = explore.styled(pd.DataFrame({"dataset": [evil], "n_cells": [3], "score": [0.5], evil: ["x"]})).to_html()
    assert "<img" not in page and "&lt;img src=x" in page and ">3<" in page and ">0.5<" in page
    adata = tiny.copy()
    table = adata.uns["cassia_batch"]["annotation"]["clusters"]
    table["reason"] = evil
    adata.uns["cassia_batch"]["warnings"] = [f"dataset {evil} warned"]
    page = explore.cluster_scores(adata).to_html()
    assert "<img" not in page and page.count("&lt;img src=x") >= 2


def test_labels_and_names_with_dollar_signs_are_drawn_as_text(tiny, tmp_path):
    """A label a model wrote or a dataset file name with ``$...$`` (``sample $x^{$``) is text: matplotlib would
    read it as TeX and fail the figure, the dataset or the run's summaries."""
    from cassia_helpers.summary.crossqc import cell_type_heatmap_figure

    adata = tiny.copy()
    odd = ["T $x^{$ cell", "B cell $_$", "$\\undefinedcommand{x}$"]
    adata.obs["cell_type"] = pd.Categorical([odd[i % 3] for i in range(adata.n_obs)])
    adata.obs["leiden"] = pd.Categorical([str(i % 3) for i in range(adata.n_obs)])
    adata.uns.pop("cell_type_colors", None)
    for figure in (figures.umap_figure(adata), figures.cluster_sizes_figure(adata)):
        figures.save_figure(figure, tmp_path / "f.png")
        assert (tmp_path / "f.png").stat().st_size > 1000
        assert figure._repr_png_()[:4] == b"\x89PNG"
    table = pd.DataFrame({"dataset": ["blood/sample $x^{$ and $_$"] * 3, "cell_type_ontology_term": odd,
                          "fraction": [0.2, 0.3, 0.5],
                          "n_cells": [2, 3, 5]})
    figures.save_figure(cell_type_heatmap_figure(table), tmp_path / "heatmap.png")
    assert (tmp_path / "heatmap.png").stat().st_size > 1000
