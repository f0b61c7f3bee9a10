"""Dataset worker processes, and those started ahead of their datasets.

A worker (``python -m cassia_helpers.batch.runner``) starts its dataset's kernel and imports papermill as
soon as it starts, then waits for its job on a socket: the job and the dataset's runner lock come from the
launcher (:func:`Worker.hand`), never through the command line. So a worker can be started before its
dataset is known: :class:`Spares` keeps such workers ready for the next datasets of this process's Dask
workers. A worker runs one dataset and ends; one that is no longer wanted is stopped with its kernel.
"""

from __future__ import annotations

import json
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
from dataclasses import dataclass, field

from cassia_helpers.batch.dask.process import die_with_parent

#: how long a stopping worker is waited for before it is killed
STOP_GRACE_S = 10.0
RUNNER_MODULE = "cassia_helpers.batch.runner"


def stop_group(process: subprocess.Popen, grace: float = STOP_GRACE_S) -> None:
    """SIGTERM the worker's process group (the worker stops its kernel), then SIGKILL what is left."""
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, None)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        try:
            process.wait(timeout=wait)
            # the kernel may outlive the worker by a moment: make sure the group is gone
            os.killpg(process.pid, signal.SIGKILL)
            return
        except subprocess.TimeoutExpired:
            continue
        except ProcessLookupError:
            return


@dataclass(frozen=True)
class WorkerSpec:
    """What a worker is started with: a worker started ahead serves a dataset whose spec is equal."""

    env: tuple[tuple[str, str], ...]
    kernel_name: str
    kernel_cwd: str  # where the kernel starts, until its dataset comes (the run folder)
    cwd: str = field(default_factory=os.getcwd)  # the worker's, as the launcher's (it imports the same package)
    python: str = field(default=sys.executable)

    @classmethod
    def of(cls, env: dict[str, str], kernel_name: str, kernel_cwd: str) -> WorkerSpec:
        return cls(tuple(sorted(env.items())), kernel_name, kernel_cwd)


@dataclass(eq=False)
class Worker:
    """A started worker process and the launcher's end of its socket."""

    spec: WorkerSpec
    process: subprocess.Popen
    channel: socket.socket

    @classmethod
    def start(cls, spec: WorkerSpec, *, ahead: bool = False) -> Worker:
        """Start a worker in its own process group (``ahead`` of its dataset: its kernel warms up while it
        waits); it dies with the thread that starts it (Linux)."""
        ours, theirs = socket.socketpair()
        try:
            process = subprocess.Popen(
                [spec.python, "-m", RUNNER_MODULE, spec.kernel_name, spec.kernel_cwd, "ahead" if ahead else "now"],
                env=dict(spec.env), cwd=spec.cwd,
                stdin=theirs, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                start_new_session=True, preexec_fn=die_with_parent,
            )
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        return cls(spec, process, ours)

    def hand(self, job: dict, environ: dict[str, str | None], lock_fd: int) -> bool:
        """Give the worker its job, the variables its kernel gets (``None``: unset) and the dataset's lock (the
        worker holds it until it ends); ``False`` if the worker is gone."""
        data = json.dumps({"job": job, "environ": environ}).encode()
        try:
            sent = socket.send_fds(self.channel, [data], [lock_fd])
            self.channel.sendall(data[sent:])
            self.channel.shutdown(socket.SHUT_WR)
            return True
        except OSError:
            return False
        finally:
            self.channel.close()

    def stop(self) -> None:
        self.channel.close()
        stop_group(self.process)


def receive(channel: socket.socket) -> tuple[dict, dict, int] | None:
    """In the worker: its job, the variables for its kernel and the dataset's lock; ``None`` when the launcher
    closed the socket without a job (the worker is not needed)."""
    data, fds, _, _ = socket.recv_fds(channel, 1 << 16, 1)
    chunks = [data]
    while data:
        data = channel.recv(1 << 16)
        chunks.append(data)
    if not fds:
        return None
    message = json.loads(b"".join(chunks))
    return message["job"], message["environ"], fds[0]


class Spares:
    """Workers started ahead, by spec; each is handed to one dataset (:meth:`take`).

    They are started from one long-lived thread (a worker dies with the thread that started it), and
    stopped by :meth:`close`, which also stops those still being started.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._ready: list[Worker] = []
        self._requests: queue.SimpleQueue = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._generation = 0

    def prepare(self, spec: WorkerSpec, count: int = 1) -> None:
        """Start ``count`` workers for ``spec`` (in the background)."""
        with self._lock:
            for _ in range(count):
                self._requests.put((self._generation, spec))
            if self._thread is None:
                self._thread = threading.Thread(target=self._start_requested, name="dataset-workers-ahead",
                                                daemon=True)
                self._thread.start()

    def take(self, spec: WorkerSpec) -> Worker | None:
        """A running worker started ahead for ``spec``, or ``None``."""
        with self._lock:
            for worker in list(self._ready):
                if worker.spec == spec:
                    self._ready.remove(worker)
                    if worker.process.poll() is None:
                        return worker
                    worker.channel.close()
        return None

    def close(self) -> None:
        """Stop every worker started ahead and not taken, and those still being started."""
        with self._lock:
            self._generation += 1
            idle, self._ready = self._ready, []
        for worker in idle:
            worker.channel.close()  # a worker waiting for its job ends at once
        for worker in idle:
            stop_group(worker.process)

    def _start_requested(self) -> None:
        while True:
            generation, spec = self._requests.get()
            with self._lock:
                if generation != self._generation:
                    continue
            try:
                worker = Worker.start(spec, ahead=True)
            except OSError:
                continue  # the dataset starts its worker itself, and reports why it cannot
            with self._lock:
                if generation == self._generation:
                    self._ready.append(worker)
                    continue
            worker.stop()


#: this process's workers started ahead (the driver's, when the Dask workers are its threads)
SPARES = Spares()
