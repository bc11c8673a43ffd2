"""The one exception type the CLI shows as a plain message (no traceback) and exits 2 for.

Raise an ``EpicfeatError`` subclass for anything the *user* can fix: a missing file, a malformed CSV, a
checkpoint from another feature set. Its message must name the thing and say what to do.
"""


class EpicfeatError(Exception):
    """A problem with the user's input or environment, explained in the message."""
