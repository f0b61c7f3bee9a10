#!/usr/bin/env python
"""Papermill/batch overhead per dataset, and ``--workers 1`` vs ``--workers 2``.

Part A — overhead on one tiny dataset (``--tiny-cells``, default 3,000 synthetic PBMC cells from
``scale_data.py``), offline reference annotator, same outputs in every variant:

* ``run_batch.py``: ``python run_batch.py --workers 1 --annotator reference`` (driver process, one worker
  process, papermill + a Jupyter kernel for the dataset, then the aggregation notebook in a second kernel);
* ``execute_dataset``: ``cassia_helpers.worker.execute_dataset`` in a fresh process (papermill + kernel
  for the dataset only; no driver, no aggregation);
* ``direct (cold)``: the template's code cells executed with ``exec`` in a fresh process — the same
  helper calls and outputs without papermill or a kernel (python start and imports included);
* ``direct (warm)``: the same code run a second time in that process (imports and numba JIT already
  paid) — the pure per-dataset compute.

``overhead vs direct cold`` is what papermill/kernel/driver add per dataset on top of doing the same
work in a plain Python process. Part A runs every variant ``--repeats`` times (default 3) and prints
the minimum (steady state) and the median; the first repeat also pays one-off cache filling.

Part B — four equal datasets (``--datasets`` × ``--cells``, default 4 × 3,000 cells, different seeds) in
``{data}/blood/``, ``run_batch.py --annotator reference`` with ``--workers 1`` and ``--workers 2``:
wall time, per-dataset time (from the ``*_status.json`` files), speed-up, and peak memory of the whole
process tree (sum of RSS over the driver and all its descendants, polled every 0.2 s).

The annotator is ``--annotator reference`` (the offline one), so no request leaves the machine.

Usage::

    python bench/batch_overhead.py
    python bench/batch_overhead.py --tiny-cells 700 --repeats 3 --datasets 4 --cells 3000
"""

from __future__ import annotations

import argparse
import json
import os
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


def timed_run(cmd: list[str], *, cwd: Path, log: Path) -> dict:
    env = dict(os.environ)
    env.pop("OPENAI_BASE_URL", None)
    env.pop("OPENAI_API_KEY", None)
    start = time.perf_counter()
    with open(log, "w") as handle:
        proc = subprocess.Popen(cmd, cwd=cwd, stdout=handle, stderr=subprocess.STDOUT, env=env)
        poll = TreeRSS(proc.pid)
        rc = proc.wait()
        poll.stop()
    return {"wall": time.perf_counter() - start, "rc": rc, "peak_tree": poll.peak, "log": str(log)}


def statuses(run_root: Path) -> list[dict]:
    out = []
    for path in sorted(run_root.rglob("*_status.json")):
        try:
            out.append(json.loads(path.read_text()))
        except (OSError, ValueError):
            pass
    return out


def template_code() -> list[str]:
    from cassia_helpers.worker import template_path

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


def _child(mode: str, params_file: str) -> int:
    job = json.loads(Path(params_file).read_text())
    if mode == "direct":
        cold = direct(job["cold"])
        warm = direct(job["warm"])
        print(json.dumps({"cold_inner": cold, "warm": warm}))
        return 0
    from cassia_helpers.worker import execute_dataset

    start = time.perf_counter()
    record = execute_dataset(job["cold"])
    print(json.dumps({"inner": time.perf_counter() - start, "status": record["status"], "error": record["error"]}))
    return 0


def _last_json(log: str) -> dict:
    for line in reversed(Path(log).read_text().splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    return {}


def part_a(work: Path, tiny: Path, repeats: int) -> None:
    py = sys.executable
    results: dict[str, list[float]] = {k: [] for k in ("run_batch.py", "execute_dataset", "direct (cold)",
                                                         "direct (warm)")}
    extra: dict[str, list] = {"status": [], "dataset_s": [], "kernel_steps": []}
    peaks: dict[str, int] = {}
    data_dir = work / "tiny_data"
    (data_dir / "blood").mkdir(parents=True, exist_ok=True)
    link = data_dir / "blood" / "tiny.h5ad"
    if not link.exists():
        link.symlink_to(tiny.resolve())
    for r in range(repeats):
        print(f"part A repeat {r + 1}/{repeats} ...", flush=True)
        out = work / f"rb_{r}"
        res = timed_run([py, str(_common.ROOT / "run_batch.py"), "--data-dir", str(data_dir), "--tissues", "blood",
                         "--output-dir", str(out), "--workers", "1", "--annotator", "reference"],
                        cwd=_common.ROOT, log=work / f"rb_{r}.log")
        results["run_batch.py"].append(res["wall"])
        peaks["run_batch.py"] = max(peaks.get("run_batch.py", 0), res["peak_tree"])
        st = statuses(out)
        extra["status"] += [s["status"] + (f" ({s['error'][:80]})" if s["error"] else "") for s in st]
        extra["dataset_s"] += [s["duration_s"] for s in st]
        for rj in out.rglob("*_result.json"):
            extra["kernel_steps"].append(json.loads(rj.read_text()).get("timings", {}))

        job = work / f"job_{r}.json"
        job.write_text(json.dumps({
            "cold": dataset_params(link, work / f"ed_{r}", "tiny"),
            "warm": dataset_params(link, work / f"dw_{r}", "tiny"),
        }, default=str))
        res = timed_run([py, __file__, "--_child", "execute", "--_job", str(job)], cwd=work,
                        log=work / f"ed_{r}.log")
        results["execute_dataset"].append(res["wall"])
        peaks["execute_dataset"] = max(peaks.get("execute_dataset", 0), res["peak_tree"])
        info = _last_json(res["log"])
        extra["status"].append(f"execute_dataset: {info.get('status')} {info.get('error', '')[:80]}".strip())

        job.write_text(json.dumps({
            "cold": dataset_params(link, work / f"dc_{r}", "tiny"),
            "warm": dataset_params(link, work / f"dw_{r}", "tiny"),
        }, default=str))
        res = timed_run([py, __file__, "--_child", "direct", "--_job", str(job)], cwd=work,
                        log=work / f"dc_{r}.log")
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
    if extra["dataset_s"]:
        print(f"run_batch.py: dataset status duration (worker's execute_dataset) median "
              f"{statistics.median(extra['dataset_s']):.1f} s; the rest of the run_batch.py wall is driver start, "
              f"discovery and the aggregation notebook")
    if extra["kernel_steps"]:
        steps = extra["kernel_steps"][-1]
        print("steps inside the kernel (uns timings, last run): " + ", ".join(f"{k} {v:.2f}" for k, v in steps.items()))
    print("peak RSS of the process tree (GiB): " + ", ".join(f"{k} {_common.gib(v):.2f}" for k, v in peaks.items()))
    print("statuses: " + "; ".join(sorted(set(extra["status"]))))
    print()


def part_b(work: Path, data_root: Path, n_datasets: int, cells: int) -> None:
    import scale_data

    data_dir = work / "batch_data"
    (data_dir / "blood").mkdir(parents=True, exist_ok=True)
    for i in range(n_datasets):
        src = scale_data.dataset_path(cells, out=data_root, seed=100 + i)
        link = data_dir / "blood" / f"pbmcmix{cells}_s{i}.h5ad"
        if not link.exists():
            link.symlink_to(src.resolve())
    rows = []
    walls = {}
    for workers in (1, 2):
        print(f"part B --workers {workers} ...", flush=True)
        out = work / f"batch_w{workers}"
        res = timed_run([sys.executable, str(_common.ROOT / "run_batch.py"), "--data-dir", str(data_dir),
                         "--tissues", "blood", "--output-dir", str(out), "--workers", str(workers),
                         "--annotator", "reference"], cwd=_common.ROOT, log=work / f"batch_w{workers}.log")
        st = statuses(out)
        ok = sum(s["status"] == "success" for s in st)
        durs = [s["duration_s"] for s in st]
        walls[workers] = res["wall"]
        errors = sorted({s["error"][:100] for s in st if s["error"]})
        rows.append([workers, res["wall"], res["wall"] / max(1, len(st)), statistics.median(durs) if durs else "-",
                     f"{ok}/{len(st)}", _common.gib(res["peak_tree"]), "; ".join(errors) or "-"])
    print()
    _common.print_table(rows, ["workers", "wall s", "wall s/dataset", "median dataset s", "success",
                               "peak tree RSS GiB", "errors"])
    print(f"speed-up --workers 2 vs 1: {walls[1] / walls[2]:.2f}x on {n_datasets} x {cells:,}-cell datasets\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=_common.HelpFormatter)
    parser.add_argument("--tiny-cells", type=int, default=3000, help="cells of the part-A dataset")
    parser.add_argument("--repeats", type=int, default=3, help="part-A repeats (median reported)")
    parser.add_argument("--datasets", type=int, default=4, help="part-B datasets")
    parser.add_argument("--cells", type=int, default=3000, help="cells per part-B dataset")
    parser.add_argument("--out", type=Path, default=_common.DEFAULT_DATA, help="dataset cache (scale_data.py)")
    parser.add_argument("--keep", action="store_true", help="keep the run folders (printed)")
    parser.add_argument("--skip-a", action="store_true")
    parser.add_argument("--skip-b", action="store_true")
    parser.add_argument("--_child", choices=["direct", "execute"], help=argparse.SUPPRESS)
    parser.add_argument("--_job", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args._child:
        return _child(args._child, args._job)

    import scale_data

    _common.print_machine()
    tmp = Path(tempfile.mkdtemp(prefix="batch_overhead_"))
    tiny = scale_data.dataset_path(args.tiny_cells, out=args.out, seed=7)
    if not args.skip_a:
        part_a(tmp, tiny, args.repeats)
    if not args.skip_b:
        part_b(tmp, args.out, args.datasets, args.cells)
    if args.keep:
        print(f"run folders kept in {tmp}")
    else:
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
