"""The base of every error that is the user's to fix (a leaf module: it imports nothing of the package).

The CLI prints such an error as one line, ``error: <message>``, and exits with status 2. Commands
raise subclasses named for what went wrong (``EvaluationError``, ``ExportError``...).
"""
from __future__ import annotations


class UsageError(ValueError):
    """A mistake in how a command was called or what it was pointed at; the message says the fix."""
