"""The UMAP layout of large datasets: on all threads, the same for a seed, as good a picture as umap-learn's."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import anndata as ad
import numpy as np
import pytest
import scanpy as sc
from sklearn.metrics import silhouette_score
from sklearn.neighbors import NearestNeighbors

from cassia_helpers.dataset import pp
from cassia_helpers.dataset.umap_layout import chunked_layout

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def pbmc() -> ad.AnnData:
    adata = sc.datasets.pbmc68k_reduced()
    pp.neighbors(adata, n_neighbors=15, seed=0)  # umap-learn imported with numba's on-disk cache
    sc.tl.leiden(adata, flavor="igraph", n_iterations=2, directed=False, random_state=0)
    return adata


def _layout_in_process(graph: Path, start: Path, threads: int, out: Path) -> np.ndarray:
    """The layout computed in a fresh process with ``threads`` numba threads."""
    code = (
        "import sys, numpy as np, scipy.sparse as sp\n"
        "from cassia_helpers.dataset.umap_layout import chunked_layout\n"
        "e = chunked_layout(sp.load_npz(sys.argv[1]), np.load(sys.argv[2]), n_epochs=60, seed=3)\n"
        "np.save(sys.argv[3], e)\n"
    )
    env = {**os.environ, "NUMBA_NUM_THREADS": str(threads), "PYTHONPATH": str(ROOT)}
    subprocess.run([sys.executable, "-c", code, str(graph), str(start), str(out)], check=True, env=env, cwd=ROOT,
                   timeout=300)
    return np.load(out)


def test_the_layout_is_the_same_for_a_seed_whatever_the_number_of_threads(pbmc, tmp_path):
    import scipy.sparse as sp

    sp.save_npz(tmp_path / "graph.npz", pbmc.obsp["connectivities"].tocsr())
    np.save(tmp_path / "start.npy", pbmc.obsm["X_pca"][:, :2])
    one = _layout_in_process(tmp_path / "graph.npz", tmp_path / "start.npy", 1, tmp_path / "one.npy")
    three = _layout_in_process(tmp_path / "graph.npz", tmp_path / "start.npy", 3, tmp_path / "three.npy")
    assert one.shape == (700, 2) and np.isfinite(one).all()
    assert np.array_equal(one, three)


def test_the_seed_decides_the_layout(pbmc):
    start = pbmc.obsm["X_pca"][:, :2]
    first = chunked_layout(pbmc.obsp["connectivities"], start, n_epochs=60, seed=0)
    again = chunked_layout(pbmc.obsp["connectivities"], start, n_epochs=60, seed=0)
    other = chunked_layout(pbmc.obsp["connectivities"], start, n_epochs=60, seed=1)
    assert np.array_equal(first, again)
    assert not np.array_equal(first, other)


def _neighbours_kept(adata: ad.AnnData, embedding: np.ndarray, k: int = 15) -> float:
    """Share of each cell's kNN-graph neighbours that are among its k nearest cells in the layout."""
    near = NearestNeighbors(n_neighbors=k).fit(embedding).kneighbors(return_distance=False)
    graph = adata.obsp["distances"].tocsr()
    kept = [len(set(near[i]) & set(graph.indices[graph.indptr[i]:graph.indptr[i + 1]])) / k
            for i in range(adata.n_obs)]
    return float(np.mean(kept))


def test_the_picture_is_as_good_as_umap_learns(pbmc):
    """Clusters as far apart and neighbours as close as in umap-learn's own layout from the same start."""
    adata = pbmc.copy()
    pp.umap(adata, seed=0, large=0)  # the all-threads layout
    ours = adata.obsm["X_umap"].copy()
    assert adata.uns["cassia_batch"]["umap"]["layout"] == "all threads, fixed cell ranges"
    assert set(adata.uns["umap"]["params"]) == {"a", "b"}
    pp.umap(adata, seed=0, large=10**9)  # umap-learn, one thread
    theirs = adata.obsm["X_umap"]
    assert adata.uns["cassia_batch"]["umap"]["layout"] == "umap-learn"
    labels = adata.obs["leiden"].to_numpy()
    assert silhouette_score(ours, labels) >= 0.9 * silhouette_score(theirs, labels)
    assert _neighbours_kept(adata, ours) >= 0.9 * _neighbours_kept(adata, theirs)


def test_a_large_dataset_layout_writes_to_h5ad(pbmc, tmp_path):
    adata = pbmc.copy()
    pp.umap(adata, seed=0, large=100)
    assert adata.obsm["X_umap"].dtype == np.float32 and adata.obsm["X_umap"].shape == (adata.n_obs, 2)
    adata.write_h5ad(tmp_path / "a.h5ad")
    back = ad.read_h5ad(tmp_path / "a.h5ad")
    assert np.array_equal(back.obsm["X_umap"], adata.obsm["X_umap"])
    assert back.uns["cassia_batch"]["umap"]["epochs"] == 100


def test_an_asymmetric_graph_is_refused():
    import scipy.sparse as sp

    graph = sp.csr_matrix(np.array([[0, 1, 0], [0, 0, 1], [1, 0, 0]], dtype=np.float32))
    with pytest.raises(ValueError, match="not symmetric"):
        chunked_layout(graph, np.zeros((3, 2), np.float32), n_epochs=10)


def test_the_layout_comes_back_in_the_cells_own_order(pbmc):
    start = pbmc.obsm["X_pca"][:, :2]
    plain = chunked_layout(pbmc.obsp["connectivities"], start, n_epochs=30, seed=0)
    identity = chunked_layout(pbmc.obsp["connectivities"], start, n_epochs=30, seed=0, order=np.arange(pbmc.n_obs))
    assert np.array_equal(plain, identity)
    by_cluster = np.argsort(pbmc.obs["leiden"].cat.codes.to_numpy(), kind="stable")
    laid_out = chunked_layout(pbmc.obsp["connectivities"], start, n_epochs=30, seed=0, order=by_cluster)
    labels = pbmc.obs["leiden"].to_numpy()
    # each cell keeps its own place: its cluster's cells stay around it
    assert silhouette_score(laid_out, labels) >= 0.9 * silhouette_score(plain, labels)
