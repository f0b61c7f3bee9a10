"""Model text is untrusted input: scrub credentials, cap sizes, make labels safe to plot and to export.

A model (or a proxy in front of it) may answer with megabytes, with newlines or formulas in a cell-type
name, or with our own API key echoed back. Everything a reply puts into an output goes through here.
"""

from __future__ import annotations

import base64
import functools
import os
import re

from cassia_helpers.files import csv_safe

# What one reply may put into the transcript, the cache and the ledger.
MAX_REPLY_CHARS = 20_000
# Longest cell-type label kept (longer ones are cut with an ellipsis).
MAX_LABEL_CHARS = 100
# Longest free-text reasoning kept per cluster.
MAX_REASONING_CHARS = 2_000
# A cell starting with one of these is a formula in spreadsheet programs.
REDACTED = "[redacted]"
_CONTROL = re.compile(r"[\x00-\x1f\x7f\u2028\u2029]")
# A terminal escape sequence (colours, clearing the screen) goes whole, not only its ESC
_ESCAPE_SEQUENCE = re.compile(r"\x1b(?:\[[0-?]*[ -/]*[@-~]|\][^\x07\x1b]*(?:\x07|\x1b\\)?|[@-Z\\-_])")
# Zero-width characters and bidirectional overrides: invisible, they make "T\u200bcell" a label of its own and
# reverse what a person reads
_INVISIBLE = re.compile(r"[\u00ad\u200b-\u200f\u202a-\u202e\u2060-\u2069\ufeff]")
# What may stand between two characters of an echoed key: a line wrapped (with its indent, or as a JSON "\n"),
# invisible characters
_GAP = r"(?:\s|\\[nrt]|[\u00ad\u200b-\u200f\u2060\ufeff]){0,8}"
# Keys shorter than this are not scrubbed: replacing a 3-character "key" would mangle ordinary text.
_MIN_SECRET_CHARS = 8


def secrets_to_scrub() -> list[str]:
    """The credentials of this process that must never be stored (``OPENAI_API_KEY``)."""
    key = (os.environ.get("OPENAI_API_KEY") or "").strip()
    return [key] if len(key) >= _MIN_SECRET_CHARS else []


def scrub_secrets(text: str, secrets: list[str] | None = None) -> str:
    """``text`` with every occurrence of the API key replaced by ``[redacted]``: as it is, in another case,
    reversed, wrapped over lines, with invisible characters between its own, with its characters written as
    JSON ``\\u0073``, URL ``%2D`` or HTML ``&#115;`` escapes, in hex, or in base64 (alone, wrapped, or inside an
    HTTP Basic credential), and any third of it or more quoted alone (the key cut in two around other text): a
    model or proxy echoing the key in any of these gives it away as surely as in plain text."""
    for secret in secrets_to_scrub() if secrets is None else secrets:
        if secret:
            text = text.replace(secret, REDACTED)
            for pattern in _encoded(secret) + _encoded(secret[::-1]):
                text = pattern.sub(REDACTED, text)
    return text


@functools.lru_cache(maxsize=8)
def _encoded(secret: str) -> tuple[re.Pattern, ...]:
    """Patterns of the secret's encodings: each character as itself (any case) or escaped; its hex; the
    base64 of it at each of the three byte alignments (its part that does not depend on the bytes around)."""
    forms = [f"(?:{re.escape(c)}|\\\\u{ord(c):04x}|&#{ord(c)};|&#x{ord(c):x};"
             + (f"|%{ord(c):02x})" if ord(c) < 128 else ")") for c in secret]
    patterns = [re.compile(_GAP.join(forms), re.IGNORECASE),
                re.compile(re.escape(secret.encode().hex()), re.IGNORECASE)]
    # a long piece of the key alone (the key cut in two around other text); the shortest piece is a third of it
    piece = max(12, len(secret) // 3)
    if len(secret) >= 2 * piece:
        starts = "|".join(_GAP.join(forms[i:i + piece]) for i in range(len(secret) - piece + 1))
        patterns.append(re.compile(f"(?:{starts})(?:{_GAP}[^\\s\"',;]){{0,{len(secret)}}}", re.IGNORECASE))
    raw = secret.encode()
    for offset in range(3):
        encoded = base64.b64encode(b"\0" * offset + raw).decode()
        core = encoded[-(-8 * offset // 6):-3]  # the characters made of the secret's bits only
        if len(core) >= _MIN_SECRET_CHARS:
            url_safe = core.replace("+", "-").replace("/", "_")
            # base64 as mail and PEM write it is wrapped at 64 or 76 characters
            patterns += [re.compile(r"\s{0,2}".join(map(re.escape, form))) for form in dict.fromkeys((core, url_safe))]
    return tuple(patterns)


def cap_text(text: str, limit: int = MAX_REPLY_CHARS) -> str:
    """``text`` cut to ``limit`` characters, saying how much was dropped."""
    if len(text) <= limit:
        return text
    return text[:limit] + f"\n[... {len(text) - limit} more characters not kept]"


def _shown(text: str) -> str:
    """``text`` without terminal escape sequences (``cat`` on an audit file must not clear the screen), the key
    scrubbed (an escape or invisible character inside it hides it no more), without invisible characters."""
    return _INVISIBLE.sub("", scrub_secrets(_ESCAPE_SEQUENCE.sub("", text)))


def untrusted_reply(text: str | None, limit: int = MAX_REPLY_CHARS) -> str:
    """A model reply as it may be stored (:func:`_shown`), control characters but newlines and tabs turned into
    spaces, the size capped."""
    return cap_text(_CONTROL.sub(lambda m: m.group() if m.group() in "\n\t" else " ", _shown(text or "")), limit)


def sanitize_label(text: object, max_chars: int = MAX_LABEL_CHARS) -> str:
    """A cell-type label fit for ``obs``, plots, CSV and text summaries.

    One line (control characters and runs of whitespace become one space), no leading formula
    characters (``= + - @``) nor surrounding quotes/markdown, at most ``max_chars`` characters
    (cut with ``…``), the API key scrubbed. May return ``""`` when nothing is left.
    """
    label = _CONTROL.sub(" ", _shown(str(text or "")))
    label = " ".join(label.split())
    label = label.strip("*_`\"' ").lstrip("=+-@ ").strip()
    if len(label) > max_chars:
        label = label[: max_chars - 1].rstrip() + "…"
    return label


def sanitize_text(text: object, max_chars: int = MAX_REASONING_CHARS) -> str:
    """Free text (reasoning) kept from a model answer: the key scrubbed, control characters removed,
    at most ``max_chars`` characters."""
    cleaned = _CONTROL.sub(lambda m: "\n" if m.group() == "\n" else " ", _shown(str(text or "")))
    return cap_text(cleaned.strip(), max_chars)


__all__ = [
    "MAX_LABEL_CHARS", "MAX_REASONING_CHARS", "MAX_REPLY_CHARS", "cap_text", "csv_safe", "sanitize_label",
    "sanitize_text", "scrub_secrets", "secrets_to_scrub", "untrusted_reply",
]
