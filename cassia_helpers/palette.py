"""Colours of cell types, the same in every figure of a run and in the run report.

A label's colour comes from a stable hash of its name into a 48-colour qualitative palette, so each dataset
notebook (run in its own kernel, unaware of the others) gives ``NK cell`` the same colour without any
coordination. ``Unknown`` (and other "no call" labels) are always grey. This module imports nothing heavy:
the report and the driver can use it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping

#: The first nine are matplotlib's ``tab10`` without its grey; the rest were picked greedily to be as far
#: as possible (in CIELAB) from every colour before them, excluding greys, very dark and very light colours.
PALETTE: tuple[str, ...] = (
    "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#bcbd22",
    "#17becf", "#226644", "#aacc99", "#ff0077", "#886600", "#1144cc", "#ffaa77", "#aa11aa",
    "#00ddaa", "#992255", "#bbbbff", "#ff7788", "#0088ff", "#446600", "#eeaa00", "#ff77ff",
    "#994411", "#cc1188", "#88cc22", "#eeaacc", "#ccbb66", "#aa77ff", "#00bbff", "#99cc66",
    "#00dd77", "#aa6688", "#559955", "#555522", "#aa0033", "#3355aa", "#ff7755", "#009988",
    "#aa8855", "#993388", "#665588", "#dd99ff", "#cc7722", "#779911", "#7733bb", "#9999ff",
)
UNKNOWN_COLOR = "#bfbfbf"
#: Labels drawn grey: no cell type was called.
NO_CALL_LABELS = frozenset({"unknown", "unassigned", "unannotated", "nan", ""})


def is_no_call(label: str) -> bool:
    """Whether ``label`` means that no cell type was called (``Unknown``, empty, ...)."""
    return str(label).strip().casefold() in NO_CALL_LABELS


def _slot(label: str) -> int:
    digest = hashlib.blake2b(str(label).strip().casefold().encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big") % len(PALETTE)


def run_palette(labels: Iterable[str], *, fixed: Mapping[str, str] | None = None) -> dict[str, str]:
    """A colour for each label: deterministic for a label set, and mostly the same label → same colour.

    Each label prefers the palette slot its name hashes to. When two labels of the set want the same slot,
    the one first in alphabetical order keeps it and the other takes the next free slot, so no two labels
    of a set share a colour (up to 48 labels; beyond that colours repeat). ``Unknown`` is grey.

    Parameters
    ----------
    labels
        The labels to colour (duplicates ignored).
    fixed
        Colours that win over the hash, e.g. a run-level ``{label: colour}`` file.

    Returns
    -------
    ``{label: "#rrggbb"}`` for every distinct label.
    """
    fixed = dict(fixed or {})
    distinct = sorted({str(label) for label in labels}, key=lambda s: (s.casefold(), s))
    colors: dict[str, str] = {}
    taken = {c.lower() for label, c in fixed.items() if label in distinct}
    for label in distinct:
        if label in fixed:
            colors[label] = fixed[label]
        elif is_no_call(label):
            colors[label] = UNKNOWN_COLOR
    free = [c for c in PALETTE if c not in taken]
    for label in distinct:
        if label in colors:
            continue
        if not free:  # more labels than colours: reuse the palette
            free = list(PALETTE)
        slot = _slot(label)
        for step in range(len(PALETTE)):
            candidate = PALETTE[(slot + step) % len(PALETTE)]
            if candidate in free:
                break
        colors[label] = candidate
        free.remove(candidate)
    return colors
