"""``python -m serve.compare``: main(); a mistake the user can fix is one line and exit status 2."""

import sys

from tunekit.errors import run_main

from .cli import main

if __name__ == "__main__":
    sys.exit(run_main(main))
