"""Colours of cell types, the same in every figure of a run and in the run report.

A label's colour comes from a stable hash of its name into a 48-colour qualitative palette, so each dataset
notebook (run in its own kernel, unaware of the others) gives ``NK cell`` the same colour without any
coordination. ``Unknown`` (and other "no call" labels) are always grey. This module imports nothing heavy:
the report and the driver can use it.
"""

from __future__ import annotations

import functools
import hashlib
import math
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
#: Two cell types of one dataset get colours at least this far apart (CIEDE2000), when the palette allows:
#: at 15 two colours are told apart at a glance even as small scatter points (the palette's closest pairs,
#: e.g. ``#555522`` and ``#446600``, are about 7-11 apart).
MIN_DISTANCE = 15.0
#: Labels drawn grey: no cell type was called.
NO_CALL_LABELS = frozenset({"unknown", "unassigned", "unannotated", "nan", ""})


def is_no_call(label: str) -> bool:
    """Whether ``label`` means that no cell type was called (``Unknown``, empty, ...)."""
    return str(label).strip().casefold() in NO_CALL_LABELS


def _slot(label: str) -> int:
    digest = hashlib.blake2b(str(label).strip().casefold().encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big") % len(PALETTE)


@functools.cache
def _lab(color: str) -> tuple[float, float, float]:
    """CIELAB (D65) of an sRGB ``#rrggbb`` colour."""
    r, g, b = (int(color[i:i + 2], 16) / 255 for i in (1, 3, 5))
    lin = [c / 12.92 if c <= 0.04045 else ((c + 0.055) / 1.055) ** 2.4 for c in (r, g, b)]
    x = (0.4124 * lin[0] + 0.3576 * lin[1] + 0.1805 * lin[2]) / 0.95047
    y = 0.2126 * lin[0] + 0.7152 * lin[1] + 0.0722 * lin[2]
    z = (0.0193 * lin[0] + 0.1192 * lin[1] + 0.9505 * lin[2]) / 1.08883

    def f(v: float) -> float:
        return v ** (1 / 3) if v > 216 / 24389 else (24389 / 27 * v + 16) / 116

    fx, fy, fz = f(x), f(y), f(z)
    return 116 * fy - 16, 500 * (fx - fy), 200 * (fy - fz)


@functools.cache
def color_distance(first: str, second: str) -> float:
    """Perceptual distance of two ``#rrggbb`` colours: CIEDE2000 (about 1 = just noticeable; 10+ = clearly
    different)."""
    (l1, a1, b1), (l2, a2, b2) = _lab(first.lower()), _lab(second.lower())
    c_mean = (math.hypot(a1, b1) + math.hypot(a2, b2)) / 2
    g = 0.5 * (1 - math.sqrt(c_mean ** 7 / (c_mean ** 7 + 25 ** 7)))
    a1, a2 = (1 + g) * a1, (1 + g) * a2
    c1, c2 = math.hypot(a1, b1), math.hypot(a2, b2)
    h1, h2 = math.degrees(math.atan2(b1, a1)) % 360, math.degrees(math.atan2(b2, a2)) % 360
    dh = 0.0 if c1 * c2 == 0 else (h2 - h1 + 180) % 360 - 180
    d_l, d_c = l2 - l1, c2 - c1
    d_h = 2 * math.sqrt(c1 * c2) * math.sin(math.radians(dh) / 2)
    l_mean, c_mean = (l1 + l2) / 2, (c1 + c2) / 2
    if c1 * c2 == 0:
        h_mean = h1 + h2
    elif abs(h1 - h2) <= 180:
        h_mean = (h1 + h2) / 2
    else:
        h_mean = (h1 + h2 + 360) / 2 if h1 + h2 < 360 else (h1 + h2 - 360) / 2
    t = (1 - 0.17 * math.cos(math.radians(h_mean - 30)) + 0.24 * math.cos(math.radians(2 * h_mean))
         + 0.32 * math.cos(math.radians(3 * h_mean + 6)) - 0.20 * math.cos(math.radians(4 * h_mean - 63)))
    rotation = 30 * math.exp(-(((h_mean - 275) / 25) ** 2))
    r_c = 2 * math.sqrt(c_mean ** 7 / (c_mean ** 7 + 25 ** 7))
    s_l = 1 + 0.015 * (l_mean - 50) ** 2 / math.sqrt(20 + (l_mean - 50) ** 2)
    s_c, s_h = 1 + 0.045 * c_mean, 1 + 0.015 * c_mean * t
    r_t = -math.sin(math.radians(2 * rotation)) * r_c
    return math.sqrt((d_l / s_l) ** 2 + (d_c / s_c) ** 2 + (d_h / s_h) ** 2 + r_t * (d_c / s_c) * (d_h / s_h))


def _nearest(color: str, others: Iterable[str]) -> float:
    return min((color_distance(color, other) for other in others), default=math.inf)


def run_palette(labels: Iterable[str], *, fixed: Mapping[str, str] | None = None) -> dict[str, str]:
    """A colour for each label: deterministic for a label set, and mostly the same label → same colour.

    Each label prefers the palette slot its name hashes to, so a label has the same colour in every dataset
    of a run unless that colour is taken or too close to one taken. Labels are served in alphabetical order;
    a label whose slot is taken, or closer than :data:`MIN_DISTANCE` (CIEDE2000) to a colour already given,
    takes the next slot that is far enough from all of them (or, when none is, the free slot farthest from
    them), so no two labels of a set share a colour (up to 48 labels; beyond that colours repeat) and
    colours of one figure stay distinguishable. ``Unknown`` is grey.

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
        given = [c for c in colors.values() if c != UNKNOWN_COLOR]
        candidates = [c for c in (PALETTE[(slot + step) % len(PALETTE)] for step in range(len(PALETTE)))
                      if c in free]
        far = [c for c in candidates if _nearest(c, given) >= MIN_DISTANCE]
        candidate = far[0] if far else max(candidates, key=lambda c: _nearest(c, given))
        colors[label] = candidate
        free.remove(candidate)
    return colors
