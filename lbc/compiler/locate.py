"""Map TOML key paths to the line they are written on, for error messages.

tomli returns plain dicts without positions, so this module re-reads text that
tomli has already accepted and records the line of every key, array element and
table header. It only needs to understand valid TOML (1.0, plus the 1.1 forms
tomli accepts: newlines and trailing commas in inline tables).

    >>> key_lines('[node]\\nname = "n"\\n[[services]]\\nports = [\\n  { port = 80 },\\n]\\n')
    ... # doctest: +NORMALIZE_WHITESPACE
    {('node',): 1, ('node', 'name'): 2, ('services',): 3, ('services', 0): 3,
     ('services', 0, 'ports'): 4, ('services', 0, 'ports', 0): 5,
     ('services', 0, 'ports', 0, 'port'): 5}
"""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import Sequence
from typing import NamedTuple

import tomli

Path = tuple[str | int, ...]

_BARE = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_-")
# Characters that end a bare value (number, boolean, date-time) inside its line.
_VALUE_END = frozenset(",]}\n#")


class _Reader:
    """A cursor over the text that records `path -> line`."""

    def __init__(self, text: str) -> None:
        self.s = text
        self.i = 0
        self.line = 1
        self.lines: dict[Path, int] = {}
        self.array_tables: dict[Path, int] = {}
        # How each path was first written: "table", "array of tables", "dotted" (a table
        # made by a dotted key such as `a.b = 1`), "inline table", "array" or "value".
        self.kinds: dict[Path, str] = {}

    # --- low level -----------------------------------------------------------------
    def peek(self) -> str:
        return self.s[self.i] if self.i < len(self.s) else ""

    def advance_to(self, j: int) -> None:
        if j <= self.i:  # every step must move forward, or a locator bug would hang
            raise ValueError(f"locator stuck at offset {self.i}")
        self.line += self.s.count("\n", self.i, j)
        self.i = j

    def expect(self, token: str) -> None:
        if not self.s.startswith(token, self.i):
            raise ValueError(f"expected {token!r} at offset {self.i}")
        self.advance_to(self.i + len(token))

    def skip_ws(self, newlines: bool) -> None:
        """Skip blanks and comments (and newlines, where TOML allows them)."""
        while self.i < len(self.s):
            c = self.s[self.i]
            if c in " \t\r" or (newlines and c == "\n"):
                self.advance_to(self.i + 1)
            elif c == "#":
                end = self.s.find("\n", self.i)
                self.advance_to(len(self.s) if end < 0 else end)
            else:
                return

    def record(self, path: Path, line: int | None = None, kind: str = "") -> None:
        self.lines.setdefault(path, self.line if line is None else line)
        if kind:
            self.kinds.setdefault(path, kind)

    def bare(self, path: Path, token: str) -> None:
        """Called with each bare value (number, boolean, date-time) as written."""

    # --- strings -------------------------------------------------------------------
    def string(self) -> str:
        """Consume any of the four string forms and return its raw source text."""
        start = self.i
        q = self.peek()
        if self.s.startswith(q * 3, self.i):
            j = self.i + 3
            while True:
                if j >= len(self.s):
                    raise ValueError("unterminated string")
                if q == '"' and self.s[j] == "\\":
                    j += 2
                elif self.s.startswith(q * 3, j):
                    # Up to two quotes right before the closing three belong to the string.
                    run = 3
                    while run < 5 and j + run < len(self.s) and self.s[j + run] == q:
                        run += 1
                    j += run
                    break
                else:
                    j += 1
        else:
            j = self.i + 1
            while self.s[j] != q:
                j += 2 if q == '"' and self.s[j] == "\\" else 1
            j += 1
        self.advance_to(j)
        return self.s[start:j]

    # --- keys and values -----------------------------------------------------------
    def key(self) -> list[str]:
        """A dotted key: its parts with quoted parts decoded."""
        parts: list[str] = []
        while True:
            self.skip_ws(False)
            if self.peek() in ("'", '"'):
                raw = self.string()
                # A quoted key may hold escapes; tomli already accepted it, so let it decode.
                parts.append(tomli.loads(f"k = {raw}")["k"] if "\\" in raw else raw[1:-1])
            else:
                j = self.i
                while j < len(self.s) and self.s[j] in _BARE:
                    j += 1
                parts.append(self.s[self.i : j])
                self.advance_to(j)
            self.skip_ws(False)
            if self.peek() != ".":
                return parts
            self.expect(".")

    def value(self, path: Path) -> None:
        c = self.peek()
        self.record(path, kind=_VALUE_KIND.get(c, "value"))
        if c in ("'", '"'):
            self.string()
        elif c == "[":
            self.array(path)
        elif c == "{":
            self.inline_table(path)
        else:
            j = self.i
            while j < len(self.s) and self.s[j] not in _VALUE_END:
                j += 1
            self.bare(path, self.s[self.i : j])
            self.advance_to(j)

    def array(self, path: Path) -> None:
        self.expect("[")
        index = 0
        while True:
            self.skip_ws(True)
            if self.peek() == "]":
                self.expect("]")
                return
            self.value((*path, index))
            index += 1
            self.skip_ws(True)
            if self.peek() == ",":
                self.expect(",")

    def inline_table(self, path: Path) -> None:
        self.expect("{")
        while True:
            self.skip_ws(True)
            if self.peek() == "}":
                self.expect("}")
                return
            self.key_value(path)
            self.skip_ws(True)
            if self.peek() == ",":
                self.expect(",")

    def key_value(self, table: Path) -> None:
        line = self.line
        parts = self.key()
        for n in range(1, len(parts)):
            self.record((*table, *parts[:n]), line, "dotted")
        self.record((*table, *parts), line)
        self.expect("=")
        self.skip_ws(False)
        self.value((*table, *parts))

    # --- document ------------------------------------------------------------------
    def header(self) -> Path:
        """A `[table]` or `[[array.of.tables]]` header; returns the table's path."""
        array = self.s.startswith("[[", self.i)
        self.expect("[[" if array else "[")
        parts = self.key()
        self.expect("]]" if array else "]")
        path: list[str | int] = []
        for n, part in enumerate(parts):
            path.append(part)
            prefix = tuple(path)
            last = n == len(parts) - 1
            if array and last:
                count = self.array_tables.get(prefix, 0)
                self.array_tables[prefix] = count + 1
                self.record(prefix, kind="array of tables")
                path.append(count)
            elif prefix in self.array_tables:
                # A sub-table of an array of tables belongs to its latest element.
                path.append(self.array_tables[prefix] - 1)
            # The tables a header passes through (`a` of `[a.b]`) are only implied: a
            # later `[a]` may still declare them.
            self.record(tuple(path), kind="table" if last else "")
        return tuple(path)

    def document(self) -> dict[Path, int]:
        table: Path = ()
        while True:
            self.skip_ws(True)
            if self.i >= len(self.s):
                return self.lines
            if self.peek() == "[":
                table = self.header()
            else:
                self.key_value(table)


_VALUE_KIND = {"{": "inline table", "[": "array"}


def key_lines(text: str) -> dict[Path, int]:
    """Return the line of every key path in `text` (TOML that tomli accepted); best effort."""
    return _read(_Reader(text)).lines


def _read(reader: _Reader) -> _Reader:
    # Never let a locator bug hide the real error: keep what was found so far.
    with contextlib.suppress(IndexError, ValueError, tomli.TOMLDecodeError):
        reader.document()
    return reader


class Defined(NamedTuple):
    """How a key was first written: its kind (`_Reader.kinds`, "" if only implied) and line."""

    key: tuple[str, ...]
    kind: str
    line: int | None


def definitions(text: str, key: Sequence[str]) -> list[Defined]:
    """How each leading part of `key` was first written in `text`, shortest first.

    `key` is a key as tomli's messages name it: without the indices of arrays of
    tables (`("services", "ports")` is the `ports` of the latest `[[services]]`).
    `text` is the document up to the line where tomli stopped.
    """
    reader = _read(_Reader(text))
    out: list[Defined] = []
    path: list[str | int] = []
    for n, part in enumerate(key):
        path.append(part)
        found = tuple(path)
        out.append(
            Defined(tuple(key[: n + 1]), reader.kinds.get(found, ""), reader.lines.get(found))
        )
        if found in reader.array_tables:
            path.append(reader.array_tables[found] - 1)
    return out


_DECIMAL = re.compile(r"[+-]?[0-9](?:_?[0-9])*", re.ASCII)


class _LongInteger(Exception):
    def __init__(self, path: Path, line: int, digits: int) -> None:
        super().__init__(path, line, digits)
        self.found = (path, line, digits)


class _IntegerReader(_Reader):
    """A reader that stops at the first decimal integer of more than `limit` digits."""

    def __init__(self, text: str, limit: int) -> None:
        super().__init__(text)
        self.limit = limit

    def bare(self, path: Path, token: str) -> None:
        token = token.strip()
        if len(token) > self.limit and _DECIMAL.fullmatch(token):
            digits = sum(c.isdigit() for c in token)
            if digits > self.limit:
                raise _LongInteger(path, self.line, digits)


def long_integer(text: str, limit: int) -> tuple[Path, int, int] | None:
    """The first decimal integer in `text` with more than `limit` digits, or None.

    Returns its key path, its line and its count of digits. tomli stops at such a
    number with a plain `ValueError` (Python's limit on converting long decimal
    strings), without a position; everything before it is valid TOML.
    """
    try:
        _read(_IntegerReader(text, limit))
    except _LongInteger as found:
        return found.found
    return None


def toml_key(key: Sequence[str | int]) -> str:
    """A key as a TOML document writes it: `services.ports`, `"a.b".c`."""
    return ".".join(
        part if part and all(c in _BARE for c in part) else json.dumps(part, ensure_ascii=False)
        for part in (str(p) for p in key)
    )


def line_of(lines: dict[Path, int], path: Path) -> int | None:
    """The line of `path`, or of its nearest recorded ancestor."""
    for n in range(len(path), 0, -1):
        found = lines.get(path[:n])
        if found is not None:
            return found
    return None


def format_path(path: Path) -> str:
    """`("services", 2, "ports", 0, "port")` -> `services[2].ports[0].port`."""
    out: list[str] = []
    for part in path:
        if isinstance(part, int):
            out.append(f"[{part}]")
        elif out:
            out.append(f".{_key(part)}")
        else:
            out.append(_key(part))
    return "".join(out)


def _key(part: str) -> str:
    # Quote keys that would not read back as one bare key (an unknown key may be anything).
    return part if part and all(c in _BARE for c in part) else repr(part)
