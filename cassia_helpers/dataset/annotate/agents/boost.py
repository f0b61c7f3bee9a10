"""The annotation boost: a weak call re-examined with gene look-ups in the cluster's full differential
expression, for a bounded number of rounds, then a revised structured answer.

Calls per boosted cluster are bounded whatever the model says: ``rounds`` boost calls (a reply that neither
asks for genes nor concludes ends the boost), one more to force a conclusion when none came, then the
formatter (its fallbacks only on refused formats) only when the conclusion carries no readable JSON answer of
its own. The re-scoring and the choice of the answer kept are the pipeline's
(:mod:`cassia_helpers.dataset.annotate.agents.pipeline`).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from cassia_helpers.dataset.annotate import UNKNOWN, ClusterAnnotation, ClusterMarkers
from cassia_helpers.dataset.annotate.agents.annotator import UNKNOWN_ANSWER, cluster_prompt, parse_answer
from cassia_helpers.dataset.annotate.agents.prompts import reference_check
from cassia_helpers.dataset.annotate.agents.replies import json_object, read_conclusion
from cassia_helpers.dataset.annotate.llm.client import LLMError

BOOST_SYSTEM = """You are the boost agent of a cell-type annotation team. An earlier call for one cluster \
of a single-cell RNA-seq dataset was judged weak. Re-examine it: state your hypotheses for the cluster's \
identity, then ask for the genes that would tell them apart, inside <check_genes>GENE1,GENE2</check_genes> \
(gene symbols only, at most {max_genes}). For each gene you will get its log2 fold change, the fraction of \
the cluster's cells and of the other cells where it is detected, and the adjusted p-value of the cluster \
against the rest. When the evidence is enough, write FINAL ANNOTATION COMPLETED, your conclusion (the most \
likely cell type, up to three more specific sub types, any mixture), the line \
FINAL ANNOTATION: <main cell type>, and then the answer as JSON with the fields main_cell_type, \
sub_cell_types, mixed_cell_types, confidence (0-100), key_markers, reasoning and cell_ontology_id."""

_CHECK = re.compile(r"<check_genes>\s*(.*?)\s*</check_genes>", re.IGNORECASE | re.DOTALL)


def requested_genes(text: str, limit: int = 20) -> list[str]:
    """Gene symbols asked for in ``<check_genes>`` tags, in order, without duplicates, at most ``limit``."""
    genes: list[str] = []
    for block in _CHECK.findall(text or ""):
        for gene in re.split(r"[,;\s]+", block):
            gene = gene.strip().strip("`'\".*")
            if gene and re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._\-]{0,30}", gene) and gene not in genes:
                genes.append(gene)
    return genes[:limit]


def concluded(text: str) -> str | None:
    """The main cell type of a concluding reply, or ``None`` when the reply does not conclude (or concludes
    without naming a type; see :func:`~cassia_helpers.dataset.annotate.agents.replies.read_conclusion`)."""
    return read_conclusion(text) or None


class GeneLookup:
    """Answers gene questions about one cluster from the full differential-expression table.

    ``table`` has our marker columns for every tested gene (``rank_markers(..., n_genes=None)``). A gene
    in ``var_names`` but not in the table was not tested (detected in too few cells of every cluster); with
    ``adata`` its detection in and out of the cluster is measured directly. A gene not in ``var_names`` is
    answered as absent from the dataset.
    """

    def __init__(self, table: pd.DataFrame, *, adata=None, groupby: str = "leiden",
                 var_names: list[str] | None = None) -> None:
        self.table = table.assign(cluster=table["cluster"].astype(str), gene=table["gene"].astype(str))
        self._by_cluster = {c: part.set_index(part["gene"].str.upper())
                            for c, part in self.table.groupby("cluster", sort=False)}
        self.adata, self.groupby = adata, groupby
        names = list(adata.var_names) if adata is not None else (var_names or [])
        self._var = {str(g).upper(): i for i, g in enumerate(names)}

    def lookup(self, cluster: str, genes: list[str]) -> list[dict]:
        """One record per gene: ``gene, status`` (``tested``, ``not tested`` or ``not in dataset``) and,
        where known, ``logfoldchange, pct_in, pct_out, pval_adj, rank``."""
        part = self._by_cluster.get(str(cluster))
        out = []
        for gene in genes:
            key = gene.upper()
            if part is not None and key in part.index:
                row = part.loc[key]
                row = row.iloc[0] if isinstance(row, pd.DataFrame) else row
                out.append({"gene": str(row["gene"]), "status": "tested",
                            "logfoldchange": _num(row["logfoldchange"]), "pct_in": _num(row["pct_in_cluster"]),
                            "pct_out": _num(row["pct_out_cluster"]), "pval_adj": _num(row["pval_adj"]),
                            "rank": int(row["rank"]), "n_tested": len(part)})
            elif key in self._var or not self._var:
                out.append({"gene": gene, "status": "not tested", **self._detection(cluster, key)})
            else:
                out.append({"gene": gene, "status": "not in dataset"})
        return out

    def _detection(self, cluster: str, key: str) -> dict:
        if self.adata is None or key not in self._var:
            return {}
        column = self.adata.X[:, self._var[key]]
        detected = np.asarray((column != 0).todense() if hasattr(column, "todense") else column != 0).ravel()
        inside = (self.adata.obs[self.groupby].astype(str) == str(cluster)).to_numpy()
        pct = lambda mask: round(float(detected[mask].mean()), 3) if mask.any() else 0.0  # noqa: E731
        return {"pct_in": pct(inside), "pct_out": pct(~inside)}

    def describe(self, cluster: str, genes: list[str]) -> str:
        """The look-up as the text sent back to the boost agent."""
        lines = [f"Expression in cluster {cluster} against all other cells:"]
        for r in self.lookup(cluster, genes):
            if r["status"] == "tested":
                # a gene absent on one side has a fold change of the pseudocount only (-29): not a number to read
                change = ("absent from the cluster" if r["pct_in"] == 0 else "absent from the other cells"
                          if r["pct_out"] == 0 else f"log2FC {r['logfoldchange']:.2f}")
                lines.append(f"- {r['gene']}: {change}, detected in {r['pct_in']:.0%} of "
                             f"the cluster vs {r['pct_out']:.0%} of other cells, adjusted p {r['pval_adj']:.2g}, "
                             f"rank {r['rank']} of {r['n_tested']}")
            elif r["status"] == "not tested" and "pct_in" in r:
                state = "not expressed" if r["pct_in"] == 0 else "expressed in too few cells to be tested"
                lines.append(f"- {r['gene']}: {state} (detected in {r['pct_in']:.0%} of the cluster vs "
                             f"{r['pct_out']:.0%} of other cells)")
            elif r["status"] == "not tested":
                lines.append(f"- {r['gene']}: not among the tested genes (not expressed enough, or not measured)")
            else:
                lines.append(f"- {r['gene']}: not in this dataset (unknown symbol or not measured)")
        return "\n".join(lines)


def _num(value) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return float("nan")


@dataclass
class BoostResult:
    """The revised answer (``None`` when the boost could not conclude; ``reason`` says why)."""

    answer: dict | None
    reason: str = ""
    calls: int = 0
    genes_asked: list[str] = field(default_factory=list)
    turns: list[dict] = field(default_factory=list)


def _json_answer(text: str) -> dict | None:
    """The structured answer a conclusion carries as JSON (not from its prose: that is the formatter's job)."""
    data = json_object(text)
    return parse_answer(json.dumps(data)) if isinstance(data, dict) and data.get("main_cell_type") else None


def boost_prompt(markers: ClusterMarkers, previous: ClusterAnnotation, *, tissue: str, species: str,
                 context: str = "") -> str:
    lines = [cluster_prompt(markers, tissue=tissue, species=species, context=context), "",
             f"Earlier call: {previous.main_cell_type}"
             + (f" (sub types: {', '.join(previous.sub_cell_types)})" if previous.sub_cell_types else ""),
             f"Its reasoning: {previous.reasoning or '-'}"]
    if previous.score is not None:
        lines.append(f"Quality score {previous.score:.0f}/100: {previous.score_reasoning or '-'}")
    return "\n".join(lines) + reference_check(previous.main_cell_type, lines[0], markers.genes)


def boost_cluster(annotator, markers: ClusterMarkers, previous: ClusterAnnotation, lookup: GeneLookup, *,
                  tissue: str, species: str, context: str = "", rounds: int = 3,
                  max_genes: int = 20) -> BoostResult:
    """Re-examine one cluster: at most ``rounds`` gene-request rounds, one forced conclusion, one format.

    ``annotator`` is the :class:`~.annotator.LLMAnnotator` whose client, ledger and
    formatter are used. Request failures (budget included) end the boost with ``answer=None``.
    """
    client = annotator.client
    prompt = boost_prompt(markers, previous, tissue=tissue, species=species, context=context)
    conversation = [{"role": "system", "content": BOOST_SYSTEM.format(max_genes=max_genes)},
                    {"role": "user", "content": prompt}]
    result = BoostResult(None)
    conclusion = ""
    try:
        for round_number in range(1, rounds + 2):
            final_call = round_number > rounds
            if final_call:
                conversation.append({"role": "user", "content": "No more genes can be checked. Write FINAL "
                                     "ANNOTATION COMPLETED, your conclusion, and the line FINAL ANNOTATION: "
                                     "<main cell type> now."})
            # cached when it asks for genes or concludes, whatever it concludes
            reply = client.chat(conversation, cluster=markers.cluster, agent="boost",
                                accept=lambda text: bool(requested_genes(text)) or read_conclusion(text) is not None
                                ).content
            result.calls += 1
            result.turns.append({"agent": f"boost ({'conclusion' if final_call else f'round {round_number}'})",
                                 "content": reply})
            conversation.append({"role": "assistant", "content": reply})
            genes = [] if final_call else requested_genes(reply, max_genes)
            if read_conclusion(reply) is not None and not genes:
                conclusion = reply
                break
            if final_call:
                break
            if genes:
                answer = lookup.describe(markers.cluster, genes)
                result.genes_asked += [g for g in genes if g not in result.genes_asked]
                result.turns.append({"agent": f"gene look-up (round {round_number})", "content": answer})
                conversation.append({"role": "user", "content": answer})
            else:
                # neither a gene request nor a conclusion: unusable text is not asked about again
                result.reason = "the boost agent's reply neither asked for genes nor concluded"
                return result
        if not conclusion:
            result.reason = f"the boost agent did not conclude in {result.calls} calls"
            return result
        # the conclusion's own JSON answer saves the formatter's request
        answer = _json_answer(conclusion) or annotator.format_answer(prompt, conclusion, markers.cluster,
                                                                     result.turns)
    except LLMError as exc:
        result.reason = f"boost request failed: {exc}"
        return result
    if answer is None or not answer["main_cell_type"]:
        result.reason = "the boost's conclusion named no cell type"
        return result
    if UNKNOWN_ANSWER.match(answer["main_cell_type"]):
        answer = dict(answer, main_cell_type=UNKNOWN)
    seen = {g.upper() for g in markers.genes} | {g.upper() for g in result.genes_asked}
    answer["key_markers"] = [m for m in answer["key_markers"] if m.upper() in seen]
    result.answer = answer
    return result


__all__ = ["BOOST_SYSTEM", "BoostResult", "GeneLookup", "boost_cluster", "boost_prompt", "concluded",
           "requested_genes"]
