"""``--resume``: what a run folder says is checked before it is trusted.

- The manifest's ``analysis`` settings must be exactly this version's (:func:`manifest_analysis`): a key
  this version does not know, or one it needs and the manifest lacks, is a usage error naming them, unless
  :data:`MIGRATIONS` says how an older manifest maps onto this version.
- Tissue and dataset names, from the manifest as from any file, must name a folder inside the run folder
  (:func:`check_name`).
- A dataset recorded ``success`` runs again unless every file of the output contract is present, readable
  and consistent with its ``{dataset}_result.json`` (:func:`verify_complete`). The files of the earlier
  attempt are then set aside, never deleted, in ``{dataset}/superseded/{YYYYMMDD_HHMMSS}/`` with a
  ``REASON.txt`` (:func:`set_aside`), and the reason is recorded in the manifest's session (the run summary
  lists it).
- Temporary files that an interrupted or failed write left behind (``.{file}.*.tmp``) are removed
  (:func:`remove_temporary`).
"""

from __future__ import annotations

import csv
import fcntl
import logging
import shlex
import shutil
from datetime import UTC, datetime
from pathlib import Path

from cassia_helpers.batch.discovery import Dataset, check_name
from cassia_helpers.batch.execute import REQUIRED_OUTPUTS
from cassia_helpers.batch.runner import RUNNER_LOCK
from cassia_helpers.contract import RUN_MANIFEST, SUCCESS, DatasetPaths, input_changed, read_result, read_status
from cassia_helpers.files import remove_temporary, write_json
from cassia_helpers.settings import BY_NAME, CLUSTER_GROUP, PER_DATASET, RUN, SETTINGS, Settings, UsageError

log = logging.getLogger("cassia_helpers")
SUPERSEDED = "superseded"
REASON_TXT = "REASON.txt"
# Older manifests: analysis key -> how this version reads it. ``None`` maps a key added since to its
# default, which reproduces what the versions without it did; a string renames a key.
MIGRATIONS: dict[str, str | None] = {"context_file": None, "cluster_key": None, "label_key": None}


def manifest_analysis(manifest: dict, manifest_path: Path) -> dict:
    """The manifest's analysis settings as this version names them; :class:`UsageError` naming the keys that
    are unknown here or missing there (a manifest from another version: never silent defaults)."""
    analysis = manifest.get("analysis")
    if not isinstance(analysis, dict):
        raise UsageError(f"{manifest_path}: damaged manifest (no analysis settings)")
    analysis = dict(analysis)
    for old, new in MIGRATIONS.items():
        if isinstance(new, str) and old in analysis and new not in analysis:
            analysis[new] = analysis.pop(old)
    wanted = {s.name for s in SETTINGS if s.scope == "analysis"}
    unknown = sorted(set(analysis) - wanted)
    missing = sorted(name for name in wanted - set(analysis) if MIGRATIONS.get(name, "") is not None)
    if unknown or missing:
        parts = ([f"unknown analysis setting(s) {', '.join(unknown)}"] if unknown else []) + \
                ([f"missing analysis setting(s) {', '.join(missing)}"] if missing else [])
        raise UsageError(f"{manifest_path}: written by another version of cassia-batch: {'; '.join(parts)}; "
                         "resume it with the version that made it, or start a new run")
    for name in wanted - set(analysis):
        analysis[name] = BY_NAME[name].default
    if analysis.get("context_file") and not Path(analysis["context_file"]).is_file():
        raise UsageError(f"{manifest_path}: the run's --context-file {analysis['context_file']} is gone; "
                         "put it back to resume")
    return analysis


def manifest_datasets(manifest: dict, manifest_path: Path) -> list[Dataset]:
    """The manifest's datasets; :class:`UsageError` for a damaged entry or a name that leaves the run folder."""
    datasets = []
    try:
        for entry in manifest["datasets"]:
            tissue = check_name(entry["tissue"], what="tissue", source=manifest_path)
            name = check_name(entry["name"], what="dataset name", source=manifest_path)
            options = tuple((key, BY_NAME[key].check(value)) for key, value in entry.get("options", {}).items()
                            if key in PER_DATASET)
            datasets.append(Dataset(name, tissue, Path(entry["path"]), options))
    except (KeyError, TypeError, AttributeError) as exc:
        raise UsageError(f"{manifest_path}: damaged manifest ({type(exc).__name__}: {exc})") from None
    return datasets


def _readable_csv(path: Path) -> str:
    with open(path, newline="", encoding="utf-8") as handle:
        header = next(csv.reader(handle), None)
    return "" if header else "empty"


def _h5ad_shape(path: Path) -> tuple[int, int]:
    import h5py

    with h5py.File(path, "r") as handle:
        return len(handle["obs"][handle["obs"].attrs["_index"]]), len(handle["var"][handle["var"].attrs["_index"]])


def verify_complete(paths: DatasetPaths) -> str:
    """Why a dataset recorded ``success`` is not complete (one line), or ``""`` when every contract file is
    present, readable and consistent with its ``{dataset}_result.json``."""
    missing = [getattr(paths, name).name for name in REQUIRED_OUTPUTS if not getattr(paths, name).is_file()]
    if missing:
        return f"missing {', '.join(missing)}"
    result = read_result(paths)
    if result is None:
        return f"{paths.result_json.name} is unreadable"
    if (result.get("dataset"), result.get("tissue")) != (paths.dataset, paths.tissue):
        return f"{paths.result_json.name} describes another dataset"
    try:
        n_obs, n_vars = _h5ad_shape(paths.annotated_h5ad)
    except Exception as exc:  # noqa: BLE001 - h5py raises many types for damaged files
        return f"{paths.annotated_h5ad.name} is unreadable ({type(exc).__name__})"
    if (n_obs, n_vars) != (result.get("n_cells"), result.get("n_genes")):
        return (f"{paths.annotated_h5ad.name} holds {n_obs} cells x {n_vars} genes, {paths.result_json.name} "
                f"says {result.get('n_cells')} x {result.get('n_genes')}")
    for name in ("markers_csv", "clusters_csv"):
        try:
            problem = _readable_csv(getattr(paths, name))
        except (OSError, UnicodeDecodeError, csv.Error) as exc:
            problem = f"unreadable ({type(exc).__name__})"
        if problem:
            return f"{getattr(paths, name).name} is {problem}"
    for name in ("annotation_txt", "summary_txt"):
        try:
            if not getattr(paths, name).read_text(encoding="utf-8").strip():
                return f"{getattr(paths, name).name} is empty"
        except (OSError, UnicodeDecodeError) as exc:
            return f"{getattr(paths, name).name} is unreadable ({type(exc).__name__})"
    return ""


def set_aside(paths: DatasetPaths, reason: str, *, by: str = "--resume") -> Path:
    """Move the dataset's files into ``superseded/{YYYYMMDD_HHMMSS}/`` of its folder, with ``REASON.txt``
    (set aside ``by`` what, for what reason); return that folder. Nothing is deleted.

    The LLM ledger stays where it is: the requests it records were sent (and paid for) in this run, so the
    budget and ``token_tracking.json`` go on counting them, and the next attempt appends to it."""
    stamp = datetime.now()
    while True:
        target = paths.folder / SUPERSEDED / f"{stamp:%Y%m%d_%H%M%S}"
        try:
            target.mkdir(parents=True)
            break
        except FileExistsError:
            stamp = datetime.fromtimestamp(stamp.timestamp() + 1)
    for entry in sorted(paths.folder.iterdir()):
        if entry.name not in (SUPERSEDED, RUNNER_LOCK, paths.llm_calls_jsonl.name):
            shutil.move(str(entry), str(target / entry.name))
    (target / REASON_TXT).write_text(f"Set aside by {by}: {reason}\n", encoding="utf-8")
    return target


def _busy(folder: Path) -> bool:
    """Whether a runner of the dataset still holds its lock (its temporary files are in use)."""
    lock = folder / RUNNER_LOCK
    if not lock.exists():
        return False
    with open(lock, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            return True
        fcntl.flock(handle, fcntl.LOCK_UN)
    return False


HELD_BACK = "the --max-cost budget held back"


def unanswered(paths: DatasetPaths) -> str:
    """Why a finished dataset runs again for clusters the model server never answered (down, out of budget,
    refusing), or ``""``: run again, its answered clusters come from the cache, not the server."""
    from cassia_helpers.dataset.annotate import NO_ANSWER, SERVICE_FAILURES

    try:
        with open(paths.clusters_csv, newline="", encoding="utf-8") as handle:
            kinds = [row.get("reason_kind", "") for row in csv.DictReader(handle)]
    except (OSError, UnicodeDecodeError, csv.Error):
        return ""
    lost = [kind for kind in kinds if kind in SERVICE_FAILURES and kind != NO_ANSWER]  # (that server did answer)
    if lost:
        return (f"{len(lost)} of {len(kinds)} clusters got no answer from the model server "
                f"({', '.join(sorted(set(lost)))})")
    from cassia_helpers.ledger import SKIPPED_BUDGET, read_ledger

    # the ledger keeps every attempt's records: only the latest attempt's say what is still missing
    since = _instant((read_status(paths) or {}).get("started_at"))
    held = sum(record.get("status") == SKIPPED_BUDGET and _instant(record.get("timestamp")) >= since
               for record in read_ledger(paths.llm_calls_jsonl))
    return f"{HELD_BACK} {held} request(s) (raise it: --resume takes a new --max-cost)" if held else ""


def _instant(text: object) -> datetime:
    """An ISO time of the status or the ledger (the earliest time when missing or unreadable)."""
    try:
        moment = datetime.fromisoformat(str(text))
    except ValueError:
        return datetime.min.replace(tzinfo=UTC)
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def resume_command(run_dir: Path, settings: Settings) -> str:
    """The command that finishes the run, as it can be pasted into a shell. Where its datasets run
    (``--cluster``, ``--scheduler``, the SLURM options, ``--workers``) is not kept in the run folder: the flags
    this session was given are repeated, so the resume runs where the run did, not on this machine alone."""
    words = ["python", "run_batch.py", "--resume", str(run_dir)]
    for setting in SETTINGS:
        if setting.scope != RUN or not (setting.group == CLUSTER_GROUP or setting.name == "workers"):
            continue
        value = getattr(settings, setting.name)
        if value == setting.default or value in ("", None, []):
            continue
        if isinstance(value, bool):
            words.append(setting.option)
        else:
            for one in value if isinstance(value, list | tuple) else [value]:
                words += [setting.option, str(one)]
    return shlex.join(words)


def say_unanswered(run_dir: Path, finished: list[tuple[str, str]], resume: str, *, cached: bool = True) -> None:
    """Name, at the end of a run, the finished datasets with clusters the model server never answered."""
    again = "the answers already given come from the cache" if cached else "--no-cache: every request is sent again"
    for tissue, name in finished:
        gap = unanswered(DatasetPaths(run_dir, tissue, name))
        if gap:
            log.warning("%s/%s: %s; %s asks for them again (%s)", tissue, name, gap, resume, again)


def _unrecorded(paths: DatasetPaths) -> str:
    """Why the outputs in a dataset's folder that has no status record are set aside (``""``: none there)."""
    found = [getattr(paths, name).name for name in REQUIRED_OUTPUTS if getattr(paths, name).is_file()]
    return f"no status recorded, yet {', '.join(found)} present" if found else ""


def recheck(run_dir: Path, datasets: list[Dataset], manifest: dict, *, max_cost: float = 0.0
            ) -> dict[tuple[str, str], str]:
    """Before a resumed run: remove left-over temporary files, and set aside the files of every dataset
    recorded ``success`` that :func:`verify_complete` finds incomplete (it runs again). The reasons go to the
    manifest's last session (``rerun``: tissue, dataset, reason; the run summary lists them) and are returned
    by ``(tissue, name)``. A dataset whose only gap is what the budget held back does not run again while
    ``max_cost`` (this session's budget) is spent: the same requests would be held back again."""
    from cassia_helpers.dataset.annotate.llm.throttle import RunBudget

    removed = remove_temporary(run_dir)
    reasons = {}
    budget = RunBudget(max_cost, run_dir)
    for dataset in datasets:
        paths = DatasetPaths(run_dir, dataset.tissue, dataset.name)
        if paths.folder.is_dir() and not _busy(paths.folder):
            removed += remove_temporary(paths.folder)
        status = read_status(paths)
        if not status:  # a driver killed meanwhile, a status deleted: its files are not taken for its new ones
            reason = _unrecorded(paths)
        elif status["status"] != SUCCESS:
            continue
        else:
            reason = verify_complete(paths) or input_changed(status, dataset.path) or unanswered(paths)
            held = reason.startswith(HELD_BACK) and budget.enabled
            spent = budget.spent() if held else 0.0  # every ledger of the run is read: only when it matters
            if held and spent >= max_cost:
                log.warning("%s/%s: %s, and the budget is spent ($%.4g of $%.4g): not run again until a --resume "
                            "raises --max-cost", dataset.tissue, dataset.name, reason, spent, max_cost)
                continue
            reason = reason and f"recorded success but {reason}"
        if reason:
            target = set_aside(paths, reason)
            log.warning("%s/%s runs again: %s (its files are set aside in %s)", dataset.tissue, dataset.name,
                        reason, target)
            reasons[(dataset.tissue, dataset.name)] = reason
    if removed:
        log.info("Removed %d temporary file(s) left by an interrupted write", len(removed))
    if manifest.get("sessions"):
        manifest["sessions"][-1]["rerun"] = [{"tissue": t, "dataset": d, "reason": r} for (t, d), r in reasons.items()]
        write_json(run_dir / RUN_MANIFEST, manifest)
    return reasons
