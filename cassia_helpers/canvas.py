"""Matplotlib figures without pyplot: make one, show it in a notebook, save it as a PNG.

:func:`new_figure` gives a :class:`matplotlib.figure.Figure` with its own Agg canvas (never pyplot's global
state, never a backend switch) that shows itself as a PNG in Jupyter whatever backend is active;
:func:`save_figure` writes one atomically; :class:`SavedFigures` holds the PNGs written and shows them in a
notebook. What is drawn is :mod:`cassia_helpers.dataset.figures`'s. matplotlib is imported on first use.
"""

from __future__ import annotations

import functools
import io
from pathlib import Path

from cassia_helpers.files import atomic_path

DPI = 120
#: labels, names and titles come from data, models and file names: ``$...$`` in them is text, never TeX (an odd
#: or stray ``$`` would fail the whole figure)
PLAIN_TEXT = {"text.parse_math": False}


@functools.cache
def _figure_class():
    from matplotlib.figure import Figure

    class NotebookFigure(Figure):
        """A Figure that shows itself as a PNG in Jupyter whatever matplotlib backend is active."""

        def draw(self, renderer) -> None:
            import matplotlib

            with matplotlib.rc_context(PLAIN_TEXT):  # tick labels are made when the figure is drawn
                super().draw(renderer)

        def _repr_png_(self) -> bytes:
            buffer = io.BytesIO()
            self.savefig(buffer, format="png", dpi=90, bbox_inches="tight")
            return buffer.getvalue()

    return NotebookFigure


def plain_text(function):
    """Decorate a function that draws a figure: the text it draws is plain text (:data:`PLAIN_TEXT`)."""

    @functools.wraps(function)
    def drawing(*args, **kwargs):
        import matplotlib

        with matplotlib.rc_context(PLAIN_TEXT):
            return function(*args, **kwargs)

    return drawing


def plain_text_figures() -> None:
    """Draw every later matplotlib text of this process as plain text (:data:`PLAIN_TEXT`): for the plots a
    notebook makes itself (``sc.pl.umap`` with labels a model wrote)."""
    import matplotlib

    matplotlib.rcParams.update(PLAIN_TEXT)


def new_figure(width: float, height: float):
    """A Figure with its own Agg canvas and constrained layout, unknown to pyplot.

    Parameters
    ----------
    width, height
        The size in inches.

    Returns
    -------
    matplotlib.figure.Figure
        A figure that shows itself as a PNG in Jupyter.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    figure = _figure_class()(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def save_figure(figure, path: str | Path, *, dpi: int = DPI) -> Path:
    """Write ``figure`` as a PNG, atomically.

    Parameters
    ----------
    figure
        The :class:`matplotlib.figure.Figure` to write.
    path
        The PNG's path; replaced only once the whole image is written.
    dpi
        The resolution.

    Returns
    -------
    pathlib.Path
        ``path``.
    """
    path = Path(path)
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png", dpi=dpi, bbox_inches="tight", facecolor="white")
    return path


class SavedFigures(dict):
    """``{figure name: PNG path}``; shown in a notebook as the images themselves."""

    def _ipython_display_(self) -> None:
        from IPython.display import Image, display

        for path in self.values():
            display(Image(filename=str(path)))
