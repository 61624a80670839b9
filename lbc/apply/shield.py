"""Holding back SIGINT and SIGTERM while a commit writes to the kernel.

A commit is atomic in the kernel where the kernel allows it (one nftables transaction,
one iptables-restore per table), but some are several writes: IPVS's netlink calls one
by one, iptables' restores of two families and tables, a bulk nftables load in
batches, and the undo that follows a refused write. A Ctrl-C or a `kill` between two
of them would leave half a change in force, which the undo never gets to put right.

`shielded()` holds both signals back for its duration, in the main thread, when they
have the disposition Python gives them (SIGINT raises `KeyboardInterrupt`, SIGTERM
ends the process): a signal that arrives meanwhile is noted, and delivered again once
the commit, its read-back and any rollback are done, with the disposition put back.
So an interrupted apply ends with the old rules in force or the new ones, never a mix.
A handler a program installed itself (`lbc watch` stops after the apply in progress)
is its own business and is left alone, as are threads other than the main one, which
Python never hands a signal to.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType

SIGNALS = (signal.SIGINT, signal.SIGTERM)
# The dispositions held back: the ones a Python program starts with.
_DEFAULTS = {signal.SIGINT: signal.default_int_handler, signal.SIGTERM: signal.SIG_DFL}


@contextmanager
def shielded() -> Iterator[None]:
    """Run the block with SIGINT and SIGTERM held back, then deliver what arrived."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    arrived: list[int] = []

    def note(signum: int, frame: FrameType | None) -> None:
        if signum not in arrived:
            arrived.append(signum)

    held = {}
    try:
        for signum in SIGNALS:
            if signal.getsignal(signum) is _DEFAULTS[signum]:
                held[signum] = signal.signal(signum, note)
        yield
    finally:
        for signum, disposition in held.items():
            signal.signal(signum, disposition)
        for number in arrived:
            signal.raise_signal(number)
