"""`lbc watch`: keep a node's kernel in step with a cluster.toml as the file changes.

A loop around one `Session`, so each change costs what changed:

- the file is looked at every `interval` seconds and read again when its status
  changes (a tool that replaces it by renaming a new file over it, or writes it in
  place) and at each resync; a version whose text differs from the last one read is
  loaded and applied;
- a version that cannot be read, is invalid, or that the backend cannot express is
  reported and skipped: the kernel keeps the rules of the last version applied;
- a kernel error is reported, and the version is tried again at the next resync (or,
  with resyncs off, when the file changes again);
- every `resync` seconds the version in force is applied again. While the kernel is
  at the ruleset generation the session left, that reads and writes nothing; when
  another writer changed lbc's objects, it repairs them (kube-proxy resyncs
  periodically for the same reason).

Nothing is removed when the loop stops: the rules stay in force (`lbc delete`
removes them).
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

from lbc.apply.engine import ApplyResult
from lbc.compiler.load import loads, read
from lbc.compiler.model import Cluster
from lbc.errors import ApplyError, LbcError
from lbc.session import Session


class Outcome(StrEnum):
    """What one step of the loop came to."""

    APPLIED = "applied"  # a version is in force (a new one, or the same after a resync)
    REPAIRED = "repaired"  # a resync found the kernel changed by another writer, and fixed it
    SKIPPED = "skipped"  # a version that cannot be applied: the last one stays in force
    FAILED = "failed"  # the kernel refused; tried again at the next resync


@dataclass(frozen=True, slots=True)
class Event:
    """One report of the loop: the outcome, a line for people, the apply's result."""

    outcome: Outcome
    message: str
    result: ApplyResult | None = None


def watch(
    path: Path,
    session: Session,
    report: Callable[[Event], None],
    *,
    interval: float = 1.0,
    resync: float = 30.0,
    stop: threading.Event | None = None,
) -> None:
    """Apply `path` through `session` whenever it changes, until `stop` is set.

    `resync` 0 turns the periodic re-apply off. An apply in progress always finishes
    before the loop looks at `stop`.
    """
    stop = stop or threading.Event()
    seen: object = None  # the file's status when it was last read
    text: str | None = None  # the text last read
    in_force: Cluster | None = None  # the version the kernel holds
    pending: Cluster | None = None  # a new version the kernel refused, to try again
    due = 0.0  # when the next resync is
    while not stop.is_set():
        now = time.monotonic()
        resyncing = bool(resync) and now >= due
        status = _status(path)
        fresh: Cluster | None = None
        # A resync reads the file too: a change its status does not show (a rewrite in
        # place of the same size within the file system's timestamp tick) is not missed.
        if status != seen or (resyncing and isinstance(status, tuple)):
            seen = status
            fresh, text = _load(path, text, report)
        wanted, new = fresh, True
        if wanted is None and resyncing:
            wanted, new = (pending, True) if pending is not None else (in_force, False)
        if wanted is not None:
            due = now + resync
            outcome = _apply(session, wanted, new, report)
            if outcome is Outcome.APPLIED:
                in_force = wanted
            pending = wanted if outcome is Outcome.FAILED and new else None
        stop.wait(interval)


def _status(path: Path) -> object:
    """What tells a changed file apart: its identity, size and times, or the error."""
    try:
        st = os.stat(path)
    except OSError as exc:
        return exc.errno
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def _load(
    path: Path, last: str | None, report: Callable[[Event], None]
) -> tuple[Cluster | None, str | None]:
    """The cluster of a new version of the file (None: unchanged or not valid), and the
    text now read."""
    try:
        text = read(path)
    except LbcError as exc:
        report(Event(Outcome.SKIPPED, _kept(str(exc))))
        return None, None
    if text == last:
        return None, text
    try:
        return loads(text, filename=str(path)), text
    except LbcError as exc:
        report(Event(Outcome.SKIPPED, _kept(str(exc))))
        return None, text


def _apply(
    session: Session, cluster: Cluster, new: bool, report: Callable[[Event], None]
) -> Outcome:
    """Apply `cluster` (a new version, or the one in force again) and report it; a
    resync that finds nothing to do says nothing."""
    try:
        result = session.apply(cluster)
    except ApplyError as exc:
        report(Event(Outcome.FAILED, f"{exc}; trying again at the next resync"))
        return Outcome.FAILED
    except LbcError as exc:  # the backend cannot express this version
        report(Event(Outcome.SKIPPED, _kept(str(exc))))
        return Outcome.SKIPPED
    if new:
        report(Event(Outcome.APPLIED, result.summary(), result))
        return Outcome.APPLIED
    if not result.plan.in_sync:
        report(Event(Outcome.REPAIRED, f"resync: {result.summary()}", result))
    return Outcome.APPLIED


def _kept(reason: str) -> str:
    return f"{reason}\n(the rules of the last version applied stay in force)"
