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

__all__ = ["FLAG_KINDS", "ClusterProfile", "cluster_profile", "flag_counts", "marker_evidence", "MIN_FRACTION"]

#: a key marker detected in fewer of the cluster's cells than this is not enriched
MIN_FRACTION = 0.2
#: ... nor is one whose detection rate is not at least this much higher than in the other cells
MIN_DELTA = 0.05
#: ... or whose mean (log scale) is not at least this much higher
MIN_MEAN_DELTA = 0.25
#: a called type is contradicted when fewer than this share of its measured canonical markers are enriched
MIN_CANONICAL_SHARE = 1 / 3
#: ... or when an unrelated reference type of the tissue scores at least this many times higher in the
#: cluster, and at least RIVAL_MARGIN higher (scores: mean marker strength, 0-1)
RIVAL_RATIO, RIVAL_MARGIN = 2.0, 0.15
#: the kinds of flag, in the order they are reported
FLAG_KINDS = ("contradicted", "implausible_for_tissue", "markers_not_enriched")


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


def matrix_of(adata: Any, *, use_raw: bool = False, layer: str | None = None) -> tuple[Any, list[str]]:
    """The expression matrix read (``raw.X`` with ``use_raw``, else ``layers[layer]`` or ``X``) and its gene names."""
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

    x, names = matrix_of(adata, use_raw=use_raw, layer=layer)
    index = {g: i for i, g in enumerate(names)}
    wanted = list(dict.fromkeys(g for g in (names if genes is None else genes) if g in index))
    cols = np.array([index[g] for g in wanted], dtype=int)
    sub = x[:, cols] if len(cols) else np.zeros((adata.n_obs, 0), dtype=np.float32)
    sub = sp.csr_matrix(sub) if not sp.issparse(sub) else sub.tocsr()
    labels = adata.obs[groupby].astype(str).to_numpy()
    clusters = [str(c) for c in pd.unique(labels)]
    codes = pd.Categorical(labels, categories=clusters).codes
    n = np.bincount(codes, minlength=len(clusters)).astype(np.float64)
    total_n = n.sum()
    # every stored value's (cluster, gene) cell of the sums, in one pass over the stored values
    slot = np.repeat(codes.astype(np.int64), np.diff(sub.indptr)) * len(wanted) + sub.indices
    size = len(clusters) * len(wanted)
    det_sum = np.bincount(slot, weights=sub.data > 0, minlength=size).reshape(len(clusters), len(wanted))
    val_sum = np.bincount(slot, weights=sub.data, minlength=size).reshape(len(clusters), len(wanted))
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
    """Reference type a label reaches (its name, or its CL term or the term's nearest ancestor) and its markers."""
    from cassia_helpers.dataset.annotate.reference.retrieval import reference_type

    ct = reference_type(label)
    return (ct.name, list(ct.symbols(species))) if ct is not None else (None, [])


def _strength(prof: ClusterProfile, i: int, genes: list[str]) -> tuple[float, int, int]:
    """(mean strength, markers measured, markers enriched) of ``genes`` in cluster row ``i``."""
    values, enriched = [], 0
    for gene in genes:
        j = prof.column(gene)
        if j is None:
            continue
        f_in, m_in, m_out = float(prof.frac_in[i, j]), float(prof.mean_in[i, j]), float(prof.mean_out[i, j])
        values.append(f_in * min(1.0, max(0.0, m_in - m_out)))
        enriched += _enriched(f_in, float(prof.frac_out[i, j]), m_in, m_out, MIN_FRACTION)
    return (float(np.mean(values)) if values else 0.0), len(values), enriched


def _reference_checks(label: str, tissue: str, species: str, prof: ClusterProfile, i: int) -> list[tuple[str, str]]:
    """``(kind, reason)`` of the reference checks of one call: ``contradicted`` (the called type's canonical
    markers are not enriched, or an unrelated type of the tissue clearly scores higher) and
    ``implausible_for_tissue``."""
    from cassia_helpers.dataset.annotate.reference.calls import BLOOD_LINEAGES, BLOOD_SHARE, CD45
    from cassia_helpers.dataset.annotate.reference.catalog import load_reference
    from cassia_helpers.dataset.annotate.reference.expression import ABSENT_WEIGHT
    from cassia_helpers.dataset.annotate.reference.retrieval import expected_in_tissue, reference_type, related_types

    called = reference_type(label)
    if called is None:
        return []
    flags = []
    own, measured, enriched = _strength(prof, i, list(called.symbols(species)))
    if measured >= 3 and enriched < MIN_CANONICAL_SHARE * measured:
        flags.append(("contradicted", f"{measured - enriched} of {measured} canonical markers of {called.name} "
                                      "not enriched"))
    related = related_types(called)
    best, best_score = None, 0.0
    reference = load_reference()
    cd45 = prof.column(CD45[species])
    blood = cd45 is not None and prof.frac_in[i, cd45] >= BLOOD_SHARE  # as the reference calls: no rival of CD45+ cells
    for ct in reference.candidates(tissue):
        if ct.name in related or (blood and ct.lineage not in BLOOD_LINEAGES):
            continue
        score, n, _ = _strength(prof, i, list(ct.symbols(species)))
        # the rival's defining absences count against it, as in the reference's own calls: B cells carry the
        # MHC class II genes most dendritic-cell markers are, and also MS4A1 and CD79A, which DCs lack
        lacking = [g for t in (ct, *map(reference.by_name, reference.ancestors(ct.name)))
                   for g in t.absent_symbols(species)]  # a subtype lacks what its parent lacks
        absent, n_absent, _ = _strength(prof, i, list(dict.fromkeys(lacking)))
        score = max(0.0, score - ABSENT_WEIGHT * absent) if n_absent else score
        if n >= 3 and score > best_score:
            best, best_score = ct, score
    if best is not None and best_score >= RIVAL_RATIO * own and best_score - own >= RIVAL_MARGIN:
        mine = f"{own:.2f} for {called.name}'s" if measured else f"none of {called.name}'s measured"
        flags.append(("contradicted", f"{best.name} fits better: its reference markers score {best_score:.2f} "
                                      f"(0-1) against {mine}"))
    if expected_in_tissue(called, tissue) is False:
        flags.append(("implausible_for_tissue", f"{called.name} is not expected in {tissue} "
                                                f"(reference tissues: {', '.join(called.tissues or ())})"))
    return flags


def flag_counts(table: Any) -> dict[str, int]:
    """Clusters per flag kind (:data:`FLAG_KINDS`) in a :func:`marker_evidence` table."""
    kinds = table["flag_kind"].astype(str) if "flag_kind" in getattr(table, "columns", ()) else []
    return {kind: int(sum(kind in str(k).split(", ") for k in kinds)) for kind in FLAG_KINDS}


def marker_evidence(
    adata: Any,
    calls: list[Any] | dict[str, dict] | None = None,
    *,
    groupby: str | None = None,
    label_key: str | None = None,
    species: str = "human",
    tissue: str | None = None,
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
    tissue
        The sample's tissue, for the reference checks (default: the tissue the annotation recorded).
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
        ``evidence_score`` (0-1), ``flag`` (bool), ``flag_kind`` (the kinds of :data:`FLAG_KINDS` that
        fired, comma-separated, empty if none), ``flag_reason`` and ``markers`` (JSON list of
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
    are not flagged (there is nothing to check). These flags are of kind ``markers_not_enriched``.

    The call is also checked against the reference (when its label reaches a reference type, through its
    name or Cell Ontology term and ancestors): ``contradicted`` when fewer than a third of the called type's
    canonical markers measured (at least 3) are enriched, or when a reference type of the tissue that is
    neither the called type nor on its path scores at least twice as high and 0.15 higher (score: the mean
    strength above over the type's markers, at least 3 measured); ``implausible_for_tissue`` when the
    reference does not expect the type in the tissue (unknown tissues are not judged).

    Writes ``obs[f"{key_added}_score"]`` (float; NaN for clusters without a call),
    ``obs[f"{key_added}_flag"]`` (bool), ``obs[f"{key_added}_flag_kind"]`` (category) and
    ``uns['cassia_batch'][key_added]`` with ``min_fraction`` and the per-cluster table (``clusters``).
    """
    import pandas as pd

    from cassia_helpers.dataset.annotate.reference.calls import CD45
    from cassia_helpers.dataset.annotate.reference.catalog import load_reference
    from cassia_helpers.dataset.record import KEY, cluster_key
    from cassia_helpers.dataset.record import label_key as annotation_key

    groupby, label_key = groupby or cluster_key(adata), label_key or annotation_key(adata)
    labels = adata.obs[groupby].astype(str)
    per_cluster: dict[str, tuple[str, list[str]]] = {}
    if calls is None:
        table = adata.uns.get(KEY, {}).get("annotation", {}).get("clusters")
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
    tissue = tissue if tissue is not None else str(adata.uns.get(KEY, {}).get("annotation", {}).get("tissue", ""))
    ref_species = species if species in ("human", "mouse") else "human"
    genes += [g for ct in load_reference().candidates(tissue) for g in ct.symbols(ref_species)] + [CD45[ref_species]]
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
        flags = []
        if not is_call:
            pass
        elif not key:
            flags.append(("markers_not_enriched", "none of the call's markers is measured in the data"))
        elif n_enriched * 2 < len(key):
            weak = ", ".join(f"{r['gene']} ({r['frac_in']:.0%} vs {r['frac_out']:.0%})" for r in key
                             if not r["enriched"])
            flags.append(("markers_not_enriched",
                          f"{len(key) - n_enriched} of {len(key)} key markers not enriched: {weak}"))
        if is_call and cluster in row_of:
            flags = _reference_checks(label, tissue, ref_species, prof, row_of[cluster]) + flags
        flag = bool(flags)
        kind = ", ".join(k for k in FLAG_KINDS if any(f[0] == k for f in flags))
        reason = "; ".join(f"{k}: {r}" for k, r in flags)
        rows.append({
            "cluster": cluster, "label": label, "reference_type": ref_type or "",
            "key_markers": ", ".join(r["gene"] for r in key), "n_enriched": int(n_enriched),
            "n_key_markers": len(key), "evidence_score": round(score, 4), "flag": flag, "flag_kind": kind,
            "flag_reason": reason, "markers": json.dumps(records),
        })
    table = pd.DataFrame(rows, columns=["cluster", "label", "reference_type", "key_markers", "n_enriched",
                                        "n_key_markers", "evidence_score", "flag", "flag_kind", "flag_reason",
                                        "markers"])
    table.index = table["cluster"].to_numpy()
    score_of = dict(zip(table["cluster"], table["evidence_score"], strict=True))
    flag_of = dict(zip(table["cluster"], table["flag"], strict=True))
    adata.obs[f"{key_added}_score"] = labels.map(score_of).astype("float32").to_numpy()
    adata.obs[f"{key_added}_flag"] = np.array([bool(flag_of.get(c, False)) for c in labels], dtype=bool)
    kind_of = dict(zip(table["cluster"], table["flag_kind"], strict=True))
    adata.obs[f"{key_added}_flag_kind"] = pd.Categorical(labels.map(kind_of).fillna("").to_numpy())
    adata.uns.setdefault(KEY, {})[key_added] = {"min_fraction": float(min_fraction), "tissue": tissue,
                                                "flags": flag_counts(table), "clusters": table}
    return table


def summary_lines(record: dict) -> list[str]:
    """The dataset summary's lines on the genes sent and the marker evidence flags (from ``uns['cassia_batch']``)."""
    import pandas as pd

    lines = []
    sent = record.get("marker_filter", {})
    if sent:
        lines.append(f"  markers sent: up to {sent.get('n_top')} per cluster, ranked by {sent.get('ranking')}; "
                     f"left out: {sent.get('excluded', 'none')}"
                     + (f" ({sent['n_left_out']} genes left out that the ranking put in a cluster's top "
                        f"{sent.get('n_top')}, all clusters counted)" if sent.get("n_left_out") else ""))
    table = record.get("marker_evidence", {}).get("clusters")
    if isinstance(table, pd.DataFrame) and len(table):
        counts = flag_counts(table)
        lines.append(f"  marker evidence: {int(table['flag'].astype(bool).sum())} of {len(table)} clusters flagged ("
                     + ", ".join(f"{kind} {n}" for kind, n in counts.items()) + ")")
        lines += [f"    FLAG {row.cluster:>4}  {row.label}: {row.flag_reason}" for row in table.itertuples()
                  if bool(row.flag)]
    return lines
