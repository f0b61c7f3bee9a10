"""A SLURM job's memory from the sizes of the inputs it may run (``--slurm-memory-from-inputs``).

The rule is a rough, conservative one: :data:`BASE` for the job's Dask worker and the dataset's kernel with
scanpy imported (about 0.65 GB measured for a small input, SLURM's own accounting), plus :data:`PER_BYTE`
times the input's size on disk (measured here: about 3 times, for synthetic inputs of up to 17 MB). Every
job may run any dataset of the run, so each job asks for the largest input's estimate, never more than
``--slurm-memory``.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from pathlib import Path

log = logging.getLogger("cassia_helpers")
BASE = 1_000_000_000
PER_BYTE = 10


def input_bytes(path: str | Path) -> int:
    """The size of an input on disk: a file's, or the sum of a folder's files (e.g. a 10x matrix folder)."""
    path = Path(path)
    try:
        if path.is_dir():
            return sum(entry.stat().st_size for entry in path.rglob("*") if entry.is_file())
        return path.stat().st_size
    except OSError:
        return 0


def memory_estimate(size: int) -> int:
    """Bytes of memory a dataset whose input has ``size`` bytes on disk is expected to need."""
    return BASE + PER_BYTE * max(0, int(size))


def memory_for_inputs(paths: Iterable[str | Path], cap: str) -> str:
    """The memory each job requests (in whole MiB): the largest input's :func:`memory_estimate`, at most
    ``cap``."""
    from dask.utils import format_bytes, parse_bytes

    largest = max((input_bytes(path) for path in paths), default=0)
    memory = f"{min(parse_bytes(cap), memory_estimate(largest)) // 2**20}MiB"
    log.info("SLURM jobs request %s of memory: 1 GB + %d x the largest input (%s), at most --slurm-memory %s",
             memory, PER_BYTE, format_bytes(largest).replace(" ", ""), cap)
    return memory
