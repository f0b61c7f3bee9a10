"""Clusters holding several populations are split before annotation (cassia_helpers.split_mixed_clusters)."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest

import cassia_helpers as ch
from cassia_helpers.dataset.annotate import ClusterMarkers
from cassia_helpers.dataset.annotate.reference.annotator import ReferenceAnnotator
from cassia_helpers.dataset.split_mixed import MIN_CELLS, split_summary_lines
from tests.test_reference_annotator import PBMC_CRAFTED

TYPES = {name: PBMC_CRAFTED[name] for name in
         ("Effector memory CD8+ T cell", "CD56dim NK cell", "B cell", "Classical monocyte", "Naive CD4+ T cell")}


def _graph(n_cells: int = 700, seed: int = 3) -> ad.AnnData:
    """Log-normalised crafted blood cells with their kNN graph (what the pipeline has after clustering)."""
    import scanpy as sc

    from tests.synthetic import make_counts

    adata = make_counts(n_cells, cell_types=TYPES, seed=seed)
    sc.pp.normalize_total(adata, target_sum=1e4)
    sc.pp.log1p(adata)
    sc.pp.pca(adata, n_comps=min(20, n_cells - 2), random_state=0)
    sc.pp.neighbors(adata, n_neighbors=15, random_state=0)
    return adata


def _clusters(adata: ad.AnnData, merged: tuple[str, ...] = ()) -> None:
    """``obs['leiden']``: one cluster per type, the ``merged`` types in one cluster ("0", the largest first)."""
    truth = adata.obs["truth"].astype(str)
    groups = truth.where(~truth.isin(merged), "+".join(merged))
    order = groups.value_counts().index
    ids = {name: str(i) for i, name in enumerate(order)}
    adata.obs["leiden"] = pd.Categorical(groups.map(ids), categories=[str(i) for i in range(len(order))])


def _calls(adata: ad.AnnData) -> dict[str, str]:
    names = list(adata.obs["leiden"].cat.categories)
    calls = ReferenceAnnotator().annotate([ClusterMarkers(cluster=c, genes=[]) for c in names], tissue="blood",
                                          species="human", adata=adata, groupby="leiden")
    return {c: a.main_cell_type for c, a in zip(names, calls, strict=True)}


def test_a_cluster_of_t_and_nk_cells_is_split_and_each_piece_called_its_own_type():
    adata = _graph()
    _clusters(adata, merged=("Effector memory CD8+ T cell", "CD56dim NK cell"))
    before = adata.obs["leiden"].copy()
    assert before.value_counts().index[0] == "0"  # the mixed cluster is the largest
    record = ch.split_mixed_clusters(adata, species="human", tissue="blood", seed=0)

    assert adata.obs["leiden_unsplit"].equals(before)
    split = record["clusters"]["0"]
    assert list(record["clusters"]) == ["0"] and len(split["into"]) == 2, record
    assert {p.split(" (")[0] for p in split["populations"]} <= {"Effector memory CD8+ T cell", "CD8+ T cell",
                                                                 "T cell", "CD56dim NK cell", "NK cell"}
    # each new cluster holds one population, and the reference calls each its own type
    truth = adata.obs["truth"].astype(str)
    calls = _calls(adata)
    for new in split["into"]:
        cells = truth[adata.obs["leiden"] == new]
        major = cells.value_counts()
        assert major.iloc[0] / len(cells) > 0.95, major
        expected = "T cell" if "CD8" in major.index[0] else "NK cell"
        assert expected.split()[0] in calls[new], (new, calls[new], major)
    assert len({calls[new] for new in split["into"]}) == 2
    # leiden's ids: "0".."n-1", largest first, categorical; the other clusters keep their cells
    categories = list(adata.obs["leiden"].cat.categories)
    assert categories == [str(i) for i in range(len(categories))] == sorted(set(adata.obs["leiden"]), key=int)
    sizes = adata.obs["leiden"].value_counts().reindex(categories)
    assert (np.diff(sizes.to_numpy()) <= 0).all(), sizes
    for old, new in record["renumbered"].items():
        assert set(adata.obs["leiden"][before == old]) == set(new)
    assert adata.uns["cassia_batch"]["leiden"]["n_clusters"] == len(categories) == len(TYPES)
    # the summary says what was split, in words
    (head, line) = split_summary_lines(adata.uns["cassia_batch"])
    assert "split" in head and "leiden_unsplit" in head
    assert line.strip().startswith(f"cluster 0 ({int((before == '0').sum())} cells, called ")
    assert "split into 2 clusters" in line and " %" in line


def test_a_pure_cluster_is_not_split():
    adata = _graph()
    _clusters(adata)
    before = adata.obs["leiden"].copy()
    record = ch.split_mixed_clusters(adata, species="human", tissue="blood", seed=0)
    assert adata.obs["leiden"].equals(before)
    assert "leiden_unsplit" not in adata.obs
    assert record["examined"] == len(TYPES) and "clusters" not in record
    assert split_summary_lines(adata.uns["cassia_batch"]) == []


def test_the_inputs_own_clusters_and_the_switch_leave_everything_as_it_was():
    adata = _graph()
    _clusters(adata, merged=("Effector memory CD8+ T cell", "CD56dim NK cell"))
    before = adata.obs["leiden"].copy()
    assert ch.split_mixed_clusters(adata, species="human", tissue="blood", cluster_key="author_clusters") == {}
    assert ch.split_mixed_clusters(adata, species="human", tissue="blood", enabled=False) == {}
    adata.uns["cassia_batch"] = {"leiden": {"source": "input", "key": "leiden"}}  # ch.keep_clusters's record
    assert ch.split_mixed_clusters(adata, species="human", tissue="blood") == {}
    assert adata.obs["leiden"].equals(before) and "leiden_unsplit" not in adata.obs
    assert "split" not in adata.uns["cassia_batch"]


def test_tiny_data_no_graph_and_a_species_without_markers_are_left_alone():
    adata = _graph()
    _clusters(adata, merged=("Effector memory CD8+ T cell", "CD56dim NK cell"))
    assert ch.split_mixed_clusters(adata, species="zebrafish", tissue="blood") == {}
    assert "leiden_unsplit" not in adata.obs
    adata = _graph(n_cells=2 * MIN_CELLS - 1)
    _clusters(adata, merged=tuple(TYPES))
    before = adata.obs["leiden"].copy()
    assert ch.split_mixed_clusters(adata, species="human", tissue="blood") == {}
    adata = _graph()
    _clusters(adata, merged=("Effector memory CD8+ T cell", "CD56dim NK cell"))
    del adata.obsp["connectivities"]
    assert ch.split_mixed_clusters(adata, species="human", tissue="blood") == {}
    assert "leiden_unsplit" not in adata.obs and before.nunique() == 1


def test_the_split_dataset_writes_to_h5ad_and_reads_back(tmp_path):
    adata = _graph()
    _clusters(adata, merged=("B cell", "Classical monocyte"))
    record = ch.split_mixed_clusters(adata, species="human", tissue="blood", seed=0)
    assert list(record["clusters"]) == ["0"]
    path = tmp_path / "split.h5ad"
    adata.write_h5ad(path)
    back = ad.read_h5ad(path)
    assert back.obs["leiden"].equals(adata.obs["leiden"])
    assert back.obs["leiden_unsplit"].equals(adata.obs["leiden_unsplit"])
    stored = back.uns["cassia_batch"]["split"]
    assert list(stored["clusters"]["0"]["into"]) == record["clusters"]["0"]["into"]
    assert list(stored["clusters"]["0"]["populations"]) == record["clusters"]["0"]["populations"]
    assert {k: list(v) for k, v in stored["renumbered"].items()} == record["renumbered"]


def _pbmc_labels(resolution: float) -> pd.Series:
    import scanpy as sc

    adata = sc.datasets.pbmc68k_reduced()
    sc.pp.neighbors(adata, use_rep="X_pca", random_state=0)
    sc.tl.leiden(adata, flavor="igraph", n_iterations=2, resolution=resolution, random_state=0)
    ch.split_mixed_clusters(adata, species="human", tissue="pbmc", seed=0, use_raw=True)
    calls = ReferenceAnnotator().expression_calls(adata, tissue="pbmc", groupby="leiden", use_raw=True)
    names = {c: (call.cell_type.name if call.cell_type is not None else "Unknown") for c, call in calls.items()}
    return adata.obs["leiden"].astype(str).map(names)


@pytest.mark.filterwarnings("ignore")
def test_naive_cd8_cells_inside_the_cd4_cluster_get_their_own_cluster():
    """At resolution 1.0, pbmc68k's CD4+ T cluster holds most of the sorted naive CD8+ T cells (CD8B in 70 %
    of them, in 3 % of the Treg cells), and no leiden cut of its cells sets them apart. The cells that carry
    the CD8+ T signature are split off by their own expression and called CD8+ T cells."""
    import scanpy as sc

    labels = _pbmc_labels(1.0)
    truth = sc.datasets.pbmc68k_reduced().obs["bulk_labels"].astype(str).to_numpy()
    cd8 = labels.str.contains("CD8").to_numpy()
    naive_cd8 = truth == "CD8+/CD45RA+ Naive Cytotoxic"
    assert cd8[naive_cd8].mean() >= 0.6  # 0.16 before the cell-level split
    assert cd8[truth == "CD4+/CD25 T Reg"].mean() <= 0.05  # and hardly any CD4+ T cells with them


def test_the_split_judges_on_the_reference_genes_alone_as_the_annotator_does_on_the_whole_data():
    """The split reads the reference's genes out of the matrix once (``expression_data``); every call on
    that slice (type, cell-level support, mixtures) is the call the annotator makes on the whole dataset."""
    import scanpy as sc

    adata = sc.datasets.pbmc68k_reduced()
    annotator = ReferenceAnnotator()
    data = annotator.expression_data(adata, tissue="pbmc", use_raw=True)
    assert data.n_obs == adata.n_obs and 0 < data.n_vars < adata.raw.n_vars
    data.obs["bulk_labels"] = adata.obs["bulk_labels"].to_numpy()
    whole = annotator.expression_calls(adata, tissue="pbmc", groupby="bulk_labels", use_raw=True)
    sliced = annotator.expression_calls(data, tissue="pbmc", groupby="bulk_labels")
    assert sliced.keys() == whole.keys()
    for cluster, call in whole.items():
        assert sliced[cluster] == call, cluster


@pytest.mark.filterwarnings("ignore")
def test_pbmc68k_at_half_resolution_gets_the_labels_of_resolution_one():
    """At resolution 0.5 one leiden cluster holds CD4+ T, CD8+ T and NK cells: the reference's labels agreed
    with resolution 1.0's on 0.67 of the cells without the split; with it, 0.99 (bench/reference_stability.py)."""
    coarse, fine = _pbmc_labels(0.5), _pbmc_labels(1.0)
    assert (coarse == fine).mean() >= 0.9


def test_run_batch_splits_the_t_and_nk_cluster_of_pbmc68k_at_half_resolution(tmp_path):
    """The path a user runs: ``run_batch.py`` on the bundled PBMC example at ``--resolution 0.5``, whose one
    T-cell cluster holds CD4+ T, CD8+ T and NK cells; with ``--no-split-mixed`` it stays one cluster."""
    import json

    from cassia_helpers.example_data import pbmc68k_counts
    from tests.shared_batch import run_cli

    pbmc68k_counts().write_h5ad(tmp_path / "pbmc.h5ad")
    found = {}
    for name, flags in (("split", []), ("unsplit", ["--no-split-mixed"])):
        done = run_cli(["--input", "pbmc.h5ad", "--tissue", "blood", "--resolution", "0.5", "--annotator",
                        "reference", "--output-dir", name, "--quiet", *flags], cwd=tmp_path)
        assert done.returncode == 0, done.stderr
        (folder,) = (tmp_path / name).glob("run_*/blood/pbmc")
        found[name] = (ad.read_h5ad(folder / "pbmc_annotated.h5ad"), (folder / "pbmc_summary.txt").read_text(),
                       json.loads((folder / "pbmc_result.json").read_text()))
    adata, summary, result = found["split"]
    record = adata.uns["cassia_batch"]["split"]
    assert "leiden_unsplit" in adata.obs and len(record["clusters"]) >= 1
    assert adata.obs["leiden"].nunique() == result["n_clusters"] > adata.obs["leiden_unsplit"].nunique()
    assert "split into" in summary and "called T cell" in summary
    # the sorted NK cells now have a cluster called NK: none had one before
    nk = adata.obs["bulk_labels"] == "CD56+ NK"
    assert (adata.obs["cell_type"][nk].astype(str).str.contains("NK")).mean() >= 0.4
    unsplit, summary, result = found["unsplit"]
    assert "leiden_unsplit" not in unsplit.obs and "split into" not in summary
    assert not unsplit.obs["cell_type"][nk].astype(str).str.contains("NK").any()
    assert result["n_clusters"] == adata.obs["leiden_unsplit"].nunique()
