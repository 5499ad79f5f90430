"""Exceptions shared by the library and the scripts."""
from __future__ import annotations


class UserInputError(ValueError):
    """Something the user supplied (a path, a size, a device name, a precision) cannot be used.

    The message is one line that names the input, the problem and how to fix it, so a script can
    print it as ``error: <message>`` without a traceback. It is a ``ValueError`` so library callers
    that already catch ``ValueError`` keep working.
    """
