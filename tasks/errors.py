"""Errors that name the file and the problem in one line."""

from __future__ import annotations


class ScanError(Exception):
    """A scan cannot be processed because of its input; retrying will not help.

    ``str(err)`` is one line: ``<path>: <problem>``.
    """

    def __init__(self, path: object, problem: str):
        self.path = str(path)
        self.problem = " ".join(str(problem).split())  # one line, whatever the library said
        super().__init__(f"{self.path}: {self.problem}")
