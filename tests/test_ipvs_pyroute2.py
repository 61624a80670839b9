"""Every IPVS operation of every golden case, encoded by pyroute2 without a kernel.

pyroute2 builds the generic-netlink message; the test captures it where pyroute2
would send it, encodes it to bytes, decodes the bytes again and checks what the
kernel would read: address, port, protocol number, scheduler, persistence flags
and timeout, netmask, NAT forwarding (fwd_method 0) and weight.
"""

from __future__ import annotations

import asyncio
import dataclasses
import socket
import struct
from typing import Any

import pytest
from pyroute2.ipvs import AsyncIPVS
from pyroute2.netlink.generic import ipvs as genl

import lbc
from lbc.backends.ipvs import netlink
from lbc.backends.ipvs.ops import PROTO_NUMBER, AddAddress, AddDestination, AddService, EnsureDummy
from lbc.ir.nodes import Proto
from tests.golden import GOLDEN

CASES = sorted(p.parent.name for p in GOLDEN.glob("*/ipvs.txt"))


class _Capture:
    """Stands in for the socket: keeps the message pyroute2 would send."""

    def __init__(self) -> None:
        self.sent: list[tuple[Any, int]] = []

    async def _do_request(self, msg: Any, msg_flags: int = 0, **_: Any) -> list[Any]:
        self.sent.append((msg, msg_flags))
        return []


def wire(request: netlink.Request) -> Any:
    """The decoded bytes of the message pyroute2 builds for an IPVS request."""
    capture = _Capture()
    method = getattr(AsyncIPVS, request.method)
    asyncio.run(method(capture, request.command, **request.kwargs))
    ((msg, _),) = capture.sent
    msg.encode()
    decoded = genl.ipvsmsg(bytes(msg.data))
    decoded.decode()
    return decoded


def attrs(nla: Any) -> dict[str, Any]:
    return dict(nla["attrs"])


def netmask_value(text: str) -> int:
    """The u32 the kernel reads from IPVS_SVC_ATTR_NETMASK (native byte order)."""
    return int(struct.unpack("=I", socket.inet_aton(text))[0])


def check_service_key(svc: dict[str, Any], proto: Proto, address: str, port: int) -> None:
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    assert svc["IPVS_SVC_ATTR_AF"] == family
    assert svc["IPVS_SVC_ATTR_ADDR"] == address
    assert svc["IPVS_SVC_ATTR_PORT"] == port
    assert svc["IPVS_SVC_ATTR_PROTOCOL"] == PROTO_NUMBER[proto]


def operations(case: str) -> tuple[Any, ...]:
    cluster = lbc.load(GOLDEN / case / "cluster.toml")
    return tuple(lbc.compile(cluster, backend="ipvs").data)


@pytest.mark.parametrize("case", CASES)
def test_every_operation_encodes_to_what_the_kernel_needs(case: str) -> None:
    ops = operations(case)
    checked = 0
    for op in ops:
        if isinstance(op, AddService):
            (request,) = netlink.requests(op)
            msg = wire(request)
            assert msg["cmd"] == genl.IPVS_CMD_NEW_SERVICE
            svc = attrs(msg.get_attr("IPVS_CMD_ATTR_SERVICE"))
            check_service_key(svc, op.proto, op.address, op.port)
            assert svc["IPVS_SVC_ATTR_SCHED_NAME"] == op.scheduler
            persistent = op.persistence is not None
            assert svc["IPVS_SVC_ATTR_FLAGS"] == {"flags": int(persistent), "mask": 0xFFFFFFFF}
            assert svc["IPVS_SVC_ATTR_TIMEOUT"] == (op.persistence or 0)
            mask = netmask_value(svc["IPVS_SVC_ATTR_NETMASK"])
            assert mask == (128 if op.family == 6 else 0xFFFFFFFF)
            checked += 1
        elif isinstance(op, AddDestination):
            (request,) = netlink.requests(op)
            msg = wire(request)
            assert msg["cmd"] == genl.IPVS_CMD_NEW_DEST
            svc = attrs(msg.get_attr("IPVS_CMD_ATTR_SERVICE"))
            check_service_key(svc, op.proto, op.service_address, op.service_port)
            dest = attrs(msg.get_attr("IPVS_CMD_ATTR_DEST"))
            family = socket.AF_INET6 if op.family == 6 else socket.AF_INET
            assert dest["IPVS_DEST_ATTR_ADDR_FAMILY"] == family
            assert dest["IPVS_DEST_ATTR_ADDR"] == op.address
            assert dest["IPVS_DEST_ATTR_PORT"] == op.port
            assert dest["IPVS_DEST_ATTR_FWD_METHOD"] == 0  # masquerading, not pyroute2's 3
            assert dest["IPVS_DEST_ATTR_WEIGHT"] == op.weight
            checked += 1
        elif isinstance(op, AddAddress):
            (request,) = netlink.requests(op)
            assert (request.socket, request.method, request.command) == ("iproute", "addr", "add")
            assert request.kwargs["ifname"] == "lbc-ipvs0"
            assert request.kwargs["address"] == op.address
            assert request.kwargs["prefixlen"] == (128 if op.family == 6 else 32)
            assert request.kwargs.get("flags") == (netlink.IFA_F_NODAD if op.family == 6 else None)
            checked += 1
        elif isinstance(op, EnsureDummy):
            add, down = netlink.requests(op)
            assert (add.method, add.command, dict(add.kwargs)) == (
                "link",
                "add",
                {"ifname": "lbc-ipvs0", "kind": "dummy"},
            )
            assert (down.method, down.command, down.kwargs["state"]) == ("link", "set", "down")
            checked += 1
        else:
            assert netlink.requests(op) == ()
    assert checked == len(ops) - sum(1 for op in ops if not netlink.requests(op))


def test_the_cases_cover_persistence_ipv6_udp_sctp_and_weights() -> None:
    ops = [op for case in CASES for op in operations(case)]
    services = [op for op in ops if isinstance(op, AddService)]
    assert any(op.persistence for op in services)
    assert any(op.family == 6 for op in services)
    assert {op.proto for op in services} == set(Proto)
    assert {op.scheduler for op in services} >= {"rr", "wrr"}
    assert {op.weight for op in ops if isinstance(op, AddDestination)} >= {1, 2, 3}


def test_pyroute2_update_is_delete_so_changes_use_set() -> None:
    """pyroute2 maps "update" to IPVS_CMD_DEL_*; lbc's change requests say "set"."""
    service = AddService(Proto.TCP, "10.0.1.175", 80, "wrr", None)
    dest = AddDestination(Proto.TCP, "10.0.1.175", 80, "10.244.1.7", 9376, 3)
    for op, deleted, changed in (
        (service, genl.IPVS_CMD_DEL_SERVICE, genl.IPVS_CMD_SET_SERVICE),
        (dest, genl.IPVS_CMD_DEL_DEST, genl.IPVS_CMD_SET_DEST),
    ):
        (add,) = netlink.requests(op)
        update = netlink.Request(add.socket, add.method, "update", add.kwargs)
        assert wire(update)["cmd"] == deleted  # the pyroute2 trap, pinned
        change = netlink.change_request(op)
        assert change.command == "set"
        assert wire(change)["cmd"] == changed
        assert wire(netlink.removal_request(op))["cmd"] == deleted
    changed_dest = attrs(wire(netlink.change_request(dest)).get_attr("IPVS_CMD_ATTR_DEST"))
    assert changed_dest["IPVS_DEST_ATTR_WEIGHT"] == 3
    assert changed_dest["IPVS_DEST_ATTR_FWD_METHOD"] == 0


def test_pyroute2_defaults_that_lbc_overrides() -> None:
    """Without lbc's fields pyroute2 would ask for direct routing and no IPv6 netmask."""
    from pyroute2 import IPVSDest, IPVSService

    assert dict(IPVSDest(addr="10.244.1.7", port=9376))["fwd_method"] == 3
    assert "netmask" not in dict(IPVSService(addr="fd00::1", port=80, protocol=6))
    assert netmask_value(netlink.IPV6_NETMASK) == 128


class _Dump:
    """Stands in for `pyroute2.IPVS` in `_read_services`: dumps the given services."""

    def __init__(self, *services: Any) -> None:
        self.services = services

    def service(self, command: str) -> tuple[Any, ...]:
        assert command == "dump"
        return self.services

    def dest(self, command: str, service: Any) -> list[Any]:
        return []


def dumped(**fields: Any) -> Any:
    """A service as the kernel's dump carries it: encoded by pyroute2, decoded again."""
    from pyroute2 import IPVSService

    service = IPVSService(protocol=6, sched_name="rr", timeout=0, **fields)
    return wire(netlink.Request("ipvs", "service", "set", {"service": service}))


def test_service_flags_and_netmask_are_read_back_not_discarded() -> None:
    hashed = netlink.SVC_F_HASHED
    one_packet = dumped(addr="10.0.1.175", port=80, flags={"flags": 0x4 | hashed, "mask": 0})
    masked = dumped(
        addr="10.0.1.175", port=81, flags={"flags": 0x1, "mask": 0}, netmask="255.255.255.0"
    )
    v6 = dumped(
        addr="fd00::1",
        port=80,
        flags={"flags": 0x1 | 0x8 | hashed, "mask": 0},
        netmask=socket.inet_ntoa(struct.pack("=I", 64)),
    )
    read = [s for s, _ in netlink._read_services(_Dump(one_packet, masked, v6))]
    assert [s.line() for s in read] == [
        "-A -t 10.0.1.175:80 -s rr -o",  # ipvsadm -E -t 10.0.1.175:80 -s rr -o
        "-A -t 10.0.1.175:81 -s rr -p 0 -M 255.255.255.0",
        "-A -t [fd00::1]:80 -s rr -p 0 -M 64 -b flag-1",
    ]
    assert (read[0].flags, read[1].netmask, read[2].netmask) == (0x4, 24, 64)


@pytest.mark.parametrize("case", CASES)
def test_services_lbc_creates_read_back_as_rendered(case: str) -> None:
    """What lbc writes decodes to its own record: no flags, the address-alone netmask."""
    services = [op for op in operations(case) if isinstance(op, AddService)]
    messages = [wire(netlink.requests(op)[0]) for op in services]
    read = [s for s, _ in netlink._read_services(_Dump(*messages))]
    assert read == services
    changed = dataclasses.replace(
        services[0], flags=0x4, netmask=16 if services[0].family == 4 else 96
    )
    back = [s for s, _ in netlink._read_services(_Dump(wire(netlink.change_request(changed))))]
    assert back == [changed], "a service's flags and netmask are written as read"
