"""The token and cost ledger: one JSON record per request sent to the model server.

Each dataset's kernel appends to ``{dataset}_llm_calls.jsonl``; the aggregation notebook merges the
files into the run's ``token_tracking.json``. Cache hits are recorded too (``status="cache_hit"``, no
tokens, no cost) but are not API calls.
"""

from __future__ import annotations

import json
import os
import threading
from dataclasses import asdict, dataclass
from pathlib import Path

OK, ERROR, CACHE_HIT, SKIPPED_BUDGET = "ok", "error", "cache_hit", "budget"
SENT = (OK, ERROR)

# USD per 1M tokens (input, output), from the providers' public price lists (2025).
# Prices change: override with --price-file or --input-price/--output-price.
DEFAULT_PRICES: dict[str, tuple[float, float]] = {
    "gpt-4o": (2.50, 10.00),
    "gpt-4o-mini": (0.15, 0.60),
    "gpt-4.1": (2.00, 8.00),
    "gpt-4.1-mini": (0.40, 1.60),
    "gpt-4.1-nano": (0.10, 0.40),
    "gpt-5": (1.25, 10.00),
    "gpt-5-mini": (0.25, 2.00),
    "gpt-5-nano": (0.05, 0.40),
    "o3": (2.00, 8.00),
    "o3-mini": (1.10, 4.40),
    "o4-mini": (1.10, 4.40),
    "claude-sonnet-4": (3.00, 15.00),
    "claude-3.5-haiku": (0.80, 4.00),
    "claude-3-5-haiku": (0.80, 4.00),
    "gemini-2.5-pro": (1.25, 10.00),
    "gemini-2.5-flash": (0.30, 2.50),
    "deepseek-chat": (0.27, 1.10),
    "deepseek-r1": (0.55, 2.19),
}


@dataclass(frozen=True)
class Price:
    input_per_1m: float
    output_per_1m: float
    known: bool

    def cost(self, input_tokens: int, output_tokens: int) -> float:
        return (input_tokens * self.input_per_1m + output_tokens * self.output_per_1m) / 1_000_000


class PriceTable:
    """Model → price. Unknown models cost 0 and are flagged ``known=False``.

    A model name matches its exact entry, then without a provider prefix (``openai/gpt-4o`` →
    ``gpt-4o``), then the longest entry it starts with (dated snapshots such as ``gpt-4o-2024-08-06``).
    """

    def __init__(self, prices: dict[str, tuple[float, float]] | None = None) -> None:
        self.prices = dict(DEFAULT_PRICES if prices is None else prices)

    @classmethod
    def load(cls, price_file: str | Path | None = None, *, model: str = "", input_price: float | None = None,
             output_price: float | None = None) -> PriceTable:
        """Defaults, updated from a JSON file ``{"model": {"input": USD/1M, "output": USD/1M}}`` and flags."""
        table = cls()
        if price_file:
            try:
                raw = json.loads(Path(price_file).read_text(encoding="utf-8"))
                for name, entry in raw.items():
                    table.prices[name] = (float(entry["input"]), float(entry["output"]))
            except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
                raise ValueError(f"{price_file}: not a valid price file ({exc}); expected "
                                 '{"model": {"input": 0.15, "output": 0.6}}') from None
        if model and (input_price is not None or output_price is not None):
            current = table.lookup(model)
            table.prices[model] = (
                current.input_per_1m if input_price is None else float(input_price),
                current.output_per_1m if output_price is None else float(output_price),
            )
        return table

    def lookup(self, model: str) -> Price:
        for name in (model, model.rsplit("/", 1)[-1]):
            if name in self.prices:
                return Price(*self.prices[name], known=True)
        base = model.rsplit("/", 1)[-1]
        candidates = [name for name in self.prices if base.startswith(name + "-")]
        if candidates:
            return Price(*self.prices[max(candidates, key=len)], known=True)
        return Price(0.0, 0.0, known=False)


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


class Ledger:
    """Thread-safe JSONL appender; one line per record, flushed at once so a crash loses nothing."""

    def __init__(self, path: str | Path | None) -> None:
        self.path = Path(path) if path else None
        self._lock = threading.Lock()
        self.records: list[CallRecord] = []

    def add(self, record: CallRecord) -> None:
        with self._lock:
            self.records.append(record)
            if self.path is not None:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                with open(self.path, "a", encoding="utf-8") as handle:
                    handle.write(json.dumps(asdict(record), ensure_ascii=False) + "\n")
                    handle.flush()
                    os.fsync(handle.fileno())

    def spent(self) -> float:
        with self._lock:
            return sum(r.cost for r in self.records if r.status in SENT)


def read_ledger(path: str | Path) -> list[dict]:
    """Records of one JSONL ledger; a torn last line (a killed kernel) is skipped."""
    records = []
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except OSError:
        return records
    for line in lines:
        try:
            records.append(json.loads(line))
        except ValueError:
            continue
    return records
