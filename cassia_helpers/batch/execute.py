"""Execute the notebooks with papermill: one dataset's template, and the run's aggregation notebook.

Each notebook runs in a Jupyter kernel of its own (:class:`NotebookKernel`), started before papermill
is needed and killed once the notebook is done. A dataset's kernel imports the analysis modules as it
starts; one started ahead of its dataset (by :mod:`cassia_helpers.batch.runner`) also runs the pipeline once
on a small random matrix (:func:`~cassia_helpers.dataset.warm_up.prepare_kernel`), so that it has paid a
fresh process's costs by the time the dataset comes.
:func:`execute_dataset` writes ``{dataset}_status.json``: ``success`` only when the notebook ran to its end
*and* wrote every required output. :class:`AggregationNotebook` can start its kernel while the last
datasets still run.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import threading
import time
from collections.abc import Mapping
from importlib.resources import files
from pathlib import Path

from cassia_helpers.batch.dask.process import die_with_parent
from cassia_helpers.contract import (
    FAILED,
    INTERRUPTED,
    SUCCESS,
    DatasetPaths,
    input_fingerprint,
    now_iso,
    read_result,
    write_status,
)

log = logging.getLogger("cassia_helpers")

REQUIRED_OUTPUTS = ("markers_csv", "annotated_h5ad", "annotation_txt", "summary_txt", "clusters_csv", "result_json")
#: how long a stopping kernel or thread is waited for
STOP_GRACE_S = 10.0
# What nbclient gives the kernels it starts itself: no IPython history database shared between kernels.
KERNEL_ARGUMENTS = ("--HistoryManager.hist_file=:memory:",)
AGGREGATE_TEMPLATE = "aggregate_run.ipynb"
# The modules the aggregation notebook's cells import (directly or when called: pandas, matplotlib for the
# heatmap, Pillow and Jinja2 for the report), imported by its kernel as it starts.
AGGREGATE_PRELOAD = ("IPython.display", "cassia_helpers.summary.aggregate", "cassia_helpers.summary.report",
                     "cassia_helpers.summary.crossqc", "cassia_helpers.summary.explore",
                     "matplotlib.figure", "matplotlib.backends.backend_agg", "PIL.Image", "jinja2")
# What a dataset's kernel runs as it starts ("module:function"): started ahead of its dataset, it imports the
# analysis modules and warms the pipeline up while it waits; started for its dataset, it only imports them
# (while its worker imports papermill), since warming up would then delay the notebook.
DATASET_PREPARE = {True: "cassia_helpers.dataset.warm_up:prepare_kernel",
                   False: "cassia_helpers.dataset.warm_up:import_template_modules"}
#: how long a kernel may take to start and prepare (its imports and warm-up) before its notebook runs; a
#: loaded machine can take minutes where an idle one takes seconds
KERNEL_READY_S = 300.0


def template_path(name: str = "annotate_dataset.ipynb") -> Path:
    """A template notebook shipped inside the package (``cassia_helpers/templates``)."""
    return Path(str(files("cassia_helpers") / "templates" / name))


def papermill_path(path: str | Path) -> str:
    """``path`` escaped for papermill, which formats paths with the notebook's parameters."""
    return str(path).replace("{", "{{").replace("}", "}}")


def describe_failure(exc: BaseException) -> tuple[str, str]:
    """A one-line reason and an error type for a failed execution."""
    from nbclient.exceptions import CellTimeoutError, DeadKernelError
    from papermill.exceptions import PapermillExecutionError

    if isinstance(exc, PapermillExecutionError):
        evalue = " ".join(str(exc.evalue).split())
        if exc.ename in ("InputError", "AnnotationFailed"):
            return evalue, exc.ename
        return f"{exc.ename}: {evalue} (notebook cell {exc.exec_count})", exc.ename
    if isinstance(exc, DeadKernelError):
        return "the notebook's kernel died (often out of memory)", "DeadKernelError"
    if isinstance(exc, CellTimeoutError):
        return f"a notebook cell timed out ({' '.join(str(exc).split())[:200]})", "CellTimeoutError"
    if isinstance(exc, OSError) and exc.errno is not None:
        where = f" ({exc.filename})" if exc.filename else ""
        return f"{type(exc).__name__}: {exc.strerror}{where}", type(exc).__name__
    return f"{type(exc).__name__}: {' '.join(str(exc).split())[:300]}", type(exc).__name__


def missing_outputs(paths: DatasetPaths) -> list[str]:
    return [getattr(paths, name).name for name in REQUIRED_OUTPUTS if not getattr(paths, name).is_file()]


class NotebookKernel:
    """A Jupyter kernel for one papermill run: started before papermill is needed, killed once it is done.

    Starting the kernel here lets it boot while this process still imports papermill (or, for the
    aggregation, while the last datasets run); papermill then executes the notebook in it (``km=``),
    exactly as in a kernel it started itself. When the notebook is done the kernel is killed at once:
    every output is written and closed by the cells, and a graceful shutdown only waited 1–3 s for the
    kernel's interpreter to tear down scanpy, numba and matplotlib.

    Every method but :meth:`kill` must be called from the thread that created the kernel (its kernel
    manager lives on that thread's event loop).

    Parameters
    ----------
    kernel_name
        The Jupyter kernel (``--kernel-name``).
    cwd
        The kernel's working directory.
    preload
        Modules the kernel imports as it starts, before it reports ready (nothing is left in the
        notebook's namespace).
    prepare
        ``"module:function"``: a function the kernel calls as it starts, after ``preload`` (e.g.
        :data:`DATASET_PREPARE`); nothing is left in the notebook's namespace.
    """

    def __init__(self, kernel_name: str, cwd: str | Path, *, preload: tuple[str, ...] = (),
                 prepare: str = "") -> None:
        from jupyter_client.manager import AsyncKernelManager
        from jupyter_core.utils import run_sync

        class _Manager(AsyncKernelManager):
            """Keeps the clients papermill makes: a kernel manager it does not own leaves them open."""

            def client(self, **kwargs):
                made = super().client(**kwargs)
                clients.append(made)
                return made

        clients: list = []
        self._clients, self._run_sync = clients, run_sync
        self.manager = _Manager(kernel_name=kernel_name)
        arguments = list(KERNEL_ARGUMENTS)
        if preload:
            names = ", ".join(repr(name) for name in preload)
            arguments.append(f"--IPKernelApp.exec_lines=for _cassia_module in ({names},): __import__(_cassia_module)"
                             "\ndel _cassia_module")
        if prepare:
            module, function = prepare.split(":")
            arguments.append(f"--IPKernelApp.exec_lines=__import__({module!r}, fromlist=['_']).{function}()")
        # the kernel's own chatter (e.g. its TCP warning) would reach the user's terminal; the kernel dies with
        # the process that starts it, even when that process is killed while the kernel still prepares
        run_sync(self.manager.start_kernel)(extra_arguments=arguments, cwd=str(cwd), stdout=subprocess.DEVNULL,
                                            stderr=subprocess.DEVNULL, preexec_fn=die_with_parent)
        self.pid: int | None = getattr(self.manager.provisioner, "pid", None)

    def enter(self, folder: str | Path, environ: Mapping[str, str | None] | None = None, *,
              timeout: float = KERNEL_READY_S) -> None:
        """Wait until the kernel is ready, then move it into ``folder`` and set ``environ`` in it (``None``
        unsets a variable): what a kernel started ahead of its dataset learns only when the dataset comes.

        The code runs silently: it shows nowhere in the notebook and does not count as a cell.
        """
        client = self.manager.client()
        client.start_channels()
        self._run_sync(client.wait_for_ready)(timeout=timeout)
        values = {name: value for name, value in (environ or {}).items() if value is not None}
        unset = sorted(name for name, value in (environ or {}).items() if value is None)
        code = (f"import os as _cassia_os\n_cassia_os.chdir({str(folder)!r})\n"
                f"_cassia_os.environ.update({values!r})\n"
                f"[_cassia_os.environ.pop(_cassia_name, None) for _cassia_name in {unset!r}]\n"
                "del _cassia_os")
        reply = self._run_sync(client.execute_interactive)(code, silent=True, store_history=False, timeout=timeout)
        if reply["content"]["status"] != "ok":
            raise RuntimeError(f"the kernel could not enter {folder}: {reply['content'].get('evalue', '')}")

    def kill(self) -> None:
        """Kill the kernel's process group now; safe from any thread (papermill then sees a dead kernel)."""
        if self.pid is not None:
            try:
                os.killpg(self.pid, signal.SIGKILL)  # the kernel leads its own session
            except OSError:
                pass

    def close(self) -> None:
        """Close papermill's clients and kill the kernel; never raises (it runs while a failure is reported)."""
        try:
            for client in self._clients:
                client.stop_channels()
            self._run_sync(self.manager.shutdown_kernel)(now=True)
            self._run_sync(self.manager.cleanup_resources)()
        except Exception:  # noqa: BLE001 - e.g. a kernel that died already: make sure it is gone
            self.kill()

    def __enter__(self) -> NotebookKernel:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def dataset_kernel(kernel_name: str, cwd: str | Path, *, ahead: bool = False) -> NotebookKernel:
    """A kernel for a dataset's notebook, started now; it imports the analysis modules (and warms the pipeline
    up, if started ``ahead`` of its dataset) before it reports ready (:data:`DATASET_PREPARE`)."""
    return NotebookKernel(kernel_name, cwd, prepare=DATASET_PREPARE[ahead])


def _entered(kernel: NotebookKernel | None, kernel_name: str, folder: Path,
             environ: Mapping[str, str | None] | None) -> NotebookKernel:
    """``kernel`` (started ahead of the dataset) moved into the dataset's folder, or a fresh kernel when there
    is none or it cannot take the dataset (it died or hung meanwhile)."""
    if kernel is not None:
        try:
            kernel.enter(folder, environ)
            return kernel
        except BaseException as exc:
            kernel.close()
            if not isinstance(exc, Exception):  # Ctrl-C, or the runner told to stop
                raise
    kernel = dataset_kernel(kernel_name, folder)
    try:
        import papermill  # noqa: F401 - while the kernel starts

        kernel.enter(folder, environ)
    except BaseException:
        kernel.close()
        raise
    return kernel


def execute_dataset(parameters: dict, *, kernel_name: str = "python3", cell_timeout: float = 0.0,
                    kernel: NotebookKernel | None = None, environ: Mapping[str, str | None] | None = None) -> dict:
    """Run the template for one dataset into its folder; write and return its status record.

    ``kernel``: a :func:`dataset_kernel` started ahead of the dataset, used (and killed) instead of a fresh
    one; ``environ``: variables set in the kernel before the notebook runs (``None`` unsets one).
    """
    paths = DatasetPaths(Path(parameters["run_dir"]), parameters["tissue"], parameters["dataset"])
    paths.folder.mkdir(parents=True, exist_ok=True)
    started_at, start = now_iso(), time.perf_counter()
    read_from = input_fingerprint(parameters["input_path"])  # what --resume compares the input with

    def status(state: str, **details) -> dict:
        _drop_if_empty(paths.kernel_log)  # every way out of the notebook passes here
        return write_status(paths, state, duration=time.perf_counter() - start, started_at=started_at,
                            input_file=read_from, **details)

    try:
        paths.result_json.unlink(missing_ok=True)
        with _entered(kernel, kernel_name, paths.folder, environ) as kernel, \
                open(paths.kernel_log, "w", encoding="utf-8") as log:
            import papermill as pm

            pm.execute_notebook(
                papermill_path(template_path()),
                papermill_path(paths.notebook),
                parameters=parameters,
                kernel_name=kernel_name,
                km=kernel.manager,
                cwd=str(paths.folder),
                progress_bar=False,
                log_output=False,
                stdout_file=log,
                stderr_file=log,
                execution_timeout=cell_timeout or None,
            )
    except KeyboardInterrupt:
        return status(INTERRUPTED, error="interrupted by the user", error_type="KeyboardInterrupt")
    except Exception as exc:  # noqa: BLE001 - every failure of one dataset is recorded, never raised
        reason, kind = describe_failure(exc)
        return status(FAILED, error=reason, error_type=kind)
    missing = missing_outputs(paths)
    if missing:
        return status(FAILED, error=f"notebook finished without writing {', '.join(missing)}",
                      error_type="MissingOutputs")
    failure = (read_result(paths) or {}).get("annotation_failure")
    if failure:  # the outputs are kept, with each cluster's reason, but the dataset did not get its calls
        return status(FAILED, error=failure, error_type="AnnotationFailed")
    return status(SUCCESS)


def _drop_if_empty(log: Path) -> None:
    """Remove a kernel log the kernel wrote nothing to: a folder of outputs, not of empty files."""
    try:
        if log.stat().st_size == 0:
            log.unlink()
    except OSError:
        pass


class AggregationNotebook:
    """The run's aggregation notebook, executed by papermill in a kernel that can be started ahead of time.

    :meth:`prepare` starts a thread that imports papermill, starts the kernel in the run folder and has
    it import the modules the cells use; the driver calls it once the last datasets are running, so that
    :meth:`run` costs the cells only. The executed notebook is the same either way. The kernel is killed
    by :meth:`run` when done, or by :meth:`close` (a run that stops without aggregating).

    Parameters
    ----------
    run_dir
        The run folder (the notebook's parameter, and the kernel's working directory).
    kernel_name
        The Jupyter kernel (``--kernel-name``).
    """

    def __init__(self, run_dir: str | Path, kernel_name: str = "python3") -> None:
        self.run_dir = Path(run_dir)
        self.kernel_name = kernel_name
        self._go, self._cancel, self._lock = threading.Event(), threading.Event(), threading.Lock()
        self._thread: threading.Thread | None = None
        self._kernel: NotebookKernel | None = None
        self._problem = "the aggregation did not run"

    def prepare(self) -> None:
        """Start the kernel (in a thread) for a later :meth:`run`; calling it again does nothing."""
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._main, name="aggregation-notebook", daemon=True)
                self._thread.start()

    def run(self) -> str:
        """Execute the notebook (kept in the run folder as its audit trail); ``""`` on success, else a
        one-line reason (the driver then writes the summaries directly)."""
        self.prepare()
        self._go.set()
        try:
            while self._thread.is_alive():
                self._thread.join(0.2)
        except KeyboardInterrupt:  # a second Ctrl-C: stop at once (the kernel dies; --resume writes them)
            self._cancel.set()
            if self._kernel is not None:
                self._kernel.kill()
            self._thread.join(STOP_GRACE_S)
            raise
        return self._problem

    def write(self) -> str:
        """The run-level summaries: :meth:`run`, else written directly, each file on its own (the ledger's
        first); ``""`` when every one was written, else which were not and why. Never a traceback."""
        problem = self.run()
        if not problem:
            return ""
        log.warning("The aggregation notebook failed (%s); writing the summaries directly", problem)
        from cassia_helpers.summary.aggregate import write_cell_type_heatmap, write_run_summaries
        from cassia_helpers.summary.report import write_report

        failed = []
        for step in (write_run_summaries, write_cell_type_heatmap, write_report):
            try:
                step(self.run_dir)
            except Exception as exc:  # noqa: BLE001 - the datasets' outputs and the closing table still stand
                reason = getattr(exc, "strerror", None) or exc
                log.error("%s: %s failed (%s: %s)", self.run_dir, step.__name__, type(exc).__name__, reason)
                failed.append(f"{step.__name__}: {reason}")
        return "; ".join(failed)

    def close(self) -> None:
        """Kill a kernel that was prepared but will not run (no effect after :meth:`run`)."""
        self._cancel.set()
        self._go.set()
        if self._thread is not None:
            self._thread.join(STOP_GRACE_S)

    def _main(self) -> None:
        try:
            with NotebookKernel(self.kernel_name, self.run_dir, preload=AGGREGATE_PRELOAD) as kernel:
                self._kernel = kernel
                import papermill as pm  # while the kernel starts

                self._go.wait()
                if not self._cancel.is_set():
                    self._problem = self._execute(pm, kernel)
        except Exception as exc:  # noqa: BLE001 - the summaries must exist even when no kernel can start
            self._problem = describe_failure(exc)[0]

    def _execute(self, pm, kernel: NotebookKernel) -> str:
        from cassia_helpers.contract import AGGREGATE_NOTEBOOK
        from cassia_helpers.files import atomic_path

        executed = self.run_dir / f".{AGGREGATE_NOTEBOOK}.{os.getpid()}.tmp.ipynb"  # a run stopped at once leaves it
        try:
            pm.execute_notebook(
                papermill_path(template_path(AGGREGATE_TEMPLATE)),
                papermill_path(executed),
                parameters={"run_dir": str(self.run_dir.resolve())},
                kernel_name=self.kernel_name,
                km=kernel.manager,
                progress_bar=False,
                log_output=False,
            )
            with atomic_path(self.run_dir / AGGREGATE_NOTEBOOK) as tmp:
                tmp.write_bytes(executed.read_bytes())
        except Exception as exc:  # noqa: BLE001 - reported to the driver as one line
            return describe_failure(exc)[0]
        finally:
            executed.unlink(missing_ok=True)
        return ""

