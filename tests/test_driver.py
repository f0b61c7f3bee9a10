"""The driver's scheduling, statuses, resume, interrupts and lock, with a fast fake launcher in place of
the real notebook runs (the real ones are covered end to end in test_end_to_end and test_reliability)."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import pandas as pd
import pytest

from cassia_helpers.batch.driver import _batch
from cassia_helpers.contract import (
    FAILED,
    SUCCESS,
    DatasetPaths,
    input_fingerprint,
    now_iso,
    read_status,
    write_status,
)
from cassia_helpers.settings import Settings, UsageError
from cassia_helpers.summary.aggregate import write_run_summaries
from tests.conftest import REPO
from tests.synthetic import make_counts, write


def summaries_only(run_dir: Path, kernel_name: str) -> None:
    write_run_summaries(run_dir)


# the driver's own logic: summaries without the aggregation notebook, datasets in threads of this process
FAST = {"aggregate": summaries_only, "in_process": True}


def run_batch(settings: Settings, *, launcher, aggregate=None, in_process: bool = False):
    """``run_batch`` with the driver's test seam: the launcher in threads of this process (``in_process``)."""
    return _batch(settings, launcher, aggregate, in_process=in_process)


class FakeLauncher:
    """Records each job and writes the status a real worker would, after ``delay`` seconds."""

    def __init__(self, *, delay: float = 0.0, fail: tuple[str, ...] = (), on_start=None) -> None:
        self.jobs: list[dict] = []
        self.delay, self.fail, self.on_start = delay, fail, on_start
        self.running = self.most_at_once = 0
        self._lock = threading.Lock()

    def __call__(self, job: dict, should_stop) -> dict:
        parameters = job["parameters"]
        with self._lock:
            self.jobs.append(job)
            self.running += 1
            self.most_at_once = max(self.most_at_once, self.running)
        if self.on_start:
            self.on_start(parameters["dataset"])
        paths = DatasetPaths(Path(parameters["run_dir"]), parameters["tissue"], parameters["dataset"])
        started_at = now_iso()
        try:
            deadline = time.monotonic() + self.delay
            while time.monotonic() < deadline:
                if should_stop():
                    return write_status(paths, "interrupted", error="interrupted by the user")
                time.sleep(0.01)
            if parameters["dataset"] in self.fail:
                return write_status(paths, FAILED, error=f"{parameters['input_path']}: broken", error_type="X")
            write_outputs(paths)
            return write_status(paths, SUCCESS, duration=self.delay, started_at=started_at)
        finally:
            with self._lock:
                self.running -= 1


def write_outputs(paths: DatasetPaths) -> None:
    """Small but complete contract files, as a real worker leaves them (``--resume`` checks them)."""
    import anndata as ad

    ad.AnnData(obs=pd.DataFrame(index=["c0", "c1"]), var=pd.DataFrame(index=["g0"])).write_h5ad(
        paths.annotated_h5ad)
    paths.markers_csv.write_text("cluster,gene\n0,g0\n")
    paths.clusters_csv.write_text("cluster,cell_type\n0,T cell\n")
    for text in (paths.annotation_txt, paths.summary_txt):
        text.write_text("done\n")
    paths.result_json.write_text(json.dumps({"dataset": paths.dataset, "tissue": paths.tissue, "n_cells": 2,
                                             "n_genes": 1}))


@pytest.fixture
def data(tmp_path) -> Path:
    for i, name in enumerate(("A", "B {x} \u00fc", "C")):
        write(make_counts(60, seed=i, n_background=30), tmp_path / "data" / "blood" / f"{name}.h5ad")
    (tmp_path / "data" / "blood" / "not_h5ad.h5ad").write_text("a text file, not HDF5")
    (tmp_path / "data" / "blood" / "packed.h5ad.gz").write_bytes(b"\x1f\x8b")
    return tmp_path / "data"


def settings_for(tmp_path: Path, **values) -> Settings:
    return Settings(data_dir=tmp_path / "data", tissues=["blood"], output_dir=tmp_path / "out",
                    annotator="reference", **values)


def test_statuses_exit_code_and_summaries(data, tmp_path, caplog):
    launcher = FakeLauncher(fail=("C",))
    caplog.set_level("INFO", logger="cassia_helpers")
    result = run_batch(settings_for(tmp_path, workers=2), launcher=launcher, **FAST)
    assert result.exit_code == 1
    assert result.statuses == {("blood", "A"): SUCCESS, ("blood", "B {x} \u00fc"): SUCCESS, ("blood", "C"): FAILED,
                               ("blood", "not_h5ad"): FAILED}
    # the text file is rejected from its header: no worker is ever started for it
    assert sorted(j["parameters"]["dataset"] for j in launcher.jobs) == ["A", "B {x} \u00fc", "C"]
    rejected = read_status(DatasetPaths(result.run_dir, "blood", "not_h5ad"))
    assert rejected["error_type"] == "InputError" and "not an HDF5/h5ad file" in rejected["error"]
    assert rejected["input_file"]["size"] > 0
    summary = pd.read_csv(result.run_dir / "batch_summary.csv").set_index("dataset")
    assert summary.loc["C", "status"] == "failed" and summary.loc["C", "error"].endswith("C.h5ad: broken")
    assert "packed.h5ad.gz: skipped: compressed h5ad" in caplog.text
    assert (f"Once their cause is fixed, python run_batch.py --resume {result.run_dir} --workers 2 runs the failed"
            in caplog.text)
    manifest = json.loads((result.run_dir / "run_manifest.json").read_text())
    assert any("packed.h5ad.gz" in line for line in manifest["skipped_inputs"])
    # and the summary a colleague reads later says so too, not only the terminal
    text = (result.run_dir / "batch_summary.txt").read_text()
    assert any(line.startswith("  not run") and "packed.h5ad.gz: skipped: compressed h5ad" in line
               for line in text.splitlines())


def test_only_changed_settings_reach_the_notebook_and_never_a_key(data, tmp_path, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-never-a-parameter")
    launcher = FakeLauncher()
    run_batch(settings_for(tmp_path, resolution=0.6, n_pcs=30), launcher=launcher, **FAST)
    parameters = launcher.jobs[0]["parameters"]
    assert set(parameters) == {"dataset", "tissue", "input_path", "run_dir", "annotator", "resolution", "n_pcs"}
    assert parameters["resolution"] == 0.6 and "sk-never" not in json.dumps(launcher.jobs)


def test_resume_does_not_replay_the_interrupted_sessions_progress(data, tmp_path):
    import logging

    first = run_batch(settings_for(tmp_path), launcher=FakeLauncher(fail=("C",)), **FAST)
    paths = DatasetPaths(first.run_dir, "blood", "C")
    # what the interrupted session's kernel of C had written before it stopped
    paths.progress_jsonl.write_text(json.dumps({"event": "end", "step": "qc", "seconds": 3}) + "\n")
    shown = []
    handler = logging.Handler()
    handler.emit = lambda record: shown.append(record.getMessage())
    logger = logging.getLogger("cassia_helpers")
    logger.addHandler(handler)
    level = logger.level
    logger.setLevel(logging.INFO)
    try:
        run_batch(Settings(resume=first.run_dir), launcher=FakeLauncher(delay=0.3), **FAST)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    assert not [m for m in shown if "blood/C  QC (" in m], shown


def test_workers_bound_the_datasets_running_at_once(data, tmp_path):
    launcher = FakeLauncher(delay=0.3)
    run_batch(settings_for(tmp_path, workers=2), launcher=launcher, **FAST)
    assert launcher.most_at_once == 2


def test_the_summary_keeps_the_figures_of_a_dataset_whose_annotation_failed(data, tmp_path):
    class ServerDown(FakeLauncher):
        def __call__(self, job: dict, should_stop) -> dict:
            parameters = job["parameters"]
            paths = DatasetPaths(Path(parameters["run_dir"]), parameters["tissue"], parameters["dataset"])
            started_at = now_iso()
            write_outputs(paths)  # the notebook ran to the end; the model server answered no cluster
            if parameters["dataset"] == "C":  # a result left by an earlier attempt is not this one's
                os.utime(paths.result_json, (time.time() - 60, time.time() - 60))
            return write_status(paths, FAILED, error="annotation failed for 1 of 1 clusters",
                                error_type="AnnotationFailed", started_at=started_at)

    result = run_batch(settings_for(tmp_path), launcher=ServerDown(), **FAST)
    summary = pd.read_csv(result.run_dir / "batch_summary.csv").set_index("dataset")
    assert summary.loc["A", "status"] == "failed" and summary.loc["A", "n_cells"] == 2
    assert pd.isna(summary.loc["C", "n_cells"])


def test_resume_runs_only_what_is_not_done_and_keeps_the_analysis_settings(data, tmp_path):
    first = run_batch(settings_for(tmp_path, resolution=0.7), launcher=FakeLauncher(fail=("C",)),
                      **FAST)
    notes = first.run_dir / "NOTES.txt"
    notes.write_text("pilot\n")
    again = FakeLauncher()
    resumed = run_batch(Settings(resume=first.run_dir, workers=3), launcher=again, **FAST)
    assert resumed.run_dir == first.run_dir and resumed.exit_code == 1  # the text file is still rejected
    assert [j["parameters"]["dataset"] for j in again.jobs] == ["C"]
    assert again.jobs[0]["parameters"]["resolution"] == 0.7 and again.jobs[0]["workers"] == 3
    assert notes.read_text() == "pilot\n"
    assert len(list((tmp_path / "out").iterdir())) == 1


def test_resume_runs_a_finished_dataset_again_when_its_input_changed(data, tmp_path):
    first = run_batch(settings_for(tmp_path), launcher=FakeLauncher(), **FAST)
    for name in ("A", "C"):  # as the worker records them: the input it read
        paths = DatasetPaths(first.run_dir, "blood", name)
        record = json.loads(paths.status_json.read_text())
        paths.status_json.write_text(json.dumps(
            {**record, "input_file": input_fingerprint(data / "blood" / f"{name}.h5ad")}))
    write(make_counts(90, seed=7, n_background=30), data / "blood" / "A.h5ad")  # the lab replaced its file
    DatasetPaths(first.run_dir, "blood", "B {x} \u00fc").status_json.unlink()  # and lost a status file
    again = FakeLauncher()
    run_batch(Settings(resume=first.run_dir), launcher=again, **FAST)
    assert sorted(j["parameters"]["dataset"] for j in again.jobs) == ["A", "B {x} \u00fc"]  # C ran on this file
    [aside] = (first.run_dir / "blood" / "A" / "superseded").iterdir()
    assert "its input A.h5ad changed since it ran (size and modification time)" in (aside / "REASON.txt").read_text()
    [aside] = (first.run_dir / "blood" / "B {x} \u00fc" / "superseded").iterdir()  # set aside, not overwritten
    assert "no status recorded, yet" in (aside / "REASON.txt").read_text()
    assert "Re-run on resume" in (first.run_dir / "batch_summary.txt").read_text()


def test_clusters_the_model_server_never_answered_are_said_and_asked_again_on_resume(data, tmp_path, caplog):
    class ServerDownForC(FakeLauncher):
        def __call__(self, job: dict, should_stop) -> dict:
            record = super().__call__(job, should_stop)
            paths = DatasetPaths(Path(job["parameters"]["run_dir"]), "blood", job["parameters"]["dataset"])
            if paths.dataset == "C":  # a success: most of its clusters were answered before the server went down
                paths.clusters_csv.write_text("cluster,cell_type,reason_kind\n0,T cell,\n1,B cell,\n"
                                              "2,Unknown,unreachable\n")
            if paths.dataset == "A":  # every cluster called, but the budget held back a validator's request
                paths.llm_calls_jsonl.write_text(json.dumps({"status": "budget", "agent": "validator",
                                                             "timestamp": now_iso()}) + "\n")
            return record

    caplog.set_level("WARNING", logger="cassia_helpers")
    first = run_batch(settings_for(tmp_path), launcher=ServerDownForC(), **FAST)
    assert first.statuses[("blood", "C")] == SUCCESS
    said = [r.getMessage() for r in caplog.records if "blood/C:" in r.getMessage()]
    assert said == [f"blood/C: 1 of 3 clusters got no answer from the model server (unreachable); python "
                    f"run_batch.py --resume {first.run_dir} asks for them again (the answers already given come "
                    "from the cache)"]
    assert any("blood/A: the --max-cost budget held back 1 request(s)" in r.getMessage() for r in caplog.records)
    time.sleep(1.1)  # the next attempt starts in a later second than this one's records (times are to the second)
    again = FakeLauncher()
    run_batch(Settings(resume=first.run_dir), launcher=again, **FAST)
    assert sorted(j["parameters"]["dataset"] for j in again.jobs) == ["A", "C"]
    # A's earlier files are set aside, but not its ledger: what the first session spent still counts
    ledger = DatasetPaths(first.run_dir, "blood", "A").llm_calls_jsonl
    assert '"validator"' in ledger.read_text() and not list(ledger.parent.glob("superseded/*/*_llm_calls.jsonl"))
    # the held-back request was answered in the second session: A is complete, a third session leaves it
    caplog.clear()
    third = FakeLauncher()
    run_batch(Settings(resume=first.run_dir), launcher=third, **FAST)
    assert third.jobs == [] and not any("held back" in r.getMessage() for r in caplog.records)


def test_a_dry_run_says_when_the_dask_scheduler_cannot_be_reached():
    import socket

    from cassia_helpers.batch.dry_run import where_it_runs

    with socket.socket() as free:  # a port nobody listens on
        free.bind(("127.0.0.1", 0))
        address = f"tcp://127.0.0.1:{free.getsockname()[1]}"
    lines, refused = where_it_runs(Settings(scheduler=address))
    assert not lines and refused.startswith(f"the Dask scheduler {address} cannot be reached")
    assert where_it_runs(Settings()) == ([], "")  # this machine: nothing to check


def test_the_resume_command_said_runs_where_the_run_did():
    from cassia_helpers.batch.resume import resume_command

    settings = Settings(cluster="slurm", cluster_config="slurm.yaml", slurm_queue="long", workers=4, resolution=0.8)
    assert resume_command(Path("out/run a"), settings) == ("python run_batch.py --resume 'out/run a' --workers 4 "
                                                           "--cluster slurm --cluster-config slurm.yaml "
                                                           "--slurm-queue long")
    assert resume_command(Path("out/run"), Settings()) == "python run_batch.py --resume out/run"


def test_a_resume_tries_the_model_server_again_whatever_the_last_sessions_breaker_said(data, tmp_path):
    from cassia_helpers.contract import BREAKER_FILE

    first = run_batch(settings_for(tmp_path), launcher=FakeLauncher(fail=("C",)), **FAST)
    # the server had failed when the session ended: its cool-down would hold the resume's first requests
    (first.run_dir / BREAKER_FILE).write_text(json.dumps({"failures": 6, "open_until": time.time() + 60}))
    run_batch(Settings(resume=first.run_dir), launcher=FakeLauncher(), **FAST)
    assert not (first.run_dir / BREAKER_FILE).exists()


def test_resume_may_raise_the_budget_that_stopped_the_run(data, tmp_path):
    first = run_batch(settings_for(tmp_path, max_cost=0.5), launcher=FakeLauncher(fail=("C",)), **FAST)
    again = FakeLauncher(fail=("C",))
    run_batch(Settings(resume=first.run_dir, max_cost=2.0), launcher=again, **FAST)
    assert again.jobs[0]["parameters"]["max_cost"] == 2.0
    assert json.loads((first.run_dir / "run_manifest.json").read_text())["analysis"]["max_cost"] == 2.0
    kept = FakeLauncher()  # a resume that does not say keeps the run's budget
    run_batch(Settings(resume=first.run_dir), launcher=kept, **FAST)
    assert kept.jobs[0]["parameters"]["max_cost"] == 2.0


def test_interrupt_stops_running_datasets_and_marks_the_rest(data, tmp_path):
    def press_ctrl_c(dataset: str) -> None:
        if dataset == "A":
            threading.Timer(0.2, os.kill, (os.getpid(), signal.SIGINT)).start()

    launcher = FakeLauncher(delay=5, on_start=press_ctrl_c)
    started = time.monotonic()
    result = run_batch(settings_for(tmp_path), launcher=launcher, **FAST)
    assert time.monotonic() - started < 4
    assert result.interrupted and result.exit_code == 130
    statuses = pd.read_csv(result.run_dir / "batch_summary.csv").set_index("dataset")["status"]
    assert statuses["not_h5ad"] == "failed"  # rejected from its header before anything ran
    assert statuses["A"] == "interrupted" and set(statuses.drop(["A", "not_h5ad"])) == {"interrupted"}
    assert len(launcher.jobs) == 1


def test_sighup_is_an_interrupt_too(data, tmp_path):
    def hang_up(dataset: str) -> None:
        threading.Timer(0.2, os.kill, (os.getpid(), signal.SIGHUP)).start()

    result = run_batch(settings_for(tmp_path), launcher=FakeLauncher(delay=5, on_start=hang_up),
                       **FAST)
    assert result.exit_code == 130


def test_a_second_driver_on_the_same_run_is_a_usage_error(data, tmp_path):
    inner: list[BaseException] = []

    def second_driver(dataset: str) -> None:
        if dataset == "A":
            try:
                run_batch(Settings(resume=next((tmp_path / "out").iterdir())), launcher=FakeLauncher(),
                          **FAST)
            except UsageError as exc:
                inner.append(exc)

    run_batch(settings_for(tmp_path), launcher=FakeLauncher(on_start=second_driver), **FAST)
    assert inner and "another driver is working on this run" in str(inner[0])


@pytest.mark.parametrize("damage", ["missing", "corrupt"])
def test_resume_of_a_folder_without_a_sound_manifest_is_a_usage_error(tmp_path, damage):
    run = tmp_path / "run_x"
    run.mkdir()
    if damage == "corrupt":
        (run / "run_manifest.json").write_text('{"datasets": [')
    with pytest.raises(UsageError, match="not a run folder"):
        run_batch(Settings(resume=run), launcher=FakeLauncher())


def test_an_unusable_output_folder_is_a_usage_error(data, tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(UsageError, match="cannot create the run folder"):
        run_batch(settings_for(tmp_path).replace(output_dir=tmp_path / "file" / "out"), launcher=FakeLauncher())
    with pytest.raises(UsageError, match="--output-dir is a file, not a folder"):
        run_batch(settings_for(tmp_path).replace(output_dir=tmp_path / "file"), launcher=FakeLauncher())
    with pytest.raises(UsageError, match="run folder not found"):
        run_batch(Settings(resume=tmp_path / "no_such_run"), launcher=FakeLauncher())


def test_outputs_follow_the_umask(data, tmp_path):
    old = os.umask(0o022)
    try:
        result = run_batch(settings_for(tmp_path), launcher=FakeLauncher(), **FAST)
    finally:
        os.umask(old)
    for name in ("batch_summary.csv", "batch_summary.txt", "token_tracking.json", "run_manifest.json",
                 "blood/A/A_status.json"):
        mode = stat.S_IMODE((result.run_dir / name).stat().st_mode)
        assert mode == 0o644, (name, oct(mode))


@pytest.mark.parametrize("flag, value", [("--resolution", "-1"), ("--n-pcs", "0"), ("--dataset-timeout", "-1"),
                                         ("--max-cells-per-cluster", "-1"), ("--target-sum", "0"),
                                         ("--n-markers", "-3"), ("--workers", "0"), ("--slurm-memory", "lots"),
                                         ("--slurm-walltime", "1h")])
def test_bad_settings_are_usage_errors(tmp_path, capsys, flag, value):
    from cassia_helpers.batch.cli import main

    code = main(["--data-dir", str(tmp_path), "--tissues", "all", flag, value])
    err = capsys.readouterr().err
    assert code == 2 and flag in err and "Traceback" not in err


def test_max_cost_without_a_price_is_a_usage_error(tmp_path, capsys, monkeypatch):
    from cassia_helpers.batch.cli import main

    monkeypatch.setenv("OPENAI_API_KEY", "sk-x")
    code = main(["--data-dir", str(tmp_path), "--tissues", "all", "--model", "my-local-model", "--max-cost", "1"])
    assert code == 2 and "cannot be enforced" in capsys.readouterr().err


def test_resume_makes_the_checks_a_fresh_run_makes(data, tmp_path, monkeypatch):
    """An LLM run resumed from a shell without the key is a usage error, not a run that annotates nothing."""
    monkeypatch.setenv("OPENAI_API_KEY", "sk-first-session")
    first = run_batch(settings_for(tmp_path).replace(annotator="llm"), launcher=FakeLauncher(fail=("C",)), **FAST)
    monkeypatch.delenv("OPENAI_API_KEY")
    with pytest.raises(UsageError, match="OPENAI_API_KEY"):
        run_batch(Settings(resume=first.run_dir), launcher=FakeLauncher(), **FAST)


def test_a_dataset_never_has_two_runners(tmp_path, monkeypatch):
    """A runner left by a killed driver holds the dataset's lock: a resumed run waits for it, then gives up
    with the reason instead of writing into the same folder at the same time."""
    import fcntl

    from cassia_helpers.batch import runner as worker

    paths = DatasetPaths(tmp_path / "run", "blood", "A")
    paths.folder.mkdir(parents=True)
    monkeypatch.setattr(worker, "RUNNER_WAIT_S", 1.0)
    with open(paths.folder / worker.RUNNER_LOCK, "a+") as earlier:
        fcntl.flock(earlier, fcntl.LOCK_EX)
        record = worker.run_dataset({"parameters": {"run_dir": str(paths.run_dir), "tissue": "blood", "dataset": "A",
                                                    "input_path": "missing.h5ad"}})
    assert record["status"] == "failed" and record["error_type"] == "RunnerBusy"
    assert not paths.notebook.exists()


def test_a_python_without_the_projects_packages_says_so_and_leaves_no_run_folder(data, tmp_path):
    # the system's python3 instead of the project's environment: one line naming that Python and what it
    # lacks, before any run folder is made (a left-over folder would be "the newest run" for explore_run)
    import subprocess
    import sys
    import venv

    from tests.conftest import REPO

    bare = tmp_path / "bare"
    venv.create(bare, with_pip=False)
    python = bare / "bin" / "python"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    result = subprocess.run([str(python), str(REPO / "run_batch.py"), "--data-dir", str(data), "--tissues", "all",
                             "--output-dir", str(tmp_path / "out")], capture_output=True, text=True, env=env,
                            timeout=60)
    assert sys.executable != str(python)
    assert result.returncode == 2
    error = result.stderr.strip()
    assert len(error.splitlines()) == 1 and str(python) in error and "h5py" in error and ".venv/bin/python" in error
    assert not (tmp_path / "out").exists()


def test_help_shows_the_defaults_that_say_something():
    # a default is shown where it tells the user something (1.0, 50, human), never as "None", "False" or ""
    from cassia_helpers.batch.cli import build_parser

    text = " ".join(build_parser().format_help().split())
    assert "leiden resolution (default: 1.0)" in text and "(default: human)" in text
    for noise in ("(default: None)", "(default: False)", "(default: True)", "(default: )", "(default: [])"):
        assert noise not in text


@pytest.mark.parametrize("argv, expected", [
    (["--tisues", "brain"], "unrecognized arguments: --tisues brain (did you mean --tissues?)"),
    (["--tissues", "all", "--annotator", "llmm"], "invalid choice: 'llmm'"),
    (["--tissues", "all", "--workers", "two"], "argument --workers: invalid int value: 'two'"),
])
def test_a_command_line_mistake_is_one_line(argv, expected):
    # the mistake (and the flag probably meant), not 50 lines of usage burying it
    result = subprocess.run([sys.executable, str(REPO / "run_batch.py"), *argv], capture_output=True, text=True,
                            timeout=60)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1 and expected in lines[0], result.stderr
    assert not result.stdout


@pytest.mark.parametrize("flags, phrase", [
    (["--resume", "RUN", "--resolution", "0.5"], "--resolution cannot change"),
    (["--resume", "RUN", "--tissues", "brain", "--model", "gpt-4o"], "--model, --tissues cannot change"),
    (["--input", "x.h5ad", "--tissue", "blood", "--tissues", "brain"], "not --tissues"),
    (["--tissues", "brain", "--tissue", "blood"], "--tissue NAME goes with --input FILE"),
])
def test_flags_that_would_be_ignored_are_usage_errors(tmp_path, capsys, flags, phrase):
    from cassia_helpers.batch.cli import main

    flags = [str(tmp_path) if f == "RUN" else f for f in flags]
    code = main(["--data-dir", str(tmp_path), *flags])
    err = capsys.readouterr().err
    assert code == 2 and phrase in err and len(err.strip().splitlines()) == 1, err


def test_the_runs_wall_clock_is_the_same_however_late_the_summaries_are_written(data, tmp_path):
    from cassia_helpers.summary.report import _seconds, report_context

    run = run_batch(settings_for(tmp_path), launcher=FakeLauncher(), **FAST).run_dir

    def elapsed() -> str:
        return next(line for line in (run / "batch_summary.txt").read_text().splitlines() if "Time elapsed" in line)

    first = elapsed()
    time.sleep(1.2)
    write_run_summaries(run)  # summaries written again later (a re-aggregation) say the same
    assert elapsed() == first and "wall clock, from the run's start to its last dataset" in first
    seconds = float(first.split(":", 1)[1].split("s")[0])
    assert report_context(run)["wall_time"] == _seconds(seconds)  # the report says the same


def test_a_second_ctrl_c_while_the_summaries_are_written_stops_at_once(data, tmp_path, caplog):
    def slow_summaries(run_dir: Path, kernel_name: str) -> None:
        os.kill(os.getpid(), signal.SIGINT)  # pressed as the summaries start ...
        time.sleep(0.3)
        os.kill(os.getpid(), signal.SIGINT)  # ... and again
        time.sleep(5)
        raise AssertionError("the second Ctrl-C did not stop the summaries")

    caplog.set_level("WARNING", logger="cassia_helpers")
    result = _batch(settings_for(tmp_path), FakeLauncher(), slow_summaries, in_process=True)
    assert result.exit_code == 130
    assert any(r.getMessage().startswith("Stopped at once. Resume with:") for r in caplog.records)


def test_summaries_that_could_not_be_written_fail_the_run_and_are_not_pointed_at(data, tmp_path, caplog):
    """A full disk while the run's summaries are written: the folder may hold an earlier session's, so the
    closing lines do not present them as this run's, and the exit status says something is missing."""
    def full_disk(run_dir: Path, kernel_name: str) -> str:
        summaries_only(run_dir, kernel_name)
        return "write_report: No space left on device"

    caplog.set_level("INFO", logger="cassia_helpers")
    result = _batch(settings_for(tmp_path), FakeLauncher(), full_disk, in_process=True)
    assert result.exit_code == 1 and all(s == SUCCESS for s in result.statuses.values() if s != FAILED)
    closing = next(r.getMessage() for r in caplog.records if "could not all be written" in r.getMessage())
    assert "No space left on device" in closing and "--resume writes them" in closing
    assert "Summary:" not in closing and "Report:" not in closing


def test_a_dataset_the_budget_held_back_runs_again_only_once_the_budget_is_raised(data, tmp_path, caplog):
    """Resumed with the budget it already spent, it would be held back again: it stays as it is, and the user
    is told to raise --max-cost; resumed with a higher one, it runs again."""
    class BudgetStopsA(FakeLauncher):
        def __call__(self, job: dict, should_stop) -> dict:
            record = super().__call__(job, should_stop)
            paths = DatasetPaths(Path(job["parameters"]["run_dir"]), "blood", job["parameters"]["dataset"])
            if paths.dataset == "A":  # $0.002 spent against $0.001, then a validator's request held back
                paths.llm_calls_jsonl.write_text("".join(json.dumps(r) + "\n" for r in (
                    {"status": "ok", "cost": 0.002, "call_id": "c1", "timestamp": now_iso()},
                    {"status": "budget", "agent": "validator", "timestamp": now_iso()})))
            return record

    first = run_batch(settings_for(tmp_path, max_cost=0.001), launcher=BudgetStopsA(), **FAST)
    time.sleep(1.1)  # the next attempt starts in a later second than this one's records (times are to the second)
    caplog.set_level("WARNING", logger="cassia_helpers")
    same = FakeLauncher()
    run_batch(Settings(resume=first.run_dir), launcher=same, **FAST)
    assert same.jobs == []
    assert any("blood/A: the --max-cost budget held back 1 request(s)" in r.getMessage() and "budget is spent"
               in r.getMessage() and "raises --max-cost" in r.getMessage() for r in caplog.records)
    raised = FakeLauncher()
    run_batch(Settings(resume=first.run_dir, max_cost=1.0), launcher=raised, **FAST)
    assert [j["parameters"]["dataset"] for j in raised.jobs] == ["A"]


def test_a_full_disk_stops_the_run_from_starting_more_datasets(data, tmp_path, caplog):
    """Every dataset after the first 'No space left on device' would fail the same way, one line each: none is
    started, the closing lines say why and how to resume, and the resume runs them."""
    class DiskFullAtA(FakeLauncher):
        def __call__(self, job: dict, should_stop) -> dict:
            if job["parameters"]["dataset"] != "A":
                return super().__call__(job, should_stop)
            with self._lock:
                self.jobs.append(job)
            paths = DatasetPaths(Path(job["parameters"]["run_dir"]), "blood", "A")
            return write_status(paths, FAILED, error="OSError: [Errno 28] No space left on device (notebook "
                                "cell 24)", error_type="OSError")

    caplog.set_level("WARNING", logger="cassia_helpers")
    launcher = DiskFullAtA()
    result = run_batch(settings_for(tmp_path, workers=1), launcher=launcher, **FAST)
    started = [j["parameters"]["dataset"] for j in launcher.jobs]
    assert started[-1] == "A" and result.statuses[("blood", "A")] == FAILED
    unstarted = [key for key in result.statuses if key[1] not in started and key[1] != "not_h5ad"]
    assert unstarted and all(result.statuses[key] == "interrupted" for key in unstarted), result.statuses
    said = " ".join(r.getMessage() for r in caplog.records)
    assert "No space left on the device of" in said and "no more datasets are started" in said
    assert "Stopped early: no space left on the device" in said and "--resume" in said
    assert result.exit_code == 1
    again = FakeLauncher()
    run_batch(Settings(resume=result.run_dir), launcher=again, **FAST)
    assert sorted(j["parameters"]["dataset"] for j in again.jobs) == sorted(["A", *[k[1] for k in unstarted]])
