"""One real batch workspace, built once per test session, for the tests that only read its outputs
(test_end_to_end.py and test_llm_batch.py).

``root/data`` holds brain and breast datasets (three good, four broken inputs) and two blood datasets.
``root/batch_results`` receives three runs:

- ``run_brain_breast_*``: the offline (reference annotator) batch of brain and breast, two workers;
- ``run_blood_*``: the LLM batch of blood against the scripted server, two workers, known prices;
- ``run_blood_*`` (later): the same LLM batch again, every answer from the cache.

Every real ``run_batch.py`` costs kernel start-ups and an aggregation notebook, so the runs are shared: under
pytest-xdist the first worker that asks builds them into the session's shared temporary folder while holding
a file lock, and writes what the tests need to know about the runs (exit codes, output, what the server saw)
to ``record.json``; the other worker waits for the lock and reads the record. Tests that change files copy
what they change first.
"""

from __future__ import annotations

import fcntl
import json
import os
import subprocess
import sys
import traceback
from dataclasses import dataclass
from pathlib import Path

from tests.conftest import API_KEY, REPO
from tests.scripted_llm_server import ScriptedLLMServer
from tests.synthetic import BLOOD_TYPES, BRAIN_TYPES, BREAST_TYPES, make_counts, write

# braces, quotes, spaces and unicode in a name must work end to end (papermill formats paths with braces)
ODD_NAME = "Data_Choudhury2022 {v2} 'Brain' ü"
GOOD = {
    ("brain", ODD_NAME),
    ("brain", "Data_Filbin2018_Brain"),
    ("breast", "Data_Bassez2021_Breast"),
}
LLM_DATASETS = ("Data_One_Blood", "Data_Two_Blood")
PRICE_IN, PRICE_OUT = 0.5, 1.5


def offline_env() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("OPENAI_API_KEY", "OPENAI_BASE_URL")}
    env["PYTHONPATH"] = str(REPO)
    return env


def run_cli(args: list[str], cwd: Path, script: str = "run_batch.py",
            env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / script), *args], cwd=cwd, env=env or offline_env(),
                          capture_output=True, text=True, timeout=600)


def write_data(data: Path) -> None:
    write(make_counts(400, cell_types=BRAIN_TYPES, seed=1), data / "brain" / "Data_Filbin2018_Brain.h5ad")
    write(make_counts(350, cell_types=BRAIN_TYPES, seed=2), data / "brain" / f"{ODD_NAME}.h5ad")
    write(make_counts(300, cell_types=BREAST_TYPES, seed=3), data / "breast" / "Data_Bassez2021_Breast.h5ad")
    (data / "brain" / "Data_Text_Brain.h5ad").write_text("gene,cell\nGFAP,3\n")
    good = (data / "brain" / "Data_Filbin2018_Brain.h5ad").read_bytes()
    (data / "breast" / "Data_Truncated_Breast.h5ad").write_bytes(good[: len(good) // 2])
    (data / "breast" / "Data_Empty_Breast.h5ad").write_bytes(b"")
    write(make_counts(300, cell_types=BREAST_TYPES, seed=6)[:0].copy(), data / "breast" / "Data_NoCells_Breast.h5ad")
    write(make_counts(300, cell_types=BLOOD_TYPES, seed=11), data / "blood" / "Data_One_Blood.h5ad")
    write(make_counts(260, cell_types=BLOOD_TYPES, seed=12), data / "blood" / "Data_Two_Blood.h5ad")


def _outcome(result: subprocess.CompletedProcess) -> dict:
    return {"returncode": result.returncode, "stdout": result.stdout, "stderr": result.stderr}


def build(root: Path) -> dict:
    """Write the data and run the three batches; return what the tests need to know about them."""
    write_data(root / "data")
    (root / "prices.json").write_text(json.dumps({"scripted-model": {"input": PRICE_IN, "output": PRICE_OUT}}))
    multi = run_cli(["--tissues", "brain", "breast", "--workers", "2"], cwd=root)
    llm_args = ["--tissues", "blood", "--model", "scripted-model", "--cache-dir", str(root / "cache"),
                "--price-file", str(root / "prices.json")]
    with ScriptedLLMServer(expected_api_key=API_KEY) as server:
        env = dict(offline_env(), OPENAI_API_KEY=API_KEY, OPENAI_BASE_URL=server.base_url)
        llm = run_cli([*llm_args, "--workers", "2"], cwd=root, env=env)
        llm_stats = server.stats()
        # the key reached the server (recorded as a yes/no: the key itself is written nowhere)
        authorization_was_the_key = bool(server.headers_seen) and \
            server.headers_seen[0].get("Authorization") == f"Bearer {API_KEY}"
        server.reset_stats()
        rerun = run_cli(llm_args, cwd=root, env=env)
        rerun_stats = server.stats()
        base_url = server.base_url
    return {"multi": _outcome(multi), "llm": _outcome(llm), "llm_rerun": _outcome(rerun),
            "llm_stats": llm_stats, "llm_rerun_stats": rerun_stats, "base_url": base_url,
            "authorization_was_the_key": authorization_was_the_key}


@dataclass(frozen=True)
class SharedBatch:
    root: Path
    record: dict

    @property
    def results(self) -> Path:
        return self.root / "batch_results"

    def outcome(self, name: str) -> dict:
        """``returncode``, ``stdout`` and ``stderr`` of run ``multi``, ``llm`` or ``llm_rerun``."""
        return self.record[name]

    def runs(self) -> dict[str, Path]:
        """The run folders by the name of their batch."""
        multi = sorted(self.results.glob("run_brain_breast_*"))
        blood = sorted(self.results.glob("run_blood_*"))  # the timestamp in the name orders them
        found = {"multi": multi[-1] if multi else None}
        found.update(zip(("llm", "llm_rerun"), blood, strict=False))
        return found


def shared_batch(folder: Path) -> SharedBatch:
    """The workspace in ``folder``: built by the first caller (process) that takes the lock, read by the rest."""
    folder.mkdir(parents=True, exist_ok=True)
    record_path = folder / "record.json"
    with open(folder.parent / f"{folder.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not record_path.exists():
            try:
                record = build(folder)
            except BaseException:
                record_path.write_text(json.dumps({"build_error": traceback.format_exc()}))
                raise
            record_path.write_text(json.dumps(record))
        record = json.loads(record_path.read_text())
    if "build_error" in record:
        raise RuntimeError(f"building the shared batch failed:\n{record['build_error']}")
    return SharedBatch(folder, record)
