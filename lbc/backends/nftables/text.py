"""A ruleset as an `nft -f` file: empty lbc's table, then declare it whole.

`add table` then `delete table` makes the file replace the table atomically whether
or not it exists, like the JSON form's first three commands.
"""

from __future__ import annotations

import re

from lbc.backends.nftables.expr import AnyChain, NamedSet, Ruleset

_SAFE = re.compile(r"[^A-Za-z0-9._-]")
DYNAMIC_SET_SIZE = 65535


def to_text(ruleset: Ruleset, node: str) -> str:
    """nft syntax for `ruleset`; `node` names the node in the header comment."""
    table = f"{ruleset.family} {ruleset.table}"
    out = [
        f"# lbc nftables ruleset for node {_SAFE.sub('_', node)}; generated, do not edit",
        f"add table {table}",
        f"delete table {table}",
        f"table {table} {{",
    ]
    # Blocks go straight into `out`, a blank line between two: a list per block would
    # be 100k more objects alive at once for the garbage collector to walk.
    first = True
    for s in ruleset.sets:
        if not first:
            out.append("")
        first = False
        _set(s, out)
    for c in ruleset.chains:
        if not first:
            out.append("")
        first = False
        _chain(c, out)
    out.append("}")
    return "\n".join(out) + "\n"


def duration(seconds: int) -> str:
    """A timeout as `nft list` prints it: `10m`, `3h`, `1d2h3m4s`."""
    out = []
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        amount, seconds = divmod(seconds, size)
        if amount:
            out.append(f"{amount}{unit}")
    return "".join(out) or "0s"


def declaration(s: NamedSet) -> list[str]:
    """A set's or map's declaration lines (type, size, flags, timeout), unindented."""
    key = " . ".join(s.key_types)
    out = [f"type {key} : verdict" if s.is_map else f"type {key}"]
    if "dynamic" in s.flags:
        out.append(f"size {DYNAMIC_SET_SIZE}")  # nft's default, which it lists
    if s.flags:
        out.append(f"flags {','.join(s.flags)}")
    if s.timeout is not None:
        out.append(f"timeout {duration(s.timeout)}")
    return out


def hook_line(c: AnyChain) -> str | None:
    """A base chain's `type ... hook ... priority ...; policy accept;` line."""
    b = c.base
    if b is None:
        return None
    return f"type {b.type} hook {b.hook} priority {b.priority_text}; policy accept;"


def _set(s: NamedSet, out: list[str]) -> None:
    out.append(f"\t{'map' if s.is_map else 'set'} {s.name} {{")
    out += [f"\t\t{line}" for line in declaration(s)]
    if s.elements:
        out.append("\t\telements = {")
        out += [f"\t\t\t{e.text()}," for e in s.elements]
        out.append("\t\t}")
    out.append("\t}")


def _chain(c: AnyChain, out: list[str]) -> None:
    # One string per chain: fewer, longer strings to keep and join.
    lines = c.lines()
    hook = hook_line(c)
    if hook is not None:
        lines.insert(0, hook)
    body = "".join([f"\n\t\t{line}" for line in lines])
    out.append(f"\tchain {c.name} {{{body}\n\t}}")
