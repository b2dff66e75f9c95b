"""The one exception type for mistakes a user can make (bad file, bad flag, bad config key).

Command-line entry points catch it and print its message as one line, with no traceback.
"""


class UserError(Exception):
    """A problem the user can fix; the message names the file/line or config key and the fix."""
