"""What an error status of the model server means for a call: wait and retry, stop asking (a refusal every
request would meet), send the request again without an optional field it refused, or give up on this request.

:func:`status_verdict` decides; :mod:`~.client` acts on it (retries, the run-wide back-off, the memory of
refused fields, the dataset-level stop).
"""

from __future__ import annotations

from typing import NamedTuple

import openai

# How a 400 says that a request field itself is not accepted (OpenAI, vLLM, Ollama, LiteLLM, Azure). A 400 that
# only mentions a field (vLLM's "max_tokens ... is too large: this model's maximum context length is ...", a
# content filter on one prompt) is about that request, and must not make the field be left out for good.
REFUSALS = ("unsupported parameter", "unsupported_parameter", "unsupported value", "unrecognized", "unknown field",
            "unknown parameter", "not supported", "does not support", "extra inputs are not permitted",
            "unexpected keyword", "not allowed")


class StatusVerdict(NamedTuple):
    """``action``: ``retry``, ``fatal`` (every request would meet it: stop asking), ``drop_option`` (send again
    without ``option``), ``rejected`` (this request is invalid) or ``error``; ``kind`` as in
    :class:`~.errors.LLMError`; ``note``: what to add to the server's message."""

    action: str
    kind: str = "error"
    option: str = ""
    note: str = ""


def refused_option(exc: openai.APIStatusError, options: dict) -> str:
    """The optional request field (``seed``, ``temperature``, ``max_tokens``...) a 400 complains about.

    Parameters
    ----------
    exc
        The error status the endpoint answered.
    options
        The request's fields: only those sent can be refused.

    Returns
    -------
    str
        The field's name, or ``""`` when the error is not a 400 refusing one of them (:func:`refuses`).
    """
    if exc.status_code != 400:
        return ""
    for option in ("max_completion_tokens", "max_tokens", "seed", "temperature"):
        if option in options and refuses(exc, option):
            return option
    return ""


def refuses(exc: openai.APIStatusError, field: str) -> bool:
    """Whether the 400 ``exc`` refuses the request field ``field`` itself (:data:`REFUSALS`), not the request."""
    text = " ".join([str(exc), str(getattr(exc, "code", "") or "")]).lower()
    named = field in text or getattr(exc, "param", None) == field
    return exc.status_code == 400 and named and any(phrase in text for phrase in REFUSALS)


def quota_exhausted(exc: openai.APIStatusError) -> bool:
    """Whether an error says the account has no quota or credits left, which no retry can fix: HTTP 402
    (OpenRouter's "insufficient credits"), or a 429 whose code or type is ``insufficient_quota`` (OpenAI)."""
    if exc.status_code == 402:
        return True
    return exc.status_code == 429 and "insufficient_quota" in (str(getattr(exc, "code", "")),
                                                                 str(getattr(exc, "type", "")))


def status_verdict(exc: openai.APIStatusError, options: dict, *, has_key: bool) -> StatusVerdict:
    """What the error status ``exc`` of a request with fields ``options`` means (see :class:`StatusVerdict`).

    ``has_key``: an API key was given (a 401/403 then means it was refused, else that one is needed).
    """
    status = exc.status_code
    if quota_exhausted(exc):  # every request gets the same answer until the account is topped up
        return StatusVerdict("fatal", "quota", note=" (the account's quota or credits are exhausted: add credits "
                                                    "or raise the quota, then --resume)")
    if status in (408, 429) or status >= 500:
        return StatusVerdict("retry", {408: "timeout", 504: "timeout", 429: "rate_limited"}.get(status, "server_error"))
    refused = refused_option(exc, options)
    if refused:
        # e.g. reasoning models accept only the default temperature and max_completion_tokens
        return StatusVerdict("drop_option", option=refused)
    if status == 404:
        # a 404 that does not name the model is the address itself (e.g. a base URL without /v1)
        return StatusVerdict("fatal", "model_not_found" if "model" in str(exc).lower() else "endpoint_not_found")
    if status in (401, 403):
        return StatusVerdict("fatal", "auth" if has_key else "no_key")
    if status in (400, 422):
        text = str(exc).lower()
        too_long = "context length" in text or "maximum context" in text or "context window" in text
        return StatusVerdict("rejected", "rejected", option="response_format" if refuses(exc, "response_format")
                             else "", note=" (the prompt and the reply cap exceed the model's context: lower "
                                           "--llm-max-tokens, or use a model with a longer context)" if too_long
                             else "")
    return StatusVerdict("error")
