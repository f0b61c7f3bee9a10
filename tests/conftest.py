from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.scripted_llm_server import ScriptedLLMServer

REPO = Path(__file__).resolve().parent.parent
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
