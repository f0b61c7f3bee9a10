"""Which annotator a run uses, built from its settings."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING

from cassia_helpers.dataset.annotate import Annotator

if TYPE_CHECKING:
    import pandas as pd
    from anndata import AnnData

    from cassia_helpers.settings import Settings


def llm_configured(base_url: str = "") -> bool:
    """An LLM is configured when an API key or a base URL is available."""
    return bool(os.environ.get("OPENAI_API_KEY") or base_url)


def make_annotator(settings: Settings, *, dataset: str = "", tissue: str = "", run_dir: str | Path = "",
                   ledger_path: str | Path | None = None, markers: pd.DataFrame | None = None,
                   adata: AnnData | None = None) -> Annotator:
    """The annotator ``settings.annotator`` names: ``"reference"`` (the offline marker reference) or ``"llm"``
    (CASSIA-style agents on an OpenAI-compatible endpoint, writing every request to ``ledger_path`` and
    sharing the run's request limit and budget through ``run_dir``). ``"auto"`` picks ``"llm"`` when an API
    key or a base URL is configured.

    With ``settings.pipeline == "full"`` (or several runs or models) the LLM agents run CASSIA's whole
    pipeline (:class:`~cassia_helpers.dataset.annotate.agents.pipeline.AnnotationPipeline`); the boost agent's gene
    requests are answered from ``markers``, the full marker table of every tested gene (with ``adata``
    for genes that were not tested)."""
    kind = settings.annotator
    if kind == "auto":
        kind = "llm" if llm_configured(settings.base_url) else "reference"
    if kind == "reference":
        from cassia_helpers.dataset.annotate.reference.annotator import ReferenceAnnotator

        return ReferenceAnnotator(species=settings.species)
    from cassia_helpers.dataset.annotate.agents.annotator import LLMAnnotator
    from cassia_helpers.dataset.annotate.llm.options import LLMOptions

    agents = LLMAnnotator(LLMOptions.from_settings(settings), species=settings.species, ledger_path=ledger_path,
                          dataset=dataset, tissue=tissue, run_dir=str(run_dir))
    if settings.pipeline == "fast" and settings.n_runs == 1 and not settings.models:
        return agents
    from cassia_helpers.dataset.annotate.agents.boost import GeneLookup
    from cassia_helpers.dataset.annotate.agents.pipeline import AnnotationPipeline, PipelineSettings
    from cassia_helpers.dataset.record import cluster_key

    lookup = None
    if markers is not None:
        lookup = GeneLookup(markers, adata=adata, groupby=cluster_key(adata) if adata is not None else "leiden")
    options = PipelineSettings.from_options(
        pipeline=settings.pipeline, boost_below=settings.boost_below, boost_rounds=settings.boost_rounds,
        n_runs=settings.n_runs, models=settings.models, agreement_threshold=settings.agreement_threshold)
    return AnnotationPipeline(agents, options, lookup=lookup)


def check_llm_setup(settings: Settings) -> None:
    """The checks every run (fresh or resumed) makes before it starts: an LLM run can reach a model, and a
    budget can be held.

    Raises
    ------
    UsageError
        ``annotator="llm"`` with neither ``OPENAI_API_KEY`` nor a base URL, ``max_cost`` for a model
        without a known price, or a ``--cache-dir`` that cannot be written (:func:`check_cache_dir`).
    """
    from cassia_helpers.settings import UsageError

    if settings.annotator != "llm":
        return
    if not llm_configured(settings.base_url):
        raise UsageError("--annotator llm needs OPENAI_API_KEY in the environment, or --base-url for a local "
                         "server that needs no key")
    from cassia_helpers.prices import check_budget_prices
    from cassia_helpers.settings import voting_models

    # the price flags are --model's: the other models of --models need the price file or a known price
    for model in voting_models(settings.model, settings.models):
        primary = model == settings.model
        problem = check_budget_prices(model, settings.max_cost, settings.price_file or None,
                                      settings.input_price if primary else None,
                                      settings.output_price if primary else None)
        if problem:
            raise UsageError(problem)
    if settings.use_cache:
        check_cache_dir(settings.cache_dir)


def check_cache_dir(cache_dir: str) -> None:
    """The response cache can be written before any request is paid for.

    A ``--cache-dir`` the user chose that cannot be written is a usage error: it is a typo or a wrong
    mount, and the run would silently pay again for what it meant to reuse. The default folder (under
    ``$HOME``, often read-only on compute nodes) that cannot be written only warns: the run goes on
    without the cache, as each dataset's kernel does where its own node's folder cannot be written.
    """
    from cassia_helpers.dataset.annotate.llm.cache import cache_problem
    from cassia_helpers.settings import UsageError

    problem = cache_problem(cache_dir or None)
    if problem and cache_dir:
        raise UsageError(f"--cache-dir {problem}: give a writable folder, or --no-cache")
    if problem:
        logging.getLogger("cassia_helpers").warning(
            f"warning: the LLM response cache cannot be written ({problem}): the run goes on without it "
            "(give a writable --cache-dir to reuse answers)")
