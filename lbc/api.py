"""The library API: load a cluster, lower it, compile it with a backend."""

from __future__ import annotations

import builtins
from collections.abc import Mapping

from lbc import plugins
from lbc.backends.base import Artifact, Backend
from lbc.compiler.lower import lower
from lbc.compiler.model import Cluster
from lbc.ir.nodes import Program


def compile(source: Cluster | Program, backend: str | Backend = "iptables") -> Artifact:
    """Compile a loaded cluster (or an already lowered program) with `backend`.

    Raises `UnsupportedError` listing everything the backend cannot express, and
    `PluginError` for an unknown backend name.
    """
    program = lower(source) if isinstance(source, Cluster) else source
    chosen = plugins.get_backend(backend) if isinstance(backend, str) else backend
    return chosen.compile(program)


def backends() -> Mapping[str, Backend]:
    """Every available backend (built-in and from plugins), by name."""
    return plugins.backends()


def backend_names() -> builtins.list[str]:
    """The names of every available backend, sorted."""
    return sorted(backends())
