"""The token and cost ledger: one JSON record per request sent to the model server.

Each dataset's kernel appends to ``{dataset}_llm_calls.jsonl``; the aggregation notebook merges the
files into the run's ``token_tracking.json``. Cache hits are recorded too (``status="cache_hit"``, no
tokens, no cost) but are not API calls.

The ledger is written ahead: a ``pending`` line (with an estimated input size) goes to disk just before
the request's first byte leaves, and a final line with the same ``call_id`` when its reply (or error)
arrives. A request left pending by an interrupt or a killed kernel is read back as ``interrupted``:
counted as sent, with its estimated tokens marked ``estimated``. A request that never left (a refused
connection, an untrusted certificate, Ctrl-C while connecting) has no pending line and ends ``not_sent``,
which is not a call: the number of calls equals what the server received.
When a server reports no ``usage`` the tokens are estimated locally (characters / 4: no tokenizer that
works offline is available) and the record says ``estimated: true``.
"""

from __future__ import annotations

import json
import math
import os
import threading
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

OK, ERROR, CACHE_HIT, SKIPPED_BUDGET = "ok", "error", "cache_hit", "budget"
PENDING, INTERRUPTED, BREAKER_OPEN, NOT_SENT = "pending", "interrupted", "breaker_open", "not_sent"
# Statuses of requests that reached (or may have reached) the server: they count as calls.
SENT = (OK, ERROR, INTERRUPTED)
# Characters per token of the local estimate used when a server reports no usage.
CHARS_PER_TOKEN = 4
# No model reads or writes this many tokens in one request: a larger count is not a count. At the highest
# list prices (~$150 per 1M tokens) no single request can cost more than MAX_REQUEST_COST either.
MAX_PLAUSIBLE_TOKENS = 10_000_000
MAX_REQUEST_COST = 10_000.0

@dataclass
class CallRecord:
    """One request to the model server (or one cache hit)."""

    timestamp: str
    dataset: str
    tissue: str
    cluster: str
    agent: str
    model: str
    input_tokens: int
    output_tokens: int
    cost: float
    latency_s: float
    status: str
    error: str = ""
    attempt: int = 1
    price_known: bool = True
    endpoint_host: str = ""
    request_id: str = ""
    call_id: str = ""
    estimated: bool = False


class Ledger:
    """Thread-safe JSONL appender; one line per record, flushed at once so a crash loses nothing.

    ``records`` holds this process's final records (not the ``pending`` lines); :meth:`spent` adds the
    estimated cost of the requests still in flight.
    """

    def __init__(self, path: str | Path | None) -> None:
        self.path = Path(path) if path else None
        self._lock = threading.Lock()
        self.records: list[CallRecord] = []
        self._pending: dict[str, CallRecord] = {}
        self._written: set[str] = set()

    def _write(self, record: CallRecord) -> None:
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            line = (json.dumps(asdict(record), ensure_ascii=False) + "\n").encode()
            with open(self.path, "a+b") as handle:
                size = handle.seek(0, os.SEEK_END)
                if size and handle.seek(size - 1) >= 0 and handle.read(1) != b"\n":
                    line = b"\n" + line  # the last line was torn (a full disk, a kill): this record starts its own
                handle.write(line)
                handle.flush()
                os.fsync(handle.fileno())

    def add(self, record: CallRecord) -> None:
        """Record a finished request (or a cache hit, a budget skip); completes its pending line if any."""
        with self._lock:
            if record.call_id:
                self._pending.pop(record.call_id, None)
                self._written.discard(record.call_id)
            self.records.append(record)
            self._write(record)

    def begin(self, record: CallRecord, *, deferred: bool = False) -> None:
        """Hold the ``pending`` record of a request about to be sent (``record.call_id`` must be set); its
        line is written now, or with ``deferred`` by :meth:`mark_sent` when the request starts to leave.
        A held record counts in :meth:`spent` either way."""
        if not record.call_id:
            raise ValueError("a pending record needs a call_id")
        record.status = PENDING
        with self._lock:
            self._pending[record.call_id] = record
            if not deferred:
                self._written.add(record.call_id)
                self._write(record)

    def mark_sent(self, call_id: str) -> None:
        """Write the ``pending`` line of a request held by :meth:`begin` (once)."""
        with self._lock:
            record = self._pending.get(call_id)
            if record is not None and call_id not in self._written:
                self._written.add(call_id)
                self._write(record)

    def spent(self) -> float:
        with self._lock:
            return (sum(r.cost for r in self.records if r.status in SENT)
                    + sum(r.cost for r in self._pending.values()))


def resolve_pending(records: list[dict]) -> list[dict]:
    """Drop the ``pending`` lines that were completed; turn the others into ``interrupted`` calls.

    An interrupted call keeps its estimated input tokens and cost, ``output_tokens`` 0 and
    ``estimated: true``: the server probably received it, we never saw its reply.
    """
    finished = {r.get("call_id") for r in records if r.get("call_id") and r.get("status") != PENDING}
    resolved = []
    for record in records:
        if record.get("status") != PENDING:
            resolved.append(record)
        elif record.get("call_id") not in finished:
            resolved.append(dict(record, status=INTERRUPTED, estimated=True, output_tokens=0,
                                 error=record.get("error") or "no reply recorded (run interrupted)"))
    return resolved


def read_ledger(path: str | Path, *, resolve: bool = True) -> list[dict]:
    """Records of one JSONL ledger; a torn last line (a killed kernel) is skipped.

    With ``resolve`` (the default) pending requests are resolved by :func:`resolve_pending`; with
    ``resolve=False`` the lines are returned as written.
    """
    records = []
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except OSError:
        return records
    for line in lines:
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict):
            records.append(_checked(record))
    return resolve_pending(records) if resolve else records


def _plausible(value, most: float) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value <= most:
        return None  # also NaN, which compares False
    return value


def _count(value) -> int:
    """A token count read back from a ledger line: a whole number from 0 to MAX_PLAUSIBLE_TOKENS, else 0."""
    value = _plausible(value, MAX_PLAUSIBLE_TOKENS)
    return 0 if value is None else int(value)


def _checked(record: dict) -> dict:
    """A ledger line with numbers a sum can use: a line written by an older version may hold whatever a
    server sent (text, negative or absurd token counts, the cost computed from them); such a number reads
    as 0."""
    cost = _plausible(record.get("cost"), MAX_REQUEST_COST)
    cost = 0.0 if cost is None else float(cost)
    return dict(record, input_tokens=_count(record.get("input_tokens")),
                output_tokens=_count(record.get("output_tokens")), cost=cost)


def estimate_tokens(text: str) -> int:
    """A local token estimate: characters / 4, at least 1 for non-empty text.

    ``tiktoken`` would be closer for OpenAI models but downloads its encodings at run time, which a
    batch run without internet access cannot do; the estimate is marked ``estimated`` wherever it is used.
    """
    return (len(text) + CHARS_PER_TOKEN - 1) // CHARS_PER_TOKEN if text else 0


def format_cost(usd: float) -> str:
    """A cost in USD for people: cents for a cent or more (``$1.23``), two significant digits below
    (``$0.0042``, ``$0.000012``), so a small run never reads ``$0.00``."""
    if not usd or usd != usd:
        return "$0.00"
    if abs(usd) >= 0.01:
        return f"${usd:,.2f}"
    decimals = min(12, 1 - math.floor(math.log10(abs(usd))))
    return f"${usd:.{decimals}f}"


def _totals(records: list[dict]) -> dict:
    input_tokens = sum(int(r.get("input_tokens") or 0) for r in records)
    output_tokens = sum(int(r.get("output_tokens") or 0) for r in records)
    estimated = [r for r in records if r.get("estimated")]
    return {
        "calls": len(records),
        "failed_calls": sum(r.get("status") == ERROR for r in records),
        "interrupted_calls": sum(r.get("status") == INTERRUPTED for r in records),
        "input_tokens": input_tokens,
        "output_tokens": output_tokens,
        "total_tokens": input_tokens + output_tokens,
        "cost": round(sum(float(r.get("cost") or 0.0) for r in records), 6),
        "estimated_calls": len(estimated),
        "estimated_tokens": sum(int(r.get("input_tokens") or 0) + int(r.get("output_tokens") or 0)
                                for r in estimated),
    }


def tracking_from_ledgers(paths: Iterable[str | Path]) -> dict:
    """Merge dataset ledgers into the run's token record (the body of ``token_tracking.json``).

    Pending requests are resolved (:func:`resolve_pending`), so ``total_calls`` counts every request the
    server received, including those cut off by an interrupt; ``not_sent`` counts the requests that never
    reached it (refused connections, untrusted certificates), which are not calls. Token figures that are
    local estimates (no ``usage`` from the server, or interrupted calls) are counted in ``estimated_calls``
    / ``estimated_tokens`` and ``tokens_estimated`` is true when there are any. ``circuit_breaker`` lists
    the times requests were stopped because the server kept failing.
    """
    calls, hits, skipped, breaker, unsent = [], [], [], [], 0
    for path in paths:
        for record in read_ledger(path):
            status = record.get("status")
            if status == CACHE_HIT:
                hits.append(record)
            elif status == SKIPPED_BUDGET:
                skipped.append(record)
            elif status == BREAKER_OPEN:
                breaker.append({k: record.get(k, "") for k in ("timestamp", "dataset", "tissue", "error")})
            elif status in SENT:
                calls.append(record)
            elif status == NOT_SENT:
                unsent += 1
    calls.sort(key=lambda c: c.get("timestamp", ""))
    by_dataset, by_model = defaultdict(list), defaultdict(list)
    for call in calls:
        by_dataset[f"{call.get('tissue')}/{call.get('dataset')}"].append(call)
        by_model[call.get("model", "")].append(call)
    unknown_price = sorted({c.get("model", "") for c in calls if not c.get("price_known", True)})
    overall = _totals(calls)
    return {
        "total_calls": overall["calls"],
        "failed_calls": overall["failed_calls"],
        "interrupted_calls": overall["interrupted_calls"],
        "total_input_tokens": overall["input_tokens"],
        "total_output_tokens": overall["output_tokens"],
        "total_tokens": overall["total_tokens"],
        "total_cost": overall["cost"],
        "currency": "USD",
        "tokens_estimated": overall["estimated_calls"] > 0,
        "estimated_calls": overall["estimated_calls"],
        "estimated_tokens": overall["estimated_tokens"],
        "cache_hits": len(hits),
        "budget_skipped": len(skipped),
        "not_sent": unsent,
        "circuit_breaker": sorted(breaker, key=lambda e: e["timestamp"]),
        "unknown_price_models": unknown_price,
        "by_dataset": {k: _totals(v) for k, v in sorted(by_dataset.items())},
        "by_model": {k: {**_totals(v), "price_known": k not in unknown_price} for k, v in sorted(by_model.items())},
        "api_calls": calls,
        "cache_hit_calls": hits,
    }
