"""A whole batch with the LLM annotator against the scripted server: exact token accounting, labels in
obs, CASSIA outputs, a cached rerun with zero requests, faults survived, an unknown price flagged, and the key
written nowhere. The first batch and its cached rerun are the session's shared batch (tests/shared_batch.py)."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import anndata as ad
import pandas as pd
import pytest

from cassia_helpers.dataset.cassia_format import CASSIA_COLUMNS
from tests.conftest import API_KEY, REPO
from tests.shared_batch import PRICE_IN, PRICE_OUT
from tests.synthetic import BLOOD_TYPES, make_counts, write


@pytest.fixture
def blood_data(tmp_path) -> Path:
    data = tmp_path / "data"
    write(make_counts(300, cell_types=BLOOD_TYPES, seed=11), data / "blood" / "Data_One_Blood.h5ad")
    write(make_counts(260, cell_types=BLOOD_TYPES, seed=12), data / "blood" / "Data_Two_Blood.h5ad")
    (tmp_path / "prices.json").write_text(json.dumps({"scripted-model": {"input": PRICE_IN, "output": PRICE_OUT}}))
    return data


def run_llm_batch(tmp_path: Path, *extra: str, output: str = "out") -> tuple[subprocess.CompletedProcess, Path]:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    result = subprocess.run(
        [sys.executable, str(REPO / "run_batch.py"), "--data-dir", str(tmp_path / "data"), "--tissues", "blood",
         "--output-dir", str(tmp_path / output), "--model", "scripted-model", "--cache-dir",
         str(tmp_path / "cache"), "--price-file", str(tmp_path / "prices.json"), *extra],
        env=env, capture_output=True, text=True, timeout=600,
    )
    runs = sorted((tmp_path / output).glob("run_*"))
    return result, runs[-1] if runs else tmp_path


@pytest.mark.slow  # the first test of the file: it may be the one that builds the shared batch
def test_llm_batch_accounts_every_token_and_leaks_no_key(shared_batch):
    result, run = shared_batch.outcome("llm"), shared_batch.runs()["llm"]
    assert result["returncode"] == 0, result["stderr"]
    stats = shared_batch.record["llm_stats"]  # what the server counted during this run
    tracking = json.loads((run / "token_tracking.json").read_text())
    assert tracking["total_calls"] == stats["requests"] == len(tracking["api_calls"]) > 0
    assert tracking["total_input_tokens"] == stats["prompt_tokens"]
    assert tracking["total_output_tokens"] == stats["completion_tokens"]
    assert tracking["total_tokens"] == stats["prompt_tokens"] + stats["completion_tokens"]
    expected_cost = (stats["prompt_tokens"] * PRICE_IN + stats["completion_tokens"] * PRICE_OUT) / 1e6
    assert tracking["total_cost"] == pytest.approx(expected_cost, rel=1e-6)
    assert set(tracking["by_dataset"]) == {"blood/Data_One_Blood", "blood/Data_Two_Blood"}
    assert tracking["by_model"]["scripted-model"]["price_known"] is True
    for call in tracking["api_calls"]:
        assert {"timestamp", "input_tokens", "output_tokens", "cost", "dataset", "cluster", "agent"} <= set(call)

    folder = run / "blood" / "Data_One_Blood"
    adata = ad.read_h5ad(folder / "Data_One_Blood_annotated.h5ad")
    for truth, label in {"T cell": "T cell", "B cell": "B cell", "Monocyte": "Monocyte"}.items():
        called = adata.obs.loc[adata.obs["truth"] == truth, "cell_type"].value_counts().index[0]
        assert label in called
    assert {"cell_type_sub", "cell_type_mixed", "cell_type_confidence"} <= set(adata.obs.columns)
    provenance = adata.uns["cassia_batch"]["annotation"]["provenance"]
    assert provenance["model"] == "scripted-model" and provenance["system_fingerprint"] == "fp_scripted"
    assert provenance["endpoint_host"] == shared_batch.record["base_url"]
    cassia = pd.read_csv(folder / "Data_One_Blood_cassia.csv")
    assert list(cassia.columns) == CASSIA_COLUMNS
    assert set(cassia["Cluster ID"].astype(str)) == set(adata.obs["leiden"].astype(str))
    text = (folder / "Data_One_Blood_annotation.txt").read_text()
    assert "--- annotator (round 1) ---" in text and "--- validator (round 1) ---" in text and "tokens:" in text
    summary = (run / "batch_summary.txt").read_text()
    assert f"Total tokens: {tracking['total_tokens']:,}" in summary and "model scripted-model" in summary

    # the key went to the server, and nowhere else
    assert shared_batch.record["authorization_was_the_key"]
    rerun = shared_batch.runs()["llm_rerun"]
    scanned = [p for root in (run, rerun, shared_batch.root / "cache") for p in root.rglob("*") if p.is_file()]
    assert len(scanned) > 20
    for path in scanned:
        assert API_KEY.encode() not in path.read_bytes(), path
    for name in ("llm", "llm_rerun"):
        assert API_KEY not in shared_batch.outcome(name)["stdout"] + shared_batch.outcome(name)["stderr"]

    # a run folder is shared with the lab: every file, the hidden state files too, follows the umask
    umask = os.umask(0)
    os.umask(umask)
    modes = {p.relative_to(run): stat.S_IMODE(p.stat().st_mode) for p in run.rglob("*") if p.is_file()}
    assert {p: oct(m) for p, m in modes.items() if m != 0o666 & ~umask} == {}

    # same inputs again: everything from the cache, zero requests, an honest zero in the ledger
    again = shared_batch.outcome("llm_rerun")
    assert again["returncode"] == 0, again["stderr"]
    assert rerun != run and shared_batch.record["llm_rerun_stats"]["requests"] == 0
    tracking = json.loads((rerun / "token_tracking.json").read_text())
    assert tracking["total_calls"] == 0 and tracking["total_cost"] == 0 and tracking["cache_hits"] > 0
    text = (rerun / "batch_summary.txt").read_text()
    assert f"API calls: 0 (0 failed); answers reused from the cache, not sent: {tracking['cache_hits']}" in text


@pytest.mark.slow
def test_misbehaving_server_and_unknown_price(llm_env, blood_data, tmp_path):
    """A server that answers 429, 500 and garbage, for a model whose price is unknown: every dataset still
    succeeds, every attempt is accounted for, and the cost is flagged as unknown, never silently free."""
    (tmp_path / "prices.json").write_text("{}")
    llm_env.fault_rates(p429=0.15, p500=0.15, p_garbage=0.2)
    result, run = run_llm_batch(tmp_path, "--workers", "2", "--no-cache")
    assert result.returncode == 0, result.stderr
    summary = pd.read_csv(run / "batch_summary.csv")
    assert (summary["status"] == "success").all()
    tracking = json.loads((run / "token_tracking.json").read_text())
    stats = llm_env.stats()
    assert tracking["total_calls"] == stats["requests"]
    assert tracking["failed_calls"] == stats["errors"] > 0
    assert tracking["total_input_tokens"] == stats["prompt_tokens"]
    for dataset in ("Data_One_Blood", "Data_Two_Blood"):
        adata = ad.read_h5ad(run / "blood" / dataset / f"{dataset}_annotated.h5ad")
        table = adata.uns["cassia_batch"]["annotation"]["clusters"]
        assert adata.obs["cell_type"].notna().all()
        unknown = table[table["status"] != "ok"]
        assert (unknown["reason"].str.len() > 0).all()
    # the unknown price
    assert tracking["unknown_price_models"] == ["scripted-model"] and tracking["total_cost"] == 0
    assert tracking["by_model"]["scripted-model"]["price_known"] is False
    assert "no known price for scripted-model" in (run / "batch_summary.txt").read_text()
