"""Consensus over repeated or multi-model annotations of a cluster: label, agreement, runners-up."""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field

from cassia_helpers.dataset import label_text
from cassia_helpers.dataset.annotate import UNKNOWN

_SYNONYMS = {"t lymphocyte": "t cell", "b lymphocyte": "b cell", "natural killer cell": "nk cell"}
# ontology matches that name the label's own term (not a broader one, nor an annotator's proposed id)
_SAME_TERM = ("exact", "reference", "normalised")


def normalise_label(name: str) -> str:
    """A cell-type name in a comparable form: the Cell Ontology term it names (``T cells, CD4+``, ``CD4+ T
    cells`` and ``CD4-positive, alpha-beta T cell`` agree; ``Mono (classical)`` and ``Classical monocytes``
    agree), else its words in any order without case, punctuation, plurals or ``-positive``/``+``
    (:func:`cassia_helpers.dataset.label_text.bag`) and a few common synonyms."""
    text = (name or "").strip().lower()
    if re.match(r"^(unknown|unclear|undetermined|n/?a)\b", text):
        return UNKNOWN.lower()
    from cassia_helpers.dataset.ontology import map_label  # its index is built only when runs are compared

    match = map_label(name)
    if match.method in _SAME_TERM:
        return match.term_id
    text = label_text.key(text)
    return label_text.bag(_SYNONYMS.get(text, text))


@dataclass
class Consensus:
    """``label`` (the most common call, in the spelling used most), ``agreement`` (fraction of runs with
    that call), ``runners_up`` (other calls, most common first), ``disputed`` (agreement below the
    threshold), ``votes`` (normalised name → count)."""

    label: str
    agreement: float
    runners_up: list[str] = field(default_factory=list)
    disputed: bool = False
    votes: dict[str, int] = field(default_factory=dict)
    n_runs: int = 0


def consensus(labels: list[str], *, threshold: float = 0.5) -> Consensus:
    """Consensus of ``labels`` (one per run or model); ties go to the earlier run's call.

    Unknown calls count as runs (they lower the agreement) but never win against a real call.
    """
    if not labels:
        return Consensus(UNKNOWN, 0.0, disputed=True)
    keys = [normalise_label(x) for x in labels]
    votes = Counter(keys)
    first_seen = {k: keys.index(k) for k in votes}
    ranked = sorted(votes, key=lambda k: (k == UNKNOWN.lower(), -votes[k], first_seen[k]))
    spelled = {k: Counter(x for x, kk in zip(labels, keys, strict=True) if kk == k).most_common(1)[0][0]
               for k in votes}
    winner = ranked[0]
    agreement = votes[winner] / len(labels)
    label = UNKNOWN if winner == UNKNOWN.lower() else spelled[winner]
    return Consensus(label=label, agreement=round(agreement, 4),
                     runners_up=[spelled[k] for k in ranked[1:]], disputed=agreement < threshold,
                     votes=dict(votes), n_runs=len(labels))


__all__ = ["Consensus", "consensus", "normalise_label"]
