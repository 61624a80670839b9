"""A host-wide lock so that two applies never interleave."""

from __future__ import annotations

import errno
import fcntl
import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from lbc.errors import ApplyError

DEFAULT_LOCK = Path("/run/lbc.lock")


@contextmanager
def host_lock(
    path: Path = DEFAULT_LOCK, timeout: float = 30.0, cancel: threading.Event | None = None
) -> Iterator[None]:
    """Hold an exclusive `flock` on `path`, waiting at most `timeout` seconds for it,
    or until `cancel` is set."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        message = f"cannot open the lock file {path}: {reason} (nothing was changed)"
        raise ApplyError(message) from exc
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as exc:
                if exc.errno not in (errno.EAGAIN, errno.EACCES):
                    raise
                if time.monotonic() >= deadline:
                    raise ApplyError(
                        f"another lbc apply holds {path}; gave up after {timeout:g}s "
                        "(nothing was changed)"
                    ) from None
                if cancel is not None and cancel.is_set():
                    raise ApplyError(
                        f"stopped while waiting for {path}, which another lbc apply holds "
                        "(nothing was changed)"
                    ) from None
                if cancel is None:
                    time.sleep(0.05)
                else:
                    cancel.wait(0.05)
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock
