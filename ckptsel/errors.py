"""Errors the library raises for bad input.

Library code raises these with one line that says what is wrong and where (file, line,
field). The CLI turns them into a one-line message and exit code 2; it never shows a
traceback for them.
"""

from __future__ import annotations


class CkptselError(Exception):
    """Bad input or configuration: a message meant for the user, no traceback."""


class DataError(CkptselError):
    """A training-data file, row or field is unusable."""


class CheckpointError(CkptselError):
    """A checkpoint folder cannot be read or loaded."""


class RecipeError(CkptselError):
    """A recipe or settings file is invalid."""
