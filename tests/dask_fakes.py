"""Task functions for the Dask tests: they behave like the driver's ``run_dataset`` without notebooks.

They live in an importable module so that Dask workers (other processes) can load them by name.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from cassia_helpers.batch.dask.process import die_with_parent

# A "kernel" that takes the run-wide LLM limits the way a dataset's notebook would, through the
# scheduler address its worker put in the environment, and logs when it held a request slot.
KERNEL = """
import json, os, sys, time
from cassia_helpers.dataset.annotate.llm.limits import run_limits
start = time.perf_counter()  # what a kernel pays to reach the scheduler: import distributed, connect
throttle, budget = run_limits(sys.argv[1], int(sys.argv[2]), 0.0)
connect_s = time.perf_counter() - start
with open(sys.argv[3], "a") as log:
    log.write(json.dumps({"kind": type(throttle).__name__, "connect_s": connect_s}) + "\\n")
for _ in range(int(sys.argv[4])):
    with throttle.slot():
        entered = time.time()
        time.sleep(float(sys.argv[5]))
        left = time.time()
    with open(sys.argv[3], "a") as log:
        log.write(json.dumps({"in": entered, "out": left}) + "\\n")
"""


def _append(path: Path, line: str) -> None:
    with open(path, "a", encoding="utf-8") as handle:
        handle.write(line + "\n")


def sleeper(job: dict, stop) -> dict:
    """A dataset that runs a child process for ``job['seconds']``, stopping early when asked.

    Leaves ``{name}.runs`` (one line per run: the worker's pid), ``{name}.stopped`` when it saw
    ``stop()``, and tags its child's command line with ``job['tag']`` so tests can find it.
    """
    folder, name = Path(job["dir"]), job["name"]
    _append(folder / f"{name}.runs", str(os.getpid()))
    child = subprocess.Popen([sys.executable, "-c", "import time, sys; time.sleep(float(sys.argv[1]))",
                              str(job["seconds"]), job["tag"]],
                             start_new_session=True, preexec_fn=die_with_parent)
    while child.poll() is None:
        if stop():
            (folder / f"{name}.stopped").write_text("stop seen")
            os.killpg(child.pid, signal.SIGKILL)
            child.wait()
            return {"key": job["key"], "status": "interrupted", "error": "stopped", "error_type": "Interrupted"}
        time.sleep(0.05)
    return {"key": job["key"], "status": "success", "error": "", "error_type": "", "pid": os.getpid()}


def kernel_user(job: dict, stop) -> dict:
    """A dataset whose separate "kernel" process takes LLM request slots from the scheduler."""
    log = Path(job["dir"]) / f"{job['name']}.slots"
    result = subprocess.run([sys.executable, "-c", KERNEL, job["run_dir"], str(job["limit"]), str(log),
                             str(job["requests"]), str(job["hold_s"])],
                            capture_output=True, text=True, timeout=120, preexec_fn=die_with_parent)
    return {"key": job["key"], "status": "success" if result.returncode == 0 else "failed",
            "error": result.stderr[-2000:], "error_type": "", "kernel_env": os.environ.get("CASSIA_DASK_SCHEDULER")}


def spender(job: dict, stop) -> dict:
    """A dataset whose requests each cost ``job['cost']``, sent while the shared budget allows."""
    from cassia_helpers.dataset.annotate.llm.limits import run_limits

    throttle, budget = run_limits(job["run_dir"], job["limit"], job["max_cost"])
    sent = 0
    while True:
        # as the LLM client must do it: check and count within the request's slot
        with throttle.slot():
            if budget.exhausted():
                break
            time.sleep(0.02)
            budget.add(job["cost"])
        sent += 1
    return {"key": job["key"], "status": "success", "error": "", "error_type": "", "sent": sent,
            "kinds": [type(throttle).__name__, type(budget).__name__], "seen": budget.spent()}


def read_lines(path: Path) -> list[dict]:
    try:
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    except FileNotFoundError:
        return []


def environment_probe(job: dict, stop) -> dict:
    """Whether the worker's environment holds the expected key (never returns the key itself)."""
    return {"key": job["key"], "status": "success", "error": "", "error_type": "",
            "has_key": os.environ.get("OPENAI_API_KEY", "").endswith(job["suffix"]),
            "omp": os.environ.get("OMP_NUM_THREADS", "")}
