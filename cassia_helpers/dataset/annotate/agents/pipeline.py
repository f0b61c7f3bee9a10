"""The annotation pipeline over a dataset's clusters: ``fast`` (annotate only) or ``full`` (annotate →
score → boost the weak → re-score → keep the better → merge), with optional repeated / multi-model runs
for a consensus.

Every request goes through the annotator's one :class:`~cassia_helpers.dataset.annotate.llm.client.LLMClient` (or a
sibling sharing its ledger, throttle and budget). Each step has a fixed bound of logical calls per cluster
(:func:`estimate_calls`), whatever the model says; a step that gets no valid answer leaves the earlier result
in place and records why in the cluster's ``notes``. A cluster without a first answer (the model's replies
named no cell type, or the service failed) is neither scored nor boosted. A step that failed for more than
half of a dataset's clusters is said in :attr:`AnnotationPipeline.notices` (the dataset's warnings).
"""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, replace

from cassia_helpers.dataset.annotate import SERVICE_FAILURES, UNKNOWN, ClusterAnnotation, ClusterMarkers
from cassia_helpers.dataset.annotate.agents.boost import GeneLookup, boost_cluster
from cassia_helpers.dataset.annotate.agents.consensus import consensus, normalise_label
from cassia_helpers.dataset.annotate.agents.merging import merge_annotations
from cassia_helpers.dataset.annotate.agents.scoring import score_annotation
from cassia_helpers.settings import voting_models

PIPELINES = ("fast", "full")
SCORE_CALLS = 2
MERGE_CALLS = 2
RUN_TEMPERATURE = 0.7  # the repeated runs of a consensus
FORMATTER_CALLS = 3  # json_schema -> json_object -> prose, only when a format is refused


@dataclass(frozen=True)
class PipelineSettings:
    """The pipeline's settings (each one a batch setting; see the module docstring)."""

    pipeline: str = "full"
    boost_below: float = 75.0
    boost_rounds: int = 3
    n_runs: int = 1
    models: tuple[str, ...] = ()
    agreement_threshold: float = 0.5
    max_genes: int = 20

    def __post_init__(self) -> None:
        if self.pipeline not in PIPELINES:
            raise ValueError(f"pipeline must be one of {', '.join(PIPELINES)}, not {self.pipeline!r}")
        if not 0 <= self.boost_below <= 100:
            raise ValueError("boost_below must be within 0-100")
        if not 0 <= self.boost_rounds <= 10:
            raise ValueError("boost_rounds must be within 0-10")
        if self.n_runs < 1:
            raise ValueError("n_runs must be at least 1")
        if not 0 <= self.agreement_threshold <= 1:
            raise ValueError("agreement_threshold must be within 0-1")

    @classmethod
    def from_options(cls, *, pipeline: str = "full", boost_below: float = 75.0, boost_rounds: int = 3,
                     n_runs: int = 1, models: str | list[str] | tuple[str, ...] = "",
                     agreement_threshold: float = 0.5) -> PipelineSettings:
        """From plain batch settings (``models`` may be a comma-separated string)."""
        if isinstance(models, str):
            models = [m for m in (x.strip() for x in models.split(",")) if m]
        return cls(pipeline=pipeline, boost_below=float(boost_below), boost_rounds=int(boost_rounds),
                   n_runs=int(n_runs), models=tuple(dict.fromkeys(models)),
                   agreement_threshold=float(agreement_threshold))


def estimate_calls(settings: PipelineSettings, *, model: str = "", max_rounds: int = 2, n_clusters: int = 1,
                   boosted_fraction: float = 1 / 3, max_attempts: int = 1) -> dict:
    """Expected (min, max) logical calls per cluster for each step switched on, and per dataset in all.

    ``boost`` is per boosted cluster (boost rounds, a forced conclusion, the formatter, the re-score);
    ``merge`` is per dataset. ``max_attempts`` multiplies the maxima (each logical call may be retried).
    ``per_cluster`` is (min, max) over the whole pipeline assuming ``boosted_fraction`` of clusters boosted.
    """
    annotate = (3, max_rounds * (1 + FORMATTER_CALLS + 1))
    runs = settings.n_runs * len(voting_models(model, settings.models))
    steps: dict[str, tuple[int, int]] = {"annotate": annotate}
    if runs > 1:
        steps["consensus"] = ((runs - 1) * annotate[0], (runs - 1) * annotate[1])
    if settings.pipeline == "full":
        steps["score"] = (1, SCORE_CALLS)
        if settings.boost_rounds > 0:
            steps["boost"] = (3, settings.boost_rounds + 1 + FORMATTER_CALLS + SCORE_CALLS)
        steps["merge"] = (1, MERGE_CALLS + 1)
    low = high = 0.0
    for step, (lo, hi) in steps.items():
        share = 1 / max(1, n_clusters) if step == "merge" else boosted_fraction if step == "boost" else 1
        low += lo * share
        high += hi * share
    out = {step: (lo, hi * max_attempts) for step, (lo, hi) in steps.items()}
    out["per_cluster"] = (round(low, 3), round(high * max_attempts, 3))
    out["per_dataset"] = (math.floor(low * n_clusters), math.ceil(high * max_attempts * n_clusters))
    return out


def _with_answer(base: ClusterAnnotation, answer: dict) -> ClusterAnnotation:
    status = "unknown" if answer["main_cell_type"] == UNKNOWN else "ok"
    return replace(base, main_cell_type=answer["main_cell_type"], sub_cell_types=answer["sub_cell_types"],
                   mixed_cell_types=answer["mixed_cell_types"], confidence=answer["confidence"],
                   key_markers=answer["key_markers"], reasoning=answer["reasoning"], status=status,
                   cell_ontology_id=answer.get("cell_ontology_id", ""), validated=None,
                   reason="" if status == "ok" else "the boost could not identify the cell type",
                   reason_kind="" if status == "ok" else "model_unknown")


class AnnotationPipeline:
    """Runs :class:`PipelineSettings` over clusters with an :class:`~.annotator.LLMAnnotator`.

    Implements the :class:`~cassia_helpers.dataset.annotate.Annotator` protocol, so
    :func:`~cassia_helpers.dataset.annotate.apply.annotate_clusters` can use it in place of the annotator.
    ``lookup`` answers the boost agent's gene requests (without it, clusters are not boosted).
    """

    name = "llm"

    def __init__(self, annotator, settings: PipelineSettings | None = None, *,
                 lookup: GeneLookup | None = None) -> None:
        self.annotator = annotator
        self.settings = settings or PipelineSettings()
        self.lookup = lookup
        self._step_notices: list[str] = []
        # The primary annotation (run 1 of ``--model``) always votes; every other model of ``models`` and
        # every further run are voters too.
        primary = annotator.client.model
        self.voters = []
        # Run 1 of each model is the reproducible one (temperature 0); further runs sample, each with a
        # seed of its own, where the server accepts a temperature.
        seed = annotator.client.seed
        for model in voting_models(primary, self.settings.models):
            first = annotator if model == primary else annotator.sibling(model=model)
            self.voters += [(first, 1)] if first is not annotator else []
            self.voters += [(first.sibling(seed=seed + run - 1, temperature=RUN_TEMPERATURE), run)
                            for run in range(2, self.settings.n_runs + 1)]

    @property
    def notices(self) -> list[str]:
        """One-line warnings for the dataset: clusters no longer sent, steps that failed for most clusters."""
        return [*getattr(self.annotator, "notices", []), *self._step_notices]

    def describe(self) -> dict:
        out = dict(self.annotator.describe())
        out.update({f"pipeline_{k}": (",".join(v) if isinstance(v, tuple) else v)
                    for k, v in asdict(self.settings).items()})
        return out

    def annotate(self, clusters: list[ClusterMarkers], *, tissue: str, species: str,
                 context: str = "") -> list[ClusterAnnotation]:
        with ThreadPoolExecutor(max_workers=self.annotator.concurrency) as pool:
            results = list(pool.map(lambda m: self._cluster(m, tissue, species, context), clusters))
        if self.settings.pipeline == "full":
            merge_annotations(self.annotator.client, results, tissue=tissue, species=species,
                              max_calls=MERGE_CALLS)
        self._step_notices = step_failures(results, self.settings)
        for r in results:
            records = [x for x in self.annotator.ledger.records if x.cluster == r.cluster]
            r.input_tokens = sum(x.input_tokens for x in records)
            r.output_tokens = sum(x.output_tokens for x in records)
        return results

    def _cluster(self, markers: ClusterMarkers, tissue: str, species: str, context: str) -> ClusterAnnotation:
        result = self.annotator.annotate_one(markers, tissue=tissue, species=species, context=context)
        if self.voters:
            self._vote(result, markers, tissue, species, context)
        if self.settings.pipeline == "fast" or not markers.genes or _no_answer(result):
            return result
        scored = score_annotation(self.annotator.client, markers, result, tissue=tissue, species=species,
                                  context=context, max_calls=SCORE_CALLS)
        result.transcript += scored.turns
        result.score, result.score_reasoning = scored.score, scored.reasoning
        if scored.score is None:
            result.notes.append(f"score: {scored.reason}")
        weak = result.main_cell_type == UNKNOWN or (scored.score is not None and
                                                     scored.score < self.settings.boost_below)
        if weak and result.reason_kind != "budget" and self.settings.boost_rounds > 0 and self.lookup is not None:
            result = self._boost(result, markers, tissue, species, context)
        return result

    def _vote(self, result: ClusterAnnotation, markers, tissue, species, context) -> None:
        labels = [result.main_cell_type]
        n = self.settings.n_runs
        for agent, run in self.voters:
            run_context = "; ".join(x for x in (context, f"independent run {run} of {n}" if run > 1 else "") if x)
            other = agent.annotate_one(markers, tissue=tissue, species=species, context=run_context)
            labels.append(other.main_cell_type)
            result.transcript.append({"agent": f"consensus run ({agent.client.model}, run {run})",
                                      "content": f"{other.main_cell_type}"
                                                 + (f" [{other.reason}]" if other.reason else "")})
        agreed = consensus(labels, threshold=self.settings.agreement_threshold)
        result.consensus, result.agreement = agreed.label, agreed.agreement
        result.runners_up, result.disputed = agreed.runners_up, agreed.disputed

    def _boost(self, initial: ClusterAnnotation, markers, tissue, species, context) -> ClusterAnnotation:
        initial.boosted = True
        boosted = boost_cluster(self.annotator, markers, initial, self.lookup, tissue=tissue, species=species,
                                context=context, rounds=self.settings.boost_rounds,
                                max_genes=self.settings.max_genes)
        initial.transcript += boosted.turns
        if boosted.answer is None:
            initial.kept_answer = "initial"
            initial.notes.append(f"boost: {boosted.reason}; the initial answer is kept")
            return initial
        candidate = _with_answer(initial, boosted.answer)
        if normalise_label(candidate.main_cell_type) == normalise_label(initial.main_cell_type):
            # the re-score only chooses between two different calls: a confirmed call is not asked about again
            initial.kept_answer = "initial"
            initial.notes.append(f"boost: confirmed the initial call {initial.main_cell_type!r} with "
                                 f"{len(boosted.genes_asked)} genes checked; not re-scored")
            return initial
        rescored = score_annotation(self.annotator.client, markers, candidate, tissue=tissue, species=species,
                                    context=context, max_calls=SCORE_CALLS, label="scorer (boosted)")
        initial.transcript += rescored.turns
        initial.boost_score = rescored.score
        if rescored.score is None:
            initial.kept_answer = "initial"
            initial.notes.append(f"boost: re-score failed ({rescored.reason}); the initial answer is kept")
            return initial
        if initial.score is not None and rescored.score <= initial.score:
            initial.kept_answer = "initial"
            initial.notes.append(f"boost: the boosted answer {candidate.main_cell_type!r} scored "
                                 f"{rescored.score:.0f}, not above {initial.score:.0f}; the initial answer is kept")
            return initial
        kept = replace(candidate, transcript=initial.transcript, score=rescored.score,
                       score_reasoning=rescored.reasoning, kept_answer="boosted", boost_score=rescored.score,
                       revised_from=initial.main_cell_type,
                       notes=initial.notes + [f"boost: replaced {initial.main_cell_type!r} (score "
                                              f"{'-' if initial.score is None else f'{initial.score:.0f}'}) "
                                              f"with {candidate.main_cell_type!r} (score {rescored.score:.0f})"])
        return kept


def _no_answer(result: ClusterAnnotation) -> bool:
    """The cluster got no first answer from the model (nothing to score or boost)."""
    return result.status != "ok" and result.reason_kind in SERVICE_FAILURES


def step_failures(results: list[ClusterAnnotation], settings: PipelineSettings) -> list[str]:
    """One line per step that failed for more than half of the dataset's clusters: the validator gave no
    verdict, no score, no boosted conclusion, no merged groupings (each counted among the clusters the step
    was asked about)."""
    lines = []
    answered = [r for r in results if not _no_answer(r)]

    def check(step: str, asked: list[ClusterAnnotation], failed: list[ClusterAnnotation], note: str) -> None:
        if asked and len(failed) * 2 > len(asked):
            example = next((n for r in failed for n in r.notes if n.startswith(note)), "")
            lines.append(f"{step} failed for {len(failed)} of {len(asked)} clusters"
                         + (f" ({' '.join(example.split())[:200]})" if example else ""))

    if settings.pipeline == "full":
        asked = [r for r in answered if r.markers_sent]
        check("scoring", asked, [r for r in asked if r.score is None], "score:")
        boosted = [r for r in answered if r.boosted]
        check("boost", boosted, [r for r in boosted if r.kept_answer == "initial" and any(
            n.startswith("boost:") and ("failed" in n or "did not conclude" in n or "named no" in n)
            for n in r.notes)], "boost:")
        merged = [r for r in answered if r.main_cell_type != UNKNOWN]
        check("merging", merged, [r for r in merged if any(n.startswith("merging:") for n in r.notes)], "merging:")
    return lines


def run_pipeline(annotator, clusters: list[ClusterMarkers], *, tissue: str, species: str, context: str = "",
                 lookup: GeneLookup | None = None, **settings) -> list[ClusterAnnotation]:
    """Convenience: :class:`AnnotationPipeline` with :meth:`PipelineSettings.from_options` (``settings``)."""
    pipeline = AnnotationPipeline(annotator, PipelineSettings.from_options(**settings), lookup=lookup)
    return pipeline.annotate(clusters, tissue=tissue, species=species, context=context)


__all__ = ["PIPELINES", "AnnotationPipeline", "PipelineSettings", "estimate_calls", "run_pipeline"]
