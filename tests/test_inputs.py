"""Bad and unusual inputs: every one is either processed correctly or answered with a one-line InputError.

Inputs are tiny synthetic count matrices written to ``tmp_path``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from cassia_helpers import inputs as cio
from cassia_helpers.dataset import pp
from cassia_helpers.dataset.counts import counts_layer, write_counts_layer
from cassia_helpers.dataset.existing import kept_as, umap_or_keep
from cassia_helpers.dataset.markers import rank_markers
from cassia_helpers.dataset.read import InputError, read_dataset
from tests.conftest import REPO

HUMAN_MARKERS = [["CD3E", "CD3D", "IL7R"], ["CD19", "MS4A1", "CD79A"], ["LYZ", "CD14", "S100A8"]]
HUMAN_MITO = ["MT-CO1", "MT-ND1", "MT-ATP6"]
MOUSE_MARKERS = [["Cd3e", "Cd3d", "Il7r"], ["Cd19", "Ms4a1", "Cd79a"], ["Lyz2", "Cd14", "S100a8"]]
MOUSE_MITO = ["mt-Co1", "mt-Nd1", "mt-Atp6"]
QC = {"min_genes": 20, "min_cells": 3, "max_pct_mt": 20.0}


def make_counts(
    n_cells: int = 300,
    n_genes: int = 400,
    *,
    n_types: int = 3,
    mouse: bool = False,
    seed: int = 0,
) -> ad.AnnData:
    """Poisson counts drawn from ``n_types`` cell-type programs (CSR, float32).

    The first genes are mitochondrial genes, then three markers per type; the rest are ``GENE<i>``
    (``Gene<i>`` for mouse). ``obs['truth']`` is the program each cell was drawn from.
    """
    rng = np.random.default_rng(seed)
    mito, markers = (MOUSE_MITO, MOUSE_MARKERS) if mouse else (HUMAN_MITO, HUMAN_MARKERS)
    named = mito + [gene for genes in markers for gene in genes]
    stem = "Gene" if mouse else "GENE"
    names = named + [f"{stem}{i}" for i in range(len(named), n_genes)]
    base = rng.gamma(1.0, 0.6, size=n_genes)
    base[: len(mito)] = 1.5
    programs = []
    for t in range(n_types):
        rates = base.copy()
        start = len(mito) + 3 * (t % len(markers))
        rates[start : start + 3] += 8.0
        block = len(named) + np.arange(t * 40, (t + 1) * 40) % (n_genes - len(named))
        rates[block] *= 8.0
        programs.append(rates)
    truth = rng.integers(0, n_types, n_cells)
    x = rng.poisson(np.stack([programs[t] for t in truth])).astype(np.float32)
    return ad.AnnData(
        X=sp.csr_matrix(x),
        obs=pd.DataFrame({"truth": pd.Categorical(truth.astype(str))}, index=[f"cell{i}" for i in range(n_cells)]),
        var=pd.DataFrame(index=names),
    )


def write(adata: ad.AnnData, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    adata.write_h5ad(path)
    return path


def lognorm(x) -> sp.csr_matrix:
    x = sp.csr_matrix(x, dtype=np.float32)
    totals = np.asarray(x.sum(axis=1)).ravel()
    scaled = sp.diags(1e4 / np.maximum(totals, 1)) @ x
    scaled.data = np.log1p(scaled.data)
    return sp.csr_matrix(scaled, dtype=np.float32)


def warnings_of(adata: ad.AnnData) -> list[str]:
    return list(adata.uns["cassia_batch"]["warnings"])


def assert_one_line_error(excinfo, path: Path, *phrases: str) -> str:
    message = str(excinfo.value)
    assert message.startswith(str(path)), message
    assert "\n" not in message and "\r" not in message, message
    assert "Traceback" not in message, message
    assert len(message) <= len(str(path)) + 300, message
    for phrase in phrases:
        assert phrase in message, message
    return message


def run_pipeline(adata: ad.AnnData) -> pd.DataFrame:
    pp.qc(adata, **QC)
    pp.normalize(adata)
    pp.reduce_dimensions(adata, n_top_genes=200, n_pcs=20)
    pp.neighbors(adata, n_neighbors=10)
    pp.cluster(adata)
    pp.umap(adata)
    return rank_markers(adata, n_genes=20)


# --- files that are not readable h5ad -------------------------------------------------------------------------


def _truncated(path: Path) -> None:
    write(make_counts(), path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _text(path: Path) -> None:
    path.write_text("gene,cell1,cell2\nCD3E,1,0\n")


def _empty(path: Path) -> None:
    path.write_bytes(b"")


def _plain_hdf5(path: Path) -> None:
    with h5py.File(path, "w") as handle:
        handle["values"] = np.arange(10)


def _tenx_h5(path: Path) -> None:
    with h5py.File(path, "w") as handle:
        group = handle.create_group("matrix")
        group["data"] = np.arange(3)


def _loom(path: Path) -> None:
    with h5py.File(path, "w") as handle:
        handle["matrix"] = np.zeros((3, 2))
        handle.create_group("row_attrs")
        handle.create_group("col_attrs")


@pytest.mark.parametrize(
    ("make", "phrase"),
    [
        (_truncated, "corrupt or truncated h5ad ("),
        (_text, "not an HDF5/h5ad file"),
        (_empty, "empty file (0 bytes)"),
        (_plain_hdf5, "not an AnnData h5ad"),
        (_tenx_h5, "10x Genomics"),
        (_loom, "a .loom file (convert it with scanpy.read_loom"),
    ],
    ids=["truncated", "text", "empty", "hdf5-not-anndata", "10x-h5", "loom"],
)
def test_unreadable_files_raise_one_line_input_error(tmp_path, make, phrase):
    path = tmp_path / "bad input.h5ad"
    make(path)
    with pytest.raises(InputError) as excinfo:
        read_dataset(path)
    assert_one_line_error(excinfo, path, phrase)
    assert excinfo.value.__suppress_context__ or excinfo.value.__context__ is None


def test_missing_file(tmp_path):
    path = tmp_path / "nope.h5ad"
    with pytest.raises(InputError) as excinfo:
        read_dataset(path)
    assert_one_line_error(excinfo, path, "file not found")


def test_input_error_message_is_always_one_line():
    assert str(InputError("a.h5ad: first\nsecond\r\n\tthird")) == "a.h5ad: first second third"


def test_long_reader_error_is_collapsed_and_shortened(tmp_path, monkeypatch):
    path = write(make_counts(50, 60), tmp_path / "x.h5ad")

    def explode(*_args, **_kwargs):
        raise KeyError("line one\n" + "very long detail " * 100)

    monkeypatch.setattr(ad, "read_h5ad", explode)
    with pytest.raises(InputError) as excinfo:
        read_dataset(path)
    message = assert_one_line_error(excinfo, path, "corrupt or truncated h5ad (", "line one very long detail")
    assert len(message) <= len(str(path)) + 250


def _sparse_float16(path: Path) -> None:
    with h5py.File(path, "r+") as handle:
        data = handle["X/data"][:]
        del handle["X/data"]
        handle["X/data"] = data.astype(np.float16)


def _newer_encoding(path: Path) -> None:
    with h5py.File(path, "r+") as handle:
        handle["X"].attrs["encoding-type"] = "csr_matrix_v2"


@pytest.mark.parametrize(("damage", "phrases"), [
    (_sparse_float16, ["data type float16 not supported in sparse matrices (X)"]),
    (_newer_encoding, ["written by a newer anndata than this one", "encoding csr_matrix_v2 0.1.0 of X",
                       "update anndata"]),
], ids=["sparse-float16", "newer-anndata"])
def test_a_readable_but_unsupported_file_is_not_called_corrupt(tmp_path, damage, phrases):
    path = write(make_counts(50, 60), tmp_path / "unsupported.h5ad")
    damage(path)
    with pytest.raises(InputError) as excinfo:
        read_dataset(path)
    assert "corrupt" not in assert_one_line_error(excinfo, path, *phrases)


def test_an_uns_entry_of_a_newer_anndata_is_left_out_with_a_warning(tmp_path):
    adata = make_counts(50, 60)
    adata.uns["note"] = "lab note"
    adata.uns["params"] = {"min_genes": 200}
    path = write(adata, tmp_path / "newer uns.h5ad")
    with h5py.File(path, "r+") as handle:
        handle["uns/note"].attrs["encoding-type"] = "string-v2"
        handle["uns/note"].attrs["encoding-version"] = "0.3.0"
    before = path.read_bytes()
    read = read_dataset(path)
    assert read.n_obs == 50 and "note" not in read.uns and read.uns["params"]["min_genes"] == 200
    assert any("uns['note'] was left out: written by a newer anndata" in w and "string-v2 0.3.0" in w
               for w in warnings_of(read))
    assert path.read_bytes() == before


def test_a_file_another_process_has_open_for_writing_says_so(tmp_path):
    path = write(make_counts(50, 60), tmp_path / "open elsewhere.h5ad")
    holder = subprocess.Popen(  # as a colleague's notebook with the file open in anndata's backed="r+" mode
        [sys.executable, "-c", f"import h5py, sys; f = h5py.File({str(path)!r}, 'r+'); print('open', flush=True); "
                               "sys.stdin.read()"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env={**os.environ, "HDF5_USE_FILE_LOCKING": "TRUE"})
    try:
        assert holder.stdout.readline().strip() == "open"
        for read in (read_dataset, cio.check_input):  # the driver's check and the kernel's read
            with pytest.raises(InputError) as excinfo:
                read(path)
            assert_one_line_error(excinfo, path, "open for writing by another process", "wait for it to finish")
    finally:
        holder.stdin.close()
        holder.wait(timeout=30)


# --- empty datasets -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("shape", "phrase"), [((0, 50), "no cells (0 observations)"), ((40, 0), "no genes (0 variables)")]
)
def test_zero_cells_or_genes_before_qc(tmp_path, shape, phrase):
    adata = ad.AnnData(
        X=np.zeros(shape, dtype=np.float32),
        obs=pd.DataFrame(index=[f"c{i}" for i in range(shape[0])]),
        var=pd.DataFrame(index=[f"G{i}" for i in range(shape[1])]),
    )
    path = write(adata, tmp_path / "empty data.h5ad")
    with pytest.raises(InputError) as excinfo:
        read_dataset(path)
    assert_one_line_error(excinfo, path, phrase)


def test_no_cells_left_after_qc(tmp_path):
    path = write(make_counts(60, 100), tmp_path / "few genes.h5ad")
    adata = read_dataset(path)
    with pytest.raises(InputError) as excinfo:
        pp.qc(adata, min_genes=10_000, min_cells=3, max_pct_mt=20.0)
    assert_one_line_error(excinfo, path, "no cells left after QC", "min_genes=10000", "max_pct_mt=20.0")


def test_mitochondrial_genes_named_as_r_writes_them_are_filtered(tmp_path):
    from cassia_helpers.dataset.markers import informative

    adata = make_counts(60, 100)
    names = list(adata.var_names)
    names[:3] = ["MT.CO1", "MT.ND3", "mt.Cytb"]  # MT-CO1 after R's make.names
    adata.var_names = names
    adata.X = adata.X.toarray() if hasattr(adata.X, "toarray") else adata.X
    adata.X[:20, 0] = 5_000  # a third of the cells are mostly mitochondrial RNA
    adata = read_dataset(write(adata, tmp_path / "from R.h5ad"))
    pp.qc(adata, min_genes=1, min_cells=1, max_pct_mt=20.0)
    assert adata.uns["cassia_batch"]["qc"]["mito_genes"] == 3 and adata.n_obs == 40
    assert not informative("MT.CO1") and not informative("mt.Cytb") and informative("MT1A")


@pytest.mark.parametrize("name, thresholds, phrases", [
    ("mito.h5ad", {"min_genes": 1, "min_cells": 1, "max_pct_mt": 0.0},
     ("no cells left after QC", "max_pct_mt=0.0")),
    ("few cells.h5ad", {"min_genes": 1, "min_cells": 1000, "max_pct_mt": 100.0},
     ("no genes left after QC", "min_cells=1000")),
    # the genes are lost because min_genes left two cells: the message says so, not only min_cells
    ("two cells left.h5ad", {"min_genes": "two most", "min_cells": 1000, "max_pct_mt": 100.0},
     ("no genes left after QC: ", " of 60 cells passed min_genes=", "min_cells=1000")),
    # one cell cannot be clustered: said as such, not by a failing PCA
    ("one cell left.h5ad", {"min_genes": "second most", "min_cells": 0, "max_pct_mt": 100.0},
     ("1 cell only left after QC (min_genes=", "60 cells before")),
])
def test_nothing_left_after_qc_names_the_threshold(tmp_path, name, thresholds, phrases):
    path = write(make_counts(60, 100), tmp_path / name)
    adata = read_dataset(path)
    if thresholds["min_genes"] in ("second most", "two most"):  # only the richest cell (or the two richest) passes
        genes = np.sort(np.asarray((adata.X > 0).sum(axis=1)).ravel())
        least = int(genes[-2]) + 1 if thresholds["min_genes"] == "second most" else int(genes[-2])
        thresholds = dict(thresholds, min_genes=least)
    with pytest.raises(InputError) as excinfo:
        pp.qc(adata, **thresholds)
    assert_one_line_error(excinfo, path, *phrases)


# --- counts, log-normalised and scaled values ----------------------------------------------------------------------


def test_qc_that_keeps_under_half_the_cells_says_so():
    adata = make_counts(100, seed=4)
    genes = np.sort(np.asarray((adata.X > 0).sum(axis=1)).ravel())
    pp.qc(adata, min_genes=int(genes[70]), min_cells=1, max_pct_mt=100.0)
    assert any(w.startswith(f"QC kept {adata.n_obs} of 100 cells") for w in warnings_of(adata))
    kept = make_counts(100, seed=4)
    pp.qc(kept, min_genes=int(genes[20]), min_cells=1, max_pct_mt=100.0)
    assert not any(w.startswith("QC kept") for w in warnings_of(kept))


def test_log_normalised_input_skips_normalisation(tmp_path):
    adata = make_counts()
    adata.X = lognorm(adata.X)
    adata = read_dataset(write(adata, tmp_path / "lognorm.h5ad"))
    assert adata.uns["cassia_batch"]["input"]["is_counts"] is False
    assert any("already log-normalised" in w for w in warnings_of(adata))
    pp.qc(adata, **QC)
    before = adata.X.copy()
    pp.normalize(adata)
    assert adata.uns["cassia_batch"]["normalize"]["method"].startswith("input")
    assert (adata.X != before).nnz == 0
    assert "counts" not in adata.layers


@pytest.mark.parametrize("where", ["layer", "raw"])
def test_log_normalised_x_with_counts_uses_counts(tmp_path, where):
    adata = make_counts()
    counts = adata.X.copy()
    if where == "layer":
        adata.layers["counts"] = counts.copy()
    else:
        adata.raw = adata.copy()
    adata.X = lognorm(counts)
    adata = read_dataset(write(adata, tmp_path / f"lognorm with {where}.h5ad"))
    record = adata.uns["cassia_batch"]["input"]
    assert record["is_counts"] is True
    assert record["counts_source"] == {"layer": "layers['counts']", "raw": "raw.X"}[where]
    assert (adata.X != counts).nnz == 0
    assert not any("log-normalised" in w for w in warnings_of(adata))
    pp.qc(adata, **QC)
    pp.normalize(adata)
    assert adata.uns["cassia_batch"]["normalize"]["method"].startswith("log1p")
    rebuilt = counts_layer(adata)
    assert (rebuilt.data % 1 == 0).all() and rebuilt.sum() == adata.obs["library_size"].sum()


def test_raw_counts_with_more_genes_than_x_uses_all_raw_genes(tmp_path):
    adata = make_counts()
    adata.raw = adata.copy()
    hvg = adata[:, 100:].copy()  # X keeps a gene subset (as after HVG selection), scaled
    dense = lognorm(hvg.X).toarray()
    hvg.X = (dense - dense.mean(axis=0)) / (dense.std(axis=0) + 1e-6)
    adata = read_dataset(write(hvg, tmp_path / "scaled with raw.h5ad"))
    assert adata.n_vars == 400
    assert "CD3E" in adata.var_names
    assert adata.uns["cassia_batch"]["input"]["counts_source"] == "raw.X"
    assert adata.uns["cassia_batch"]["input"]["n_genes"] == 400


def seurat_style(adata: ad.AnnData, genes) -> ad.AnnData:
    """As SeuratDisk writes it: X the scaled data of a gene subset, raw.X the counts of every gene."""
    subset = adata[:, genes].copy()
    subset.raw = adata
    dense = lognorm(subset.X).toarray()
    subset.X = (dense - dense.mean(axis=0)) / (dense.std(axis=0) + 1e-6)
    return subset


def test_x_var_columns_of_a_seurat_file_are_kept_and_written(tmp_path):
    """X's var columns (Seurat's vst.variable, scanpy's highly_variable, ...) are kept for the genes X held and
    missing for the others, and the annotated h5ad can still be written with them."""
    scaled = seurat_style(make_counts(), slice(100, 300))
    scaled.var["vst.variable"] = True
    scaled.var["highly_variable"] = np.arange(200) % 2 == 0  # renamed author_highly_variable
    scaled.var["vst.rank"] = np.arange(200)
    scaled.var["module"] = pd.Categorical(["a", "b"] * 100)
    scaled.var["note"] = np.array(["kept"] * 200, dtype=object)
    adata = read_dataset(write(scaled, tmp_path / "seurat.h5ad"))
    assert adata.n_vars == 400
    pp.qc(adata, **QC)
    adata.write_h5ad(tmp_path / "annotated.h5ad")
    var = ad.read_h5ad(tmp_path / "annotated.h5ad").var
    held = var.index.isin(scaled.var_names)
    assert var.loc[held, "vst.variable"].eq(True).all() and var.loc[~held, "vst.variable"].isna().all()
    assert var.loc["GENE100", "author_highly_variable"] and not var.loc["GENE101", "author_highly_variable"]
    assert var.loc["GENE102", "vst.rank"] == 2 and var.loc["GENE102", "module"] == "a"
    assert var.loc["GENE102", "note"] == "kept" and var.loc[~held, "note"].isna().all()


def test_raw_with_duplicated_gene_names_and_x_a_subset(tmp_path):
    """raw.var_names may repeat a name (a Seurat object after mapping ids to symbols): the genes are still
    matched to X's, and the names made unique with the usual warning."""
    counts = make_counts()
    names = counts.var_names.to_list()
    names[names.index("CD3D")] = "LYZ"  # two LYZ
    with warnings.catch_warnings():  # anndata's warning about the duplicates made on purpose
        warnings.simplefilter("ignore")
        counts.var_names = names
        scaled = seurat_style(counts, [i for i, n in enumerate(names) if n == "LYZ" or 100 <= i < 200])
        scaled.var["mean_sc"] = np.arange(scaled.n_vars, dtype=float)
        path = write(scaled, tmp_path / "raw dups.h5ad")
    with warnings.catch_warnings():  # as under PYTHONWARNINGS=error: the duplicates are the dataset's warning
        warnings.simplefilter("error")
        adata = read_dataset(path)
    assert adata.n_vars == 400 and adata.var_names.is_unique and {"LYZ", "LYZ-1"} <= set(adata.var_names)
    assert adata.var.loc["LYZ", "mean_sc"] == 0 and adata.var.loc["LYZ-1", "mean_sc"] == 1
    assert adata.var.loc["GENE100", "mean_sc"] == 2 and np.isnan(adata.var.loc["CD3E", "mean_sc"])
    assert any("1 duplicated gene names" in w for w in warnings_of(adata))


@pytest.mark.parametrize("x_values", ["scaled", "lognorm"])
def test_log_normalised_raw_with_more_genes_is_used(tmp_path, x_values):
    adata = make_counts()
    adata.X = lognorm(adata.X)
    adata.raw = adata.copy()
    subset = adata[:, 100:].copy()
    if x_values == "scaled":
        dense = subset.X.toarray()
        subset.X = (dense - dense.mean(axis=0)) / (dense.std(axis=0) + 1e-6)
    adata = read_dataset(write(subset, tmp_path / "lognorm raw.h5ad"))
    assert adata.n_vars == 400
    assert adata.uns["cassia_batch"]["input"]["is_counts"] is False
    assert adata.uns["cassia_batch"]["input"]["counts_source"] == "none (log-normalised raw.X)"
    assert any("raw.X is already log-normalised" in w for w in warnings_of(adata))


def test_scaled_data_raises(tmp_path):
    adata = make_counts()
    dense = lognorm(adata.X).toarray()
    adata.X = (dense - dense.mean(axis=0)) / (dense.std(axis=0) + 1e-6)
    path = write(adata, tmp_path / "scaled.h5ad")
    with pytest.raises(InputError) as excinfo:
        read_dataset(path)
    assert_one_line_error(excinfo, path, "negative values", "(scaled data)")


def test_non_finite_values_raise(tmp_path):
    adata = make_counts(50, 60)
    dense = adata.X.toarray()
    dense[0, 0] = np.nan
    adata.X = dense
    path = write(adata, tmp_path / "nan.h5ad")
    with pytest.raises(InputError) as excinfo:
        read_dataset(path)
    assert_one_line_error(excinfo, path, "NaN")


# --- gene names ------------------------------------------------------------------------------------------------------


def with_ensembl_ids(adata: ad.AnnData, mouse: bool = False) -> ad.AnnData:
    prefix = "ENSMUSG" if mouse else "ENSG"
    symbols = adata.var_names.to_numpy()
    adata.var_names = [f"{prefix}{i:011d}.{i % 3 + 1}" for i in range(adata.n_vars)]
    adata.var["symbols_kept_for_test"] = symbols
    return adata


@pytest.mark.parametrize("column", ["gene_symbols", "feature_name", "Gene_Name", "categorical"])
def test_ensembl_ids_with_symbol_column_use_symbols(tmp_path, column):
    adata = with_ensembl_ids(make_counts())
    symbols = adata.var.pop("symbols_kept_for_test")
    if column == "categorical":  # CELLxGENE stores feature_name as a categorical
        column, symbols = "feature_name", pd.Categorical(symbols)
    adata.var[column] = symbols
    adata = read_dataset(write(adata, tmp_path / "ensembl.h5ad"))
    assert "CD3E" in adata.var_names and "MT-CO1" in adata.var_names
    assert adata.var.loc["CD3E", "gene_ids"].startswith("ENSG")
    assert adata.uns["cassia_batch"]["input"]["symbol_source"] == f"var['{column}']"
    pp.qc(adata, **QC)
    assert adata.uns["cassia_batch"]["qc"]["mito_genes"] == 3


@pytest.mark.parametrize("column", ["features", "name", "hgnc"])
def test_a_seurat_or_unnamed_symbol_column_is_found(tmp_path, column):
    """Seurat exports keep the symbols in var['features'] or var['name']; any text column of distinct,
    symbol-like values is found too, while columns of categories or free text are not taken for symbols."""
    adata = with_ensembl_ids(make_counts())
    adata.var[column] = adata.var.pop("symbols_kept_for_test")
    adata.var["biotype"] = "protein_coding"
    adata.var["description"] = [f"gene number {i} of the panel" for i in range(adata.n_vars)]
    adata = read_dataset(write(adata, tmp_path / "seurat ids.h5ad"))
    assert adata.uns["cassia_batch"]["input"]["symbol_source"] == f"var['{column}']"
    assert "CD3E" in adata.var_names and adata.var.loc["CD3E", "gene_ids"].startswith("ENSG")


def test_a_10x_gene_ids_column_stays_when_the_names_are_symbols(tmp_path):
    """The run writes var['gene_ids'] only when it takes symbols from a column: a 10x file named by symbols
    keeps its own gene_ids under that name."""
    adata = make_counts()
    ids = [f"ENSG{i:011d}" for i in range(adata.n_vars)]
    adata.var["gene_ids"], adata.var["feature_types"] = ids, "Gene Expression"
    read = read_dataset(write(adata, tmp_path / "tenx.h5ad"))
    assert read.var["gene_ids"].tolist() == ids and "author_gene_ids" not in read.var
    assert not [w for w in warnings_of(read) if "author_" in w]
    # named by ids, with symbols in a column: the run's gene_ids are the names, the input's column kept beside
    named_by_ids = with_ensembl_ids(make_counts())
    named_by_ids.var["gene_symbols"] = named_by_ids.var.pop("symbols_kept_for_test")
    named_by_ids.var["gene_ids"] = "lab id"
    read = read_dataset(write(named_by_ids, tmp_path / "ids.h5ad"))
    assert read.var.loc["CD3E", "gene_ids"].startswith("ENSG") and set(read.var["author_gene_ids"]) == {"lab id"}


def test_row_numbers_as_gene_names_use_the_symbol_column(tmp_path):
    """An export from R often names the genes 1, 2, 3 ... with the symbols in a column."""
    adata = make_counts()
    adata.var["gene_symbols"] = adata.var_names.to_numpy()
    adata.var_names = [str(i + 1) for i in range(adata.n_vars)]
    adata = read_dataset(write(adata, tmp_path / "from_r.h5ad"))
    assert "CD3E" in adata.var_names and adata.var.loc["CD3E", "gene_ids"].isdigit()
    assert adata.uns["cassia_batch"]["input"]["symbol_source"] == "var['gene_symbols']"
    bare = make_counts()
    bare.var_names = [str(i + 1) for i in range(bare.n_vars)]
    adata = read_dataset(write(bare, tmp_path / "numbers only.h5ad"))
    assert any("gene names are not gene symbols (e.g. 1)" in w for w in warnings_of(adata))


def test_antibody_and_peak_features_are_left_out_of_the_genes(tmp_path):
    """A 10x CITE-seq or multiome matrix holds antibodies or peaks beside the genes (var['feature_types']):
    only the genes go through normalisation, HVG and markers; the antibodies' counts are in the annotated
    h5ad's obsm['protein'], and the warning says the peaks are not in the output."""
    from cassia_helpers.contract import DatasetPaths
    from cassia_helpers.dataset.outputs import write_annotated

    genes = make_counts()
    empty = np.arange(genes.n_obs) < 5  # cells QC removes
    genes.X = sp.csr_matrix(sp.diags((~empty).astype(np.float32)) @ genes.X)
    adt = np.random.default_rng(0).poisson(50, size=(genes.n_obs, 2)).astype(np.float32)
    extra = ad.AnnData(sp.csr_matrix(np.column_stack([adt, np.full(genes.n_obs, 3, dtype=np.float32)])),
                       obs=genes.obs, var=pd.DataFrame(index=["CD3_TotalSeqB", "CD19_TotalSeqB", "chr1:100-600"]))
    adata = ad.concat([genes, extra], axis=1, merge="first")
    adata.var["feature_types"] = ["Gene Expression"] * genes.n_vars + ["Antibody Capture"] * 2 + ["Peaks"]
    adata = read_dataset(write(adata, tmp_path / "cite.h5ad"))
    assert adata.n_vars == genes.n_vars and "CD3_TotalSeqB" not in adata.var_names
    [warning] = [w for w in warnings_of(adata) if "feature_types" in w]
    assert "2 'Antibody Capture' features are in obsm['protein']" in warning
    assert "left out of the analysis and of the output: 1 'Peaks'" in warning
    run_pipeline(adata)  # QC removes cells: the antibodies' rows follow
    paths = DatasetPaths(tmp_path / "run", "blood", "cite")
    paths.folder.mkdir(parents=True)
    written = ad.read_h5ad(write_annotated(adata, paths))
    protein = written.obsm["protein"]
    assert isinstance(protein, pd.DataFrame) and list(protein.columns) == ["CD3_TotalSeqB", "CD19_TotalSeqB"]
    assert list(protein.index) == list(written.obs_names) and written.n_obs == genes.n_obs - 5
    expected = pd.DataFrame(adt, index=genes.obs_names, columns=protein.columns).loc[written.obs_names]
    pd.testing.assert_frame_equal(protein, expected)  # the counts as given, per cell
    assert "chr1:100-600" not in written.var_names and all(
        "chr1:100-600" not in getattr(v, "columns", []) for v in written.obsm.values())
    only = extra.copy()
    only.var["feature_types"] = "Antibody Capture"
    with pytest.raises(InputError, match="no 'Gene Expression' features"):
        read_dataset(write(only, tmp_path / "adt_only.h5ad"))


def test_missing_symbols_fall_back_to_ids(tmp_path):
    adata = with_ensembl_ids(make_counts())
    symbols = adata.var.pop("symbols_kept_for_test").astype(object)
    symbols.iloc[10] = None
    symbols.iloc[11] = ""
    adata.var["gene_symbols"] = symbols
    adata = read_dataset(write(adata, tmp_path / "ensembl.h5ad"))
    assert adata.var_names[10].startswith("ENSG") and adata.var_names[11].startswith("ENSG")
    assert adata.var_names.is_unique


def test_ensembl_ids_without_symbols_warn_and_proceed(tmp_path):
    adata = with_ensembl_ids(make_counts())
    del adata.var["symbols_kept_for_test"]
    adata.var["feature_biotype"] = "gene"
    adata = read_dataset(write(adata, tmp_path / "ids only.h5ad"))
    assert adata.uns["cassia_batch"]["input"]["symbol_source"] == "ensembl_ids"
    assert any("Ensembl ids" in w for w in warnings_of(adata))
    pp.qc(adata, **QC)
    pp.normalize(adata)
    assert adata.n_obs > 0


@pytest.mark.filterwarnings("ignore:Variable names are not unique")
def test_duplicated_gene_names_made_unique(tmp_path):
    adata = make_counts()
    names = adata.var_names.to_list()
    names[20] = names[21] = names[22] = "CD3E"
    adata.var_names = names
    adata = read_dataset(write(adata, tmp_path / "dups.h5ad"))
    assert adata.var_names.is_unique
    assert {"CD3E", "CD3E-1", "CD3E-2", "CD3E-3"} <= set(adata.var_names)
    assert any("3 duplicated gene names" in w for w in warnings_of(adata))


@pytest.mark.filterwarnings("ignore:Observation names are not unique")
def test_duplicated_cell_names_made_unique(tmp_path):
    adata = make_counts()
    adata.obs_names = ["AAACCTG"] * 10 + adata.obs_names[10:].to_list()
    path = write(adata, tmp_path / "dup cells.h5ad")
    with warnings.catch_warnings():  # as under PYTHONWARNINGS=error: still read, not "corrupt or truncated"
        warnings.simplefilter("error")
        adata = read_dataset(path)
    assert adata.obs_names.is_unique
    assert any("9 duplicated cell names" in w for w in warnings_of(adata))
    pp.qc(adata, **QC)



def test_a_scanpy_processed_file_with_none_in_uns_is_read(tmp_path):
    """scanpy's log1p writes uns['log1p'] = {'base': None}, which anndata stores as an HDF5 null dataset: a file
    straight out of a standard scanpy workflow (or one of our own annotated files) is an input, not corrupt."""
    adata = make_counts()
    adata.uns["log1p"] = {"base": None}
    adata.uns["rank_genes_groups"] = {"params": {"layer": None, "method": "wilcoxon"}}
    path = write(adata, tmp_path / "processed.h5ad")
    assert cio.check_input(path)["n_obs"] == adata.n_obs
    assert read_dataset(path).n_obs == adata.n_obs


def test_a_key_naming_a_renamed_column_reads_the_inputs_own_column(tmp_path):
    """A CELLxGENE-style input has obs['cell_type'] (renamed author_cell_type when read, since the run writes
    cell_type) and may have author_cell_type too: label_key='cell_type' is the input's cell_type, never the
    run's own calls (which would score the run against itself), and author_cell_type stays itself."""
    from cassia_helpers.dataset.existing import input_column

    adata = make_counts()
    adata.obs["cell_type"] = adata.obs["truth"].astype(str) + " (author)"
    adata.obs["author_cell_type"] = "older label"
    path = write(adata, tmp_path / "cxg.h5ad")
    adata = read_dataset(path)
    adata.obs["cell_type"] = "the run's call"
    own = input_column(adata, "cell_type", what="label_key")
    assert own != "cell_type" and adata.obs[own].str.endswith("(author)").all()
    assert input_column(adata, "author_cell_type", what="label_key") == "author_cell_type"
    with pytest.raises(InputError) as caught:
        input_column(adata, "celltype", what="label_key")
    message = str(caught.value)
    assert message.startswith(str(path)) and "label_key 'celltype'" in message
    assert "truth, cell_type, author_cell_type" in message  # the input's own columns, as the input names them
    # the driver and the dry run see it from the header, before any work
    with pytest.raises(cio.InputError, match="label_key 'celltype' is not a column"):
        cio.check_input(path, obs_keys={"label_key": "celltype"})
    assert cio.check_input(path, obs_keys={"label_key": "cell_type", "batch_key": ""})["n_obs"] == adata.n_obs

# --- clustering ----------------------------------------------------------------------------------------------------


def test_multi_cluster_pipeline(tmp_path):
    adata = read_dataset(write(make_counts(), tmp_path / "three types.h5ad"))
    markers = run_pipeline(adata)
    assert adata.obs["leiden"].nunique() > 1
    assert markers["cluster"].nunique() == adata.obs["leiden"].nunique()
    assert not any("single cluster" in w for w in warnings_of(adata))


def test_single_cluster_pipeline_still_gives_markers(tmp_path):
    adata = read_dataset(write(make_counts(60, 200, n_types=1), tmp_path / "one type.h5ad"))
    pp.qc(adata, **QC)
    pp.normalize(adata)
    pp.reduce_dimensions(adata, n_top_genes=100, n_pcs=10)
    pp.neighbors(adata, n_neighbors=10)
    pp.cluster(adata, resolution=0.05)
    pp.umap(adata)
    markers = rank_markers(adata, n_genes=20)
    assert adata.obs["leiden"].nunique() == 1
    assert len(markers) == 20 and markers["gene"].notna().all()
    assert any("single cluster" in w for w in warnings_of(adata))


# --- species -------------------------------------------------------------------------------------------------------


def test_mouse_mito_genes_detected_by_qc(tmp_path):
    adata = make_counts(mouse=True)
    x = adata.X.toarray()
    x[:5, :3] = 500  # five cells dominated by mitochondrial counts
    adata.X = sp.csr_matrix(x)
    adata = read_dataset(write(adata, tmp_path / "mouse.h5ad"), species="mouse")
    assert not any("species" in w for w in warnings_of(adata))
    pp.qc(adata, **QC)
    record = adata.uns["cassia_batch"]["qc"]
    assert record["mito_genes"] == 3
    assert adata.var.loc[MOUSE_MITO, "mt"].all()
    assert record["cells_after"] == record["cells_before"] - 5
    assert not any(name in adata.obs_names for name in [f"cell{i}" for i in range(5)])


def test_human_symbols_with_species_mouse_warn(tmp_path):
    adata = read_dataset(write(make_counts(), tmp_path / "human.h5ad"), species="mouse")
    assert any("upper case (human style) but species is mouse" in w for w in warnings_of(adata))


def test_mouse_symbols_with_species_human_warn(tmp_path):
    adata = read_dataset(write(make_counts(mouse=True), tmp_path / "mouse.h5ad"), species="human")
    assert any("look like mouse symbols" in w and "run it with --species mouse" in w for w in warnings_of(adata))


def test_mouse_ensembl_ids_do_not_trigger_case_warning(tmp_path):
    adata = with_ensembl_ids(make_counts(mouse=True), mouse=True)
    del adata.var["symbols_kept_for_test"]
    adata = read_dataset(write(adata, tmp_path / "mouse ids.h5ad"), species="mouse")
    assert not any("species is mouse" in w for w in warnings_of(adata))


# --- paths ---------------------------------------------------------------------------------------------------------


def test_path_with_spaces_and_non_ascii(tmp_path):
    path = write(make_counts(), tmp_path / "Tissue Ø" / "Data Ünïcode 2024.h5ad")
    adata = read_dataset(path)
    assert adata.uns["cassia_batch"]["input"]["file"] == str(path)
    pp.qc(adata, **QC)
    bad = tmp_path / "Tissue Ø" / "Brøken Ünïcode.h5ad"
    _text(bad)
    with pytest.raises(InputError) as excinfo:
        read_dataset(str(bad))
    assert_one_line_error(excinfo, bad, "not an HDF5/h5ad file")


# --- memory --------------------------------------------------------------------------------------------------------


def test_memory_limit_rejects_before_reading(tmp_path, monkeypatch):
    path = write(make_counts(), tmp_path / "big.h5ad")

    def must_not_read(*_args, **_kwargs):
        raise AssertionError("read_h5ad called for a dataset that does not fit")

    monkeypatch.setattr(ad, "read_h5ad", must_not_read)
    with pytest.raises(InputError) as excinfo:
        read_dataset(path, memory_limit=1000)
    assert_one_line_error(excinfo, path, "too large for memory", "available")


def test_default_memory_limit_is_available_memory(tmp_path, monkeypatch):
    path = write(make_counts(), tmp_path / "big.h5ad")
    monkeypatch.setattr(cio, "available_memory_bytes", lambda: 2048)
    with pytest.raises(InputError) as excinfo:
        read_dataset(path)
    assert_one_line_error(excinfo, path, "too large for memory", "2.0 KiB available")
    monkeypatch.setattr(cio, "available_memory_bytes", lambda: None)  # unknown memory: no check
    assert read_dataset(path).n_obs == 300
    assert read_dataset(path, memory_limit=10 * 2**20).n_obs == 300


def test_memory_estimate_reads_metadata_only(tmp_path):
    """A 400 GB X (declared, never written) is rejected at once from HDF5 metadata, with real MemAvailable."""
    path = write(make_counts(), tmp_path / "huge.h5ad")
    n_obs, n_vars = 1_000_000, 100_000
    with h5py.File(path, "r+") as handle:
        del handle["X"]
        x = handle.create_dataset("X", shape=(n_obs, n_vars), dtype="float32", chunks=(1000, 1000))
        x.attrs["encoding-type"] = "array"
        x.attrs["encoding-version"] = "0.2.0"
    assert path.stat().st_size < 5 * 2**20
    assert cio.estimate_memory_bytes(path) >= cio.MEMORY_OVERHEAD * n_obs * n_vars * 4
    with pytest.raises(InputError) as excinfo:
        read_dataset(path)
    assert_one_line_error(excinfo, path, "too large for memory", "GiB")


def test_memory_estimate_counts_raw_and_layers(tmp_path):
    adata = make_counts()
    plain = cio.estimate_memory_bytes(write(adata, tmp_path / "plain.h5ad"))
    adata.layers["counts"] = adata.X.copy()
    adata.raw = adata.copy()
    assert cio.estimate_memory_bytes(write(adata, tmp_path / "more.h5ad")) > plain + 2 * adata.X.data.nbytes


def test_file_is_read_once(tmp_path, monkeypatch):
    path = write(make_counts(), tmp_path / "once.h5ad")
    calls = []
    real = ad.read_h5ad

    def counting(*args, **kwargs):
        calls.append(args)
        return real(*args, **kwargs)

    monkeypatch.setattr(ad, "read_h5ad", counting)
    read_dataset(path)
    assert len(calls) == 1


def test_previous_run_record_is_replaced(tmp_path):
    adata = make_counts()
    adata.uns["cassia_batch"] = {"warnings": ["stale warning"], "timings": {"qc": 9.0}, "leiden": {"n_clusters": 7}}
    adata = read_dataset(write(adata, tmp_path / "rerun.h5ad"))
    assert "stale warning" not in warnings_of(adata)
    assert "leiden" not in adata.uns["cassia_batch"]


# --- matrix storage ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.int32, np.int64])
@pytest.mark.parametrize("layout", ["dense", "csr", "csc"])
def test_matrix_layouts_and_dtypes(tmp_path, layout, dtype):
    adata = make_counts(120, 150)
    x = adata.X.toarray().astype(dtype)
    adata.X = {"dense": x, "csr": sp.csr_matrix(x), "csc": sp.csc_matrix(x)}[layout]
    adata = read_dataset(write(adata, tmp_path / f"{layout}.h5ad"))
    assert adata.X.dtype == np.float32
    if layout == "dense":
        assert isinstance(adata.X, np.ndarray)
    else:
        assert sp.issparse(adata.X) and adata.X.format == "csr"
    assert adata.uns["cassia_batch"]["input"]["is_counts"] is True
    np.testing.assert_array_equal(np.asarray(adata.X.todense() if sp.issparse(adata.X) else adata.X), x)
    pp.qc(adata, **QC)
    pp.normalize(adata)
    pp.reduce_dimensions(adata, n_top_genes=100, n_pcs=10)
    assert adata.obsm["X_pca"].shape == (adata.n_obs, 10)


def test_x_missing_uses_counts_layer(tmp_path):
    adata = make_counts(50, 60)
    adata.layers["counts"] = adata.X.copy()
    adata.X = None
    adata = read_dataset(write(adata, tmp_path / "no x.h5ad"))
    assert adata.uns["cassia_batch"]["input"]["counts_source"] == "layers['counts']"
    assert adata.X.shape == (50, 60)


# The loader decides counts vs log-normalised vs scaled from every value, not a sample of rows.

def test_decimal_counts_are_counts_with_a_warning(tmp_path):
    """Ambient-RNA-corrected counts (SoupX/DecontX write decimals) are normalised, not taken for log data."""
    adata = make_counts(300, seed=3)
    adata.X = adata.X * np.float32(0.93)
    assert adata.X.max() > 30
    read = read_dataset(write(adata, tmp_path / "decimals.h5ad"))
    record = read.uns["cassia_batch"]["input"]
    assert record["is_counts"] is True and record["integer_counts"] is False
    assert any("non-integer counts" in w for w in warnings_of(read))
    pp.qc(read, **QC)
    kept = read.X.copy()
    pp.normalize(read)
    assert read.uns["cassia_batch"]["normalize"]["method"].startswith("log1p")
    # the counts layer written with the outputs is these decimals, not rounded to whole counts (0.93 is far from
    # any, 1.98 is not)
    near_whole = kept.copy()
    near_whole.data = near_whole.data * np.float32(0.998 / 0.93)
    for x in (kept, near_whole):
        read.X, read.layers["counts"] = x.copy(), x.copy()
        pp.normalize(read)
        assert np.allclose(counts_layer(read).toarray(), x.toarray(), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("row", [1_999, 2_001, 4_999])
def test_a_non_finite_value_in_any_row_rejects_the_file_naming_the_cell(tmp_path, row):
    adata = make_counts(5_000, n_genes=60, seed=4)
    x = adata.X.toarray()
    x[row, 7] = np.nan
    adata.X = sp.csr_matrix(x)
    path = write(adata, tmp_path / "nan.h5ad")
    with pytest.raises(InputError) as excinfo:
        read_dataset(path)
    assert_one_line_error(excinfo, path, "NaN", f"cell{row}", f"row {row}")


def test_nan_in_x_is_no_reason_to_reject_the_counts_kept_beside_it(tmp_path):
    """A hand-made X (z-scores with a NaN) over raw counts in layers['counts']: the counts are the input. A
    counts layer that holds something else is named in a warning, not silently passed over."""
    adata = make_counts(300)
    adata.layers["counts"] = adata.X.copy()
    x = adata.X.toarray()
    x[3, 3] = np.nan
    adata.X = sp.csr_matrix(x)
    read = read_dataset(write(adata, tmp_path / "nan over counts.h5ad"))
    assert read.uns["cassia_batch"]["input"]["counts_source"] == "layers['counts']"
    adata = make_counts(300)
    adata.layers["counts"] = -adata.X
    adata.X = lognorm(adata.X)
    read = read_dataset(write(adata, tmp_path / "odd layer.h5ad"))
    assert any("layers['counts'] was not used: it holds negative values" in w for w in warnings_of(read))


def test_log_normalised_rows_beyond_the_first_thousands_are_not_normalised_again(tmp_path):
    adata = make_counts(5_000, n_genes=60, seed=5)
    adata.X = lognorm(adata.X)
    read = read_dataset(write(adata, tmp_path / "log.h5ad"))
    assert read.uns["cassia_batch"]["input"]["is_counts"] is False


def test_counts_with_tiny_negative_noise_are_clipped_with_a_warning(tmp_path):
    adata = make_counts(300, seed=6)
    adata.X.data[::7] -= np.float32(1e-7)
    adata.X.data[0] = np.float32(-1e-7)
    read = read_dataset(write(adata, tmp_path / "noise.h5ad"))
    assert read.uns["cassia_batch"]["input"]["is_counts"] is True
    assert read.X.min() >= 0
    assert any("tiny negative values" in w for w in warnings_of(read))


# --------------------------------------------------------------------------- the input's own annotations


def test_the_inputs_own_annotations_are_kept_under_author_and_named_in_the_warnings(tmp_path):
    adata = make_counts(200)
    adata.obs["cell_type"] = pd.Categorical(np.where(adata.obs["truth"] == "0", "T cell", "B cell"))
    adata.obs["cell_type_ontology_term_id"] = "CL:0000084"
    adata.obs["leiden"] = pd.Categorical(adata.obs["truth"].astype(str))
    adata.obs["donor"] = "d1"
    adata.uns["cell_type_colors"] = ["#ff0000", "#00ff00"]
    adata.obsm["X_umap"] = np.arange(400, dtype=np.float32).reshape(200, 2)
    adata.var["highly_variable"] = True
    read = read_dataset(write(adata, tmp_path / "cellxgene.h5ad"))
    assert read.obs["author_cell_type"].tolist() == adata.obs["cell_type"].tolist()
    assert set(read.obs["author_cell_type_ontology_term_id"]) == {"CL:0000084"}
    assert read.obs["author_leiden"].tolist() == adata.obs["leiden"].tolist()
    assert "cell_type" not in read.obs and "leiden" not in read.obs and read.obs["donor"].eq("d1").all()
    assert np.array_equal(read.obsm["author_X_umap"], adata.obsm["X_umap"]) and "X_umap" not in read.obsm
    assert read.var["author_highly_variable"].all()
    assert list(read.uns["author_cell_type_colors"]) == ["#ff0000", "#00ff00"]
    [warning] = [w for w in warnings_of(read) if "author_" in w]
    for name in ("cell_type -> author_cell_type", "leiden -> author_leiden", "X_umap -> author_X_umap",
                 "cell_type_ontology_term_id -> author_cell_type_ontology_term_id"):
        assert name in warning
    assert "donor" not in warning and "\n" not in warning


def test_an_author_column_already_taken_keeps_both(tmp_path):
    adata = make_counts(100)
    adata.obs["cell_type"], adata.obs["author_cell_type"] = "new", "old"
    adata.obs["cell_type"] = adata.obs["cell_type"].astype("category")
    adata.uns["cell_type_colors"] = ["#123456"]
    adata.obs["leiden_unsplit"] = pd.Categorical(["a"] * 50 + ["b"] * 50)  # an earlier run's output as input
    read = read_dataset(write(adata, tmp_path / "twice.h5ad"))
    # the name already taken stays as it is; the input's cell_type gets the prefix once more, with its colours
    assert set(read.obs["author_cell_type"]) == {"old"} and set(read.obs["author_author_cell_type"]) == {"new"}
    assert list(read.uns["author_author_cell_type_colors"]) == ["#123456"] and "cell_type_colors" not in read.uns
    assert read.obs["author_leiden_unsplit"].tolist() == ["a"] * 50 + ["b"] * 50 and "leiden_unsplit" not in read.obs
    # what the run reads of the input's own entries follows the renames: the labels scored against, the UMAP kept
    assert kept_as(read, "obs", "cell_type") == "author_author_cell_type" and kept_as(read, "obsm", "X_umap") == ""


def test_the_input_umap_kept_is_its_own_even_when_the_author_name_was_taken(tmp_path):
    adata = make_counts(100)
    adata.obs["clusters"] = pd.Categorical(np.where(np.arange(100) < 50, "a", "b"))
    adata.obsm["X_umap"] = np.arange(200, dtype=np.float32).reshape(100, 2)
    adata.obsm["author_X_umap"] = np.zeros((100, 2), dtype=np.float32)  # another tool's, from an earlier pass
    read = read_dataset(write(adata, tmp_path / "prefixed.h5ad"))
    umap_or_keep(read, cluster_key="clusters")
    assert np.array_equal(read.obsm["X_umap"], adata.obsm["X_umap"][:, :2])
    assert read.uns["cassia_batch"]["umap"] == {"source": "input", "input_key": "author_author_X_umap"}


def test_an_earlier_runs_record_is_kept_beside_this_runs(tmp_path):
    adata = make_counts(100)
    adata.uns["cassia_batch"] = {"self_score": {"key": "lab_label"}, "warnings": ["from the earlier run"]}
    read = read_dataset(write(adata, tmp_path / "annotated before.h5ad"))
    assert read.uns["author_cassia_batch"]["self_score"]["key"] == "lab_label"
    assert "from the earlier run" not in warnings_of(read)  # this run's record is its own
    assert any("cassia_batch -> author_cassia_batch" in w for w in warnings_of(read))


def test_a_counts_layer_beside_the_counts_analysed_is_kept_as_author_counts(tmp_path):
    """X holds the counts the run analyses (e.g. ambient-corrected) and layers['counts'] other counts (the
    uncorrected ones): the written layers['counts'] are the counts analysed, the input's layer author_counts."""
    adata = make_counts(200)
    uncorrected = adata.X + sp.csr_matrix((adata.X > 0).astype(np.float32))
    adata.layers["counts"] = uncorrected
    read = read_dataset(write(adata, tmp_path / "corrected.h5ad"))
    assert read.uns["cassia_batch"]["input"]["counts_source"] == "X"
    assert "counts" not in read.layers and (read.layers["author_counts"] != uncorrected).nnz == 0
    assert any("layers counts -> author_counts" in w for w in warnings_of(read))
    pp.qc(read, **QC)
    pp.normalize(read)
    read.write_h5ad(tmp_path / "annotated.h5ad")
    assert write_counts_layer(read, tmp_path / "annotated.h5ad")
    out = ad.read_h5ad(tmp_path / "annotated.h5ad")
    analysed = adata[out.obs_names, out.var_names]
    assert (out.layers["counts"] != analysed.X).nnz == 0
    np.testing.assert_allclose(np.asarray(out.layers["counts"].sum(axis=1)).ravel(), out.obs["library_size"])
    assert (out.layers["author_counts"] != analysed.layers["counts"]).nnz == 0


def test_a_counts_layer_of_a_log_normalised_input_keeps_its_name(tmp_path):
    adata = make_counts(100)
    adata.X = lognorm(adata.X)
    adata.layers["counts"] = adata.X.copy()  # misnamed, but the run writes no counts layer for this input
    read = read_dataset(write(adata, tmp_path / "lognorm.h5ad"))
    assert "counts" in read.layers and "author_counts" not in read.layers


def test_an_input_without_clashing_names_has_no_author_warning(tmp_path):
    read = read_dataset(write(make_counts(100), tmp_path / "plain.h5ad"))
    assert not [w for w in warnings_of(read) if "author_" in w]
    assert "renamed" not in read.uns["cassia_batch"]["input"]


# --------------------------------------------------------------------------- corrupt or overflowing matrices


def _corrupt(path: Path, how: str) -> None:
    with h5py.File(path, "r+") as handle:
        indices, indptr = handle["X/indices"][:], handle["X/indptr"][:]
        if how == "index beyond the genes":
            indices[7] = 10_000_000
            handle["X/indices"][:] = indices
        elif how == "negative index":
            indices[7] = -4
            handle["X/indices"][:] = indices
        elif how == "indptr decreasing":
            indptr[20] = 0
            handle["X/indptr"][:] = indptr
        elif how == "indptr too short":
            del handle["X/indptr"]
            handle["X"].create_dataset("indptr", data=indptr[:-3])
        else:  # indptr ends past the stored values
            indptr[-1] += 50
            handle["X/indptr"][:] = indptr


@pytest.mark.parametrize("how", ["index beyond the genes", "negative index", "indptr decreasing",
                                 "indptr too short", "indptr ends past the values"])
def test_a_corrupt_sparse_matrix_is_a_one_line_error_naming_the_file(tmp_path, how):
    path = write(make_counts(120), tmp_path / "corrupt.h5ad")
    _corrupt(path, how)
    with pytest.raises(InputError) as excinfo:
        read_dataset(path)
    assert_one_line_error(excinfo, path, "corrupt sparse matrix in X")


@pytest.mark.parametrize("value", [3.0e38, 2.0e9])
def test_counts_too_large_to_be_counts_are_rejected_before_they_overflow(tmp_path, value):
    adata = make_counts(120)
    adata.X = adata.X.astype(np.float64)
    adata.X[5, 3] = value  # a float32 library size of such a cell is infinite (or lost to rounding)
    path = write(adata, tmp_path / "huge.h5ad")
    with pytest.raises(InputError) as excinfo:
        read_dataset(path)
    assert_one_line_error(excinfo, path, "X holds a count of", "above 1e+09", "provide raw counts")


def test_the_largest_accepted_count_still_normalises_to_finite_values(tmp_path):
    adata = make_counts(120)
    adata.X = adata.X.astype(np.float64)
    adata.X[5, 3] = 1e9
    read = read_dataset(write(adata, tmp_path / "large.h5ad"))
    pp.normalize(read)
    assert np.isfinite(read.X.data).all() and np.isfinite(read.obs["library_size"]).all()


# --------------------------------------------------------------------------- what run_batch.py is given


def run_batch_py(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if k not in ("OPENAI_API_KEY", "OPENAI_BASE_URL")}
    return subprocess.run([sys.executable, str(REPO / "run_batch.py"), *args],
                          env={**base, "PYTHONPATH": str(REPO), **(env or {})}, capture_output=True, text=True,
                          timeout=300)


def a_run_folder(tmp_path: Path, *, analysis: dict | None = None, tissue: str = "blood", name: str = "A") -> Path:
    """A run folder as an earlier run left it: its manifest and one dataset's input."""
    from cassia_helpers.settings import Settings

    source = write(make_counts(100), tmp_path / "data" / "blood" / "A.h5ad")
    run = tmp_path / "out" / "run_blood_20260101_000000"
    run.mkdir(parents=True)
    manifest = {"run_dir": str(run), "created_at": "2026-01-01T00:00:00+00:00", "data_dir": str(tmp_path / "data"),
                "tissues": ["blood"], "analysis": Settings(annotator="reference").values() if analysis is None
                else analysis, "datasets": [{"name": name, "tissue": tissue, "path": str(source)}],
                "skipped_inputs": [], "sessions": []}
    (run / "run_manifest.json").write_text(json.dumps(manifest))
    return run


def test_resuming_a_manifest_from_another_version_names_the_keys_and_changes_nothing(tmp_path):
    from cassia_helpers.settings import Settings

    analysis = Settings(annotator="reference").values()
    analysis["min_genes_per_cell"] = analysis.pop("min_genes")  # a renamed key: never a silent default
    analysis["organism"] = analysis.pop("species")
    run = a_run_folder(tmp_path, analysis=analysis)
    result = run_batch_py("--resume", str(run))
    assert result.returncode == 2, result.stderr
    [line] = result.stderr.strip().splitlines()
    assert "unknown analysis setting(s) min_genes_per_cell, organism" in line
    assert "missing analysis setting(s) min_genes, species" in line and str(run / "run_manifest.json") in line
    assert sorted(p.name for p in run.iterdir()) == ["run_manifest.json"]


@pytest.mark.parametrize("field, value", [("tissue", "../../../escaped"), ("name", "../../escaped"),
                                          ("tissue", "/tmp"), ("name", "two\nlines"), ("tissue", "")])
def test_names_from_a_manifest_must_stay_inside_the_run_folder(tmp_path, field, value):
    run = a_run_folder(tmp_path, **{field: value})
    result = run_batch_py("--resume", str(run))
    assert result.returncode == 2, result.stderr
    assert f"{'tissue' if field == 'tissue' else 'dataset name'} {value!r} is" in result.stderr
    assert not list(tmp_path.rglob("escaped")) and sorted(p.name for p in run.iterdir()) == ["run_manifest.json"]


def test_a_tissue_that_leaves_the_output_folder_is_a_usage_error(tmp_path):
    source = write(make_counts(100), tmp_path / "A.h5ad")
    result = run_batch_py("--input", str(source), "--tissue", "../../escaped", "--output-dir", str(tmp_path / "out"),
                          "--annotator", "reference")
    assert result.returncode == 2 and "--tissue: tissue '../../escaped' is" in result.stderr
    assert not list(tmp_path.rglob("escaped"))


def _estimate(stdout: str) -> tuple[int, int]:
    line = next(x for x in stdout.splitlines() if x.startswith("Estimated tokens:"))
    low, high = line.split(":", 1)[1].strip().replace(",", "").split("-")
    return int(low), int(high)


def test_a_context_file_is_counted_by_the_dry_run_and_checked_up_front(tmp_path):
    write(make_counts(300), tmp_path / "data" / "blood" / "A.h5ad")
    context = tmp_path / "context.txt"
    context.write_text("x" * 200_000)  # 50,000 tokens: longer than one command-line argument may be
    common = ("--data-dir", str(tmp_path / "data"), "--tissues", "blood", "--dry-run", "--annotator", "llm",
              "--pipeline", "fast")
    env = {"OPENAI_BASE_URL": "http://127.0.0.1:9/v1"}  # nothing is sent by a dry run
    plain = run_batch_py(*common, env=env)
    with_context = run_batch_py(*common, "--context-file", str(context), env=env)
    assert plain.returncode == 0 and with_context.returncode == 0, with_context.stderr
    (low, high), (low_c, high_c) = _estimate(plain.stdout), _estimate(with_context.stdout)
    clusters = int(next(x for x in plain.stdout.splitlines() if x.startswith("blood")).split()[4].split("-")[0])
    assert low_c - low >= clusters * 3 * 50_000  # the context rides in each of a cluster's three calls
    assert high_c > high

    both = run_batch_py(*common, "--context", "short", "--context-file", str(context), env=env)
    assert both.returncode == 2 and "not both" in both.stderr
    context.write_bytes(b"\xff\xfe not text")
    unreadable = run_batch_py(*common, "--context-file", str(context), env=env)
    assert unreadable.returncode == 2 and f"{context}: --context-file cannot be read as UTF-8 text" in unreadable.stderr
    missing = run_batch_py(*common, "--context-file", str(tmp_path / "nope.txt"), env=env)
    assert missing.returncode == 2 and "nope.txt: --context-file not found" in missing.stderr


def test_the_kernel_reads_the_context_from_its_file(tmp_path):
    from cassia_helpers import context_text
    from cassia_helpers.settings import Settings

    context = tmp_path / "context.txt"
    context.write_text("  lung tumour, smokers\n")
    assert context_text(Settings(context_file=str(context))) == "lung tumour, smokers"
    assert context_text(Settings(context="given inline")) == "given inline"


def test_a_file_named_with_a_newline_or_too_long_a_name_is_skipped_on_one_line_and_the_others_run(tmp_path):
    from cassia_helpers.batch.discovery import discover

    write(make_counts(100), tmp_path / "data" / "blood" / "A.h5ad")
    write(make_counts(100), tmp_path / "data" / "blood" / "B\nC.h5ad")
    long_name = "é" * 110  # 220 bytes: a valid file name, but its outputs' names would not be
    write(make_counts(100), tmp_path / "data" / "blood" / f"{long_name}.h5ad")
    found = discover(tmp_path / "data", ["blood"])
    assert [d.name for d in found.datasets] == ["A"]
    newline, long = sorted(found.skipped, key=len)
    assert "\n" not in newline and "B\\nC.h5ad" in newline and "control character" in newline
    assert long_name in long and "longer than 200 bytes" in long


def test_var_columns_survive_when_raw_holds_more_genes(tmp_path):
    full = make_counts(100)
    adata = full[:, :200].copy()
    adata.raw = full
    adata.X = lognorm(adata.X)
    adata.var["highly_variable"], adata.var["chromosome"] = True, "chr1"
    read = read_dataset(write(adata, tmp_path / "hvg_subset.h5ad"))
    assert read.n_vars == 400  # every raw gene, with the columns only X's genes had
    assert read.var.loc[adata.var_names, "chromosome"].eq("chr1").all()
    assert read.var.loc[adata.var_names, "author_highly_variable"].astype(bool).all()


def test_a_manifest_from_before_context_file_is_migrated_explicitly(tmp_path):
    from cassia_helpers.batch.resume import MIGRATIONS, manifest_analysis
    from cassia_helpers.settings import Settings

    analysis = Settings(annotator="reference", min_genes=50).values()
    del analysis["context_file"]  # the versions before --context-file did not write it
    migrated = manifest_analysis({"analysis": analysis}, tmp_path / "run_manifest.json")
    assert migrated["context_file"] == "" and migrated["min_genes"] == 50 and MIGRATIONS["context_file"] is None
