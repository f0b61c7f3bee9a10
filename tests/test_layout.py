"""The package's layout is its architecture: ``batch/`` runs in the driver, ``dataset/`` in a dataset's kernel,
``summary/`` in the aggregation. These tests keep the split honest, so a change that makes the driver load a
kernel's stack, or a kernel depend on the driver, fails here rather than in a user's run."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO

PACKAGE = REPO / "cassia_helpers"
MAX_MODULE_LINES = 400


def imported_modules(path: Path) -> set[str]:
    """Every module a file imports, at its top or inside a function, as absolute dotted names."""
    tree = ast.parse(path.read_text("utf-8"))
    package = ".".join(path.relative_to(REPO).with_suffix("").parts[:-1])
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parent, base] if base else parent)
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return found


def modules_under(folder: str) -> list[Path]:
    return sorted((PACKAGE / folder).rglob("*.py"))


@pytest.mark.parametrize("folder, forbidden", [
    ("dataset", ("cassia_helpers.batch", "cassia_helpers.summary")),
    ("summary", ("cassia_helpers.batch",)),
])
def test_a_process_never_imports_the_code_of_the_processes_that_start_it(folder, forbidden):
    offenders = {
        str(path.relative_to(REPO)): sorted(name for name in imported_modules(path) if name.startswith(forbidden))
        for path in modules_under(folder)
    }
    assert not {path: names for path, names in offenders.items() if names}


@pytest.mark.parametrize("module", [
    "cassia_helpers", "cassia_helpers.batch.cli", "cassia_helpers.batch.driver", "cassia_helpers.batch.runner",
    "cassia_helpers.batch.dry_run", "cassia_helpers.summary.aggregate", "cassia_helpers.summary.report",
])
def test_the_driver_and_the_aggregation_do_not_load_a_kernels_analysis_stack(module):
    # the driver starts in a fraction of a second and the aggregation needs only the run folder's files:
    # neither may pull in scanpy/anndata, the LLM client or Dask just by being imported
    heavy = ("scanpy", "anndata", "openai", "distributed", "matplotlib")
    code = (f"import sys, importlib; importlib.import_module({module!r}); "
            f"print(sorted(m for m in {heavy!r} if m in sys.modules))")
    loaded = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert loaded.stdout.strip() == "[]", loaded.stdout


def test_every_module_stays_small_enough_to_read():
    long = {str(path.relative_to(REPO)): n for path in PACKAGE.rglob("*.py")
            if (n := len(path.read_text("utf-8").splitlines())) > MAX_MODULE_LINES}
    assert not long


def test_every_setting_the_code_reads_is_declared():
    # Settings answers any attribute at run time, so a misspelt setting would only fail inside a dataset's
    # kernel, after the run started: every `settings.<name>` in the package must name a declared setting
    from cassia_helpers.settings import BY_NAME, Settings

    known = set(BY_NAME) | {name for name in vars(Settings) if not name.startswith("_")}
    read = {}
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text("utf-8"))):
            # a plain `settings` name is a batch's Settings throughout the package (not scanpy's sc.settings,
            # nor the agents' own PipelineSettings, which are dataclasses and checked by Python itself)
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "settings":
                read.setdefault(node.attr, str(path.relative_to(REPO)))
    assert len(read) > 20  # the scan sees the code that reads settings
    assert {name: where for name, where in read.items() if name not in known} == {}


def test_the_llm_options_are_the_batch_settings_carried_as_one_object():
    # one declaration: each LLM option is a setting (its name, or llm_ + its name) with that setting's default,
    # and a batch's settings reach the client unchanged
    from cassia_helpers.dataset.annotate.llm.options import LLMOptions
    from cassia_helpers.settings import Settings

    assert LLMOptions.from_settings(Settings()) == LLMOptions()
    changed = LLMOptions.from_settings(Settings(llm_timeout=7.5, llm_concurrency=3, model="m", max_cost=2.0))
    assert (changed.timeout, changed.concurrency, changed.model, changed.max_cost) == (7.5, 3, "m", 2.0)
