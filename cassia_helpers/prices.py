"""Model prices, and which model names are the same model.

A price applies to its model and to that model's dated snapshots only (``gpt-4o`` → ``gpt-4o-2024-08-06``),
never to another model whose name starts the same (``gpt-5-pro`` is not ``gpt-5``, ``o3-deep-research`` is
not ``o3``): a wrong price is worse than none, since an unknown price makes ``--max-cost`` a usage error
while a wrong one silently under-counts the spend. :func:`same_model` is that rule; the check of the model
a reply says answered uses it too.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

# USD per 1M tokens (input, output), from the providers' public price lists (2025).
# Prices change: override with --price-file or --input-price/--output-price.
DEFAULT_PRICES: dict[str, tuple[float, float]] = {
    "gpt-4o": (2.50, 10.00),
    "gpt-4o-2024-05-13": (5.00, 15.00),  # the first gpt-4o snapshot kept its launch price
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

# A dated snapshot's suffix: -2024-07-18 (OpenAI), -20250514 (Anthropic), -0613 / -2507 (month and day or
# year and month), or -latest (the alias of the newest snapshot).
SNAPSHOT_SUFFIX = re.compile(r"-(?:\d{4}-\d{2}-\d{2}|\d{8}|\d{4}|latest)$")


def _bare(name: str) -> str:
    """The model's own name: lower case, without a ``vendor/`` prefix (OpenRouter's ``openai/gpt-4o``)."""
    return name.strip().lower().rsplit("/", 1)[-1]


def same_model(name: str, model: str) -> bool:
    """Whether ``name`` is ``model`` or one of its dated snapshots (:data:`SNAPSHOT_SUFFIX`).

    Case is ignored, and so is a ``vendor/`` prefix on either name. ``gpt-4o-2024-08-06`` is ``gpt-4o``;
    ``gpt-4o-mini-2024-07-18``, ``gpt-4o-mini:free`` and ``gpt-5-pro`` are not ``gpt-4o`` / ``gpt-5``.
    """
    name, model = _bare(name), _bare(model)
    if name == model:
        return True
    suffix = SNAPSHOT_SUFFIX.search(name)
    return suffix is not None and name[:suffix.start()] == model


@dataclass(frozen=True)
class Price:
    input_per_1m: float
    output_per_1m: float
    known: bool

    def cost(self, input_tokens: int, output_tokens: int) -> float:
        return (input_tokens * self.input_per_1m + output_tokens * self.output_per_1m) / 1_000_000


def _usd(value: object, *, price_file: str | Path, model: str, side: str) -> float:
    """A price of ``price_file`` in USD per 1M tokens: a finite number, 0 or more.

    NaN or a negative price would make every cost NaN or negative, and the ``--max-cost`` budget would then
    never stop anything: a ``ValueError`` names the file, the model and the value, as for ``--input-price nan``.
    """
    try:
        price = float(value) if not isinstance(value, bool) else math.nan
    except (TypeError, ValueError):
        price = math.nan
    if not math.isfinite(price) or price < 0:
        raise ValueError(f"{price_file}: the {side} price of model {model!r} must be a finite number of USD "
                         f"per 1M tokens, 0 or more, got {value!r}")
    return price


class PriceTable:
    """Model → price. Unknown models cost 0 and are flagged ``known=False``.

    A model name matches its entry exactly (case ignored), else the entry it is the same model as
    (:func:`same_model`: a ``vendor/`` prefix, a dated snapshot); an entry for the snapshot itself wins.
    """

    def __init__(self, prices: dict[str, tuple[float, float]] | None = None) -> None:
        self.prices = dict(DEFAULT_PRICES if prices is None else prices)

    @classmethod
    def load(cls, price_file: str | Path | None = None, *, model: str = "", input_price: float | None = None,
             output_price: float | None = None) -> PriceTable:
        """Defaults, updated from a JSON file ``{"model": {"input": USD/1M, "output": USD/1M}}`` and flags.

        Raises
        ------
        ValueError
            The file cannot be read, is not such an object, or a price is not a finite number ≥ 0 (NaN or a
            negative price would silently turn the ``--max-cost`` budget off); the message names the file,
            and the model and the value when one price is wrong.
        """
        table = cls()
        if price_file:
            try:
                raw = json.loads(Path(price_file).read_text(encoding="utf-8"))
                entries = {name: (entry["input"], entry["output"]) for name, entry in raw.items()}
            except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
                raise ValueError(f"{price_file}: not a valid price file ({exc}); expected "
                                 '{"model": {"input": 0.15, "output": 0.6}}') from None
            for name, (input_usd, output_usd) in entries.items():
                table.prices[name] = (_usd(input_usd, price_file=price_file, model=name, side="input"),
                                      _usd(output_usd, price_file=price_file, model=name, side="output"))
        if model and (input_price is not None or output_price is not None):
            current = table.lookup(model)
            table.prices[model] = (
                current.input_per_1m if input_price is None else float(input_price),
                current.output_per_1m if output_price is None else float(output_price),
            )
        return table

    def lookup(self, model: str) -> Price:
        exact = [name for name in self.prices if name.lower() == model.strip().lower()]
        same = exact or [name for name in self.prices if same_model(model, name)]
        if not same:
            return Price(0.0, 0.0, known=False)
        # openai/gpt-4o-2024-05-13: the snapshot's own entry before gpt-4o's
        best = max(same, key=lambda name: (_bare(name) == _bare(model), len(name)))
        return Price(*self.prices[best], known=True)


def check_budget_prices(model: str, max_cost: float, price_file: str | Path | None = None,
                        input_price: float | None = None, output_price: float | None = None) -> str | None:
    """The one-line problem when ``max_cost`` cannot be enforced for ``model``, else ``None``.

    A budget needs a price: with an unknown model (not in the defaults nor in ``price_file``) and no
    ``input_price``/``output_price``, every call would cost $0 and the budget would never stop anything.
    A price file with a price that is not a finite number ≥ 0 is a problem whatever the budget.
    """
    try:
        table = PriceTable.load(price_file or None, model=model, input_price=input_price,
                                output_price=output_price)
    except ValueError as exc:
        return str(exc)
    if not max_cost or max_cost <= 0 or not model:
        return None
    if not table.lookup(model).known:
        return (f"--max-cost {max_cost:g} cannot be enforced: no known price for model {model!r}; "
                "give --price-file or --input-price and --output-price (USD per 1M tokens)")
    return None
