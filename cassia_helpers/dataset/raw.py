"""The input's ``.raw`` made the matrix the run analyses.

A Seurat export (SeuratDisk, sceasy) or a scanpy file saved after HVG selection holds scaled or
log-normalised values of a gene subset in ``X`` and the counts of every gene in ``.raw``. The run analyses
``raw.X``, so its genes become the dataset's; the columns of ``X``'s ``var`` that ``raw.var`` lacks (Seurat's
``vst.variable``, scanpy's ``highly_variable``, ...) are kept, empty for the genes ``X`` did not hold.
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING

import pandas as pd

if TYPE_CHECKING:
    from anndata import AnnData

# anndata's warning on duplicated names: the reader makes them unique and records that as the dataset's own
# warning, so anndata's would only repeat it (and under PYTHONWARNINGS=error would fail the read)
DUPLICATE_NAMES = r"(Observation|Variable) names are not unique"


def from_raw(adata: AnnData) -> AnnData:
    """``adata`` with ``raw.X`` as ``X`` (and ``raw.var`` as ``var`` when raw holds other genes, joined with
    the columns only ``X``'s ``var`` has: see :func:`var_on_raw`). ``obs``, ``uns`` and ``obsm`` are kept."""
    raw = adata.raw
    if raw.n_vars == adata.n_vars and raw.var_names.equals(adata.var_names):
        adata.X = raw.X.copy()
        adata.raw = None
        return adata
    from anndata import AnnData

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=DUPLICATE_NAMES)
        return AnnData(X=raw.X.copy(), obs=adata.obs, var=var_on_raw(raw.var, adata.var), uns=dict(adata.uns),
                       obsm=dict(adata.obsm))


def var_on_raw(raw_var: pd.DataFrame, x_var: pd.DataFrame) -> pd.DataFrame:
    """``raw_var`` with the columns of ``x_var`` it lacks, missing (NA) for the genes ``x_var`` does not hold.

    Columns take pandas' nullable dtypes (bool -> ``boolean``, int -> ``Int64``, text -> ``string``;
    categoricals stay categorical), so the missing values neither turn a True/False column into objects
    anndata cannot write nor an integer column into floats. Genes are matched by name and, for a name
    either side holds more than once, by order of appearance; a name the two sides hold a different number
    of times cannot be matched and its ``x_var`` values are left missing. The index stays ``raw_var``'s
    (duplicates included: they are made unique, with a warning, with the other gene names).
    """
    extra = x_var[[c for c in x_var.columns if c not in raw_var.columns]]
    in_raw = raw_var.index.value_counts()
    in_x = extra.index.value_counts()
    matched = [in_raw.get(name, 0) == in_x[name] for name in extra.index]
    extra = extra[matched]
    extra = pd.DataFrame({c: _nullable(extra[c]) for c in extra.columns}).set_axis(_occurrences(extra.index))
    extra = extra.reindex(_occurrences(raw_var.index))
    var = raw_var.copy()
    for column in extra.columns:
        var[column] = extra[column].array  # .array: the values with their (nullable) dtype, whatever the index
    return var


def _occurrences(names: pd.Index) -> pd.MultiIndex:
    """``(name, n)`` for the n-th appearance of each name (0 first): a key unique even where names repeat."""
    names = pd.Series(names.astype(str), dtype=object)
    return pd.MultiIndex.from_arrays([names.to_numpy(), names.groupby(names).cumcount().to_numpy()])


def _nullable(column: pd.Series) -> pd.Series:
    """``column`` in the pandas dtype that holds a missing value without changing the others' type."""
    dtype = column.dtype
    if isinstance(dtype, pd.CategoricalDtype):
        return column  # a missing category is already NaN, written as such
    if pd.api.types.is_bool_dtype(dtype):
        return column.astype("boolean")
    if pd.api.types.is_integer_dtype(dtype):
        return column.astype("Int64")
    if pd.api.types.is_object_dtype(dtype) or pd.api.types.is_string_dtype(dtype):
        return column.astype("string")
    return column
