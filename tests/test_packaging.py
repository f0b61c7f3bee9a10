"""The project installs from one source of truth, and its conda file does not drift from it."""

from __future__ import annotations

import re
import tomllib

from tests.conftest import REPO

# conda-forge names that differ from PyPI's
CONDA_NAMES = {"igraph": "python-igraph"}


def requirement(spec: str) -> tuple[str, str]:
    match = re.match(r"\s*([A-Za-z0-9_.\-]+)\s*(.*)", spec)
    return match.group(1).lower(), match.group(2).replace(" ", "")


def test_environment_yml_lists_the_same_dependencies_as_pyproject():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    wanted = dict(requirement(s) for s in project["dependencies"] + project["optional-dependencies"]["dev"])
    wanted = {CONDA_NAMES.get(name, name): pins for name, pins in wanted.items()}
    listed = {}
    text = (REPO / "environment.yml").read_text()
    dependencies = text.split("dependencies:", 1)[1]
    for line in dependencies.splitlines():
        item = re.match(r"^  - (?!pip:?$)(?!python[<>=])([^\s#]+)$", line)
        if item:
            name, pins = requirement(item.group(1))
            listed[name] = pins
    assert listed == wanted


def test_templates_ship_with_a_parameters_cell_and_plain_kernel():
    import nbformat

    for name in ("annotate_dataset.ipynb", "aggregate_run.ipynb"):
        notebook = nbformat.read(REPO / "templates" / name, as_version=4)
        tagged = [c for c in notebook.cells if "parameters" in c.metadata.get("tags", [])]
        assert len(tagged) == 1
        assert notebook.metadata["kernelspec"]["name"] == "python3"
        assert all(not c.get("outputs") for c in notebook.cells if c.cell_type == "code")


def test_template_parameters_match_the_batch_parameters():
    import nbformat

    from cassia_helpers.config import DatasetParams

    notebook = nbformat.read(REPO / "templates" / "annotate_dataset.ipynb", as_version=4)
    source = next(c.source for c in notebook.cells if "parameters" in c.metadata.get("tags", []))
    names = set(re.findall(r"^(\w+) = ", source, flags=re.MULTILINE))
    assert names == set(DatasetParams.__dataclass_fields__)


def test_spec_copy_matches_the_shared_contract():
    """docs/ carries the output contract the tests run; it must not drift from the shared original."""
    import pytest

    shared = REPO.parent / "shared" / "spec" / "batch_output_structure.md"
    if not shared.is_file():
        pytest.skip("no shared/ folder beside this checkout")
    assert (REPO / "docs" / "batch_output_structure.md").read_text() == shared.read_text()
