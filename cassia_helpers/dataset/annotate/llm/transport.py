"""One chat-completion request to an OpenAI-compatible endpoint, and reading what comes back.

:func:`post_chat` sends a request through the ``openai`` client, on the HTTP client of :func:`http_client`,
and bounds the whole exchange (connecting, sending, the response headers and the body) by a wall-clock
limit held from outside the HTTP library: a timer shuts the request's socket down when the limit passes,
so a server that trickles its headers or its body one byte at a time cannot hold a request open past it,
whatever the per-read timeouts. The same hooks tell when the request starts to leave (``on_send``: the
ledger's write-ahead line is written then, so a request that never left is never counted), and refuse a
redirect that would carry the prompts to another server (scheme, host or port), or turn the request into a GET.

:func:`reply_fields` takes the answer out of a chat completion body (its token counts are checked by
:mod:`~.usage`). An error is read by :func:`retry_after_seconds` (the wait the server asks for, in seconds
or as an HTTP date),
:func:`certificate_problem` (a TLS certificate that was not trusted) and :func:`safe_message` (one line
without anything that could carry a credential). Retries, the cache, the ledger and the run's limits are
:mod:`~.client`'s.
"""

from __future__ import annotations

import datetime
import email.utils
import importlib
import json
import math
import socket
import ssl
import threading
import time
from collections.abc import Callable

import openai

from cassia_helpers.dataset.annotate.llm.untrusted import scrub_secrets


def _http_library():
    """The HTTP library under the ``openai`` client (httpx2 in recent releases, httpx before), whose
    limits, hooks and errors :func:`http_client` and :func:`post_chat` use."""
    for base in openai.DefaultHttpxClient.__mro__:
        root = base.__module__.partition(".")[0]
        if root in ("httpx2", "httpx"):
            return importlib.import_module(root)
    raise ImportError(f"openai {openai.__version__}: no httpx-compatible client found")


_http = _http_library()

MAX_BODY_BYTES = 16 * 1024 * 1024  # a reply body larger than this is not read to the end


class DeadlineExceeded(Exception):
    """The exchange (connect, headers, body) was not complete within the request's wall-clock limit."""


class NotJSON(ValueError):
    """A reply body that is not JSON; ``html``: the server said it is a web page (its Content-Type)."""

    def __init__(self, message: str, *, html: bool) -> None:
        super().__init__(message)
        self.html = html


class RedirectRefused(Exception):
    """The server answered with a redirect that is not followed (another server, or one that drops the body)."""


class _Exchange:
    """One request's connections, watched: its sockets are shut down when the wall-clock limit passes.

    Filled from the HTTP library's ``trace`` extension, in the sending thread: each new connection's
    socket (keep-alive is off, so every request has its own), and the moment the request starts to leave.
    """

    def __init__(self, on_send: Callable[[], None] | None) -> None:
        self.on_send = on_send
        self.sent = False
        self.expired = False
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()

    def trace(self, name: str, info: dict) -> None:
        if name.endswith(("connect_tcp.complete", "start_tls.complete", "connect_unix_socket.complete")):
            stream = info.get("return_value")
            sock = stream.get_extra_info("socket") if stream is not None else None
            if isinstance(sock, socket.socket):
                with self._lock:
                    self._sockets.append(sock)
                    expired = self.expired
                if expired:
                    _shut(sock)
        elif name.endswith("send_request_headers.started") and not self.sent:
            # before the first byte of the request: a write-ahead record written here is never a request
            # that did not leave, and a request that left always has one
            if self.on_send is not None:
                self.on_send()
            self.sent = True

    def expire(self) -> None:
        """Called by the timer: every socket of the exchange is shut down, which ends any blocked read."""
        with self._lock:
            self.expired = True
            sockets = list(self._sockets)
        for sock in sockets:
            _shut(sock)


def _shut(sock: socket.socket) -> None:
    try:
        # the plain socket call, also on a TLS socket: its own ``shutdown`` would unwrap TLS under a reader
        socket.socket.shutdown(sock, socket.SHUT_RDWR)
    except OSError:
        pass


_current = threading.local()


def _watch(request) -> None:
    """Request hook: the exchange of the calling thread follows this request's connection."""
    exchange = getattr(_current, "exchange", None)
    if exchange is not None:
        request.extensions["trace"] = exchange.trace


def _same_origin(a, b) -> bool:
    return (a.scheme, a.host, a.port) == (b.scheme, b.host, b.port)


def _where(url) -> str:
    """``scheme://host[:port]/path`` of a URL, without credentials or query."""
    port = f":{url.port}" if url.port else ""
    return f"{url.scheme}://{url.host}{port}{url.path}"


def _refuse_redirect(response) -> None:
    """Response hook: a redirect is followed only to the same scheme, host and port, keeping the request.

    A 307/308 to the same origin keeps the method and the body (e.g. a path with a trailing slash). Any
    other redirect is refused with its target named: to another host it would carry the prompts where
    the run's provenance does not say, and 301/302/303 turn the POST into a GET.
    """
    if not response.has_redirect_location:
        return
    request = response.request
    target = request.url.join(response.headers.get("location", ""))
    if response.status_code in (307, 308) and _same_origin(target, request.url):
        return
    where = "another server" if not _same_origin(target, request.url) else "the same server, as a GET"
    raise RedirectRefused(f"HTTP {response.status_code} to {_where(target)} ({where})")


def http_client(*, max_connections: int = 1000):
    """The HTTP client for :class:`openai.OpenAI`: no keep-alive (each request's socket is its own, so the
    watchdog can end it), the trace hook of :func:`post_chat`, and redirects checked."""
    return openai.DefaultHttpxClient(
        limits=_http.Limits(max_connections=max_connections, max_keepalive_connections=0),
        event_hooks={"request": [_watch], "response": [_refuse_redirect]},
    )


def _caused_by(exc: BaseException, kind: type) -> BaseException | None:
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, kind):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


def post_chat(client: openai.OpenAI, options: dict, *, timeout: float, limit: float,
              on_send: Callable[[], None] | None = None) -> tuple[dict, int]:
    """Send one chat completion request and read its body, all within ``limit`` wall-clock seconds.

    Parameters
    ----------
    client
        The ``openai`` client (with its own retries off), on the HTTP client of :func:`http_client`.
    options
        The request's fields: ``model``, ``messages`` and the optional ones.
    timeout
        Seconds to connect, and seconds of silence while waiting for the reply; never more than ``limit``.
    limit
        Wall-clock seconds for the whole exchange: connecting, sending, the headers, the body's last byte.
    on_send
        Called once, in this thread, just before the first byte of the request leaves.

    Returns
    -------
    tuple of (dict, int)
        The decoded JSON body and its size in bytes.

    Raises
    ------
    DeadlineExceeded
        The exchange was not complete within ``limit``.
    RedirectRefused
        The server redirected the request elsewhere.
    ValueError
        The body is larger than :data:`MAX_BODY_BYTES`, or not JSON (:class:`NotJSON`).
    openai.APIError
        What the ``openai`` client raises: an error status, a timeout, a connection failure.
    """
    request_timeout = openai.Timeout(min(timeout, limit), connect=min(timeout, limit, 30.0))
    exchange = _Exchange(on_send)
    timer = threading.Timer(limit, exchange.expire)
    timer.daemon = True
    chunks, size, content_type = [], 0, ""
    start = time.monotonic()

    def late() -> DeadlineExceeded:
        return DeadlineExceeded(f"no complete reply within {limit:.0f} s ({size} bytes of the body read, "
                                f"{time.monotonic() - start:.0f} s)")

    _current.exchange = exchange
    timer.start()
    try:
        with client.chat.completions.with_streaming_response.create(**options, timeout=request_timeout) as raw:
            content_type = raw.headers.get("content-type", "")
            try:
                for chunk in raw.iter_bytes():
                    chunks.append(chunk)
                    size += len(chunk)
                    if exchange.expired:
                        raise late()
                    if size > MAX_BODY_BYTES:
                        raise ValueError(f"reply body larger than {MAX_BODY_BYTES} bytes")
            except _http.TimeoutException:
                raise openai.APITimeoutError(request=raw.http_request) from None
            except _http.RequestError as exc:
                raise openai.APIConnectionError(message=f"the reply was cut off ({type(exc).__name__}: {exc})",
                                                request=raw.http_request) from None
    except (openai.APIConnectionError, _http.RequestError, OSError, RedirectRefused) as exc:
        if exchange.expired:
            raise late() from None
        refused = _caused_by(exc, RedirectRefused)
        if refused is not None:
            raise RedirectRefused(str(refused)) from None
        raise
    finally:
        timer.cancel()
        _current.exchange = None
    if not exchange.sent and on_send is not None:
        on_send()  # a transport without the trace hook: the reply proves the request left
    try:
        return json.loads(b"".join(chunks)), size
    except RecursionError:  # e.g. a body of 100,000 nested brackets
        raise ValueError("reply body nested too deeply to be a chat completion") from None
    except ValueError as exc:
        media = content_type.split(";", 1)[0].strip().lower()
        if media in ("text/html", "application/xhtml+xml"):  # a web site's page: not an API at this address
            raise NotJSON(f"the server answered with an HTML page (Content-Type: {scrub_secrets(media)}), not "
                          "JSON: is --base-url the address of its OpenAI-compatible API (often ending in /v1)?",
                          html=True) from None
        raise NotJSON(f"reply body not JSON ({exc})", html=False) from None


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
    if not isinstance(data, dict):
        raise ValueError("the reply is not a JSON object")
    if "choices" not in data and isinstance(data.get("error"), dict):
        # some proxies answer a failed upstream call with status 200 and an error object
        raise ValueError(f"the server answered with an error: {str(data['error'].get('message', ''))[:160]}")
    choices = data.get("choices")
    message = choices[0].get("message") if isinstance(choices, list) and choices and isinstance(choices[0], dict) \
        else None
    if not isinstance(message, dict):
        raise ValueError("the reply holds no completion (" + ("no choices" if not choices else "no message") + ")")
    content = message.get("content") or ""
    thoughts = message.get("reasoning_content") or message.get("reasoning")
    if not content and isinstance(thoughts, str) and "</think>" in thoughts:
        # a server whose reasoning parser missed the end of the thoughts puts the whole reply there: what
        # follows the closing tag is the answer; thoughts alone never are (a model cut off while thinking)
        content = thoughts.rsplit("</think>", 1)[1].strip()
    if isinstance(content, list):  # content parts (Mistral's reasoning models): the text parts are the answer
        content = "".join(part["text"] for part in content if isinstance(part, dict)
                          and part.get("type") == "text" and isinstance(part.get("text"), str))
    if not isinstance(content, str):
        raise TypeError("message content is not text")
    if not content and isinstance(message.get("refusal"), str) and message["refusal"].strip():
        content = f"(the model refused: {message['refusal'].strip()})"  # kept in the transcript, names no type
    usage = data.get("usage")
    return content, usage if isinstance(usage, dict) else None, str(data.get("id") or ""), \
        str(data.get("system_fingerprint") or "")


def finish_reason(data: dict) -> str:
    """Why the server stopped the reply (``stop``, ``length`` at the token limit ...), ``""`` when not said."""
    try:
        return str(data["choices"][0].get("finish_reason") or "")
    except (KeyError, IndexError, TypeError, AttributeError):
        return ""


def certificate_problem(exc: BaseException) -> str:
    """Why the server's TLS certificate was refused (``certificate verify failed: self-signed
    certificate``), or ``""`` when ``exc`` is not a certificate failure."""
    failure = _caused_by(exc, ssl.SSLCertVerificationError)
    if failure is None:
        return ""
    reason = getattr(failure, "verify_message", "") or getattr(failure, "reason", "") or str(failure)
    return f"certificate verify failed: {reason}"


def retry_after_seconds(exc: BaseException, *, now: float | None = None) -> float | None:
    """The wait an error response asks for, in seconds; None if none.

    ``retry-after-ms`` (OpenAI's, milliseconds) or ``retry-after``: seconds, or an HTTP date (RFC 9110), read
    against ``now`` (``time.time()`` by default); a date already past asks for no wait. The caller bounds it.
    """
    response = getattr(exc, "response", None)
    if response is None:
        return None
    for header, scale in (("retry-after-ms", 0.001), ("retry-after", 1.0)):
        value = response.headers.get(header)
        if value is None:
            continue
        try:
            seconds = float(value) * scale
        except ValueError:
            seconds = _seconds_until(value, time.time() if now is None else now) if scale == 1.0 else None
        if seconds is not None and math.isfinite(seconds):
            return max(0.0, seconds)
    return None


def _seconds_until(http_date: str, now: float) -> float | None:
    """Seconds from ``now`` to an HTTP date (``Wed, 21 Oct 2015 07:28:00 GMT``), None if it is not one."""
    try:
        when = email.utils.parsedate_to_datetime(http_date)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:  # RFC 9110 dates are GMT; the obsolete forms may carry no zone
        when = when.replace(tzinfo=datetime.UTC)
    return when.timestamp() - now


def safe_message(exc: BaseException) -> str:
    """A one-line error without anything that could carry a credential."""
    status = getattr(exc, "status_code", None)
    text = scrub_secrets(" ".join(str(getattr(exc, "message", "") or exc).split()))[:240]
    return f"{type(exc).__name__}{f' {status}' if status else ''}: {text}"
