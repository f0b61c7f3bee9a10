# Two commands: `make run` (the example batch, offline) and `make test` (the test suite).
# Both create .venv on first use and install the project into it.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
EXAMPLE_DATA ?= example_data
OUTPUT_DIR ?= batch_results
PYTEST_ARGS ?=

.PHONY: install run test lint bench lab clean

install: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev,interop,slurm,harmony]'
	# compile umap-learn's and pynndescent's numba code once, into their cache (about 30 s)
	$(BIN)/python -m cassia_helpers.dataset.warm_up
	@touch $(STAMP)

run: $(STAMP)
	$(BIN)/python -m cassia_helpers.example_data $(EXAMPLE_DATA)
	$(BIN)/python run_batch.py --data-dir $(EXAMPLE_DATA) --tissues all --output-dir $(OUTPUT_DIR) \
		--annotator reference --min-genes 100

# two test processes, one file each at a time, files with slow tests first (tests/conftest.py); the real
# batch runs that several files read are built once for both processes (tests/shared_batch.py)
test: $(STAMP)
	$(BIN)/python -m pytest -n 2 --dist loadfile $(PYTEST_ARGS)

# JupyterLab with this project's environment as a named kernel ("cassia-batch"), rooted at the project folder
# so the run folders (executed notebooks, h5ad files, report.html) open beside notebooks/; it opens the
# explore notebook. Jupyter refuses to run as root unless told: as root (containers, cloud VMs) it gets
# --allow-root. LAB_ARGS passes more options, e.g. `make lab LAB_ARGS="--no-browser --port 8890"`.
LAB_ARGS ?=
LAB_ROOT_FLAG := $(if $(filter 0,$(shell id -u)),--allow-root,)
lab: $(STAMP)
	$(BIN)/python -m pip install --quiet -e '.[dev,interop,slurm,harmony,lab]'
	$(BIN)/python -m ipykernel install --user --name cassia-batch --display-name "cassia-batch"
	$(BIN)/jupyter lab $(LAB_ROOT_FLAG) --ServerApp.root_dir=. $(LAB_ARGS) notebooks/explore_run.ipynb

lint: $(STAMP)
	$(BIN)/ruff check .

bench: $(STAMP)
	$(BIN)/python bench/reference_accuracy.py

clean:
	rm -rf $(VENV) $(EXAMPLE_DATA) .pytest_cache
