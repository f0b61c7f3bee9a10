"""The on-disk response cache of the LLM client, and what each endpoint+model refused before.

Only answers that passed the caller's checks are stored (the client decides), so an empty or
unreadable reply is asked again on the next run. Entries are keyed by endpoint, model, messages and
response format; the API key is never part of a key nor of an entry.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from pathlib import Path

from cassia_helpers.files import write_json

CAPABILITIES_FILE = "capabilities.json"


def default_cache_dir() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(root) / "cassia-batch" / "llm"


class ResponseCache:
    """Cached replies under ``directory/<2 hex>/<sha256>.json``; ``enabled=False`` reads and writes nothing."""

    def __init__(self, directory: str | Path | None, *, endpoint: str, model: str, enabled: bool = True) -> None:
        self.directory = Path(directory) if directory else default_cache_dir()
        self.endpoint, self.model, self.enabled = endpoint, model, enabled
        self._lock = threading.Lock()
        self._capabilities = self._load_capabilities()

    def key(self, messages: list[dict], response_format: dict | None, *, temperature: float = 0.0,
            seed: int = 0) -> str:
        material = json.dumps({"endpoint": self.endpoint, "model": self.model, "messages": messages,
                               "temperature": temperature, "seed": seed, "response_format": response_format},
                              sort_keys=True)
        return hashlib.sha256(material.encode("utf-8")).hexdigest()

    def _path(self, key: str) -> Path:
        return self.directory / key[:2] / f"{key}.json"

    def get(self, key: str) -> dict | None:
        if not self.enabled:
            return None
        try:
            entry = json.loads(self._path(key).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        if not isinstance(entry, dict) or not str(entry.get("content") or "").strip():
            return None  # an empty answer (written by an older version) is no answer
        return entry

    def put(self, key: str, *, content: str, usage: tuple[int, int], system_fingerprint: str = "") -> None:
        if self.enabled:
            write_json(self._path(key), {"model": self.model, "endpoint": self.endpoint, "content": content,
                                         "usage": list(usage), "system_fingerprint": system_fingerprint})

    # what this endpoint+model refused before (seed, temperature, max_tokens, json_schema, json_object)
    def _capability_key(self) -> str:
        return f"{self.endpoint}|{self.model}"

    def _load_capabilities(self) -> dict:
        try:
            data = json.loads((self.directory / CAPABILITIES_FILE).read_text(encoding="utf-8"))
            return dict(data.get(self._capability_key(), {}))
        except (OSError, ValueError, AttributeError):
            return {}

    def supports(self, feature: str) -> bool:
        with self._lock:
            return self._capabilities.get(feature, True)

    def mark_unsupported(self, feature: str) -> None:
        with self._lock:
            self._capabilities[feature] = False
            if not self.enabled:
                return
            path = self.directory / CAPABILITIES_FILE
            try:
                data = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                data = {}
            data[self._capability_key()] = dict(self._capabilities)
            write_json(path, data)
