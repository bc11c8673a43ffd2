"""The one exception type the CLI shows as a plain message (no traceback) and exits 2 for.

Raise an ``EpicfeatError`` subclass for anything the *user* can fix: a missing file, a malformed CSV, a
checkpoint from another feature set. Its message must name the thing and say what to do.
"""


class EpicfeatError(Exception):
    """A problem with the user's input or environment, explained in the message."""


def listed(items, shown: int = 5) -> str:
    """'a, b, c' or 'a, b, c, d, e and 7 more': the first ``shown`` items a message names."""
    items = [str(item) for item in items]
    head = ", ".join(items[:shown])
    return head if len(items) <= shown else f"{head} and {len(items) - shown} more"
