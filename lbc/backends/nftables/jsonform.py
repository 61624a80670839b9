"""A ruleset as a libnftables JSON document: the commands `Nftables().json_cmd` runs.

One document is one kernel transaction. It starts with `add`, `delete`, `add` table
(an atomic full replace whether or not the table exists) and then adds objects in
the order the kernel needs: chains, sets and maps, their elements (a map element
that jumps to a chain comes after the chain), and finally the rules.
"""

from __future__ import annotations

import json
from typing import Any

from lbc.backends.nftables.expr import NamedSet, Ruleset

JSON_SCHEMA_VERSION = 1


def to_json(ruleset: Ruleset) -> dict[str, Any]:
    """The `{"nftables": [...]}` document that builds `ruleset`."""
    where = {"family": ruleset.family, "table": ruleset.table}
    table = {"table": {"family": ruleset.family, "name": ruleset.table}}
    commands: list[dict[str, Any]] = [
        {"metainfo": {"json_schema_version": JSON_SCHEMA_VERSION}},
        {"add": table},
        {"delete": table},
        {"add": table},
    ]
    for c in ruleset.chains:
        chain: dict[str, Any] = {**where, "name": c.name}
        if c.base is not None:
            chain |= {
                "type": c.base.type,
                "hook": c.base.hook,
                "prio": c.base.priority,
                "policy": "accept",
            }
        commands.append({"add": {"chain": chain}})
    commands += [{"add": _set(s, where)} for s in ruleset.sets]
    for s in ruleset.sets:
        if s.elements:
            elem = [e.json() for e in s.elements]
            commands.append({"add": {"element": {**where, "name": s.name, "elem": elem}}})
    for c in ruleset.chains:
        for r in c.rules:
            rule: dict[str, Any] = {**where, "chain": c.name, "expr": r.json()}
            if r.comment:
                rule["comment"] = r.comment
            commands.append({"add": {"rule": rule}})
    return {"nftables": commands}


def dumps(document: dict[str, Any]) -> str:
    """Canonical JSON, one command per line: compact enough for 100k rules, still diffable."""
    commands = document["nftables"]
    lines = [json.dumps(c, sort_keys=True, separators=(",", ":")) for c in commands]
    return '{"nftables": [\n' + ",\n".join(lines) + "\n]}\n"


def _set(s: NamedSet, where: dict[str, str]) -> dict[str, Any]:
    key: str | list[str] = s.key_types[0] if len(s.key_types) == 1 else list(s.key_types)
    body: dict[str, Any] = {**where, "name": s.name, "type": key}
    if s.is_map:
        body["map"] = "verdict"
    # libnftables 1.0.6 JSON has no "dynamic" flag; nft sets it itself on a set that
    # an `update` statement writes to, as the kernel requires.
    flags = [f for f in s.flags if f != "dynamic"]
    if flags:
        body["flags"] = flags
    if s.timeout is not None:
        body["timeout"] = s.timeout
    return {"map" if s.is_map else "set": body}
