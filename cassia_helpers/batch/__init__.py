"""The driver process: the command line, dataset discovery, the dry run, the runner of each dataset's
notebook (papermill), Ctrl-C handling, the terminal progress, and :mod:`~cassia_helpers.batch.dask` (where
datasets run: a local cluster, an existing scheduler or SLURM jobs).

Nothing here runs inside a dataset's kernel; the kernel's code lives in :mod:`cassia_helpers.dataset`.
"""
