"""The plugin manager: built-in backends and those found through entry points."""

from __future__ import annotations

import difflib
import importlib
from collections.abc import Mapping

import pluggy

from lbc import hookspecs
from lbc.backends.base import Backend
from lbc.errors import PluginError, UsageError

ENTRY_POINT_GROUP = "lbc"
DEFAULT_PLUGINS: tuple[str, ...] = (
    "lbc.backends.ir_text",
    "lbc.backends.iptables",
    "lbc.backends.ipvs",
    "lbc.backends.nftables",
)


def plugin_manager(load_entry_points: bool = True) -> pluggy.PluginManager:
    """A fresh manager with the default plugins and, unless told not to, entry points."""
    pm = pluggy.PluginManager("lbc")
    pm.add_hookspecs(hookspecs)
    for name in DEFAULT_PLUGINS:
        pm.register(importlib.import_module(name), name=name)
    if load_entry_points:
        try:
            pm.load_setuptools_entrypoints(ENTRY_POINT_GROUP)
        except Exception as exc:  # a broken third-party package must not look like lbc's bug
            raise PluginError(f"cannot load an lbc plugin from entry points: {exc!r}") from exc
    return pm


def backends(pm: pluggy.PluginManager | None = None) -> Mapping[str, Backend]:
    """Every registered backend by name; two plugins claiming one name is an error."""
    pm = pm or plugin_manager()
    found: dict[str, tuple[Backend, str]] = {}
    for impl in pm.hook.lbc_register_backends.get_hookimpls():
        plugin = impl.plugin_name

        def register(backend: Backend, plugin: str = plugin) -> None:
            if not isinstance(backend, Backend):
                raise PluginError(f"plugin {plugin!r} registered {backend!r}, not a Backend")
            if backend.name in found:
                raise PluginError(
                    f"backend {backend.name!r} is registered twice: by "
                    f"{found[backend.name][1]!r} and by {plugin!r}"
                )
            found[backend.name] = (backend, plugin)

        try:
            impl.function(register=register)
        except PluginError:
            raise
        except Exception as exc:
            raise PluginError(f"plugin {plugin!r} failed to register backends: {exc!r}") from exc
    return {name: found[name][0] for name in sorted(found)}


def get_backend(name: str, pm: pluggy.PluginManager | None = None) -> Backend:
    """The backend called `name`, or a `PluginError` that suggests a close name."""
    known = backends(pm)
    if name in known:
        return known[name]
    close = difflib.get_close_matches(name, list(known), n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    raise PluginError(f"unknown backend {name!r} (known: {', '.join(known)}){hint}")


def resolve(backend: str | Backend) -> Backend:
    """`backend` itself, or the backend of that name (`get_backend`)."""
    if isinstance(backend, str):
        return get_backend(backend)
    if isinstance(backend, Backend):
        return backend
    raise UsageError(f"a backend is a name or a Backend, not {type(backend).__name__}")
