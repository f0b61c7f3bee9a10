#!/usr/bin/env python
"""LLM annotation throughput, calls and tokens, offline, against the scripted OpenAI-compatible server.

``tests/scripted_llm_server.ScriptedLLMServer`` answers as the CASSIA-style agents (annotator,
formatter, validator) from a small marker table and sleeps ``--latency`` seconds (default 1 s) per
request, like a remote model. Our ``cassia_helpers.dataset.annotate.agents.annotator.LLMAnnotator`` annotates
``--clusters`` clusters (default 30) three times:

1. ``concurrency = --llm-concurrency`` (default 8), empty response cache;
2. ``concurrency = 1`` (one request at a time), another empty cache;
3. the first configuration again with run 1's cache: a cached rerun (target: 0 requests).

Then the annotation pipelines (``--pipelines``, on by default), each with an empty cache: ``fast`` (the
single pass above) and ``full`` (score every cluster, boost those scored under 75 or Unknown with gene
look-ups in the full differential expression, re-score, merge), reporting requests, prompt tokens and
wall time per cluster and the share of clusters boosted (goal: ``full`` <= 6 requests and <= 4,000 prompt
tokens per cluster when a third of the clusters are boosted). In ``synthetic`` mode every third cluster
carries a single canonical marker, so about a third are scored weak and boosted.

Cluster markers (``--markers``):

* ``pbmc`` (default): real PBMC clusters — scanpy's bundled ``pbmc68k_reduced`` (700 cells), leiden on
  its kNN graph at the lowest resolution giving ≥ N clusters, markers by our ``rank_markers`` +
  ``cluster_markers`` (top 50 passing genes, the template's defaults); the first N clusters are used.
* ``synthetic``: N lists of 50 genes: 2-4 canonical markers of a cell type (cycled over the server's
  table) mixed into filler genes.

How to read the output: ``wall s`` is the time of ``annotate()``; the ideal serial time is
requests × latency, and the ideal concurrent time is ceil(N / concurrency) waves × sequential calls per
cluster × latency. ``requests`` and ``by agent`` come from the server's stats (what was really sent);
tokens per cluster come from the ledger JSONL the annotator writes (``ledger_path``), by agent.
Everything runs in this one process; the API key is a dummy (``OPENAI_API_KEY``), and
``OPENAI_BASE_URL`` is removed from the environment so the scripted server is used.

Usage::

    python bench/llm_annotation.py
    python bench/llm_annotation.py --latency 0.5 --clusters 60 --llm-concurrency 16 --markers synthetic
    python bench/llm_annotation.py --selection    # the marker selections compared (bench/_selection.py)
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import _common

_common.set_threads()
_common.ensure_path()


def pbmc_clusters(n: int):
    """ClusterMarkers of n real PBMC clusters (pbmc68k_reduced, leiden, our marker helpers)."""
    import anndata as ad
    import scanpy as sc

    import cassia_helpers as ch

    sc.settings.verbosity = 0
    reduced = sc.datasets.pbmc68k_reduced()
    adata = ad.AnnData(X=reduced.raw.X.copy(), obs=reduced.obs[[]].copy(), var=reduced.raw.var[[]].copy())
    adata.obsp["connectivities"] = reduced.obsp["connectivities"]
    adata.obsp["distances"] = reduced.obsp["distances"]
    adata.uns["neighbors"] = reduced.uns["neighbors"]
    resolution = 1.0
    while True:
        sc.tl.leiden(adata, resolution=resolution, flavor="igraph", n_iterations=2, directed=False,
                     random_state=0)
        if adata.obs["leiden"].nunique() >= n or resolution > 20:
            break
        resolution *= 1.25
    table = ch.rank_markers(adata, max_cells_per_cluster=1000, n_genes=None)
    clusters = ch.cluster_markers(adata, table, n_top=50)
    from cassia_helpers.dataset.annotate.agents.boost import GeneLookup

    lookup = GeneLookup(table, adata=adata)
    return (clusters[:n], f"pbmc68k_reduced leiden res {resolution:.2f} ({adata.obs['leiden'].nunique()} "
            "clusters)", lookup)


def synthetic_clusters(n: int):
    import random

    import pandas as pd

    from cassia_helpers.dataset.annotate import ClusterMarkers
    from cassia_helpers.dataset.annotate.agents.boost import GeneLookup
    from tests.scripted_llm_server import CELL_TYPES, _type_markers

    rng = random.Random(0)
    types = list(CELL_TYPES)
    filler = [f"GENE{i}" for i in range(2000)]
    out, rows = [], []
    for i in range(n):
        cell_type = types[i % len(types)]
        own = list(CELL_TYPES[cell_type][0])[:1 if i % 3 == 2 else None]  # every third cluster is weak
        genes = rng.sample(filler, 50 - len(own))
        for g in own:
            genes.insert(rng.randrange(0, 15), g)
        out.append(ClusterMarkers(cluster=str(i), genes=genes[:50], n_cells=rng.randrange(50, 3000)))
        # the full differential expression: the type's other markers are there, below the top 50
        rows += [dict(cluster=str(i), rank=60 + k, gene=g, score=5.0, logfoldchange=2.5, pval=1e-8, pval_adj=1e-6,
                      pct_in_cluster=0.8, pct_out_cluster=0.1) for k, g in enumerate(_type_markers(cell_type))]
    lookup = GeneLookup(pd.DataFrame(rows), var_names=filler + [g for t in types for g in _type_markers(t)])
    return out, f"synthetic ({len(types)} cell types cycled, every third cluster weak)", lookup


def run(server, clusters, *, concurrency: int, cache_dir: Path, ledger: Path, model: str):
    from cassia_helpers.dataset.annotate.agents.annotator import LLMAnnotator
    from cassia_helpers.dataset.annotate.llm.options import LLMOptions
    from cassia_helpers.ledger import read_ledger

    server.reset_stats()
    annotator = LLMAnnotator(LLMOptions(model=model, base_url=server.base_url, concurrency=concurrency,
                                        cache_dir=str(cache_dir)), ledger_path=ledger)
    start = time.perf_counter()
    results = annotator.annotate(clusters, tissue="blood", species="human")
    wall = time.perf_counter() - start
    return {"wall": wall, "stats": server.stats(), "ledger": read_ledger(ledger), "results": results}


def run_pipeline(server, clusters, lookup, *, pipeline: str, concurrency: int, cache_dir: Path, ledger: Path,
                 model: str, tissue: str = "blood"):
    from cassia_helpers.dataset.annotate.agents.annotator import LLMAnnotator
    from cassia_helpers.dataset.annotate.agents.pipeline import AnnotationPipeline, PipelineSettings
    from cassia_helpers.dataset.annotate.llm.options import LLMOptions
    from cassia_helpers.ledger import read_ledger

    server.reset_stats()
    annotator = LLMAnnotator(LLMOptions(model=model, base_url=server.base_url, concurrency=concurrency,
                                        cache_dir=str(cache_dir)), ledger_path=ledger)
    runner = AnnotationPipeline(annotator, PipelineSettings(pipeline=pipeline), lookup=lookup)
    start = time.perf_counter()
    results = runner.annotate(clusters, tissue=tissue, species="human")
    wall = time.perf_counter() - start
    return {"wall": wall, "stats": server.stats(), "ledger": read_ledger(ledger), "results": results}


def pipeline_rows(runs: dict, n: int) -> list[list]:
    """One row per pipeline: requests, prompt tokens and wall time per cluster, boosted share."""
    rows = []
    for name, r in runs.items():
        st = r["stats"]
        boosted = sum(x.boosted for x in r["results"])
        kept = sum(x.kept_answer == "boosted" for x in r["results"])
        rows.append([name, st["requests"], st["requests"] / n, st["prompt_tokens"] / n, r["wall"] / n,
                     f"{boosted}/{n}", kept, ", ".join(f"{a} {c}" for a, c in sorted(st["by_agent"].items()))])
    return rows


def per_agent_tokens(records: list[dict], n_clusters: int) -> dict[str, tuple[float, float, float]]:
    """agent -> (requests, prompt tokens, completion tokens) per cluster, from sent ledger records."""
    sums: dict[str, list[float]] = defaultdict(lambda: [0, 0, 0])
    for r in records:
        if r["status"] not in ("ok", "error"):
            continue
        s = sums[r["agent"]]
        s[0] += 1
        s[1] += r["input_tokens"]
        s[2] += r["output_tokens"]
    return {a: (v[0] / n_clusters, v[1] / n_clusters, v[2] / n_clusters) for a, v in sums.items()}


def _same(first, second) -> int:
    return sum(a.main_cell_type == b.main_cell_type for a, b in zip(first, second, strict=True))


def main(argv: list[str] | None = None) -> int:
    import os

    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=_common.HelpFormatter)
    parser.add_argument("--clusters", type=int, default=30)
    parser.add_argument("--latency", type=float, default=1.0, help="seconds the server sleeps per request")
    parser.add_argument("--llm-concurrency", type=int, default=8)
    parser.add_argument("--markers", choices=["pbmc", "synthetic"], default="pbmc")
    parser.add_argument("--model", default="gpt-4o-mini", help="model name sent (prices from the ledger table)")
    parser.add_argument("--pipelines", action=argparse.BooleanOptionalAction, default=True,
                        help="also measure the fast and full pipelines")
    parser.add_argument("--selection", action="store_true",
                        help="only compare the marker selections (see bench/_selection.py): canonical markers sent, "
                             "requests, tokens and correct calls, fast and full, on PBMC and synthetic tissues")
    args = parser.parse_args(argv)

    os.environ["OPENAI_API_KEY"] = "sk-bench-dummy"
    os.environ.pop("OPENAI_BASE_URL", None)
    from tests.scripted_llm_server import ScriptedLLMServer

    _common.print_machine()
    if args.selection:
        import _selection

        with ScriptedLLMServer(latency=0.0) as server:
            _selection.main(server, run_pipeline, _common.print_table)
        return 0
    clusters, source, lookup = (pbmc_clusters if args.markers == "pbmc" else synthetic_clusters)(args.clusters)
    n = len(clusters)
    print(f"clusters: {n} from {source}; markers per cluster: "
          f"{sum(len(c.genes) for c in clusters) / n:.1f}; server latency {args.latency:g} s/request\n",
          flush=True)

    with tempfile.TemporaryDirectory(prefix="llm_bench_") as tmp, ScriptedLLMServer(latency=args.latency) as server:
        tmp = Path(tmp)
        runs = {}
        plan = [("concurrent", args.llm_concurrency, "cache_c", "ledger_c.jsonl"),
                ("serial", 1, "cache_s", "ledger_s.jsonl"),
                ("cached rerun", args.llm_concurrency, "cache_c", "ledger_r.jsonl")]
        for name, conc, cache, ledger in plan:
            print(f"running {name} (concurrency {conc}) ...", flush=True)
            runs[name] = run(server, clusters, concurrency=conc, cache_dir=tmp / cache, ledger=tmp / ledger,
                             model=args.model)
            runs[name]["concurrency"] = conc
        print()

        rows = []
        for name, r in runs.items():
            st = r["stats"]
            per_cluster = st["requests"] / n
            if name == "serial":
                ideal = st["requests"] * args.latency
            elif st["requests"]:
                ideal = math.ceil(n / r["concurrency"]) * (st["requests"] / n) * args.latency
            else:
                ideal = 0.0
            hits = sum(1 for x in r["ledger"] if x["status"] == "cache_hit")
            rows.append([name, r["concurrency"], r["wall"], ideal, st["requests"], per_cluster,
                         ", ".join(f"{a} {c}" for a, c in sorted(st["by_agent"].items())) or "-",
                         st["errors"], hits, sum(1 for x in r["results"] if x.status == "ok")])
        _common.print_table(rows, ["run", "concurrency", "wall s", "ideal s", "requests", "req/cluster",
                                   "by agent (server)", "errors", "cache hits", "clusters ok"])
        c, s, rr = runs["concurrent"], runs["serial"], runs["cached rerun"]
        summary = [
            ["speed-up concurrent vs serial", f"{s['wall'] / c['wall']:.1f}x "
                                              f"({s['wall']:.1f} s -> {c['wall']:.1f} s)"],
            ["requests on the cached rerun", f"{rr['stats']['requests']} (target 0); wall {rr['wall']:.2f} s"],
            ["same calls concurrent vs serial", f"{_same(c['results'], s['results'])}/{n}"],
            ["same calls cached vs first run", f"{_same(c['results'], rr['results'])}/{n}"],
        ]
        _common.print_table(summary, ["summary", ""], align="ll")

        tokens = per_agent_tokens(c["ledger"], n)
        rows = [[agent, v[0], v[1], v[2]] for agent, v in sorted(tokens.items())]
        tot = [sum(v[i] for v in tokens.values()) for i in range(3)]
        rows.append(["all agents", *tot])
        st = c["stats"]
        rows.append(["(server stats, all agents)", st["requests"] / n, st["prompt_tokens"] / n,
                     st["completion_tokens"] / n])
        cost = sum(x["cost"] for x in c["ledger"])
        _common.print_table(rows, ["agent (first run, ledger)", "calls/cluster", "prompt tok/cluster",
                                   "completion tok/cluster"])
        print(f"ledger cost of the first run at {args.model} prices: ${cost:.4f} "
              f"(${cost / n:.5f} per cluster; scripted token counts are word counts)\n")
        calls = defaultdict(int)
        for res in c["results"]:
            calls[res.main_cell_type] += 1
        print("calls (first run): " + ", ".join(f"{k} x{v}" for k, v in sorted(calls.items(), key=lambda x: -x[1])))
        if args.pipelines:
            print("\nrunning the fast and full pipelines (empty caches) ...", flush=True)
            pipes = {name: run_pipeline(server, clusters, lookup, pipeline=name, concurrency=args.llm_concurrency,
                                        cache_dir=tmp / f"cache_{name}", ledger=tmp / f"ledger_{name}.jsonl",
                                        model=args.model)
                     for name in ("fast", "full")}
            _common.print_table(pipeline_rows(pipes, n), ["pipeline", "requests", "req/cluster",
                                                         "prompt tok/cluster", "wall s/cluster", "boosted",
                                                         "boost kept", "by agent (server)"])
            full = pipes["full"]["stats"]
            print(f"goal (full, a third boosted): <= 6 requests and <= 4,000 prompt tokens per cluster: "
                  f"{full['requests'] / n:.2f} requests, {full['prompt_tokens'] / n:.0f} tokens "
                  f"({sum(x.boosted for x in pipes['full']['results'])}/{n} boosted)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
