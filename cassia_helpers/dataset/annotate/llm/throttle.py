"""Run-wide limits shared by every dataset worker: concurrent requests, 429 back-off, the budget and a
circuit breaker.

Workers are separate processes, so the state lives in small files of the run folder: ``flock``-ed
slot files (at most N requests in flight for the whole run), a back-off deadline that a 429 with
``Retry-After`` sets for everybody, the ledgers themselves for the money spent, and the breaker's
count of consecutive connection failures.
"""

from __future__ import annotations

import fcntl
import json
import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from cassia_helpers.contract import BREAKER_FILE
from cassia_helpers.ledger import SENT, read_ledger

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
                handle = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
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


class CircuitBreaker:
    """Stop sending to a server that keeps failing to connect or to answer in time.

    After ``threshold`` consecutive connection failures or timeouts (counted across every worker
    sharing ``state_dir``) the breaker opens: :meth:`check` returns the reason and callers fail fast
    for ``cooldown_s`` seconds. Then one request is let through as a probe: a success closes the
    breaker, a failure opens it for another cool-down. ``threshold`` 0 disables the breaker.
    """

    def __init__(self, threshold: int = 3, cooldown_s: float = 60.0, state_dir: str | Path | None = None) -> None:
        self.threshold = max(0, int(threshold))
        self.cooldown_s = max(0.0, float(cooldown_s))
        self.state_dir = Path(state_dir) if state_dir else None
        self._lock = threading.Lock()
        self._state = {"failures": 0, "open_until": 0.0, "reason": "", "announced": False}

    @contextmanager
    def _shared(self) -> Iterator[dict]:
        """The state, read and written under a process-wide and a file lock."""
        with self._lock:
            if self.state_dir is None:
                yield self._state
                return
            path = self.state_dir / BREAKER_FILE
            handle = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
            try:
                fcntl.flock(handle, fcntl.LOCK_EX)
                with os.fdopen(os.dup(handle), "r+", encoding="utf-8") as stream:
                    try:
                        state = dict(self._state, **json.loads(stream.read() or "{}"))
                    except ValueError:
                        state = dict(self._state)
                    before = dict(state)
                    yield state
                    if state != before:
                        stream.seek(0)
                        stream.truncate()
                        stream.write(json.dumps(state))
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)
                os.close(handle)

    def check(self) -> str | None:
        """``None`` when a request may be sent, else why not (the breaker is open)."""
        if not self.threshold:
            return None
        with self._shared() as state:
            if state["failures"] < self.threshold:
                return None
            now = time.time()
            if now >= state["open_until"]:
                state["open_until"] = now + self.cooldown_s  # this caller is the probe; others wait
                return None
            wait = state["open_until"] - now
            return f"{state['reason']} (circuit breaker open, {wait:.0f} s of cool-down left)"

    def failure(self, reason: str) -> bool:
        """Count one connection failure/timeout; ``True`` when this opens the breaker for a new outage
        (the caller announces it once)."""
        if not self.threshold:
            return False
        with self._shared() as state:
            state["failures"] += 1
            if state["failures"] < self.threshold:
                return False
            state["open_until"] = time.time() + self.cooldown_s
            state["reason"] = (f"the model server failed {state['failures']} times in a row "
                               f"(last: {reason}); requests stopped")
            first = not state["announced"]
            state["announced"] = True
            return first

    def success(self) -> None:
        """The server answered: the count restarts and the breaker closes."""
        if not self.threshold:
            return
        with self._shared() as state:
            if state["failures"] or state["announced"]:
                state.update(failures=0, open_until=0.0, reason="", announced=False)


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
        """Dollars spent, including the estimated cost of requests still in flight."""
        if self.run_dir is None:
            return float(self._local_spent()) if self._local_spent else 0.0
        total = 0.0
        for ledger in self.run_dir.glob("*/*/*_llm_calls.jsonl"):
            total += sum(float(r.get("cost") or 0.0) for r in read_ledger(ledger) if r.get("status") in SENT)
        return total

    def add(self, cost: float) -> None:
        """Nothing to do: this budget reads the spend from the run's ledgers."""

    def exhausted(self) -> bool:
        return self.enabled and self.spent() >= self.max_cost
