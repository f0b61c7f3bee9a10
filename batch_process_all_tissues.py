#!/usr/bin/env python
"""Process every tissue of the data folder: ``run_batch.py --tissues all`` (other flags pass through)."""

import sys

from cassia_helpers.batch.cli import main

if __name__ == "__main__":
    args = sys.argv[1:]
    if "--tissues" not in args and "--resume" not in args:
        args = ["--tissues", "all", *args]
    sys.exit(main(args))
