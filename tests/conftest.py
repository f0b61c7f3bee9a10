from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.scripted_llm_server import ScriptedLLMServer

REPO = Path(__file__).resolve().parent.parent
BLOOD_DATASETS = ("Data_A_Blood", "Data_B_Blood", "Data_C_Blood")
API_KEY = "sk-test-SECRET-0123456789abcdef"


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
