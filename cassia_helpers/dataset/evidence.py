"""Deterministic marker evidence: is a cluster's call backed by the expression of its markers?

For each cluster and its call, the fraction of the cluster's cells expressing each cited key marker
and each canonical marker of the called type (from the packaged marker reference), against the rest of
the dataset, an evidence score and a flag when the call's own key markers are not enriched. The same
check applies to LLM and reference calls: it reads only the label, the cited markers and the data.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = ["ClusterProfile", "cluster_profile", "marker_evidence", "MIN_FRACTION"]

#: a key marker detected in fewer of the cluster's cells than this is not enriched
MIN_FRACTION = 0.2
#: ... nor is one whose detection rate is not at least this much higher than in the other cells
MIN_DELTA = 0.05
#: ... or whose mean (log scale) is not at least this much higher
MIN_MEAN_DELTA = 0.25
_PROVENANCE_KEY = "cassia_batch"


@dataclass
class ClusterProfile:
    """Pseudobulk statistics of some genes per cluster (rows: clusters, columns: genes).

    ``frac_in``/``frac_out``: fraction of the cluster's / the other cells with a non-zero value;
    ``mean_in``/``mean_out``: mean value in the cluster / in the other cells.
    """

    clusters: list[str]
    genes: list[str]
    n_cells: np.ndarray
    frac_in: np.ndarray
    frac_out: np.ndarray
    mean_in: np.ndarray
    mean_out: np.ndarray

    def column(self, gene: str) -> int | None:
        try:
            return self.genes.index(gene)
        except ValueError:
            return None


def _matrix(adata: Any, *, use_raw: bool, layer: str | None):
    if use_raw:
        if adata.raw is None:
            raise ValueError("use_raw=True but adata.raw is None")
        return adata.raw.X, list(map(str, adata.raw.var_names))
    x = adata.layers[layer] if layer is not None else adata.X
    return x, list(map(str, adata.var_names))


def cluster_profile(
    adata: Any,
    genes: list[str] | None = None,
    *,
    groupby: str = "leiden",
    use_raw: bool = False,
    layer: str | None = None,
) -> ClusterProfile:
    """Detection rates and means of ``genes`` in each cluster and in the rest of the cells.

    Parameters
    ----------
    adata
        Data with log-normalised expression in ``X`` (or ``layer``, or ``raw`` with ``use_raw``).
    genes
        Genes to profile; those absent from the data are dropped. ``None`` for every gene.
    groupby
        Cluster column of ``obs``.
    use_raw, layer
        Where to read expression from.

    Returns
    -------
    ClusterProfile
        Statistics for the genes present, clusters in order of first appearance.
    """
    import pandas as pd
    import scipy.sparse as sp

    x, names = _matrix(adata, use_raw=use_raw, layer=layer)
    index = {g: i for i, g in enumerate(names)}
    wanted = list(dict.fromkeys(g for g in (names if genes is None else genes) if g in index))
    cols = np.array([index[g] for g in wanted], dtype=int)
    sub = x[:, cols] if len(cols) else np.zeros((adata.n_obs, 0), dtype=np.float32)
    sub = sp.csr_matrix(sub) if not sp.issparse(sub) else sub.tocsr()
    labels = adata.obs[groupby].astype(str).to_numpy()
    clusters = [str(c) for c in pd.unique(labels)]
    codes = pd.Categorical(labels, categories=clusters).codes
    onehot = sp.csr_matrix((np.ones(len(codes)), (codes, np.arange(len(codes)))), shape=(len(clusters), len(codes)))
    n = np.asarray(onehot.sum(axis=1)).ravel()
    total_n = n.sum()
    detected = (sub > 0).astype(np.float64)
    det_sum = np.asarray((onehot @ detected).todense())
    val_sum = np.asarray((onehot @ sub.astype(np.float64)).todense())
    det_all, val_all = det_sum.sum(axis=0), val_sum.sum(axis=0)
    rest = np.maximum(total_n - n, 1)[:, None]
    return ClusterProfile(
        clusters=clusters,
        genes=wanted,
        n_cells=n.astype(int),
        frac_in=det_sum / n[:, None],
        frac_out=(det_all - det_sum) / rest,
        mean_in=val_sum / n[:, None],
        mean_out=(val_all - val_sum) / rest,
    )


def _enriched(f_in: float, f_out: float, m_in: float, m_out: float, min_fraction: float) -> bool:
    higher = f_in - f_out >= MIN_DELTA or m_in - m_out >= MIN_MEAN_DELTA
    return bool(f_in >= min_fraction and m_in > m_out and higher)


def _canonical(label: str, species: str) -> tuple[str | None, list[str]]:
    """Reference type whose name or CL term (or the term's nearest ancestor) matches the label, and its markers."""
    from cassia_helpers.dataset.annotate.reference.catalog import load_reference
    from cassia_helpers.dataset.ontology import load_cell_ontology

    ref = load_reference()
    species = species if species in ("human", "mouse") else "human"
    for ct in ref.cell_types:
        if ct.name.lower() == label.strip().lower():
            return ct.name, list(ct.symbols(species))
    onto = load_cell_ontology()
    match = onto.match(label)
    if match.matched:
        by_id = {ct.cl_id: ct for ct in ref.cell_types if ct.cl_id}
        # the reference type with the label's CL term, else with its nearest ancestor term
        for term in [match.term_id, *onto.ancestors(match.term_id)]:
            if term in by_id:
                return by_id[term].name, list(by_id[term].symbols(species))
    return None, []


def marker_evidence(
    adata: Any,
    calls: list[Any] | dict[str, dict] | None = None,
    *,
    groupby: str | None = None,
    label_key: str | None = None,
    species: str = "human",
    use_raw: bool = False,
    layer: str | None = None,
    min_fraction: float = MIN_FRACTION,
    key_added: str = "marker_evidence",
) -> Any:
    """Check every cluster's call against the expression of its markers.

    Parameters
    ----------
    adata
        Annotated data: log-normalised expression and ``obs[groupby]``.
    calls
        The calls: :class:`~cassia_helpers.dataset.annotate.ClusterAnnotation` objects, or
        ``{cluster: {"main_cell_type": ..., "key_markers": [...]}}``. ``None`` reads the label from
        ``obs[label_key]`` and the cited markers from ``uns['cassia_batch']['annotation']['clusters']``
        (``key_markers``, comma-separated) when present.
    groupby
        Cluster column (default: the clustering's ``key_added``).
    label_key
        Column with the called labels, used when ``calls`` is ``None`` (default: the annotation's ``key_added``).
    species
        Selects the reference's marker symbols for the canonical markers.
    use_raw, layer
        Where to read expression from.
    min_fraction
        A key marker detected in fewer of the cluster's cells is not enriched.
    key_added
        Prefix of the ``obs`` columns and the ``uns['cassia_batch']`` key written.

    Returns
    -------
    pandas.DataFrame
        One row per cluster: ``cluster``, ``label``, ``reference_type`` (the reference type used for the
        canonical markers, empty if none), ``key_markers``, ``n_enriched``, ``n_key_markers``,
        ``evidence_score`` (0-1), ``flag`` (bool), ``flag_reason`` and ``markers`` (JSON list of
        ``{"gene", "source", "frac_in", "frac_out", "mean_in", "mean_out", "enriched"}``).

    Notes
    -----
    A marker is *enriched* when detected in at least ``min_fraction`` of the cluster's cells, with a
    higher mean than in the other cells, and either detected in at least 5 percentage points more of
    the cluster's cells or with a mean at least 0.25 log units higher. The evidence score is the mean,
    over the cited key markers and the canonical markers measured, of
    ``frac_in * clip(mean_in - mean_out, 0, 1)`` (log-scale mean difference capped at 1): 1 means every
    marker is detected in every cell of the cluster at least one log unit above the other cells.
    The flag fires when the call names a cell type and fewer than half of its key markers (the cited ones, else
    the canonical ones, as measured in the data) are enriched, or when none is measured. ``Unknown`` clusters
    are not flagged (there is nothing to check).

    Writes ``obs[f"{key_added}_score"]`` (float; NaN for clusters without a call),
    ``obs[f"{key_added}_flag"]`` (bool) and
    ``uns['cassia_batch'][key_added]`` with ``min_fraction`` and the per-cluster table (``clusters``).
    """
    import pandas as pd

    from cassia_helpers.dataset.record import cluster_key
    from cassia_helpers.dataset.record import label_key as annotation_key

    groupby, label_key = groupby or cluster_key(adata), label_key or annotation_key(adata)
    labels = adata.obs[groupby].astype(str)
    per_cluster: dict[str, tuple[str, list[str]]] = {}
    if calls is None:
        table = adata.uns.get(_PROVENANCE_KEY, {}).get("annotation", {}).get("clusters")
        cited = {}
        if table is not None:
            for _, row in pd.DataFrame(table).iterrows():
                cited[str(row["cluster"])] = [g.strip() for g in str(row.get("key_markers", "")).split(",") if
                                              g.strip()]
        for cluster in pd.unique(labels):
            label = adata.obs.loc[(labels == cluster).to_numpy(), label_key].astype(str).mode().iloc[0]
            per_cluster[cluster] = (label, cited.get(cluster, []))
    elif isinstance(calls, dict):
        for cluster, call in calls.items():
            per_cluster[str(cluster)] = (str(call.get("main_cell_type", "")), list(call.get("key_markers", [])))
    else:
        for call in calls:
            per_cluster[str(call.cluster)] = (str(call.main_cell_type), list(call.key_markers))

    canon = {c: _canonical(label, species) for c, (label, _) in per_cluster.items()}
    genes = [g for label, cited in per_cluster.values() for g in cited]
    genes += [g for _, markers in canon.values() for g in markers]
    prof = cluster_profile(adata, genes, groupby=groupby, use_raw=use_raw, layer=layer)
    row_of = {c: i for i, c in enumerate(prof.clusters)}
    rows = []
    for cluster, (label, cited) in per_cluster.items():
        ref_type, canonical = canon[cluster]
        records = []
        for source, gene_list in (("cited", cited), ("canonical", canonical)):
            for gene in gene_list:
                j = prof.column(gene)
                if j is None or cluster not in row_of or any(r["gene"] == gene for r in records):
                    continue
                i = row_of[cluster]
                f_in, f_out = float(prof.frac_in[i, j]), float(prof.frac_out[i, j])
                records.append({
                    "gene": gene, "source": source,
                    "frac_in": round(f_in, 4), "frac_out": round(f_out, 4),
                    "mean_in": round(float(prof.mean_in[i, j]), 4), "mean_out": round(float(prof.mean_out[i, j]), 4),
                    "enriched": _enriched(f_in, f_out, float(prof.mean_in[i, j]), float(prof.mean_out[i, j]),
                                          min_fraction),
                })
        strength = [r["frac_in"] * min(1.0, max(0.0, r["mean_in"] - r["mean_out"])) for r in records]
        score = float(np.mean(strength)) if records else 0.0
        key = [r for r in records if r["source"] == "cited"] or [r for r in records if r["source"] == "canonical"]
        n_enriched = sum(r["enriched"] for r in key)
        is_call = label.strip() != "" and label.strip().lower() != "unknown"
        if not is_call:
            flag, reason = False, ""
        elif not key:
            flag, reason = True, "none of the call's markers is measured in the data"
        elif n_enriched * 2 < len(key):
            weak = ", ".join(f"{r['gene']} ({r['frac_in']:.0%} vs {r['frac_out']:.0%})" for r in key
                             if not r["enriched"])
            flag, reason = True, f"{len(key) - n_enriched} of {len(key)} key markers not enriched: {weak}"
        else:
            flag, reason = False, ""
        rows.append({
            "cluster": cluster, "label": label, "reference_type": ref_type or "",
            "key_markers": ", ".join(r["gene"] for r in key), "n_enriched": int(n_enriched),
            "n_key_markers": len(key), "evidence_score": round(score, 4), "flag": flag,
            "flag_reason": reason, "markers": json.dumps(records),
        })
    table = pd.DataFrame(rows, columns=["cluster", "label", "reference_type", "key_markers", "n_enriched",
                                        "n_key_markers", "evidence_score", "flag", "flag_reason", "markers"])
    table.index = table["cluster"].to_numpy()
    score_of = dict(zip(table["cluster"], table["evidence_score"], strict=True))
    flag_of = dict(zip(table["cluster"], table["flag"], strict=True))
    adata.obs[f"{key_added}_score"] = labels.map(score_of).astype("float32").to_numpy()
    adata.obs[f"{key_added}_flag"] = np.array([bool(flag_of.get(c, False)) for c in labels], dtype=bool)
    adata.uns.setdefault(_PROVENANCE_KEY, {})[key_added] = {"min_fraction": float(min_fraction),
                                                           "clusters": table}
    return table
