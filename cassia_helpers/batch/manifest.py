"""``--manifest datasets.csv``: the datasets of a run listed one per row, each with its own tissue and,
optionally, its own species, context, clusters and author labels.

Columns: ``path`` and ``tissue`` (required), ``dataset`` (the output name; default the file's stem) and the
per-dataset analysis settings of :data:`~cassia_helpers.settings.PER_DATASET`. An empty cell means the
run-wide value. Every row is checked before anything runs, as the flags are (:meth:`Setting.check`): an
unknown column, a missing file, a name that is not a folder inside the run folder, two rows with the same
output folder are one-line usage errors naming the manifest and its line.

A manifest may also be given as ``--data-dir``: the CSV file itself, or a data folder holding one named
``datasets.csv`` (used when neither ``--tissues`` nor ``--input`` is given; with ``--tissues`` the folder's
tissue folders run as always).
"""

from __future__ import annotations

import csv
from pathlib import Path

from cassia_helpers.batch.discovery import SUFFIX, Dataset, Discovery, _classify, check_name
from cassia_helpers.contract import DATASETS_CSV
from cassia_helpers.files import absolute
from cassia_helpers.settings import BY_NAME, PER_DATASET, Settings, UsageError

REQUIRED = ("path", "tissue")
COLUMNS = (*REQUIRED, "dataset", *PER_DATASET)
UNNAMED = "\0unnamed"  # stands for a header cell left empty (a spreadsheet's trailing commas)


def _options(row: dict, where: str) -> tuple[tuple[str, object], ...]:
    options = []
    for name in PER_DATASET:
        value = (row.get(name) or "").strip()
        if value:
            try:
                options.append((name, BY_NAME[name].check(value)))
            except UsageError as exc:
                raise UsageError(f"{where}: column {name}: {exc}") from None
    return tuple(options)


def read_manifest_csv(path: Path) -> Discovery:
    """The datasets listed in the manifest ``path``; relative paths are relative to its folder.

    Raises
    ------
    UsageError
        The manifest cannot be read, has unknown or missing columns, or a row is invalid; the message names
        the file, the line and the problem.
    """
    path = Path(path)
    try:
        with open(path, newline="", encoding="utf-8-sig") as handle:
            reader = csv.DictReader(handle)
            # a spreadsheet saves columns it once showed as unnamed, empty ones (path,tissue,,): placeholders
            header = [str(c).strip() or f"{UNNAMED}{i}" for i, c in enumerate(reader.fieldnames or [])]
            reader.fieldnames = header
            rows = [(reader.line_num, row) for row in reader]
    except FileNotFoundError:
        raise UsageError(f"{path}: manifest not found") from None
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise UsageError(f"{path}: manifest cannot be read as a UTF-8 CSV file ({type(exc).__name__})") from None
    unknown = [c for c in header if c not in COLUMNS and not c.startswith(UNNAMED)]
    if unknown:
        raise UsageError(f"{path}: unknown column(s) {', '.join(map(repr, unknown))}; the columns are "
                         f"{', '.join(COLUMNS)}")
    missing = [c for c in REQUIRED if c not in header]
    if missing:
        raise UsageError(f"{path}: missing column(s) {', '.join(missing)}")
    found = Discovery()
    seen: dict[tuple[str, str], int] = {}
    for line, row in rows:
        where = f"{path}, line {line}"
        spare = [v for k, v in row.items() if k is None or k.startswith(UNNAMED)]
        if any((v if isinstance(v, str) else "".join(v or [])).strip() for v in spare):
            raise UsageError(f"{where}: more values than named columns")
        row = {k: v for k, v in row.items() if k is not None and not k.startswith(UNNAMED)}
        if not any((v or "").strip() for v in row.values()):
            continue
        tissue = check_name((row.get("tissue") or "").strip(), what="tissue", source=where)
        given = (row.get("path") or "").strip()
        if not given:
            raise UsageError(f"{where}: empty path")
        file = Path(given).expanduser()
        file = absolute(file if file.is_absolute() else path.parent / file)
        if not file.exists():
            raise UsageError(f"{where}: input file {given} not found")
        kind, reason = _classify(file)
        if kind != "dataset":
            raise UsageError(f"{where}: {given}: {reason or 'not an .h5ad file'}")
        name = (row.get("dataset") or "").strip() or file.name[: -len(SUFFIX)]
        check_name(name, what="dataset name", source=where)
        key = (tissue.lower(), name.lower())  # one folder on a case-insensitive disk (macOS)
        if key in seen:
            raise UsageError(f"{where}: dataset {tissue}/{name} is already on line {seen[key]} (two rows would "
                             "share an output folder; set the dataset column)")
        seen[key] = line
        found.datasets.append(Dataset(name=name, tissue=tissue, path=file, options=_options(row, where)))
    if not found.datasets:
        raise UsageError(f"{path}: the manifest lists no dataset")
    return found


def dataset_settings(settings: Settings, dataset: Dataset) -> Settings:
    """The settings ``dataset`` runs with: the run's, with its manifest row's own values (a row's context
    replaces the run's ``--context-file`` too)."""
    options = dict(dataset.options)
    if "context" in options:
        options["context_file"] = ""
    return settings.replace(**options) if options else settings


def manifest_in(data_dir: Path) -> Path | None:
    """The manifest a ``--data-dir`` stands for: the path itself when it is a ``.csv`` file, else the folder's
    ``datasets.csv`` when it has one; ``None`` for a folder of tissue folders."""
    data_dir = Path(data_dir)
    if data_dir.suffix.lower() == ".csv" and data_dir.is_file():
        return data_dir
    if data_dir.is_dir() and (data_dir / DATASETS_CSV).is_file():
        return data_dir / DATASETS_CSV
    return None


def check_batch_keys(settings: Settings, datasets: list[Dataset]) -> None:
    """A usage error when a dataset is to run with a ``batch_key`` and Harmony (``harmonypy``) is not installed,
    naming the flag or the manifest row's dataset."""
    wanted = [(f"--batch-key {settings.batch_key!r}", settings.batch_key)] if settings.batch_key else []
    wanted += [(f"{settings.manifest}: dataset {d.tissue}/{d.name}", dict(d.options)["batch_key"])
               for d in datasets if dict(d.options).get("batch_key")]
    if not wanted:
        return
    from cassia_helpers.dataset.batches import harmony_installed, harmony_missing_message

    if not harmony_installed():
        where, key = wanted[0]
        raise UsageError(f"{where}: {harmony_missing_message(key)}")
