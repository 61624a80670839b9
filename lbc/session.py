"""A long-lived apply loop for node agents: each apply costs what changed.

`lbc.apply` compiles the whole cluster and reads the kernel's whole state on every
call. A `Session` remembers, between applies, what it last wrote and the ruleset
generation the kernel was at afterwards, and keeps every service's lowered program:

- only services whose model changed (a new object that is not equal to the old one)
  are lowered again;
- with nftables, only their chains and map elements are rendered again, the plan is
  the objects they touched (`backends.nftables.incremental.Table`), and the change
  goes to the kernel as one netlink batch lbc encodes itself
  (`backends.nftables.netlink`), without libnftables' cache fill; other backends
  render the whole program again from the kept per-service programs, but for
  iptables, whose chains are kept per service too (`backends.iptables.incremental`):
  only the changed services' chains are rendered, and the shared dispatch trees only
  when some frontend's rules changed;
- while the kernel's generation is the one the session left, its record of the live
  state is used instead of a snapshot; after the commit, a generation advanced by
  exactly one proves the transaction was the only change (see `lbc.apply.engine`).
  With nftables and iptables-nft the session also follows the namespace's commits as
  the kernel announces them (`backends.nftables.generation.Monitor`, what `nft
  monitor` reads): transactions of other writers that left lbc's objects alone
  (another tool's tables or chains) do not make it read the kernel, before or after
  its commit.
  Anything else (a change to lbc's table by another writer, an adapter without
  generations, a dropped announcement) falls back to reading the kernel, so the
  result is the same as `lbc.apply`'s.

    session = lbc.Session("nftables", netns="node-a")
    session.apply(cluster)            # the first apply: everything
    session.apply(changed_cluster)    # later: in proportion to the change

Models are frozen; change a cluster with `model_copy(update=...)` rather than by
mutating its lists in place, or the session cannot see the change.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from lbc import plugins
from lbc.apply.adapter import KernelAdapter
from lbc.apply.conntrack import (
    Place,
    after_apply,
    load_places,
    save_places,
    served_record,
    udp_frontends,
)
from lbc.apply.engine import After, ApplyResult, Engine
from lbc.apply.lock import DEFAULT_LOCK
from lbc.apply.state import Action, Known, State
from lbc.backends.base import Backend
from lbc.backends.iptables.kernel import IptablesKernel
from lbc.collector import paused
from lbc.compiler.lower import lower_service, merge, node_info
from lbc.compiler.model import Cluster, Service
from lbc.errors import ApplyError, UsageError
from lbc.ir.nodes import NodeInfo, Program, Proto

Changed = dict[str, tuple[Service, Program] | None]  # service key -> new model and program
# A backend's per-service table: how to make one, a service's part, the desired state.
_Incremental = tuple[Callable[[NodeInfo], Any], Callable[[Program], Any], Callable[[Any], State]]
# The node, the services as applied (by key, and in order) and the incremental table.
_Held = tuple[NodeInfo | None, dict[str, tuple[Service, Program]], list[Service], Any]


class Session:
    """Applies successive versions of a cluster to one kernel, incrementally."""

    def __init__(
        self,
        backend: str | Backend = "nftables",
        *,
        netns: str | None = None,
        kernel: KernelAdapter | None = None,
        lock_path: Path | str = DEFAULT_LOCK,
        lock_timeout: float = 30.0,
        progress: Callable[[str], None] | None = None,
        clear_stale_udp: bool = True,
        cancel: threading.Event | None = None,
    ) -> None:
        chosen = plugins.resolve(backend)
        adapter = kernel or chosen.kernel(netns)
        self.engine = Engine(
            chosen, adapter, Path(lock_path), lock_timeout, progress, cancel=cancel
        )
        self.netns = netns
        # Stale UDP flows of the changed services are cleared after each apply, as
        # `lbc.apply` does for the whole cluster (not with a kernel of the caller's).
        self.clear_stale_udp = clear_stale_udp and kernel is None
        self._recheck = False  # the last clearing failed: check every service next time
        self._pending_gone: set[Place] = set()  # and the frontends gone before it
        # The UDP frontends the kernel serves, as kept beside the lock file (where
        # `lbc.apply` and earlier sessions left them); None until the first clearing.
        self._served: set[Place] | None = None
        self._node: NodeInfo | None = None
        self._services: dict[str, tuple[Service, Program]] = {}
        self._order: list[Service] = []  # the services of the last applied cluster
        # nftables and iptables: the desired objects kept per service (`incremental`)
        self._table: Any = None
        self._live: dict[str, tuple[str, ...]] = {}  # what the kernel holds (if known)
        self._known_generation: int | None = None

    @property
    def backend(self) -> Backend:
        """The backend this session applies."""
        return self.engine.backend

    @paused
    def apply(self, cluster: Cluster, *, dry_run: bool = False, full: bool = False) -> ApplyResult:
        """Make the kernel match `cluster` (as `lbc.apply`), doing work in proportion to
        what changed since the last apply; raises `ApplyError` with nothing changed."""
        if not isinstance(cluster, Cluster):
            raise UsageError(f"Session.apply() takes a Cluster, not {type(cluster).__name__}")
        info = node_info(cluster)
        saved = None
        if info != self._node:
            # Every service is lowered again for the new node; what was applied before
            # comes back if this apply does not happen (a dry run, a failure).
            saved = self._held()
            self._hold((info, {}, [], None))
        try:
            changed = self._changed(info, cluster)
            for entry in changed.values():
                if entry is not None:
                    self.backend.check(entry[1])
            kind = self._incremental()
            replaced = saved[1].values() if saved is not None else ()
            after = self._clearing(info, changed, [program for _, program in replaced])
            if kind is not None:
                result = self._apply_table(kind, cluster, info, changed, dry_run, full, after)
            else:
                result = self._apply_whole(cluster, info, changed, dry_run, full, after)
        except BaseException:
            if saved is not None:
                self._hold(saved)
            raise
        if dry_run and saved is not None:
            self._hold(saved)
        return result

    def listen(self) -> None:
        """Read the kernel's commit announcements that arrived since the last call
        (nftables and iptables-nft, once the session has applied; cheap when there are
        none). The session follows other writers' commits to know when lbc's objects
        were left alone; a caller that applies seldom and calls this often (`lbc watch`
        does, at every look at its file) keeps a burst of those commits from
        overflowing the queue, which would cost the next apply a read of the kernel."""
        listen = getattr(self.engine.kernel, "listen", None)
        if listen is not None:
            listen()

    def _held(self) -> _Held:
        """What the session knows of the last applied cluster."""
        return self._node, self._services, self._order, self._table

    def _hold(self, held: _Held) -> None:
        self._node, self._services, self._order, self._table = held

    def _clearing(self, info: NodeInfo, changed: Changed, replaced: list[Program]) -> After | None:
        """What clears the stale UDP flows of this apply's changes, under its lock.

        The changed services' frontends as they are now, and as they were (with every
        program `replaced` by a change of node): a frontend that is gone has no
        endpoints left, so every flow to it is stale. After a failure (a warning), the
        next apply checks every service again, and the frontends gone until then.
        """
        if not self.clear_stale_udp:
            return None
        if self._served is None:
            # What was served before this session (an earlier one, a one-shot apply)
            # and is gone now has stale flows too.
            record = served_record(self.engine.lock_path, self.netns)
            self._served = load_places(record) if record is not None else set()
            self._pending_gone |= self._served
        if not (changed or replaced or self._recheck or self._pending_gone):
            return None
        services = self._services
        gone = udp_frontends(services[key][1] for key in changed if key in services)
        gone |= udp_frontends(replaced) | self._pending_gone
        if self._recheck:  # every service as it will be after this apply
            programs = {key: program for key, (_, program) in services.items()}
            for key, entry in changed.items():
                if entry is None:
                    programs.pop(key, None)
                else:
                    programs[key] = entry[1]
            program = merge(info, programs.values())
        else:
            program = merge(info, [entry[1] for entry in changed.values() if entry is not None])
        if not gone and not any(f.proto is Proto.UDP for f in program.frontends):
            return self._checked if self._recheck else None

        def clear(result: ApplyResult) -> ApplyResult:
            cleared = after_apply(result, program, self.netns, gone, self.engine.progress)
            served = self._served or set()
            if len(cleared.warnings) > len(result.warnings):
                self._recheck, self._pending_gone = True, gone
                now = served | udp_frontends([program])
            else:
                self._checked(cleared)
                now = (served - gone) | udp_frontends([program])
            if now != served:
                self._served = now
                record = served_record(self.engine.lock_path, self.netns)
                if record is not None:
                    save_places(record, now)
            return cleared

        return clear

    def _checked(self, result: ApplyResult) -> ApplyResult:
        """After an apply that left no stale UDP flow behind: nothing to look at again."""
        self._recheck, self._pending_gone = False, set()
        return result

    def _incremental(self) -> _Incremental | None:
        """How this backend keeps its objects per service, if it does."""
        if self.backend.name == "nftables":
            from lbc.backends.nftables import incremental as nft

            return nft.Table, nft.part_of, lambda table: nft.TableState(table.objects, table=table)
        if isinstance(self.engine.kernel, IptablesKernel):
            from lbc.backends.iptables import incremental as ipt

            return ipt.Table, ipt.part_of, lambda table: State(table.objects)
        return None

    def _changed(self, info: NodeInfo, cluster: Cluster) -> Changed:
        """Each new or changed service with its lowered program; None for each one gone."""
        services = cluster.services
        last = self._order
        if len(services) == len(last):
            # The usual update: the same list with a few services replaced. Comparing
            # objects by position costs no key per service.
            pairs = [(svc, old) for svc, old in zip(services, last, strict=True) if svc is not old]
            if not pairs:
                return {}
            if len(pairs) < len(services) // 8:
                return self._changed_among(info, pairs)
        seen: set[str] = set()
        changed: Changed = {}
        for svc in services:
            key = f"{svc.namespace}/{svc.name}"
            seen.add(key)
            old = self._services.get(key)
            if old is None or (old[0] is not svc and old[0] != svc):
                changed[key] = (svc, lower_service(info, svc))
        for key in self._services.keys() - seen:
            changed[key] = None
        return changed

    def _changed_among(self, info: NodeInfo, pairs: list[tuple[Service, Service]]) -> Changed:
        """The changes when only these positions hold new objects (new, old)."""
        changed: Changed = {}
        names = {f"{svc.namespace}/{svc.name}" for svc, _ in pairs}
        for _, old in pairs:
            key = f"{old.namespace}/{old.name}"
            if key not in names:
                changed[key] = None  # not at another position either: it is gone
        for svc, _ in pairs:
            key = f"{svc.namespace}/{svc.name}"
            entry = self._services.get(key)
            if entry is None or entry[0] != svc:
                changed[key] = (svc, lower_service(info, svc))
        return changed

    def _kept(self, cluster: Cluster, changed: Changed) -> None:
        """Record the services as applied."""
        self._order = list(cluster.services)
        for key, entry in changed.items():
            if entry is None:
                del self._services[key]
            else:
                self._services[key] = entry

    def _known(self) -> Known | None:
        if self._known_generation is None:
            return None
        return Known(self._known_generation, State(self._live))

    def _remember(self, result: ApplyResult, desired: Mapping[str, tuple[str, ...]]) -> None:
        """After a commit or a confirmed no-op, the kernel holds `desired`."""
        if result.read or result.plan.full:
            self._live = dict(desired)
        else:
            for change in result.plan.changes:
                if change.action is Action.REMOVE:
                    self._live.pop(change.key, None)
                else:
                    self._live[change.key] = change.after
        self._known_generation = result.generation
        # From the first apply on (not before: a first load's objects would flood it),
        # follow the namespace's commits, so that other writers' transactions that
        # leave lbc's objects alone cost no read of the kernel (nftables).
        follow = getattr(self.engine.kernel, "follow", None)
        if follow is not None and result.generation is not None:
            follow()

    def _apply_table(
        self,
        kind: _Incremental,
        cluster: Cluster,
        info: NodeInfo,
        changed: Changed,
        dry_run: bool,
        full: bool,
        after: After | None,
    ) -> ApplyResult:
        from lbc.backends.nftables.incremental import ConflictError

        make_table, part_of, state_of = kind
        fresh = self._table is None
        if self._table is None:
            self._table = make_table(info)
        table = self._table
        previous = {key: table.parts.get(key) for key in changed}
        try:
            changes = table.update(
                {key: None if e is None else part_of(e[1]) for key, e in changed.items()}
            )
        except ConflictError as exc:
            raise ApplyError(f"{self.backend.name}: {exc}") from exc
        try:
            result = self.engine.converge(
                state_of(table),
                dry_run=dry_run,
                full=full,
                after=after,
                known=self._known(),
                # The changes are from the table's last state, which is what the kernel
                # holds, unless the table was only just made.
                changes=None if fresh else changes,
            )
        except BaseException:
            self._undo(table, previous, fresh)
            raise
        if dry_run:
            self._undo(table, previous, fresh)
            return result
        self._kept(cluster, changed)
        self._remember(result, table.objects)
        return result

    def _undo(self, table: Any, previous: dict[str, Any], fresh: bool) -> None:
        """Put the table back as it was before a failed or dry-run apply."""
        if fresh:
            self._table = None
        else:
            table.update(previous)

    def _apply_whole(
        self,
        cluster: Cluster,
        info: NodeInfo,
        changed: Changed,
        dry_run: bool,
        full: bool,
        after: After | None,
    ) -> ApplyResult:
        programs = {key: program for key, (_, program) in self._services.items()}
        for key, entry in changed.items():
            if entry is None:
                programs.pop(key, None)
            else:
                programs[key] = entry[1]
        artifact = self.backend.compile(merge(info, programs.values()))
        desired = self.engine.kernel.desired(artifact)
        result = self.engine.converge(
            desired, dry_run=dry_run, full=full, known=self._known(), after=after
        )
        if not dry_run:
            self._kept(cluster, changed)
            self._remember(result, desired.objects)
        return result
