"""Pausing Python's cyclic garbage collector while lbc builds large structures.

Loading, lowering and rendering a big cluster makes hundreds of thousands of
long-lived objects (models, IR nodes, rules) and no reference cycles. With the
collector's default thresholds, a full collection walks every tracked object again
each time the heap grows by a quarter: at 10,000 services that was a third of a
compile, and what made its time grow faster than the cluster. The functions that
build (`lbc.loads`, `lbc.lower`, a backend's compile and printing, an apply) run
with the collector paused instead. Reference counting still frees everything they
drop at once; the collector resumes when the outermost of them returns or raises,
and any cyclic garbage made meanwhile waits for its next pass. A caller that
disabled the collector itself keeps it disabled. The collector is the process's:
calls in several threads are counted, and it resumes when the last of them returns.
"""

from __future__ import annotations

import functools
import gc
import threading
from collections.abc import Callable
from typing import ParamSpec, TypeVar

P = ParamSpec("P")
R = TypeVar("R")


_lock = threading.Lock()
_holders = 0  # calls running, in any thread, while lbc holds the collector paused


def paused(fn: Callable[P, R]) -> Callable[P, R]:
    """`fn`, run with the cyclic collector disabled (and enabled again after it, if
    it was enabled before)."""

    @functools.wraps(fn)
    def run(*args: P.args, **kwargs: P.kwargs) -> R:
        global _holders
        with _lock:
            # Counted across threads: the collector resumes when the last lbc call
            # that paused it returns, not when the first does.
            hold = _holders > 0 or gc.isenabled()
            if hold:
                _holders += 1
                gc.disable()
        if not hold:  # the caller disabled the collector: it stays disabled
            return fn(*args, **kwargs)
        try:
            return fn(*args, **kwargs)
        finally:
            with _lock:
                _holders -= 1
                if _holders == 0:
                    gc.enable()

    return run
