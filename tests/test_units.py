"""Unit tests of the pieces: discovery, run naming, the markers table, annotation into obs, prices and the
merge of ledgers into token_tracking.json."""

from __future__ import annotations

import json
from datetime import datetime

import anndata as ad
import numpy as np
import pandas as pd
import pytest

from cassia_helpers.batch.discovery import UsageError, discover, single_input
from cassia_helpers.contract import DatasetPaths, new_run_dir, run_label
from cassia_helpers.dataset import markers, record
from cassia_helpers.dataset import pp as preprocess
from cassia_helpers.dataset.annotate import ClusterAnnotation, ClusterMarkers
from cassia_helpers.dataset.annotate.apply import annotate_clusters
from cassia_helpers.prices import PriceTable
from cassia_helpers.summary.aggregate import token_tracking
from tests.synthetic import BLOOD_TYPES, make_counts


def touch(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"")
    return path


def test_discovery_selects_tissues_and_names_datasets_by_stem(tmp_path):
    touch(tmp_path / "brain" / "Data_A_Brain.h5ad")
    touch(tmp_path / "brain" / "Data B ü.h5ad")
    touch(tmp_path / "brain" / "notes.txt")
    touch(tmp_path / "breast" / "Data_C_Breast.h5ad")
    (tmp_path / "empty").mkdir()
    found = discover(tmp_path, ["brain"]).datasets
    assert [(d.tissue, d.name) for d in found] == [("brain", "Data B ü"), ("brain", "Data_A_Brain")]
    assert {d.tissue for d in discover(tmp_path, ["all"]).datasets} == {"brain", "breast"}
    assert len(discover(tmp_path, ["brain", "breast", "brain"]).datasets) == 3


def test_discovery_names_every_entry_it_skips_and_reads_upper_case_suffixes(tmp_path):
    touch(tmp_path / "lung" / "Upper.H5AD")
    for name in ("packed.h5ad.gz", "store.zarr", "cells.loom", "trailing.h5ad "):
        touch(tmp_path / "lung" / name)
    (tmp_path / "lung" / "gone.h5ad").symlink_to(tmp_path / "nowhere.h5ad")
    found = discover(tmp_path, ["all"])
    assert [d.name for d in found.datasets] == ["Upper"]
    skipped = "\n".join(found.skipped)
    assert len(found.skipped) == 5
    for name, reason in [("packed.h5ad.gz", "compressed"), ("store.zarr", "zarr"), ("cells.loom", "loom"),
                         ("trailing.h5ad ", "space"), ("gone.h5ad", "broken symbolic link")]:
        assert any(name in line and reason in line for line in found.skipped), (name, skipped)


def test_a_10x_matrix_folder_beside_the_datasets_is_named_with_how_to_convert_it(tmp_path):
    touch(tmp_path / "blood" / "sample.h5ad")
    for name in ("matrix.mtx.gz", "barcodes.tsv.gz", "features.tsv.gz"):  # Cell Ranger's folder
        touch(tmp_path / "blood" / "filtered_feature_bc_matrix" / name)
    for name in ("GSM1_matrix.mtx", "GSM1_barcodes.tsv", "GSM1_genes.tsv"):  # as GEO names them, version 2
        touch(tmp_path / "blood" / "GSM1" / name)
    touch(tmp_path / "blood" / "loose.mtx.gz")
    touch(tmp_path / "blood" / "notes" / "readme.txt")  # any other folder is not a dataset: nothing to say
    found = discover(tmp_path, ["blood"])
    assert [d.name for d in found.datasets] == ["sample"]
    assert len(found.skipped) == 3, found.skipped
    for name in ("filtered_feature_bc_matrix", "GSM1"):
        [line] = [s for s in found.skipped if s.startswith(str(tmp_path / "blood" / name) + ":")]
        assert "10x matrix folder" in line and "scanpy.read_10x_mtx" in line and "write_h5ad" in line
    assert any("loose.mtx.gz" in s and "scanpy.read_10x_mtx" in s for s in found.skipped)
    with pytest.raises(UsageError, match="10x matrix folder"):
        single_input(tmp_path / "blood" / "GSM1", "blood")


@pytest.mark.parametrize("tissues", [["lung"], []])
def test_unknown_or_empty_selection_lists_the_tissues_found(tmp_path, tissues):
    touch(tmp_path / "brain" / "x.h5ad")
    touch(tmp_path / "breast" / "y.h5ad")
    with pytest.raises(UsageError, match="brain, breast"):
        discover(tmp_path, tissues)


def test_run_folder_names_and_no_reuse(tmp_path):
    assert run_label(["brain"], all_tissues=False) == "brain"
    assert run_label(["brain", "breast"], all_tissues=False) == "brain_breast"
    assert run_label(["brain"], all_tissues=True) == "all"
    moment = datetime(2026, 2, 16, 15, 14, 25)
    first = new_run_dir(tmp_path, "brain", now=moment)
    second = new_run_dir(tmp_path, "brain", now=moment)
    assert first.name == "run_brain_20260216_151425"
    assert second != first and second.name.startswith("run_brain_20260216_1514")


@pytest.fixture(scope="module")
def clustered():
    adata = make_counts(400, cell_types=BLOOD_TYPES, seed=5)
    record.provenance(adata)["input"] = {"is_counts": True, "file": "synthetic.h5ad"}
    preprocess.qc(adata, min_genes=50)
    preprocess.normalize(adata)
    preprocess.reduce_dimensions(adata, n_pcs=20)
    preprocess.neighbors(adata)
    preprocess.cluster(adata, resolution=0.3)
    return adata


def test_markers_table_is_tidy_and_ranked(clustered):
    table = markers.rank_markers(clustered, n_genes=25)
    assert list(table.columns) == markers.MARKER_COLUMNS
    assert set(table["cluster"]) == set(clustered.obs["leiden"].astype(str))
    for _, rows in table.groupby("cluster"):
        assert list(rows["rank"]) == list(range(1, 26))
        assert rows["score"].is_monotonic_decreasing
    assert table[["pct_in_cluster", "pct_out_cluster"]].stack().between(0, 1).all()
    # scanpy's own layout is kept too, compactly (the top genes), so sc.pl.rank_genes_groups_* work
    assert set(clustered.uns["rank_genes_groups"]["names"].dtype.names) == set(table["cluster"])
    # each true type's cluster ranks its own markers first
    lists = {c.cluster: c for c in markers.cluster_markers(clustered, table, n_top=10)}
    for truth, genes in BLOOD_TYPES.items():
        cluster = clustered.obs.loc[clustered.obs["truth"] == truth, "leiden"].value_counts().index[0]
        assert set(lists[str(cluster)].genes[:4]) <= set(genes)


def test_markers_tested_in_gene_chunks_equal_one_scanpy_call(clustered):
    import scanpy as sc

    chunked = markers.rank_markers(clustered, n_genes=40, min_pct=0, gene_chunk=37)
    whole = clustered.copy()
    sc.tl.rank_genes_groups(whole, "leiden", reference="rest", method="wilcoxon", pts=True, use_raw=False)
    expected = sc.get.rank_genes_groups_df(whole, group=None)
    for cluster, rows in chunked.groupby("cluster"):
        reference = expected[expected["group"] == cluster].head(40)
        # the same scores in the same order (genes with tied scores may come in another order)
        np.testing.assert_allclose(rows["score"], reference["scores"], rtol=1e-5)
        merged = rows.merge(reference, left_on="gene", right_on="names")
        assert len(merged) >= 30
        np.testing.assert_allclose(merged["score"], merged["scores"], rtol=1e-5)
        np.testing.assert_allclose(merged["pval_adj"], merged["pvals_adj"], rtol=1e-6, atol=1e-300)
        np.testing.assert_allclose(merged["pct_out_cluster"], merged["pct_nz_reference"], rtol=1e-6)
    # the detection filter drops genes nobody expresses, and says how many were tested
    markers.rank_markers(clustered, n_genes=40)
    assert 0 < record.provenance(clustered)["markers"]["genes_tested"] <= clustered.n_vars


def test_marker_filters_and_single_cell_clusters(clustered):
    adata = clustered.copy()
    labels = adata.obs["leiden"].astype(str).to_numpy().copy()
    labels[0] = "lonely"
    adata.obs["leiden"] = pd.Categorical(labels)
    table = markers.rank_markers(adata, n_genes=30)
    assert "lonely" not in set(table["cluster"])
    assert any("single cell" in w for w in record.provenance(adata)["warnings"])
    strict = markers.cluster_markers(adata, table, n_top=50, max_pval_adj=1e-300, min_logfc=100.0)
    assert all(len(c.genes) == 30 for c in strict)  # nothing passed: the top ranked genes are sent instead
    assert any("fewer than 5 markers" in w for w in record.provenance(adata)["warnings"])


def test_markers_csv_has_a_row_for_every_gene_sent_to_the_annotator(clustered, tmp_path):
    from cassia_helpers.dataset.cassia_format import SEURAT_MARKER_COLUMNS
    from cassia_helpers.dataset.outputs import write_markers

    top = 20  # the CSV's top ranks (100 in a run), fewer than the genes sent, as on real data
    adata = clustered.copy()
    full = markers.rank_markers(adata, n_genes=None)
    sent = markers.cluster_markers(adata, full, n_top=50)
    paths = DatasetPaths(tmp_path, "blood", "demo")
    paths.folder.mkdir(parents=True)
    written = pd.read_csv(write_markers(full, paths, sent=sent, n_genes=top))
    assert list(written.columns) == SEURAT_MARKER_COLUMNS
    ranks = full.set_index(["cluster", "gene"])["rank"]
    assert any(ranks[(c.cluster, g)] > top for c in sent for g in c.genes)  # the case that matters
    for c in sent:
        own = written[written["cluster"].astype(str) == c.cluster].set_index("gene")
        # the statistics of each gene the annotator saw, as it saw them
        assert set(c.genes) <= set(own.index), sorted(set(c.genes) - set(own.index))
        np.testing.assert_allclose(own.loc[c.genes, "avg_log2FC"], c.logfoldchanges, atol=1e-3)
        # still the top ranks first, in the test's order, with no gene twice
        assert list(own["rank"][:top]) == list(range(1, top + 1))
        assert own["rank"].is_monotonic_increasing and own.index.is_unique


@pytest.mark.slow
def test_neighbors_beyond_8192_cells():
    # scanpy 1.11 + scipy 1.17 broke here ('csr_array' object has no attribute 'getnnz'); from 8192 cells on,
    # scanpy hands the approximate search to PyNNDescentTransformer, whose graph is built and read as before.
    adata = make_counts(8400, cell_types=BLOOD_TYPES, n_background=150, seed=9)
    record.provenance(adata)["input"] = {"is_counts": True}
    preprocess.normalize(adata)
    preprocess.reduce_dimensions(adata, n_pcs=10)
    preprocess.neighbors(adata, exact_max_cells=0)  # the approximate search is where it broke
    assert record.provenance(adata)["neighbors"]["search"] == "pynndescent"
    preprocess.cluster(adata)
    assert adata.obsp["connectivities"].shape == (8400, 8400)
    approximate = adata.obsp["connectivities"].copy()
    preprocess.neighbors(adata)
    assert record.provenance(adata)["neighbors"]["search"] == "exact"
    # both searches find (nearly) the same graph
    overlap = (approximate > 0).multiply(adata.obsp["connectivities"] > 0).sum() / (approximate > 0).sum()
    assert overlap > 0.9
    assert adata.obs["leiden"].nunique() >= 3


class FixedAnnotator:
    name = "fixed"

    def annotate(self, clusters, *, tissue, species, context=""):
        return [ClusterAnnotation(c.cluster, f"type {c.cluster}", confidence=80, key_markers=c.genes[:1])
                for c in clusters[:-1]]

    def describe(self):
        return {"annotator": "fixed"}


def test_annotate_clusters_labels_every_cell(clustered):
    adata = clustered.copy()
    clusters = [ClusterMarkers(str(c), ["G"]) for c in adata.obs["leiden"].cat.categories]
    results = annotate_clusters(adata, clusters, annotator=FixedAnnotator(), tissue="blood")
    assert adata.obs["cell_type"].notna().all()
    missing = clusters[-1].cluster
    assert set(adata.obs.loc[adata.obs["leiden"] == missing, "cell_type"]) == {"Unknown"}
    assert results[-1].reason == "annotator returned no answer"
    table = record.provenance(adata)["annotation"]["clusters"]
    assert list(table["n_cells"]) == [int((adata.obs["leiden"] == c.cluster).sum()) for c in clusters]
    assert adata.obs["cell_type_confidence"].max() == 80


@pytest.mark.parametrize("model, price", [
    ("gpt-4o-2024-08-06", (2.50, 10.00)), ("gpt-4o-2024-05-13", (5.00, 15.00)),  # the snapshot's own entry wins
    ("openai/gpt-4o-2024-05-13", (5.00, 15.00)), ("GPT-4o-mini", (0.15, 0.60)), ("claude-sonnet-4-20250514",
    (3.00, 15.00)), ("claude-3-5-haiku-latest", (0.80, 4.00)), ("OpenAI/o3", (2.00, 8.00)),
    # other models whose names start with a known one, and tiers of a model, have no price of theirs here
    ("gpt-5-pro", None), ("o3-pro", None), ("o3-deep-research", None), ("o4-mini-deep-research", None),
    ("openai/gpt-4o-mini:free", None), ("deepseek-r1-distill-llama-70b", None), ("gpt-4o-audio-preview", None),
])
def test_a_price_is_that_of_the_model_or_its_dated_snapshot_never_of_a_name_it_starts_with(model, price):
    found = PriceTable().lookup(model)
    assert ((found.input_per_1m, found.output_per_1m) if found.known else None) == price


def test_price_table_matches_snapshots_and_prefixes_and_flags_unknown(tmp_path):
    table = PriceTable()
    assert table.lookup("gpt-4o-mini").input_per_1m == 0.15
    assert table.lookup("gpt-4o-mini-2024-07-18").output_per_1m == 0.60
    assert table.lookup("openai/gpt-4o").input_per_1m == 2.50
    assert table.lookup("my-local-llama").known is False
    assert table.lookup("gpt-4o-mini").cost(1_000_000, 1_000_000) == pytest.approx(0.75)
    custom = tmp_path / "prices.json"
    custom.write_text(json.dumps({"my-local-llama": {"input": 0.1, "output": 0.2}}))
    assert PriceTable.load(custom).lookup("my-local-llama").known
    assert PriceTable.load(None, model="gpt-4o", input_price=1.0).lookup("gpt-4o").input_per_1m == 1.0
    custom.write_text("[1, 2]")
    with pytest.raises(ValueError, match="prices.json"):
        PriceTable.load(custom)


def test_token_tracking_merges_ledgers_counting_each_request_once(tmp_path):
    manifest = {"datasets": [{"name": "A", "tissue": "t", "path": "a.h5ad"},
                             {"name": "B", "tissue": "t", "path": "b.h5ad"}]}
    (tmp_path / "run_manifest.json").write_text(json.dumps(manifest))

    def record(status, tokens_in, tokens_out, cost, model="m1", dataset="A"):
        return json.dumps({"timestamp": f"2026-01-01T00:00:0{tokens_in % 10}", "dataset": dataset, "tissue": "t",
                           "cluster": "0", "agent": "annotator", "model": model, "input_tokens": tokens_in,
                           "output_tokens": tokens_out, "cost": cost, "status": status, "price_known": model == "m1"})

    ledger_a = DatasetPaths(tmp_path, "t", "A").llm_calls_jsonl
    ledger_a.parent.mkdir(parents=True)
    ledger_a.write_text("\n".join([record("ok", 100, 10, 0.5), record("error", 0, 0, 0.0),
                                   record("cache_hit", 0, 0, 0.0)]) + '\n{"torn')
    ledger_b = DatasetPaths(tmp_path, "t", "B").llm_calls_jsonl
    ledger_b.parent.mkdir(parents=True)
    ledger_b.write_text(record("ok", 7, 3, 0.0, model="m2", dataset="B") + "\n" + record("budget", 0, 0, 0))
    tracking = token_tracking(tmp_path)
    assert tracking["total_calls"] == 3 and tracking["failed_calls"] == 1
    assert tracking["total_input_tokens"] == 107 and tracking["total_output_tokens"] == 13
    assert tracking["total_tokens"] == 120 and tracking["total_cost"] == 0.5
    assert tracking["cache_hits"] == 1 and tracking["budget_skipped"] == 1
    assert tracking["unknown_price_models"] == ["m2"]
    assert tracking["by_dataset"]["t/A"]["calls"] == 2 and tracking["by_model"]["m2"]["price_known"] is False
    assert np.all([c["status"] in ("ok", "error") for c in tracking["api_calls"]])


@pytest.mark.parametrize("dense", [False, True])
def test_written_counts_layer_equals_the_filtered_input_counts(tmp_path, dense):
    from cassia_helpers.dataset.counts import write_counts_layer
    from cassia_helpers.dataset.outputs import write_annotated

    adata = make_counts(300, seed=4)
    adata.X[0, 0] = 70_000  # a very high count must survive the float32 round trip too
    if dense:
        adata.X = adata.X.toarray()
    record.provenance(adata)["input"] = {"is_counts": True, "file": "in.h5ad"}
    preprocess.qc(adata, min_genes=50)
    expected = adata.copy()
    preprocess.normalize(adata)
    assert "counts" not in adata.layers  # no second copy of the matrix while the pipeline runs
    paths = DatasetPaths(tmp_path, "blood", "d")
    paths.folder.mkdir(parents=True)
    written = ad.read_h5ad(write_annotated(adata, paths))
    counts = written.layers["counts"]
    assert type(counts) is type(expected.X)
    difference = counts - expected.X
    assert np.abs(difference).max() == 0
    assert np.allclose(written.X.toarray() if not dense else written.X, adata.X.toarray() if not dense else adata.X)
    assert not write_counts_layer(adata, paths.annotated_h5ad)  # never overwrites a layer already there


def test_dry_run_lists_datasets_and_estimates_without_sending(tmp_path, capsys, monkeypatch, llm_server):
    from cassia_helpers.batch.cli import main

    data = tmp_path / "data"
    make_counts(300, seed=1).write_h5ad(touch(data / "blood" / "Data_A.h5ad"))
    (data / "blood" / "Broken.h5ad").write_text("nope")
    monkeypatch.setenv("OPENAI_API_KEY", "sk-dry")
    code = main(["--data-dir", str(data), "--tissues", "blood", "--dry-run", "--base-url", llm_server.base_url,
                 "--output-dir", str(tmp_path / "out")])
    out = capsys.readouterr().out
    assert code == 1 and "Dry run: 2 dataset(s)" in out  # an input that cannot run makes the dry run fail
    assert "Data_A" in out and "300" in out and "Broken.h5ad: not an HDF5/h5ad file" in out
    assert "Estimated API calls:" in out and "Estimated cost: $" in out
    assert llm_server.stats()["requests"] == 0 and not (tmp_path / "out").exists()


def test_workers_share_the_cores_instead_of_oversubscribing_them(monkeypatch):
    from cassia_helpers.batch.runner import THREAD_VARIABLES, worker_environment

    monkeypatch.setattr("os.sched_getaffinity", lambda pid: {0, 1, 2, 3}, raising=False)
    one = worker_environment(1, {"PATH": "/bin"})
    two = worker_environment(2, {"PATH": "/bin", "OMP_NUM_THREADS": "4"})
    many = worker_environment(8, {})
    fewer = worker_environment(1, {"OPENBLAS_NUM_THREADS": "1"})
    assert one["PATH"] == "/bin"
    assert {one[v] for v in THREAD_VARIABLES} == {"4"}
    assert {two[v] for v in THREAD_VARIABLES} == {"2"}
    assert {many[v] for v in THREAD_VARIABLES} == {"1"}
    # a user's smaller setting is kept
    assert fewer["OPENBLAS_NUM_THREADS"] == "1" and fewer["OMP_NUM_THREADS"] == "4"


def test_blocked_pca_matches_scanpy_pca_on_the_same_genes_sparse_and_dense():
    import scanpy as sc

    adata = make_counts(600, seed=5)
    record.provenance(adata)["input"] = {"is_counts": True, "file": "in.h5ad"}
    preprocess.qc(adata, min_genes=50)
    preprocess.normalize(adata)
    dense = adata.copy()
    dense.X = dense.X.toarray()
    preprocess.reduce_dimensions(adata, n_top_genes=150, n_pcs=10)
    preprocess.reduce_dimensions(dense, n_top_genes=150, n_pcs=10)
    reference = adata.copy()
    sc.pp.pca(reference, n_comps=10, mask_var="highly_variable", svd_solver="covariance_eigh")
    ours, theirs = adata.obsm["X_pca"], reference.obsm["X_pca"]
    signs = np.sign((ours * theirs).sum(axis=0))
    np.testing.assert_allclose(ours, theirs * signs, atol=1e-3 * np.abs(theirs).max())
    np.testing.assert_allclose(adata.uns["pca"]["variance"], reference.uns["pca"]["variance"], rtol=1e-3)
    np.testing.assert_allclose(dense.obsm["X_pca"], ours, atol=1e-4 * np.abs(ours).max())


def test_highly_variable_genes_match_scanpy_seurat_flavour():
    import scanpy as sc

    adata = make_counts(500, seed=6)
    record.provenance(adata)["input"] = {"is_counts": True, "file": "in.h5ad"}
    preprocess.qc(adata, min_genes=50)
    preprocess.normalize(adata)
    adata.X[:, :3] = 0  # genes never expressed: no dispersion, never highly variable
    for n_top in (50, 200, adata.n_vars):
        reference = adata.copy()
        sc.pp.highly_variable_genes(reference, n_top_genes=n_top, flavor="seurat")
        mask = preprocess.highly_variable_genes(adata, n_top_genes=n_top)
        assert mask.sum() >= min(n_top, adata.n_vars - 3) and not mask[:3].any()
        np.testing.assert_array_equal(mask, reference.var["highly_variable"].to_numpy())
        np.testing.assert_allclose(adata.var["dispersions_norm"], reference.var["dispersions_norm"], rtol=1e-4)


def test_in_place_qc_subset_and_normalisation_equal_scanpys():
    import scanpy as sc
    import scipy.sparse as sp

    adata = make_counts(400, seed=7)
    rng = np.random.default_rng(0)
    cells, genes = rng.random(adata.n_obs) < 0.7, rng.random(adata.n_vars) < 0.6
    expected = adata[cells, genes].copy()
    preprocess.subset_in_place(adata, cells, genes)
    assert adata.shape == expected.shape and adata.obs_names.equals(expected.obs_names)
    assert adata.var_names.equals(expected.var_names)
    assert adata.X.has_sorted_indices and (adata.X != expected.X).nnz == 0
    assert np.array_equal(adata.X.indptr, expected.X.indptr)

    # a matrix (or array) still held elsewhere is left intact: the subset is then a copy
    for held_part in ("matrix", "data"):
        other = make_counts(400, seed=7)
        held = other.X if held_part == "matrix" else other.X.data
        before = held.copy()
        preprocess.subset_in_place(other, cells, genes)
        assert (held != before).nnz == 0 if held_part == "matrix" else np.array_equal(held, before)
        assert (other.X != expected.X).nnz == 0

    record.provenance(adata)["input"] = {"is_counts": True, "file": "in.h5ad"}
    dense = adata.copy()
    dense.X = dense.X.toarray()
    preprocess.normalize(adata, target_sum=1e4)
    preprocess.normalize(dense, target_sum=1e4)
    sc.pp.normalize_total(expected, target_sum=1e4)
    sc.pp.log1p(expected)
    assert sp.issparse(adata.X)
    np.testing.assert_allclose(adata.X.toarray(), expected.X.toarray(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(dense.X, expected.X.toarray(), rtol=1e-5, atol=1e-6)
    assert adata.uns["log1p"] == expected.uns["log1p"]


@pytest.mark.parametrize("dense", [False, True])
def test_qc_metrics_equal_scanpys(dense):
    import scanpy as sc

    adata = make_counts(300, seed=8)
    adata.var_names = [f"MT-{name}" if i < 5 else name for i, name in enumerate(adata.var_names)]
    adata.X[:3] = 0  # empty cells
    if dense:
        adata.X = adata.X.toarray()
    mito = adata.var_names.str.startswith("MT-")
    expected = adata.copy()
    expected.var["mt"] = mito
    sc.pp.calculate_qc_metrics(expected, qc_vars=["mt"], percent_top=None, log1p=False, inplace=True)
    preprocess.qc_metrics(adata, mito=np.asarray(mito))
    for frame, reference in ((adata.obs, expected.obs), (adata.var, expected.var)):
        for column in reference.columns.difference(["mt", "truth"]):
            np.testing.assert_allclose(frame[column].to_numpy(float), reference[column].to_numpy(float),
                                       rtol=1e-6, equal_nan=True, err_msg=column)


def test_annotation_text_marks_key_markers_the_model_was_not_sent():
    # a model may justify its call with genes it was never shown; the reader checking the call must see which
    from cassia_helpers.dataset.outputs import annotation_text

    call = ClusterAnnotation("0", "CD8+ T cell", confidence=80, key_markers=["CD8A", "cd3e", "GZMK"],
                             markers_sent=["CD3E", "CD8A", "NKG7"])
    for annotator, expected in (("llm", "CD8A, cd3e, GZMK (not sent)"), ("reference", "CD8A, cd3e, GZMK")):
        text = annotation_text([call], dataset="D", tissue="blood", species="human", annotator={"annotator": annotator})
        assert f"key markers:      {expected}\n" in text


def test_a_rejected_input_is_tried_again_after_a_chmod_or_on_a_machine_with_more_memory(tmp_path):
    """--resume leaves an input it rejected alone until the file changes; fixing its permissions is a change,
    and an input too large for one machine's memory may fit on the next."""
    import os
    import time

    from cassia_helpers.contract import TOO_LARGE, input_fingerprint, rejected_and_unchanged

    path = tmp_path / "locked.h5ad"
    path.write_text("x")
    record = {"status": "failed", "error_type": "InputError", "input_file": input_fingerprint(path),
              "error": f"{path}: cannot be read (Permission denied)"}
    assert rejected_and_unchanged(record, path)
    time.sleep(0.05)  # past the file system's timestamp granularity
    os.chmod(path, 0o644)
    assert not rejected_and_unchanged(record, path)
    record = {**record, "input_file": input_fingerprint(path), "error": f"{path}: {TOO_LARGE}: needs 90 GiB"}
    assert not rejected_and_unchanged(record, path)


def test_temporary_files_of_writes_and_executions_cut_short_are_removed_and_nothing_else(tmp_path):
    """What a killed process or a run stopped at once leaves (an atomic write's ``.tmp``, the aggregation
    notebook papermill was writing) goes on resume; the outputs stay."""
    from cassia_helpers.files import remove_temporary

    left = [tmp_path / ".batch_summary.csv.x1y2.tmp", tmp_path / ".aggregate_notebook.ipynb.4242.tmp.ipynb"]
    kept = [tmp_path / "aggregate_notebook.ipynb", tmp_path / "batch_summary.csv", tmp_path / ".run.lock"]
    for path in left + kept:
        path.write_text("x")
    assert sorted(remove_temporary(tmp_path)) == sorted(left)
    assert sorted(p for p in tmp_path.iterdir()) == sorted(kept)
