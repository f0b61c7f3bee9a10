"""``--dry-run``: what a batch would process and what its annotation could cost; nothing is sent or written."""

from __future__ import annotations

import math

import h5py

from .annotate import ClusterMarkers
from .annotate.agents import ANNOTATOR_SYSTEM, FORMATTER_SYSTEM, VALIDATOR_SYSTEM, cluster_prompt
from .config import BatchConfig
from .discovery import discover
from .ledger import PriceTable

# Rough completion sizes of our agents (tokens), from the scripted and real runs' ledgers.
OUTPUT_TOKENS = {"annotator": 450, "formatter": 150, "validator": 120}
CHARS_PER_TOKEN = 4


def _shape(path) -> tuple[int, int] | str:
    try:
        with h5py.File(path, "r") as handle:
            n_obs = len(handle["obs"][handle["obs"].attrs.get("_index", "_index")])
            n_vars = len(handle["var"][handle["var"].attrs.get("_index", "_index")])
            return n_obs, n_vars
    except Exception as exc:  # noqa: BLE001 - reported, not raised: the real run will fail it cleanly
        return f"unreadable ({type(exc).__name__})"


def cluster_range(n_cells: int) -> tuple[int, int]:
    """A generous range of leiden clusters at resolution 1 for a dataset of ``n_cells``."""
    return max(1, min(5, n_cells // 50)), max(2, min(80, int(6 * math.log10(max(n_cells, 10)) ** 1.5)))


def tokens_per_cluster(n_markers: int, *, tissue: str, species: str, max_rounds: int = 2) -> dict[str, tuple]:
    """(input, output) tokens of one cluster's calls: best case (validated at once) and worst case."""
    markers = ClusterMarkers("0", [f"GENE{i:05d}" for i in range(n_markers)], n_cells=1000)
    prompt = cluster_prompt(markers, tissue=tissue, species=species, context="")
    annotator_in = (len(ANNOTATOR_SYSTEM) + len(prompt)) // CHARS_PER_TOKEN
    analysis = OUTPUT_TOKENS["annotator"]
    formatter_in = (len(FORMATTER_SYSTEM) + len(prompt)) // CHARS_PER_TOKEN + analysis
    validator_in = (len(VALIDATOR_SYSTEM) + len(prompt)) // CHARS_PER_TOKEN + analysis + OUTPUT_TOKENS["formatter"]
    best_in = annotator_in + formatter_in + validator_in
    best_out = sum(OUTPUT_TOKENS.values())
    # later rounds resend the growing conversation; the formatter may fall back twice
    revision = analysis + OUTPUT_TOKENS["validator"] + 60
    worst_in = sum(best_in + r * revision for r in range(max_rounds)) + 2 * formatter_in
    return {"calls": (3, max_rounds * 5), "input": (best_in, worst_in),
            "output": (best_out, max_rounds * best_out + 300)}


def dry_run(config: BatchConfig) -> str:
    """A table of the datasets that would run, with an estimate of calls, tokens and cost."""
    datasets = discover(config.data_dir, config.tissues)
    analysis = config.analysis
    llm = analysis.annotator == "llm"
    price = PriceTable.load(analysis.price_file or None, model=analysis.model, input_price=analysis.input_price,
                            output_price=analysis.output_price).lookup(analysis.model)
    lines = [f"Dry run: {len(datasets)} dataset(s) would be processed; nothing is sent or written.",
             f"Annotator: {analysis.annotator}" + (f" (model {analysis.model})" if llm else
                                                    " (offline reference: no API calls)"), ""]
    header = f"{'tissue':<14} {'dataset':<36} {'cells':>9} {'genes':>7} {'clusters':>9} {'calls':>11} {'tokens':>17}"
    lines += [header, "-" * len(header)]
    totals = [0, 0, 0, 0, 0.0, 0.0]
    for dataset in datasets:
        shape = _shape(dataset.path)
        if isinstance(shape, str):
            lines.append(f"{dataset.tissue:<14} {dataset.name:<36} {shape}")
            continue
        low, high = cluster_range(shape[0])
        per = tokens_per_cluster(analysis.n_markers, tissue=dataset.tissue, species=analysis.species)
        calls = (low * per["calls"][0], high * per["calls"][1]) if llm else (0, 0)
        tokens = ((low * (per["input"][0] + per["output"][0]), high * (per["input"][1] + per["output"][1]))
                  if llm else (0, 0))
        cost = (price.cost(low * per["input"][0], low * per["output"][0]),
                price.cost(high * per["input"][1], high * per["output"][1])) if llm else (0.0, 0.0)
        for i, value in enumerate((*calls, *tokens, *cost)):
            totals[i] += value
        lines.append(f"{dataset.tissue:<14} {dataset.name:<36} {shape[0]:>9,} {shape[1]:>7,} {f'{low}-{high}':>9} "
                     f"{f'{calls[0]}-{calls[1]}':>11} {f'{tokens[0]:,}-{tokens[1]:,}':>17}")
    lines += ["", f"Estimated API calls: {totals[0]:,}-{totals[1]:,} (before retries; cached answers cost nothing)",
              f"Estimated tokens: {totals[2]:,}-{totals[3]:,}",
              f"Estimated cost: ${totals[4]:.2f}-${totals[5]:.2f}"
              + ("" if price.known or not llm else f" (no known price for {analysis.model}: set --price-file)")]
    if analysis.max_cost:
        lines.append(f"Budget (--max-cost): ${analysis.max_cost:.2f}")
    return "\n".join(lines)
