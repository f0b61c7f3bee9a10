"""Child processes that never outlive the process that started them (Linux parent-death signal)."""

from __future__ import annotations

import ctypes
import os
import signal
import sys

PR_SET_PDEATHSIG = 1
# The threads of a dataset's BLAS/OpenMP/numba: set in its kernel's environment; a SLURM job gives its
# cores through THREADS_ENV (Dask's nanny would cap them at 1).
THREAD_VARIABLES = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS")
THREADS_ENV = "CASSIA_DATASET_THREADS"
# loaded here, in the parent: a preexec function should do as little as possible between fork and exec
_LIBC = ctypes.CDLL("libc.so.6", use_errno=True) if sys.platform.startswith("linux") else None
# The pid of the process that forks, recorded in it just before each fork (subprocess runs the at-fork
# hooks when it has a preexec function): the child compares its parent with it, so a parent killed even
# before the child could read its parent's pid is noticed as well.
_forking_pid = os.getpid()


def _remember_forking_pid() -> None:
    global _forking_pid
    _forking_pid = os.getpid()


os.register_at_fork(before=_remember_forking_pid)


def die_with_parent() -> None:
    """Have this process killed (SIGKILL) when its parent ends; meant as ``Popen(preexec_fn=...)``.

    ``subprocess.Popen(cmd, start_new_session=True, preexec_fn=die_with_parent)`` starts a dataset's
    runner in its own process group that still dies with the Dask worker that started it, so a dataset
    whose worker was killed can never keep running beside a second run. Linux only; elsewhere it does
    nothing.

    The signal follows the *thread* that started the child: start it from the thread that then waits
    for it (as a Dask task does), not from a short-lived helper thread.
    """
    if _LIBC is None:
        return
    # in a child, the process that forked it; called outside a child (own pid), its current parent
    parent = _forking_pid if _forking_pid != os.getpid() else os.getppid()
    if _LIBC.prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
    if os.getppid() != parent:  # the parent died before the request was in place
        os.kill(os.getpid(), signal.SIGKILL)
