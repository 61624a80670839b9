"""The library API: load a cluster, lower it, compile it with a backend."""

from __future__ import annotations

import builtins
import difflib
from collections.abc import Callable, Mapping
from pathlib import Path

from lbc import plugins
from lbc.apply.adapter import KernelAdapter
from lbc.apply.conntrack import (
    after_apply,
    load_places,
    save_places,
    served_record,
    udp_frontends,
)
from lbc.apply.engine import ApplyResult, Engine
from lbc.apply.lock import DEFAULT_LOCK
from lbc.apply.state import Plan
from lbc.backends.base import Artifact, Backend
from lbc.compiler.lower import lower
from lbc.compiler.model import Cluster
from lbc.errors import UsageError
from lbc.ir.nodes import Program


def compile(source: Cluster | Program, backend: str | Backend = "iptables") -> Artifact:
    """Compile a loaded cluster (or an already lowered program) with `backend`.

    Raises `UnsupportedError` listing everything the backend cannot express, and
    `PluginError` for an unknown backend name.
    """
    chosen = plugins.resolve(backend)
    return chosen.compile(_program(source, "compile"))


def _program(source: Cluster | Program, caller: str) -> Program:
    if isinstance(source, Program):
        return source
    if not isinstance(source, Cluster):
        raise UsageError(f"{caller}() takes a Cluster or a Program, not {type(source).__name__}")
    return lower(source)


def backends() -> Mapping[str, Backend]:
    """Every available backend (built-in and from plugins), by name."""
    return plugins.backends()


def backend_names() -> builtins.list[str]:
    """The names of every available backend, sorted."""
    return sorted(backends())


def _engine(
    backend: str | Backend,
    netns: str | None,
    kernel: KernelAdapter | None,
    lock_path: Path | str,
    lock_timeout: float,
    progress: Callable[[str], None] | None = None,
) -> Engine:
    chosen = plugins.resolve(backend)
    adapter = kernel or chosen.kernel(netns)
    return Engine(chosen, adapter, Path(lock_path), lock_timeout, progress)


def plan(
    source: Cluster | Program,
    backend: str | Backend = "iptables",
    *,
    netns: str | None = None,
    kernel: KernelAdapter | None = None,
) -> Plan:
    """What `apply` would change in the kernel (reads only)."""
    engine = _engine(backend, netns, kernel, DEFAULT_LOCK, 0)
    return engine.plan(compile(source, engine.backend))


def verify(
    source: Cluster | Program,
    backend: str | Backend = "iptables",
    *,
    netns: str | None = None,
    kernel: KernelAdapter | None = None,
) -> Plan:
    """Drift between the kernel and `source`; `.in_sync` is True when there is none."""
    return plan(source, backend, netns=netns, kernel=kernel)


def apply(
    source: Cluster | Program,
    backend: str | Backend = "iptables",
    *,
    netns: str | None = None,
    dry_run: bool = False,
    full: bool = False,
    kernel: KernelAdapter | None = None,
    lock_path: Path | str = DEFAULT_LOCK,
    lock_timeout: float = 30.0,
    progress: Callable[[str], None] | None = None,
    clear_stale_udp: bool = True,
) -> ApplyResult:
    """Make the kernel match `source` atomically; raises `ApplyError` with nothing changed.

    Only what differs is written; `full=True` rewrites everything lbc owns. `progress`
    is told each phase (lock, read, commit, verify) as it starts.

    Then, still under the lock and as kube-proxy does after each sync, the conntrack
    entries of UDP flows to the program's frontends that reply from somewhere other
    than a serving endpoint are deleted (`lbc.apply.conntrack`; not on a dry run, not
    with a `kernel` of the caller's, not with `clear_stale_udp=False`). They are in
    `ApplyResult.cleared`; a failure there leaves the applied rules in place and is
    reported in `ApplyResult.warnings`.
    """
    engine = _engine(backend, netns, kernel, lock_path, lock_timeout, progress)
    program = _program(source, "apply")

    def clear(result: ApplyResult) -> ApplyResult:
        # The UDP frontends applied last time in this namespace: flows to those that
        # are gone are stale too. A failed clearing keeps them for the next apply.
        record = served_record(Path(lock_path), netns)
        before = load_places(record) if record is not None else set()
        now = udp_frontends([program])
        result = after_apply(result, program, netns, before - now, progress=progress)
        if record is not None:
            save_places(record, now | before if result.warnings else now)
        return result

    after = clear if clear_stale_udp and kernel is None else None
    return engine.apply(engine.backend.compile(program), dry_run=dry_run, full=full, after=after)


def delete(
    backend: str | Backend = "iptables",
    *,
    netns: str | None = None,
    dry_run: bool = False,
    kernel: KernelAdapter | None = None,
    lock_path: Path | str = DEFAULT_LOCK,
    lock_timeout: float = 30.0,
) -> ApplyResult:
    """Remove every kernel object lbc owns for `backend`, and nothing else."""
    return _engine(backend, netns, kernel, lock_path, lock_timeout).delete(dry_run=dry_run)


def diff(
    old: Cluster | Program,
    new: Cluster | Program,
    backend: str | Backend = "iptables",
    *,
    old_name: str = "old",
    new_name: str = "new",
) -> str:
    """The unified diff of the rules two configs compile to (no kernel needed)."""
    chosen = plugins.resolve(backend)
    before = chosen.compile(_program(old, "diff")).text().splitlines(keepends=True)
    after = chosen.compile(_program(new, "diff")).text().splitlines(keepends=True)
    return "".join(difflib.unified_diff(before, after, fromfile=old_name, tofile=new_name))
