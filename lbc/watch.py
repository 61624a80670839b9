"""`lbc watch`: keep a node's kernel in step with a cluster.toml as the file changes.

A loop around one `Session`, so each change costs what changed:

- the file is looked at every `interval` seconds and read again when its status
  changes (a tool that replaces it by renaming a new file over it, or writes it in
  place) and at each resync; a version whose text differs from the last one read is
  loaded and applied;
- a file is read only once it has settled: its status is the same at two looks in a
  row, or it was last written at least `interval` seconds ago. A file written in place
  is then not caught half written while its writer is still at work (a prefix of a
  cluster.toml can be valid, with services missing), and one that changes while it is
  read is read again;
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
    before the loop looks at `stop`; a wait for the lock too, unless the session was
    made with `stop` as its `cancel` (as `lbc watch` does).
    """
    stop = stop or threading.Event()
    seen: object = None  # the file's status when it was last read
    text: str | None = None  # the text last read
    in_force: Cluster | None = None  # the version the kernel holds
    pending: Cluster | None = None  # a new version the kernel refused, to try again
    due = 0.0  # when the next resync is
    looked: object = None  # the file's status at the last look
    while not stop.is_set():
        now = time.monotonic()
        resyncing = bool(resync) and now >= due
        status = _status(path)
        settled = status == looked or _quiet(status, interval)
        looked = status
        fresh: Cluster | None = None
        # A resync reads the file too: a change its status does not show (a rewrite in
        # place of the same size within the file system's timestamp tick) is not missed.
        if settled and (status != seen or (resyncing and isinstance(status, tuple))):
            read_text = _read(path, status, report)
            if read_text is not _CHANGED:
                seen = status
                fresh, text = _load(path, text, read_text, report)
        wanted, new = fresh, True
        if wanted is None and resyncing:
            wanted, new = (pending, True) if pending is not None else (in_force, False)
        if wanted is not None:
            due = now + resync
            outcome = _apply(session, wanted, new, report, stop)
            if outcome is Outcome.APPLIED:
                in_force = wanted
            pending = wanted if outcome is Outcome.FAILED and new else None
        session.listen()  # keep up with other writers' commits between applies
        stop.wait(interval)


def _quiet(status: object, interval: float) -> bool:
    """Whether the file of `status` was last written at least `interval` seconds ago."""
    if not isinstance(status, tuple):
        return False
    mtime_ns: int = status[3]
    return time.time_ns() - mtime_ns >= interval * 1e9


def _status(path: Path) -> object:
    """What tells a changed file apart: its identity, size and times, or the error."""
    try:
        st = os.stat(path)
    except OSError as exc:
        return exc.errno
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


# `_read`'s answer for a file written to while it was read.
_CHANGED = object()


def _read(path: Path, status: object, report: Callable[[Event], None]) -> object:
    """The text of the file (None: it cannot be read, which is reported), or `_CHANGED`
    when its status is no longer `status` after the read: read again once it settles."""
    try:
        text = read(path)
    except LbcError as exc:
        if _status(path) != status:
            return _CHANGED
        report(Event(Outcome.SKIPPED, _kept(str(exc))))
        return None
    return text if _status(path) == status else _CHANGED


def _load(
    path: Path, last: str | None, text: object, report: Callable[[Event], None]
) -> tuple[Cluster | None, str | None]:
    """The cluster of a new version of the file (None: unchanged, unreadable or not
    valid), and the text now read."""
    if not isinstance(text, str):
        return None, None
    if text == last:
        return None, text
    try:
        return loads(text, filename=str(path)), text
    except LbcError as exc:
        report(Event(Outcome.SKIPPED, _kept(str(exc))))
        return None, text


def _apply(
    session: Session,
    cluster: Cluster,
    new: bool,
    report: Callable[[Event], None],
    stop: threading.Event,
) -> Outcome:
    """Apply `cluster` (a new version, or the one in force again) and report it; a
    resync that finds nothing to do says nothing."""
    try:
        result = session.apply(cluster)
    except ApplyError as exc:
        # A stop cuts short a wait for the lock (when the session was given the stop
        # event as its `cancel`): then there is no next time.
        then = "" if stop.is_set() else "; trying again at the next resync"
        report(Event(Outcome.FAILED, f"{exc}{then}"))
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
