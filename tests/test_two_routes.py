"""Two datasets of one tissue, annotated by different routes, name their populations with the same CL ids.

One dataset goes through the offline reference, the other through the LLM agents (the real openai
client against the scripted server on 127.0.0.1); both labels are then mapped to Cell Ontology terms.
A user grouping a concatenated run by ``cell_type_ontology_term_id`` must find each population under
one id when both annotators name it at the same depth, and by ``cell_type_lineage`` in every case (an
annotator may stop at a more general term on the same ontology path, e.g. "T cell" for "CD4+ T cell").
"""

from __future__ import annotations

import pandas as pd
import scanpy as sc

from cassia_helpers.dataset.annotate.agents.annotator import LLMAnnotator
from cassia_helpers.dataset.annotate.apply import annotate_clusters
from cassia_helpers.dataset.annotate.llm.options import LLMOptions
from cassia_helpers.dataset.annotate.reference.annotator import ReferenceAnnotator
from cassia_helpers.dataset.markers import cluster_markers, rank_markers
from cassia_helpers.dataset.ontology import annotate_ontology, load_cell_ontology
from tests.synthetic import BLOOD_TYPES, BRAIN_TYPES, make_counts


def _dataset(types: dict[str, list[str]], seed: int):
    adata = make_counts(360, cell_types=types, seed=seed)
    sc.pp.normalize_total(adata, target_sum=1e4)
    sc.pp.log1p(adata)
    # clusters numbered as leiden numbers them, each one population of the fixture
    order = {name: str(i) for i, name in enumerate(sorted(types))}
    adata.obs["leiden"] = pd.Categorical(adata.obs["truth"].map(order).astype(str))
    return adata


def _terms_by_population(adata, annotator, tissue: str) -> dict[str, str]:
    table = rank_markers(adata, groupby="leiden", key_added=None)
    clusters = cluster_markers(adata, table, groupby="leiden")
    annotate_clusters(adata, clusters, annotator=annotator, tissue=tissue, groupby="leiden")
    annotate_ontology(adata, label_key="cell_type", groupby="leiden", proposed_ids={})
    pairs = adata.obs[["truth", "cell_type_ontology_term_id"]].astype(str).drop_duplicates()
    assert not pairs["truth"].duplicated().any(), pairs  # one term per population
    return dict(zip(pairs["truth"], pairs["cell_type_ontology_term_id"], strict=True))


def _both_routes(llm_server, tmp_path, types: dict[str, list[str]], tissue: str):
    by_reference = _terms_by_population(_dataset(types, seed=11), ReferenceAnnotator(), tissue)
    llm = LLMAnnotator(LLMOptions(model="scripted-model", base_url=llm_server.base_url,
                                  cache_dir=str(tmp_path / "cache")),
                       ledger_path=tmp_path / "ledger.jsonl", dataset="second", tissue=tissue)
    by_llm = _terms_by_population(_dataset(types, seed=12), llm, tissue)
    assert set(by_reference) == set(by_llm) == set(types)
    assert "unknown" not in {*by_reference.values(), *by_llm.values()}, (by_reference, by_llm)
    return by_reference, by_llm


def test_same_populations_get_the_same_cl_ids_by_both_routes(llm_env, tmp_path):
    by_reference, by_llm = _both_routes(llm_env, tmp_path, BRAIN_TYPES, "brain")
    assert by_llm == by_reference == {"Astrocyte": "CL:0000127", "Oligodendrocyte": "CL:0000128",
                                      "Microglia": "CL:0000129"}


def test_calls_at_different_depths_share_their_lineage(llm_env, tmp_path):
    by_reference, by_llm = _both_routes(llm_env, tmp_path, BLOOD_TYPES, "blood")
    onto = load_cell_ontology()
    for population, term in by_reference.items():
        other = by_llm[population]
        # e.g. "T cell" and "CD4+ T cell": one term is the other or its ancestor, never a sibling
        assert onto.related(term, other), (population, term, other)
        assert onto.lineage(term) == onto.lineage(other), (population, term, other)
    assert by_reference["B cell"] == by_llm["B cell"] == "CL:0000236"
