"""The project installs from one source of truth, and its conda file does not drift from it."""

from __future__ import annotations

import os
import re
import tomllib

from tests.conftest import REPO

# conda-forge names that differ from PyPI's, and the conda packages a PyPI extra stands for
CONDA_NAMES = {"igraph": "python-igraph"}
CONDA_EXTRAS = {"dask": ["distributed"]}


def requirement(spec: str) -> tuple[str, str]:
    match = re.match(r"\s*([A-Za-z0-9_.\-]+)(\[[^\]]*\])?\s*(.*)", spec)
    return match.group(1).lower(), match.group(3).replace(" ", "")


def test_environment_yml_lists_the_same_dependencies_as_pyproject():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    wanted = dict(requirement(s) for s in project["dependencies"] + project["optional-dependencies"]["dev"])
    wanted = {CONDA_NAMES.get(name, name): pins for name, pins in wanted.items()}
    wanted.update({extra: wanted[name] for name, extras in CONDA_EXTRAS.items() if name in wanted for extra in extras})
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


def test_template_parameters_are_the_declared_settings_with_their_defaults():
    import ast

    import nbformat

    from cassia_helpers.settings import ANALYSIS_NAMES, DATASET_PARAMETERS, declared

    notebook = nbformat.read(REPO / "templates" / "annotate_dataset.ipynb", as_version=4)
    source = next(c.source for c in notebook.cells if "parameters" in c.metadata.get("tags", []))
    assigned = {node.targets[0].id: ast.literal_eval(node.value) for node in ast.parse(source).body}
    assert set(assigned) == set(ANALYSIS_NAMES) | set(DATASET_PARAMETERS)
    assert {name: assigned[name] for name in ANALYSIS_NAMES} == declared()


def test_spec_copy_matches_the_shared_contract():
    """docs/ carries the output contract the tests run; it must not drift from the shared original."""
    import pytest

    shared = REPO.parent / "shared" / "spec" / "batch_output_structure.md"
    if not shared.is_file():
        if os.environ.get("CI"):
            pytest.fail(f"{shared} is missing: CI must have the shared contract beside the checkout")
        pytest.skip("no shared/ folder beside this checkout (CI always has it)")
    assert (REPO / "docs" / "batch_output_structure.md").read_text() == shared.read_text()
