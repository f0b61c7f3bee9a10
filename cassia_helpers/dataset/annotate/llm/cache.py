"""The on-disk response cache of the LLM client, and what each endpoint+model refused before.

Only answers that passed the caller's checks are stored (the client decides), so an empty or
unreadable reply is asked again on the next run. Entries are keyed by endpoint, model, messages and
response format; the API key is never part of a key nor of an entry.

The cache is a saving, never a condition of a run: a folder that cannot be written (a read-only
``$HOME`` on a compute node, a read-only ``--cache-dir``) is found before the first request
(:func:`cache_problem`) and the run goes on without the cache, with one warning; an entry that cannot be
read or is not what this version writes is ignored like a missing one.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import threading
from pathlib import Path

from cassia_helpers.files import write_json

CAPABILITIES_FILE = "capabilities.json"


def default_cache_dir() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(root) / "cassia-batch" / "llm"


def cache_problem(directory: str | Path | None) -> str:
    """Why the cache folder (``directory``, or :func:`default_cache_dir`) cannot be written, or ``""``.

    The folder is created if needed and a probe file is written and removed: permissions alone do not
    tell (a read-only mount or an immutable folder refuses even root).
    """
    folder = Path(directory) if directory else default_cache_dir()
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".write-check-") as probe:
            probe.write(b"ok")
            probe.flush()
    except OSError as exc:
        return f"{folder}: {exc.strerror or exc}"
    return ""


class ResponseCache:
    """Cached replies under ``directory/<2 hex>/<sha256>.json``; ``enabled=False`` reads and writes nothing.

    A folder that cannot be written turns the cache off at once; :attr:`warning` then says why.
    """

    def __init__(self, directory: str | Path | None, *, endpoint: str, model: str, enabled: bool = True) -> None:
        self.directory = Path(directory) if directory else default_cache_dir()
        self.endpoint, self.model, self.enabled = endpoint, model, enabled
        self.warning = ""
        self._lock = threading.Lock()
        if enabled:
            problem = cache_problem(self.directory)
            if problem:
                self._turn_off(problem)
        self._capabilities = self._load_capabilities()

    def _turn_off(self, problem: str) -> None:
        self.enabled = False
        self.warning = f"the LLM response cache cannot be written ({problem}): this dataset ran without it"

    def key(self, messages: list[dict], response_format: dict | None, *, temperature: float = 0.0,
            seed: int = 0) -> str:
        material = json.dumps({"endpoint": self.endpoint, "model": self.model, "messages": messages,
                               "temperature": temperature, "seed": seed, "response_format": response_format},
                              sort_keys=True)
        return hashlib.sha256(material.encode("utf-8")).hexdigest()

    def _path(self, key: str) -> Path:
        return self.directory / key[:2] / f"{key}.json"

    def get(self, key: str) -> dict | None:
        """The entry of ``key``, or None: missing, unreadable, or damaged (an answer that is not text)."""
        if not self.enabled:
            return None
        try:
            entry = json.loads(self._path(key).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        if not isinstance(entry, dict) or not isinstance(entry.get("content"), str) or not entry["content"].strip():
            return None  # damaged, or an empty answer (written by an older version): no answer
        fingerprint = entry.get("system_fingerprint")
        return dict(entry, system_fingerprint=fingerprint if isinstance(fingerprint, str) else "")

    def put(self, key: str, *, content: str, usage: tuple[int, int], system_fingerprint: str = "") -> None:
        if not self.enabled:
            return
        try:
            write_json(self._path(key), {"model": self.model, "endpoint": self.endpoint, "content": content,
                                         "usage": list(usage), "system_fingerprint": system_fingerprint})
        except OSError as exc:  # e.g. the disk filled up: the answer is kept in memory, the run goes on
            self._turn_off(f"{self.directory}: {exc.strerror or exc}")

    # what this endpoint+model refused before (seed, temperature, max_tokens, json_schema, json_object)
    def _capability_key(self) -> str:
        return f"{self.endpoint}|{self.model}"

    def _load_capabilities(self) -> dict:
        try:
            data = json.loads((self.directory / CAPABILITIES_FILE).read_text(encoding="utf-8"))
            known = data.get(self._capability_key(), {})
        except (OSError, ValueError, AttributeError):
            return {}
        return {k: v for k, v in known.items() if isinstance(v, bool)} if isinstance(known, dict) else {}

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
            data = data if isinstance(data, dict) else {}
            data[self._capability_key()] = dict(self._capabilities)
            try:
                write_json(path, data)
            except OSError as exc:
                self._turn_off(f"{self.directory}: {exc.strerror or exc}")
