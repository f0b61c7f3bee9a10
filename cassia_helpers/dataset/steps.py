"""The pipeline's timed steps: each helper's wall time in the dataset's record, and its start and end on the
progress channel the driver reads while the dataset runs.

Which phase a step belongs to is declared here once (:data:`ANNOTATION_STEPS`), not collected as decorators
run, so the summaries' preprocessing/annotation split does not depend on which modules a kernel imported.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from functools import wraps

from cassia_helpers.contract import PROGRESS_ENV
from cassia_helpers.dataset.record import TIMINGS, provenance

# the steps whose time the summaries count as annotation; every other timed step is preprocessing
ANNOTATION_STEPS = frozenset({"annotation"})


def timed(step: str) -> Callable:
    """Record the wall time of a helper in ``uns['cassia_batch']['timings'][step]`` (seconds), and report its
    start and end on the progress channel."""

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
    """Append ``{"step", "event", "seconds"}`` to the dataset's progress file, when the runner set one."""
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
        phase = "annotation" if step in ANNOTATION_STEPS else "preprocessing"
        totals[phase] = round(totals[phase] + float(seconds), 3)
    return totals
