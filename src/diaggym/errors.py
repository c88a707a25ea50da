"""Errors that reach users.

Every failure caused by input (a missing table, a wrong column, a bad timestamp,
a truncated gzip, an invalid case) is an :class:`InputError` whose message
names the file and the problem, so the CLI can print it and exit non-zero
without a traceback.
"""

from __future__ import annotations

from pathlib import Path


class InputError(Exception):
    """Bad input: the message says which file (and where possible which line/field) is wrong."""

    def __init__(self, message: str, path: str | Path | None = None) -> None:
        self.path = str(path) if path is not None else None
        super().__init__(f"{self.path}: {message}" if self.path else message)
