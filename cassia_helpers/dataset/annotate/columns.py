"""Write the pipeline's per-cluster results (score, consensus, merged levels) into ``adata``."""

from __future__ import annotations

import json

import anndata as ad
import numpy as np
import pandas as pd

from cassia_helpers.dataset.annotate import ClusterAnnotation
from cassia_helpers.dataset.record import provenance


def pipeline_table(results: list[ClusterAnnotation]) -> pd.DataFrame:
    """One row per cluster: score, boost, consensus and merged levels (empty where a step did not run)."""
    rows = []
    for r in results:
        levels = (list(r.merged_groupings) + ["", "", ""])[:3]
        rows.append({
            "cluster": str(r.cluster), "main_cell_type": r.main_cell_type,
            "score": np.nan if r.score is None else float(r.score), "score_reasoning": r.score_reasoning,
            "boosted": bool(r.boosted), "kept_answer": r.kept_answer,
            "boost_score": np.nan if r.boost_score is None else float(r.boost_score),
            "consensus": r.consensus, "agreement": np.nan if r.agreement is None else float(r.agreement),
            "runners_up": "; ".join(r.runners_up), "disputed": bool(r.disputed),
            "broad": levels[0], "detailed": levels[1], "fine": levels[2], "notes": " | ".join(r.notes),
        })
    table = pd.DataFrame(rows)
    if len(table):
        table.index = table["cluster"].to_numpy()
    return table


def write_pipeline_columns(adata: ad.AnnData, results: list[ClusterAnnotation], *, groupby: str = "leiden",
                           key_added: str = "cell_type", settings: dict | None = None) -> pd.DataFrame:
    """Label every cell with its cluster's pipeline results.

    Writes ``obs[f"{key_added}_score"]`` (float32, NaN when not scored), ``obs[f"{key_added}_consensus"]``
    and ``obs[f"{key_added}_agreement"]`` (only when a consensus was computed),
    ``obs[f"{key_added}_broad"]``, ``obs[f"{key_added}_detailed"]``, ``obs[f"{key_added}_fine"]`` (only
    when merged), ``obs[f"{key_added}_disputed"]`` (bool, with a consensus) and
    ``uns['cassia_batch']['pipeline']`` with the per-cluster table (``clusters``: score and its reasoning,
    boosted, kept_answer, boost_score, consensus, agreement, runners_up, disputed, broad/detailed/fine,
    notes), ``settings`` and ``key_added``. Returns the table.
    """
    table = pipeline_table(results)
    labels = adata.obs[groupby].astype(str)

    def column(name):
        return labels.map(table[name].to_dict()) if len(table) else pd.Series(np.nan, index=adata.obs_names)

    adata.obs[f"{key_added}_score"] = column("score").astype("float32")
    if any(r.consensus for r in results):
        adata.obs[f"{key_added}_consensus"] = pd.Categorical(column("consensus").fillna(""))
        adata.obs[f"{key_added}_agreement"] = column("agreement").astype("float32")
        adata.obs[f"{key_added}_disputed"] = column("disputed").fillna(False).astype(bool)
    if any(r.merged_groupings for r in results):
        for level in ("broad", "detailed", "fine"):
            adata.obs[f"{key_added}_{level}"] = pd.Categorical(column(level).fillna(""))
    provenance(adata)["pipeline"] = {
        "key_added": key_added,
        "clusters": table,
        "settings": {k: (",".join(v) if isinstance(v, list | tuple) else v) for k, v in (settings or {}).items()},
        "notes_json": json.dumps({r.cluster: r.notes for r in results if r.notes}, ensure_ascii=False),
    }
    return table


def pipeline_text_lines(r: ClusterAnnotation) -> list[str]:
    """The pipeline's lines for one cluster in ``{dataset}_annotation.txt`` (empty for a fast run)."""
    lines = []
    if r.score is not None:
        lines.append(f"  quality score:    {r.score:.0f}/100 ({r.score_reasoning or '-'})")
    if r.boosted:
        boost = "-" if r.boost_score is None else f"{r.boost_score:.0f}"
        kept = r.kept_answer or "initial"
        lines.append(f"  boost:            ran; boosted answer scored {boost}; kept the {kept} answer")
    if r.consensus:
        flag = "  DISPUTED" if r.disputed else ""
        lines.append(f"  consensus:        {r.consensus} (agreement {r.agreement:.0%}; runners-up: "
                     f"{', '.join(r.runners_up) or '-'}){flag}")
    if r.merged_groupings:
        lines.append(f"  merged:           {' > '.join(r.merged_groupings)}")
    lines += [f"  note:             {note}" for note in r.notes]
    return lines


__all__ = ["pipeline_table", "pipeline_text_lines", "write_pipeline_columns"]
