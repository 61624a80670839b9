"""Running a block of code inside a named network namespace (`ip netns` name)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

from lbc.errors import ApplyError

CAP_NET_ADMIN = 12


def require_net_admin(what: str) -> None:
    """Raise `ApplyError` unless the calling thread holds CAP_NET_ADMIN.

    libnftables without it prints "Operation not permitted (you must be root)" to the
    process's standard error itself, then fails as if a transaction had been refused:
    this says what is missing first, with nothing printed.
    """
    try:
        with open("/proc/thread-self/status", encoding="ascii") as status:
            line = next(x for x in status if x.startswith("CapEff:"))
    except (OSError, StopIteration):
        return  # cannot tell: let the kernel answer
    if not int(line.split()[1], 16) >> CAP_NET_ADMIN & 1:
        raise ApplyError(
            f"{what} needs CAP_NET_ADMIN (run lbc as root); nothing was read or changed"
        )


class NamespaceError(ApplyError):
    """The named network namespace cannot be entered (it does not exist, or no rights)."""


@contextmanager
def inside(netns: str | None) -> Iterator[None]:
    """Run the block in the named network namespace (sockets made there stay there).

    Only the calling thread moves, and it comes back to the namespace it was in. A
    namespace that does not exist is a `NamespaceError`, never created (pyroute2's
    `pushns` would create it).
    """
    if netns is None:
        yield
        return
    if not netns or "/" in netns or netns in (".", ".."):
        raise NamespaceError(f"cannot enter network namespace {netns!r}: not a namespace name")
    from pyroute2.netns import setns

    # The thread's own namespace, not the process's main thread's (/proc/self).
    saved = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    try:
        try:
            setns(netns, flags=0)
        except OSError as exc:
            raise NamespaceError(f"cannot enter network namespace {netns!r}: {exc}") from exc
        try:
            yield
        finally:
            setns(saved, flags=0)
    finally:
        os.close(saved)
