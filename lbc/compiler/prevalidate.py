"""Endpoints that are certainly valid, built without pydantic's per-item work.

A large cluster has ten times more endpoints than service ports, and validating each
through pydantic (a model, its dict, its set of given keys) is most of the cost of
loading it. `prevalidate` replaces each endpoint table that plainly satisfies the
`Endpoint` schema with an `Endpoint` built directly; pydantic then validates the
rest of the cluster as usual and accepts those instances as they are. Anything
unusual is left as it was, for pydantic to accept or to word the error: this module
may only say "certainly valid", never "invalid", so error messages cannot change.

Endpoints with the same set of keys share one `model_fields_set`: the models are
frozen, so nothing in pydantic mutates it (copies get their own), and 100,000 fewer
objects for the garbage collector to walk matter more than the set itself.
"""

from __future__ import annotations

import ipaddress
import re
import socket
from collections.abc import Callable
from typing import Any

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from lbc.compiler.model import DNS_SUBDOMAIN, LABEL_VALUE, Endpoint, _address

_FIELDS = Endpoint.model_fields
# Every field with its default (None for the address, which is required), in
# declaration order: pydantic's own order of a model's dict.
_DEFAULTS = {name: None if f.is_required() else f.default for name, f in _FIELDS.items()}
_NODE = re.compile(DNS_SUBDOMAIN)  # fullmatch: never looser than pydantic's `$`
_ZONE = re.compile(LABEL_VALUE)
_BOOLS = ("ready", "serving", "terminating")
_AF_INET = socket.AF_INET
_pton = socket.inet_pton
_IPv4 = ipaddress.IPv4Address


def _slot(owner: type, name: str) -> Callable[[object, object], None]:
    """The setter of the instance slot `name` of `owner`, callable without a lookup."""
    setter: Callable[[object, object], None] = vars(owner)[name].__set__
    return setter


# BaseModel's instance slots, set as `model_construct` sets them.
_new = object.__new__
_set_dict = _slot(BaseModel, "__dict__")
_set_fields = _slot(BaseModel, "__pydantic_fields_set__")
_set_extra = _slot(BaseModel, "__pydantic_extra__")
_set_private = _slot(BaseModel, "__pydantic_private__")
_set_ip = _slot(_IPv4, "_ip")


class _Endpoints:
    """Builds endpoints for one load: caches of names already checked, shared key sets."""

    def __init__(self) -> None:
        self.nodes: set[str] = set()
        self.zones: set[str] = set()
        self.key_sets: dict[tuple[str, ...], set[str]] = {}

    def hints(self, value: object, zones: bool) -> tuple[str, ...] | None:
        """A list of zone (or node) names as the schema's tuple, or None unless plainly
        valid: non-empty names as `Endpoint.zone` (or `Endpoint.node`) takes them."""
        if type(value) is not list:
            return None
        known, rule, longest = (self.zones, _ZONE, 63) if zones else (self.nodes, _NODE, 253)
        for name in value:
            if type(name) is not str or not name:
                return None
            if name not in known:
                if len(name) > longest or not rule.fullmatch(name):
                    return None
                known.add(name)
        return tuple(value)

    def build(self, raw: object) -> Endpoint | None:
        """The `Endpoint` of `raw`, or None unless it is plainly valid (strict types)."""
        if type(raw) is not dict:
            return None
        values = _DEFAULTS.copy()
        for key, value in raw.items():
            if key == "ip":
                if type(value) is not str:
                    return None
                value = _ip(value)
                if value is None:
                    return None
            elif key == "node":
                if type(value) is not str:
                    return None
                if value not in self.nodes:
                    if len(value) > 253 or not _NODE.fullmatch(value):
                        return None
                    self.nodes.add(value)
            elif key in _BOOLS:
                if type(value) is not bool:
                    return None
            elif key == "weight":
                if type(value) is not int or not 0 <= value <= 65535:
                    return None
            elif key == "for_zones" or key == "for_nodes":
                value = self.hints(value, key == "for_zones")
                if value is None:
                    return None
            elif key == "zone":
                if type(value) is not str:
                    return None
                if value not in self.zones:
                    if len(value) > 63 or not _ZONE.fullmatch(value):
                        return None
                    self.zones.add(value)
            else:
                return None
            values[key] = value
        if values["ip"] is None:
            return None
        keys = tuple(raw)
        fields_set = self.key_sets.get(keys)
        if fields_set is None:
            fields_set = self.key_sets[keys] = set(keys)
        endpoint = _new(Endpoint)
        _set_dict(endpoint, values)
        _set_fields(endpoint, fields_set)
        _set_extra(endpoint, None)
        _set_private(endpoint, None)
        return endpoint


def _ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """The address `text` as the schema reads it, or None."""
    try:
        packed = _pton(_AF_INET, text)
    except (OSError, ValueError):
        try:
            return _address(text)  # type: ignore[return-value]  # IPv6 and the rest
        except ValueError:
            return None
    # What IPv4Address(packed) makes, without its checks of a value known to be 4 bytes.
    ip = _new(_IPv4)
    _set_ip(ip, int.from_bytes(packed))
    return ip


def prevalidate(data: dict[str, Any]) -> dict[str, Any]:
    """`data` with every plainly valid endpoint table replaced by its `Endpoint`.

    Only the outer dict and the services' dicts and endpoint lists are copied; `data`
    itself is left as it was, for error reports.
    """
    services = data.get("services")
    if not _ENABLED or type(services) is not list:
        return data
    builder = _Endpoints()
    out = []
    for svc in services:
        raw = svc.get("endpoints") if type(svc) is dict else None
        if type(raw) is list and raw:
            endpoints: list[object] = []
            for item in raw:
                built = builder.build(item)
                endpoints.append(item if built is None else built)
            svc = {**svc, "endpoints": endpoints}
        out.append(svc)
    return {**data, "services": out}


def _works() -> bool:
    """Whether a directly built endpoint is what pydantic makes (else stay out of the way)."""
    raw = {"ip": "10.0.0.1", "node": "n", "zone": "z", "weight": 2, "serving": True}
    try:
        built = _Endpoints().build(raw)
        made = Endpoint.model_validate(raw)
        ip = _ip("192.0.2.1")
    except Exception:  # internals of pydantic or ipaddress changed: no fast path
        return False
    return (
        ip == ipaddress.IPv4Address("192.0.2.1")
        and hash(ip) == hash(ipaddress.IPv4Address("192.0.2.1"))
        and built is not None
        and built == made
        and list(built.__dict__.items()) == list(made.__dict__.items())
        and built.model_fields_set == made.model_fields_set
        and built.__pydantic_extra__ == made.__pydantic_extra__
        and built.__pydantic_private__ == made.__pydantic_private__
        and all(v is not PydanticUndefined for v in _DEFAULTS.values())
    )


_ENABLED = _works()
