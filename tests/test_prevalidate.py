"""Prevalidated endpoints are exactly what pydantic makes, and only for valid tables."""

from __future__ import annotations

from typing import Any

import pytest
import tomli

from lbc.compiler import prevalidate as prevalidate_module
from lbc.compiler.load import loads
from lbc.compiler.model import Cluster, Endpoint
from lbc.compiler.prevalidate import _ENABLED, _Endpoints, _works, prevalidate

VALID: list[dict[str, Any]] = [
    {"ip": "10.0.0.1"},
    {"ip": "10.0.0.2", "node": "node-1"},
    {"node": "a.b-c", "ip": "192.168.255.254", "zone": "", "weight": 0},
    {"ip": "10.0.0.3", "ready": False, "serving": True, "terminating": True},
    {"ip": "10.0.0.4", "weight": 65535, "zone": "eu-west_1.a", "ready": True},
    {"ip": "2001:db8::1", "node": "n"},
    {"ip": "2001:DB8:0:0::2"},
    {"ip": "::ffff:10.0.0.1"},
    {"ip": "10.0.0.5", "ready": False, "serving": False},
    {"ip": "10.0.0.6", "serving": False, "ready": False},
    # publishNotReadyAddresses: ready (the service says so), not serving (the pod).
    {"ip": "10.0.0.7", "ready": True, "serving": False},
    {"ip": "10.0.0.8", "serving": False},
    {"ip": "10.0.0.9", "for_zones": ["zone-a", "eu-west_1.a"], "for_nodes": ["node-1"]},
    {"ip": "10.0.0.10", "for_zones": [], "for_nodes": []},
]
INVALID: list[object] = [
    "10.0.0.1",
    {},
    {"node": "n"},
    {"ip": 167772161},
    {"ip": "10.0.0.01"},
    {"ip": "10.0.0.1/32"},
    {"ip": "10.0.0.256"},
    {"ip": "10.0.0.1 "},
    {"ip": "10.0.0.1\x00"},
    {"ip": "10.0.0.1", "node": ""},
    {"ip": "10.0.0.1", "node": "Node"},
    {"ip": "10.0.0.1", "node": "n\n"},
    {"ip": "10.0.0.1", "node": "a" * 254},
    {"ip": "10.0.0.1", "node": ["n"]},
    {"ip": "10.0.0.1", "zone": "-a"},
    {"ip": "10.0.0.1", "zone": "a" * 64},
    {"ip": "10.0.0.1", "zone": "a\n"},
    {"ip": "10.0.0.1", "weight": -1},
    {"ip": "10.0.0.1", "weight": 65536},
    {"ip": "10.0.0.1", "weight": True},
    {"ip": "10.0.0.1", "weight": 1.0},
    {"ip": "10.0.0.1", "ready": 1},
    {"ip": "10.0.0.1", "serving": "yes"},
    {"ip": "10.0.0.1", "terminating": None},
    {"ip": "10.0.0.1", "port": 80},
    {"ip": "10.0.0.1", "for_zones": "zone-a"},
    {"ip": "10.0.0.1", "for_zones": [""]},
    {"ip": "10.0.0.1", "for_zones": ["a" * 64]},
    {"ip": "10.0.0.1", "for_zones": ["-a"]},
    {"ip": "10.0.0.1", "for_zones": [1]},
    {"ip": "10.0.0.1", "for_zones": ["a\n"]},
    {"ip": "10.0.0.1", "for_nodes": ["Node"]},
    {"ip": "10.0.0.1", "for_nodes": [""]},
    {"ip": "10.0.0.1", "for_nodes": ["a" * 254]},
    {"ip": "10.0.0.1", "for_nodes": ("n",)},
    # Zone ids: the schema refuses them (the fast path reads IPv4 only by itself).
    {"ip": "fd00::1%eth0"},
]


def test_the_fast_path_is_on() -> None:
    assert _ENABLED


def test_the_fast_path_turns_itself_off_when_it_disagrees_with_pydantic(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert _works()
    with monkeypatch.context() as changed:
        changed.setitem(prevalidate_module._DEFAULTS, "terminating", True)
        assert not _works()
    with monkeypatch.context() as changed:
        changed.setattr(prevalidate_module, "_pton", _unexpected)
        assert not _works()


def _unexpected(*_: object) -> bytes:
    raise TypeError("internals changed")


@pytest.mark.parametrize("raw", VALID, ids=lambda raw: str(raw))
def test_a_valid_endpoint_is_what_pydantic_makes(raw: dict[str, Any]) -> None:
    built = _Endpoints().build(raw)
    made = Endpoint.model_validate(raw)
    assert built is not None
    assert built == made
    assert list(built.__dict__.items()) == list(made.__dict__.items())
    assert type(built.ip) is type(made.ip)
    assert built.model_fields_set == made.model_fields_set
    assert repr(built) == repr(made)
    assert built.model_dump(exclude_unset=True) == made.model_dump(exclude_unset=True)


@pytest.mark.parametrize("raw", INVALID, ids=lambda raw: repr(raw))
def test_anything_else_is_left_to_pydantic(raw: object) -> None:
    assert _Endpoints().build(raw) is None


def test_a_cluster_loads_as_pydantic_alone_would_load_it() -> None:
    endpoints = ", ".join(
        "{ " + ", ".join(f"{k} = {_toml(v)}" for k, v in raw.items()) + " }"
        for raw in VALID
        if ":" not in raw["ip"]
    )
    text = f"""
[node]
name = "node-1"

[[services]]
name = "web"
cluster_ips = ["10.96.0.1"]
ports = [{{ port = 80 }}]
endpoints = [{endpoints}]
"""
    data = tomli.loads(text)
    assert loads(text) == Cluster.model_validate(data)
    assert prevalidate(data) is not data
    assert data == tomli.loads(text)  # the input is left as it was, for error reports


def test_a_copy_with_changes_keeps_the_shared_key_set() -> None:
    builder = _Endpoints()
    first, second = builder.build({"ip": "10.0.0.1"}), builder.build({"ip": "10.0.0.2"})
    assert first is not None and second is not None
    assert first.model_fields_set is second.model_fields_set
    changed = first.model_copy(update={"weight": 3})
    assert changed.model_fields_set == {"ip", "weight"}
    assert first.model_fields_set == second.model_fields_set == {"ip"}


def _toml(value: object) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, str):
        return f'"{value}"'
    return str(value)
