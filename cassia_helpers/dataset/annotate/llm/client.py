"""OpenAI-compatible chat calls: our own retries within a deadline, a circuit breaker, an on-disk cache
of checked answers, and a write-ahead ledger record per request sent.

The ``openai`` client's hidden retries are off (``max_retries=0``) so that every attempt is seen and
recorded; tenacity retries 429, 5xx, timeouts, connection errors and unreadable bodies with jittered
exponential back-off, honouring ``Retry-After``, as long as the logical call's ``deadline`` allows.
Each attempt is one request of :mod:`cassia_helpers.dataset.annotate.llm.transport`, whose reply body must be complete
within the time the deadline leaves. The API key is read from ``OPENAI_API_KEY`` by this process and
is scrubbed from every reply and error before anything is stored.
"""

from __future__ import annotations

import os
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import urlsplit

import openai
from tenacity import RetryCallState, Retrying, retry_if_exception, stop_after_attempt, wait_random_exponential

from cassia_helpers.dataset.annotate.llm.cache import CAPABILITIES_FILE, ResponseCache, default_cache_dir
from cassia_helpers.dataset.annotate.llm.errors import (
    BudgetExceeded,
    FatalLLMError,
    LLMError,
    RequestRejected,
    ServiceUnavailable,
    _Retryable,
)
from cassia_helpers.dataset.annotate.llm.options import LLMOptions
from cassia_helpers.dataset.annotate.llm.statuses import status_verdict
from cassia_helpers.dataset.annotate.llm.throttle import CircuitBreaker, RunBudget, RunThrottle
from cassia_helpers.dataset.annotate.llm.transport import (
    DeadlineExceeded,
    NotJSON,
    RedirectRefused,
    certificate_problem,
    finish_reason,
    http_client,
    post_chat,
    reply_fields,
    retry_after_seconds,
    safe_message,
)
from cassia_helpers.dataset.annotate.llm.untrusted import sanitize_label, scrub_secrets, untrusted_reply
from cassia_helpers.dataset.annotate.llm.usage import reply_tokens
from cassia_helpers.ledger import (
    BREAKER_OPEN,
    CACHE_HIT,
    ERROR,
    INTERRUPTED,
    NOT_SENT,
    OK,
    SKIPPED_BUDGET,
    CallRecord,
    Ledger,
    estimate_tokens,
    format_cost,
)
from cassia_helpers.prices import PriceTable

DEFAULT_BASE_URL = "https://api.openai.com/v1"
MIN_ATTEMPT_S = 1.0  # no new attempt with less time than this left before the deadline

__all__ = ["CAPABILITIES_FILE", "DEFAULT_BASE_URL", "BudgetExceeded",
           "ChatAnswer", "FatalLLMError", "LLMClient", "LLMError", "RequestRejected", "ServiceUnavailable",
           "default_cache_dir", "endpoint_label"]


@dataclass
class ChatAnswer:
    content: str
    input_tokens: int
    output_tokens: int
    from_cache: bool
    system_fingerprint: str = ""
    estimated: bool = False
    cut: str = ""  # why the server stopped before the reply's end ("length", "content_filter"): not cached


def endpoint_label(base_url: str) -> str:
    """``scheme://host[:port]/path`` without credentials or query: safe to record and to key the cache."""
    parts = urlsplit(base_url or DEFAULT_BASE_URL)
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    return f"{parts.scheme}://{host}{parts.path.rstrip('/')}"


def _messages_text(messages: list[dict]) -> str:
    return "\n".join(str(m.get("content") or "") for m in messages)


class LLMClient:
    """Chat completions for one dataset, with cache, retries, run-wide limits and a ledger.

    Parameters
    ----------
    options
        The model, endpoint (``OPENAI_BASE_URL`` or OpenAI when empty), timeouts, deadline, attempts, reply
        length, cache and seed (:class:`~cassia_helpers.dataset.annotate.llm.options.LLMOptions`).
    ledger
        Where every request (and cache hit) is recorded, before it is sent and when it completes.
    throttle, budget, breaker
        Run-wide concurrency/back-off, the ``--max-cost`` budget and the circuit breaker.
    """

    def __init__(self, options: LLMOptions, *, ledger: Ledger, prices: PriceTable, throttle: RunThrottle,
                 budget: RunBudget, breaker: CircuitBreaker | None = None, dataset: str = "", tissue: str = "",
                 max_wait_s: float = 30.0) -> None:
        self.model = options.model
        self.base_url = options.base_url or os.environ.get("OPENAI_BASE_URL") or DEFAULT_BASE_URL
        self.endpoint = endpoint_label(self.base_url)
        self.ledger, self.prices, self.throttle, self.budget = ledger, prices, throttle, budget
        self.breaker = breaker or CircuitBreaker(0)
        self._failure_kind = "unreachable"
        # 0 for reproducible calls; repeated runs of a consensus sample with a seed of their own
        self.temperature = 0.0
        self.dataset, self.tissue = dataset, tissue
        self.max_attempts = max(1, int(options.max_attempts))
        self.max_wait_s = max_wait_s
        self.timeout = float(options.timeout)
        self.deadline = float(options.deadline)
        self.max_tokens = int(options.max_tokens)
        self.seed = options.seed
        self.cache = ResponseCache(options.cache_dir or None, endpoint=self.endpoint, model=self.model,
                                   enabled=options.use_cache)
        self.fingerprints: set[str] = set()
        self.served_models: set[str] = set()  # the models the server says answered (its "model" field)
        self._fatal: LLMError | None = None
        self._lock = threading.Lock()
        self._client = openai.OpenAI(
            api_key=os.environ.get("OPENAI_API_KEY") or "not-needed",
            base_url=self.base_url,
            timeout=self.timeout,
            max_retries=0,
            http_client=http_client(),
        )

    @property
    def cache_dir(self) -> Path:
        return self.cache.directory

    @property
    def warnings(self) -> list[str]:
        """One-line warnings for the dataset's summary (e.g. a cache folder that cannot be written)."""
        return [self.cache.warning] if self.cache.warning else []

    def supports(self, feature: str) -> bool:
        return self.cache.supports(feature)

    def mark_unsupported(self, feature: str) -> None:
        self.cache.mark_unsupported(feature)

    def _record(self, *, cluster: str, agent: str, status: str, input_tokens: int = 0, output_tokens: int = 0,
                latency: float = 0.0, error: str = "", attempt: int = 1, request_id: str = "",
                call_id: str = "", estimated: bool = False, pending: bool = False) -> None:
        price = self.prices.lookup(self.model)
        cost = price.cost(input_tokens, output_tokens) if status in (OK, ERROR, INTERRUPTED) or pending else 0.0
        record = CallRecord(
            timestamp=datetime.now(UTC).isoformat(timespec="milliseconds"),
            dataset=self.dataset, tissue=self.tissue, cluster=cluster, agent=agent, model=self.model,
            input_tokens=input_tokens, output_tokens=output_tokens, cost=round(cost, 8),
            latency_s=round(latency, 3), status=status, error=scrub_secrets(error), attempt=attempt,
            price_known=price.known, endpoint_host=self.endpoint, request_id=request_id, call_id=call_id,
            estimated=estimated,
        )
        if pending:
            self.ledger.begin(record, deferred=True)
            return
        self.ledger.add(record)
        if cost:
            self.budget.add(cost)  # a run-wide budget held elsewhere (the Dask scheduler) counts it here

    def chat(self, messages: list[dict], *, cluster: str, agent: str, response_format: dict | None = None,
             accept: Callable[[str], bool] | None = None) -> ChatAnswer:
        """One logical call: served from the cache, or sent (with retries within ``deadline``) and recorded.

        Only a non-empty answer that ``accept`` (when given) approves is cached, and only such an answer
        is served from the cache: a bad reply is asked again on the next run.

        Raises
        ------
        BudgetExceeded, FatalLLMError, ServiceUnavailable, LLMError
        """

        def good(text: str) -> bool:
            return bool(text.strip()) and (accept is None or bool(accept(text)))

        key = self.cache.key(messages, response_format, temperature=self.temperature, seed=self.seed)
        cached = self.cache.get(key)
        if cached is not None and good(cached["content"]):
            self._record(cluster=cluster, agent=agent, status=CACHE_HIT)
            return ChatAnswer(cached["content"], 0, 0, True, cached.get("system_fingerprint", ""))
        if self._fatal is not None:
            raise FatalLLMError(str(self._fatal), self._fatal.kind)
        price = self.prices.lookup(self.model)
        if self.budget.enabled and not price.known:
            message = (f"--max-cost is set but model {self.model!r} has no known price, so the budget "
                       "cannot be enforced: nothing is sent")
            self._record(cluster=cluster, agent=agent, status=SKIPPED_BUDGET, error=message)
            raise BudgetExceeded(message)

        give_up_at = time.monotonic() + self.deadline
        attempt, last = 0, None  # the last attempt's error says why the deadline passed (a 429 is no timeout)

        def send() -> ChatAnswer:
            nonlocal attempt
            attempt += 1
            refused = self.breaker.check()
            if refused:
                raise ServiceUnavailable(refused, self._failure_kind)
            if self.budget.exhausted():
                self._record(cluster=cluster, agent=agent, status=SKIPPED_BUDGET,
                             error=f"budget of {format_cost(self.budget.max_cost)} reached")
                raise BudgetExceeded(f"budget of {format_cost(self.budget.max_cost)} reached")
            left = give_up_at - time.monotonic()
            if left < MIN_ATTEMPT_S:
                raise LLMError(f"no answer within the {self.deadline:g} s deadline after {attempt - 1} attempts"
                               + (f", the last: {last}" if last else ""), getattr(last, "kind", "timeout"))
            return self._send_once(messages, cluster=cluster, agent=agent, response_format=response_format,
                                   attempt=attempt, limit=left)

        def wait(state: RetryCallState) -> float:
            nonlocal last
            exc = last = state.outcome.exception() if state.outcome else None
            hinted = getattr(exc, "retry_after", None)
            if hinted is not None:
                delay = min(hinted, self.max_wait_s)
            else:
                delay = wait_random_exponential(multiplier=0.5, max=min(20.0, self.max_wait_s))(state)
            return max(0.0, min(delay, give_up_at - time.monotonic() - MIN_ATTEMPT_S))

        retrying = Retrying(stop=stop_after_attempt(self.max_attempts), wait=wait, reraise=True,
                            retry=retry_if_exception(lambda e: isinstance(e, _Retryable)))
        try:
            answer = retrying(send)
        except _Retryable as exc:
            raise LLMError(f"no answer after {attempt} attempts: {exc}", exc.kind) from None
        if good(answer.content) and not answer.cut:
            self.cache.put(key, content=answer.content, usage=(answer.input_tokens, answer.output_tokens),
                           system_fingerprint=answer.system_fingerprint)
        return answer

    def _options(self, messages: list[dict], response_format: dict | None) -> dict:
        options = {"model": self.model, "messages": messages}
        if self.supports("temperature"):
            options["temperature"] = self.temperature
        if response_format is not None:
            options["response_format"] = response_format
        if self.supports("seed"):
            options["seed"] = self.seed
        if self.length_field:
            options[self.length_field] = self.max_tokens
        return options

    @property
    def length_field(self) -> str:
        """The field that carries the reply length cap (``max_tokens``, or ``max_completion_tokens`` where the
        endpoint refused the first), ``""`` when none is sent (no cap, or both refused)."""
        fields = ("max_tokens", "max_completion_tokens") if self.max_tokens > 0 else ()
        return next((field for field in fields if self.supports(field)), "")

    def _fail_to_reach(self, message: str, kind: str, cluster: str, agent: str) -> _Retryable:
        """A timeout or connection failure: count it for the circuit breaker, announce an opening once."""
        self._failure_kind = kind  # what the breaker, once open, says of the server
        if self.breaker.failure(message):
            self._record(cluster=cluster, agent=agent, status=BREAKER_OPEN,
                         error=f"circuit breaker opened after repeated failures ({message}); further "
                               f"requests fail fast for {self.breaker.cooldown_s:g} s")
        return _Retryable(message, kind=kind)

    def _send_once(self, messages, *, cluster, agent, response_format, attempt, limit) -> ChatAnswer:
        options = self._options(messages, response_format)
        estimated_input = estimate_tokens(_messages_text(messages))
        call_id = uuid.uuid4().hex
        sent = False

        def on_send() -> None:
            # the write-ahead line, just before the first byte: a request never sent is never counted as a call
            nonlocal sent
            self.ledger.mark_sent(call_id)
            sent = True

        with self.throttle.slot():
            # checked again once a slot is held: requests that queued for a slot must not pass the budget
            if self.budget.exhausted():
                self._record(cluster=cluster, agent=agent, status=SKIPPED_BUDGET,
                             error=f"budget of {format_cost(self.budget.max_cost)} reached")
                raise BudgetExceeded(f"budget of {format_cost(self.budget.max_cost)} reached")
            # held in memory (the budget counts it) until on_send writes it
            self._record(cluster=cluster, agent=agent, status=OK, input_tokens=estimated_input, attempt=attempt,
                         call_id=call_id, estimated=True, pending=True)
            start = time.perf_counter()

            def done(status: str, error: str = "", **fields) -> None:
                if not sent and status in (ERROR, INTERRUPTED):
                    status, fields = NOT_SENT, {}
                    error = f"{error} (the request was not sent)"
                self._record(cluster=cluster, agent=agent, status=status, error=error, attempt=attempt,
                             latency=time.perf_counter() - start, call_id=call_id, **fields)

            try:
                data, size = post_chat(self._client, options, timeout=self.timeout, limit=limit, on_send=on_send)
                content, usage, request_id, fingerprint = reply_fields(data)
            except openai.APIStatusError as exc:
                self.breaker.success()  # the server answered
                message = safe_message(exc)
                done(ERROR, message)
                raise self._status_error(exc, message, options) from None
            except RedirectRefused as exc:
                self.breaker.success()
                message = scrub_secrets(str(exc))[:300]
                done(ERROR, message)
                raise self._fatal_error(message, "redirect") from None
            except (openai.APITimeoutError, DeadlineExceeded) as exc:
                # The server has the request and may bill it: its input is counted, as an estimate.
                message = safe_message(exc)
                done(ERROR, message, input_tokens=estimated_input, estimated=True)
                raise self._fail_to_reach(message, "timeout", cluster, agent) from None
            except openai.APIConnectionError as exc:
                certificate = certificate_problem(exc)
                if certificate:
                    message = (f"the TLS certificate of {self.endpoint} was refused ({certificate}); for a "
                               "private certificate authority, give its certificate file in SSL_CERT_FILE")
                    done(ERROR, message)
                    raise self._fatal_error(message, "certificate") from None
                message = safe_message(exc)
                if not sent:
                    done(ERROR, message)
                    raise self._fail_to_reach(message, "unreachable", cluster, agent) from None
                # the server read the request, then closed the connection: it may bill it, as for a timeout
                done(ERROR, message, input_tokens=estimated_input, estimated=True)
                raise self._fail_to_reach(message, "disconnected", cluster, agent) from None
            except (ValueError, AttributeError, IndexError, KeyError, TypeError) as exc:
                # An unreadable body: the request was sent and may have been billed, but nothing is known.
                if isinstance(exc, NotJSON) and exc.html:  # a web page where the API should be: every request
                    message = scrub_secrets(str(exc))[:300]  # would get it (a wrong --base-url)
                    done(ERROR, message, input_tokens=estimated_input, estimated=True)
                    raise self._fatal_error(message, "endpoint_not_found") from None
                said = exc if isinstance(exc, ValueError) else f"{type(exc).__name__}: {exc}"  # ours say what is wrong
                message = scrub_secrets(f"unreadable response ({said})"[:240])
                done(ERROR, message, input_tokens=estimated_input, estimated=True)
                raise _Retryable(message, kind="unreadable") from None
            except BaseException:
                done(INTERRUPTED, "interrupted while waiting for the reply", input_tokens=estimated_input,
                     estimated=True)
                raise
        self.breaker.success()
        limit = int(options.get("max_tokens") or options.get("max_completion_tokens") or 0)  # 0: none was sent
        input_tokens, output_tokens, note, estimated = reply_tokens(usage, prompt_estimate=estimated_input,
                                                                    content=content, max_output=limit)
        fingerprint = scrub_secrets(fingerprint)[:200]  # the server's text: it goes into the shared h5ad
        served = sanitize_label(data.get("model") if isinstance(data.get("model"), str) else "")
        with self._lock:
            self.fingerprints.update([fingerprint] if fingerprint else [])
            self.served_models.update([served] if served else [])
        stored = untrusted_reply(content)
        notes = [note] if note else []
        cut = finish_reason(data) if finish_reason(data) in ("length", "content_filter") else ""
        if cut == "length":
            notes.append(f"reply cut at the token limit ({limit or 'the server default'} tokens, "
                         "--llm-max-tokens): not cached")
        elif cut:
            notes.append("reply stopped by the server's content filter: not cached")
        if len(stored) < len(content):
            notes.append(f"reply of {len(content)} characters cut to {len(stored)}")
        done(OK, scrub_secrets("; ".join(notes)), input_tokens=input_tokens, output_tokens=output_tokens,
             request_id=scrub_secrets(request_id)[:200], estimated=estimated)
        return ChatAnswer(stored, input_tokens, output_tokens, False, fingerprint, estimated, cut)

    def _fatal_error(self, message: str, kind: str) -> FatalLLMError:
        """The same answer awaits every request (a redirect elsewhere, an untrusted certificate): stop asking."""
        fatal = FatalLLMError(message, kind)
        with self._lock:
            self._fatal = fatal
        return fatal

    def _status_error(self, exc: openai.APIStatusError, message: str, options: dict) -> Exception:
        verdict = status_verdict(exc, options, has_key=bool(os.environ.get("OPENAI_API_KEY")))
        if verdict.action == "fatal":
            return self._fatal_error(message + verdict.note, verdict.kind)
        if verdict.action == "retry":
            retry_after = retry_after_seconds(exc)
            if exc.status_code == 429:  # every worker pauses: at most as long as a retry would wait, or a call may last
                asked = retry_after if retry_after is not None else 1.0
                self.throttle.back_off(min(asked, self.max_wait_s, self.deadline))
            return _Retryable(message, retry_after, kind=verdict.kind)
        if verdict.action == "drop_option":
            self.mark_unsupported(verdict.option)
            return _Retryable(message, 0.0)
        if verdict.action == "rejected":
            return RequestRejected(message + verdict.note, verdict.option)
        return LLMError(message)
