"""Robust reading of one input h5ad.

Reading answers every bad input with an :class:`InputError` whose message is one line naming the file
and the problem, so the driver can report it and go on with the other datasets.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import scipy.sparse as sp

from cassia_helpers.dataset.author import keep_author_annotations, keep_beside, renamed_warning
from cassia_helpers.dataset.h5ad import read_h5ad
from cassia_helpers.dataset.matrix import sparse_problem
from cassia_helpers.dataset.raw import from_raw
from cassia_helpers.dataset.record import KEY as PROVENANCE_KEY
from cassia_helpers.dataset.record import provenance, warn
from cassia_helpers.dataset.symbols import symbol_column, use_gene_symbols
from cassia_helpers.inputs import ENSEMBL_ID, InputError, check_input

if TYPE_CHECKING:
    from anndata import AnnData

# the 10x feature type of genes (others: Antibody Capture, CRISPR Guide Capture, Peaks)
GENE_EXPRESSION = "Gene Expression"
# CITE-seq antibodies: few (tens to hundreds), so their values are kept per cell in obsm[PROTEIN_KEY], where
# muon and scanpy users look for them; other feature types (100,000+ multiome peaks) are left out
ANTIBODY_CAPTURE = "Antibody Capture"
PROTEIN_KEY = "protein"
# Deciding counts vs log-normalised vs scaled reads every value, this many at a time (no copy of the matrix).
BLOCK_VALUES = 4_000_000
# log1p of any realistic normalised value stays far below this; larger non-integer values are counts
# (e.g. after ambient-RNA correction such as SoupX or DecontX).
LOG_MAX = 30.0
# Values this close to an integer are integers (float32 storage of counts).
INTEGER_TOLERANCE = 1e-3
# No assay counts a billion molecules of one gene in one cell: larger values are corrupt or mis-scaled data.
# They are rejected rather than clipped, because a clipped value is still wrong and library sizes near
# float32's maximum (3.4e38) overflow to infinity, turning the normalised matrix into NaN.
COUNT_MAX = 1e9
# Negative values no further below zero than this are numerical noise and are clipped to 0.
NOISE_FLOOR = -1e-3


def read_dataset(path: str | Path, *, species: str = "human", memory_limit: int | None = None) -> AnnData:
    """Read one input h5ad and make it ready for the pipeline.

    Finds gene symbols (``var_names``, or a ``var`` column such as ``gene_symbols`` or ``feature_name``
    when ``var_names`` are Ensembl ids), makes gene and cell names unique, and detects whether ``X`` holds
    raw counts or log-normalised values (``.layers['counts']`` or an integer ``.raw`` are used as counts
    when ``X`` is normalised or scaled). ``X`` is returned as float32, dense or CSR. Of a matrix with other
    10x feature types beside the genes, only the genes are kept in ``X``; CITE-seq antibodies go to
    ``obsm['protein']`` (:func:`_gene_expression_only`).

    Before anything is loaded the file is checked from its HDF5 metadata alone: that it is an AnnData
    h5ad, that it has cells and genes, and that reading and processing it fits in memory. The file is
    then read once.

    Parameters
    ----------
    path
        The h5ad file.
    species
        ``"human"`` or ``"mouse"``; a gene-symbol case that does not match is recorded as a warning.
    memory_limit
        Bytes the dataset may use; ``None`` uses the memory available now (``MemAvailable``).

    Returns
    -------
    The AnnData, with ``uns['cassia_batch']['input']`` (``file``, ``n_cells``, ``n_genes``,
    ``symbol_source``, ``is_counts``, ``counts_source``, and ``renamed``: the input's own entries the run
    would overwrite, kept as ``author_{name}`` by :func:`~cassia_helpers.dataset.author.keep_author_annotations`),
    ``uns['cassia_batch']['warnings']`` and
    ``uns['cassia_batch']['timings']['load']`` written.

    Raises
    ------
    InputError
        Not an h5ad/HDF5 file, truncated or corrupt, open for writing by another process, written by a newer
        anndata (in anything but ``uns``, whose unreadable entries are left out with a warning), no cells or
        genes, scaled (negative) or non-finite values, or too large for the memory available. The message is
        one line starting with the path.
    """
    path = Path(path)
    start = time.perf_counter()
    check_input(path, memory_limit=memory_limit)
    adata, left_out = read_h5ad(path)
    if adata.n_obs == 0:
        raise InputError(f"{path}: no cells (0 observations)")
    if adata.n_vars == 0:
        raise InputError(f"{path}: no genes (0 variables)")
    _check_sparse_structure(adata, path)

    earlier = adata.uns.pop(PROVENANCE_KEY, None)  # an input written by an earlier run: this run keeps its own
    adata = _gene_expression_only(adata, path)
    adata, counts = _select_matrix(adata, path)
    # names the run writes for some inputs only: the input's entries of those names are no clash for others
    # (layers['counts'] is written when counts are normalised, var['gene_ids'] when symbols come from a column)
    symbols = symbol_column(adata)
    not_written = {"layers": [] if counts["is_counts"] else ["counts"], "var": [] if symbols else ["gene_ids"]}
    renamed = keep_author_annotations(adata, not_written=not_written)
    if earlier is not None:  # ... and the earlier run's beside it
        renamed.setdefault("uns", {})[PROVENANCE_KEY] = keep_beside(adata.uns, PROVENANCE_KEY, earlier)
    record = provenance(adata)
    record["input"] = {"file": str(path), "n_cells": int(adata.n_obs), "n_genes": int(adata.n_vars), **counts}
    for key, encoding in left_out.items():
        warn(adata, f"uns['{key}'] was left out: written by a newer anndata, whose encoding {encoding} this one "
                    "cannot read (update anndata to keep it)")
    if renamed:
        record["input"]["renamed"] = renamed
        warn(adata, renamed_warning(renamed))
    if not counts["is_counts"]:
        source = "X" if counts["counts_source"] == "none" else "raw.X"
        warn(adata, f"{source} is already log-normalised (non-integer values, no raw counts found): "
                    "normalisation was skipped")
    if not adata.obs_names.is_unique:
        n_dup = int(adata.obs_names.duplicated().sum())
        adata.obs_names_make_unique()
        warn(adata, f"{n_dup} duplicated cell names (obs_names) were made unique (suffix -1, -2, ...)")
    use_gene_symbols(adata, path, renamed.get("var", {}).get(symbols, symbols))
    if not adata.var_names.is_unique:
        n_dup = int(adata.var_names.duplicated().sum())
        adata.var_names_make_unique()
        warn(adata, f"{n_dup} duplicated gene names were made unique (suffix -1, -2, ...)")
    _check_species_case(adata, species)
    if sp.issparse(adata.X) and adata.X.format != "csr":
        adata.X = sp.csr_matrix(adata.X)
    if adata.X.dtype != np.float32:
        adata.X = adata.X.astype(np.float32)
    record["timings"]["load"] = round(time.perf_counter() - start, 3)
    return adata


def _check_sparse_structure(adata: AnnData, path: Path) -> None:
    """Reject a sparse matrix whose ``indices``/``indptr`` are corrupt before any step indexes with them."""
    matrices = {"X": adata.X, **{f"layers['{k}']": v for k, v in adata.layers.items()}}
    if adata.raw is not None:
        matrices["raw.X"] = adata.raw.X
    for where, matrix in matrices.items():
        problem = sparse_problem(matrix)
        if problem:
            raise InputError(f"{path}: corrupt sparse matrix in {where}: {problem}")


def _gene_expression_only(adata: AnnData, path: Path) -> AnnData:
    """The gene-expression features of a 10x matrix that holds others too (``var['feature_types']``: CITE-seq
    antibodies, CRISPR guides, multiome peaks), which would otherwise count as genes in every step.

    The ``Antibody Capture`` features' values in ``X`` (the ADT counts of a 10x file) are kept as
    ``obsm['protein']``, a DataFrame of cells × antibody names, unless the input has an ``obsm['protein']``
    already; every other feature is left out of the analysis and of the output, and a warning says which.
    """
    import pandas as pd
    from anndata.utils import make_index_unique

    if "feature_types" not in adata.var.columns:
        return adata
    types = adata.var["feature_types"].astype(str)
    genes = (types == GENE_EXPRESSION).to_numpy()
    if genes.all():
        return adata
    if not genes.any():
        raise InputError(f"{path}: no '{GENE_EXPRESSION}' features (var['feature_types'] holds only "
                         f"{', '.join(sorted(set(types)))})")
    antibodies = (types == ANTIBODY_CAPTURE).to_numpy() if PROTEIN_KEY not in adata.obsm else np.zeros_like(genes)
    protein = None
    if antibodies.any():
        values = adata.X[:, np.flatnonzero(antibodies)]
        names = make_index_unique(pd.Index(adata.var_names[antibodies].astype(str)))  # h5ad needs them unique
        protein = pd.DataFrame(values.toarray() if sp.issparse(values) else np.asarray(values),
                               index=adata.obs_names.copy(), columns=names)
    dropped = types[~genes & ~antibodies].value_counts()
    adata = adata[:, genes].copy()
    said = [f"analysed the {int(genes.sum())} '{GENE_EXPRESSION}' features of var['feature_types']"]
    if protein is not None:
        adata.obsm[PROTEIN_KEY] = protein
        said.append(f"the {protein.shape[1]} '{ANTIBODY_CAPTURE}' features are in obsm['{PROTEIN_KEY}']")
    if len(dropped):
        said.append("left out of the analysis and of the output: "
                    + ", ".join(f"{n} '{kind}'" for kind, n in dropped.items())
                    + (f" (obsm['{PROTEIN_KEY}'] is the input's own)" if PROTEIN_KEY in adata.obsm
                       and protein is None and ANTIBODY_CAPTURE in dropped.index else ""))
    warn(adata, "; ".join(said))
    return adata


def _value_chunks(matrix):
    """``(values, rows)`` chunks covering every stored value; ``rows`` maps a chunk position to its row."""
    if sp.issparse(matrix):
        if matrix.format not in ("csr", "csc"):
            matrix = sp.csr_matrix(matrix)
        data = matrix.data
        for lo in range(0, data.size, BLOCK_VALUES):
            hi = min(lo + BLOCK_VALUES, data.size)
            if matrix.format == "csr":
                yield data[lo:hi], lambda i, lo=lo: int(np.searchsorted(matrix.indptr, lo + i, side="right") - 1)
            else:
                yield data[lo:hi], lambda i, lo=lo: int(matrix.indices[lo + i])
        return
    array = np.asarray(matrix)
    if array.ndim != 2:
        array = array.reshape(matrix.shape)
    step = max(1, BLOCK_VALUES // max(1, array.shape[1]))
    for lo in range(0, array.shape[0], step):
        block = array[lo:lo + step]
        yield block.ravel(), lambda i, lo=lo, width=array.shape[1]: lo + i // width


def matrix_profile(matrix) -> dict:
    """What a matrix holds, decided from every value, block by block (no copy of the matrix).

    Returns ``kind`` (``"counts"``, ``"lognorm"``, ``"negative"``, ``"nonfinite"``), ``integer`` (all values
    within 0.001 of an integer), ``min``, ``max``, ``noise`` (the count of tiny negative values, above
    -0.001) and ``row`` (the first row holding a non-finite value, else ``None``).
    """
    profile = {"kind": "counts", "integer": True, "min": 0.0, "max": 0.0, "noise": 0, "row": None}
    dtype = matrix.dtype
    if not np.issubdtype(dtype, np.number) or np.issubdtype(dtype, np.complexfloating):
        return {**profile, "kind": "nonfinite", "integer": False}
    lowest, highest = np.inf, -np.inf
    for values, row_of in _value_chunks(matrix):
        if values.size == 0:
            continue
        if not np.issubdtype(values.dtype, np.integer):
            finite = np.isfinite(values)
            if not finite.all():
                return {**profile, "kind": "nonfinite", "integer": False, "row": row_of(int(np.argmin(finite)))}
            if profile["integer"] and np.any(np.abs(values - np.rint(values)) > INTEGER_TOLERANCE):
                profile["integer"] = False
        low = float(values.min())
        lowest, highest = min(lowest, low), max(highest, float(values.max()))
        if low < 0:
            profile["noise"] += int(np.count_nonzero((values < 0) & (values >= NOISE_FLOOR)))
    if np.isfinite(lowest):
        profile["min"], profile["max"] = lowest, highest
    if lowest < NOISE_FLOOR:
        profile["kind"] = "negative"
    elif not profile["integer"] and highest <= LOG_MAX:
        profile["kind"] = "lognorm"
    return profile


def _clip_noise(matrix) -> None:
    """Set tiny negative values (numerical noise above -0.001) to 0, in place."""
    values = matrix.data if sp.issparse(matrix) else matrix
    np.maximum(values, 0, out=values)


# what a matrix of each non-count kind of :func:`matrix_profile` holds, for a warning
NOT_COUNTS = {"lognorm": "non-integer values small enough to be log-normalised", "negative": "negative values",
              "nonfinite": "NaN, infinite or non-numeric values"}


def _select_matrix(adata: AnnData, path: Path) -> tuple[AnnData, dict]:
    """Put counts in ``X`` when any are found, else log-normalised values; return the choice made."""
    x = matrix_profile(adata.X) if adata.X is not None else {"kind": "missing"}
    if x["kind"] == "counts":
        return adata, _counts_choice(adata, adata.X, x, "X", path)
    if "counts" in adata.layers:
        layer = matrix_profile(adata.layers["counts"])
        if layer["kind"] == "counts":
            adata.X = adata.layers["counts"]
            del adata.layers["counts"]  # qc stores a copy of the filtered counts there again
            return adata, _counts_choice(adata, adata.X, layer, "layers['counts']", path)
        warn(adata, f"layers['counts'] was not used: it holds {NOT_COUNTS[layer['kind']]}")
    raw = matrix_profile(adata.raw.X) if adata.raw is not None else {"kind": "missing"}
    if raw["kind"] == "counts":
        adata = from_raw(adata)
        return adata, _counts_choice(adata, adata.X, raw, "raw.X", path)
    if x["kind"] == "nonfinite":  # counts elsewhere would have been used: X was the only matrix left
        where = f" (first in cell {adata.obs_names[x['row']]!r}, row {x['row']})" if x.get("row") is not None else ""
        raise InputError(f"{path}: X holds NaN, infinite or non-numeric values{where}, and no counts were found "
                         "in layers['counts'] or raw; provide raw counts")
    if x["kind"] == "lognorm" and not (raw["kind"] == "lognorm" and adata.raw.n_vars > adata.n_vars):
        return adata, {"is_counts": False, "counts_source": "none"}
    if raw["kind"] == "lognorm":  # X scaled, or a gene subset of raw (as after HVG selection)
        return from_raw(adata), {"is_counts": False, "counts_source": "none (log-normalised raw.X)"}
    if x["kind"] == "missing":
        raise InputError(f"{path}: no expression matrix (X is empty and there is no counts layer or raw)")
    raise InputError(
        f"{path}: X holds negative values down to {x['min']:.3g} (scaled data) and no counts were found in "
        "layers['counts'] or raw; provide raw counts or log-normalised data"
    )


def _counts_choice(adata: AnnData, matrix, profile: dict, source: str, path: Path) -> dict:
    """Record counts taken from ``source``, clipping numerical noise and noting non-integer counts; counts above
    :data:`COUNT_MAX` are an :class:`InputError`."""
    if profile["max"] > COUNT_MAX:
        raise InputError(f"{path}: {source} holds a count of {profile['max']:.4g}, above "
                         f"{COUNT_MAX:.0e} (corrupt or mis-scaled data; library sizes would overflow); "
                         "provide raw counts")
    if profile["noise"]:
        _clip_noise(matrix)
        warn(adata, f"{source}: {profile['noise']} tiny negative values (above {NOISE_FLOOR:g}, numerical noise) "
                    "were set to 0")
    if not profile["integer"]:
        warn(adata, f"{source} holds non-integer counts (values up to {profile['max']:.4g}, too large for "
                    "log-normalised data), e.g. after ambient-RNA correction: normalised as counts")
    return {"is_counts": True, "counts_source": source, "integer_counts": bool(profile["integer"])}


def _check_species_case(adata: AnnData, species: str) -> None:
    names = [n for n in adata.var_names[:3000] if n[:1].isalpha() and not ENSEMBL_ID.match(n)]
    if not names:
        return
    title = np.mean([n[0].isupper() and n[1:] == n[1:].lower() and not n.isupper() for n in names])
    upper = np.mean([n.isupper() for n in names])
    species = species.lower()
    # the offline reference matches the species' own symbols (Cd3e for mouse, CD3E for human): say what follows
    if species == "human" and title > 0.5:
        warn(adata, "gene symbols look like mouse symbols (title case) but species is human: the offline "
                    "reference finds no human marker in them (clusters Unknown); run it with --species mouse")
    elif species == "mouse" and upper > 0.8:
        warn(adata, "gene symbols are upper case (human style) but species is mouse: the offline reference "
                    "finds no mouse marker in them (clusters Unknown); run it with --species human")


