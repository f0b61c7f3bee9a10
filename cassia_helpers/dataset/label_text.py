"""Normalised forms of free-text cell-type labels, for matching them to Cell Ontology names.

Case, punctuation and plurals are dropped, marker signs are spelt out (``"CD14+"`` = ``"CD14
positive"``, ``"CD27-"`` = ``"CD27 negative"``) and a bare CD marker before a word is read as
positive (``"CD8 T cells"`` = ``"CD8+ T cells"``). Used by :mod:`cassia_helpers.dataset.ontology`.
"""

from __future__ import annotations

import re

# words that say nothing about which cell type is meant
GENERIC_WORDS = frozenset({"cell", "type", "like", "positive", "negative", "of", "the", "and", "human", "mouse",
                      "a", "an", "in", "population", "subset", "subtype", "cluster"})


# short forms of cell-type names common in papers and in models' answers ("CD14+ Mono", "pDC", "Tregs")
ABBREVIATIONS = {"mono": "monocyte", "dc": "dendritic cell", "pdc": "plasmacytoid dendritic cell",
                 "cdc": "conventional dendritic cell", "treg": "regulatory t cell", "ctl": "cytotoxic t cell"}


def singular(word: str) -> str:
    """The singular of an English plural (``"cells"`` -> ``"cell"``); other words unchanged."""
    if len(word) <= 3 or word.endswith(("ss", "us", "is", "ous")):
        return word
    if word.endswith("ies") and len(word) > 4:
        return word[:-3] + "y"
    if word.endswith(("ches", "shes", "xes")):
        return word[:-2]
    if word.endswith("s"):
        return word[:-1]
    return word


def tokens(text: str) -> list[str]:
    """Normalised tokens: lower case, marker signs spelt out, punctuation dropped, plurals singular."""
    text = str(text).lower()
    # "CD14+", "CD14 +", "CD14pos" -> "cd14 positive"; "CD27-" / "CD27neg" -> "cd27 negative"
    text = re.sub(r"(?<=[0-9a-z])\s*\+(?=\s|$|[,/);])", " positive ", text)
    text = re.sub(r"(?<=[0-9a-z])\s*(?:\+\+|\+)", " positive ", text)
    text = re.sub(r"(?<=\d)(?:pos)\b", " positive", text)
    text = re.sub(r"(?<=\d)(?:neg)\b", " negative", text)
    text = re.sub(r"(?<=[0-9a-z])-(?=\s|$|[,/);])", " negative ", text)
    text = re.sub(r"\b(?:hi|high|bright)\b", " bright ", text)
    words = [part for w in re.sub(r"[^0-9a-z]+", " ", text).split()
             for part in ABBREVIATIONS.get(singular(w), singular(w)).split()]
    # a bare CD marker before a cell word means its positive form: "CD8 T cells" = "CD8+ T cells"
    out = []
    for i, word in enumerate(words):
        out.append(word)
        following = words[i + 1] if i + 1 < len(words) else ""
        if re.fullmatch(r"cd\d+[a-z]?", word) and following not in ("positive", "negative", "bright", "dim", ""):
            out.append("positive")
    return out


def key(text: str) -> str:
    """The normalised tokens in their order."""
    return " ".join(tokens(text))


def bag(text: str) -> str:
    """The normalised tokens in sorted order (word order ignored)."""
    return " ".join(sorted(tokens(text)))


def content_words(tokens: list[str]) -> set[str]:
    """The tokens that say which cell type is meant."""
    return {t for t in tokens if t not in GENERIC_WORDS}


def similar(a: str, b: str) -> bool:
    """Equal, or one a prefix of the other of at least five letters."""
    if a == b:
        return True
    short, long_ = sorted((a, b), key=len)
    return len(short) >= 5 and long_.startswith(short)


def marker_like(token: str) -> bool:
    """Whether a token looks like a gene or CD marker (letters then digits)."""
    return bool(re.fullmatch(r"[a-z]+\d+[a-z0-9]*", token))
