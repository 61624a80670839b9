"""Kernel state as lbc sees it: owned objects keyed by name, and plans between two states."""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any


@dataclass(frozen=True, slots=True)
class State:
    """The objects lbc owns (live or desired): object key -> its canonical lines.

    `shared` holds settings lbc writes but does not own (IPVS: its sysctls), by key as
    objects are: a live state has their values, a desired state those lbc needs. A plan
    sets a shared setting the desired state names where its value differs, and never
    removes one: `lbc delete`, or a config that stops needing it, leaves it as it is.
    """

    objects: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    shared: Mapping[str, tuple[str, ...]] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.objects)


@dataclass(frozen=True, slots=True)
class Known:
    """What the kernel held at one ruleset generation (the state lbc last wrote)."""

    generation: int
    state: State


class Action(StrEnum):
    """What a plan does to one object."""

    ADD = "add"
    CHANGE = "change"
    REMOVE = "remove"


@dataclass(frozen=True, slots=True)
class Change:
    """One object that differs between live and desired state."""

    key: str
    action: Action
    before: tuple[str, ...]
    after: tuple[str, ...]

    def diff(self) -> list[str]:
        """Unified diff lines (without file headers) of this object."""
        return list(difflib.unified_diff(self.before, self.after, lineterm="", n=1))[2:]


@dataclass(frozen=True, slots=True)
class Plan:
    """The changes that turn the live state into the desired one."""

    backend: str
    changes: tuple[Change, ...]
    full: bool = False  # rewrite every object, changed or not (`lbc apply --full`)

    @property
    def in_sync(self) -> bool:
        """True when nothing would change."""
        return not self.changes

    def counts(self) -> dict[str, int]:
        """Objects added, changed and removed."""
        return {a.value: sum(1 for c in self.changes if c.action is a) for a in Action}

    def summary(self) -> str:
        """`3 to add, 1 to change, 0 to remove` or `in sync`."""
        if self.in_sync:
            return "in sync"
        c = self.counts()
        return f"{c['add']} to add, {c['change']} to change, {c['remove']} to remove"

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready description for machines (`--format json`)."""
        return {
            "backend": self.backend,
            "in_sync": self.in_sync,
            "counts": self.counts(),
            "changes": [
                {
                    "object": c.key,
                    "action": c.action.value,
                    "before": list(c.before),
                    "after": list(c.after),
                }
                for c in self.changes
            ],
        }


def plan_between(backend: str, live: State, desired: State, full: bool = False) -> Plan:
    """Every object to add, change or remove, and every shared setting to set, in a
    stable order (by key)."""
    before, after = live.objects, desired.objects
    # One pass finds the keys that differ; only those are sorted and planned (a large
    # ruleset's re-apply changes a few of its 100k objects).
    get = before.get
    differing = [key for key, lines in after.items() if get(key) != lines]
    differing += [key for key in before if key not in after]
    planned = changes(sorted(differing), before.get, after.get)
    if desired.shared:  # set where they differ; never removed
        had, wanted = live.shared.get, desired.shared
        setting = changes(sorted(k for k, v in wanted.items() if had(k) != v), had, wanted.get)
        planned = tuple(sorted(planned + setting, key=lambda c: c.key))
    return Plan(backend, planned, full)


def changes(
    keys: Iterable[str],
    before: Callable[[str], tuple[str, ...] | None],
    after: Callable[[str], tuple[str, ...] | None],
) -> tuple[Change, ...]:
    """The change of each key whose lines differ (None: the object does not exist)."""
    out = []
    for key in keys:
        old, new = before(key), after(key)
        if old == new:
            continue
        if old is None:
            out.append(Change(key, Action.ADD, (), new or ()))
        elif new is None:
            out.append(Change(key, Action.REMOVE, old, ()))
        else:
            out.append(Change(key, Action.CHANGE, old, new))
    return tuple(out)
