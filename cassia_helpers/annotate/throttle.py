"""Run-wide limits shared by every dataset worker: concurrent requests, 429 back-off and the budget.

Workers are separate processes, so the state lives in small files of the run folder: ``flock``-ed
slot files (at most N requests in flight for the whole run), a back-off deadline that a 429 with
``Retry-After`` sets for everybody, and the ledgers themselves for the money spent.
"""

from __future__ import annotations

import fcntl
import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from ..ledger import SENT, read_ledger

SLOT_PATTERN = ".llm_slot_{}.lock"
BACKOFF_FILE = ".llm_backoff"


class RunThrottle:
    """At most ``limit`` requests in flight across all processes sharing ``state_dir``.

    Without a ``state_dir`` (a notebook run by hand) the limit holds within this process only.
    """

    def __init__(self, limit: int, state_dir: str | Path | None = None, *, poll_s: float = 0.05) -> None:
        self.limit = max(1, int(limit))
        self.state_dir = Path(state_dir) if state_dir else None
        self.poll_s = poll_s
        self._local = threading.BoundedSemaphore(self.limit)
        self._backoff_until = 0.0
        self._lock = threading.Lock()

    @contextmanager
    def slot(self) -> Iterator[None]:
        """Hold one request slot (waiting for a free one and for any shared back-off)."""
        self._wait_backoff()
        with self._local:
            if self.state_dir is None:
                yield
                return
            handle = self._acquire_file_slot()
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)
                os.close(handle)

    def _acquire_file_slot(self) -> int:
        while True:
            for index in range(self.limit):
                path = self.state_dir / SLOT_PATTERN.format(index)
                handle = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
                try:
                    fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    return handle
                except BlockingIOError:
                    os.close(handle)
            time.sleep(self.poll_s)

    def back_off(self, seconds: float) -> None:
        """Ask every worker to send nothing for ``seconds`` (a 429's ``Retry-After``)."""
        until = time.time() + max(0.0, seconds)
        with self._lock:
            self._backoff_until = max(self._backoff_until, until)
        if self.state_dir is not None:
            target = self.state_dir / BACKOFF_FILE
            current = self._read_backoff()
            if until > current:
                tmp = self.state_dir / f"{BACKOFF_FILE}.{os.getpid()}.{threading.get_ident()}"
                tmp.write_text(f"{until:.3f}")
                os.replace(tmp, target)

    def _read_backoff(self) -> float:
        if self.state_dir is None:
            return 0.0
        try:
            return float((self.state_dir / BACKOFF_FILE).read_text())
        except (OSError, ValueError):
            return 0.0

    def _wait_backoff(self) -> None:
        while True:
            with self._lock:
                until = max(self._backoff_until, self._read_backoff())
            delay = until - time.time()
            if delay <= 0:
                return
            time.sleep(min(delay, 1.0))


class RunBudget:
    """The run's spend so far, read from every ledger of the run folder (or this process's ledger)."""

    def __init__(self, max_cost: float, run_dir: str | Path | None, local_spent=None) -> None:
        self.max_cost = float(max_cost or 0.0)
        self.run_dir = Path(run_dir) if run_dir else None
        self._local_spent = local_spent

    @property
    def enabled(self) -> bool:
        return self.max_cost > 0

    def spent(self) -> float:
        if self.run_dir is None:
            return float(self._local_spent()) if self._local_spent else 0.0
        total = 0.0
        for ledger in self.run_dir.glob("*/*/*_llm_calls.jsonl"):
            total += sum(float(r.get("cost") or 0.0) for r in read_ledger(ledger) if r.get("status") in SENT)
        return total

    def exhausted(self) -> bool:
        return self.enabled and self.spent() >= self.max_cost
