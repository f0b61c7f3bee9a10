from __future__ import annotations

import os
from collections import Counter
from pathlib import Path

import pytest

from tests.scripted_llm_server import ScriptedLLMServer

REPO = Path(__file__).resolve().parent.parent
BLOOD_DATASETS = ("Data_A_Blood", "Data_B_Blood", "Data_C_Blood")
API_KEY = "sk-test-SECRET-0123456789abcdef"


def pytest_configure(config):
    # pytest-xdist hands files (--dist loadfile) to its workers largest-test-count first unless told not to;
    # the order of pytest_collection_modifyitems below (slowest files first) balances the two workers better
    if hasattr(config.option, "loadscopereorder"):
        config.option.loadscopereorder = False


def pytest_collection_modifyitems(config, items):
    """Run the long files first, so that both workers finish together (each runs one file at a time).

    The first file that reads the shared batch (tests/shared_batch.py) goes first: its worker builds the
    batch while the other starts the file with the most ``slow`` tests. The other readers of the shared batch
    follow the slow files, when the batch is built, so no worker waits for it. Then the other files, in
    their usual order (the sort is stable)."""
    def file_of(item) -> str:
        return item.nodeid.split("::")[0]

    slow = Counter(file_of(item) for item in items if item.get_closest_marker("slow"))
    readers = list(dict.fromkeys(file_of(item) for item in items if "shared_batch" in item.fixturenames))

    def rank(path: str) -> tuple[int, int]:
        if readers and path == readers[0]:
            return (0, 0)
        if path in readers:
            return (2, 0)
        return (1, -slow[path]) if slow[path] else (3, 0)

    items.sort(key=lambda item: rank(file_of(item)))


@pytest.fixture(scope="session")
def shared_batch(tmp_path_factory):
    """The real batch runs shared by the tests that only read them (see tests/shared_batch.py). Under
    pytest-xdist, the worker processes share one build in the session's common temporary folder."""
    from tests.shared_batch import shared_batch

    base = tmp_path_factory.getbasetemp()
    return shared_batch((base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / "shared_batch")


@pytest.fixture
def llm_server():
    """A deterministic OpenAI-compatible server on 127.0.0.1 that insists on the test key."""
    with ScriptedLLMServer(expected_api_key=API_KEY) as server:
        yield server


@pytest.fixture
def llm_env(monkeypatch, llm_server):
    """Environment of a user who configured the scripted server (key and base URL)."""
    monkeypatch.setenv("OPENAI_API_KEY", API_KEY)
    monkeypatch.setenv("OPENAI_BASE_URL", llm_server.base_url)
    return llm_server


@pytest.fixture
def clean_env(monkeypatch):
    """No LLM configured."""
    for name in ("OPENAI_API_KEY", "OPENAI_BASE_URL", "CASSIA_MODEL"):
        monkeypatch.delenv(name, raising=False)
    return os.environ


@pytest.fixture
def blood_dir(tmp_path) -> Path:
    """``data/blood`` with three small real-looking blood datasets (:data:`BLOOD_DATASETS`)."""
    from tests.synthetic import BLOOD_TYPES, make_counts, write

    for seed, name in enumerate(BLOOD_DATASETS):
        write(make_counts(300, cell_types=BLOOD_TYPES, seed=20 + seed), tmp_path / "data" / "blood" / f"{name}.h5ad")
    return tmp_path / "data"


def llm_annotator(**arguments):
    """An LLMAnnotator from one flat set of keyword arguments: the LLM options (model, base_url, timeout, …)
    and the annotator's own (ledger_path, dataset, tissue, run_dir, species, max_rounds)."""
    from dataclasses import fields

    from cassia_helpers.dataset.annotate.agents.annotator import LLMAnnotator
    from cassia_helpers.dataset.annotate.llm.options import LLMOptions

    names = {f.name for f in fields(LLMOptions)}
    options = LLMOptions(**{k: v for k, v in arguments.items() if k in names})
    return LLMAnnotator(options, **{k: v for k, v in arguments.items() if k not in names})
