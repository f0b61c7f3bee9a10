"""Why a logical LLM call gave no usable answer: the errors :mod:`~.client` raises (re-exported there)."""

from __future__ import annotations


class LLMError(RuntimeError):
    """No usable answer for one logical call; the message is safe to show (no credentials).

    ``kind`` says why, machine-readably: one of
    :data:`~cassia_helpers.dataset.annotate.SERVICE_FAILURES` (``timeout``, ``unreachable``, ``budget``, ``auth``,
    ``no_key``, ``quota``, ``model_not_found``, ``endpoint_not_found``, ``redirect``, ``certificate``, ``server_error``,
    ``rate_limited``,
    ``unreadable``, ``rejected``, ``error``).
    """

    def __init__(self, message: str, kind: str = "error") -> None:
        super().__init__(message)
        self.kind = kind


class BudgetExceeded(LLMError):
    """The run's ``--max-cost`` budget is reached (or cannot be enforced): nothing more is sent."""

    def __init__(self, message: str) -> None:
        super().__init__(message, "budget")


class RequestRejected(LLMError):
    """The endpoint rejected this request as invalid (400/422). ``refused``: the request field it refuses
    itself (``response_format``: e.g. structured outputs not supported), ``""`` when it refused this request
    only (a prompt too long for the context, a content filter): nothing to remember about the endpoint."""

    def __init__(self, message: str, refused: str = "") -> None:
        super().__init__(message, "rejected")
        self.refused = refused


class FatalLLMError(LLMError):
    """The endpoint refuses us outright (bad key, unknown model, a redirect elsewhere, an
    untrusted certificate): no point trying other clusters."""


class ServiceUnavailable(LLMError):
    """The circuit breaker is open: the server kept failing, nothing is sent during the cool-down. ``kind`` is
    that of the failures that opened it (``timeout`` for a server that stops answering in time)."""

    def __init__(self, message: str, kind: str = "unreachable") -> None:
        super().__init__(message, kind)


class _Retryable(Exception):
    def __init__(self, message: str, retry_after: float | None = None, kind: str = "error") -> None:
        super().__init__(message)
        self.retry_after = retry_after
        self.kind = kind
