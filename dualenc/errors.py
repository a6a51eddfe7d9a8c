"""One exception type for bad user input, so every entry point can print one clear line."""

from __future__ import annotations

from os import PathLike


class InputError(ValueError):
    """Bad input (file, id, config value): the message names the file, the line and the problem.

    Args:
        problem: what is wrong, e.g. ``"empty text for id '17'"``.
        path: the offending file, if any.
        line: 1-based line number in ``path``, if known.
    """

    def __init__(self, problem: str, *, path: str | PathLike | None = None, line: int | None = None):
        self.problem = problem
        self.path = None if path is None else str(path)
        self.line = line
        where = ""
        if self.path is not None:
            where = self.path + (f":{line}" if line is not None else "") + ": "
        elif line is not None:
            where = f"line {line}: "
        super().__init__(where + problem)
