"""Operations -> canonical text (the golden file) and JSON; reading that text back.

The text has one paragraph per kind of kernel object, each headed by
`# <section>: <command that shows or loads it>`; the `ipvs` section is exactly what
`ipvsadm -S -n` prints for these services, in lbc's order.
"""

from __future__ import annotations

import re

from lbc.backends.base import LazyFormats, dumps_json
from lbc.backends.ipvs import names as n
from lbc.backends.ipvs.ops import (
    IPVSADM_PROTO,
    PROTO_NUMBER,
    AddAddress,
    AddDestination,
    AddService,
    EnsureDummy,
    LoadRules,
    Operation,
    SetSysctl,
)
from lbc.ir.names import address_key

SECTIONS = {
    "link": f"ip link add {n.LINK} type dummy; ip link set {n.LINK} down",
    "addresses": f"ip addr add ADDRESS dev {n.LINK}",
    "sysctl": "sysctl -w",
    "ipvs": "ipvsadm -S -n",
    "rules": f"nft -f (table {n.TABLE_FAMILY} {n.TABLE}, replaced in one transaction)",
}
_HEADER = re.compile(r"^# ([a-z]+): ")
_PROTO_BY_FLAG = {flag: PROTO_NUMBER[proto] for proto, flag in IPVSADM_PROTO.items()}


def to_text(ops: tuple[Operation, ...], node: str) -> str:
    """The canonical, reviewable text of `ops`."""
    body: dict[str, list[str]] = {name: [] for name in SECTIONS}
    ipvs = body["ipvs"]
    # The last service and its name in ipvsadm's words, which its destinations repeat.
    service: tuple[str, str, int] | None = None
    virtual = ""
    for op in ops:
        if type(op) is AddDestination:
            mine = (op.proto, op.service_address, op.service_port)
            ipvs.append(op.line(virtual if mine == service else None))
        elif isinstance(op, AddService):
            service, virtual = (op.proto, op.address, op.port), op.virtual()
            ipvs.append(op.line())
        elif isinstance(op, AddDestination):
            ipvs.append(op.line())
        elif isinstance(op, EnsureDummy):
            body["link"].append(op.line())
        elif isinstance(op, AddAddress):
            body["addresses"].append(op.line())
        elif isinstance(op, SetSysctl):
            body["sysctl"].append(op.line())
        elif isinstance(op, LoadRules):
            body["rules"].append(op.text.rstrip("\n"))
    out = [f"# lbc ipvs configuration for node {node}; generated, do not edit"]
    for name, command in SECTIONS.items():
        out += ["", f"# {name}: {command}", *body[name]]
    return "\n".join(out) + "\n"


def formats(ops: tuple[Operation, ...], node: str) -> LazyFormats:
    """The artifact's formats of `ops`: "text" and "json", printed on demand."""
    return LazyFormats({"text": lambda: to_text(ops, node), "json": lambda: to_json(ops)})


def to_json(ops: tuple[Operation, ...]) -> str:
    """The operation list as canonical JSON, each with its command-line equivalent."""
    return dumps_json([op.to_json() for op in ops])


def sections(text: str) -> dict[str, str]:
    """The sections of a canonical text by name, each as lines ending in a newline."""
    found: dict[str, list[str]] = {}
    current: list[str] | None = None
    for line in text.splitlines():
        header = _HEADER.match(line)
        if header and header.group(1) in SECTIONS:
            current = found.setdefault(header.group(1), [])
        elif current is not None:
            current.append(line)
    return {name: "".join(f"{line}\n" for line in _trim(lines)) for name, lines in found.items()}


def canonical_save(save: str) -> str:
    """`ipvsadm -S -n` output with services and real servers in lbc's total order.

    ipvsadm sorts addresses by a wrapping 32-bit subtraction, so addresses 2**31 or
    more apart (10.x and 192.168.x, say) can come out in either order; comparing a
    kernel's table with lbc's text goes through this function.
    """
    blocks: dict[str, list[str]] = {}
    for line in save.splitlines():
        words = line.split()
        if not words:
            continue
        if words[0] == "-A":
            blocks[line] = []
        elif words[0] == "-a" and blocks:
            blocks[next(reversed(blocks))].append(line)
        else:
            raise ValueError(f"not an ipvsadm -S line: {line!r}")
    out: list[str] = []
    for head in sorted(blocks, key=_service_key):
        out.append(head)
        out += sorted(blocks[head], key=_destination_key)
    return "".join(f"{line}\n" for line in out)


def _service_key(line: str) -> tuple[int, int, int, int]:
    words = line.split()
    address, port = _split_hostport(words[2])
    family, value = address_key(address)
    return family, _PROTO_BY_FLAG[words[1]], value, port


def _destination_key(line: str) -> tuple[int, int, int]:
    words = line.split()
    address, port = _split_hostport(words[4])
    return (*address_key(address), port)


def _split_hostport(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host.strip("[]"), int(port)


def _trim(lines: list[str]) -> list[str]:
    while lines and not lines[-1]:
        lines = lines[:-1]
    return lines
