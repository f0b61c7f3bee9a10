"""Find the datasets of a batch: ``{data_dir}/{tissue}/*.h5ad``, and say why every other entry is skipped."""

from __future__ import annotations

import unicodedata
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cassia_helpers.files import absolute
from cassia_helpers.settings import UsageError

SUFFIX = ".h5ad"
# Formats a user may expect to work, named when they are skipped.
UNSUPPORTED = {".h5ad.gz": "compressed h5ad (gunzip it first)", ".zarr": "zarr store (not read yet: write it "
               "as .h5ad with anndata)", ".loom": "loom file (not read yet: convert it with scanpy.read_loom and "
               "write_h5ad)", ".h5": "HDF5 file (a 10x .h5? convert it with scanpy.read_10x_h5 and write_h5ad)",
               ".rds": "R object (export it as .h5ad, e.g. with zellkonverter or SeuratDisk)",
               ".csv": "text matrix (read it with scanpy and write_h5ad)",
               (".mtx", ".mtx.gz"): "matrix market (read it with scanpy.read_10x_mtx and write_h5ad)"}
# Cell Ranger's filtered_feature_bc_matrix/ (matrix.mtx.gz beside barcodes and features), as GEO names it too
# (GSM..._matrix.mtx.gz): a folder, so no suffix above names it
MTX_FOLDER = "10x matrix folder (convert it with scanpy.read_10x_mtx and write_h5ad)"


# a file name holds at most 255 bytes; the longest the run writes is ".{name}_cassia_conversations.json.XXXXXXXX.tmp"
MAX_NAME_BYTES = 200


def name_problem(name: object) -> str:
    """Why ``name`` cannot be a tissue or dataset folder inside the run folder, or ``""``.

    A name is one path component (no ``/``, not ``.`` or ``..``, not hidden) without control characters: a
    newline or carriage return would split the progress lines and the summaries' rows.
    """
    if not isinstance(name, str) or not name.strip():
        return "an empty name"
    if "/" in name or "\\" in name or name in (".", "..") or name.startswith("."):
        return "a name that is not a single folder inside the run folder"
    if any(unicodedata.category(c) in ("Cc", "Cf", "Zl", "Zp") for c in name):
        return "a name with a control character (newline, carriage return, tab, ...)"
    if len(name.encode("utf-8", "surrogateescape")) > MAX_NAME_BYTES:
        return (f"a name longer than {MAX_NAME_BYTES} bytes (its output files, such as "
                "{name}_cassia_conversations.json, would pass the file system's 255-byte limit)")
    return ""


def check_name(name: object, *, what: str, source: str | Path) -> str:
    """``name`` if it is a valid :func:`name_problem`-free folder name, else a :class:`UsageError` naming
    ``source`` (the file or flag it came from)."""
    problem = name_problem(name)
    if problem:
        raise UsageError(f"{source}: {what} {name!r} is {problem}")
    return name


@dataclass(frozen=True)
class Dataset:
    """One input file. ``name`` is the file stem (or a manifest's ``dataset``), used for every output file name;
    ``options`` are the analysis settings of this dataset alone (from ``--manifest``), as ``(name, value)``."""

    name: str
    tissue: str
    path: Path
    options: tuple[tuple[str, Any], ...] = ()


@dataclass
class Discovery:
    """The datasets found, and every entry of a tissue folder that was skipped, with the reason."""

    datasets: list[Dataset] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)


def _classify(path: Path) -> tuple[str, str]:
    """``("dataset", "")``, ``("skip", reason)`` or ``("ignore", "")`` for one entry of a tissue folder."""
    name = path.name
    if name.startswith("."):
        return "ignore", ""
    if name != name.strip():
        return "skip", "file name starts or ends with a space (rename it)"
    if path.is_symlink() and not path.exists():
        return "skip", "broken symbolic link"
    lower = name.lower()
    if lower.endswith(SUFFIX) and name_problem(name[: -len(SUFFIX)]):
        return "skip", f"not usable as an output folder name: {name_problem(name[: -len(SUFFIX)])} (rename it)"
    if lower.endswith(SUFFIX):
        return ("dataset", "") if path.is_file() else ("skip", "named .h5ad but not a file")
    for suffix, reason in UNSUPPORTED.items():
        if lower.endswith(suffix):
            return "skip", reason
    if path.is_dir() and _holds_matrix_market(path):
        return "skip", MTX_FOLDER
    return "ignore", ""


def _holds_matrix_market(folder: Path) -> bool:
    """Whether ``folder`` holds a 10x matrix (``matrix.mtx`` or ``matrix.mtx.gz``, with or without a prefix)."""
    try:
        return any(p.name.lower().endswith(("matrix.mtx", "matrix.mtx.gz")) for p in folder.iterdir())
    except OSError:  # unreadable: nothing to say about it beyond what the user sees listing it
        return False


def scan_tissue(folder: Path, tissue: str) -> Discovery:
    """Datasets of one tissue folder and the entries skipped there."""
    found = Discovery()
    for path in sorted(folder.iterdir()):
        kind, reason = _classify(path)
        if kind == "dataset":
            found.datasets.append(Dataset(name=path.name[: -len(SUFFIX)], tissue=tissue, path=absolute(path)))
        elif kind == "skip":
            shown = str(path) if str(path).isprintable() else repr(str(path))
            found.skipped.append(f"{shown}: skipped: {reason}")
    return found


def available_tissues(data_dir: Path) -> list[str]:
    """Tissue folders of ``data_dir`` (sub-folders not starting with a dot), sorted."""
    if not data_dir.is_dir():
        raise UsageError(f"{data_dir}: data directory not found")
    return sorted(p.name for p in data_dir.iterdir() if p.is_dir() and not p.name.startswith("."))


def discover(data_dir: Path, tissues: list[str]) -> Discovery:
    """Datasets of the selected tissues (``["all"]`` selects every tissue), and what was skipped.

    Raises
    ------
    UsageError
        An unknown tissue, or nothing to process; the message lists the tissues found.
    """
    found = available_tissues(data_dir)
    listing = ", ".join(found) if found else "none"
    if not tissues:
        raise UsageError(f"no tissue selected; tissues found in {data_dir}: {listing}")
    if "all" in tissues:
        selected = found
    else:
        unknown = [t for t in tissues if t not in found]
        if unknown:
            raise UsageError(f"unknown tissue(s) {', '.join(unknown)} in {data_dir}; tissues found: {listing}")
        selected = list(dict.fromkeys(tissues))
    result = Discovery()
    for tissue in selected:
        if name_problem(tissue):
            result.skipped.append(f"{str(data_dir / tissue)!r}: skipped: tissue folder with {name_problem(tissue)}")
            continue
        part = scan_tissue(data_dir / tissue, tissue)
        result.datasets += part.datasets
        result.skipped += part.skipped
    if not result.datasets:
        detail = "; ".join(result.skipped[:5])
        raise UsageError(f"no .h5ad files to process in {data_dir} (tissues: {listing})" +
                         (f"; {detail}" if detail else ""))
    names = [(d.tissue, d.name.lower()) for d in result.datasets]
    clashes = sorted({f"{t}/{n}" for t, n in names if names.count((t, n)) > 1})
    if clashes:
        raise UsageError(f"datasets whose names differ only in case would share an output folder: "
                         f"{', '.join(clashes)}")
    return result


def single_input(path: Path, tissue: str) -> Discovery:
    """``--input FILE --tissue NAME``: one dataset without a tissue folder."""
    check_name(tissue, what="tissue", source="--tissue")
    kind, reason = _classify(path)
    if not path.exists() and not path.is_symlink():
        raise UsageError(f"{path}: input file not found")
    if kind != "dataset":
        raise UsageError(f"{path}: {reason or 'not an .h5ad file'}")
    return Discovery([Dataset(name=path.name[: -len(SUFFIX)], tissue=tissue, path=absolute(path))])
