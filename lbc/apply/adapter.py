"""The small interface every kernel adapter implements, and an in-memory fake."""

from __future__ import annotations

from typing import Protocol

from lbc.apply.state import Action, Plan, State
from lbc.backends.base import Artifact
from lbc.errors import ApplyError


class KernelAdapter(Protocol):
    """Reads and writes the kernel objects one backend owns, and nothing else."""

    def snapshot(self) -> State:
        """The live state of lbc's own objects."""
        ...

    def desired(self, artifact: Artifact) -> State:
        """The state `artifact` means, in the same canonical form as `snapshot`."""
        ...

    def commit(self, live: State, desired: State, plan: Plan) -> None:
        """Make the kernel hold `desired`, atomically: on failure nothing changed."""
        ...


class FakeKernel:
    """An in-memory kernel: objects are whatever the artifact's canonical text says.

    `fail_on` makes the commit of a plan touching that object key fail, like a kernel
    rejecting a transaction; the state is then left exactly as it was. With
    `generations`, it numbers its states as nftables numbers ruleset generations: each
    commit that changes something advances the generation by one.
    """

    def __init__(
        self, objects: dict[str, tuple[str, ...]] | None = None, generations: bool = False
    ) -> None:
        self.objects: dict[str, tuple[str, ...]] = dict(objects or {})
        self.commits = 0
        self.snapshots = 0
        self.fail_on: str | None = None
        self.generations = generations
        self.current = 1

    def generation(self) -> int | None:
        """The generation of the objects (None unless made with `generations`)."""
        return self.current if self.generations else None

    def write(self, key: str, lines: tuple[str, ...] | None) -> None:
        """Another writer changes an object (a new generation, as the kernel counts)."""
        if lines is None:
            self.objects.pop(key, None)
        else:
            self.objects[key] = lines
        self.current += 1

    def snapshot(self) -> State:
        """A copy of the objects."""
        self.snapshots += 1
        return State(dict(self.objects))

    def desired(self, artifact: Artifact) -> State:
        """One object per non-empty paragraph, keyed by its first line."""
        objects: dict[str, tuple[str, ...]] = {}
        for block in artifact.text().split("\n\n"):
            lines = tuple(line for line in block.splitlines() if line)
            if lines:
                objects[lines[0]] = lines[1:]
        return State(objects)

    def commit(self, live: State, desired: State, plan: Plan) -> None:
        """Apply `plan` all at once, or fail without changing anything."""
        if self.fail_on is not None and any(c.key == self.fail_on for c in plan.changes):
            raise ApplyError(f"fake kernel refused the transaction at {self.fail_on!r}")
        for change in plan.changes:
            if change.action is Action.REMOVE:
                self.objects.pop(change.key, None)
            else:
                self.objects[change.key] = change.after
        self.commits += 1
        self.current += 1
