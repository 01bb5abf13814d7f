"""Errors that end a run, with the exit code that tells Kubernetes whether to retry."""

from __future__ import annotations


class FatalError(Exception):
    """Ends the run with `error`; `exit_code` 2 says retrying cannot help (bad configuration)."""

    def __init__(self, message: str, exit_code: int = 1) -> None:
        super().__init__(message)
        self.exit_code = exit_code
