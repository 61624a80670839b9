"""IPVS operations -> pyroute2 requests, and performing them in a network namespace.

This module imports pyroute2 (lazily, inside functions); `render` never does. It
also holds what the kernel adapter (`lbc.backends.ipvs.kernel`) reads and writes:
`Live`, the raw state of one namespace, the single writes (`Step`) a commit is made
of, each with its command-line equivalent, and `Pyroute2Dataplane`, which performs
them.

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
import ipaddress
import socket
import struct
from collections.abc import Callable, Iterator, Mapping
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lbc.apply.netns import NamespaceError, inside
from lbc.backends.ipvs.names import LINK, SYSCTLS, TABLE, TABLE_FAMILY
from lbc.backends.ipvs.ops import (
    PROTO_NUMBER,
    SVC_FLAGS,
    AddAddress,
    AddDestination,
    AddService,
    EnsureDummy,
    LoadRules,
    Operation,
    SetSysctl,
)
from lbc.errors import ApplyError
from lbc.ir.names import hostport
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
        fields: dict[str, Any] = {"netmask": IPV6_NETMASK} if ":" in address else {}
    else:
        address, port = op.address, op.port
        persistent = SVC_F_PERSISTENT if op.persistence is not None else 0
        fields = {
            "sched_name": op.scheduler,
            "flags": {"flags": persistent | op.flags, "mask": 0xFFFFFFFF},
            "timeout": op.persistence or 0,
            "netmask": netmask_attr(op.family, op.netmask),
        }
    return IPVSService(addr=address, port=port, protocol=PROTO_NUMBER[op.proto], **fields)


def netmask_attr(family: int, prefix: int | None) -> str:
    """IPVS_SVC_ATTR_NETMASK as pyroute2 encodes it (an IPv4 address): a mask in network
    order for IPv4, the prefix length as a host-order u32 for IPv6."""
    if family == 6:
        return IPV6_NETMASK if prefix is None else socket.inet_ntoa(struct.pack("=I", prefix))
    bits = 32 if prefix is None else prefix
    return str(ipaddress.IPv4Address((0xFFFFFFFF << (32 - bits)) & 0xFFFFFFFF))


def netmask_of(family: int, attr: str | None) -> int | None:
    """The prefix length in an IPVS_SVC_ATTR_NETMASK read back (None: the address alone)."""
    if attr is None:
        return None
    if family == 6:
        prefix = int(struct.unpack("=I", socket.inet_aton(attr))[0])
    else:
        prefix = ipaddress.IPv4Network(f"0.0.0.0/{attr}").prefixlen
    return None if prefix == (128 if family == 6 else 32) else prefix


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


def execute(ops: tuple[Operation, ...], netns: str | None = None) -> None:
    """Perform `ops` in order, in `netns` (default: the current namespace).

    Meant for a namespace lbc has not configured yet: only the dummy interface may
    exist already. Raises `ApplyError` naming the operation's command-line equivalent.
    """
    from pyroute2.netlink.exceptions import NetlinkError

    with inside(netns), _Sockets() as sockets:
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


# --- the kernel adapter's view: records read back, and single writes ------------------
FWD_FLAGS = {FWD_MASQ: "-m", 2: "-i", 3: "-g"}  # ipvsadm's forwarding options
SVC_F_HASHED = 0x2  # set by the kernel on every service; not configuration
IFF_UP = 0x1


@dataclass(frozen=True, slots=True)
class Dest:
    """A real server as the kernel holds it; connection counts are not configuration."""

    address: str
    port: int
    weight: int
    fwd_method: int = FWD_MASQ
    upper: int = 0  # upper connection threshold (ipvsadm -x)
    lower: int = 0  # lower connection threshold (ipvsadm -y)
    active: int = field(default=0, compare=False)  # ActiveConn
    inactive: int = field(default=0, compare=False)  # InActConn

    def line(self, service: AddService) -> str:
        """`-a -t 10.0.1.175:80 -r 10.244.1.7:9376 -m -w 1`, as `ipvsadm -S -n` prints it
        (connection thresholds, which it leaves out, as `-x UPPER -y LOWER` when set)."""
        fwd = FWD_FLAGS.get(self.fwd_method, f"--fwd-method={self.fwd_method}")
        where = hostport(self.address, self.port)
        out = f"-a {service.virtual()} -r {where} {fwd} -w {self.weight}"
        if self.upper or self.lower:
            out += f" -x {self.upper} -y {self.lower}"
        return out


@dataclass(frozen=True, slots=True)
class Link:
    """The interface lbc-ipvs0 as the kernel holds it."""

    kind: str
    up: bool

    def line(self, name: str) -> str:
        """`lbc-ipvs0 dummy down`, like `EnsureDummy.line()`."""
        return f"{name} {self.kind} {'up' if self.up else 'down'}"


@dataclass(frozen=True, slots=True)
class Live:
    """Everything the IPVS adapter reads from one network namespace, unfiltered.

    `services` holds every IPVS service with an address (fwmark services are never
    lbc's and are not read); deciding which are lbc's is the adapter's business.
    """

    link: Link | None
    addresses: tuple[str, ...]  # of the link: `10.0.1.175/32`
    services: tuple[tuple[AddService, tuple[Dest, ...]], ...]
    rules: str | None  # `nft list table inet lbc-ipvs`, None when there is no table
    sysctls: Mapping[str, str | None]


@dataclass(frozen=True, slots=True)
class LinkStep:
    """Create, delete, or set up/down the dummy interface."""

    action: str  # "add", "del", "up", "down"
    name: str

    def describe(self) -> str:
        """The command-line equivalent."""
        if self.action == "add":
            return f"ip link add {self.name} type dummy"
        if self.action == "del":
            return f"ip link del {self.name}"
        return f"ip link set {self.name} {self.action}"


@dataclass(frozen=True, slots=True)
class AddressStep:
    """Add or delete one host address of the dummy interface."""

    action: str  # "add", "del"
    link: str
    address: str  # `10.0.1.175/32`

    def describe(self) -> str:
        """The command-line equivalent (an IPv6 address is added without DAD)."""
        if ":" in self.address:
            nodad = " nodad" if self.action == "add" else ""
            return f"ip -6 addr {self.action} {self.address} dev {self.link}{nodad}"
        return f"ip addr {self.action} {self.address} dev {self.link}"


_SERVICE_FLAG = {"add": "-A", "set": "-E", "del": "-D"}
_DEST_FLAG = {"add": "-a", "set": "-e", "del": "-d"}


@dataclass(frozen=True, slots=True)
class ServiceStep:
    """Add, change ("set", never pyroute2's "update") or delete a virtual service."""

    action: str  # "add", "set", "del"
    service: AddService

    def describe(self) -> str:
        """The command-line equivalent."""
        if self.action == "del":
            return f"ipvsadm -D {self.service.virtual()}"
        return f"ipvsadm {_SERVICE_FLAG[self.action]}{self.service.line()[2:]}"


@dataclass(frozen=True, slots=True)
class DestStep:
    """Add, change or delete one real server of a virtual service."""

    action: str  # "add", "set", "del"
    service: AddService
    dest: Dest

    def describe(self) -> str:
        """The command-line equivalent."""
        if self.action == "del":
            where = hostport(self.dest.address, self.dest.port)
            return f"ipvsadm -d {self.service.virtual()} -r {where}"
        return f"ipvsadm {_DEST_FLAG[self.action]}{self.dest.line(self.service)[2:]}"


@dataclass(frozen=True, slots=True)
class SysctlStep:
    """Write one kernel parameter of the namespace."""

    key: str
    value: str

    def describe(self) -> str:
        """The command-line equivalent."""
        return f"sysctl -w {self.key}={self.value}"


@dataclass(frozen=True, slots=True)
class RulesStep:
    """Replace, change or delete the helper table in one nftables transaction."""

    script: str
    verb: str  # "replacing" (the whole table), "changing" (elements and chains) or "deleting"

    def describe(self) -> str:
        """The command-line equivalent."""
        return f"nft -f FILE ({self.verb} table {TABLE_FAMILY} {TABLE} in one transaction)"


Step = LinkStep | AddressStep | ServiceStep | DestStep | SysctlStep | RulesStep


def dest_spec(dest: Dest) -> Any:
    """The `IPVSDest` of a real server with every field the kernel keeps."""
    from pyroute2 import IPVSDest

    return IPVSDest(
        addr=dest.address,
        port=dest.port,
        fwd_method=dest.fwd_method,
        weight=dest.weight,
        u_thresh=dest.upper,
        l_thresh=dest.lower,
    )


def step_request(step: LinkStep | AddressStep | ServiceStep | DestStep) -> Request:
    """The pyroute2 call of one netlink step (an `ifname` becomes an index when run)."""
    if isinstance(step, LinkStep):
        if step.action == "add":
            return Request("iproute", "link", "add", {"ifname": step.name, "kind": "dummy"})
        if step.action == "del":
            return Request("iproute", "link", "del", {"ifname": step.name})
        return Request("iproute", "link", "set", {"ifname": step.name, "state": step.action})
    if isinstance(step, AddressStep):
        address, _, prefix = step.address.partition("/")
        kwargs: dict[str, Any] = {"ifname": step.link, "address": address}
        kwargs["prefixlen"] = int(prefix) if prefix else (128 if ":" in address else 32)
        if ":" in address and step.action == "add":
            kwargs["flags"] = IFA_F_NODAD
        return Request("iproute", "addr", step.action, kwargs)
    service = {"service": service_spec(step.service)}
    if isinstance(step, ServiceStep):
        return Request("ipvs", "service", step.action, service)
    return Request("ipvs", "dest", step.action, {**service, "dest": dest_spec(step.dest)})


class Pyroute2Dataplane:
    """Reads and writes lbc's IPVS objects through pyroute2 and libnftables, in `netns`."""

    def __init__(self, netns: str | None = None) -> None:
        self.netns = netns

    def read(self) -> Live:
        """Equivalent to `ip -d addr show lbc-ipvs0`, `ipvsadm -S -n` (with stats),
        `nft list table inet lbc-ipvs` and `sysctl net.ipv4.vs.conntrack`."""
        from pyroute2.netlink.exceptions import NetlinkError

        with inside(self.netns), _Sockets() as sockets:
            try:
                link, addresses = _read_link(sockets.get("iproute"))
            except NetlinkError as exc:
                raise ApplyError(f"cannot read interface {LINK}: {exc}") from exc
            try:
                ipvs = sockets.get("ipvs")
            except (NetlinkError, OSError) as exc:
                raise ApplyError(
                    f"IPVS is not available in this kernel (`modprobe ip_vs`): {exc}"
                ) from exc
            try:
                services = _read_services(ipvs)
            except NetlinkError as exc:
                raise ApplyError(f"cannot read IPVS services: {exc}") from exc
            rules = _list_rules()
            sysctls = {key: _read_sysctl(key) for key, _ in SYSCTLS}
        return Live(link, addresses, services, rules, sysctls)

    @contextmanager
    def writer(self) -> Iterator[Callable[[Step], None]]:
        """Inside the namespace, with sockets open: a function performing one step.

        It raises `ApplyError` carrying the kernel's answer.
        """
        from pyroute2.netlink.exceptions import NetlinkError

        with inside(self.netns), _Sockets() as sockets:

            def perform(step: Step) -> None:
                try:
                    _perform(sockets, step)
                except (NetlinkError, OSError, ValueError) as exc:
                    raise ApplyError(str(exc)) from exc

            yield perform


def _perform(sockets: _Sockets, step: Step) -> None:
    if isinstance(step, SysctlStep):
        set_sysctl(SetSysctl(step.key, step.value))
        return
    if isinstance(step, RulesStep):
        _nft(step.script)
        return
    request = step_request(step)
    kwargs = dict(request.kwargs)
    if request.socket == "iproute" and not (request.method == "link" and request.command == "add"):
        ifname = kwargs.pop("ifname")
        found = sockets.get("iproute").link_lookup(ifname=ifname)
        if not found:
            raise ApplyError(f"no interface {ifname}")
        kwargs["index"] = found[0]
    getattr(sockets.get(request.socket), request.method)(request.command, **kwargs)


def _read_link(iproute: Any) -> tuple[Link | None, tuple[str, ...]]:
    found = iproute.link_lookup(ifname=LINK)
    if not found:
        return None, ()
    (msg,) = iproute.get_links(found[0])
    info = msg.get_attr("IFLA_LINKINFO")
    kind = (info.get_attr("IFLA_INFO_KIND") if info is not None else None) or "none"
    addresses = []
    for a in iproute.get_addr(index=found[0]):
        local = a.get_attr("IFA_LOCAL") or a.get_attr("IFA_ADDRESS")
        if a["family"] == socket.AF_INET6 and ipaddress.ip_address(local).is_link_local:
            continue  # the kernel's own, should the link ever come up
        addresses.append(f"{ipaddress.ip_address(local)}/{a['prefixlen']}")
    return Link(str(kind), bool(msg["flags"] & IFF_UP)), tuple(addresses)


def _read_services(ipvs: Any) -> tuple[tuple[AddService, tuple[Dest, ...]], ...]:
    from pyroute2 import IPVSService

    known = set(PROTO_NUMBER.values())
    out = []
    for msg in ipvs.service("dump"):
        svc = msg.get_attr("IPVS_CMD_ATTR_SERVICE")
        number = svc.get_attr("IPVS_SVC_ATTR_PROTOCOL")
        if svc.get_attr("IPVS_SVC_ATTR_FWMARK") or number not in known:
            continue
        address = str(ipaddress.ip_address(svc.get_attr("IPVS_SVC_ATTR_ADDR")))
        port = svc.get_attr("IPVS_SVC_ATTR_PORT")
        flags = svc.get_attr("IPVS_SVC_ATTR_FLAGS")["flags"] & ~SVC_F_HASHED
        persistence = svc.get_attr("IPVS_SVC_ATTR_TIMEOUT") if flags & SVC_F_PERSISTENT else None
        family = 6 if ":" in address else 4
        service = AddService(
            proto_of(number),
            address,
            port,
            svc.get_attr("IPVS_SVC_ATTR_SCHED_NAME"),
            persistence,
            flags & SVC_FLAGS,  # one-packet and scheduler flags: drift unless lbc's (none)
            netmask_of(family, svc.get_attr("IPVS_SVC_ATTR_NETMASK")),
        )
        key = IPVSService(addr=address, port=port, protocol=number)
        dests = []
        for d in (m.get_attr("IPVS_CMD_ATTR_DEST") for m in ipvs.dest("dump", service=key)):
            dests.append(
                Dest(
                    address=str(ipaddress.ip_address(d.get_attr("IPVS_DEST_ATTR_ADDR"))),
                    port=d.get_attr("IPVS_DEST_ATTR_PORT"),
                    weight=d.get_attr("IPVS_DEST_ATTR_WEIGHT"),
                    fwd_method=d.get_attr("IPVS_DEST_ATTR_FWD_METHOD"),
                    upper=d.get_attr("IPVS_DEST_ATTR_U_THRESH") or 0,
                    lower=d.get_attr("IPVS_DEST_ATTR_L_THRESH") or 0,
                    active=d.get_attr("IPVS_DEST_ATTR_ACTIVE_CONNS") or 0,
                    inactive=d.get_attr("IPVS_DEST_ATTR_INACT_CONNS") or 0,
                )
            )
        out.append((service, tuple(dests)))
    return tuple(out)


def _list_rules() -> str | None:
    try:
        return _nft(f"list table {TABLE_FAMILY} {TABLE}")
    except NamespaceError:
        raise
    except ApplyError as exc:
        if "No such file or directory" in str(exc):
            return None
        raise


def _nft(script: str) -> str:
    """Run an nft script with libnftables in the current namespace; its output."""
    try:
        from nftables import Nftables
    except (ImportError, OSError) as exc:
        raise ApplyError(
            f"the nftables binding is not usable ({exc}); install Debian's libnftables1"
        ) from exc
    rc, out, error = Nftables().cmd(script)
    if rc != 0:
        raise ApplyError(f"nftables refused: {error.strip()}")
    return str(out)


def _read_sysctl(key: str) -> str | None:
    try:
        return (SYSCTL_ROOT / key.replace(".", "/")).read_text().strip()
    except OSError:
        return None
