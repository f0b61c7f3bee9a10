"""Command line: flags (generated from :data:`cassia_helpers.settings.SETTINGS`) → :class:`Settings` →
:func:`cassia_helpers.batch.driver.run_batch`.

Exit codes: 0 (every dataset succeeded), 1 (some failed, or a dry run found an input that cannot run),
2 (usage error), 130 (interrupted). Importing this module imports nothing heavy, so ``--help`` and usage
errors answer at once.
"""

from __future__ import annotations

import argparse
import difflib
import importlib.util
import logging
import sys
from pathlib import Path
from urllib.parse import urlsplit

from cassia_helpers.settings import (
    ANALYSIS,
    RESUME_MAY_CHANGE,
    SETTINGS,
    Settings,
    UsageError,
    context_text,
    default,
)

# What a run imports, in the driver or in a dataset's kernel: with one of them missing, nothing can run.
RUNTIME_MODULES = ("h5py", "anndata", "scanpy", "leidenalg", "matplotlib", "papermill", "nbclient", "ipykernel",
                   "jinja2", "openai", "tenacity", "distributed")


def check_environment() -> None:
    """Fail before anything is written when this Python lacks what a run needs (e.g. the system's ``python3``
    instead of the project's environment)."""
    missing = [name for name in RUNTIME_MODULES if importlib.util.find_spec(name) is None]
    if missing:
        raise UsageError(f"this Python ({sys.executable}) lacks {', '.join(missing)}: run with .venv/bin/python "
                         "after `make install` (or `make run`)")


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("cassia-batch")
    except PackageNotFoundError:
        return "unknown"


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows a flag's default only when it says something: not for switches, empty values or None."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        quiet = action.default is None or isinstance(action.default, bool) or action.default in ("", [])
        if quiet or action.default is argparse.SUPPRESS or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


USAGE = ("run_batch.py (--tissues NAME [NAME ...] | --input FILE --tissue NAME | --manifest CSV | --resume RUN_DIR) "
         "[options]")


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors: the mistake and, for a mistyped flag, the flag that was probably meant,
    instead of the 50-line usage before it."""

    def error(self, message: str) -> None:  # type: ignore[override]
        unknown = message.partition("unrecognized arguments: ")[2].split()
        known = [option for action in self._actions for option in action.option_strings]
        hints = [close[0] for word in unknown if word.startswith("--")
                 for close in [difflib.get_close_matches(word.partition("=")[0], known, n=1)] if close]
        hint = f" (did you mean {', '.join(hints)}?)" if hints else ""
        self.exit(2, f"{self.prog}: error: {message}{hint} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="run_batch.py",
        usage=USAGE,
        description="Annotate cell types in every single-cell dataset of DATA_DIR/TISSUE/*.h5ad: QC, "
        "clustering, marker genes and CASSIA-style annotation, one executed notebook per dataset.",
        epilog="API keys are read from the environment only (OPENAI_API_KEY); never pass them as flags. "
               "Exit status: 0 every dataset succeeded, 1 some failed (the others' outputs are written), "
               "2 a usage error (nothing ran), 130 interrupted (resume with --resume RUN_DIR).",
        formatter_class=_HelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"cassia-batch {_version()}")
    groups: dict[str, argparse._ArgumentGroup] = {}
    for setting in SETTINGS:
        group = groups.get(setting.group) or groups.setdefault(setting.group, parser.add_argument_group(setting.group))
        options: dict = {"dest": setting.name, "help": setting.help}
        if isinstance(setting.default, bool):
            options["action"] = "store_false" if setting.default else "store_true"
            options["default"] = setting.default
        elif setting.repeat:
            options.update(action="append", default=[], metavar=setting.metavar)
        else:
            options["default"] = default(setting)
            options["type"] = setting.type or type(setting.default)
            if setting.choices:
                options["choices"] = setting.choices
            if setting.nargs:
                options["nargs"] = setting.nargs
            if setting.metavar:
                options["metavar"] = setting.metavar
        group.add_argument(setting.option, **options)
    return parser


def _endpoint(url: str) -> str:
    """The base URL as given, refused when it carries credentials (they belong in ``OPENAI_API_KEY``)."""
    if not url:
        return ""
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises on a port that is not a number from 0 to 65535
    except ValueError as exc:
        raise UsageError(f"--base-url {url!r}: {exc}; expected http(s)://host[:port]/path") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise UsageError(f"--base-url {url!r}: expected http(s)://host[:port]/path")
    if parts.username or parts.password or parts.query or parts.fragment:
        raise UsageError("--base-url must not carry credentials or a query string: put the key in OPENAI_API_KEY")
    return url.rstrip("/")


def settings_from_args(args: argparse.Namespace) -> Settings:
    """Check the flags and turn them into the run's :class:`Settings` (``auto`` resolved)."""
    from cassia_helpers.dataset.annotate.factory import check_llm_setup, llm_configured

    values = {s.name: getattr(args, s.name) for s in SETTINGS}
    if args.resume is None and not args.tissues and args.input is None and args.manifest is None:
        from cassia_helpers.batch.manifest import manifest_in

        values["manifest"] = args.manifest = manifest_in(Path(args.data_dir))  # --data-dir may be a manifest
    if args.resume is None and not args.tissues and args.input is None and args.manifest is None:
        raise UsageError("choose tissues with --tissues NAME [NAME ...] or --tissues all, one file with --input "
                         "FILE --tissue NAME, a list of datasets with --manifest CSV, or --resume RUN_DIR")
    if args.manifest is not None and (args.tissues or args.input is not None):
        raise UsageError("--manifest lists the datasets: give it without --tissues or --input")
    if args.input is not None and not args.tissue:
        raise UsageError("--input needs --tissue NAME (the tissue of that dataset)")
    if args.input is not None and args.tissues:
        raise UsageError("--input runs one file: give its tissue with --tissue NAME, not --tissues")
    if args.tissue and args.input is None:
        raise UsageError("--tissue NAME goes with --input FILE; choose tissue folders with --tissues")
    if args.resume is not None:
        # a resumed run keeps its datasets and analysis settings: a flag that would change them is not ignored
        changed = [f"--{s.name.replace('_', '-')}" for s in SETTINGS
                   if s.scope == ANALYSIS and s.name not in RESUME_MAY_CHANGE
                   and values[s.name] != default(s)]  # an exported variable changes nothing
        changed += [flag for flag, given in (("--tissues", args.tissues), ("--input", args.input is not None),
                                             ("--manifest", args.manifest is not None)) if given]
        if changed:
            raise UsageError(f"--resume finishes the run with its own datasets and analysis settings: "
                             f"{', '.join(changed)} cannot change (start a new run for that)")
    values["base_url"] = _endpoint(args.base_url or "")
    if args.annotator == "auto":
        values["annotator"] = "llm" if llm_configured(values["base_url"]) else "reference"
    if args.context and args.context_file:
        raise UsageError("give the context with --context or --context-file, not both")
    for name in ("cache_dir", "price_file", "context_file"):
        values[name] = str(Path(values[name]).expanduser().resolve()) if values[name] else ""
    if values["price_file"] and not Path(values["price_file"]).is_file():
        raise UsageError(f"{values['price_file']}: price file not found")
    settings = Settings(**values)
    if settings.resume is None:  # every row checked before anything runs
        from cassia_helpers.batch.manifest import check_batch_keys, read_manifest_csv

        listed = read_manifest_csv(settings.manifest).datasets if settings.manifest is not None else []
        check_batch_keys(settings, listed)
    context_text(settings)  # an unreadable --context-file is a usage error now, not in every dataset
    check_llm_setup(settings)
    return settings


def _log_to_terminal(quiet: bool) -> None:
    """The package's messages (logger ``cassia_helpers``) as plain lines on stderr."""
    logger = logging.getLogger("cassia_helpers")
    if not any(getattr(h, "_cassia_cli", False) for h in logger.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(message)s"))
        handler._cassia_cli = True
        logger.addHandler(handler)
    logger.setLevel(logging.WARNING if quiet else logging.INFO)
    logger.propagate = False


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _log_to_terminal(args.quiet)
    try:
        settings = settings_from_args(args)
        check_environment()
        if settings.dry_run:
            from cassia_helpers.batch.dry_run import dry_run

            report, runnable = dry_run(settings)
            print(report)
            return 0 if runnable else 1
        from cassia_helpers.batch.driver import run_batch

        result = run_batch(settings)
    except UsageError as exc:
        print(f"{parser.prog}: error: {exc} (see --help)", file=sys.stderr)
        return 2
    except OSError as exc:  # e.g. a full disk before any dataset ran
        print(f"{parser.prog}: error: {exc.filename or ''}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    print(result.run_dir)
    return result.exit_code


if __name__ == "__main__":
    sys.exit(main())


