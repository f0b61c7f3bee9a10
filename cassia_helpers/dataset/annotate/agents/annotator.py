"""CASSIA-style agents: an annotator that reasons over a cluster's ranked markers, a formatter that
returns a structured answer, and a validator (an LLM check plus a deterministic one) that may send the
annotator back with feedback for a bounded number of rounds.

Calls per cluster are bounded whatever the model says: at most ``max_rounds`` rounds of
(annotator 1 + formatter ≤ 3 + validator 1) logical calls, each with at most ``max_attempts`` requests. A
further round is asked only on feedback that can be acted on (a failed or self-contradicting verdict, cited
markers not in the list, no cell type); a validator reply without any verdict leaves the call unconfirmed.
After :data:`UNUSABLE_RUN` clusters in a row got no usable answer, the dataset's remaining clusters are not
sent (an unusable model costs at most 2 rounds x 2 requests for the clusters already started).
"""

from __future__ import annotations

import json
import re
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from importlib.metadata import version
from pathlib import Path

from cassia_helpers.dataset.annotate import NO_ANSWER, ClusterAnnotation, ClusterMarkers
from cassia_helpers.dataset.annotate.agents.answers import parse_answer
from cassia_helpers.dataset.annotate.agents.prompts import (
    ANNOTATOR_SYSTEM,
    ANSWER_SCHEMA,
    FORMATTER_SYSTEM,
    PROMPT_VERSION,
    VALIDATOR_SYSTEM,
    cluster_prompt,
    reference_check,
)
from cassia_helpers.dataset.annotate.agents.replies import (
    VERDICT_SCHEMA,
    final_annotation,
    read_verdict,
    structured_chat,
    verdict_words,
)
from cassia_helpers.dataset.annotate.llm.client import (
    BudgetExceeded,
    FatalLLMError,
    LLMClient,
    LLMError,
    RequestRejected,
    endpoint_label,
)
from cassia_helpers.dataset.annotate.llm.limits import run_limits
from cassia_helpers.dataset.annotate.llm.options import LLMOptions
from cassia_helpers.dataset.annotate.llm.throttle import CircuitBreaker
from cassia_helpers.ledger import Ledger
from cassia_helpers.prices import PriceTable, same_model

UNKNOWN_ANSWER = re.compile(r"^\s*(unknown|unclear|undetermined|n/?a)\b", re.IGNORECASE)
# Clusters in a row without a usable answer after which a dataset's remaining clusters are not sent.
UNUSABLE_RUN = 3
def marker_problems(answer: dict, genes: list[str]) -> list[str]:
    """The deterministic check: every marker the answer cites must be in the list sent."""
    sent = {g.upper() for g in genes}
    foreign = [m for m in answer["key_markers"] if m.upper() not in sent]
    problems = []
    if foreign:
        problems.append(f"These cited markers are not in the marker list: {', '.join(foreign)}.")
    if not answer["main_cell_type"]:
        problems.append("No main cell type was given.")
    return problems


class LLMAnnotator:
    """CASSIA-style LLM annotation of clusters through any OpenAI-compatible endpoint.

    Clusters are annotated concurrently (``concurrency`` threads; the run-wide request limit is shared
    by all dataset workers). Every request is written to the ledger at ``ledger_path``.
    """

    name = "llm"

    def __init__(self, options: LLMOptions, *, species: str = "human", ledger_path: str | Path | None = None,
                 dataset: str = "", tissue: str = "", run_dir: str = "", max_rounds: int = 2,
                 share_with: LLMAnnotator | None = None) -> None:
        self.options = options
        self.species = species
        self.dataset, self.tissue = dataset, tissue
        self.max_rounds = max(1, int(max_rounds))
        self.concurrency = max(1, int(options.concurrency))
        prices = PriceTable.load(options.price_file or None, model=options.model, input_price=options.input_price,
                                 output_price=options.output_price)
        if share_with is None:
            self.ledger = Ledger(ledger_path)
            # held by the Dask scheduler when the batch runs on one, else by files in the run folder
            throttle, budget = run_limits(run_dir or None, self.concurrency, options.max_cost,
                                          local_spent=self.ledger.spent)
            breaker = CircuitBreaker(options.breaker_failures, options.breaker_cooldown, run_dir or None)
        else:
            shared = share_with.client
            self.ledger, throttle, budget, breaker = share_with.ledger, shared.throttle, shared.budget, shared.breaker
        self.client = LLMClient(options, ledger=self.ledger, prices=prices, throttle=throttle, budget=budget,
                                breaker=breaker, dataset=dataset, tissue=tissue)
        self.price_known = prices.lookup(options.model).known
        # the run of clusters without a usable answer (shared by this dataset's threads)
        self._guard = threading.Lock()
        self._unusable_run = 0
        self.stopped: str = ""
        self._notices: list[str] = []

    @property
    def warnings(self) -> list[str]:
        """The client's one-line warnings for the dataset's summary (e.g. the cache could not be written)."""
        return self.client.warnings

    def describe(self) -> dict:
        return {
            "annotator": "llm",
            "model": self.client.model,
            "provider": endpoint_label(self.client.base_url).split("://", 1)[-1].split("/", 1)[0],
            "endpoint_host": endpoint_label(self.client.base_url),
            "prompt_version": PROMPT_VERSION,
            "temperature": self.client.temperature,
            "seed": self.client.seed,
            "max_rounds": self.max_rounds,
            "max_tokens": (self.client.max_tokens if self.client.length_field or self.client.max_tokens <= 0
                           else "not sent (refused by the endpoint)"),
            "deadline_s": self.client.deadline,
            "price_known": self.price_known,
            "system_fingerprint": ", ".join(sorted(self.client.fingerprints)),
            "served_model": ", ".join(sorted(self.client.served_models)),
            "openai_version": version("openai"),
        }

    @property
    def notices(self) -> list[str]:
        """One-line warnings for the dataset: clusters no longer sent; answers from another model than asked."""
        others = sorted(m for m in self.client.served_models if not same_model(m, self.client.model))
        return self._notices + ([f"the server answered with model {', '.join(others)}, not {self.client.model} "
                                 "(a fallback or an alias: the prices and provenance are those of the model asked)"]
                                if others else [])

    def annotate(self, clusters: list[ClusterMarkers], *, tissue: str, species: str,
                 context: str = "") -> list[ClusterAnnotation]:
        with ThreadPoolExecutor(max_workers=self.concurrency) as pool:
            return list(pool.map(lambda m: self._annotate_safely(m, tissue, species, context), clusters))

    # hooks for the pipeline (annotate/pipeline.py)
    def sibling(self, *, model: str | None = None, seed: int | None = None,
                temperature: float | None = None) -> LLMAnnotator:
        """An annotator with another model and/or seed that shares this one's ledger, throttle and budget."""
        options = replace(self.options, model=model or self.options.model,
                          seed=self.options.seed if seed is None else seed)
        if options.model != self.options.model:  # --input-price/--output-price are --model's, not this one's
            options = replace(options, input_price=None, output_price=None)
        other = LLMAnnotator(options, species=self.species, dataset=self.dataset, tissue=self.tissue,
                             max_rounds=self.max_rounds, share_with=self)
        if temperature is not None:
            other.client.temperature = temperature
        return other

    def annotate_one(self, markers: ClusterMarkers, *, tissue: str, species: str,
                     context: str = "") -> ClusterAnnotation:
        """One cluster's annotate → format → validate pass; failures end in an Unknown with the reason."""
        return self._annotate_safely(markers, tissue, species, context)

    def format_answer(self, prompt: str, analysis: str, cluster: str, transcript: list[dict]) -> dict | None:
        """The formatter agent (schema → JSON mode → prose fallbacks) on a free-text analysis."""
        return self._format(prompt, analysis, cluster, transcript)

    def _count_usable(self, result: ClusterAnnotation, n_clusters: int | None = None) -> None:
        """Track runs of clusters without a usable answer; after :data:`UNUSABLE_RUN`, stop asking."""
        with self._guard:
            if result.reason_kind != NO_ANSWER:
                self._unusable_run = 0
                return
            self._unusable_run += 1
            if self._unusable_run < UNUSABLE_RUN or self.stopped:
                return
            self.stopped = (f"the model's replies named no cell type for {UNUSABLE_RUN} clusters in a row: the "
                            "remaining clusters of this dataset were not sent")
            self._notices.append(self.stopped)
        print(f"LLM annotation stopped: {self.stopped}", file=sys.stderr, flush=True)

    def _annotate_safely(self, markers, tissue, species, context) -> ClusterAnnotation:
        if self.stopped:
            return ClusterAnnotation.unknown(markers.cluster, f"not sent ({self.stopped})", markers.genes, NO_ANSWER)
        try:
            result = self._annotate_one(markers, tissue, species, context)
        except BudgetExceeded as exc:
            result = ClusterAnnotation.unknown(markers.cluster, f"budget ({exc})", markers.genes, "budget")
        except FatalLLMError as exc:
            result = ClusterAnnotation.unknown(markers.cluster, f"endpoint refused the request ({exc})",
                                               markers.genes, exc.kind)
        except LLMError as exc:
            result = ClusterAnnotation.unknown(markers.cluster, f"request failed: {exc}", markers.genes,
                                               exc.kind)
        self._count_usable(result)
        tokens = [r for r in self.ledger.records if r.cluster == markers.cluster]
        result.input_tokens = sum(r.input_tokens for r in tokens)
        result.output_tokens = sum(r.output_tokens for r in tokens)
        return result

    def _format(self, prompt: str, analysis: str, cluster: str, transcript: list[dict]) -> dict | None:
        messages = [{"role": "system", "content": FORMATTER_SYSTEM},
                    {"role": "user", "content": f"{prompt}\n\nAnnotator's analysis:\n{analysis}"}]
        for feature, response_format in (("json_schema", ANSWER_SCHEMA), ("json_object", {"type": "json_object"}),
                                         ("prose", None)):
            if response_format is not None and not self.client.supports(feature):
                continue
            try:
                reply = self.client.chat(messages, cluster=cluster, agent="formatter",
                                         response_format=response_format,
                                         accept=lambda text: parse_answer(text) is not None)
            except RequestRejected as exc:
                if response_format is None:
                    raise
                if exc.refused:  # remembered only when the endpoint refuses the format itself
                    self.client.mark_unsupported(feature)
                continue
            except LLMError as exc:  # the budget, the server: an analysis already paid for is read as it is
                answer = parse_answer(analysis)
                if answer is None:
                    raise
                transcript.append({"agent": "note", "content": f"formatter unavailable ({exc}): the annotator's "
                                                               "final line is read"})
                return answer
            transcript.append({"agent": f"formatter ({feature})", "content": reply.content})
            return parse_answer(reply.content) or parse_answer(analysis)
        return parse_answer(analysis)

    def _annotate_one(self, markers: ClusterMarkers, tissue: str, species: str, context: str) -> ClusterAnnotation:
        prompt = cluster_prompt(markers, tissue=tissue, species=species, context=context)
        conversation = [{"role": "system", "content": ANNOTATOR_SYSTEM}, {"role": "user", "content": prompt}]
        transcript: list[dict] = []
        best: dict | None = None
        last_problem = "no answer"
        for round_number in range(1, self.max_rounds + 1):
            if round_number > 1 and best is None and self.stopped:
                last_problem = "the model gave no recognisable cell type (the dataset stopped asking)"
                break
            try:
                outcome = self._round(markers, prompt, conversation, transcript, round_number)
            except LLMError as exc:
                if best is None:
                    raise
                # An answer already paid for is kept when a later call cannot be made.
                transcript.append({"agent": "note", "content": f"stopped early: {exc}"})
                return self._result(markers, best, transcript, round_number, validated=False)
            if isinstance(outcome, str):
                last_problem = outcome
                continue
            cleaned, passed, actionable = outcome
            best = cleaned
            if passed or not actionable:
                return self._result(markers, cleaned, transcript, round_number, validated=passed)
            last_problem = "validation did not pass"
        if best is not None:
            return self._result(markers, best, transcript, self.max_rounds, validated=False)
        unknown = ClusterAnnotation.unknown(markers.cluster, f"{last_problem} after {self.max_rounds} rounds",
                                           markers.genes, NO_ANSWER)
        unknown.transcript, unknown.iterations = transcript, self.max_rounds
        return unknown

    def _round(self, markers: ClusterMarkers, prompt: str, conversation: list[dict], transcript: list[dict],
               round_number: int) -> tuple[dict, bool, bool] | str:
        """One annotator → formatter → validator round: ``(answer, passed, actionable)``, or why no cell type
        could be read. ``actionable``: the check gave feedback a further round can act on.

        Adds the feedback for the next round to ``conversation`` when the answer is missing or not validated.
        A well-formed reply is cached whatever it concludes (a rerun asks nothing again): an analysis that names
        a cell type, a review that names a verdict, passed, failed or both; unusable text is asked again.
        """
        reply = self.client.chat(conversation, cluster=markers.cluster, agent="annotator",
                                 accept=lambda text: parse_answer(text) is not None)
        analysis = reply.content
        transcript.append({"agent": f"annotator (round {round_number})", "content": analysis})
        conversation.append({"role": "assistant", "content": analysis})
        # an analysis the server cut off before its conclusion is not a call (a formatter would make one up)
        answer = None if reply.cut and not final_annotation(analysis) else self._format(
            prompt, analysis, markers.cluster, transcript)
        if answer is None:
            conversation.append({"role": "user", "content": "Your feedback: the answer named no cell type. "
                                 "Analyse again and end with 'FINAL ANNOTATION: <main cell type>'."})
            return (f"the model's reply was cut off before its conclusion (finish_reason {reply.cut})"
                    if reply.cut else "the model gave no recognisable cell type")
        problems = marker_problems(answer, markers.genes)
        cleaned = dict(answer, key_markers=[m for m in answer["key_markers"]
                                            if m.upper() in {g.upper() for g in markers.genes}])
        try:
            review = structured_chat(
                self.client,
                [{"role": "system", "content": VALIDATOR_SYSTEM},
                 {"role": "user", "content": f"{prompt}\n\nAnnotation to check:\n{analysis}\n\n"
                                             f"Structured answer:\n{json.dumps(answer)}"
                                             + reference_check(answer["main_cell_type"], prompt, markers.genes)}],
                schema=VERDICT_SCHEMA, cluster=markers.cluster, agent="validator",
                accept=lambda text: read_verdict(text) is not None or bool(verdict_words(text))).content
        except LLMError as exc:
            # The answer stands, unconfirmed; a later round (if any) may still confirm it.
            review = f"validator unavailable ({exc})"
        transcript.append({"agent": f"validator (round {round_number})", "content": review})
        if problems:
            transcript.append({"agent": "marker check", "content": " ".join(problems)})
        verdict = read_verdict(review)
        passed = verdict is True and not problems
        # a review naming no verdict at all (unusable text, an unavailable validator) gives nothing to act on
        actionable = bool(problems) or verdict is False or bool(verdict_words(review))
        if not passed:
            conversation.append({"role": "user", "content": "Validator feedback: " + " ".join(problems + [review])
                                 + "\nRevise your analysis and end with 'FINAL ANNOTATION: <main cell type>'."})
        return cleaned, passed, actionable

    def _result(self, markers, answer, transcript, rounds, *, validated: bool) -> ClusterAnnotation:
        if UNKNOWN_ANSWER.match(answer["main_cell_type"]):
            unknown = ClusterAnnotation.unknown(markers.cluster, "the model could not identify the cell type",
                                               markers.genes, "model_unknown")
            unknown.reasoning, unknown.transcript, unknown.iterations = answer["reasoning"], transcript, rounds
            unknown.validated = validated
            return unknown
        reasoning = answer["reasoning"]
        if not validated:
            reasoning = (reasoning + " (The validator did not confirm this call.)").strip()
        return ClusterAnnotation(
            cluster=markers.cluster,
            main_cell_type=answer["main_cell_type"],
            sub_cell_types=answer["sub_cell_types"],
            mixed_cell_types=answer["mixed_cell_types"],
            confidence=answer["confidence"],
            key_markers=answer["key_markers"],
            reasoning=reasoning,
            cell_ontology_id=answer["cell_ontology_id"],
            status="ok",
            iterations=rounds,
            validated=validated,
            markers_sent=list(markers.genes),
            transcript=transcript,
        )
