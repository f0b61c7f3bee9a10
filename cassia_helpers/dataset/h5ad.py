"""Reading an h5ad file with anndata, every failure an :class:`~cassia_helpers.inputs.InputError` naming its cause.

An ``uns`` entry written by a newer anndata (an encoding this one has no reader for) does not stop the
dataset: ``uns`` holds the author's notes and parameters, which the run does not use, so the entry is left out
with a warning and everything else is read.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import TYPE_CHECKING

from cassia_helpers.contract import TOO_LARGE
from cassia_helpers.dataset.raw import DUPLICATE_NAMES
from cassia_helpers.inputs import InputError, failed_element, newer_encoding, unreadable

if TYPE_CHECKING:
    from anndata import AnnData


def read_h5ad(path: Path) -> tuple[AnnData, dict[str, str]]:
    """The AnnData in ``path``, and ``{uns key: encoding}`` of the ``uns`` entries left out because they were
    written by a newer anndata.

    Raises
    ------
    InputError
        The file cannot be read (:func:`~cassia_helpers.inputs.unreadable` names why), or it does not fit in
        memory.
    """
    for tolerant in (False, True):
        try:
            return _read(path, tolerant=tolerant)
        except MemoryError:
            raise InputError(f"{path}: {TOO_LARGE}: ran out of memory while reading it") from None
        except Exception as exc:  # noqa: BLE001 - anndata raises many types for damaged files
            # only an unreadable uns entry is worth a second, tolerant read
            if tolerant or not (newer_encoding(exc) and failed_element(exc).startswith("uns/")):
                raise unreadable(path, exc) from None
    raise AssertionError("unreachable: the tolerant read returns or raises")


def _read(path: Path, *, tolerant: bool) -> tuple[AnnData, dict[str, str]]:
    """Read ``path``; with ``tolerant``, each top-level ``uns`` entry on its own, leaving out those with an
    encoding this anndata does not know (anndata's own dispatch, :func:`anndata.experimental.read_dispatched`)."""
    import anndata as ad
    import h5py

    left_out: dict[str, str] = {}

    def read_uns_entries(read, name: str, element, iospec):  # noqa: ANN001 - anndata's callback signature
        if name != "/uns":
            return read(element)
        entries = {}
        for key, value in element.items():
            try:
                entries[key] = ad.io.read_elem(value)
            except Exception as exc:
                encoding = newer_encoding(exc)
                if not encoding:
                    raise
                left_out[key] = encoding
        return entries

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=DUPLICATE_NAMES)  # made unique later, with a warning
        if not tolerant:
            return ad.read_h5ad(path), left_out
        from anndata.experimental import read_dispatched

        with h5py.File(path, "r") as handle:
            return read_dispatched(handle, read_uns_entries), left_out
