#!/usr/bin/env python
"""Papermill/batch overhead per dataset, ``--workers 1`` vs ``--workers 2``, and Dask vs a process pool.

Part A — overhead on one tiny dataset (``--tiny-cells``, default 3,000 synthetic PBMC cells from
``scale_data.py``), offline reference annotator, same outputs in every variant:

* ``run_batch.py``: ``python run_batch.py --workers 1 --annotator reference`` (driver process, the Dask
  local cluster, papermill + a Jupyter kernel for the dataset — started ahead, while the driver starts
  Dask, and warmed up —, then the aggregation notebook in a second kernel, and the report);
* ``execute_dataset``: ``cassia_helpers.batch.execute.execute_dataset`` in a fresh process (papermill + a
  kernel started for the dataset only; no driver, no aggregation);
* ``direct (cold)``: the template's code cells executed with ``exec`` in a fresh process — the same
  helper calls and outputs without papermill or a kernel (python start and imports included);
* ``direct (warm)``: the same code run a second time in that process (imports and numba JIT already
  paid) — the pure per-dataset compute.

``overhead vs direct cold`` is what papermill/kernel/driver add per dataset on top of doing the same
work in a plain Python process; ``direct (cold) / direct (warm)`` is the least any run in a fresh process
can cost against the warm calls. Part A runs every variant ``--repeats`` times (default 3) and prints
the minimum (steady state) and the median; the first repeat also pays one-off cache filling.

Part B — four equal datasets (``--datasets`` × ``--cells``, default 4 × 3,000 cells, different seeds) in
``{data}/blood/``, ``run_batch.py --annotator reference`` with ``--workers 1`` and ``--workers 2``
(``--repeats-b`` times each, alternating; medians): wall time, per-dataset time (from the
``*_status.json`` files), speed-up, and peak memory of the whole process tree (sum of RSS over the
driver and all its descendants, polled every 0.2 s), CPU seconds of the process tree (user + system, as
``/usr/bin/time`` counts them) and the cores they kept busy, and the most ``--workers 2`` could gain on this
machine's cores with that much CPU work.

Part C — the per-dataset cost of the Dask path against a plain process pool: ``--null-jobs`` datasets
whose launcher only starts and waits for a runner process that does nothing (``python -c pass``, in
place of the dataset's notebook), on 2 workers, through ``open_client`` + ``DatasetExecutor`` (as the
driver runs them) and through ``concurrent.futures.ProcessPoolExecutor``. Start-up and shut-down are
timed apart from the per-dataset part.

``--baseline DIR``: also run parts A (``run_batch.py``, ``execute_dataset``), B and C with the package of
another checkout (e.g. ``git worktree add /tmp/before <commit>``), interleaved with this one so both
see the same machine load, and print the targets before and after.

The annotator is ``--annotator reference`` (the offline one), so no request leaves the machine.

Usage::

    python bench/batch_overhead.py
    python bench/batch_overhead.py --tiny-cells 700 --repeats 3 --datasets 4 --cells 3000
    python bench/batch_overhead.py --baseline /tmp/before --repeats 3 --repeats-b 2
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import _common

_common.set_threads()
_common.ensure_path()


class TreeRSS:
    """Polls the summed RSS of a process and all its descendants; ``peak`` in bytes."""

    def __init__(self, pid: int, interval: float = 0.2):
        import psutil

        self.root = psutil.Process(pid)
        self.interval = interval
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()

    def _poll(self):
        import psutil

        while not self._stop.is_set():
            try:
                procs = [self.root] + self.root.children(recursive=True)
            except psutil.Error:
                break
            total = 0
            for p in procs:
                try:
                    total += p.memory_info().rss
                except psutil.Error:
                    pass
            self.peak = max(self.peak, total)
            self._stop.wait(self.interval)

    def stop(self):
        self._stop.set()
        self._thread.join()


#: targets of the batch step: --workers 2 speed-up on 4 datasets, one dataset's run_batch.py against the warm
#: helper calls, and the Dask path's extra cost per dataset against a process pool
TARGET_SPEEDUP, TARGET_RUN_OVER_WARM, TARGET_DASK_EXTRA_S = 1.7, 2.0, 1.0


def timed_run(cmd: list[str], *, cwd: Path, log: Path, root: Path | None = None) -> dict:
    """Run ``cmd`` with the package of ``root`` (default: this checkout); wall time, exit code, peak tree RSS."""
    env = dict(os.environ)
    env.pop("OPENAI_BASE_URL", None)
    env.pop("OPENAI_API_KEY", None)
    # the driver, its runners and their kernels all import the package of that checkout
    env["PYTHONPATH"] = os.pathsep.join([str(root or _common.ROOT), *filter(None, [env.get("PYTHONPATH")])])
    start, cpu_before = time.perf_counter(), _children_cpu()
    with open(log, "w") as handle:
        proc = subprocess.Popen(cmd, cwd=cwd, stdout=handle, stderr=subprocess.STDOUT, env=env)
        poll = TreeRSS(proc.pid)
        rc = proc.wait()
        poll.stop()
    return {"wall": time.perf_counter() - start, "rc": rc, "peak_tree": poll.peak, "log": str(log),
            "cpu": _children_cpu() - cpu_before}


def _children_cpu() -> float:
    """User + system CPU seconds of this process's ended children and everything they waited for (as
    ``/usr/bin/time`` counts a command's process tree)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def statuses(run_root: Path) -> list[dict]:
    out = []
    for path in sorted(run_root.rglob("*_status.json")):
        try:
            out.append(json.loads(path.read_text()))
        except (OSError, ValueError):
            pass
    return out


def template_code() -> list[str]:
    try:
        from cassia_helpers.batch.execute import template_path
    except ImportError:  # a --baseline checkout from before execute.py
        from cassia_helpers.batch.runner import template_path

    nb = json.loads(Path(template_path()).read_text())
    cells = [c for c in nb["cells"] if c["cell_type"] == "code"]
    return ["".join(c["source"]) for c in cells if "parameters" not in c.get("metadata", {}).get("tags", [])]


def direct(params: dict) -> float:
    """Run the template's code cells in this process (no papermill, no kernel); seconds."""
    import matplotlib

    matplotlib.use("Agg")  # this benchmark process only: no screen
    import matplotlib.pyplot as plt

    from cassia_helpers.settings import declared

    start = time.perf_counter()
    namespace = {**declared(), **params}  # the parameters cell's defaults, then what papermill would inject
    Path(params["run_dir"]).mkdir(parents=True, exist_ok=True)
    cwd = os.getcwd()
    for code in template_code():
        exec(compile(code, "<template>", "exec"), namespace)
    plt.close("all")
    os.chdir(cwd)
    return time.perf_counter() - start


def dataset_params(input_path: Path, run_dir: Path, name: str) -> dict:
    from cassia_helpers.settings import Settings, notebook_parameters

    return notebook_parameters(Settings(annotator="reference"), dataset=name, tissue="blood",
                               input_path=input_path, run_dir=run_dir)


def _child(mode: str, params_file: str, args: argparse.Namespace) -> int:
    if mode == "dask-vs-pool":
        print(json.dumps(_child_part_c(args.null_jobs, args.repeats)))
        return 0
    job = json.loads(Path(params_file).read_text())
    if mode == "direct":
        cold = direct(job["cold"])
        warm = direct(job["warm"])
        print(json.dumps({"cold_inner": cold, "warm": warm}))
        return 0
    try:
        from cassia_helpers.batch.execute import execute_dataset
    except ImportError:  # a --baseline checkout from before execute.py
        from cassia_helpers.batch.runner import execute_dataset

    start = time.perf_counter()
    record = execute_dataset(job["cold"])
    print(json.dumps({"inner": time.perf_counter() - start, "status": record["status"], "error": record["error"]}))
    return 0


def _last_json(log: str) -> dict:
    for line in reversed(Path(log).read_text().splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    return {}


def _job_file(work: Path, tag: str, link: Path) -> Path:
    """The parameters of a cold and a warm run of the tiny dataset, for a ``--_child`` process."""
    job = work / f"job_{tag}.json"
    job.write_text(json.dumps({
        "cold": dataset_params(link, work / f"{tag}_cold", "tiny"),
        "warm": dataset_params(link, work / f"{tag}_warm", "tiny"),
    }, default=str))
    return job


def run_batch_cmd(root: Path, data_dir: Path, out: Path, workers: int) -> list[str]:
    return [sys.executable, str(root / "run_batch.py"), "--data-dir", str(data_dir), "--tissues", "blood",
            "--output-dir", str(out), "--workers", str(workers), "--annotator", "reference"]


def part_a(work: Path, tiny: Path, repeats: int, trees: dict[str, Path]) -> dict[str, dict[str, float]]:
    """Part A; returns ``{"tree|median" or "tree|min": {variant: seconds}}``."""
    py = sys.executable
    variants = [f"{v}{label}" for label in trees for v in ("run_batch.py", "execute_dataset")]
    results: dict[str, list[float]] = {k: [] for k in (*variants, "direct (cold)", "direct (warm)")}
    extra: dict[str, list] = {"status": [], "dataset_s": [], "kernel_steps": []}
    peaks: dict[str, int] = {}
    data_dir = work / "tiny_data"
    (data_dir / "blood").mkdir(parents=True, exist_ok=True)
    link = data_dir / "blood" / "tiny.h5ad"
    if not link.exists():
        link.symlink_to(tiny.resolve())
    for r in range(repeats):
        print(f"part A repeat {r + 1}/{repeats} ...", flush=True)
        for label, root in trees.items():
            tag = f"{r}{label.strip(' ()')}"
            out = work / f"rb_{tag}"
            res = timed_run(run_batch_cmd(root, data_dir, out, 1), cwd=root, log=work / f"rb_{tag}.log", root=root)
            results[f"run_batch.py{label}"].append(res["wall"])
            peaks[f"run_batch.py{label}"] = max(peaks.get(f"run_batch.py{label}", 0), res["peak_tree"])
            st = statuses(out)
            extra["status"] += [s["status"] + (f" ({s['error'][:80]})" if s["error"] else "") for s in st]
            if not label:
                extra["dataset_s"] += [s["duration_s"] for s in st]
                for rj in out.rglob("*_result.json"):
                    extra["kernel_steps"].append(json.loads(rj.read_text()).get("timings", {}))

            res = timed_run([py, __file__, "--_child", "execute", "--_job", str(_job_file(work, f"ed{tag}", link)),
                             "--_root", str(root)], cwd=work, log=work / f"ed_{tag}.log", root=root)
            results[f"execute_dataset{label}"].append(res["wall"])
            peaks[f"execute_dataset{label}"] = max(peaks.get(f"execute_dataset{label}", 0), res["peak_tree"])
            info = _last_json(res["log"])
            extra["status"].append(f"execute_dataset: {info.get('status')} {info.get('error', '')[:80]}".strip())

        res = timed_run([py, __file__, "--_child", "direct", "--_job", str(_job_file(work, f"dc{r}", link))],
                        cwd=work, log=work / f"dc_{r}.log")
        info = _last_json(res["log"])
        if res["rc"] != 0 or not info:
            extra["status"].append(f"direct: FAILED (see {res['log']})")
            continue
        results["direct (cold)"].append(res["wall"] - info["warm"])
        results["direct (warm)"].append(info["warm"])
        peaks["direct (cold+warm)"] = max(peaks.get("direct (cold+warm)", 0), res["peak_tree"])

    med = {k: statistics.median(v) if v else float("nan") for k, v in results.items()}
    best = {k: min(v) if v else float("nan") for k, v in results.items()}
    rows = []
    for k, v in results.items():
        rows.append([k, best[k], med[k], ", ".join(f"{x:.1f}" for x in v),
                     best[k] - best["direct (cold)"], med[k] - med["direct (cold)"]])
    print()
    _common.print_table(rows, ["variant (1 tiny dataset)", "min s", "median s", "runs s",
                               "overhead vs direct cold (min) s", "(median) s"])
    print("the first repeat also fills numba's on-disk caches and the OS file cache; min is the steady state")
    print(f"direct (cold) / direct (warm): {best['direct (cold)'] / best['direct (warm)']:.2f}x (minima): what any "
          f"run that starts a fresh Python process for the dataset pays at least")
    if extra["dataset_s"]:
        print(f"run_batch.py: dataset status duration (worker's execute_dataset) median "
              f"{statistics.median(extra['dataset_s']):.1f} s; the rest of the run_batch.py wall is driver start, "
              f"discovery, the Dask cluster and the aggregation notebook")
    if extra["kernel_steps"]:
        steps = extra["kernel_steps"][-1]
        print("steps inside the kernel (uns timings, last run): " + ", ".join(f"{k} {v:.2f}" for k, v in steps.items()))
    print("peak RSS of the process tree (GiB): " + ", ".join(f"{k} {_common.gib(v):.2f}" for k, v in peaks.items()))
    print("statuses: " + "; ".join(sorted(set(extra["status"]))))
    print()
    return {f"{label}|{kind}": {"run_batch.py": pick[f"run_batch.py{label}"], "direct (warm)": pick["direct (warm)"]}
            for label in trees for kind, pick in (("median", med), ("min", best))}


def part_b(work: Path, data_root: Path, n_datasets: int, cells: int, repeats: int,
           trees: dict[str, Path]) -> dict[str, float]:
    """Part B; returns ``{"tree|median" or "tree|min": speed-up of --workers 2 over --workers 1}``."""
    import scale_data

    data_dir = work / "batch_data"
    (data_dir / "blood").mkdir(parents=True, exist_ok=True)
    for i in range(n_datasets):
        src = scale_data.dataset_path(cells, out=data_root, seed=100 + i)
        link = data_dir / "blood" / f"pbmcmix{cells}_s{i}.h5ad"
        if not link.exists():
            link.symlink_to(src.resolve())
    runs: dict[tuple[str, int], list[dict]] = {}
    for r in range(repeats):
        for label, root in trees.items():
            for workers in (1, 2):
                print(f"part B{label} --workers {workers} ({r + 1}/{repeats}) ...", flush=True)
                out = work / f"batch{label.strip(' ()')}_w{workers}_{r}"
                res = timed_run(run_batch_cmd(root, data_dir, out, workers), cwd=root, root=root,
                                log=work / f"batch{label.strip(' ()')}_w{workers}_{r}.log")
                res["statuses"] = statuses(out)
                runs.setdefault((label, workers), []).append(res)
                shutil.rmtree(out, ignore_errors=True)  # 4 annotated h5ad files per run
    rows = []
    speedups = {}
    for label in trees:
        for workers in (1, 2):
            done = runs[(label, workers)]
            walls = [res["wall"] for res in done]
            st = [s for res in done for s in res["statuses"]]
            ok = sum(s["status"] == "success" for s in st)
            durs = [s["duration_s"] for s in st]
            errors = sorted({s["error"][:100] for s in st if s["error"]})
            cpu = statistics.median(res["cpu"] for res in done)
            rows.append([f"{workers}{label}", min(walls), statistics.median(walls),
                         ", ".join(f"{w:.1f}" for w in walls), statistics.median(walls) / n_datasets,
                         statistics.median(durs) if durs else "-", cpu, cpu / statistics.median(walls),
                         f"{ok}/{len(st)}", _common.gib(max(res["peak_tree"] for res in done)),
                         "; ".join(errors) or "-"])
        for kind, pick in (("median", statistics.median), ("min", min)):
            speedups[f"{label}|{kind}"] = (pick(res["wall"] for res in runs[(label, 1)])
                                           / pick(res["wall"] for res in runs[(label, 2)]))
    print()
    _common.print_table(rows, ["workers", "min wall s", "median wall s", "runs s", "wall s/dataset",
                               "median dataset s", "CPU s", "cores busy", "success", "peak tree RSS GiB",
                               "errors"])
    cores = len(os.sched_getaffinity(0))
    for label in trees:
        print(f"speed-up --workers 2 vs 1{label}: {speedups[label + '|median']:.2f}x from the medians, "
              f"{speedups[label + '|min']:.2f}x from the minima, on {n_datasets} x {cells:,}-cell datasets")
        # the CPU work of --workers 2 spread perfectly over the cores is the least wall time it can take
        one = statistics.median(res["wall"] for res in runs[(label, 1)])
        two_cpu = statistics.median(res["cpu"] for res in runs[(label, 2)])
        print(f"  at most {one * cores / two_cpu:.2f}x on {cores} cores with that much CPU work (CPU s of the "
              f"process trees, user + system)")
    print()
    return speedups


def null_dataset(job: dict, stop=None) -> dict:
    """Part C's launcher: what ``run_dataset`` does around a notebook (a runner process, waited for), no notebook."""
    subprocess.run([sys.executable, "-c", "pass"], check=True)
    return {"key": job["key"], "status": "success", "error": "", "error_type": ""}


def _null_jobs(n: int) -> dict[str, dict]:
    return {f"run/null/{i}": {"key": f"run/null/{i}"} for i in range(n)}


def _pool_times(n: int, workers: int) -> tuple[float, float]:
    """(start + shut-down s, run s) of ``n`` null datasets in a process pool."""
    from concurrent.futures import ProcessPoolExecutor

    start = time.perf_counter()
    with ProcessPoolExecutor(max_workers=workers) as pool:
        list(pool.map(null_dataset, [{"key": "warm-up"}] * workers))  # the pool's processes are started
        started = time.perf_counter()
        list(pool.map(null_dataset, _null_jobs(n).values()))
        ran = time.perf_counter()
    return time.perf_counter() - ran + started - start, ran - started


def _dask_times(n: int, workers: int) -> tuple[float, float]:
    """(start + shut-down s, run s) of ``n`` null datasets through the driver's Dask path."""
    from cassia_helpers.batch.dask import DatasetExecutor, open_client

    start = time.perf_counter()
    with open_client(workers=workers) as client:
        started = time.perf_counter()
        DatasetExecutor(client).run_jobs(null_dataset, _null_jobs(n), on_done=lambda key, record: None)
        ran = time.perf_counter()
    return time.perf_counter() - ran + started - start, ran - started


def _child_part_c(n: int, repeats: int) -> dict:
    out: dict[str, list] = {"pool": [], "dask": []}
    for _ in range(repeats):
        out["pool"].append(_pool_times(n, 2))
        out["dask"].append(_dask_times(n, 2))
    return out


def part_c(work: Path, n: int, repeats: int, trees: dict[str, Path]) -> dict[str, float]:
    """Part C; returns ``{tree: median extra seconds per dataset of Dask over the pool}``."""
    print(f"part C: {n} null datasets on 2 workers, Dask vs a process pool ...", flush=True)
    rows, extra = [], {}
    for label, root in trees.items():
        res = timed_run([sys.executable, __file__, "--_child", "dask-vs-pool", "--null-jobs", str(n), "--repeats",
                         str(repeats), "--_root", str(root)], cwd=work, log=work / f"c{label.strip(' ()')}.log",
                        root=root)
        info = _last_json(res["log"])
        if res["rc"] != 0 or not info:
            print(f"part C{label}: FAILED (see {res['log']})")
            continue
        pool_setup = statistics.median(t[0] for t in info["pool"])
        dask_setup = statistics.median(t[0] for t in info["dask"])
        pool_each = statistics.median(t[1] for t in info["pool"]) / n
        dask_each = statistics.median(t[1] for t in info["dask"]) / n
        extra[label] = dask_each - pool_each
        rows.append([f"process pool{label}", pool_setup, pool_each, "-"])
        rows.append([f"Dask (driver's path){label}", dask_setup, dask_each, dask_each - pool_each])
    print()
    _common.print_table(rows, ["path (2 workers)", "start + shut-down s", "s per dataset", "extra s per dataset"])
    return extra


def print_targets(a: dict, b: dict, c: dict, trees: dict[str, Path]) -> None:
    """The three targets, measured from the medians (and the minima, the least disturbed runs)."""
    rows = []
    for label in trees:
        for kind in ("median", "min"):
            speedup = b.get(f"{label}|{kind}")
            if speedup is not None:
                rows.append([f"--workers 2 speed-up, 4 datasets ({kind}){label}", f"{speedup:.2f}x",
                             f">= {TARGET_SPEEDUP}x", "met" if speedup >= TARGET_SPEEDUP else "not met"])
        for kind in ("median", "min"):
            if f"{label}|{kind}" in a:
                run, warm = a[f"{label}|{kind}"]["run_batch.py"], a[f"{label}|{kind}"]["direct (warm)"]
                rows.append([f"run_batch.py / direct warm, 1 dataset ({kind}){label}",
                             f"{run:.1f} / {warm:.1f} s = {run / warm:.2f}x", f"<= {TARGET_RUN_OVER_WARM}x",
                             "met" if run / warm <= TARGET_RUN_OVER_WARM else "not met"])
        if label in c:
            rows.append([f"Dask extra per dataset vs process pool (median){label}", f"{c[label]:.2f} s",
                         f"<= {TARGET_DASK_EXTRA_S} s", "met" if c[label] <= TARGET_DASK_EXTRA_S else "not met"])
    print("targets:")
    _common.print_table(rows, ["target", "measured", "goal", ""], align="llll")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=_common.HelpFormatter)
    parser.add_argument("--tiny-cells", type=int, default=3000, help="cells of the part-A dataset")
    parser.add_argument("--repeats", type=int, default=3, help="part-A and part-C repeats (median reported)")
    parser.add_argument("--repeats-b", type=int, default=1, help="part-B repeats (median reported)")
    parser.add_argument("--datasets", type=int, default=4, help="part-B datasets")
    parser.add_argument("--cells", type=int, default=3000, help="cells per part-B dataset")
    parser.add_argument("--null-jobs", type=int, default=20, help="part-C datasets")
    parser.add_argument("--baseline", type=Path, help="another checkout to compare with (the 'before')")
    parser.add_argument("--out", type=Path, default=_common.DEFAULT_DATA, help="dataset cache (scale_data.py)")
    parser.add_argument("--keep", action="store_true", help="keep the run folders (printed)")
    parser.add_argument("--skip-a", action="store_true")
    parser.add_argument("--skip-b", action="store_true")
    parser.add_argument("--skip-c", action="store_true")
    parser.add_argument("--_child", choices=["direct", "execute", "dask-vs-pool"], help=argparse.SUPPRESS)
    parser.add_argument("--_job", help=argparse.SUPPRESS)
    parser.add_argument("--_root", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args._child:
        if args._root:  # the package of the checkout under test, ahead of this one
            sys.path.insert(0, str(args._root.resolve()))
        return _child(args._child, args._job, args)

    import scale_data

    _common.print_machine()
    print(f"load average at start: {', '.join(f'{x:.2f}' for x in os.getloadavg())}\n")
    trees = {"": _common.ROOT}
    if args.baseline:
        trees[" (before)"] = args.baseline.resolve()
    tmp = Path(tempfile.mkdtemp(prefix="batch_overhead_"))
    tiny = scale_data.dataset_path(args.tiny_cells, out=args.out, seed=7)
    a = part_a(tmp, tiny, args.repeats, trees) if not args.skip_a else {}
    b = part_b(tmp, args.out, args.datasets, args.cells, args.repeats_b, trees) if not args.skip_b else {}
    c = part_c(tmp, args.null_jobs, args.repeats, trees) if not args.skip_c else {}
    print(f"load average at end: {', '.join(f'{x:.2f}' for x in os.getloadavg())}\n")
    print_targets(a, b, c, trees)
    if args.keep:
        print(f"run folders kept in {tmp}")
    else:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
