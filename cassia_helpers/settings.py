"""Every setting of a batch, declared once.

:data:`SETTINGS` is the one declaration (name, default, type, valid range, help). The command-line flags
(:mod:`cassia_helpers.batch.cli`), the run manifest, the template notebook's parameters and the validation all
come from it; a test checks the template's ``parameters`` cell against it, names and defaults.

Two scopes: ``analysis`` settings shape the results; they are recorded in the run manifest, kept by
``--resume`` and passed to every dataset's notebook. ``run`` settings say how to execute (which inputs,
how many workers, timeouts); they may change when a run is resumed and never reach a notebook.
API keys are never a setting: they are read from the environment by the process that sends requests.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ANALYSIS, RUN = "analysis", "run"
DEFAULT_MODEL = "gpt-4o-mini"


class UsageError(ValueError):
    """A problem with what the user asked for (exit status 2)."""


@dataclass(frozen=True)
class Setting:
    """One setting: its flag is ``--name-with-dashes`` unless ``flag`` says otherwise."""

    name: str
    default: Any
    help: str
    group: str
    scope: str = ANALYSIS
    type: Callable[[str], Any] | None = None
    choices: tuple = ()
    minimum: float | None = None
    maximum: float | None = None
    above: float | None = None  # exclusive minimum
    flag: str = ""
    nargs: str | None = None
    repeat: bool = False  # the flag may be given several times; the value is a list
    env: str = ""  # environment variable that gives the default
    metavar: str | None = None
    form: tuple[str, str] = ()  # (regular expression a text value must match, the form in words)

    @property
    def option(self) -> str:
        return self.flag or "--" + self.name.replace("_", "-")

    def check(self, value: Any) -> Any:
        """``value`` converted and checked against the declared range; :class:`UsageError` otherwise."""
        if value is None:
            return value
        if self.nargs or self.repeat:
            if not isinstance(value, list | tuple) or not all(isinstance(v, str) for v in value):
                raise UsageError(f"{self.option}: expected a list of names, got {value!r}")
            return [v for v in value if v.strip()]
        kind = self.type or (type(self.default) if self.default is not None else None)
        if kind is bool and not isinstance(value, bool):
            raise UsageError(f"{self.option}: expected true or false, got {value!r}")
        if kind in (int, float) and isinstance(value, bool | str):
            try:
                value = kind(value)
            except ValueError:
                raise UsageError(f"{self.option}: expected a number, got {value!r}") from None
        if kind is float and isinstance(value, int):
            value = float(value)
        if kind is int and isinstance(value, float):
            if not value.is_integer():
                raise UsageError(f"{self.option}: expected a whole number, got {value!r}")
            value = int(value)
        if self.choices and value not in self.choices:
            raise UsageError(f"{self.option}: {value!r} is not one of {', '.join(map(str, self.choices))}")
        if self.form and isinstance(value, str) and value and not re.fullmatch(self.form[0], value.strip(), re.I):
            raise UsageError(f"{self.option}: expected {self.form[1]}, got {value!r}")
        if isinstance(value, int | float) and not isinstance(value, bool):
            if value != value or value in (float("inf"), float("-inf")):
                raise UsageError(f"{self.option}: must be a finite number, got {value!r}")
            if self.minimum is not None and value < self.minimum:
                raise UsageError(f"{self.option}: must be at least {self.minimum:g}, got {value:g}")
            if self.maximum is not None and value > self.maximum:
                raise UsageError(f"{self.option}: must be at most {self.maximum:g}, got {value:g}")
            if self.above is not None and value <= self.above:
                raise UsageError(f"{self.option}: must be greater than {self.above:g}, got {value:g}")
        return value


_IO, _EXEC, _QC, _MARKERS, _LLM, _COST = (
    "inputs and outputs", "execution", "QC and clustering", "marker genes", "annotation", "cost control")
_GRAPH, CLUSTER_GROUP = _QC, "cluster (Dask)"

SETTINGS: tuple[Setting, ...] = (
    # inputs and outputs (run scope)
    Setting("data_dir", Path("data"), "folder with one sub-folder per tissue", _IO, RUN, type=Path),
    Setting("tissues", None, "tissues to process (sub-folder names), or 'all'", _IO, RUN, type=str, nargs="+",
            metavar="TISSUE"),
    Setting("input", None, "one input file to run without a tissue folder (with --tissue NAME)", _IO, RUN,
            type=Path, metavar="FILE"),
    Setting("tissue", "", "tissue of --input", _IO, RUN, type=str),
    Setting("manifest", None, "CSV of the datasets to run, one row each: path, tissue and optionally species, "
            "context, cluster_key, label_key, batch_key, dataset (instead of --tissues or --input; a --data-dir that "
            "is such a CSV, or holds one named datasets.csv, is read the same way)", _IO, RUN, type=Path,
            metavar="CSV"),
    Setting("output_dir", Path("batch_results"), "where run_{tissues}_{timestamp} folders are created", _IO, RUN,
            type=Path),
    Setting("resume", None, "finish an interrupted run folder in place (its analysis settings are kept; "
            "--workers and timeouts may be given anew)", _IO, RUN, type=Path, metavar="RUN_DIR"),
    Setting("dry_run", False, "list the datasets that would run and estimate API calls, tokens and cost; "
            "check the SLURM job script (sbatch --test-only) or the --scheduler address; send nothing; exit 1 "
            "when an input cannot run or the cluster would refuse the run", _IO, RUN),
    # execution (run scope)
    Setting("workers", 1, "datasets processed at once (each in its own kernel process); with --scheduler, the "
            "scheduler's workers decide", _EXEC, RUN, minimum=1),
    Setting("dataset_timeout", 0.0, "seconds one dataset may take before it is stopped and marked failed (0: none)",
            _EXEC, RUN, minimum=0),
    Setting("cell_timeout", 0.0, "seconds one notebook cell may take (0: none)", _EXEC, RUN, minimum=0),
    Setting("kernel_name", "python3", "Jupyter kernel for the notebooks", _EXEC, RUN),
    Setting("quiet", False, "print only failures and the closing table", _EXEC, RUN),
    Setting("cluster", "local", "where datasets run: local (a Dask cluster on this machine: --workers threads, "
            "each running one dataset's notebook kernel at a time) or slurm (one SLURM job per dataset slot; "
            "needs the [slurm] extra)", CLUSTER_GROUP, RUN,
            choices=("local", "slurm")),
    Setting("scheduler", "", "address of a running Dask scheduler (tcp://host:8786) whose workers run the datasets",
            CLUSTER_GROUP, RUN),
    Setting("cluster_timeout", 300.0, "seconds to wait for the first worker of --cluster slurm (its jobs may wait "
            "in the queue) before giving up with an error naming the queue", CLUSTER_GROUP, RUN, above=0),
    Setting("scheduler_host", "", "address the run's Dask scheduler listens on, the one the compute nodes reach "
            "(--cluster slurm; default: this machine's address on its default route, never every interface)",
            CLUSTER_GROUP, RUN),
    Setting("cluster_config", "", "YAML or JSON file of --cluster slurm options (queue, account, walltime, cores, "
            "memory, jobs, python, prologue, job_extra, ...); flags below override it", CLUSTER_GROUP, RUN,
            metavar="FILE"),
    Setting("slurm_queue", "", "SLURM partition (sbatch -p)", CLUSTER_GROUP, RUN),
    Setting("slurm_account", "", "SLURM account charged for the jobs (sbatch -A)", CLUSTER_GROUP, RUN),
    Setting("slurm_walltime", "", "time limit of each job, HH:MM:SS (default 04:00:00); a job runs datasets one "
            "after another", CLUSTER_GROUP, RUN,
            form=(r"\d+(:\d{1,2}){0,2}|\d+-\d{1,2}(:\d{1,2}){0,2}", "a SLURM time such as 04:00:00 or 1-12:00:00")),
    Setting("slurm_cores", 0, "CPU cores per dataset (default 1)", CLUSTER_GROUP, RUN, minimum=0),
    Setting("slurm_memory", "", "memory per dataset, e.g. 16GB (default 8GB); SLURM's limit caps the kernel",
            CLUSTER_GROUP, RUN, form=(r"\d+(\.\d+)?\s*([kmgtp]i?b?)?", "a size such as 16GB or 8000MB")),
    Setting("slurm_memory_from_inputs", False, "request the memory of the jobs from the inputs' sizes (1 GB + 10 x the "
            "largest input file), at most --slurm-memory", CLUSTER_GROUP, RUN),
    Setting("slurm_jobs", 0, "SLURM jobs at once, i.e. datasets at once (default: --workers)", CLUSTER_GROUP, RUN,
            minimum=0),
    Setting("slurm_python", "", "python of the shared virtual environment, as the compute nodes see it",
            CLUSTER_GROUP, RUN),
    Setting("slurm_prologue", [], "shell line run in each job before its worker starts, e.g. 'module load python' "
            "(repeatable)", CLUSTER_GROUP, RUN, repeat=True, metavar="LINE"),
    Setting("slurm_job_extra", [], "extra #SBATCH directive, e.g. --slurm-job-extra=--qos=normal (repeatable)",
            CLUSTER_GROUP, RUN, repeat=True, metavar="DIRECTIVE"),
    Setting("slurm_interface", "", "network interface the workers use (e.g. ib0)", CLUSTER_GROUP, RUN),
    Setting("slurm_local_directory", "", "node-local scratch folder of the workers", CLUSTER_GROUP, RUN),
    Setting("slurm_log_directory", "", "folder of the jobs' log files (default: slurm_logs/ in the run folder)",
            CLUSTER_GROUP, RUN),
    Setting("slurm_min_time_left", 0.0, "seconds of walltime a job must have left to take a new dataset (default: "
            "1.25 x the run's longest dataset so far); a job with less is cancelled and a new one submitted",
            CLUSTER_GROUP, RUN, minimum=0),
    Setting("slurm_retries", 0, "times a dataset whose job ran out of memory or reached its walltime is run again, "
            "once the other datasets are done, in new jobs with --slurm-retry-factor times the memory or walltime "
            "(0: never)", CLUSTER_GROUP, RUN, minimum=0),
    Setting("slurm_retry_factor", 2.0, "how much more memory or walltime each retry of --slurm-retries gets",
            CLUSTER_GROUP, RUN, above=1),
    Setting("slurm_replacements", -1, "SLURM jobs that ended early (walltime, memory, scancel) replaced while "
            "datasets are queued, at most (-1, the default: three per job)", CLUSTER_GROUP, RUN, minimum=-1),
    # analysis
    Setting("species", "human", "species of every dataset in the batch", _IO, choices=("human", "mouse")),
    Setting("cluster_key", "", "obs column of the input's own clusters: annotate those instead of a new leiden "
            "clustering (they are copied into obs['leiden'])", _QC),
    Setting("batch_key", "", "obs column of each cell's donor, sample or batch: genes chosen per batch and the PCA "
            "integrated with Harmony before the kNN graph (needs the [harmony] extra)", _QC),
    Setting("label_key", "", "obs column of the input's own cell-type labels (kept; the run is scored against "
            "them)", _LLM),
    Setting("min_genes", 200, "minimum genes per cell", _QC, minimum=0),
    Setting("min_cells", 3, "minimum cells per gene", _QC, minimum=0),
    Setting("max_pct_mt", 20.0, "maximum percent of counts from mitochondrial genes", _QC, minimum=0, maximum=100),
    Setting("target_sum", 1e4, "normalize_total target", _QC, above=0),
    Setting("n_top_genes", 2000, "highly variable genes", _GRAPH, minimum=2),
    Setting("n_pcs", 50, "principal components", _GRAPH, minimum=2),
    Setting("n_neighbors", 15, "kNN graph neighbours", _GRAPH, minimum=2),
    Setting("resolution", 1.0, "leiden resolution", _GRAPH, above=0),
    Setting("split_mixed", True, "do not split the clusters whose cells the offline reference sees as two or more "
            "populations (T and NK cells, ...) before markers and annotation", _GRAPH, flag="--no-split-mixed"),
    Setting("seed", 0, "random seed (kNN graph, leiden, UMAP, marker sampling; PCA is exact)", _GRAPH, minimum=0),
    Setting("marker_method", "wilcoxon", "rank_genes_groups method", _MARKERS,
            choices=("wilcoxon", "t-test", "t-test_overestim_var", "logreg")),
    Setting("n_markers", 50, "top ranked markers sent to the annotator per cluster", _MARKERS, minimum=1,
            maximum=500),
    Setting("marker_max_pval_adj", 0.05, "markers need an adjusted p-value at most this", _MARKERS, minimum=0,
            maximum=1),
    Setting("marker_min_logfc", 0.25, "markers need a log2 fold change at least this", _MARKERS),
    Setting("max_cells_per_cluster", 1000, "cells sampled per cluster for the marker tests (0: all cells)",
            _MARKERS, minimum=0),
    Setting("annotator", "auto", "auto: llm when OPENAI_API_KEY or a base URL is set, else the offline "
            "reference", _LLM, choices=("auto", "reference", "llm")),
    Setting("model", DEFAULT_MODEL, "model name for --annotator llm (env CASSIA_MODEL)", _LLM, env="CASSIA_MODEL"),
    Setting("base_url", "", "OpenAI-compatible endpoint, e.g. http://localhost:11434/v1 (env OPENAI_BASE_URL); "
            "credentials go in OPENAI_API_KEY, never in the URL", _LLM, env="OPENAI_BASE_URL"),
    Setting("context", "", "free-text context sent with every cluster", _LLM),
    Setting("context_file", "", "UTF-8 text file whose content is the context sent with every cluster (for a "
            "context too long for the command line; instead of --context)", _LLM, metavar="FILE"),
    Setting("llm_concurrency", 8, "requests in flight at once to the model server, for the whole run", _LLM,
            minimum=1, maximum=256),
    Setting("llm_timeout", 120.0, "seconds to connect, and the longest silence while a reply arrives", _LLM, above=0),
    Setting("llm_deadline", 300.0, "wall-clock seconds for one call to the model, every retry included (a server "
            "that trickles bytes cannot extend it)", _LLM, above=0),
    Setting("llm_max_tokens", 4096, "longest reply asked of the model (max_tokens): bounds each reply's cost and size",
            _LLM, minimum=1, maximum=100_000),
    Setting("llm_breaker_failures", 3, "consecutive connection failures or timeouts, across the run, after which "
            "requests stop for the cool-down (0: never)", _LLM, minimum=0),
    Setting("llm_breaker_cooldown", 60.0, "seconds requests stay stopped before one probe request", _LLM, minimum=0),
    Setting("llm_max_attempts", 4, "attempts per request on 429/5xx/timeouts", _LLM, minimum=1, maximum=20),
    Setting("pipeline", "full", "full: annotate, score, boost the weak clusters, merge into broad/detailed/fine "
            "groups; fast: one annotate-format-validate pass (LLM only)", _LLM, choices=("full", "fast")),
    Setting("boost_below", 75.0, "boost clusters whose quality score is below this (and Unknown ones)", _LLM,
            minimum=0, maximum=100),
    Setting("boost_rounds", 3, "gene-request rounds per boosted cluster (0: no boost)", _LLM, minimum=0, maximum=10),
    Setting("n_runs", 1, "independent annotations per cluster, for a consensus and its agreement", _LLM, minimum=1,
            maximum=20),
    Setting("models", "", "comma-separated extra models that annotate every cluster too and vote in the consensus",
            _LLM),
    Setting("agreement_threshold", 0.5, "clusters whose runs agree less than this are flagged disputed", _LLM,
            minimum=0, maximum=1),
    Setting("subcluster", [], "re-cluster the cells called this type and annotate the subclusters (repeatable)",
            _LLM, repeat=True, metavar="CELL_TYPE"),
    Setting("use_cache", True, "do not use the on-disk response cache", _LLM, flag="--no-cache"),
    Setting("cache_dir", "", "response cache folder (default: ~/.cache/cassia-batch/llm)", _LLM, metavar="DIR"),
    Setting("max_cost", 0.0, "USD budget for the run: no request is sent once it is reached (0: none)", _COST,
            minimum=0),
    Setting("price_file", "", 'JSON prices {"model": {"input": USD per 1M, "output": USD per 1M}}', _COST,
            metavar="FILE"),
    Setting("input_price", None, "USD per 1M input tokens for --model", _COST, type=float, minimum=0),
    Setting("output_price", None, "USD per 1M output tokens for --model", _COST, type=float, minimum=0),
)
BY_NAME = {s.name: s for s in SETTINGS}
# What an unset ``--slurm-*`` setting means (its flag's help says so too).
SLURM_DEFAULTS = {"walltime": "04:00:00", "cores": 1, "memory": "8GB"}
ANALYSIS_NAMES = tuple(s.name for s in SETTINGS if s.scope == ANALYSIS)
# Analysis settings --resume may change: a budget that ran out can be raised to finish the run in place.
RESUME_MAY_CHANGE = ("max_cost",)
# Analysis settings a row of --manifest may set for its dataset alone (its other columns: path, tissue, dataset).
PER_DATASET = ("species", "context", "cluster_key", "label_key", "batch_key")
#: the settings that name a column of the input's obs
OBS_KEYS = ("cluster_key", "batch_key", "label_key")
# What identifies one dataset's notebook run, beside the analysis settings.
DATASET_PARAMETERS = ("dataset", "tissue", "input_path", "run_dir")


def default(setting: Setting) -> Any:
    """The default of a setting, from its environment variable when one is set."""
    if setting.env and os.environ.get(setting.env):
        return os.environ[setting.env]
    return setting.default


class Settings:
    """The values of every setting, checked against :data:`SETTINGS`; read them as attributes.

    >>> Settings(resolution=0.8).resolution
    0.8
    """

    __slots__ = ("_values",)

    def __init__(self, **values: Any) -> None:
        unknown = sorted(set(values) - set(BY_NAME))
        if unknown:
            raise UsageError(f"unknown setting(s): {', '.join(unknown)}")
        checked = {s.name: s.default for s in SETTINGS}
        checked.update({name: BY_NAME[name].check(value) for name, value in values.items()})
        object.__setattr__(self, "_values", checked)

    def __getattr__(self, name: str) -> Any:
        try:
            return object.__getattribute__(self, "_values")[name]
        except KeyError:
            raise AttributeError(name) from None

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError("Settings are read-only: use replace()")

    def __repr__(self) -> str:
        return f"Settings({', '.join(f'{k}={v!r}' for k, v in self.changed(scope=None).items())})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Settings) and self._values == other._values

    def replace(self, **changes: Any) -> Settings:
        return Settings(**{**self._values, **changes})

    def values(self, scope: str | None = ANALYSIS) -> dict[str, Any]:
        """Every value of ``scope`` (``None``: all), JSON-able for the analysis scope."""
        return {s.name: self._values[s.name] for s in SETTINGS if scope is None or s.scope == scope}

    def obs_keys(self) -> dict[str, str]:
        """The ``obs`` columns the settings name (:data:`OBS_KEYS`), e.g. ``{"label_key": "celltype"}``."""
        return {name: self._values[name] for name in OBS_KEYS if self._values[name]}

    def changed(self, scope: str | None = ANALYSIS) -> dict[str, Any]:
        """The values of ``scope`` that differ from their declared defaults."""
        return {k: v for k, v in self.values(scope).items() if v != BY_NAME[k].default}

    @classmethod
    def from_namespace(cls, namespace: dict) -> Settings:
        """The analysis settings a notebook holds as variables (its ``globals()``), read once."""
        return cls(**{name: namespace[name] for name in ANALYSIS_NAMES if name in namespace})

    @classmethod
    def with_analysis(cls, analysis: dict, **run_values: Any) -> Settings:
        """A run's recorded analysis settings (e.g. from its manifest) with this session's run settings."""
        known = {k: v for k, v in analysis.items() if k in BY_NAME and BY_NAME[k].scope == ANALYSIS}
        return cls(**known, **run_values)


def voting_models(primary: str, models: str | Iterable[str]) -> list[str]:
    """The models that annotate every cluster: ``primary`` (``--model``), then the others of ``models``
    (``--models``, a list or comma-separated text), each once."""
    if isinstance(models, str):
        models = [m.strip() for m in models.split(",")]
    return [primary] + [m for m in dict.fromkeys(models) if m and m != primary]


def context_text(settings: Settings) -> str:
    """The context sent with every cluster: ``settings.context``, or the text of ``settings.context_file``
    (read where it is used, so a long context travels as a path, never on a command line).

    Raises
    ------
    UsageError
        The file cannot be read as UTF-8 text; the message names it.
    """
    if not settings.context_file:
        return settings.context
    try:
        return Path(settings.context_file).read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        raise UsageError(f"{settings.context_file}: --context-file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else type(exc).__name__
        raise UsageError(f"{settings.context_file}: --context-file cannot be read as UTF-8 text ({reason})") from None


def notebook_parameters(settings: Settings, *, dataset: str, tissue: str, input_path: str | Path,
                        run_dir: str | Path) -> dict[str, Any]:
    """What papermill injects into the template: the dataset's identity and the settings that differ from the
    template's defaults (so the executed notebook's injected cell shows only what changed)."""
    identity = {"dataset": dataset, "tissue": tissue, "input_path": str(input_path), "run_dir": str(run_dir)}
    return {**identity, **settings.changed()}


def declared(names: Iterable[str] = ANALYSIS_NAMES) -> dict[str, Any]:
    """Declared defaults by name (the template's parameters cell must hold exactly these)."""
    return {name: BY_NAME[name].default for name in names}
