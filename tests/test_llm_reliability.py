"""A long LLM batch: Ctrl-C with honest summaries and a resume in place that repeats no request, the run-wide
request limit and rate-limit back-off held across parallel workers, and a budget that stops spending. Real
subprocesses against the scripted server (split from test_reliability.py so the two files run side by side)."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from tests.conftest import BLOOD_DATASETS as DATASETS
from tests.test_reliability import interrupt_after_first_dataset, keep_only, resume, start, status, the_run

pytestmark = pytest.mark.slow  # real batches: every test here starts run_batch.py

def llm_args(tmp_path: Path, *extra: str) -> list[str]:
    return ["--model", "scripted-model", "--cache-dir", str(tmp_path / "cache"), *extra]


def test_ctrl_c_writes_honest_summaries_and_resume_finishes_in_place_without_repeating_a_request(
        llm_env, blood_dir, tmp_path):
    llm_env.latency = 0.05
    run = interrupt_after_first_dataset(tmp_path, *llm_args(tmp_path), offline=False)
    summary = pd.read_csv(run / "batch_summary.csv").set_index("dataset")
    assert summary.loc[DATASETS[0], "status"] == "success"
    # the dataset running at Ctrl-C and the one still queued
    assert set(summary.loc[list(DATASETS[1:]), "status"]) == {"interrupted"}
    assert "Interrupted: 2" in (run / "batch_summary.txt").read_text()
    # the user documents the run; completed work must stay untouched by the resume
    (run / "NOTES.txt").write_text("pilot, resolution 1.0\n")
    first = run / "blood" / DATASETS[0] / f"{DATASETS[0]}_annotated.h5ad"
    before = first.stat().st_mtime_ns

    # the two datasets left run side by side: --workers may be given anew when resuming
    finished = resume(tmp_path, run, "--workers", "2", offline=False)
    assert finished.returncode == 0, finished.stderr
    assert finished.stdout.strip() == str(run)
    for name in DATASETS[1:]:  # each step said once, by this session: not the interrupted one's again
        steps = [line for line in finished.stderr.splitlines() if f"blood/{name}  QC (" in line]
        assert len(steps) == 1, finished.stderr
    assert list(pd.read_csv(run / "batch_summary.csv")["status"]) == ["success"] * 3
    second, third = (status(run, name) for name in DATASETS[1:])
    assert second["started_at"] < third["finished_at"] and third["started_at"] < second["finished_at"]
    assert (run / "NOTES.txt").read_text() == "pilot, resolution 1.0\n"
    assert first.stat().st_mtime_ns == before
    assert len(list((tmp_path / "out").iterdir())) == 1  # resumed in place, no new run folder
    bodies = [json.dumps(b, sort_keys=True) for b in llm_env.received]
    assert len(bodies) == len(set(bodies)), "a request was sent twice"
    tracking = json.loads((run / "token_tracking.json").read_text())
    stats = llm_env.stats()
    assert tracking["total_calls"] == stats["requests"]
    assert tracking["total_input_tokens"] == stats["prompt_tokens"]


def test_request_limit_holds_across_parallel_workers(llm_env, blood_dir, tmp_path):
    keep_only(blood_dir, 2)
    llm_env.latency = 0.1
    process = start(tmp_path, "--tissues", "blood", "--workers", "2", "--llm-concurrency", "3",
                    *llm_args(tmp_path, "--no-cache"), offline=False)
    _, err = process.communicate(timeout=600)
    assert process.returncode == 0, err
    assert 1 < llm_env.stats()["max_in_flight"] <= 3  # a limit, not serialisation


def test_rate_limit_storm_across_parallel_datasets_one_request_at_a_time(llm_env, blood_dir, tmp_path):
    keep_only(blood_dir, 2)
    llm_env.latency = 0.05
    llm_env.fail_next(12, status=429, retry_after=0.3)
    # enough attempts that the storm cannot exhaust one request, whichever dataset reaches the server first
    # (one dataset may still be clustering while the other's first request takes every 429)
    process = start(tmp_path, "--tissues", "blood", "--workers", "2", "--llm-concurrency", "1",
                    *llm_args(tmp_path, "--no-cache", "--llm-max-attempts", "13"), offline=False)
    _, err = process.communicate(timeout=600)
    assert process.returncode == 0, err
    # two datasets at once, each with requests of its own in flight, and never two requests on the server
    assert llm_env.stats()["max_in_flight"] == 1
    run = the_run(tmp_path)
    tracking = json.loads((run / "token_tracking.json").read_text())
    assert tracking["total_calls"] == llm_env.stats()["requests"]
    assert tracking["failed_calls"] == 12
    assert all("429" in c["error"] for c in tracking["api_calls"] if c["status"] == "error")


def test_budget_stops_spending_and_is_reported(llm_env, blood_dir, tmp_path):
    prices = tmp_path / "prices.json"
    prices.write_text(json.dumps({"scripted-model": {"input": 2000.0, "output": 2000.0}}))
    keep_only(blood_dir, 2)
    # one request at a time, so the budget check sees every earlier request's cost
    process = start(tmp_path, "--tissues", "blood", "--llm-concurrency", "1",
                    *llm_args(tmp_path, "--max-cost", "1.0", "--price-file", str(prices)), offline=False)
    _, err = process.communicate(timeout=600)
    # datasets left without most of their calls by the budget are failures, with the cause, never success
    assert process.returncode == 1, err
    run = the_run(tmp_path)
    summary = pd.read_csv(run / "batch_summary.csv")
    assert (summary["status"] == "failed").any() and summary["error"].str.contains("budget", na=False).any()
    tracking = json.loads((run / "token_tracking.json").read_text())
    sent = [c["cost"] for c in tracking["api_calls"]]
    assert sum(sent[:-1]) < 1.0 <= tracking["total_cost"]
    assert tracking["budget_skipped"] > 0
    text = (run / "batch_summary.txt").read_text()
    assert "Budget reached" in text
    annotation = (run / "blood" / DATASETS[1] / f"{DATASETS[1]}_annotation.txt").read_text()
    assert "[budget" in annotation and "budget of $1.00 reached" in annotation




def test_a_step_that_fails_for_most_clusters_is_a_warning_wherever_a_user_reads_and_merge_labels_are_safe(
        llm_env, blood_dir, tmp_path):
    """A scorer that never gives a score and a merger whose labels hold newlines, formulas and 300
    characters: the batch succeeds, the failed step is said on the terminal, in batch_summary.txt, the
    dataset summary and the report, and every merged label in the CSVs is one capped, formula-free line."""
    import csv

    import anndata

    from cassia_helpers.contract import DatasetPaths

    keep_only(blood_dir, 1)
    llm_env.reply_styles = {"no_score", "junk_labels"}
    process = start(tmp_path, "--tissues", "blood", "--pipeline", "full", *llm_args(tmp_path), offline=False)
    _, err = process.communicate(timeout=600)
    assert process.returncode == 0, err
    run, name = the_run(tmp_path), DATASETS[0]
    paths = DatasetPaths(run, "blood", name)
    warning = "scoring failed for "
    assert f"blood/{name}  warning: {warning}" in err
    assert f"WARNING blood/{name}: {warning}" in (run / "batch_summary.txt").read_text()
    assert warning in paths.summary_txt.read_text()
    assert warning in (run / "report.html").read_text()
    n_clusters = len(pd.read_csv(paths.clusters_csv, dtype=str, keep_default_na=False))
    stats = llm_env.stats()
    assert stats["requests"] <= 5 * n_clusters, stats
    assert "scorer" in stats["by_agent"] and "merger" in stats["by_agent"]
    # every model-provided label: one line per row, capped, no formula trigger (the ' guard is csv_safe's)
    for path, columns in ((paths.clusters_csv, ("broad", "detailed", "fine")),
                          (paths.cassia_csv, ("Merged_Grouping_1", "Merged_Grouping_2", "Merged_Grouping_3"))):
        text = path.read_text()
        assert len(text.splitlines()) == n_clusters + 1, path
        rows = list(csv.DictReader(text.splitlines()))
        for row in rows:
            for column in columns:
                value = row[column]
                assert value and len(value) <= 100 and value[0] not in "=+-@'", (path, column, value)
    obs = anndata.read_h5ad(paths.annotated_h5ad).obs
    for column in ("cell_type_broad", "cell_type_detailed", "cell_type_fine"):
        labels = set(obs[column].astype(str))
        assert all(x and "\n" not in x and len(x) <= 100 and x[0] not in "=+-@" for x in labels), (column, labels)
    validation = set(pd.read_csv(paths.clusters_csv, dtype=str, keep_default_na=False)["validation"])
    assert validation <= {"confirmed", "not confirmed", ""} and "confirmed" in validation


def test_the_shared_llm_batch_stays_within_five_requests_per_cluster_and_reports_validation(shared_batch):
    """The session's real LLM batch (default pipeline ``full``): requests per cluster within the goal, the
    cached rerun sends none, and every call says whether the validator confirmed it."""
    run = shared_batch.runs()["llm"]
    assert shared_batch.outcome("llm")["returncode"] == 0
    tables = [pd.read_csv(p, dtype=str, keep_default_na=False) for p in sorted(run.glob("blood/*/*_clusters.csv"))]
    n_clusters = sum(len(t) for t in tables)
    assert len(tables) == 2 and n_clusters > 0
    assert shared_batch.record["llm_stats"]["requests"] / n_clusters <= 5, shared_batch.record["llm_stats"]
    assert shared_batch.record["llm_rerun_stats"]["requests"] == 0
    for table in tables:
        assert set(table["validation"]) <= {"confirmed", "not confirmed"}
    unconfirmed = sum(t["validation"].eq("not confirmed").sum() for t in tables)
    results = [json.loads(p.read_text()) for p in run.glob("blood/*/*_result.json")]
    assert sum(r["unconfirmed_clusters"] for r in results) == unconfirmed
    assert f"Calls not confirmed by the validator: {unconfirmed}" in (run / "batch_summary.txt").read_text()
