"""OpenAI-compatible chat calls: our own retries, an on-disk response cache, and one ledger record per
request sent.

The ``openai`` client's hidden retries are off (``max_retries=0``) so that every attempt is seen and
recorded; tenacity retries 429, 5xx, timeouts, connection errors and unreadable bodies with jittered
exponential back-off, honouring ``Retry-After``. The API key is read from ``OPENAI_API_KEY`` by this
process and is never stored, logged or put in a cache key.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import urlsplit

import openai
from tenacity import RetryCallState, Retrying, retry_if_exception, stop_after_attempt, wait_random_exponential

from ..files import write_json
from ..ledger import CACHE_HIT, ERROR, OK, SKIPPED_BUDGET, CallRecord, Ledger, PriceTable
from .throttle import RunBudget, RunThrottle

DEFAULT_BASE_URL = "https://api.openai.com/v1"
CAPABILITIES_FILE = "capabilities.json"


class LLMError(RuntimeError):
    """No usable answer for one logical call; the message is safe to show (no credentials)."""


class BudgetExceeded(LLMError):
    """The run's ``--max-cost`` budget is reached: nothing more is sent."""


class RequestRejected(LLMError):
    """The endpoint rejected this request as invalid (400/422), e.g. an unsupported response_format."""


class FatalLLMError(LLMError):
    """The endpoint refuses us outright (bad key, unknown model): no point trying other clusters."""


class _Retryable(Exception):
    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


@dataclass
class ChatAnswer:
    content: str
    input_tokens: int
    output_tokens: int
    from_cache: bool
    system_fingerprint: str = ""


def endpoint_label(base_url: str) -> str:
    """``scheme://host[:port]/path`` without credentials or query: safe to record and to key the cache."""
    parts = urlsplit(base_url or DEFAULT_BASE_URL)
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    return f"{parts.scheme}://{host}{parts.path.rstrip('/')}"


def default_cache_dir() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(root) / "cassia-batch" / "llm"


def _retry_after(exc: BaseException) -> float | None:
    response = getattr(exc, "response", None)
    if response is None:
        return None
    for header, scale in (("retry-after-ms", 0.001), ("retry-after", 1.0)):
        value = response.headers.get(header)
        try:
            if value is not None:
                return max(0.0, float(value) * scale)
        except ValueError:
            continue
    return None


def _refused_option(exc: openai.APIStatusError, options: dict) -> str:
    """The optional request field (``seed``, ``temperature``) a 400 complains about, if any."""
    if exc.status_code != 400:
        return ""
    text = str(exc).lower()
    for option in ("seed", "temperature"):
        if option in options and option in text:
            return option
    return ""


def _reasoning_text(message) -> str:
    """Some servers (reasoning models) put the whole answer in ``reasoning_content``."""
    extra = getattr(message, "model_extra", None) or {}
    return str(extra.get("reasoning_content") or extra.get("reasoning") or "")


def _safe_message(exc: BaseException) -> str:
    """A one-line error without anything that could carry a credential."""
    status = getattr(exc, "status_code", None)
    text = " ".join(str(getattr(exc, "message", "") or exc).split())[:240]
    key = os.environ.get("OPENAI_API_KEY")
    if key:
        text = text.replace(key, "***")
    return f"{type(exc).__name__}{f' {status}' if status else ''}: {text}"


class LLMClient:
    """Chat completions for one dataset, with cache, retries, run-wide limits and a ledger.

    Parameters
    ----------
    model, base_url
        Model name and OpenAI-compatible endpoint (``OPENAI_BASE_URL`` or OpenAI when empty).
    ledger
        Where every request (and cache hit) is recorded.
    throttle, budget
        Run-wide concurrency/back-off and the ``--max-cost`` budget.
    """

    def __init__(self, *, model: str, base_url: str = "", ledger: Ledger, prices: PriceTable,
                 throttle: RunThrottle, budget: RunBudget, dataset: str = "", tissue: str = "",
                 timeout: float = 120.0, max_attempts: int = 4, cache_dir: str | Path | None = None,
                 use_cache: bool = True, seed: int = 0, max_wait_s: float = 30.0) -> None:
        self.model = model
        self.base_url = os.environ.get("OPENAI_BASE_URL") or base_url or DEFAULT_BASE_URL
        self.endpoint = endpoint_label(self.base_url)
        self.ledger, self.prices, self.throttle, self.budget = ledger, prices, throttle, budget
        self.dataset, self.tissue = dataset, tissue
        self.max_attempts = max(1, int(max_attempts))
        self.max_wait_s = max_wait_s
        self.seed = seed
        self.cache_dir = Path(cache_dir) if cache_dir else default_cache_dir()
        self.use_cache = use_cache
        self.fingerprints: set[str] = set()
        self._fatal: str = ""
        self._lock = threading.Lock()
        self._capabilities = self._load_capabilities()
        self._client = openai.OpenAI(
            api_key=os.environ.get("OPENAI_API_KEY") or "not-needed",
            base_url=self.base_url,
            timeout=timeout,
            max_retries=0,
        )

    # capabilities: what this endpoint+model refused before (seed, json_schema, json_object)
    def _capability_key(self) -> str:
        return f"{self.endpoint}|{self.model}"

    def _load_capabilities(self) -> dict:
        try:
            data = json.loads((self.cache_dir / CAPABILITIES_FILE).read_text(encoding="utf-8"))
            return dict(data.get(self._capability_key(), {}))
        except (OSError, ValueError):
            return {}

    def supports(self, feature: str) -> bool:
        with self._lock:
            return self._capabilities.get(feature, True)

    def mark_unsupported(self, feature: str) -> None:
        with self._lock:
            self._capabilities[feature] = False
            if not self.use_cache:
                return
            path = self.cache_dir / CAPABILITIES_FILE
            try:
                data = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                data = {}
            data[self._capability_key()] = dict(self._capabilities)
            write_json(path, data)

    # cache
    def _cache_key(self, messages: list[dict], response_format: dict | None) -> str:
        material = json.dumps({"endpoint": self.endpoint, "model": self.model, "messages": messages,
                               "temperature": 0, "response_format": response_format}, sort_keys=True)
        return hashlib.sha256(material.encode("utf-8")).hexdigest()

    def _cache_path(self, key: str) -> Path:
        return self.cache_dir / key[:2] / f"{key}.json"

    def _cache_get(self, key: str) -> dict | None:
        if not self.use_cache:
            return None
        try:
            return json.loads(self._cache_path(key).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None

    def _cache_put(self, key: str, answer: ChatAnswer) -> None:
        if self.use_cache:
            write_json(self._cache_path(key), {"model": self.model, "endpoint": self.endpoint,
                                               "content": answer.content,
                                               "usage": [answer.input_tokens, answer.output_tokens],
                                               "system_fingerprint": answer.system_fingerprint})

    def _record(self, *, cluster: str, agent: str, status: str, input_tokens: int = 0, output_tokens: int = 0,
                latency: float = 0.0, error: str = "", attempt: int = 1, request_id: str = "") -> None:
        price = self.prices.lookup(self.model)
        cost = price.cost(input_tokens, output_tokens) if status in (OK, ERROR) else 0.0
        self.ledger.add(CallRecord(
            timestamp=datetime.now(UTC).isoformat(timespec="milliseconds"),
            dataset=self.dataset, tissue=self.tissue, cluster=cluster, agent=agent, model=self.model,
            input_tokens=input_tokens, output_tokens=output_tokens, cost=round(cost, 8),
            latency_s=round(latency, 3), status=status, error=error, attempt=attempt,
            price_known=price.known, endpoint_host=self.endpoint, request_id=request_id,
        ))

    def chat(self, messages: list[dict], *, cluster: str, agent: str,
             response_format: dict | None = None) -> ChatAnswer:
        """One logical call: served from the cache, or sent (with retries) and recorded.

        Raises
        ------
        BudgetExceeded, FatalLLMError, LLMError
        """
        key = self._cache_key(messages, response_format)
        cached = self._cache_get(key)
        if cached is not None:
            self._record(cluster=cluster, agent=agent, status=CACHE_HIT)
            return ChatAnswer(cached["content"], 0, 0, True, cached.get("system_fingerprint", ""))
        if self._fatal:
            raise FatalLLMError(self._fatal)

        attempt = 0

        def send() -> ChatAnswer:
            nonlocal attempt
            attempt += 1
            if self.budget.exhausted():
                self._record(cluster=cluster, agent=agent, status=SKIPPED_BUDGET,
                             error=f"budget of ${self.budget.max_cost:.2f} reached")
                raise BudgetExceeded(f"budget of ${self.budget.max_cost:.2f} reached")
            return self._send_once(messages, cluster=cluster, agent=agent,
                                   response_format=response_format, attempt=attempt)

        def wait(state: RetryCallState) -> float:
            exc = state.outcome.exception() if state.outcome else None
            hinted = getattr(exc, "retry_after", None)
            if hinted is not None:
                return min(hinted, self.max_wait_s)
            return wait_random_exponential(multiplier=0.5, max=min(20.0, self.max_wait_s))(state)

        retrying = Retrying(stop=stop_after_attempt(self.max_attempts), wait=wait, reraise=True,
                            retry=retry_if_exception(lambda e: isinstance(e, _Retryable)))
        try:
            answer = retrying(send)
        except _Retryable as exc:
            raise LLMError(f"no answer after {attempt} attempts ({exc})") from None
        self._cache_put(key, answer)
        return answer

    def _send_once(self, messages, *, cluster, agent, response_format, attempt) -> ChatAnswer:
        options = {"model": self.model, "messages": messages}
        if self.supports("temperature"):
            options["temperature"] = 0
        if response_format is not None:
            options["response_format"] = response_format
        if self.supports("seed"):
            options["seed"] = self.seed
        with self.throttle.slot():
            start = time.perf_counter()
            try:
                raw = self._client.chat.completions.with_raw_response.create(**options)
                completion = raw.parse()
                choice = completion.choices[0]
                content = choice.message.content or _reasoning_text(choice.message)
            except openai.APIStatusError as exc:
                latency = time.perf_counter() - start
                message = _safe_message(exc)
                self._record(cluster=cluster, agent=agent, status=ERROR, latency=latency, error=message,
                             attempt=attempt)
                retry_after = _retry_after(exc)
                if exc.status_code == 429 or exc.status_code >= 500 or exc.status_code == 408:
                    if exc.status_code == 429:
                        self.throttle.back_off(retry_after if retry_after is not None else 1.0)
                    raise _Retryable(message, retry_after) from None
                refused = _refused_option(exc, options)
                if refused:
                    # e.g. reasoning models accept only the default temperature; some servers reject seed
                    self.mark_unsupported(refused)
                    raise _Retryable(message, 0.0) from None
                if exc.status_code in (401, 403, 404):
                    with self._lock:
                        self._fatal = message
                    raise FatalLLMError(message) from None
                if exc.status_code in (400, 422):
                    raise RequestRejected(message) from None
                raise LLMError(message) from None
            except (openai.APITimeoutError, openai.APIConnectionError) as exc:
                message = _safe_message(exc)
                self._record(cluster=cluster, agent=agent, status=ERROR,
                             latency=time.perf_counter() - start, error=message, attempt=attempt)
                raise _Retryable(message) from None
            except (ValueError, AttributeError, IndexError, TypeError) as exc:
                # An unreadable body: the request was sent and may have been billed, but nothing is known.
                message = f"unreadable response ({type(exc).__name__})"
                self._record(cluster=cluster, agent=agent, status=ERROR,
                             latency=time.perf_counter() - start, error=message, attempt=attempt)
                raise _Retryable(message) from None
        latency = time.perf_counter() - start
        usage = completion.usage
        input_tokens = int(getattr(usage, "prompt_tokens", 0) or 0)
        output_tokens = int(getattr(usage, "completion_tokens", 0) or 0)
        fingerprint = getattr(completion, "system_fingerprint", "") or ""
        if fingerprint:
            with self._lock:
                self.fingerprints.add(fingerprint)
        self._record(cluster=cluster, agent=agent, status=OK, input_tokens=input_tokens,
                     output_tokens=output_tokens, latency=latency, attempt=attempt,
                     request_id=str(getattr(completion, "id", "") or ""),
                     error="" if usage is not None else "no usage reported")
        return ChatAnswer(content, input_tokens, output_tokens, False, fingerprint)
