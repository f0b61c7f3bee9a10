"""The input's own annotations, kept under ``author_`` when the run would write the same names.

An input often carries its author's results under the names this pipeline writes: every CELLxGENE file has
``obs['cell_type']`` and ``obs['cell_type_ontology_term_id']``, many have ``obs['leiden']``,
``obsm['X_umap']``, ``var['highly_variable']`` or ``layers['counts']``. Before the run writes anything, such
entries are renamed ``author_{name}`` (``author_cell_type``, ``author_X_umap``, ...), so
``{dataset}_annotated.h5ad`` holds the author's annotations beside the run's, and the dataset's warnings name
what was renamed.

:data:`RUN_WRITES` is the one declaration of the names the run writes into ``obs``, ``var``, ``obsm``,
``varm``, ``obsp``, ``uns`` and ``layers`` (a test checks it against the columns a real run adds). A few are
written only for some inputs (``var['gene_ids']`` when the gene names were ids, ``layers['counts']`` when
``X`` is normalised from counts); the reader passes those it will not write, and the input's entries of
those names stay as they are.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from typing import TYPE_CHECKING

from cassia_helpers.dataset.counts import LIBRARY_SIZE_KEY
from cassia_helpers.dataset.split_mixed import UNSPLIT_SUFFIX

if TYPE_CHECKING:
    from anndata import AnnData

AUTHOR_PREFIX = "author_"
# slot -> (exact names, name prefixes) the pipeline writes; a name matching either is renamed in the input
RUN_WRITES: dict[str, tuple[frozenset[str], tuple[str, ...]]] = {
    "obs": (frozenset({"leiden", "leiden" + UNSPLIT_SUFFIX, LIBRARY_SIZE_KEY, "n_genes_by_counts", "total_counts",
                       "total_counts_mt", "pct_counts_mt"}),
            ("cell_type", "cassia_", "marker_evidence")),
    "var": (frozenset({"mt", "n_cells_by_counts", "mean_counts", "pct_dropout_by_counts", "total_counts",
                       "highly_variable", "means", "dispersions", "dispersions_norm", "gene_ids",
                       "highly_variable_nbatches"}), ()),
    "obsm": (frozenset({"X_pca", "X_umap", "X_pca_uncorrected"}), ()),
    "varm": (frozenset({"PCs"}), ()),
    "obsp": (frozenset({"distances", "connectivities"}), ()),
    "uns": (frozenset({"leiden", "pca", "neighbors", "umap", "hvg", "log1p", "rank_genes_groups"}),
            ("cell_type", "leiden_")),
    "layers": (frozenset({"counts"}), ()),
}


def written_by_run(slot: str, name: str) -> bool:
    """Whether the pipeline writes ``name`` into ``slot`` (``"obs"``, ``"var"``, ...)."""
    exact, prefixes = RUN_WRITES[slot]
    return name in exact or name.startswith(prefixes)


def _free_name(name: str, taken) -> str:
    renamed = AUTHOR_PREFIX + name
    while renamed in taken:  # the input has both cell_type and author_cell_type: keep both
        renamed = AUTHOR_PREFIX + renamed
    return renamed


def keep_author_annotations(adata: AnnData, *, not_written: Mapping[str, Collection[str]] | None = None
                            ) -> dict[str, dict[str, str]]:
    """Rename, in place, every entry of ``adata`` the run would overwrite to ``author_{name}``.

    ``obs``, ``var`` (columns), ``obsm``, ``varm``, ``obsp``, ``uns`` and ``layers`` (keys) are looked at;
    ``uns`` colour lists of renamed ``obs`` columns (``{column}_colors``) follow their column. Names in
    ``not_written`` (``{slot: names}``) are ones the run will not write for this dataset: they keep their
    name. Returns ``{slot: {old name: new name}}`` for the slots where something was renamed.
    """
    not_written = not_written or {}

    def overwritten(slot: str, name: str) -> bool:
        return written_by_run(slot, name) and name not in not_written.get(slot, ())

    renamed: dict[str, dict[str, str]] = {}
    for slot in ("obs", "var"):
        frame = getattr(adata, slot)
        names = {str(c): _free_name(str(c), frame.columns) for c in frame.columns if overwritten(slot, str(c))}
        if names:
            frame.rename(columns=names, inplace=True)
            renamed[slot] = names
    for slot in ("obsm", "varm", "obsp", "uns", "layers"):
        mapping = getattr(adata, slot)
        moves = {str(k): _free_name(str(k), mapping.keys()) for k in list(mapping.keys())
                 if overwritten(slot, str(k))}
        for column, new_column in renamed.get("obs", {}).items():
            if slot == "uns" and f"{column}_colors" in mapping:  # the colours follow their column's new name
                moves[f"{column}_colors"] = f"{new_column}_colors"
        for old, new in moves.items():
            mapping[new] = mapping[old]
            del mapping[old]
        if moves:
            renamed[slot] = moves
    return renamed


def keep_beside(mapping, name: str, value) -> str:
    """Store ``value`` in ``mapping`` under ``author_{name}`` (or a longer free name) and return that name."""
    kept = _free_name(name, mapping.keys())
    mapping[kept] = value
    return kept


def renamed_warning(renamed: dict[str, dict[str, str]]) -> str:
    """One line naming what :func:`keep_author_annotations` renamed, for the dataset's warnings."""
    parts = [f"{slot} " + ", ".join(f"{old} -> {new}" for old, new in names.items())
             for slot, names in renamed.items()]
    return ("the input's own annotations that this run writes too were kept under the author_ prefix: "
            + "; ".join(parts))
