"""Atomic file writes that follow the user's umask, and the one reader of the project's JSON records.

Every output is written to a temporary name beside its target and renamed onto it, so a reader never
sees half a file. The temporary file is created private by :func:`tempfile.mkstemp`; before the rename
it gets the mode a plain ``open()`` would have given (``0o666`` less the umask), so results are shared as
the user's other files are.
"""

from __future__ import annotations

import json
import os
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

_umask_lock = threading.Lock()
# A cell starting with one of these is always read as a formula (or hides one) by spreadsheet programs.
FORMULA_PREFIXES = ("=", "@", "\t", "\r")
# A cell starting with a sign is a formula only with formula syntax after it (a function call, a DDE or
# sheet reference, a comparison): "-rf", "+5" or "-2.5" stay as written and read back unchanged.
SIGN_PREFIXES = ("+", "-")
FORMULA_SYNTAX = frozenset('()|!=@"')


def absolute(path: str | Path) -> Path:
    """``path`` made absolute without ``..`` or ``.`` parts, its symbolic links kept as the user gave them
    (unlike :meth:`Path.resolve`): the same text whatever folder the command ran from."""
    return Path(os.path.normpath(Path(path).absolute()))


def current_umask() -> int:
    """The process umask (read from ``/proc`` where possible, so no other thread sees it change)."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    with _umask_lock:
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


def file_mode() -> int:
    """The mode of a new regular file under the current umask."""
    return 0o666 & ~current_umask()


@contextmanager
def atomic_path(target: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``target``; on success it gets the umask's mode and replaces ``target``."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.chmod(tmp_path, file_mode())
        os.replace(tmp_path, target)
    finally:
        tmp_path.unlink(missing_ok=True)


def remove_temporary(folder: str | Path) -> list[Path]:
    """Remove the temporary files :func:`atomic_path` left in ``folder`` (``.{name}.*.tmp``: a write cut short
    by a killed process), and papermill's (``.{name}.*.tmp.ipynb``: an execution stopped at once); return
    them. Only a folder no writer is using may be cleaned."""
    removed = []
    for path in [*Path(folder).glob(".*.tmp"), *Path(folder).glob(".*.tmp.ipynb")]:
        try:
            if path.is_file():
                path.unlink()
                removed.append(path)
        except OSError:
            continue
    return removed


def write_text(target: str | Path, text: str) -> None:
    """Write text atomically (UTF-8)."""
    with atomic_path(target) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(target: str | Path, payload: Any) -> None:
    """Write JSON atomically (UTF-8, indented)."""
    write_text(target, json.dumps(payload, indent=2, ensure_ascii=False, default=_json_default) + "\n")


def write_csv(target: str | Path, table: Any) -> None:
    """Write a pandas table as CSV atomically, every text cell made safe for spreadsheets (:func:`csv_safe`)."""
    safe = table.copy()
    for column in safe.columns:
        if safe[column].dtype == object or str(safe[column].dtype) in ("string", "category"):
            safe[column] = safe[column].map(csv_safe)
    with atomic_path(target) as tmp:
        safe.to_csv(tmp, index=False)


def csv_safe(value: object) -> object:
    """A CSV cell that a spreadsheet will not run as a formula: text starting with ``=`` or ``@``, a tab or a
    carriage return, or with ``+``/``-`` followed by formula syntax (``( ) | ! = @ "``, as in
    ``-cmd|' /C calc'!A0``) gets a leading apostrophe. Other text (``-rf``, ``+5``, ``CD8+``) is written as
    it is, so it reads back unchanged; numbers and other non-text values are returned as they are."""
    if not isinstance(value, str):
        return value
    if value.startswith(FORMULA_PREFIXES) or (value.startswith(SIGN_PREFIXES) and FORMULA_SYNTAX & set(value)):
        return "'" + value
    return value


def read_json(path: str | Path) -> Any | None:
    """A JSON record, or ``None`` when it is missing or unreadable (e.g. cut short by a full disk)."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _json_default(value: Any) -> Any:
    if hasattr(value, "item") and callable(value.item):  # numpy scalars, without importing numpy here
        return value.item()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")
