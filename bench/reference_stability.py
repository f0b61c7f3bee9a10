"""Stability of the offline reference's calls: the same data clustered differently must get the same labels.

Called by ``bench/reference_accuracy.py`` (``--stability-only`` runs just this part). For each dataset —
scanpy's bundled ``pbmc68k_reduced`` (truth: ``bulk_labels``, accepted mapping of the accuracy bench),
the synthetic brain and the synthetic breast sets (truth: the type each cell was drawn from, right when the
call's CL term is the truth's) — the reference annotates leiden clusters of nine runs, after the pipeline's
split of the clusters that hold several populations (:func:`cassia_helpers.split_mixed_clusters`, as the
template runs it; ``--no-split-mixed``: the leiden clusters as they are):

* resolutions 0.5, 1.0 and 2.0 (seed 0, every cell);
* seeds 0, 1 and 2 of the neighbour graph and leiden (resolution 1.0);
* three random 50 % subsamples (resolution 1.0, neighbours recomputed on the subsample).

Every cell inherits its cluster's call. The table gives per run the accuracy (where labels are known) and
the label agreement with the base run (resolution 1.0, seed 0, all cells) on the cells both runs hold, each
next to its *ceiling*: the best any annotator could reach giving one label per cluster (each cluster the
label right for most of its cells; the label most of its cells got in the base run). A run whose ceiling
is low has clusters that hold two populations (the clustering's limit, not the annotator's); the column
``consistent`` counts a label that is the other run's label or an ancestor or descendant of it (``T cell``
at one resolution, ``CD4+ T cell`` at another) as agreeing.
``--save FILE`` writes every run's per-cell labels; ``--before FILE`` compares with a saved file and prints,
per run, the accuracy before and after and the number of cells that were right and became wrong.
``python bench/reference_stability.py [--save FILE] [--before FILE]`` is
``python bench/reference_accuracy.py --stability-only ...``.
"""

from __future__ import annotations

import json
import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import scanpy as sc

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script: this checkout's package

from cassia_helpers.dataset.annotate import ClusterMarkers  # noqa: E402
from cassia_helpers.dataset.annotate.reference.annotator import ReferenceAnnotator  # noqa: E402
from cassia_helpers.dataset.split_mixed import split_mixed_clusters  # noqa: E402

RESOLUTIONS = (0.5, 1.0, 2.0)
SEEDS = (0, 1, 2)
SUBSAMPLES = (0, 1, 2)
SUBSAMPLE_FRACTION = 0.5
BASE = "res 1.0 / seed 0"


@dataclass
class Dataset:
    """One dataset of the table: how to build it and how to judge a call."""

    name: str
    tissue: str
    build: Callable[[], object]  # returns a log-normalised AnnData with X_pca (and obs['truth'] if labelled)
    correct: Callable[[str, str], bool] | None  # (call, truth) -> right?  None: no labels, agreement only
    use_raw: bool = False


def _runs() -> list[tuple[str, float, int, int | None]]:
    """(name, resolution, seed, subsample seed or None) of every run, the base run first."""
    runs = [(BASE, 1.0, 0, None)]
    runs += [(f"res {r} / seed 0", r, 0, None) for r in RESOLUTIONS if r != 1.0]
    runs += [(f"res 1.0 / seed {s}", 1.0, s, None) for s in SEEDS if s != 0]
    runs += [(f"50 % subsample {k}", 1.0, 0, k) for k in SUBSAMPLES]
    return runs


def call_cells(adata, annotator: ReferenceAnnotator, *, tissue: str, resolution: float, seed: int,
               use_raw: bool, split: bool = True) -> pd.Series:
    """Cluster ``adata`` (neighbours on X_pca, leiden, then, unless ``split`` is false, the pipeline's split of
    the clusters that hold several populations) and return every cell's reference call."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sc.pp.neighbors(adata, use_rep="X_pca", random_state=seed)
        sc.tl.leiden(adata, flavor="igraph", n_iterations=2, resolution=resolution, random_state=seed)
    if split:  # the pipeline's step after the clustering (the template's ch.split_mixed_clusters)
        split_mixed_clusters(adata, species="human", tissue=tissue, seed=seed, use_raw=use_raw)
    groups = adata.obs["leiden"].astype(str)
    clusters = [ClusterMarkers(cluster=c, genes=[]) for c in sorted(groups.unique(), key=int)]
    calls = annotator.annotate(clusters, tissue=tissue, species="human", adata=adata, groupby="leiden",
                               use_raw=use_raw)
    label_of = {c.cluster: a.main_cell_type for c, a in zip(clusters, calls, strict=True)}
    return groups.map(label_of), groups


def run_dataset(ds: Dataset, annotator: ReferenceAnnotator, *, split: bool = True) -> dict[str, dict]:
    """Every run of one dataset: {run name: {"labels": {cell: label}, "accuracy": float | None}}."""
    full = ds.build()
    truth = full.obs["truth"].astype(str) if ds.correct is not None else None
    out: dict[str, dict] = {}
    for name, resolution, seed, sub in _runs():
        adata = full.copy()
        if sub is not None:
            rng = np.random.default_rng(100 + sub)
            keep = np.sort(rng.choice(adata.n_obs, int(SUBSAMPLE_FRACTION * adata.n_obs), replace=False))
            adata = adata[keep].copy()
        labels, groups = call_cells(adata, annotator, tissue=ds.tissue, resolution=resolution, seed=seed,
                                    use_raw=ds.use_raw, split=split)
        measured, ceiling = None, None
        if truth is not None:
            measured = float(np.mean([ds.correct(p, truth[c]) for c, p in labels.items()]))
            options = sorted(set(truth) | {ct.name for ct in annotator.reference.cell_types})
            ceiling = accuracy_ceiling(groups, truth, options, ds.correct)
        out[name] = {"labels": labels.to_dict(), "accuracy": measured,
                     "n_clusters": int(adata.obs["leiden"].nunique()),
                     "n_unsplit": int(adata.obs.get("leiden_unsplit", adata.obs["leiden"]).nunique()),
                     "accuracy_ceiling": ceiling, "clusters": groups.to_dict()}
    return out


def accuracy_ceiling(groups: pd.Series, truth: pd.Series, options: list[str],
                     correct: Callable[[str, str], bool]) -> float:
    """The best accuracy of one label per cluster, each cluster's label chosen among ``options`` (the
    reference's types and the truth's names)."""
    best = 0
    for _, cells in groups.groupby(groups, observed=True):
        kinds = truth[cells.index].value_counts()
        best += max(sum(n for kind, n in kinds.items() if correct(label, kind)) for label in options)
    return best / len(groups)


def agreement_ceiling(groups: dict[str, str], base: dict[str, str]) -> float:
    """The best agreement with ``base`` of one label per cluster (each cluster its cells' most common base
    label), on the cells both runs hold."""
    frame = pd.DataFrame({"cluster": pd.Series(groups), "base": pd.Series(base)}).dropna()
    return float(frame.groupby("cluster")["base"].agg(lambda s: s.value_counts().iloc[0]).sum() / len(frame))


def consistent(a: dict[str, str], b: dict[str, str]) -> float:
    """Share of the shared cells whose labels are equal or one an ancestor of the other in the reference."""
    from cassia_helpers.dataset.annotate.reference.catalog import load_reference

    ref = load_reference()
    names = {ct.name for ct in ref.cell_types}
    line = {n: {n, *ref.ancestors(n)} for n in names}
    shared = a.keys() & b.keys()
    ok = [a[c] == b[c] or a[c] in line.get(b[c], ()) or b[c] in line.get(a[c], ()) for c in shared]
    return float(np.mean(ok)) if ok else float("nan")


def agreement(a: dict[str, str], b: dict[str, str]) -> float:
    """Share of the cells both runs hold that got the same label."""
    shared = a.keys() & b.keys()
    return float(np.mean([a[c] == b[c] for c in shared])) if shared else float("nan")


def print_table(ds: Dataset, runs: dict[str, dict], before: dict[str, dict] | None) -> None:
    """One dataset's stability table, with the before/after columns when a saved run is given."""
    truth = ds.build().obs["truth"].astype(str) if before and ds.correct is not None else None
    base = runs[BASE]["labels"]
    head = (f"  {'run':22s} {'clusters':>8s} {'split':>5s} {'accuracy':>8s} {'(ceiling)':>9s} {'agreement':>9s} "
            f"{'(ceiling)':>9s} {'consistent':>10s}")
    if before:
        head += f"  {'accuracy before':>15s} {'agreement before':>16s} {'right->wrong':>12s} {'wrong->right':>12s}"
    print(f"stability: {ds.name} (agreement with '{BASE}' on shared cells)")
    print(head)
    for name, run in runs.items():
        added = run["n_clusters"] - run.get("n_unsplit", run["n_clusters"])  # clusters the split added
        line = (f"  {name:22s} {run['n_clusters']:8d} {added:+5d} "
                f"{_figure(run['accuracy'], 8)} {_figure(run['accuracy_ceiling'], 9)} "
                f"{agreement(run['labels'], base):9.3f} {agreement_ceiling(run['clusters'], base):9.3f} "
                f"{consistent(run['labels'], base):10.3f}")
        if before and name in before:
            old = before[name]["labels"]
            shared = old.keys() & run["labels"].keys()
            lost = won = "—"
            if truth is not None:
                was = {c: ds.correct(old[c], truth[c]) for c in shared}
                now = {c: ds.correct(run["labels"][c], truth[c]) for c in shared}
                lost = sum(was[c] and not now[c] for c in shared)
                won = sum(now[c] and not was[c] for c in shared)
            line += (f"  {_figure(before[name]['accuracy'], 15)} {agreement(old, before[BASE]['labels']):16.3f} "
                     f"{lost:>12} {won:>12}")
        print(line)
    others = [agreement(r["labels"], base) for n, r in runs.items() if n != BASE]
    known = [r["accuracy"] for r in runs.values() if r["accuracy"] is not None]
    lowest = f"lowest accuracy {min(known):.3f}, " if known else "no labels: agreement only, "
    print(f"  {lowest}lowest agreement {min(others):.3f}")


def _figure(value: float | None, width: int) -> str:
    """A share to three decimals, or a dash where it was not measured (no labels)."""
    return f"{value:{width}.3f}" if value is not None else f"{'—':>{width}s}"


def stability(datasets: list[Dataset], *, save: str | None = None, before: str | None = None,
              split: bool = True) -> dict:
    """Run and print the stability table of every dataset (``split``: through the pipeline's split of the
    clusters that hold several populations); optionally save or compare with a saved run."""
    annotator = ReferenceAnnotator(species="human")
    old = json.loads(open(before, encoding="utf-8").read()) if before else {}
    results = {}
    for ds in datasets:
        results[ds.name] = run_dataset(ds, annotator, split=split)
        print_table(ds, results[ds.name], old.get(ds.name))
        print()
    if save:
        with open(save, "w", encoding="utf-8") as fh:
            json.dump(results, fh)
    return results


if __name__ == "__main__":
    from bench.reference_accuracy import main

    raise SystemExit(main(["--stability-only", *sys.argv[1:]]))
