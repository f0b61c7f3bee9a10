"""Where a UMAP's labels go: each on its own cells, never drifting onto another group's cells.

A label's spots are cells of its group's largest cluster (so a type split over distant clusters is labelled on
its main one), from the medoid (the cell with the smallest summed distance to the others) outwards, within the
cluster's central half. Each spot is scored: overlap with labels already placed, leaving the axes, cells of
other groups under the label's box, how few of the spot's nearest cells are the group's own, and distance from
the medoid; the cheapest wins. A long label may be broken onto two lines to fit. The smallest groups are
labelled first (they have the fewest spots). A label's position is always one of its own cells, unlike a
free-moving layout (adjustText), which pushed labels onto neighbours; where every such spot would overlap a
label already placed (small types packed together), the label stands in the nearest free, emptiest space
instead, with a thin line to that cell. Deterministic: same data, same figure.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

#: cells of a group considered as label spots (the medoid first), and cells sampled to find the medoid and to
#: count what lies under a label: bounded work however many cells a dataset has
CANDIDATES = 150
MEDOID_SAMPLE = 1500
UNDER_SAMPLE = 6000
NEIGHBOURS = 15


def label_spots(coords: np.ndarray, groups: np.ndarray, clusters: np.ndarray, *,
                limit: int = CANDIDATES) -> dict[str, np.ndarray]:
    """Candidate label positions of each group, biggest group first: cells of its largest cluster, the medoid
    first, then by their summed distance to the others (central cells before outlying ones)."""
    spots = {}
    names, sizes = np.unique(groups, return_counts=True)
    for name in names[np.argsort(-sizes, kind="stable")]:
        own = groups == name
        values, counts = np.unique(clusters[own], return_counts=True)
        biggest = values[np.argmax(counts)]
        points = coords[own & (clusters == biggest)]
        if len(points) > MEDOID_SAMPLE:  # evenly spaced cells: the same sample every time
            points = points[np.linspace(0, len(points) - 1, MEDOID_SAMPLE).astype(int)]
        summed = np.sqrt(((points[:, None, :] - points[None, :, :]) ** 2).sum(axis=2)).sum(axis=1)
        # the central half of the cluster only: a label on a straggler would point at empty space
        spots[str(name)] = points[np.argsort(summed, kind="stable")[:max(1, min(limit, len(points) // 2))]]
    return spots


def _overlap_area(box: tuple, other: tuple) -> float:
    width = min(box[1], other[1]) - max(box[0], other[0])
    height = min(box[3], other[3]) - max(box[2], other[2])
    return max(0.0, width) * max(0.0, height)


def _forms(label: str) -> list[str]:
    """The label on one line, and for a long one also on two (broken at the space nearest its middle)."""
    spaces = [i for i, c in enumerate(label) if c == " "]
    if len(label) < 16 or not spaces:
        return [label]
    middle = min(spaces, key=lambda i: abs(i - len(label) / 2))
    return [label, label[:middle] + "\n" + label[middle + 1:]]


def place_labels(ax, spots: dict[str, np.ndarray], coords: np.ndarray, groups: np.ndarray, *,
                 fontsize: float, names: Mapping[str, str] | None = None) -> list:
    """Write each group's label on its own cells (see the module docstring); return the Text artists.

    ``spots`` from :func:`label_spots`; ``names`` the text shown for a group (default: the group itself).
    The figure is drawn once first, so that the layout and the axes' limits are final and a label's size is
    known in data units.
    """
    import matplotlib.patheffects as effects

    figure = ax.figure
    figure.canvas.draw()
    renderer = figure.canvas.get_renderer()
    to_data = ax.transData.inverted()
    (x_low, x_high), (y_low, y_high) = sorted(ax.get_xlim()), sorted(ax.get_ylim())
    step = max(1, len(coords) // UNDER_SAMPLE)
    under_xy, under_group = coords[::step], groups[::step]
    from scipy.spatial import cKDTree

    neighbours = cKDTree(under_xy)
    k = min(NEIGHBOURS, len(under_xy))
    outline = [effects.withStroke(linewidth=2.5, foreground="white")]
    placed: list[tuple] = []
    texts = []
    # the most constrained first: a small group has few spots, a big one has room left afterwards
    for group in sorted(spots, key=lambda g: len(spots[g])):
        candidates = spots[group]
        shown = names.get(group, group) if names is not None else group
        text = ax.text(0, 0, shown, fontsize=fontsize, ha="center", va="center", weight="bold",
                       path_effects=outline, zorder=5)
        # how much of each spot's neighbourhood is the group's own: a label among other cells misleads
        _, nearest = neighbours.query(candidates, k=k)
        purity = (under_group[np.asarray(nearest).reshape(len(candidates), -1)] == group).mean(axis=1)
        best = None
        for form in _forms(shown):
            text.set_text(form)
            extent = text.get_window_extent(renderer)
            corner = to_data.transform([[0, 0], [extent.width * 1.08, extent.height * 1.15]])
            half_w, half_h = np.abs(corner[1] - corner[0]) / 2
            for rank, (x, y) in enumerate(candidates):
                box = (x - half_w, x + half_w, y - half_h, y + half_h)
                outside = box[0] < x_low or box[1] > x_high or box[2] < y_low or box[3] > y_high
                covered = sum(_overlap_area(box, other) for other in placed) / (4 * half_w * half_h)
                inside = ((under_xy[:, 0] >= box[0]) & (under_xy[:, 0] <= box[1])
                          & (under_xy[:, 1] >= box[2]) & (under_xy[:, 1] <= box[3]))
                foreign = float((under_group[inside] != group).mean()) if inside.any() else 0.0
                cost = (10.0 * outside + 5.0 * covered + foreign + (1.0 - purity[rank])
                        + 0.25 * rank / max(len(candidates), 1) + 0.1 * (form != shown))
                if best is None or cost < best[0]:
                    best = (cost, form, x, y, box, covered)
        _, form, x, y, box, covered = best
        text.set_text(form)
        text.set_position((float(x), float(y)))
        if covered > 0:  # no free spot on its own cells: beside them, with a line to them
            free = _free_spot((x, y), box, placed, under_xy, (x_low, x_high, y_low, y_high))
            if free is not None:
                text.remove()
                text = ax.annotate(form, xy=(float(x), float(y)), xytext=free[:2], fontsize=fontsize, ha="center",
                                   va="center", weight="bold", path_effects=outline, zorder=5,
                                   arrowprops={"arrowstyle": "-", "color": "0.25", "lw": 0.7, "shrinkB": 1})
                box = free[2]
        placed.append(box)
        texts.append(text)
    return texts


def _free_spot(anchor: tuple, box: tuple, placed: list[tuple], under_xy: np.ndarray,
               limits: tuple) -> tuple | None:
    """The nearest position around ``anchor`` where a label of ``box``'s size overlaps no placed label and stays
    inside the axes, preferring empty space: ``(x, y, box)``, or ``None`` if there is none."""
    half_w, half_h = (box[1] - box[0]) / 2, (box[3] - box[2]) / 2
    x_low, x_high, y_low, y_high = limits
    steps_x, steps_y = np.meshgrid(np.arange(-4, 5) * half_w, np.arange(-8, 9) * half_h)
    centres = np.column_stack([anchor[0] + steps_x.ravel(), anchor[1] + steps_y.ravel()])
    best = None
    for cx, cy in centres:
        spot = (cx - half_w, cx + half_w, cy - half_h, cy + half_h)
        if spot[0] < x_low or spot[1] > x_high or spot[2] < y_low or spot[3] > y_high:
            continue
        covers_anchor = spot[0] <= anchor[0] <= spot[1] and spot[2] <= anchor[1] <= spot[3]
        if covers_anchor or any(_overlap_area(spot, other) > 0 for other in placed):
            continue
        under = ((under_xy[:, 0] >= spot[0]) & (under_xy[:, 0] <= spot[1])
                 & (under_xy[:, 1] >= spot[2]) & (under_xy[:, 1] <= spot[3])).mean()
        # the cells under the label against an even spread of them (0: empty space), then the line's length
        crowding = under * (x_high - x_low) * (y_high - y_low) / (4 * half_w * half_h)
        distance = np.hypot((cx - anchor[0]) / (x_high - x_low), (cy - anchor[1]) / (y_high - y_low))
        cost = crowding + 3.0 * distance
        if best is None or cost < best[0]:
            best = (cost, float(cx), float(cy), spot)
    return None if best is None else best[1:]
