"""Datasets on Dask distributed: a local cluster, an existing scheduler or SLURM jobs.

Importing this package does not import Dask; its functions do, when called.
"""

from __future__ import annotations

from cassia_helpers.batch.dask.client import (
    ClusterError,
    check_shared_storage,
    dashboard_link,
    open_client,
)
from cassia_helpers.batch.dask.process import die_with_parent
from cassia_helpers.batch.dask.tasks import DatasetExecutor, Progress
from cassia_helpers.dataset.annotate.llm.limits import (
    SCHEDULER_ENV,
    DaskRunBudget,
    DaskRunThrottle,
    run_limits,
)

__all__ = [
    "SCHEDULER_ENV", "ClusterError", "DaskRunBudget", "DaskRunThrottle", "DatasetExecutor",
    "Progress", "check_shared_storage", "dashboard_link", "die_with_parent",
    "open_client", "run_limits",
]
