"""Waiting on a condition with a deadline: the tests synchronise with processes this way, never by sleeping
for a guessed time."""

from __future__ import annotations

import time


def wait_for(condition, timeout: float = 30.0, what: str = "condition", interval: float = 0.05):
    """The first truthy value of ``condition()``; AssertionError when none came within ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(interval)
