#!/usr/bin/env python
"""Annotate every dataset of a data folder: ``python run_batch.py --tissues brain`` (see ``--help``)."""

import sys

from cassia_helpers.batch.cli import main

if __name__ == "__main__":
    sys.exit(main())
