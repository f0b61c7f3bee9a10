"""Find the datasets of a batch: ``{data_dir}/{tissue}/*.h5ad``."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


class UsageError(ValueError):
    """A problem with what the user asked for (exit status 2)."""


@dataclass(frozen=True)
class Dataset:
    """One input file. ``name`` is the file stem, used for every output file name."""

    name: str
    tissue: str
    path: Path


def available_tissues(data_dir: Path) -> list[str]:
    """Tissue folders of ``data_dir`` (sub-folders holding at least one ``.h5ad``), sorted."""
    if not data_dir.is_dir():
        raise UsageError(f"{data_dir}: data directory not found")
    return sorted(
        p.name
        for p in data_dir.iterdir()
        if p.is_dir() and not p.name.startswith(".") and any(_h5ad_files(p))
    )


def discover(data_dir: Path, tissues: list[str]) -> list[Dataset]:
    """Datasets of the selected tissues; ``["all"]`` selects every tissue.

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
            raise UsageError(
                f"unknown tissue(s) {', '.join(unknown)} in {data_dir}; tissues found: {listing}"
            )
        selected = list(dict.fromkeys(tissues))
    datasets = [
        Dataset(name=path.stem, tissue=tissue, path=path.resolve())
        for tissue in selected
        for path in _h5ad_files(data_dir / tissue)
    ]
    if not datasets:
        raise UsageError(f"no .h5ad files to process in {data_dir}; tissues found: {listing}")
    return datasets


def _h5ad_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix == ".h5ad" and p.is_file())
