"""Stopping a batch from the terminal: Ctrl-C, SIGTERM and SIGHUP.

The first signal asks the driver to start no more datasets and to stop the running ones, then to write
the summaries of what finished; a second Ctrl-C stops at once.
"""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Callable

log = logging.getLogger("cassia_helpers")


class Interrupts:
    """First Ctrl-C / SIGTERM / SIGHUP: stop starting datasets and stop the running ones; second Ctrl-C:
    stop at once."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)

    def __init__(self) -> None:
        self.event = threading.Event()
        self.count = 0
        self.on_stop: Callable[[], None] | None = None  # e.g. the Dask executor's stop()
        self._previous: dict[int, object] = {}

    def __enter__(self) -> Interrupts:
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum, frame) -> None:
        self.count += 1
        self.event.set()
        if self.on_stop is not None:
            self.on_stop()
        if self.count == 1:
            log.warning("Interrupted (%s): stopping the running datasets and writing the summaries "
                        "(press Ctrl-C again to stop at once).", signal.Signals(signum).name)
        elif signum == signal.SIGINT:
            raise KeyboardInterrupt
