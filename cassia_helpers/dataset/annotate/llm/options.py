"""The LLM options of a batch, carried as one typed object from the settings to the client.

Each option is the batch setting of the same name, or of that name with the ``llm_`` prefix
(``timeout`` is ``--llm-timeout``); its default is that setting's default, so the settings table stays the
one declaration of both.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

from cassia_helpers.settings import BY_NAME


def setting_name(option: str) -> str:
    """The batch setting an option comes from."""
    return option if option in BY_NAME else f"llm_{option}"


def _default(option: str) -> Any:
    return BY_NAME[setting_name(option)].default


@dataclass(frozen=True)
class LLMOptions:
    """How to reach the model and what a dataset may spend on it.

    ``model`` and ``base_url`` name the model and its OpenAI-compatible endpoint; ``concurrency`` the
    requests in flight at once for the whole run; ``timeout`` the seconds to connect and of silence while a
    reply arrives; ``deadline`` the wall-clock seconds of one call, retries included; ``max_attempts`` the
    attempts per call; ``max_tokens`` the longest reply asked for; ``breaker_failures`` and
    ``breaker_cooldown`` the run-wide circuit breaker; ``use_cache`` and ``cache_dir`` the response cache;
    ``max_cost``, ``price_file``, ``input_price`` and ``output_price`` the budget and prices; ``seed`` the
    seed sent with each request.
    """

    model: str = _default("model")
    base_url: str = _default("base_url")
    concurrency: int = _default("concurrency")
    timeout: float = _default("timeout")
    deadline: float = _default("deadline")
    max_attempts: int = _default("max_attempts")
    max_tokens: int = _default("max_tokens")
    breaker_failures: int = _default("breaker_failures")
    breaker_cooldown: float = _default("breaker_cooldown")
    use_cache: bool = _default("use_cache")
    cache_dir: str = _default("cache_dir")
    max_cost: float = _default("max_cost")
    price_file: str = _default("price_file")
    input_price: float | None = _default("input_price")
    output_price: float | None = _default("output_price")
    seed: int = _default("seed")

    @classmethod
    def from_settings(cls, settings: Any) -> LLMOptions:
        """The options a batch's :class:`~cassia_helpers.settings.Settings` give."""
        return cls(**{f.name: getattr(settings, setting_name(f.name)) for f in fields(cls)})
