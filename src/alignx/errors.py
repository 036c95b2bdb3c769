"""The one exception type for mistakes a user can make and fix.

The CLI prints an ``AlignXError`` as a single line (no traceback); anything else is our bug
and is allowed to raise loudly.
"""


class AlignXError(Exception):
    """A user-fixable problem: bad input, a missing file, an unknown setting."""
