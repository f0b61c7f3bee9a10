"""Shared helpers of the bench/ scripts: thread settings, machine description, table printing, RSS."""

from __future__ import annotations

import os
import platform
import resource
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BENCH = Path(__file__).resolve().parent
DEFAULT_DATA = BENCH / ".data"

# Thread pools sized for the machine (2 cores here). Must be set before numpy/numba are imported.
THREAD_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS")


def set_threads(n: int | None = None) -> int:
    """Set OMP/BLAS/numba thread counts to ``n`` (default: the CPUs this process may use)."""
    n = n or len(os.sched_getaffinity(0))
    for var in THREAD_VARS:
        os.environ[var] = str(n)
    return n


def ensure_path() -> None:
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))


def machine_info() -> list[tuple[str, str]]:
    """(key, value) rows describing the machine and the library versions."""
    from importlib.metadata import PackageNotFoundError, version

    cpu = platform.processor() or "?"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    ram = "?"
    try:
        for line in open("/proc/meminfo"):
            if line.startswith("MemTotal:"):
                ram = f"{int(line.split()[1]) / 2**20:.1f} GiB"
                break
    except OSError:
        pass
    rows = [
        ("cpu", cpu),
        ("cores (usable/total)", f"{len(os.sched_getaffinity(0))}/{os.cpu_count()}"),
        ("ram", ram),
        ("python", platform.python_version()),
        ("threads", ", ".join(f"{v}={os.environ.get(v, '-')}" for v in THREAD_VARS)),
    ]
    versions = []
    for pkg in ("scanpy", "anndata", "numpy", "scipy", "numba", "pynndescent", "umap-learn", "igraph",
                "leidenalg", "scikit-learn", "papermill", "openai"):
        try:
            versions.append(f"{pkg} {version(pkg)}")
        except PackageNotFoundError:
            pass
    rows.append(("versions", ", ".join(versions)))
    return rows


def print_machine(title: str = "machine") -> None:
    print_table([(k, v) for k, v in machine_info()], ["", title], align="ll")


def print_table(rows, header=None, *, align=None) -> None:
    """Print rows (lists of cells) as a plain text table; numbers right-aligned."""
    rows = [[_fmt(c) for c in r] for r in rows]
    if header:
        rows = [list(header)] + rows
    if not rows:
        return
    widths = [max(len(r[i]) for r in rows if i < len(r)) for i in range(max(len(r) for r in rows))]
    for k, r in enumerate(rows):
        cells = []
        for i, c in enumerate(r):
            right = align[i] == "r" if align else _numeric(c)
            cells.append(c.rjust(widths[i]) if right else c.ljust(widths[i]))
        print("  ".join(cells).rstrip())
        if k == 0 and header:
            print("  ".join("-" * w for w in widths))
    print()


def _numeric(text: str) -> bool:
    t = text.replace(",", "").replace("x", "").replace("%", "").replace(" GiB", "").replace(" s", "")
    try:
        float(t)
        return True
    except ValueError:
        return False


def _fmt(value) -> str:
    if isinstance(value, float):
        if value != value:
            return "n/a"
        if abs(value) >= 100:
            return f"{value:,.0f}"
        if abs(value) >= 10:
            return f"{value:.1f}"
        return f"{value:.2f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def peak_rss_bytes() -> int:
    """Peak resident set size of this process so far (ru_maxrss is KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def gib(n: float) -> float:
    return n / 2**30


class HelpFormatter:
    """argparse formatter: the module docstring as written, plus defaults in the flag help."""

    def __new__(cls, *args, **kwargs):
        import argparse

        class _Formatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
            pass

        return _Formatter(*args, **kwargs)
