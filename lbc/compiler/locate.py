"""Map TOML key paths to the line they are written on, for error messages.

tomli returns plain dicts without positions, so this module re-reads text that
tomli has already accepted and records the line of every key, array element and
table header. It only needs to understand valid TOML.
"""

from __future__ import annotations

from collections.abc import Iterator

Path = tuple[str | int, ...]

_BARE = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_-")


class _Reader:
    """A cursor over the text that records `path -> line`."""

    def __init__(self, text: str) -> None:
        self.s = text
        self.i = 0
        self.line = 1
        self.lines: dict[Path, int] = {}
        self.array_tables: dict[Path, int] = {}

    # --- low level -----------------------------------------------------------------
    def peek(self, k: int = 0) -> str:
        j = self.i + k
        return self.s[j] if j < len(self.s) else ""

    def advance(self, n: int = 1) -> None:
        chunk = self.s[self.i : self.i + n]
        self.line += chunk.count("\n")
        self.i += n

    def skip_ws(self, newlines: bool) -> None:
        while self.i < len(self.s):
            c = self.s[self.i]
            if c in " \t\r" or (newlines and c == "\n"):
                self.advance()
            elif c == "#":
                end = self.s.find("\n", self.i)
                self.advance((len(self.s) if end < 0 else end) - self.i)
            else:
                return

    def record(self, path: Path) -> None:
        self.lines.setdefault(path, self.line)

    # --- keys and values -----------------------------------------------------------
    def key(self) -> list[str]:
        parts: list[str] = []
        while True:
            self.skip_ws(False)
            c = self.peek()
            if c in "\"'":
                parts.append(self.string())
            else:
                start = self.i
                while self.peek() and self.peek() in _BARE:
                    self.advance()
                parts.append(self.s[start : self.i])
            self.skip_ws(False)
            if self.peek() != ".":
                return parts
            self.advance()

    def string(self) -> str:
        q = self.peek()
        if self.s.startswith(q * 3, self.i):
            end = self.s.find(q * 3, self.i + 3)
            while self.s.startswith(q, end + 3):  # up to two quotes may close a string
                end += 1
            text = self.s[self.i + 3 : end]
            self.advance(end + 3 - self.i)
            return text
        self.advance()
        out: list[str] = []
        while self.peek() and self.peek() != q:
            if q == '"' and self.peek() == "\\":
                out.append(self.s[self.i : self.i + 2])
                self.advance(2)
            else:
                out.append(self.peek())
                self.advance()
        self.advance()
        return "".join(out)

    def value(self, path: Path) -> None:
        self.record(path)
        c = self.peek()
        if c in "\"'":
            self.string()
        elif c == "[":
            self.advance()
            index = 0
            while True:
                self.skip_ws(True)
                if self.peek() == "]":
                    self.advance()
                    return
                self.value((*path, index))
                index += 1
                self.skip_ws(True)
                if self.peek() == ",":
                    self.advance()
        elif c == "{":
            self.advance()
            while True:
                self.skip_ws(False)
                if self.peek() == "}":
                    self.advance()
                    return
                self.key_value(path)
                self.skip_ws(False)
                if self.peek() == ",":
                    self.advance()
        else:
            while self.peek() and self.peek() not in ",]}\n#":
                self.advance()

    def key_value(self, table: Path) -> None:
        line = self.line
        parts = self.key()
        for n in range(1, len(parts) + 1):
            self.lines.setdefault((*table, *parts[:n]), line)
        self.skip_ws(False)
        self.advance()  # '='
        self.skip_ws(False)
        self.value((*table, *parts))

    # --- document ------------------------------------------------------------------
    def header(self) -> Path:
        array = self.s.startswith("[[", self.i)
        self.advance(2 if array else 1)
        parts = self.key()
        self.advance(2 if array else 1)
        path: list[str | int] = []
        for n, part in enumerate(parts):
            path.append(part)
            prefix = tuple(path)
            last = n == len(parts) - 1
            if last and array:
                count = self.array_tables.get(prefix, 0)
                self.array_tables[prefix] = count + 1
                self.record(prefix)
                path.append(count)
            elif prefix in self.array_tables:
                path.append(self.array_tables[prefix] - 1)
            self.record(tuple(path))
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


def key_lines(text: str) -> dict[Path, int]:
    """Return the line of every key path in `text` (valid TOML); best effort."""
    reader = _Reader(text)
    try:
        return reader.document()
    except (IndexError, ValueError):  # never let a locator bug hide the real error
        return reader.lines


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
        else:
            out.append(f".{part}" if out else part)
    return "".join(out)


def iter_paths(lines: dict[Path, int]) -> Iterator[Path]:
    """Every recorded path, in file order (handy for debugging the locator)."""
    return iter(sorted(lines, key=lambda p: lines[p]))
