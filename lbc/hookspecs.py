"""pluggy hook specifications: how built-in and third-party plugins extend lbc."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import pluggy

if TYPE_CHECKING:
    from lbc.backends.base import Backend

hookspec = pluggy.HookspecMarker("lbc")
hookimpl = pluggy.HookimplMarker("lbc")


@hookspec
def lbc_register_backends(register: Callable[[Backend], None]) -> None:
    """Register backends by calling `register(backend_instance)` once for each."""
