"""What the terminal shows while a batch runs: a line per dataset step as it happens, each failure's reason
when it happens, and a closing table. Messages go through :mod:`logging` (logger ``cassia_helpers``)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from cassia_helpers.contract import BATCH_SUMMARY_TXT, REPORT_HTML, SUCCESS, DatasetPaths, read_result

log = logging.getLogger("cassia_helpers")
STEP_NAMES = {"load": "loading", "qc": "QC", "normalize": "normalising", "pca": "HVG + PCA", "harmony": "Harmony",
              "neighbors": "neighbours", "leiden": "leiden", "umap": "UMAP", "markers": "marker genes",
              "annotation": "annotating"}


class Progress:
    """Follows the datasets of one session of a run (``todo``), tailing each one's progress file: a dataset
    is shown as started when its kernel reports its first step, wherever it runs."""

    def __init__(self, run_dir: Path, todo: list, *, quiet: bool = False) -> None:
        self.run_dir, self.quiet = run_dir, quiet
        self.total = len(todo)
        self.index = {(d.tissue, d.name): i + 1 for i, d in enumerate(todo)}
        # dataset -> (its paths, lines of its progress file already shown, or -1 before it started)
        self.pending = {(d.tissue, d.name): (DatasetPaths(run_dir, d.tissue, d.name), -1) for d in todo}

    def _label(self, tissue: str, name: str) -> str:
        return f"[{self.index.get((tissue, name), '?')}/{self.total}] {tissue}/{name}"

    def _say(self, message: str) -> None:
        if not self.quiet:
            log.info(message)

    def poll(self) -> None:
        """Print what running datasets did since the last poll."""
        for key, (paths, seen) in list(self.pending.items()):
            try:
                lines = paths.progress_jsonl.read_text(encoding="utf-8").splitlines()
            except OSError:
                continue
            if seen < 0:
                self._say(f"{self._label(*key)}  started")
                seen = 0
            for line in lines[seen:]:
                try:
                    event = json.loads(line)
                except ValueError:
                    continue
                if event.get("event") == "end":
                    step = STEP_NAMES.get(event.get("step"), event.get("step"))
                    self._say(f"{self._label(*key)}  {step} ({event.get('seconds', 0):.0f} s)")
            self.pending[key] = (paths, len(lines))

    def done(self, dataset, record: dict) -> None:
        self.poll()
        key = (dataset.tissue, dataset.name)
        self.pending.pop(key, None)
        seconds = float(record.get("duration_s") or 0)
        running = sum(seen >= 0 for _, seen in self.pending.values())
        tally = (f"({self.total - len(self.pending)}/{self.total} done, {running} running, "
                 f"{len(self.pending) - running} queued)")
        if record["status"] == SUCCESS:
            self._say(f"{self._label(*key)}  done in {seconds:.0f} s  {tally}")
            # a step that failed for most clusters (e.g. no scores) is said even when the dataset succeeded
            result = read_result(DatasetPaths(self.run_dir, *key)) or {}
            for warning in result.get("step_warnings", []) or []:
                log.warning("%s  warning: %s", self._label(*key), " ".join(str(warning).split()))
        else:
            log.warning("%s  %s: %s  %s", self._label(*key), record["status"], record.get("error", ""), tally)

    def close(self) -> None:
        self.pending.clear()

    def table(self, result) -> None:
        """The closing table: one line per dataset of the run, then the summary's path."""
        if not result.statuses:
            return
        width = max(len(f"{t}/{n}") for t, n in result.statuses)
        lines = [f"{'dataset':<{width}}  status"]
        for (tissue, name), status in sorted(result.statuses.items()):
            error = result.errors.get((tissue, name), "")
            lines.append(f"{tissue + '/' + name:<{width}}  {status}" + (f": {error}" if error and status != SUCCESS
                                                                          else ""))
        counts = {s: list(result.statuses.values()).count(s) for s in dict.fromkeys(result.statuses.values())}
        summary = self.run_dir / BATCH_SUMMARY_TXT
        if result.summaries:  # what the folder holds may be an earlier session's
            ending = f". The run summaries could not all be written ({result.summaries}); --resume writes them."
        else:
            ending = f". Summary: {summary}" if summary.is_file() else ". No summary could be written."
        lines.append(", ".join(f"{n} {s}" for s, n in counts.items()) + ending)
        report = self.run_dir / REPORT_HTML
        if report.is_file() and not result.summaries:
            lines.append(f"Report: {report}")
        log.log(logging.WARNING if self.quiet else logging.INFO, "\n".join(lines))
