"""Tests of the offline reference annotator and its packaged marker reference."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from importlib import resources

import numpy as np
import pytest

from cassia_helpers.dataset.annotate import UNKNOWN, ClusterAnnotation, ClusterMarkers
from cassia_helpers.dataset.annotate.reference.annotator import (
    ReferenceAnnotator,
    ReferenceDataError,
    load_reference,
)
from tests.conftest import REPO

PBMC_NOISE = ["LDHB", "NPM1", "EEF1A1", "RPL3", "TPT1"]


def cm(name: str, genes: list[str], **kwargs) -> ClusterMarkers:
    return ClusterMarkers(cluster=name, genes=list(genes), **kwargs)


@pytest.fixture(scope="module")
def human() -> ReferenceAnnotator:
    return ReferenceAnnotator(species="human")


@pytest.fixture(scope="module")
def raw_json() -> dict:
    text = resources.files("cassia_helpers.dataset").joinpath("data", "markers.json").read_text("utf-8")
    return json.loads(text)


# ---------------------------------------------------------------- known answers (human)


@pytest.mark.parametrize(
    ("tissue", "genes", "expected"),
    [
        ("pbmc", ["CD3E", "CD8A", "CD8B", "GZMK", "CCL5", "CD3D", "NKG7"], {"CD8+ T cell",
                                                                             "Effector memory CD8+ T cell"}),
        ("pbmc", ["MS4A1", "CD79A", "CD79B", "BANK1", "CD19"], {"B cell"}),
        ("blood", ["CD14", "LYZ", "VCAN", "S100A8", "S100A9", "FCN1"], {"Classical monocyte"}),
        ("blood", ["FCGR3A", "MS4A7", "CDKN1C", "LST1", "RHOC"], {"Non-classical monocyte"}),
        ("pbmc", ["GNLY", "NKG7", "KLRF1", "KLRD1", "PRF1", "NCR1"], {"NK cell", "CD56dim NK cell"}),
        ("pbmc", ["FOXP3", "IL2RA", "CTLA4", "CD4", "RTKN2", "IKZF2"], {"Regulatory T cell"}),
        ("pbmc", ["CCR7", "LEF1", "SELL", "CD4", "CD3E", "TCF7"], {"Naive CD4+ T cell"}),
        ("pbmc", ["LILRA4", "CLEC4C", "IL3RA", "TCF4", "IRF7"], {"Plasmacytoid dendritic cell"}),
        ("pbmc", ["CD1C", "FCER1A", "CLEC10A", "HLA-DQA1", "CD1E"], {"Conventional dendritic cell type 2"}),
        ("pbmc", ["PPBP", "PF4", "GP9", "ITGA2B", "TUBB1"], {"Megakaryocyte/platelet"}),
        ("pbmc", ["HBB", "HBA1", "HBA2", "ALAS2"], {"Erythrocyte"}),
        ("pbmc", ["CD34", "SPINK2", "PRSS57", "CRHBP", "AVP"], {"Hematopoietic stem/progenitor cell"}),
        ("pbmc", ["TNFRSF17", "MZB1", "JCHAIN", "SDC1", "DERL3"], {"Plasma cell"}),
        ("brain", ["GFAP", "AQP4", "SLC1A2", "ALDH1L1", "GJA1"], {"Astrocyte"}),
        ("brain", ["MOG", "MBP", "PLP1", "MOBP", "MAG"], {"Oligodendrocyte"}),
        ("brain", ["P2RY12", "TMEM119", "CX3CR1", "CSF1R", "C1QA"], {"Microglia"}),
        ("brain", ["GAD1", "GAD2", "SLC32A1", "SST", "LHX6"], {"Inhibitory neuron"}),
        ("lung", ["SFTPC", "SFTPA1", "NAPSA", "LAMP3", "ABCA3"], {"Alveolar type 2 cell"}),
        ("lung", ["MARCO", "FABP4", "INHBA", "MCEMP1", "C1QA"], {"Alveolar macrophage"}),
        ("liver", ["ALB", "APOA1", "FGB", "AHSG", "APOH"], {"Hepatocyte"}),
        ("kidney", ["NPHS1", "NPHS2", "PODXL", "PTPRO", "WT1"], {"Podocyte"}),
        ("pancreas", ["INS", "IAPP", "MAFA", "NKX6-1", "G6PC2"], {"Pancreatic beta cell"}),
        ("Breast", ["KRT14", "KRT5", "TP63", "OXTR", "KRT17"], {"Basal/myoepithelial cell"}),
        ("heart", ["TNNT2", "MYH7", "MYL2", "ACTC1", "TNNI3"], {"Cardiomyocyte", "Ventricular cardiomyocyte"}),
        ("skin", ["PMEL", "MLANA", "TYRP1", "DCT", "TYR"], {"Melanocyte"}),
        ("intestine", ["MUC2", "CLCA1", "SPINK4", "ZG16", "TFF3"], {"Goblet cell"}),
        ("bone_marrow", ["MPO", "ELANE", "AZU1", "PRTN3", "CTSG"], {"Myeloid progenitor"}),
        ("lung", ["CDH5", "PECAM1", "VWF", "CLDN5", "EMCN"], {"Endothelial cell", "Venous endothelial cell",
                                                              "Capillary endothelial cell"}),
        ("skin", ["DCN", "LUM", "PDGFRA", "COL1A2", "FBLN1"], {"Fibroblast"}),
    ],
)
def test_known_answers(human, tissue, genes, expected):
    (call,) = human.annotate([cm("c", genes + PBMC_NOISE)], tissue=tissue, species="human")
    assert call.status == "ok"
    assert call.main_cell_type in expected, call.reasoning
    assert call.confidence > 0


def test_cd8_beats_cd4_and_nk(human):
    (call,) = human.annotate(
        [cm("cd8", ["CD3E", "CD8A", "CD8B", "GZMK", "CCL5", "CD3D"])], tissue="pbmc", species="human"
    )
    assert "CD8" in call.main_cell_type
    assert call.main_cell_type not in {"CD4+ T cell", "NK cell"}


def test_marker_rank_matters(human):
    # the same genes in a different order: whichever type's markers lead the list wins
    t_first = ["CD3E", "CD3D", "CD2", "TRAC", "MS4A1", "CD79A"]
    b_first = ["MS4A1", "CD79A", "CD79B", "CD19", "CD3E", "CD3D"]
    a, b = human.annotate([cm("t", t_first), cm("b", b_first)], tissue="blood", species="human")
    assert a.main_cell_type.endswith("T cell")
    assert b.main_cell_type == "B cell"


def test_mixed_population_is_reported(human):
    genes = ["MS4A1", "CD3E", "CD79A", "CD3D", "CD79B", "CD2", "CD19", "CD3G"]
    (call,) = human.annotate([cm("mix", genes)], tissue="pbmc", species="human")
    assert call.status == "ok"
    lineages = {call.main_cell_type, *call.mixed_cell_types}
    assert any("B cell" in x for x in lineages) and any("T cell" in x for x in lineages), call


def test_pct_specificity_changes_the_call(human):
    # S100A8/9 and LYZ lead, but are expressed as much outside the cluster as inside: the DC markers win
    genes = ["S100A9", "S100A8", "LYZ", "CD14", "VCAN", "FCER1A", "CLEC10A", "CD1C", "FCN1", "CD1E"]
    pct_in = [1.0, 1.0, 1.0, 0.9, 0.9, 0.9, 0.9, 0.8, 0.9, 0.7]
    pct_out = [0.9, 0.9, 0.95, 0.8, 0.8, 0.05, 0.05, 0.02, 0.85, 0.01]
    plain, with_pct = human.annotate(
        [cm("a", genes), cm("b", genes, pct_in=pct_in, pct_out=pct_out)], tissue="pbmc", species="human"
    )
    assert "monocyte" in plain.main_cell_type.lower()
    assert "dendritic" in with_pct.main_cell_type.lower()


def test_aliases_match_old_symbols(human):
    (call,) = human.annotate([cm("pc", ["IGJ", "MZB1", "TNFRSF17", "DERL3"])], tissue="pbmc", species="human")
    assert call.main_cell_type == "Plasma cell"
    assert "IGJ" in call.key_markers


# ---------------------------------------------------------------- unknowns, invariants


def test_random_genes_are_unknown(human):
    genes = [f"FAKEGENE{i}" for i in range(40)]
    (call,) = human.annotate([cm("x", genes)], tissue="pbmc", species="human")
    assert call.status == "unknown"
    assert call.main_cell_type == UNKNOWN
    assert call.reason == "no reference cell type matched the markers"
    assert call.markers_sent == genes


def test_single_weak_marker_is_unknown(human):
    genes = ["ACTB", "GAPDH", "LTB"] + [f"NOISE{i}" for i in range(20)]
    (call,) = human.annotate([cm("x", genes)], tissue="pbmc", species="human")
    assert call.status == "unknown"


def test_empty_cluster_is_unknown(human):
    (call,) = human.annotate([cm("empty", [])], tissue="pbmc", species="human")
    assert call.status == "unknown"


def test_order_preserved_and_key_markers_subset(human):
    clusters = [
        cm("z", ["MS4A1", "CD79A", "CD79B"]),
        cm("a", [f"NOPE{i}" for i in range(5)]),
        cm("m", ["CD14", "LYZ", "S100A8", "S100A9", "VCAN"]),
        cm("7", ["CD3E", "CD3D", "IL7R", "CCR7", "LEF1"]),
    ]
    calls = human.annotate(clusters, tissue="blood", species="human")
    assert [c.cluster for c in calls] == ["z", "a", "m", "7"]
    for c, call in zip(clusters, calls, strict=True):
        assert isinstance(call, ClusterAnnotation)
        assert set(call.key_markers) <= set(c.genes)
        assert call.markers_sent == c.genes
        assert 0.0 <= call.confidence <= 100.0
        assert len(call.sub_cell_types) <= 3
        assert call.main_cell_type not in call.sub_cell_types
        if call.status == "ok":
            assert call.key_markers
            assert call.reasoning.startswith("Top markers")
            assert call.main_cell_type in call.reasoning


def test_confidence_reflects_margin(human):
    clear, ambiguous = human.annotate(
        [
            cm("clear", ["MS4A1", "CD79A", "CD79B", "CD19", "BANK1", "PAX5"]),
            cm("ambiguous", ["MS4A1", "CD3E", "CD79A", "CD3D", "CD79B", "CD2"]),
        ],
        tissue="pbmc",
        species="human",
    )
    assert clear.confidence > ambiguous.confidence


def test_describe(human):
    d = human.describe()
    assert d["annotator"] == "reference"
    assert d["api_calls"] == 0
    assert d["species"] == "human"
    assert d["reference_version"] == load_reference().version
    assert human.name == "reference"


# ---------------------------------------------------------------- mouse


def test_mouse_symbols_match():
    ann = ReferenceAnnotator(species="mouse")
    (call,) = ann.annotate([cm("astro", ["Gfap", "Aqp4", "Slc1a3", "Aldh1l1"])], tissue="brain", species="mouse")
    assert call.main_cell_type == "Astrocyte"
    assert set(call.key_markers) <= {"Gfap", "Aqp4", "Slc1a3", "Aldh1l1"}
    assert ann.describe()["species"] == "mouse"


def test_human_case_symbols_do_not_match_in_mouse():
    ann = ReferenceAnnotator(species="mouse")
    (call,) = ann.annotate([cm("astro", ["GFAP", "AQP4", "SLC1A3", "ALDH1L1"])], tissue="brain", species="mouse")
    assert call.status == "unknown"


def test_mouse_symbols_do_not_match_in_human(human):
    (call,) = human.annotate([cm("astro", ["Gfap", "Aqp4", "Slc1a3", "Aldh1l1"])], tissue="brain",
                             species="human")
    assert call.status == "unknown"


def test_mouse_uses_explicit_orthologs():
    ann = ReferenceAnnotator(species="mouse")
    calls = ann.annotate(
        [
            cm("ncm", ["Fcgr4", "Treml4", "Ace", "Nr4a1", "Cx3cr1"]),
            cm("dc", ["H2-Ab1", "H2-Aa", "H2-Eb1", "Cd209a", "Clec4a4", "Mgl2"]),
            cm("mg", ["P2ry12", "Tmem119", "Fcrls", "Sall1", "Hexb"]),
        ],
        tissue="blood",
        species="mouse",
    )
    assert calls[0].main_cell_type == "Non-classical monocyte"
    assert "dendritic" in calls[1].main_cell_type.lower()
    # microglia are brain-only: not a candidate for blood
    assert calls[2].main_cell_type != "Microglia"
    ref = load_reference()
    ncm = ref.by_name("Non-classical monocyte")
    assert "Fcgr4" in ncm.symbols("mouse") and "Fcgr3a" not in ncm.symbols("mouse")
    # without an explicit list, mouse symbols are the title-cased human ones
    b = ref.by_name("B cell")
    assert b.symbols("mouse")[:2] == ("Ms4a1", "Cd79a")


def test_species_argument_overrides_default(human):
    (call,) = human.annotate([cm("astro", ["Gfap", "Aqp4", "Slc1a3"])], tissue="brain", species="Mus musculus")
    assert call.main_cell_type == "Astrocyte"
    human.annotate([], tissue="brain", species="human")  # reset the recorded species


def test_unsupported_species_raises(human):
    with pytest.raises(ValueError, match="unsupported species"):
        human.annotate([cm("x", ["CD3E"])], tissue="pbmc", species="zebrafish")
    with pytest.raises(ValueError, match="unsupported species"):
        ReferenceAnnotator(species="rat")


# ---------------------------------------------------------------- tissues


ISSUE_TISSUES = [
    "immune", "blood", "pbmc", "PBMC", "brain", "Breast", "breast", "lung", "liver", "kidney", "pancreas",
    "intestine", "colon", "skin", "heart", "bone_marrow", "Bone Marrow",
]


@pytest.mark.parametrize("tissue", ISSUE_TISSUES)
def test_issue_tissues_resolve(tissue):
    ref = load_reference()
    keys = ref.resolve_tissue(tissue)
    assert keys, tissue
    cands = ref.candidates(tissue)
    assert cands
    assert len(cands) < len(ref.cell_types)
    # the immune / stromal types found everywhere are always candidates
    names = {c.name for c in cands}
    assert {"T cell", "B cell", "NK cell", "Monocyte"} <= names


def test_tissue_restricts_candidates():
    ref = load_reference()
    blood = {c.name for c in ref.candidates("pbmc")}
    brain = {c.name for c in ref.candidates("brain")}
    assert "Astrocyte" in brain and "Astrocyte" not in blood
    assert "Classical monocyte" in blood and "Hepatocyte" not in blood
    assert "Fibroblast" in brain and "Microglia" in brain


def test_tissue_synonyms_and_unknown_tissue():
    ref = load_reference()
    assert ref.resolve_tissue("human_pbmc_10x") == ("blood",)
    assert ref.resolve_tissue("BoneMarrow") == ("bone_marrow",)
    assert ref.resolve_tissue("cerebral-cortex") == ("brain",)
    assert ref.resolve_tissue("mammary_gland") == ("breast",)
    assert ref.resolve_tissue("small intestine") == ("intestine",)
    assert ref.resolve_tissue("xenograft") == ()
    assert len(ref.candidates("xenograft")) == len(ref.cell_types)
    assert len(ref.candidates("")) == len(ref.cell_types)


def test_unknown_tissue_still_annotates(human):
    (call,) = human.annotate([cm("a", ["GFAP", "AQP4", "SLC1A2", "ALDH1L1"])], tissue="organoid", species="human")
    assert call.main_cell_type == "Astrocyte"


# ---------------------------------------------------------------- the reference file


def test_reference_file_structure(raw_json):
    assert isinstance(raw_json["version"], str) and raw_json["version"]
    sources = raw_json["sources"]
    for key in ("PanglaoDB", "CellMarker2", "HLCA", "TabulaSapiens", "Azimuth"):
        assert key in sources
    assert "Franzén" in sources["PanglaoDB"] and "2019" in sources["PanglaoDB"]
    assert "Nucleic Acids Res" in sources["CellMarker2"] and "2023" in sources["CellMarker2"]
    names = [ct["name"] for ct in raw_json["cell_types"]]
    assert len(names) == len(set(names))
    for ct in raw_json["cell_types"]:
        assert ct["sources"], ct["name"]
        assert all(s in sources for s in ct["sources"]), ct["name"]
        assert 5 <= len(ct["markers"]) <= 15, ct["name"]
        assert ct["tissues"] == "all" or all(t in raw_json["tissues"] for t in ct["tissues"]), ct["name"]
        if "parent" in ct:
            assert ct["parent"] in names


def test_reference_covers_the_required_types():
    ref = load_reference()
    names = {ct.name for ct in ref.cell_types}
    required = {
        "T cell", "CD4+ T cell", "CD8+ T cell", "Regulatory T cell", "Naive CD4+ T cell", "Memory CD4+ T cell",
        "NK cell", "B cell", "Plasma cell", "Classical monocyte", "Non-classical monocyte", "Macrophage",
        "Conventional dendritic cell type 1", "Conventional dendritic cell type 2", "Plasmacytoid dendritic cell",
        "Mast cell", "Neutrophil", "Megakaryocyte/platelet", "Erythrocyte", "Hematopoietic stem/progenitor cell",
        "Fibroblast", "Smooth muscle cell", "Pericyte", "Endothelial cell", "Lymphatic endothelial cell",
        "Astrocyte", "Hepatocyte", "Cardiomyocyte", "Alveolar type 2 cell", "Podocyte", "Pancreatic beta cell",
    }
    assert required <= names
    assert ref.by_name("CD8+ T cell").parent == "T cell"
    assert ref.ancestors("Regulatory T cell") == ["CD4+ T cell", "T cell"]


def test_mouse_lists_avoid_human_only_symbols():
    ref = load_reference()
    for ct in ref.cell_types:
        mouse = ct.symbols("mouse")
        assert not any(sym.upper().startswith("HLA-") for sym in mouse), ct.name
        assert "Gnly" not in mouse and "Fcgr3a" not in mouse, ct.name


# ---------------------------------------------------------------- loader errors


def test_loader_reports_clear_errors(tmp_path):
    bad_json = tmp_path / "bad.json"
    bad_json.write_text("{not json", encoding="utf-8")
    with pytest.raises(ReferenceDataError, match="not valid JSON"):
        load_reference(bad_json)

    with pytest.raises(ReferenceDataError, match="cannot read"):
        load_reference(tmp_path / "missing.json")

    doc = {
        "version": "t",
        "sources": {"X": "a source"},
        "tissues": {"blood": {"synonyms": ["pbmc"]}},
        "cell_types": [
            {"name": "A", "lineage": "l", "tissues": "all", "markers": ["G1", "G2"], "sources": ["X"]},
        ],
    }
    few = tmp_path / "few.json"
    few.write_text(json.dumps(doc), encoding="utf-8")
    with pytest.raises(ReferenceDataError, match=r"cell_types\[0\] \(A\).*'markers' must have 5-15"):
        load_reference(few)

    doc["cell_types"][0]["markers"] = ["G1", "G2", "G3", "G4", "G5"]
    doc["cell_types"][0]["sources"] = ["Nowhere"]
    nosrc = tmp_path / "nosrc.json"
    nosrc.write_text(json.dumps(doc), encoding="utf-8")
    with pytest.raises(ReferenceDataError, match="unknown source"):
        load_reference(nosrc)

    doc["cell_types"][0]["sources"] = ["X"]
    doc["cell_types"][0]["parent"] = "Missing"
    orphan = tmp_path / "orphan.json"
    orphan.write_text(json.dumps(doc), encoding="utf-8")
    with pytest.raises(ReferenceDataError, match="parent 'Missing'"):
        load_reference(orphan)

    del doc["cell_types"][0]["parent"]
    doc["cell_types"][0]["cl_id"] = "T cell"
    badcl = tmp_path / "badcl.json"
    badcl.write_text(json.dumps(doc), encoding="utf-8")
    with pytest.raises(ReferenceDataError, match="'cl_id' must look like 'CL:0000084'"):
        load_reference(badcl)

    doc["cell_types"][0]["cl_id"] = "CL:0000084"
    doc["cell_types"][0]["absent_markers"] = "CD3E"
    badabsent = tmp_path / "badabsent.json"
    badabsent.write_text(json.dumps(doc), encoding="utf-8")
    with pytest.raises(ReferenceDataError, match="'absent_markers' must be a list"):
        load_reference(badabsent)

    doc["cell_types"][0]["absent_markers"] = ["CD3E"]
    good = tmp_path / "good.json"
    good.write_text(json.dumps(doc), encoding="utf-8")
    parsed = load_reference(good).by_name("A")
    assert (parsed.cl_id, parsed.absent_symbols("mouse")) == ("CL:0000084", ("Cd3e",))

    del doc["version"]
    nover = tmp_path / "nover.json"
    nover.write_text(json.dumps(doc), encoding="utf-8")
    with pytest.raises(ReferenceDataError, match="version"):
        load_reference(nover)


def test_custom_reference_path(tmp_path):
    doc = {
        "version": "custom-1",
        "sources": {"X": "a source"},
        "tissues": {"blood": {"synonyms": ["pbmc"]}},
        "cell_types": [
            {"name": "Widget cell", "lineage": "w", "tissues": "all",
             "markers": ["WID1", "WID2", "WID3", "WID4", "WID5"], "sources": ["X"]},
        ],
    }
    path = tmp_path / "custom.json"
    path.write_text(json.dumps(doc), encoding="utf-8")
    ann = ReferenceAnnotator(reference_path=path)
    assert ann.describe()["reference_version"] == "custom-1"
    (call,) = ann.annotate([cm("w", ["WID2", "WID1", "OTHER"])], tissue="pbmc", species="human")
    assert call.main_cell_type == "Widget cell"
    mouse = ann.reference.by_name("Widget cell").symbols("mouse")
    assert mouse[0] == "Wid1"


def test_loader_reads_once():
    assert load_reference() is load_reference()


def test_the_offline_annotator_does_not_load_the_llm_client():
    """Every dataset kernel of an offline run would pay the openai client's import (about a second)."""
    code = ("import sys\n"
            "from cassia_helpers.dataset.annotate import ClusterMarkers\n"
            "from cassia_helpers.dataset.annotate.reference.annotator import ReferenceAnnotator\n"
            "calls = ReferenceAnnotator().annotate([ClusterMarkers('0', ['CD3E', 'CD3D', 'CD2', 'IL7R'])],"
            " tissue='blood', species='human')\n"
            "print(calls[0].main_cell_type, calls[0].merged_groupings, 'openai' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env=dict(os.environ, PYTHONPATH=str(REPO)), cwd=REPO).stdout.split()
    assert out[0:2] == ["T", "cell"] and out[-1] == "False"


# ---------------------------------------------------------------- expression route: crafted data, known answers

NK_BASE = ["GNLY", "NKG7", "KLRD1", "KLRF1", "NCR1", "TYROBP", "CTSW"]
PBMC_CRAFTED = {
    "Naive CD4+ T cell": ["CD3E", "CD3D", "CD3G", "CD2", "LCK", "CD4", "CD40LG", "CCR7", "LEF1", "SELL", "TCF7"],
    "Memory CD4+ T cell": ["CD3E", "CD3D", "CD3G", "CD2", "LCK", "CD4", "CD40LG", "AQP3", "S100A4", "ANXA1",
                           "KLRB1", "ITGB1"],
    "Effector memory CD8+ T cell": ["CD3E", "CD3D", "CD3G", "CD2", "LCK", "CD8A", "CD8B", "CCL5", "GZMH", "CST7",
                                    "NKG7", "GZMA", "KLRG1"],
    "B cell": ["MS4A1", "CD79A", "CD79B", "CD19", "BANK1", "CD22"],
    "Classical monocyte": ["CD14", "LYZ", "FCN1", "S100A8", "S100A9", "VCAN", "CSF1R", "LST1"],
    "CD56dim NK cell": NK_BASE + ["FCGR3A", "FGFBP2", "SPON2", "PRF1", "GZMB"],
    "CD56bright NK cell": NK_BASE + ["NCAM1", "XCL1", "XCL2", "KLRC1", "GZMK", "SELL"],
}


def _crafted(types: dict[str, list[str]], n_cells: int = 700, seed: int = 3):
    import scanpy as sc

    from tests.synthetic import make_counts

    adata = make_counts(n_cells, cell_types=types, seed=seed)
    sc.pp.normalize_total(adata, target_sum=1e4)
    sc.pp.log1p(adata)
    return adata


def _calls(adata, groupby: str, tissue: str = "blood") -> dict[str, ClusterAnnotation]:
    clusters = [cm(str(c), []) for c in adata.obs[groupby].astype(str).unique()]
    calls = ReferenceAnnotator().annotate(clusters, tissue=tissue, species="human", adata=adata, groupby=groupby)
    return {c.cluster: a for c, a in zip(clusters, calls, strict=True)}


def test_a_sorted_population_cut_into_clusters_says_why_nothing_matched():
    from tests.synthetic import BLOOD_TYPES

    adata = _crafted({"T cell": BLOOD_TYPES["T cell"]}, n_cells=300)
    adata.obs["cluster"] = [str(i % 3) for i in range(adata.n_obs)]  # arbitrary parts of one cell type
    calls = _calls(adata, "cluster")
    assert all(c.reason_kind == "no_match" and "against the dataset's other cells" in c.reason
               for c in calls.values())
    assert any("a dataset of one cell type" in w and "--cluster-key" in w
               for w in adata.uns["cassia_batch"]["warnings"])
    adata.obs["one"] = "all"  # the way out the warning names: the same cells as one cluster are called
    assert _calls(adata, "one")["all"].main_cell_type != UNKNOWN
    # mouse symbols read as human: the warning names the species, not a sorted population
    mouse = _crafted({"T cell": BLOOD_TYPES["T cell"], "B cell": BLOOD_TYPES["B cell"]}, n_cells=300)
    mouse.var_names = [g[:1] + g[1:].lower() for g in mouse.var_names]
    mouse.obs["cluster"] = mouse.obs["truth"].astype(str)
    assert all(c.reason_kind == "no_match" for c in _calls(mouse, "cluster").values())
    [warning] = [w for w in mouse.uns["cassia_batch"]["warnings"] if "matched no cluster" in w]
    assert "check --species" in warning and "sorted population" not in warning


def test_genes_named_by_ensembl_id_are_not_told_the_sorted_population_advice():
    from tests.synthetic import BLOOD_TYPES

    adata = _crafted({"T cell": BLOOD_TYPES["T cell"], "B cell": BLOOD_TYPES["B cell"]}, n_cells=300)
    adata.var_names = [f"ENSG{i:011d}" for i in range(adata.n_vars)]  # no symbol column: the reference sees none
    adata.obs["cluster"] = adata.obs["truth"].astype(str)
    assert all(c.reason_kind == "no_match" for c in _calls(adata, "cluster").values())
    [warning] = [w for w in adata.uns["cassia_batch"]["warnings"] if "matched no cluster" in w]
    # the cause is the gene names, not how the clusters compare
    assert "too few to score any cell type" in warning and "gene symbols" in warning
    assert "sorted population" not in warning and "--cluster-key" not in warning


def test_cd56dim_and_cd56bright_nk_cells_are_told_apart():
    adata = _crafted(PBMC_CRAFTED)
    adata.obs["cluster"] = adata.obs["truth"].astype(str)
    calls = _calls(adata, "cluster")
    assert calls["CD56dim NK cell"].main_cell_type == "CD56dim NK cell", calls["CD56dim NK cell"].reasoning
    assert calls["CD56bright NK cell"].main_cell_type == "CD56bright NK cell", calls["CD56bright NK cell"].reasoning
    # the CL definition of the CD56bright subset is CD16-negative: a CD16 (FCGR3A) cluster is never called so
    reference = ReferenceAnnotator().reference
    assert "FCGR3A" in reference.by_name("CD56bright NK cell").absent_markers
    assert reference.by_name("CD56dim NK cell").cl_id == "CL:0000939"


def test_a_pure_subtype_cluster_gets_one_label_however_finely_it_is_cut():
    """The same cells cut into 1, 2 and 4 clusters per population (coarse to fine resolution): every piece
    keeps its population's subtype, though the pieces of one population no longer stand out from each other."""
    adata = _crafted(PBMC_CRAFTED, n_cells=800)
    truth = adata.obs["truth"].astype(str).to_numpy()
    rng = np.random.default_rng(0)
    for pieces in (1, 2, 4):
        adata.obs["cluster"] = [f"{t}|{rng.integers(pieces)}" for t in truth]
        calls = _calls(adata, "cluster")
        assert len(calls) == len(PBMC_CRAFTED) * pieces
        for name, call in calls.items():
            assert call.main_cell_type == name.split("|")[0], (pieces, name, call.reasoning)


def test_a_cluster_split_between_two_lineages_or_two_subtypes_is_flagged_mixed():
    adata = _crafted(PBMC_CRAFTED, n_cells=800)
    labels = adata.obs["truth"].astype(str).to_numpy().copy()
    b_cells = np.flatnonzero(labels == "B cell")
    labels[b_cells[: int(0.6 * len(b_cells))]] = "Naive CD4+ T cell"  # ~64 % naive CD4+ T, ~36 % B cells
    adata.obs["cluster"] = labels
    call = _calls(adata, "cluster")["Naive CD4+ T cell"]
    # no reference type spans two lineages: the call follows the majority's cells, the split is named
    assert call.main_cell_type == "Naive CD4+ T cell", call.reasoning
    assert len(call.mixed_cell_types) == 2
    (major, minor) = call.mixed_cell_types
    assert major.startswith("T cell (") and minor.startswith("B cell (") and "% of cells" in minor
    assert 55 <= int(major.split("(")[1].split("%")[0]) <= 75
    assert "split between lineages" in call.reasoning and call.confidence < 50
    # a cluster split between two subtypes of one lineage stays at their common parent
    labels = adata.obs["truth"].astype(str).to_numpy().copy()
    memory = np.flatnonzero(labels == "Memory CD4+ T cell")
    labels[memory[: int(0.8 * len(memory))]] = "Naive CD4+ T cell"
    adata.obs["cluster"] = labels
    call = _calls(adata, "cluster")["Naive CD4+ T cell"]
    assert call.main_cell_type == "CD4+ T cell", call.reasoning
    assert [m.split(" (")[0] for m in call.mixed_cell_types] == ["Naive CD4+ T cell", "Memory CD4+ T cell"]
    # CASSIA's "Predicted Detailed Cell Type" (and obs['cell_type_sub']): the subtypes, the majority's first
    assert call.sub_cell_types == ["Naive CD4+ T cell", "Memory CD4+ T cell"]


def test_a_lineage_measured_through_one_marker_is_reached_through_its_subtypes():
    """Only CD3D of the T-cell markers is measured, and basal cells express none of the measured
    epithelial markers: CD8A/CD8B/GZMK and KRT5/KRT14/TP63 carry the lineage, and the reasoning says so."""
    from tests.synthetic import BREAST_TYPES

    types = dict(BREAST_TYPES) | {"CD8+ T cell": ["CD3D", "CD8A", "CD8B", "GZMK", "CCL5", "CST7"],
                                  "Basal/myoepithelial cell": ["KRT5", "KRT14", "TP63", "KRT17", "OXTR"]}
    adata = _crafted(types, n_cells=600, seed=7)
    assert not {"CD3E", "CD3G", "CD2", "LCK", "TRAC"} & set(adata.var_names)
    adata.obs["cluster"] = adata.obs["truth"].astype(str)
    calls = _calls(adata, "cluster", tissue="breast")
    for name in ("CD8+ T cell", "Basal/myoepithelial cell"):
        assert calls[name].main_cell_type == name, calls[name].reasoning
        assert f"reached through {name}'s markers" in calls[name].reasoning
    assert "CD8A" in calls["CD8+ T cell"].reasoning and "KRT14" in calls["Basal/myoepithelial cell"].reasoning
    assert calls["Fibroblast"].main_cell_type == "Fibroblast" and "reached through" not in calls["Fibroblast"].reasoning


def test_pbmc68k_monocytes_without_cd14_in_the_panel_get_a_low_confidence_naming_it():
    """scanpy's bundled PBMC panel has no CD14: its sorted CD14+ monocytes (FCGR3A in most cells) cannot be
    told from non-classical monocytes, and the call says so instead of claiming full confidence."""
    import scanpy as sc

    adata = sc.datasets.pbmc68k_reduced()
    assert "CD14" not in adata.raw.var_names
    groups = [cm(c, []) for c in adata.obs["bulk_labels"].cat.categories]
    calls = ReferenceAnnotator().annotate(groups, tissue="pbmc", species="human", adata=adata,
                                          groupby="bulk_labels", use_raw=True)
    by_group = {c.cluster: a for c, a in zip(groups, calls, strict=True)}
    mono = by_group["CD14+ Monocyte"]
    assert mono.main_cell_type in {"Monocyte", "Classical monocyte", "Non-classical monocyte"}
    if mono.main_cell_type != "Monocyte":
        assert mono.confidence <= 40, mono.reasoning
        assert "CD14 (Classical monocyte)" in mono.reasoning
    # a call the panel does support keeps a high confidence
    assert by_group["CD19+ B"].main_cell_type in {"B cell", "Memory B cell", "Naive B cell"}
    assert by_group["CD34+"].confidence >= 60


def _two_cuts(adata, kinds: tuple[str, ...], rng_seed: int = 0) -> np.ndarray:
    """Cluster labels where the cells of ``kinds`` are dealt at random into two clusters ``T-a`` and ``T-b``
    (each holds the same mixture of them); the other cells keep their own type as cluster."""
    truth = adata.obs["truth"].astype(str).to_numpy()
    labels = truth.copy()
    rng = np.random.default_rng(rng_seed)
    for kind in kinds:
        idx = rng.permutation(np.flatnonzero(truth == kind))
        labels[idx[: len(idx) // 2]], labels[idx[len(idx) // 2:]] = "T-a", "T-b"
    return labels


def test_a_subtype_whose_markers_are_also_expressed_elsewhere_still_competes_on_the_cells():
    """CD4 markers (CD4, CD40LG, MAL, LTB) are also expressed by the monocytes, as CD4 and LTB are in blood:
    against the whole dataset they hardly stand out, so the cluster-level score of CD4+ T cells stays
    below the refining threshold. Two T clusters each half CD4+ and half CD8+ T cells are then a mixture of
    the two (called T cell, both named), not CD8+ T cells because CD4's cluster score fell under a cut."""
    import scanpy as sc

    from tests.synthetic import make_counts

    cd4 = ["CD4", "CD40LG", "MAL", "LTB"]
    types = {"CD4+ T cell": ["CD3E", "CD3D", "CD3G", "CD2", "LCK", *cd4],
             "CD8+ T cell": ["CD3E", "CD3D", "CD3G", "CD2", "LCK", "CD8A", "CD8B", "CCL5", "GZMH", "CST7"],
             "B cell": PBMC_CRAFTED["B cell"], "Classical monocyte": PBMC_CRAFTED["Classical monocyte"] + cd4}
    adata = make_counts(700, cell_types=types, seed=3)
    sc.pp.normalize_total(adata, target_sum=1e4)
    sc.pp.log1p(adata)
    adata.obs["cluster"] = _two_cuts(adata, ("CD4+ T cell", "CD8+ T cell"))
    calls = _calls(adata, "cluster")
    for name in ("T-a", "T-b"):
        call = calls[name]
        assert call.main_cell_type == "T cell", call.reasoning
        assert sorted(m.split(" (")[0] for m in call.mixed_cell_types) == ["CD4+ T cell", "CD8+ T cell"]
        assert "called at the common level" in call.reasoning
    assert calls["B cell"].main_cell_type == "B cell"
    assert calls["Classical monocyte"].main_cell_type == "Classical monocyte"


def test_a_lone_subtype_whose_sibling_the_panel_cannot_show_needs_most_of_the_cells():
    """Memory B cells (CD27, TNFRSF13B) and naive B cells in one cluster, in a panel without the naive markers'
    leading gene IGHD (only IL4R of them is measured, and expressed by nobody): half the cluster carries the
    memory signature, so it stays B cell and says why; a cluster of memory B cells alone is called so."""
    import anndata as ad
    import scanpy as sc
    import scipy.sparse as sp

    from tests.synthetic import make_counts

    b = PBMC_CRAFTED["B cell"]
    types = {"Memory B cell": [*b, "CD27", "TNFRSF13B"], "Naive B cell": b,
             "Plasma cell": ["MZB1", "JCHAIN", "TNFRSF17", "PRDM1", "XBP1", "SDC1"],
             "Classical monocyte": PBMC_CRAFTED["Classical monocyte"]}
    counts = make_counts(800, cell_types=types, seed=4)
    background = np.random.default_rng(0).poisson(0.02, (counts.n_obs, 1)).astype(np.float32)
    adata = ad.AnnData(X=sp.hstack([counts.X, sp.csr_matrix(background)]).tocsr(), obs=counts.obs,
                       var=counts.var.reindex([*counts.var_names, "IL4R"]))
    assert "IGHD" not in adata.var_names
    sc.pp.normalize_total(adata, target_sum=1e4)
    sc.pp.log1p(adata)
    truth = adata.obs["truth"].astype(str).to_numpy()
    adata.obs["cluster"] = np.where(np.isin(truth, ["Memory B cell", "Naive B cell"]), "B", truth)
    call = _calls(adata, "cluster")["B"]
    assert call.main_cell_type == "B cell", call.reasoning
    assert "Not refined to Memory B cell" in call.reasoning and "IGHD (Naive B cell)" in call.reasoning
    adata.obs["cluster"] = truth
    calls = _calls(adata, "cluster")
    assert calls["Memory B cell"].main_cell_type == "Memory B cell", calls["Memory B cell"].reasoning
    assert calls["Naive B cell"].main_cell_type in ("B cell", "Naive B cell")


def test_a_lineage_of_one_cluster_is_not_weighed_against_its_own_average():
    """Microglia are the brain set's only myeloid cluster: comparing its cells with the lineage's average is
    comparing them with themselves (half above, half below), so the cluster's markers decide and the call
    keeps a high confidence instead of one lowered by a meaningless half-support."""
    from tests.synthetic import BRAIN_TYPES

    adata = _crafted(BRAIN_TYPES, n_cells=500, seed=5)
    adata.obs["cluster"] = adata.obs["truth"].astype(str)
    call = _calls(adata, "cluster", tissue="brain")["Microglia"]
    assert call.main_cell_type == "Microglia", call.reasoning
    assert call.confidence >= 80 and "of the cells that carry" not in call.reasoning, call.reasoning


@pytest.mark.parametrize(("tissue", "macrophage"), [("spleen", True), ("lymph node", True), ("immune cells", True),
                                                    ("pbmc", False)])
def test_lymphoid_organs_and_immune_data_have_macrophages_and_blood_has_none(tissue, macrophage):
    """Spleen, lymph node and tonsil hold macrophages, and so may data a lab calls "immune"; blood does not."""
    from tests.synthetic import BLOOD_TYPES

    types = {**BLOOD_TYPES, "Macrophage": ["C1QA", "C1QB", "C1QC", "APOE", "CD163", "MRC1", "SELENOP", "MAF"]}
    adata = _crafted(types, n_cells=600)
    called = _calls(adata, "truth", tissue=tissue)["Macrophage"].main_cell_type
    assert (called == "Macrophage") is macrophage, called
    assert _calls(adata, "truth", tissue=tissue)["B cell"].main_cell_type == "B cell"


def test_a_cd45_positive_cluster_is_never_called_a_non_blood_type():
    """Lipid-laden macrophages express SPARC, CD36, FABP5 and RGCC, which also mark capillary endothelial cells;
    in a dataset with no endothelial cells those genes, not the shared myeloid ones, stand out. PTPRC (CD45) in
    most of the cluster's cells keeps the call among the blood lineages, and the reasoning says why."""
    from tests.synthetic import BLOOD_TYPES

    foamy = ["PTPRC", "SPARC", "CD36", "FABP5", "RGCC", "APOE", "CD68", "LYZ"]
    types = {**BLOOD_TYPES, "Monocyte": [*BLOOD_TYPES["Monocyte"], "CD68", "PTPRC"], "Foamy": foamy,
             "T cell": [*BLOOD_TYPES["T cell"], "PTPRC"], "B cell": [*BLOOD_TYPES["B cell"], "PTPRC"]}
    adata = _crafted(types, n_cells=600)
    call = _calls(adata, "truth", tissue="lung")["Foamy"]
    lineage = load_reference().by_name(call.main_cell_type).lineage if call.main_cell_type != "Unknown" else None
    assert lineage not in ("endothelial", "stromal", "epithelial"), call.reasoning
    assert "PTPRC (CD45) is detected in" in call.reasoning
    assert "PTPRC" not in _calls(adata, "truth", tissue="lung")["T cell"].reasoning  # said only where it mattered


def test_subtype_shares_below_a_lineage_split_say_what_they_are_shares_of():
    from cassia_helpers.dataset.annotate.reference.calls import _annotation
    from cassia_helpers.dataset.annotate.reference.expression import ExpressionCall

    ref = load_reference()
    call = ExpressionCall(ref.by_name("NK cell"), 0.5, {"NK/ILC": 0.5, "T": 0.3},
                          lineage_split=[("NK cell", 0.71), ("T cell", 0.29)],
                          mixed=[("CD56bright NK cell", 0.56), ("CD56dim NK cell", 0.44)])
    mixed = _annotation(cm("0", []), call).mixed_cell_types
    assert mixed == ["NK cell (71% of cells)", "T cell (29% of cells)", "CD56bright NK cell (56% within NK cell)",
                     "CD56dim NK cell (44% within NK cell)"]


def test_a_subtype_lacks_what_its_parent_lacks():
    """Activated B cells express CCR7, CD83, FSCN1 and LAMP3, mature regulatory DC markers; dendritic cells are
    defined not to express MS4A1 and CD79A, and so are their subtypes: the DC lineage, seen through mregDC's
    markers, is no rival to these B cells."""
    from tests.synthetic import BLOOD_TYPES

    activated = ["MS4A1", "CD79A", "CCR7", "CD83", "FSCN1", "LAMP3", "CCL22", "IL4I1", "CCL17"]
    adata = _crafted({**BLOOD_TYPES, "B cell": ["MS4A1", "CD79A"], "Activated B": activated})
    call = _calls(adata, "truth")["Activated B"]
    assert call.main_cell_type == "B cell", call.reasoning
    assert "Next lineage: Dendritic cell" not in call.reasoning and call.confidence >= 60, call.reasoning
