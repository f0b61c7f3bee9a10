"""Gene symbols for an input whose gene names are ids (Ensembl) or row numbers.

Markers are sent to annotators by name, so an input named by ids needs the symbols its ``var`` holds. The
column is found by its known names first (scanpy's ``gene_symbols``, CELLxGENE's ``feature_name``, ...), then
by its content, since exports name it freely (Seurat's ``features`` or ``name``): a text column whose values
mostly look like symbols (no id, a letter, no spaces) and are mostly distinct.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from cassia_helpers.dataset.record import provenance, warn
from cassia_helpers.inputs import ENSEMBL_ID

if TYPE_CHECKING:
    from anndata import AnnData

# var columns that hold gene symbols when var_names are ids, matched case-insensitively, first found wins
SYMBOL_COLUMNS = (
    "gene_symbols", "gene_symbol", "feature_name", "feature_names", "gene_name", "gene_names",
    "gene_short_name", "symbol", "symbols", "features", "name",
)
# Names, and column values, are judged on this many of the first ones.
SAMPLE = 2000
# A column found by its content has at least this share of distinct values (a few ids share a symbol; a
# column of categories such as a biotype or a feature type has far fewer).
DISTINCT_MIN = 0.9
# Nor is a gene symbol longer than this (a description is).
SYMBOL_MAX_LENGTH = 30
MISSING = ("", "nan", "None", "NaN")


def _not_a_symbol(name: str) -> bool:
    """An Ensembl id, or a name without a letter (an R export's row numbers): not a gene symbol."""
    return bool(ENSEMBL_ID.match(name)) or not any(c.isalpha() for c in name)


def _symbol_like(value: str) -> bool:
    """A value that could be a gene symbol: a name, one short word."""
    return not _not_a_symbol(value) and len(value) <= SYMBOL_MAX_LENGTH and not any(c.isspace() for c in value)


def _values(column: pd.Series) -> tuple[np.ndarray, np.ndarray]:
    """A column's values as text, and which are missing."""
    text = column.astype(str).to_numpy(dtype=object)
    return text, column.isna().to_numpy() | np.isin(text, MISSING)


def symbol_column(adata: AnnData) -> str | None:
    """The ``var`` column holding gene symbols when ``var_names`` are not symbols (ids, numbers), else ``None``."""
    names = adata.var_names.astype(str)
    if np.mean([_not_a_symbol(n) for n in names[:SAMPLE]]) < 0.5:
        return None  # the names are symbols
    by_name = {str(column).lower(): column for column in adata.var.columns}
    known = [by_name[name] for name in SYMBOL_COLUMNS if name in by_name]
    for column in known:
        text, missing = _values(adata.var[column])
        if not missing.all() and np.mean([_not_a_symbol(s) for s in text[~missing][:SAMPLE]]) < 0.5:
            return column  # else empty, or ids again
    for column in adata.var.columns:
        values = adata.var[column]
        text_column = pd.api.types.is_string_dtype(values) or isinstance(values.dtype, pd.CategoricalDtype)
        if column in known or not text_column:
            continue
        text, missing = _values(values)
        present = text[~missing][:SAMPLE]
        if (present.size and np.mean([_symbol_like(str(s)) for s in present]) >= 0.5
                and len(set(present)) >= DISTINCT_MIN * present.size):
            return column
    return None


def use_gene_symbols(adata: AnnData, path: Path, column: str | None) -> None:
    """Name the genes by ``column``'s symbols (an id where it has none), the former names kept in
    ``var['gene_ids']``; without a column, warn when the names are not symbols. Records ``symbol_source``."""
    names = adata.var_names.astype(str)
    record = provenance(adata)["input"]
    if column is not None:
        symbols, missing = _values(adata.var[column])
        adata.var["gene_ids"] = names.to_numpy()
        adata.var_names = np.where(missing, names.to_numpy(dtype=object), symbols)
        record["symbol_source"] = f"var['{column}']"
        return
    record["symbol_source"] = "var_names"
    if np.mean([_not_a_symbol(n) for n in names[:SAMPLE]]) < 0.5:
        return
    ensembl = np.mean([bool(ENSEMBL_ID.match(n)) for n in names[:SAMPLE]]) >= 0.5
    record["symbol_source"] = "ensembl_ids" if ensembl else "not_symbols"
    warn(
        adata,
        f"{path.name}: gene names are {'Ensembl ids' if ensembl else 'not gene symbols (e.g. ' + names[0] + ')'} "
        f"and no symbol column was found (looked for {', '.join(SYMBOL_COLUMNS)}, and text columns of "
        "symbol-like values); marker names will be ids and annotation will suffer",
    )
