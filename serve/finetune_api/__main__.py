"""``python -m serve.finetune_api``: the server's command line (``cli.main``), with tunekit's exit statuses.

A ``UserError`` is one line on stderr and exit status 2, as for every tunekit command; a missing
optional dependency (fastapi, uvicorn) names the extra that installs it.
"""

import sys

from tunekit.cli import run

from .cli import main

if __name__ == "__main__":
    sys.exit(run(main, None))
