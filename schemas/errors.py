"""``ConfigError``: every problem of a configuration file at once, each with its place.

A :class:`Problem` is one mistake: the dotted key path (``pools.writer.maxconn``), the pool it
belongs to, the YAML line and column (1-based), the offending value already redacted, and a
message. :class:`ConfigError` carries the file and all of its problems; its ``str()`` is one line
per problem, in the ``file:line:column: path: message (value: ...)`` shape editors and
terminals recognise.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

__all__ = ["ConfigError", "Problem"]


@dataclass(frozen=True)
class Problem:
    """One mistake in a configuration file.

    ``value`` is display text and already redacted: secrets are ``***`` and connection strings
    have their passwords replaced. ``path`` is ``""`` for a problem of the whole file (it cannot
    be read, or is not YAML)."""

    path: str
    pool: str | None
    line: int | None
    column: int | None
    value: str | None
    message: str

    def format(self, file: str | None = None) -> str:
        """``file:line:column: path: message (value: ...)``, leaving out what is unknown."""
        where = [file or "<config>"]
        if self.line is not None:
            where.append(str(self.line))
            if self.column is not None:
                where.append(str(self.column))
        parts = [":".join(where)]
        if self.path:
            parts.append(self.path)
        text = self.message if self.value is None else f"{self.message} (value: {self.value})"
        parts.append(text)
        return ": ".join(parts)

    def __str__(self) -> str:
        return self.format()


def _sort_key(problem: Problem) -> tuple[int, int, str, str]:
    return (problem.line or 0, problem.column or 0, problem.path, problem.message)


class ConfigError(ValueError):
    """A configuration file that cannot be used, with every problem found in it.

    ``file`` is the file's name as given (``None`` or ``"<string>"`` for text that came from
    elsewhere); ``problems`` is never empty and is ordered by position in the file."""

    file: str | None
    problems: list[Problem]

    def __init__(self, file: str | None, problems: Iterable[Problem]) -> None:
        unique = list(dict.fromkeys(problems))
        if not unique:
            unique = [Problem(path="", pool=None, line=None, column=None, value=None,
                              message="invalid configuration")]
        self.file = file
        self.problems = sorted(unique, key=_sort_key)
        super().__init__(self._render())

    def _render(self) -> str:
        return "\n".join(problem.format(self.file) for problem in self.problems)

    def __str__(self) -> str:
        return self._render()

    def __repr__(self) -> str:
        count = len(self.problems)
        return f"ConfigError({self.file!r}, {count} problem{'s' if count != 1 else ''})"

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.file, self.problems))

    @property
    def pools(self) -> list[str]:
        """The pools with at least one problem, in file order."""
        return list(dict.fromkeys(p.pool for p in self.problems if p.pool is not None))
