"""The apply engine: lock, snapshot, plan, atomic commit, verify, roll back on failure.

SIGINT and SIGTERM wait while a commit, its verification and any rollback run
(`lbc.apply.shield`), so an interrupted apply leaves the old rules or the new ones.

Verifying a commit: an adapter whose kernel numbers its ruleset generations (nftables
does: every committed transaction in a network namespace advances the generation by
one, and nothing else does) lets the engine verify without reading everything back.
When the generation after the commit is exactly as many steps past the generation read
before the snapshot as the commit sent transactions (nftables: one), lbc's
transactions were the only changes in between, and the kernel accepted them whole, so
the table holds the plan's result. Any other generation means
another writer was at work: the engine then reads the state back and compares it
with the plan, as it does for adapters without generations.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from lbc.apply import memory
from lbc.apply.adapter import KernelAdapter
from lbc.apply.conntrack import Tracked
from lbc.apply.lock import DEFAULT_LOCK, host_lock
from lbc.apply.shield import shielded
from lbc.apply.state import Change, Known, Plan, State, plan_between
from lbc.backends.base import Artifact, Backend
from lbc.collector import paused
from lbc.errors import ApplyError


@dataclass(frozen=True, slots=True)
class ApplyResult:
    """What an apply did: the plan it carried out, whether it wrote, how long it took."""

    plan: Plan
    applied: bool
    seconds: float
    # The kernel's ruleset generation after the apply (None: the adapter has none).
    generation: int | None = None
    # Whether the live state was read from the kernel (False: a caller's known state
    # was still current, as the generation proved).
    read: bool = True
    # The stale UDP flows deleted from the conntrack table after the commit
    # (`lbc.apply.conntrack`), and what went wrong on the way without undoing the apply.
    cleared: tuple[Tracked, ...] = ()
    warnings: tuple[str, ...] = ()

    def summary(self) -> str:
        """One line for people."""
        line = self._summary()
        if self.cleared:
            n = len(self.cleared)
            line += f"; {n} stale UDP flow{'' if n == 1 else 's'} cleared"
        return line

    def _summary(self) -> str:
        if self.plan.in_sync and not (self.applied and self.plan.full):
            return f"{self.plan.backend}: already in sync, nothing written"
        if self.plan.in_sync:
            return f"{self.plan.backend}: full resync: rewrote everything in {self.seconds:.3f}s"
        verb = "applied" if self.applied else "would apply (dry run)"
        c = self.plan.counts()
        return (
            f"{self.plan.backend}: {verb}: {c['add']} added, {c['change']} changed, "
            f"{c['remove']} removed in {self.seconds:.3f}s"
        )


# Work that follows a commit under the same lock (clearing stale UDP flows).
After = Callable[[ApplyResult], ApplyResult]


@dataclass(frozen=True, slots=True)
class Engine:
    """Runs plan/apply/verify/delete for one backend against one kernel adapter."""

    backend: Backend
    kernel: KernelAdapter
    lock_path: Path = DEFAULT_LOCK
    lock_timeout: float = 30.0
    # Told each phase of a long apply as it starts (the CLI prints them); never required.
    progress: Callable[[str], None] | None = None
    # Keep a record of what was written beside the lock file, for the next run.
    remember: bool = True
    # Once set, a wait for the lock gives up (`ApplyError`, nothing changed).
    cancel: threading.Event | None = None

    def __post_init__(self) -> None:
        # A path given as a string (untyped callers) works too.
        object.__setattr__(self, "lock_path", Path(self.lock_path))

    def _step(self, message: str) -> None:
        if self.progress is not None:
            self.progress(message)

    def generation(self) -> int | None:
        """The kernel's ruleset generation, if the adapter can tell it."""
        reader = getattr(self.kernel, "generation", None)
        return None if reader is None else reader()

    def _quiet(self, since: int, until: int, own: int = 0) -> bool:
        """Whether the adapter knows that the transactions after generation `since` up to
        `until` left lbc's objects alone, but for `own` of its own (nftables and
        iptables-nft, while a session follows the namespace's commits)."""
        asker = getattr(self.kernel, "quiet", None)
        return asker is not None and bool(asker(since, until, own))

    @paused
    def plan(self, artifact: Artifact) -> Plan:
        """What apply would change (reads the kernel, writes nothing)."""
        return plan_between(
            self.backend.name, self.kernel.snapshot(), self.kernel.desired(artifact)
        )

    def verify(self, artifact: Artifact) -> Plan:
        """Drift between the kernel and `artifact`; an in-sync plan means no drift."""
        return self.plan(artifact)

    @paused
    def apply(
        self,
        artifact: Artifact,
        dry_run: bool = False,
        full: bool = False,
        after: After | None = None,
    ) -> ApplyResult:
        """Make the kernel match `artifact` atomically; a no-op when already in sync.

        `full` rewrites every object lbc owns even when it already matches (a full
        resync) instead of only what differs. `after` (not on a dry run) runs still
        under the lock, and its result is returned.
        """
        start = time.perf_counter()
        self._step(f"waiting for the lock {self.lock_path}")
        with host_lock(self.lock_path, self.lock_timeout, self.cancel):
            desired = self.kernel.desired(artifact)
            result = self._remembered(desired, dry_run, start, full)
            return result if after is None or dry_run else after(result)

    @paused
    def delete(self, dry_run: bool = False) -> ApplyResult:
        """Remove every object lbc owns, and nothing else."""
        start = time.perf_counter()
        with host_lock(self.lock_path, self.lock_timeout, self.cancel):
            return self._remembered(State({}), dry_run, start)

    def _record(self) -> Path | None:
        """The on-disk record of this kernel's state (`lbc.apply.memory`), if it has one."""
        identity = getattr(self.kernel, "identity", None)
        name = identity() if identity is not None and self.remember else None
        return None if name is None else memory.record_path(self.lock_path, self.backend.name, name)

    def _remembered(
        self, desired: State, dry_run: bool, start: float, full: bool = False
    ) -> ApplyResult:
        """`_converge` starting from the record of the last run, and leaving one."""
        record = self._record()
        known = memory.load(record) if record is not None else None
        try:
            result = self._converge(desired, dry_run, start, full, known)
        except BaseException:
            if record is not None:
                memory.forget(record)
            raise
        written = result.applied or result.plan.in_sync  # the kernel now holds `desired`
        if record is not None and result.generation is not None and written:
            memory.save(record, Known(result.generation, desired))
        return result

    @paused
    def converge(
        self,
        desired: State,
        *,
        dry_run: bool = False,
        full: bool = False,
        known: Known | None = None,
        changes: tuple[Change, ...] | None = None,
        after: After | None = None,
    ) -> ApplyResult:
        """Make the kernel hold `desired`, under the lock.

        `known` is the caller's record of the live state at some generation; while the
        kernel is still at that generation it is used instead of a snapshot, and
        `changes` (if given) are the plan from it, so the cost follows the change.
        `after` runs as in `apply`.
        """
        start = time.perf_counter()
        self._step(f"waiting for the lock {self.lock_path}")
        with host_lock(self.lock_path, self.lock_timeout, self.cancel):
            result = self._converge(desired, dry_run, start, full, known, changes)
            return result if after is None or dry_run else after(result)

    def _converge(
        self,
        desired: State,
        dry_run: bool,
        start: float,
        full: bool = False,
        known: Known | None = None,
        changes: tuple[Change, ...] | None = None,
    ) -> ApplyResult:
        before = self.generation()
        read = (
            known is None
            or before is None
            or (known.generation != before and not self._quiet(known.generation, before))
        )
        if read:
            self._step(f"reading {self.backend.name} state from the kernel")
            live = self.kernel.snapshot()
        else:
            assert known is not None
            live = known.state
        if changes is not None and not read:
            plan = Plan(self.backend.name, changes, full)
        else:
            plan = plan_between(self.backend.name, live, desired, full)
        if (plan.in_sync and not full) or dry_run:
            return ApplyResult(plan, False, time.perf_counter() - start, before, read)
        # From the first write to the verdict on it, SIGINT and SIGTERM wait (`shield`).
        with shielded():
            self._step(f"committing: {plan.summary()}")
            self.kernel.commit(live, desired, plan)
            after_generation = self.generation()
            # How many transactions the commit was (nftables: one; iptables-nft: one
            # per restored table).
            sent = getattr(self.kernel, "transactions", 1)
            if before is not None and after_generation == before + sent:
                self._step("verified: the commit was the only change to the ruleset")
            elif (
                before is not None
                and after_generation is not None
                and self._quiet(before, after_generation, sent)
            ):
                self._step("verified: the other changes to the ruleset left lbc's alone")
            else:
                self._step("reading back to verify")
                after = self.kernel.snapshot()
                drift = plan_between(self.backend.name, after, desired)
                if not drift.in_sync:
                    self._roll_back(after, live, drift)
        return ApplyResult(plan, True, time.perf_counter() - start, after_generation, read)

    def _roll_back(self, now: State, previous: State, drift: Plan) -> None:
        back = plan_between(self.backend.name, now, previous)
        self._step(f"read-back differs ({drift.summary()}): rolling back")
        try:
            self.kernel.commit(now, previous, back)
        except ApplyError as exc:
            raise ApplyError(
                f"{self.backend.name}: the kernel does not hold what was committed "
                f"({drift.summary()}), and rolling back failed too: {exc}"
            ) from exc
        keys = ", ".join(c.key for c in drift.changes[:5])
        raise ApplyError(
            f"{self.backend.name}: read-back after commit differs from the plan "
            f"({drift.summary()}: {keys}); rolled back to the previous state"
        )
