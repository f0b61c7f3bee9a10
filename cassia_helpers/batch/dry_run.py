"""``--dry-run``: what a batch would process and what its annotation could cost; nothing is sent or written."""

from __future__ import annotations

import math
import socket

from cassia_helpers.batch.discovery import discover, single_input
from cassia_helpers.batch.manifest import dataset_settings, read_manifest_csv
from cassia_helpers.dataset.annotate import ClusterMarkers
from cassia_helpers.dataset.annotate.agents.prompts import (
    ANNOTATOR_SYSTEM,
    FORMATTER_SYSTEM,
    REFERENCE_NOTE_CHARS,
    VALIDATOR_SYSTEM,
    cluster_prompt,
)
from cassia_helpers.inputs import InputError, check_input
from cassia_helpers.ledger import format_cost
from cassia_helpers.prices import PriceTable
from cassia_helpers.settings import Settings, context_text, voting_models

# Rough completion sizes of our agents (tokens), from the scripted and real runs' ledgers.
OUTPUT_TOKENS = {"annotator": 450, "formatter": 150, "validator": 120}
CHARS_PER_TOKEN = 4


def cluster_range(n_cells: int) -> tuple[int, int]:
    """A generous range of leiden clusters at resolution 1 for a dataset of ``n_cells``."""
    return max(1, min(5, n_cells // 50)), max(2, min(80, int(6 * math.log10(max(n_cells, 10)) ** 1.5)))


def tokens_per_cluster(n_markers: int, *, tissue: str, species: str, context: str = "",
                       max_rounds: int = 2) -> dict[str, tuple]:
    """(input, output) tokens of one cluster's calls: best case (validated at once) and worst case. Every
    prompt part counts: the agents' instructions, the markers, tissue, species and ``context``."""
    markers = ClusterMarkers("0", [f"GENE{i:05d}" for i in range(n_markers)], n_cells=1000)
    prompt = cluster_prompt(markers, tissue=tissue, species=species, context=context)
    annotator_in = (len(ANNOTATOR_SYSTEM) + len(prompt)) // CHARS_PER_TOKEN
    analysis = OUTPUT_TOKENS["annotator"]
    formatter_in = (len(FORMATTER_SYSTEM) + len(prompt)) // CHARS_PER_TOKEN + analysis
    validator_in = ((len(VALIDATOR_SYSTEM) + len(prompt) + REFERENCE_NOTE_CHARS) // CHARS_PER_TOKEN + analysis
                    + OUTPUT_TOKENS["formatter"])
    best_in = annotator_in + formatter_in + validator_in
    best_out = sum(OUTPUT_TOKENS.values())
    # later rounds resend the growing conversation; the formatter may fall back twice
    revision = analysis + OUTPUT_TOKENS["validator"] + 60
    worst_in = sum(best_in + r * revision for r in range(max_rounds)) + 2 * formatter_in
    return {"calls": (3, max_rounds * 5), "input": (best_in, worst_in),
            "output": (best_out, max_rounds * best_out + 300)}


def per_cluster(settings: Settings, *, tissue: str) -> dict[str, tuple]:
    """Calls and tokens of one cluster for the steps switched on (``--pipeline``, ``--n-runs``, ``--models``):
    the single pass's token sizes scaled by the pipeline's bounded call counts."""
    from cassia_helpers.dataset.annotate.agents.pipeline import PipelineSettings, estimate_calls

    single = tokens_per_cluster(settings.n_markers, tissue=tissue, species=settings.species,
                                context=context_text(settings))
    options = PipelineSettings.from_options(
        pipeline=settings.pipeline, boost_below=settings.boost_below, boost_rounds=settings.boost_rounds,
        n_runs=settings.n_runs, models=settings.models, agreement_threshold=settings.agreement_threshold)
    estimate = estimate_calls(options, model=settings.model)
    low, high = estimate["per_cluster"]
    scale = (low / single["calls"][0], high / single["calls"][1])
    # each other model annotates every cluster n_runs times; the rest (scores, boosts, merges) is --model's
    others = voting_models(settings.model, settings.models)[1:]
    each = tuple(options.n_runs * estimate["annotate"][i] / total for i, total in enumerate((low, high)))
    shares = {m: each for m in others}
    shares[settings.model] = tuple(1 - len(others) * share for share in each)
    return {"calls": (round(low), round(high)), "shares": shares,
            **{part: (round(single[part][0] * scale[0]), round(single[part][1] * scale[1]))
               for part in ("input", "output")}}


def where_it_runs(settings: Settings) -> tuple[list[str], str]:
    """Lines on where the datasets would run, and the problem that would stop the run there (``""``: none).

    With ``--cluster slurm`` the job script is built as the run builds it and given to ``sbatch --test-only``
    (nothing is submitted); with ``--scheduler`` the scheduler's address is tried.
    """
    from cassia_helpers.batch.dask.client import ClusterError

    if settings.scheduler:
        from urllib.parse import urlsplit

        parts = urlsplit(settings.scheduler if "://" in settings.scheduler else f"tcp://{settings.scheduler}")
        try:
            socket.create_connection((parts.hostname or "", parts.port or 8786), timeout=5).close()
        except (OSError, ValueError) as exc:
            return [], f"the Dask scheduler {settings.scheduler} cannot be reached ({exc})"
        return [f"Datasets run on the workers of the Dask scheduler {settings.scheduler} (reachable)."], ""
    if settings.cluster != "slurm":
        return [], ""
    from cassia_helpers.batch.dask.slurm import check_job_script, cluster_options, slurm_cluster

    try:
        options = cluster_options(settings)
        jobs = settings.slurm_jobs or settings.workers
        said = (f"Datasets run in {jobs} SLURM job(s) at a time in {options['queue'] or 'the default partition'}, "
                f"each with {options['memory']} and {options['cores']} core(s) for {options['walltime']}")
        # no log folder: a dry run writes nothing (the -e/-o lines are not what sbatch --test-only checks)
        cluster = slurm_cluster({**options, "log_directory": ""}, name="cassia-dry-run")
        try:
            waits = check_job_script(cluster)
        finally:
            cluster.close()
    except ClusterError as exc:
        return [], str(exc)
    return [said + (f"; {waits}." if waits else " (sbatch --test-only accepts the job script).")], ""


def dry_run(settings: Settings) -> tuple[str, bool]:
    """A table of the datasets that would run, with an estimate of calls, tokens and cost, and whether every
    input can run (each is checked from its header, as the real run does before starting a kernel)."""
    if settings.manifest is not None:
        found = read_manifest_csv(settings.manifest)
    else:
        found = (single_input(settings.input, settings.tissue) if settings.input is not None
                 else discover(settings.data_dir, settings.tissues))
    llm = settings.annotator == "llm"
    prices = PriceTable.load(settings.price_file or None, model=settings.model, input_price=settings.input_price,
                             output_price=settings.output_price)
    lines = [f"Dry run: {len(found.datasets)} dataset(s) would be processed; nothing is sent or written.",
             f"Annotator: {settings.annotator}" + (f" (model {settings.model}, pipeline {settings.pipeline})" if llm
                                                    else " (offline reference: no API calls)"), ""]
    header = f"{'tissue':<14} {'dataset':<36} {'cells':>9} {'genes':>7} {'clusters':>9} {'calls':>11} {'tokens':>17}"
    lines += [header, "-" * len(header)]
    totals = [0, 0, 0, 0, 0.0, 0.0]
    problems, unpriced = [], set()
    for dataset in found.datasets:
        try:
            shape = check_input(dataset.path, obs_keys=dataset_settings(settings, dataset).obs_keys())
        except InputError as exc:
            problems.append(str(exc))
            lines.append(f"{dataset.tissue:<14} {dataset.name:<36} cannot run: see below")
            continue
        n_obs, n_vars = shape["n_obs"] or 0, shape["n_vars"] or 0
        low, high = (shape["n_clusters"],) * 2 if shape.get("n_clusters") else cluster_range(n_obs)
        per = per_cluster(dataset_settings(settings, dataset), tissue=dataset.tissue)
        calls = (low * per["calls"][0], high * per["calls"][1]) if llm else (0, 0)
        tokens = ((low * (per["input"][0] + per["output"][0]), high * (per["input"][1] + per["output"][1]))
                  if llm else (0, 0))
        cost = tuple(sum(prices.lookup(model).cost(n * per["input"][i] * share[i], n * per["output"][i] * share[i])
                         for model, share in per["shares"].items())
                     for i, n in enumerate((low, high))) if llm else (0.0, 0.0)
        unpriced.update(model for model in per["shares"] if not prices.lookup(model).known)
        for i, value in enumerate((*calls, *tokens, *cost)):
            totals[i] += value
        lines.append(f"{dataset.tissue:<14} {dataset.name:<36} {n_obs:>9,} {n_vars:>7,} {f'{low}-{high}':>9} "
                     f"{f'{calls[0]}-{calls[1]}':>11} {f'{tokens[0]:,}-{tokens[1]:,}':>17}")
    lines += ["", f"Estimated API calls: {totals[0]:,}-{totals[1]:,} (before retries; cached answers cost nothing)",
              f"Estimated tokens: {totals[2]:,}-{totals[3]:,}",
              f"Estimated cost: {format_cost(totals[4])}-{format_cost(totals[5])}"
              + (f" (no known price for {', '.join(sorted(unpriced))}: set --price-file)" if unpriced and llm
                 else "")]
    if settings.max_cost:
        lines.append(f"Budget (--max-cost): {format_cost(settings.max_cost)}")
    if found.skipped:
        lines += ["", "Skipped entries:"] + [f"  {line}" for line in found.skipped]
    if problems:
        lines += ["", f"{len(problems)} input(s) cannot run:"] + [f"  {line}" for line in problems]
    where, refused = where_it_runs(settings)
    lines += ["", *where] if where else []
    if refused:
        lines += ["", f"The run could not start: {refused}"]
    return "\n".join(lines), not problems and not refused
