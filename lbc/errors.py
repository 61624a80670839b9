"""Exceptions raised by lbc; every one derives from `LbcError`."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass


class LbcError(Exception):
    """Base class of every error lbc raises on purpose."""


@dataclass(frozen=True, slots=True)
class Problem:
    """One thing wrong with a config file: where it is and what is wrong."""

    file: str
    path: str
    line: int | None
    message: str

    def __str__(self) -> str:
        where = self.file if self.line is None else f"{self.file}:{self.line}"
        if self.path:
            where = f"{where}: {self.path}"
        return f"{where}: {self.message}"


class ConfigError(LbcError):
    """The config file is malformed or inconsistent; carries every problem found."""

    def __init__(self, problems: Iterable[Problem]) -> None:
        self.problems: tuple[Problem, ...] = tuple(problems)
        super().__init__(str(self))

    def __reduce__(self) -> tuple[type[ConfigError], tuple[tuple[Problem, ...]]]:
        # Pickled and copied by its problems (for process pools), not its message.
        return type(self), (self.problems,)

    def __str__(self) -> str:
        n = len(self.problems)
        head = f"{n} problem{'s' if n != 1 else ''} in config"
        return head + ":\n" + "\n".join(f"  {p}" for p in self.problems)


@dataclass(frozen=True, slots=True)
class Unsupported:
    """One thing a config asks for that a backend cannot express."""

    backend: str
    subject: str
    feature: str
    reason: str

    def __str__(self) -> str:
        return f"{self.subject}: {self.feature}: {self.reason}"


class UnsupportedError(LbcError):
    """A backend cannot express parts of the program; lists all of them at once."""

    def __init__(self, backend: str, items: Iterable[Unsupported]) -> None:
        self.backend = backend
        self.items: tuple[Unsupported, ...] = tuple(items)
        super().__init__(str(self))

    def __reduce__(self) -> tuple[type[UnsupportedError], tuple[str, tuple[Unsupported, ...]]]:
        return type(self), (self.backend, self.items)

    def __str__(self) -> str:
        lines = [f"backend {self.backend!r} cannot express {len(self.items)} thing(s):"]
        lines += [f"  {item}" for item in self.items]
        return "\n".join(lines)


class UsageError(LbcError, TypeError, ValueError):
    """A library call was given an argument it cannot use: of the wrong type or value
    (also a `TypeError` and a `ValueError`, as Python's own checks would raise)."""


class PluginError(LbcError):
    """A backend plugin is missing, duplicated or broken."""


class ApplyError(LbcError):
    """Applying to the kernel failed; the previous state was kept or restored."""
