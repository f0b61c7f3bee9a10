"""Command line: flags → :class:`BatchConfig` → :func:`run_batch`; exit codes 0 (all succeeded),
1 (some failed), 2 (usage error), 130 (interrupted)."""

from __future__ import annotations

import argparse
import os
import sys
from collections import Counter
from dataclasses import fields
from pathlib import Path

from .config import DEFAULT_MODEL, AnalysisParams, BatchConfig
from .discovery import UsageError

DEFAULTS = AnalysisParams()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="run_batch.py",
        description="Annotate cell types in every single-cell dataset of {data-dir}/{tissue}/*.h5ad: QC, "
        "clustering, marker genes and CASSIA-style annotation, one executed notebook per dataset.",
        epilog="API keys are read from the environment only (OPENAI_API_KEY); never pass them as flags.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    io = parser.add_argument_group("inputs and outputs")
    io.add_argument("--data-dir", type=Path, default=Path("data"), help="folder with one sub-folder per tissue")
    io.add_argument("--tissues", nargs="+", default=None, metavar="TISSUE",
                    help="tissues to process (sub-folder names), or 'all'")
    io.add_argument("--output-dir", type=Path, default=Path("batch_results"),
                    help="where run_{tissues}_{timestamp} folders are created")
    io.add_argument("--species", choices=["human", "mouse"], default=DEFAULTS.species,
                    help="species of every dataset in the batch")
    io.add_argument("--resume", type=Path, default=None, metavar="RUN_DIR",
                    help="finish an interrupted run folder in place (its analysis settings are kept; "
                    "--workers and timeouts may be given anew)")
    io.add_argument("--dry-run", action="store_true",
                    help="list the datasets that would run and estimate API calls, tokens and cost; send nothing")

    execution = parser.add_argument_group("execution")
    execution.add_argument("--workers", type=int, default=1, help="datasets processed at once (processes)")
    execution.add_argument("--dataset-timeout", type=float, default=0.0,
                           help="seconds one dataset may take before it is stopped and marked failed (0: none)")
    execution.add_argument("--cell-timeout", type=float, default=0.0,
                           help="seconds one notebook cell may take (0: none)")
    execution.add_argument("--kernel-name", default="python3", help="Jupyter kernel for the notebooks")

    qc = parser.add_argument_group("QC and clustering")
    qc.add_argument("--min-genes", type=int, default=DEFAULTS.min_genes, help="minimum genes per cell")
    qc.add_argument("--min-cells", type=int, default=DEFAULTS.min_cells, help="minimum cells per gene")
    qc.add_argument("--max-pct-mt", type=float, default=DEFAULTS.max_pct_mt,
                    help="maximum percent of counts from mitochondrial genes")
    qc.add_argument("--target-sum", type=float, default=DEFAULTS.target_sum, help="normalize_total target")
    qc.add_argument("--n-top-genes", type=int, default=DEFAULTS.n_top_genes, help="highly variable genes")
    qc.add_argument("--n-pcs", type=int, default=DEFAULTS.n_pcs, help="principal components")
    qc.add_argument("--n-neighbors", type=int, default=DEFAULTS.n_neighbors, help="kNN graph neighbours")
    qc.add_argument("--resolution", type=float, default=DEFAULTS.resolution, help="leiden resolution")
    qc.add_argument("--seed", type=int, default=DEFAULTS.seed, help="random seed (PCA, leiden, UMAP, sampling)")

    markers = parser.add_argument_group("marker genes")
    markers.add_argument("--marker-method", default=DEFAULTS.marker_method,
                         choices=["wilcoxon", "t-test", "t-test_overestim_var", "logreg"],
                         help="rank_genes_groups method")
    markers.add_argument("--n-markers", type=int, default=DEFAULTS.n_markers,
                         help="top ranked markers sent to the annotator per cluster")
    markers.add_argument("--marker-max-pval-adj", type=float, default=DEFAULTS.marker_max_pval_adj,
                         help="markers need an adjusted p-value at most this")
    markers.add_argument("--marker-min-logfc", type=float, default=DEFAULTS.marker_min_logfc,
                         help="markers need a log fold change at least this")
    markers.add_argument("--max-cells-per-cluster", type=int, default=DEFAULTS.max_cells_per_cluster,
                         help="cells sampled per cluster for the marker tests (0: all cells)")

    annotation = parser.add_argument_group("annotation")
    annotation.add_argument("--annotator", choices=["auto", "reference", "llm"], default="auto",
                            help="auto: llm when OPENAI_API_KEY or a base URL is set, else the offline reference")
    annotation.add_argument("--model", default=os.environ.get("CASSIA_MODEL", DEFAULT_MODEL),
                            help="model name for --annotator llm (env CASSIA_MODEL)")
    annotation.add_argument("--base-url", default=None,
                            help="OpenAI-compatible endpoint, e.g. http://localhost:11434/v1 (env OPENAI_BASE_URL)")
    annotation.add_argument("--context", default="", help="free-text context sent with every cluster")
    annotation.add_argument("--llm-concurrency", type=int, default=DEFAULTS.llm_concurrency,
                            help="requests in flight at once to the model server, for the whole run")
    annotation.add_argument("--llm-timeout", type=float, default=DEFAULTS.llm_timeout,
                            help="seconds before one request is abandoned (then retried)")
    annotation.add_argument("--llm-max-attempts", type=int, default=DEFAULTS.llm_max_attempts,
                            help="attempts per request on 429/5xx/timeouts")
    annotation.add_argument("--no-cache", action="store_true", help="do not use the on-disk response cache")
    annotation.add_argument("--cache-dir", type=Path, default=None,
                            help="response cache folder (default: ~/.cache/cassia-batch/llm)")
    annotation.add_argument("--max-cost", type=float, default=0.0,
                            help="USD budget for the run: no request is sent once it is reached (0: none)")
    annotation.add_argument("--price-file", type=Path, default=None,
                            help='JSON prices {"model": {"input": USD per 1M, "output": USD per 1M}}')
    annotation.add_argument("--input-price", type=float, default=None, help="USD per 1M input tokens for --model")
    annotation.add_argument("--output-price", type=float, default=None, help="USD per 1M output tokens for --model")
    return parser


def config_from_args(args: argparse.Namespace) -> BatchConfig:
    from .annotate.apply import resolve_annotator_kind
    from .annotate.llm import endpoint_label

    if args.resume is None and not args.tissues:
        raise UsageError("choose tissues with --tissues NAME [NAME ...] or --tissues all (or --resume RUN_DIR)")
    if args.workers < 1:
        raise UsageError("--workers must be at least 1")
    base_url = args.base_url or os.environ.get("OPENAI_BASE_URL", "")
    if args.annotator == "llm" and not (os.environ.get("OPENAI_API_KEY") or base_url):
        raise UsageError("--annotator llm needs OPENAI_API_KEY in the environment, or --base-url for a local "
                         "server that needs no key")
    values = {f.name: getattr(args, f.name) for f in fields(AnalysisParams) if hasattr(args, f.name)}
    values.update(
        annotator=resolve_annotator_kind(args.annotator, base_url),
        base_url=endpoint_label(base_url) if base_url else "",
        use_cache=not args.no_cache,
        cache_dir=str(args.cache_dir.resolve()) if args.cache_dir else "",
        price_file=str(args.price_file.resolve()) if args.price_file else "",
    )
    if args.price_file and not args.price_file.is_file():
        raise UsageError(f"{args.price_file}: price file not found")
    return BatchConfig(
        data_dir=args.data_dir,
        output_dir=args.output_dir,
        tissues=args.tissues or [],
        workers=args.workers,
        dataset_timeout=args.dataset_timeout,
        cell_timeout=args.cell_timeout,
        resume=args.resume,
        dry_run=args.dry_run,
        kernel_name=args.kernel_name,
        analysis=AnalysisParams(**values),
    )


def main(argv: list[str] | None = None) -> int:
    from .batch import run_batch

    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        config = config_from_args(args)
        if args.base_url:
            # The kernels read the endpoint from the environment, like the key.
            os.environ["OPENAI_BASE_URL"] = args.base_url
        if config.dry_run:
            from .dryrun import dry_run

            print(dry_run(config))
            return 0
        result = run_batch(config)
    except UsageError as exc:
        print(f"{parser.prog}: error: {exc} (see --help)", file=sys.stderr)
        return 2
    counts = Counter(result.statuses.values())
    tally = ", ".join(f"{n} {status}" for status, n in sorted(counts.items()))
    print(f"{tally}. Summary: {result.run_dir / 'batch_summary.txt'}", file=sys.stderr)
    print(result.run_dir)
    return result.exit_code


if __name__ == "__main__":
    sys.exit(main())
