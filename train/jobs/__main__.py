"""``python -m train.jobs``: the job client's command line (train/jobs/cli.py)."""

import sys

from train.jobs.cli import main
from tunekit.errors import run_main

if __name__ == "__main__":
    sys.exit(run_main(main))
