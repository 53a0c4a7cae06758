"""One exception type for every user-facing problem: the message names the problem and the fix."""

from __future__ import annotations


class CswapError(Exception):
    """A problem with the user's input or environment, with a message that says how to fix it."""

    def __init__(self, problem: str, fix: str | None = None) -> None:
        self.problem = problem
        self.fix = fix
        super().__init__(problem if fix is None else f"{problem} Fix: {fix}")
