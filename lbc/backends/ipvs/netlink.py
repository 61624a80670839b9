"""IPVS operations -> pyroute2 requests, and performing them in a network namespace.

This module imports pyroute2 (lazily, inside functions); `render` never does.

    >>> from lbc.backends.ipvs.ops import AddDestination
    >>> from lbc.ir.nodes import Proto
    >>> op = AddDestination(Proto.TCP, "10.0.1.175", 80, "10.244.1.7", 9376, 1)
    >>> [(r.socket, r.method, r.command) for r in requests(op)]
    [('ipvs', 'dest', 'add')]

Facts about pyroute2 (0.9) this module depends on, each pinned by a test:
- `IPVSDest` defaults to fwd_method 3 (direct routing); NAT (masquerading) is 0.
- the command "update" is sent as IPVS_CMD_DEL_*: it deletes. Changes use "set".
- an IPv6 service needs IPVS_SVC_ATTR_NETMASK = 128 as a host-order u32, which
  pyroute2 encodes only as an IPv4 address; it sets no netmask for IPv6 at all
  and the kernel answers EINVAL.
"""

from __future__ import annotations

import errno
import os
import socket
import struct
from collections.abc import Iterator, Mapping
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lbc.backends.ipvs.ops import (
    PROTO_NUMBER,
    AddAddress,
    AddDestination,
    AddService,
    EnsureDummy,
    LoadRules,
    Operation,
    SetSysctl,
)
from lbc.errors import ApplyError
from lbc.ir.nodes import Proto

FWD_MASQ = 0  # IP_VS_CONN_F_MASQ: NAT, what `ipvsadm -m` asks for
SVC_F_PERSISTENT = 0x1  # IP_VS_SVC_F_PERSISTENT
IFA_F_NODAD = 0x02  # an IPv6 address usable at once, without duplicate detection
IPV6_NETMASK = socket.inet_ntoa(struct.pack("=I", 128))  # 128 as the kernel reads it
SYSCTL_ROOT = Path("/proc/sys")


@dataclass(frozen=True)
class Request:
    """One pyroute2 call: `getattr(<socket>, method)(command, **kwargs)`.

    pyroute2's `addr` wants an interface index, unknown until the link exists: an
    `ifname` in an `addr` request is replaced by that link's index when executed.
    """

    socket: str  # "iproute" (pyroute2.IPRoute) or "ipvs" (pyroute2.IPVS)
    method: str
    command: str
    kwargs: Mapping[str, Any] = field(default_factory=dict)


def service_spec(op: AddService | AddDestination) -> Any:
    """The `IPVSService` that names (and, for `AddService`, fully describes) a service."""
    from pyroute2 import IPVSService

    if isinstance(op, AddDestination):
        address, port = op.service_address, op.service_port
        fields: dict[str, Any] = {}
    else:
        address, port = op.address, op.port
        persistent = op.persistence is not None
        fields = {
            "sched_name": op.scheduler,
            "flags": {"flags": SVC_F_PERSISTENT if persistent else 0, "mask": 0xFFFFFFFF},
            "timeout": op.persistence or 0,
        }
    if ":" in address:
        fields["netmask"] = IPV6_NETMASK
    return IPVSService(addr=address, port=port, protocol=PROTO_NUMBER[op.proto], **fields)


def destination_spec(op: AddDestination) -> Any:
    """The `IPVSDest` of a real server: NAT forwarding and the endpoint's weight."""
    from pyroute2 import IPVSDest

    return IPVSDest(addr=op.address, port=op.port, fwd_method=FWD_MASQ, weight=op.weight)


def requests(op: Operation) -> tuple[Request, ...]:
    """The pyroute2 calls that perform `op` (none for sysctls and nftables)."""
    if isinstance(op, EnsureDummy):
        return (
            Request("iproute", "link", "add", {"ifname": op.name, "kind": "dummy"}),
            Request("iproute", "link", "set", {"ifname": op.name, "state": "down"}),
        )
    if isinstance(op, AddAddress):
        kwargs: dict[str, Any] = {
            "ifname": op.link,
            "address": op.address,
            "prefixlen": op.prefixlen,
        }
        if op.family == 6:
            kwargs["flags"] = IFA_F_NODAD
        return (Request("iproute", "addr", "add", kwargs),)
    if isinstance(op, AddService):
        return (Request("ipvs", "service", "add", {"service": service_spec(op)}),)
    if isinstance(op, AddDestination):
        return (
            Request(
                "ipvs",
                "dest",
                "add",
                {"service": service_spec(op), "dest": destination_spec(op)},
            ),
        )
    return ()


def change_request(op: AddService | AddDestination) -> Request:
    """The call that changes an existing service or real server to `op` ("set")."""
    (request,) = requests(op)
    return Request(request.socket, request.method, "set", request.kwargs)


def removal_request(op: AddService | AddDestination) -> Request:
    """The call that deletes the service or real server `op` describes ("del")."""
    (request,) = requests(op)
    return Request(request.socket, request.method, "del", request.kwargs)


def proto_of(number: int) -> Proto:
    """The IR protocol of an IP protocol number."""
    return next(p for p, n in PROTO_NUMBER.items() if n == number)


@contextmanager
def network_namespace(name: str | None) -> Iterator[None]:
    """Run the body in the named network namespace (`ip netns` name), then come back."""
    if name is None:
        yield
        return
    from pyroute2 import netns

    saved = os.open("/proc/self/ns/net", os.O_RDONLY)
    try:
        netns.setns(name, flags=0)
        try:
            yield
        finally:
            netns.setns(saved, flags=0)
    finally:
        os.close(saved)


def execute(ops: tuple[Operation, ...], netns: str | None = None) -> None:
    """Perform `ops` in order, in `netns` (default: the current namespace).

    Meant for a namespace lbc has not configured yet: only the dummy interface may
    exist already. Raises `ApplyError` naming the operation's command-line equivalent.
    """
    from pyroute2.netlink.exceptions import NetlinkError

    with network_namespace(netns), _Sockets() as sockets:
        for op in ops:
            try:
                if isinstance(op, SetSysctl):
                    set_sysctl(op)
                elif isinstance(op, LoadRules):
                    load_rules(op)
                for r in requests(op):
                    kwargs = dict(r.kwargs)
                    if r.method == "addr" and "ifname" in kwargs:
                        ifname = kwargs.pop("ifname")
                        found = sockets.get("iproute").link_lookup(ifname=ifname)
                        if not found:
                            raise ApplyError(f"{op.describe()} failed: no interface {ifname}")
                        kwargs["index"] = found[0]
                    try:
                        getattr(sockets.get(r.socket), r.method)(r.command, **kwargs)
                    except NetlinkError as exc:
                        exists = exc.code == errno.EEXIST
                        if not (exists and isinstance(op, EnsureDummy) and r.command == "add"):
                            raise
            except (NetlinkError, OSError, ValueError) as exc:
                raise ApplyError(f"{op.describe()} failed: {exc}") from exc


class _Sockets(ExitStack):
    """pyroute2 sockets opened on first use (IPVS only where a request needs it)."""

    def __init__(self) -> None:
        super().__init__()
        self.open: dict[str, Any] = {}

    def get(self, kind: str) -> Any:
        if kind not in self.open:
            from pyroute2 import IPVS, IPRoute

            self.open[kind] = self.enter_context(IPRoute() if kind == "iproute" else IPVS())
        return self.open[kind]


def set_sysctl(op: SetSysctl) -> None:
    """Write a sysctl of the current network namespace through /proc/sys."""
    (SYSCTL_ROOT / op.key.replace(".", "/")).write_text(op.value + "\n")


def load_rules(op: LoadRules) -> None:
    """Replace the helper table with libnftables, in one transaction."""
    from nftables import Nftables

    nft = Nftables()
    rc, _, error = nft.cmd(op.script())
    if rc != 0:
        raise ApplyError(f"{op.describe()} failed: {error.strip()}")
