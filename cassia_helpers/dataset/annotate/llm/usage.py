"""The tokens a reply is billed for, from the ``usage`` a server reports, checked before they are believed.

A server's ``usage`` is what the ledger and the ``--max-cost`` budget count, so it is read as untrusted:
a field that is not a count, or a count no request could have (more input than the prompt could hold,
more output than ``max_tokens`` allowed, nothing at all for a non-empty prompt or reply), is replaced by
the local estimate (characters / 4) and the record is marked ``estimated``. Nothing a server reports can
lower the spend below what the request could have cost.

Thinking tokens are output tokens: OpenAI counts them inside ``completion_tokens``, while Gemini's
OpenAI-compatible endpoint leaves them out of it and shows them only in ``total_tokens`` (and
``completion_tokens_details.reasoning_tokens``). The billed output is therefore the larger of
``completion_tokens`` and ``total_tokens - prompt_tokens``, which counts them once either way.
"""

from __future__ import annotations

from typing import NamedTuple

from cassia_helpers.dataset.annotate.llm.untrusted import scrub_secrets
from cassia_helpers.ledger import MAX_PLAUSIBLE_TOKENS, estimate_tokens

#: a server's input count above this many times our estimate of the prompt is not believed
PROMPT_SLACK = 10
#: what a system prompt may add to the estimate of the messages (a provider's hidden instructions)
PROMPT_ALLOWANCE = 2_000


class ReplyTokens(NamedTuple):
    """The tokens a reply is billed for, and what the ledger line says about them."""

    input_tokens: int
    output_tokens: int
    note: str  # which counts were replaced or derived, "" when the server's counts were used as they are
    estimated: bool  # a count is the local estimate, not the server's


def usage_tokens(usage: dict | None, field: str) -> int | None:
    """A token count of a reply's ``usage``, or None when it is missing or not a count.

    Only a whole number from 0 to :data:`MAX_PLAUSIBLE_TOKENS` is a count (``12.0`` is 12): text
    (``"many"``), fractions, negative and absurd numbers are what a broken or hostile server sends, and
    they must neither lower the spend nor stop the run. The caller estimates what is None.
    """
    value = usage.get(field) if isinstance(usage, dict) else None
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    if isinstance(value, float) and not value.is_integer():
        return None
    return int(value) if 0 <= value <= MAX_PLAUSIBLE_TOKENS else None


def _possible_input(count: int | None, prompt_estimate: int) -> int | None:
    """``count`` if a prompt of ``prompt_estimate`` estimated tokens could have it, else None."""
    if count is None or count > PROMPT_SLACK * prompt_estimate + PROMPT_ALLOWANCE:
        return None
    return None if count == 0 and prompt_estimate > 0 else count  # 0/0 of Ollama and some proxies


def _possible_output(count: int | None, content: str, max_output: int) -> int | None:
    """``count`` if a reply of ``content`` under a ``max_output`` limit (0: none sent) could have it, else None."""
    if count is None or (max_output > 0 and count > max_output):
        return None
    return None if count == 0 and content.strip() else count


def reply_tokens(usage: dict | None, *, prompt_estimate: int, content: str, max_output: int = 0) -> ReplyTokens:
    """The input and output tokens a reply is billed for.

    Parameters
    ----------
    usage
        The reply's ``usage`` object, None when the server reported none.
    prompt_estimate
        The local estimate of the request's input tokens.
    content
        The reply's text.
    max_output
        The ``max_tokens`` the request sent, 0 when it sent none.

    Returns
    -------
    ReplyTokens
        The server's counts where :func:`usage_tokens` accepts them and they are possible: no more input
        than :data:`PROMPT_SLACK` times the estimate (plus :data:`PROMPT_ALLOWANCE`), no more output than
        ``max_output``, not zero for a non-empty prompt or reply. The output is the larger of
        ``completion_tokens`` and ``total_tokens - prompt_tokens`` (thinking tokens a server counts only in
        the total). A missing or impossible count is replaced by the local estimate and marked ``estimated``.
    """
    if usage is None:
        return ReplyTokens(prompt_estimate, estimate_tokens(content),
                           "no usage reported: tokens estimated from characters", True)
    prompt = _possible_input(usage_tokens(usage, "prompt_tokens"), prompt_estimate)
    completion = usage_tokens(usage, "completion_tokens")
    total = usage_tokens(usage, "total_tokens")
    output, notes = completion, []
    if completion is not None and prompt is not None and total is not None and total - prompt > completion:
        output = total - prompt
        notes.append(f"output tokens are total_tokens - prompt_tokens ({total} - {prompt} = {output}; "
                     f"completion_tokens {completion} leaves out the thinking tokens)")
    output = _possible_output(output, content, max_output)
    bad = [f"{field}={scrub_secrets(str(usage.get(field)))[:20]!r}" for field, counted in
           (("prompt_tokens", prompt), ("completion_tokens", output)) if counted is None]
    if bad:
        notes = [f"usage not a token count ({', '.join(bad)}): tokens estimated from characters"]
    return ReplyTokens(prompt_estimate if prompt is None else prompt,
                       estimate_tokens(content) if output is None else output, "; ".join(notes), bool(bad))
