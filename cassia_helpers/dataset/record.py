"""The ``uns['cassia_batch']`` record: the one owner of its keys.

Every helper of the pipeline writes what it did under one key of this record (``input``, ``qc``,
``normalize``, ``pca``, ``neighbors``, ``leiden``, ``umap``, ``markers``, ``marker_filter``,
``annotation``), plus ``warnings`` (a list of one-line messages for the summary) and ``timings``
(seconds per step). :func:`timed` registers each step with its phase, so the summaries split
preprocessing from annotation time without a list kept by hand.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from functools import wraps
from typing import Any

KEY = "cassia_batch"
WARNINGS, TIMINGS = "warnings", "timings"
# step name -> phase ("preprocessing" or "annotation"), filled by @timed
STEPS: dict[str, str] = {}
# Set by the dataset's worker: a JSONL file where each step's start and end are appended as they happen,
# so the driver can show what a running dataset is doing.
PROGRESS_ENV = "CASSIA_PROGRESS_FILE"


def provenance(adata: Any) -> dict:
    """The ``uns['cassia_batch']`` record of ``adata`` (created on first use)."""
    record = adata.uns.setdefault(KEY, {})
    record.setdefault(WARNINGS, [])
    record.setdefault(TIMINGS, {})
    return record


def warn(adata: Any, message: str) -> None:
    """Record a warning for the dataset's summary (``uns['cassia_batch']['warnings']``)."""
    record = provenance(adata)
    record[WARNINGS] = [*record[WARNINGS], message]


def timed(step: str, *, phase: str = "preprocessing") -> Callable:
    """Record the wall time of a helper in ``uns['cassia_batch']['timings'][step]`` (seconds)."""
    STEPS[step] = phase

    def decorate(func: Callable) -> Callable:
        @wraps(func)
        def wrapper(adata, *args, **kwargs):
            report_progress(step, "start")
            start = time.perf_counter()
            result = func(adata, *args, **kwargs)
            seconds = time.perf_counter() - start
            timings = provenance(adata)[TIMINGS]
            timings[step] = round(timings.get(step, 0.0) + seconds, 3)
            report_progress(step, "end", seconds)
            return result

        return wrapper

    return decorate


def report_progress(step: str, event: str, seconds: float = 0.0) -> None:
    """Append ``{"step", "event", "seconds"}`` to the worker's progress file, when one is set."""
    path = os.environ.get(PROGRESS_ENV)
    if not path:
        return
    try:
        with open(path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps({"step": step, "event": event, "seconds": round(seconds, 1)}) + "\n")
    except OSError:
        pass  # progress is a courtesy: never fail a dataset for it


def phase_times(timings: dict) -> dict[str, float]:
    """Seconds per phase (``preprocessing``, ``annotation``) from a record's timings."""
    totals = {"preprocessing": 0.0, "annotation": 0.0}
    for step, seconds in timings.items():
        phase = STEPS.get(step, "preprocessing")
        totals[phase] = round(totals.get(phase, 0.0) + float(seconds), 3)
    return totals


def cluster_key(adata: Any, default: str = "leiden") -> str:
    """The ``obs`` column holding the clusters (``key_added`` of :func:`cassia_helpers.dataset.pp.cluster`)."""
    return provenance(adata).get("leiden", {}).get("key", default)


def label_key(adata: Any, default: str = "cell_type") -> str:
    """The ``obs`` column holding the cell-type calls (``key_added`` of ``annotate_clusters``)."""
    return provenance(adata).get("annotation", {}).get("key_added", default)
