"""Backends are plugins: built-ins and an outside package register through one hook."""

from __future__ import annotations

import importlib.metadata
import inspect
import subprocess
import sys
import types
from pathlib import Path

import pluggy
import pytest

import lbc
from lbc import hookspecs, plugins
from lbc.backends.base import Backend
from lbc.ir import Program

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "hostnames.toml"


def _require_example_plugin() -> None:
    try:
        importlib.metadata.distribution("lbc-example-backend")
    except importlib.metadata.PackageNotFoundError:
        pytest.fail("tests/plugin_pkg is not installed; scripts/test.sh installs it")


def test_builtin_backends_register_through_the_same_hook() -> None:
    pm = plugins.plugin_manager(load_entry_points=False)
    names = {impl.plugin_name for impl in pm.hook.lbc_register_backends.get_hookimpls()}
    assert names == set(plugins.DEFAULT_PLUGINS)
    found = plugins.backends(pm)
    assert {"ir", "iptables"} <= set(found)
    assert "example" not in found


def test_outside_package_adds_a_backend_through_entry_points() -> None:
    _require_example_plugin()
    assert "example" in lbc.backend_names()
    text = lbc.compile(lbc.load(EXAMPLE), backend="example").text()
    assert text == "10.0.1.175:80/tcp -> 10.244.1.7:9376 10.244.2.3:9376 10.244.3.6:9376\n"


def test_outside_backend_capability_flags_are_enforced() -> None:
    _require_example_plugin()
    cluster = lbc.load(ROOT / "golden" / "affinity" / "cluster.toml")
    with pytest.raises(lbc.UnsupportedError) as exc:
        lbc.compile(cluster, backend="example")
    assert [i.feature for i in exc.value.items] == ["affinity"]
    assert exc.value.items[0].subject == "default/sticky:http/tcp ipv4"


def test_cli_lists_plugin_backends_with_capabilities() -> None:
    _require_example_plugin()
    out = subprocess.run(
        [sys.executable, "-m", "lbc", "backends"], capture_output=True, text=True, check=True
    ).stdout
    assert "example" in out and "iptables" in out
    example = out[out.index("example") :].splitlines()
    assert "affinity" not in example[1] and "weights" in example[1]


def _plugin(name: str, register_body: object) -> types.ModuleType:
    module = types.ModuleType(name)

    @hookspecs.hookimpl
    def lbc_register_backends(register):  # type: ignore[no-untyped-def]
        register_body(register)  # type: ignore[operator]

    module.lbc_register_backends = lbc_register_backends  # type: ignore[attr-defined]
    return module


class _Dup(Backend):
    name = "iptables"
    description = "a second iptables"

    def render(self, program: Program) -> lbc.Artifact:
        return lbc.Artifact(self.name, {"text": ""})


def _manager(*modules: types.ModuleType) -> pluggy.PluginManager:
    pm = plugins.plugin_manager(load_entry_points=False)
    for module in modules:
        pm.register(module, name=module.__name__)
    return pm


def test_two_plugins_claiming_one_name_is_an_error_naming_both() -> None:
    pm = _manager(_plugin("dup_plugin", lambda register: register(_Dup())))
    with pytest.raises(lbc.PluginError, match=r"'iptables' is registered twice.*dup_plugin"):
        plugins.backends(pm)


def test_a_failing_plugin_is_named_in_the_error() -> None:
    def boom(register: object) -> None:
        raise RuntimeError("kaput")

    pm = _manager(_plugin("broken_plugin", boom))
    with pytest.raises(lbc.PluginError, match=r"broken_plugin.*kaput"):
        plugins.backends(pm)


def test_registering_something_that_is_not_a_backend_is_an_error() -> None:
    pm = _manager(_plugin("odd_plugin", lambda register: register("not a backend")))
    with pytest.raises(lbc.PluginError, match="odd_plugin"):
        plugins.backends(pm)


def test_unknown_backend_suggests_a_close_name() -> None:
    with pytest.raises(lbc.PluginError, match="did you mean 'iptables'"):
        plugins.get_backend("iptabels")


def test_every_hookspec_is_documented_and_implemented() -> None:
    specs = [
        f
        for name, f in inspect.getmembers(hookspecs, inspect.isfunction)
        if name.startswith("lbc_")
    ]
    assert specs, "no hookspecs found"
    pm = plugins.plugin_manager(load_entry_points=False)
    for spec in specs:
        assert (spec.__doc__ or "").strip(), f"{spec.__name__} has no docstring"
        assert getattr(pm.hook, spec.__name__).get_hookimpls(), f"{spec.__name__} unused"
