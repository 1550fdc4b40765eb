"""The project's user-facing error: bad input, a mismatched file, an impossible configuration.

``saerl`` prints such an error as one line naming the file / field / value and exits non-zero (``--debug``
shows the traceback); any other exception is a bug and keeps its traceback.
"""

from __future__ import annotations


class UserError(ValueError):
    """Something the user gave (a file, a row, an option) is wrong; the message says what and where."""
