"""The run's agreement with the input's own labels, per dataset: the columns ``batch_summary.csv`` adds, the
lines of ``batch_summary.txt`` and the report's accuracy table (read from each ``{dataset}_result.json``'s
``self_score``, written by :func:`cassia_helpers.dataset.self_score.score_against_authors`)."""

from __future__ import annotations

import math

import pandas as pd

#: ``batch_summary.csv`` columns after the contract's: the author label column scored against, the shares of
#: the scored cells whose call is exact, partially correct, in the same lineage or wrong, and the labels
#: not mapped to the Cell Ontology (``;``-separated). Empty for a dataset without author labels; left out
#: when no dataset of the run has any.
SELF_SCORE_COLUMNS = ["self_score_key", "self_exact", "self_partial", "self_lineage", "self_wrong", "scored_cells",
                      "unscored_cells", "unmapped_author_labels"]


def self_score_fields(result: dict) -> dict:
    """The :data:`SELF_SCORE_COLUMNS` of one dataset's result record (``None`` when it has no author labels)."""
    score = result.get("self_score") or {}
    fields = {name: score.get(name) for name in SELF_SCORE_COLUMNS}
    if score:
        fields["unmapped_author_labels"] = "; ".join(map(str, score.get("unmapped_author_labels") or []))
    return fields


def summary_self_score_columns(table: pd.DataFrame) -> list[str]:
    """:data:`SELF_SCORE_COLUMNS` when a dataset of the run was scored, else none (a run without author labels
    keeps the contract's columns exactly)."""
    scored = "self_score_key" in table and table["self_score_key"].fillna("").astype(str).ne("").any()
    return SELF_SCORE_COLUMNS if scored else []


def _pct(value) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{100 * float(value):.1f}%"


def _present(value, missing):
    """``value``, or ``missing`` for an empty cell of the summary table (NaN when read back from CSV)."""
    return missing if value is None or value == "" or (isinstance(value, float) and math.isnan(value)) else value


def accuracy_rows(table: pd.DataFrame) -> list[dict]:
    """One row per dataset scored against its author labels, for the text summary and the report."""
    if "self_score_key" not in table:
        return []
    rows = []
    for row in table[table["self_score_key"].notna() & (table["self_score_key"] != "")].to_dict("records"):
        rows.append({"dataset": f"{row['tissue']}/{row['dataset']}", "key": row["self_score_key"],
                     **{s: _pct(row.get(f"self_{s}")) for s in ("exact", "partial", "lineage", "wrong")},
                     "scored_cells": int(_present(row.get("scored_cells"), 0)),
                     "unscored_cells": int(_present(row.get("unscored_cells"), 0)),
                     "unmapped": str(_present(row.get("unmapped_author_labels"), ""))})
    return rows


def self_score_lines(table: pd.DataFrame) -> list[str]:
    """``batch_summary.txt``'s section on the agreement with the author labels (none without them)."""
    rows = accuracy_rows(table)
    if not rows:
        return []
    lines = ["", "Agreement with the input's own labels (Cell Ontology; shares of the scored cells)"]
    for row in rows:
        lines.append(f"  {row['dataset']} vs {row['key']}: exact {row['exact']}, partial {row['partial']}, "
                     f"lineage {row['lineage']}, wrong {row['wrong']} ({row['scored_cells']} cells scored, "
                     f"{row['unscored_cells']} not scored: no author label, or one not in the Cell Ontology)")
        if row["unmapped"]:
            lines.append(f"    author labels not mapped to the Cell Ontology: {row['unmapped']}")
    return lines


#: the confusion view's size: the author labels and calls with most cells; the rest are folded into "other"
CONFUSION_ROWS, CONFUSION_COLUMNS = 15, 10
OTHER_LABELS, OTHER_CALLS = "other labels", "other calls"
#: a confusion cell's colour by its score (the share of the row's cells sets how strongly it is shown)
SCORE_RGB = {"exact": (27, 140, 58), "partial": (120, 180, 60), "lineage": (230, 160, 30), "wrong": (214, 39, 40),
             "unscored": (150, 150, 150)}


def confusion_view(score: dict | None) -> dict | None:
    """The report's confusion view of one dataset: author labels (rows) against the run's calls (columns), each
    cell the share of the row's cells, coloured by its score (:data:`SCORE_RGB`); ``None`` without author labels.

    Reads ``self_score.confusion`` of ``{dataset}_result.json`` (``[author_label, call, n_cells, self_score]``
    rows). Only the :data:`CONFUSION_ROWS` labels and :data:`CONFUSION_COLUMNS` calls with most cells get their
    own row or column, so the view keeps to the page's width; the others are summed as ``other``.
    """
    records = (score or {}).get("confusion") or []
    try:
        table = pd.DataFrame([r[:4] for r in records], columns=["label", "call", "n", "score"])
        table["n"] = pd.to_numeric(table["n"], errors="coerce").fillna(0).astype(int)
    except (TypeError, ValueError):
        return None
    table = table[table["n"] > 0].astype({"label": str, "call": str, "score": str})
    if table.empty:
        return None
    labels = table.groupby("label")["n"].sum().sort_values(ascending=False, kind="stable")
    calls = table.groupby("call")["n"].sum().sort_values(ascending=False, kind="stable")
    shown_labels, shown_calls = list(labels.index[:CONFUSION_ROWS]), list(calls.index[:CONFUSION_COLUMNS])
    table["row"] = table["label"].where(table["label"].isin(shown_labels), OTHER_LABELS)
    table["column"] = table["call"].where(table["call"].isin(shown_calls), OTHER_CALLS)
    columns = shown_calls + ([OTHER_CALLS] if len(calls) > len(shown_calls) else [])
    rows = []
    for row in shown_labels + ([OTHER_LABELS] if len(labels) > len(shown_labels) else []):
        part = table[table["row"] == row]
        total = int(part["n"].sum())
        cells = []
        for column in columns:
            here = part[part["column"] == column]
            n = int(here["n"].sum())
            if not n:
                cells.append(None)
                continue
            kind = here.groupby("score")["n"].sum().idxmax()  # a folded cell shows its most common score
            share = n / total
            red, green, blue = SCORE_RGB.get(kind, SCORE_RGB["unscored"])
            cells.append({"n": n, "pct": 100.0 * share, "score": kind,
                          "color": f"rgba({red}, {green}, {blue}, {0.15 + 0.75 * share:.2f})",
                          "dark": share >= 0.55})
        rows.append({"label": row, "n": total, "cells": cells})
    return {"columns": columns, "rows": rows, "n_labels": int(len(labels)), "n_calls": int(len(calls))}
