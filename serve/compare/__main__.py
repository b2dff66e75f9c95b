"""``python -m serve.compare``: main(); a mistake the user can fix is one line and exit status 2."""

import sys

from tunekit.errors import UserError

from .cli import main

if __name__ == "__main__":
    try:
        sys.exit(main())
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
