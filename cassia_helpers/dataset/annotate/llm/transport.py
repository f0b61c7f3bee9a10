"""One chat-completion request to an OpenAI-compatible endpoint, and reading what comes back.

:func:`post_chat` sends a request through the ``openai`` client and reads the reply body in chunks against
a wall-clock limit, so a server that trickles bytes cannot hold a request open past it, nor make us read an
endless body. :func:`reply_fields` takes the answer out of a chat completion body. An error is read by
:func:`retry_after_seconds` (the wait the server asks for), :func:`refused_option` (the optional request
field a 400 complains about) and :func:`safe_message` (one line without anything that could carry a
credential). Retries, the cache, the ledger and the run's limits are :mod:`~.client`'s.
"""

from __future__ import annotations

import json
import time

import openai

from cassia_helpers.dataset.annotate.llm.untrusted import scrub_secrets

MAX_BODY_BYTES = 16 * 1024 * 1024  # a reply body larger than this is not read to the end


class DeadlineExceeded(Exception):
    """The reply body was not complete within the request's wall-clock limit."""


def post_chat(client: openai.OpenAI, options: dict, *, timeout: float, limit: float) -> tuple[dict, int]:
    """Send one chat completion request and read its body, all within ``limit`` wall-clock seconds.

    Parameters
    ----------
    client
        The ``openai`` client (with its own retries off).
    options
        The request's fields: ``model``, ``messages`` and the optional ones.
    timeout
        Seconds to connect, and seconds of silence while waiting for the reply; never more than ``limit``.
    limit
        Wall-clock seconds for the whole request, up to the body's last byte.

    Returns
    -------
    tuple of (dict, int)
        The decoded JSON body and its size in bytes.

    Raises
    ------
    DeadlineExceeded
        The body was not complete within ``limit``.
    ValueError
        The body is larger than :data:`MAX_BODY_BYTES`, or not JSON.
    openai.APIError
        What the ``openai`` client raises: an error status, a timeout, a connection failure.
    """
    until = time.monotonic() + limit
    request_timeout = openai.Timeout(min(timeout, limit), connect=min(timeout, limit, 30.0))
    chunks, size = [], 0
    with client.chat.completions.with_streaming_response.create(**options, timeout=request_timeout) as raw:
        for chunk in raw.iter_bytes():
            chunks.append(chunk)
            size += len(chunk)
            if time.monotonic() > until:
                raise DeadlineExceeded(f"reply not complete within {limit:.0f} s ({size} bytes read)")
            if size > MAX_BODY_BYTES:
                raise ValueError(f"reply body larger than {MAX_BODY_BYTES} bytes")
    return json.loads(b"".join(chunks)), size


def reply_fields(data: dict) -> tuple[str, dict | None, str, str]:
    """The answer in a chat completion body.

    Parameters
    ----------
    data
        The decoded body.

    Returns
    -------
    tuple of (str, dict or None, str, str)
        The content, the ``usage`` (None when not reported), the reply's id and its ``system_fingerprint``.

    Raises
    ------
    KeyError, IndexError, TypeError, AttributeError
        A malformed body.
    ValueError
        An error object in place of the completion.
    """
    if "choices" not in data and isinstance(data.get("error"), dict):
        # some proxies answer a failed upstream call with status 200 and an error object
        raise ValueError(f"the server answered with an error: {str(data['error'].get('message', ''))[:160]}")
    message = data["choices"][0]["message"]
    # Some servers (reasoning models) put the whole answer in ``reasoning_content``.
    content = message.get("content") or message.get("reasoning_content") or message.get("reasoning") or ""
    if not isinstance(content, str):
        raise TypeError("message content is not text")
    usage = data.get("usage")
    return content, usage if isinstance(usage, dict) else None, str(data.get("id") or ""), \
        str(data.get("system_fingerprint") or "")


def retry_after_seconds(exc: BaseException) -> float | None:
    """The wait an error response asks for (``retry-after-ms`` or ``retry-after``), in seconds; None if none."""
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
        The field's name, or ``""`` when the error is not a 400 or names none of them.
    """
    if exc.status_code != 400:
        return ""
    text = str(exc).lower()
    for option in ("max_completion_tokens", "max_tokens", "seed", "temperature"):
        if option in options and option in text:
            return option
    return ""


def safe_message(exc: BaseException) -> str:
    """A one-line error without anything that could carry a credential."""
    status = getattr(exc, "status_code", None)
    text = scrub_secrets(" ".join(str(getattr(exc, "message", "") or exc).split()))[:240]
    return f"{type(exc).__name__}{f' {status}' if status else ''}: {text}"
