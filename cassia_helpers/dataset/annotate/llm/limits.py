"""The run-wide LLM limits held by the Dask scheduler, so that they hold across machines.

Same interface as :class:`~cassia_helpers.dataset.annotate.llm.throttle.RunThrottle` (``slot()``, ``back_off()``)
and :class:`~cassia_helpers.dataset.annotate.llm.throttle.RunBudget` (``enabled``, ``max_cost``, ``spent()``,
``exhausted()``), plus ``RunBudget.add(cost)`` to count a sent request's cost. A dataset's kernel is
a process of its own, not part of the Dask worker: it reaches the scheduler through the address the
worker puts in its environment (``CASSIA_DASK_SCHEDULER``).
"""

from __future__ import annotations

import hashlib
import logging
import os
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

SCHEDULER_ENV = "CASSIA_DASK_SCHEDULER"
# A request may hold its slot for minutes: its live holder renews the lease every fifth of the timeout (from
# its client's own thread, whatever the request does), and the scheduler frees a lease not renewed within
# it, checking every validation interval: a killed kernel's slots are free again within ~7 s.
LEASE_SETTINGS = {"distributed.scheduler.locks.lease-timeout": "6s",
                  "distributed.scheduler.locks.lease-validation-interval": "1s"}
_clients: dict[str, object] = {}
_clients_lock = threading.Lock()


def run_namespace(run_dir: str | Path) -> str:
    """The names of a run's limits on the scheduler: the same for every process given the same folder."""
    digest = hashlib.sha1(str(Path(run_dir).resolve()).encode("utf-8")).hexdigest()[:16]
    return f"cassia-{digest}"


class DaskRunThrottle:
    """At most ``limit`` requests in flight across every process of the cluster, and a shared back-off.

    A ``distributed.Semaphore`` holds the slots; its leases are renewed in the background while a
    request runs, and freed within seconds of a holder's death (:data:`LEASE_SETTINGS`).
    """

    def __init__(self, limit: int, namespace: str, client) -> None:
        from distributed import Semaphore

        self.limit = max(1, int(limit))
        self.client = client
        self.semaphore = Semaphore(max_leases=self.limit, name=f"{namespace}-llm-slots-{self.limit}",
                                   scheduler_rpc=client.scheduler, loop=client.loop)
        self.semaphore.register()
        self._backoff = _Shared(client, namespace, "backoff-until")
        self._lock = _named_lock(f"{namespace}-llm-lock", client)

    @contextmanager
    def slot(self) -> Iterator[None]:
        """Hold one request slot (waiting for a free one and for any shared back-off)."""
        self._wait_backoff()
        self.semaphore.acquire()
        try:
            yield
        finally:
            self.semaphore.release()

    def back_off(self, seconds: float) -> None:
        """Ask every process of the run to send nothing for ``seconds`` (a 429's ``Retry-After``)."""
        until = time.time() + max(0.0, seconds)
        with self._lock:
            if until > self._backoff.get(0.0):
                self._backoff.set(until)

    def _wait_backoff(self) -> None:
        while True:
            delay = self._backoff.get(0.0) - time.time()
            if delay <= 0:
                return
            time.sleep(min(delay, 1.0))


class DaskRunBudget:
    """The run's spend, kept by the scheduler: every process adds what it spent and reads the total.

    On first use it is seeded with ``seed_spent()`` (what the run's ledgers record, on resume) unless
    another process of the run already did.

    Checking before each request and adding after it, the spend can pass ``max_cost`` by at most the
    requests in flight at that moment (at most the concurrency limit).
    """

    def __init__(self, max_cost: float, namespace: str, client, *, seed_spent: Callable[[], float] | None = None
                 ) -> None:
        self.max_cost = float(max_cost or 0.0)
        self._spent = _Shared(client, namespace, "spent")
        self._lock = _named_lock(f"{namespace}-llm-lock", client)
        if seed_spent is not None and self._spent.get(None) is None:
            with self._lock:
                if self._spent.get(None) is None:
                    self._spent.set(float(seed_spent()))

    @property
    def enabled(self) -> bool:
        return self.max_cost > 0

    def spent(self) -> float:
        return float(self._spent.get(0.0))

    def exhausted(self) -> bool:
        return self.enabled and self.spent() >= self.max_cost

    def add(self, cost: float) -> None:
        """Count ``cost`` (dollars) of a request that was sent."""
        if not cost:
            return
        with self._lock:
            self._spent.set(float(self._spent.get(0.0)) + float(cost))


class _Shared:
    """One number of the run kept by the scheduler (its metadata store); read-modify-write under the Lock.

    Not a ``distributed.Variable``: reading a Variable that was never set waits for it, and a timed-out
    wait is logged as an error by the scheduler.
    """

    def __init__(self, client, namespace: str, name: str) -> None:
        self.client, self.keys = client, [namespace, name]

    def get(self, default):
        return self.client.get_metadata(self.keys, default)

    def set(self, value: float) -> None:
        self.client.set_metadata(self.keys, value)


def _named_lock(name: str, client):
    from distributed import Lock

    return Lock(name, scheduler_rpc=client.scheduler, loop=client.loop)


def ledger_spend(run_dir: str | Path) -> float:
    """What the run's ledgers record as spent (requests sent), for seeding the shared total on resume."""
    from cassia_helpers.dataset.annotate.llm.throttle import RunBudget

    return RunBudget(1.0, run_dir).spent()


def reachable_client(connect_timeout: float = 10.0):
    """A client of the scheduler reachable from this process, or ``None``.

    The current client or worker's (when ``distributed`` is already in use here), else one connected
    to ``CASSIA_DASK_SCHEDULER`` (a kernel started by a dataset task), kept for the process's life.
    """
    if "distributed" in sys.modules:
        from distributed import get_client

        try:
            return get_client()
        except ValueError:
            pass
    address = os.environ.get(SCHEDULER_ENV, "")
    if not address:
        return None
    with _clients_lock:
        if address not in _clients:
            import dask
            from distributed import Client

            logging.getLogger("distributed").setLevel(logging.ERROR)
            with dask.config.set(LEASE_SETTINGS):
                _clients[address] = Client(address, timeout=connect_timeout, set_as_default=False)
        return _clients[address]


def run_limits(run_dir: str | Path | None, concurrency: int, max_cost: float, *,
               local_spent: Callable[[], float] | None = None):
    """``(throttle, budget)`` for a dataset's LLM calls: held by the Dask scheduler when one is reachable.

    When no scheduler is reachable (a notebook run by hand), or ``run_dir`` is empty, the file-based
    :class:`RunThrottle`/:class:`RunBudget` of ``annotate.throttle`` are returned. A scheduler that is
    named but cannot be reached falls back to them too, with a warning.
    """
    from cassia_helpers.dataset.annotate.llm.throttle import RunBudget, RunThrottle

    def files():
        return (RunThrottle(concurrency, run_dir or None),
                RunBudget(max_cost, run_dir or None, local_spent=local_spent))

    if not run_dir:
        return files()
    try:
        client = reachable_client()
    except OSError as exc:
        warnings.warn(f"Dask scheduler unreachable ({exc}): run-wide LLM limits hold on this machine only",
                      RuntimeWarning, stacklevel=2)
        return files()
    if client is None:
        return files()
    import dask

    namespace = run_namespace(run_dir)
    with dask.config.set(LEASE_SETTINGS):
        throttle = DaskRunThrottle(concurrency, namespace, client)
        budget = DaskRunBudget(max_cost, namespace, client, seed_spent=lambda: ledger_spend(run_dir))
    return throttle, budget
