"""The one exception type for mistakes a user can make (bad file, bad flag, bad config key).

Command-line entry points catch it and print its message as one line, with no traceback.
"""


class UserError(Exception):
    """A problem the user can fix; the message names the file/line or config key and the fix."""


def run_main(main, argv=None, interrupted: str = "interrupted") -> int:
    """The one entry-point wrapper: ``sys.exit(run_main(main))``. A UserError is its message on one line
    of stderr and exit status 2, never a traceback; Ctrl-C is exit status 130 with ``interrupted``."""
    import sys

    try:
        return main(argv) or 0
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(interrupted, file=sys.stderr)
        return 130
