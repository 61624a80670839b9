"""The kernel operations an IPVS dataplane is made of, as plain data.

Each operation is a frozen dataclass that knows its line in the canonical text
(`line`), its command-line equivalent (`describe`) and its JSON form (`to_json`).
The conversion to pyroute2 requests lives in `lbc.backends.ipvs.netlink`, so that
rendering never imports pyroute2.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar

from lbc.ir.names import hostport
from lbc.ir.nodes import Proto

# ipvsadm's option for a virtual service of each protocol, as `ipvsadm -S` prints it.
IPVSADM_PROTO = {Proto.TCP: "-t", Proto.UDP: "-u", Proto.SCTP: "--sctp-service"}
# IP protocol numbers (IPPROTO_*), what IPVS is told and what ipvsadm sorts by.
PROTO_NUMBER = {Proto.TCP: 6, Proto.UDP: 17, Proto.SCTP: 132}
# Service flags besides persistence, as the kernel keeps them (IP_VS_SVC_F_*): one-packet
# scheduling (`ipvsadm -o`) and the three scheduler flags (`ipvsadm -b`).
SVC_F_ONEPACKET = 0x4
SVC_F_SCHED = (0x8, 0x10, 0x20)
SVC_FLAGS = SVC_F_ONEPACKET | sum(SVC_F_SCHED)
# ipvsadm's names of the scheduler flags, by scheduler (others: flag-1, flag-2, flag-3).
_SCHED_FLAG_NAMES = {
    "sh": ("sh-fallback", "sh-port", "flag-3"),
    "mh": ("mh-fallback", "mh-port", "flag-3"),
}
_SCHED_FLAG_BITS = {
    name: bit
    for names in (("flag-1", "flag-2", "flag-3"), *_SCHED_FLAG_NAMES.values())
    for bit, name in zip(SVC_F_SCHED, names, strict=True)
}
_KERNEL_ONLY = {"kernel_only": True}  # fields lbc never renders (not in the JSON form)


def family_of(address: str) -> int:
    """4 or 6, from the textual form of an address."""
    return 6 if ":" in address else 4


@dataclass(frozen=True, slots=True)
class EnsureDummy:
    """Create the dummy interface that holds the virtual addresses, and keep it down."""

    op: ClassVar[str] = "ensure-dummy"
    name: str

    def line(self) -> str:
        """`lbc-ipvs0 dummy down`."""
        return f"{self.name} dummy down"

    def describe(self) -> str:
        """The command-line equivalent."""
        return (
            f"Equivalent to `ip link add {self.name} type dummy` (unless it exists), "
            f"then `ip link set {self.name} down`"
        )

    def to_json(self) -> dict[str, Any]:
        """The operation as a JSON object."""
        return _json(self)


@dataclass(frozen=True, slots=True)
class AddAddress:
    """Bind one virtual address to the dummy interface, as a host address."""

    op: ClassVar[str] = "add-address"
    link: str
    address: str

    @property
    def family(self) -> int:
        """4 or 6."""
        return family_of(self.address)

    @property
    def prefixlen(self) -> int:
        """32 or 128: the address alone, never a subnet."""
        return 32 if self.family == 4 else 128

    def line(self) -> str:
        """`10.0.1.175/32`."""
        return f"{self.address}/{self.prefixlen}"

    def describe(self) -> str:
        """The command-line equivalent (IPv6 skips duplicate address detection)."""
        if self.family == 4:
            return f"Equivalent to `ip addr add {self.line()} dev {self.link}`"
        return f"Equivalent to `ip -6 addr add {self.line()} dev {self.link} nodad`"

    def to_json(self) -> dict[str, Any]:
        """The operation as a JSON object."""
        return _json(self)


@dataclass(frozen=True, slots=True)
class AddService:
    """Add an IPVS virtual service: address, port, protocol, scheduler, persistence."""

    op: ClassVar[str] = "add-service"
    proto: Proto
    address: str
    port: int
    scheduler: str
    persistence: int | None  # seconds a client sticks to its real server, or None
    # What only another tool sets, read back so that it shows as drift: the flags of
    # `SVC_FLAGS` and the persistence netmask as a prefix length (None: the address
    # alone, /32 or /128, what lbc creates).
    flags: int = field(default=0, metadata=_KERNEL_ONLY)
    netmask: int | None = field(default=None, metadata=_KERNEL_ONLY)

    @property
    def family(self) -> int:
        """4 or 6."""
        return family_of(self.address)

    def virtual(self) -> str:
        """`-t 10.0.1.175:80`, how ipvsadm names the service."""
        return f"{IPVSADM_PROTO[self.proto]} {hostport(self.address, self.port)}"

    def line(self) -> str:
        """`-A -t 10.0.1.175:80 -s rr`, as `ipvsadm -S -n` prints it (a netmask other
        than the address alone as `-M`, one-packet scheduling as `-o`, scheduler flags
        as `-b`)."""
        out = f"-A {self.virtual()} -s {self.scheduler}"
        if self.persistence is not None:
            out += f" -p {self.persistence}"
        if self.netmask is not None:
            out += f" -M {netmask_text(self.family, self.netmask)}"
        if self.flags & SVC_F_ONEPACKET:
            out += " -o"
        names = _SCHED_FLAG_NAMES.get(self.scheduler, ("flag-1", "flag-2", "flag-3"))
        chosen = [name for bit, name in zip(SVC_F_SCHED, names, strict=True) if self.flags & bit]
        if chosen:
            out += f" -b {','.join(chosen)}"
        return out

    @staticmethod
    def options(words: list[str]) -> tuple[int, int | None]:
        """The flags and netmask of `line()`'s words after the scheduler (its inverse)."""
        flags, netmask = 0, None
        for i, word in enumerate(words):
            if word == "-o":
                flags |= SVC_F_ONEPACKET
            elif word == "-M":
                netmask = netmask_prefix(words[i + 1])
            elif word == "-b":
                flags |= sum(_SCHED_FLAG_BITS[name] for name in words[i + 1].split(","))
        return flags, netmask

    def describe(self) -> str:
        """The command-line equivalent."""
        return f"Equivalent to `ipvsadm {self.line()}`"

    def to_json(self) -> dict[str, Any]:
        """The operation as a JSON object."""
        return _json(self)


@dataclass(frozen=True, slots=True)
class AddDestination:
    """Add a real server to a virtual service, reached by NAT (masquerading), weighted."""

    op: ClassVar[str] = "add-destination"
    proto: Proto
    service_address: str
    service_port: int
    address: str
    port: int
    weight: int

    @property
    def family(self) -> int:
        """4 or 6."""
        return family_of(self.address)

    def virtual(self) -> str:
        """The service this destination belongs to, as ipvsadm names it."""
        return f"{IPVSADM_PROTO[self.proto]} {hostport(self.service_address, self.service_port)}"

    def line(self, virtual: str | None = None) -> str:
        """`-a -t 10.0.1.175:80 -r 10.244.1.7:9376 -m -w 1`, as `ipvsadm -S -n` prints it.

        `virtual`: this destination's `virtual()`, when the caller has it already.
        """
        mine = self.virtual() if virtual is None else virtual
        return f"-a {mine} -r {hostport(self.address, self.port)} -m -w {self.weight}"

    def describe(self) -> str:
        """The command-line equivalent (`-m`: masquerading, IPVS's NAT forwarding)."""
        return f"Equivalent to `ipvsadm {self.line()}`"

    def to_json(self) -> dict[str, Any]:
        """The operation as a JSON object."""
        return _json(self)


@dataclass(frozen=True, slots=True)
class SetSysctl:
    """Set a kernel parameter of the node's network namespace."""

    op: ClassVar[str] = "set-sysctl"
    key: str
    value: str

    def line(self) -> str:
        """`net.ipv4.vs.conntrack=1`."""
        return f"{self.key}={self.value}"

    def describe(self) -> str:
        """The command-line equivalent."""
        return f"Equivalent to `sysctl -w {self.line()}`"

    def to_json(self) -> dict[str, Any]:
        """The operation as a JSON object."""
        return _json(self)


@dataclass(frozen=True, slots=True)
class LoadRules:
    """Replace lbc's nftables table of helper rules in one transaction."""

    op: ClassVar[str] = "load-rules"
    family: str
    table: str
    text: str  # the table definition, `table inet lbc-ipvs { ... }`

    def script(self) -> str:
        """The `nft -f` script: create-then-delete empties the table, all in one batch."""
        head = f"{self.family} {self.table}"
        return f"add table {head}\ndelete table {head}\n{self.text}"

    def describe(self) -> str:
        """The command-line equivalent."""
        return (
            f"Equivalent to `nft -f FILE`, FILE holding `add table {self.family} "
            f"{self.table}`, `delete table {self.family} {self.table}` and the table"
        )

    def to_json(self) -> dict[str, Any]:
        """The operation as a JSON object."""
        return _json(self)


Operation = EnsureDummy | AddAddress | AddService | AddDestination | SetSysctl | LoadRules


# Field names of each operation, for `_json`: every field is a str, int, None or Proto,
# so the dict needs no deep copy (what `dataclasses.asdict` would make).
_FIELDS = {
    cls: tuple(f.name for f in fields(cls) if not f.metadata.get("kernel_only"))
    for cls in (EnsureDummy, AddAddress, AddService, AddDestination, SetSysctl, LoadRules)
}


def netmask_text(family: int, prefix: int) -> str:
    """ipvsadm's `-M`: a dotted mask for IPv4, the prefix length for IPv6."""
    if family == 6:
        return str(prefix)
    return str(ipaddress.IPv4Address((0xFFFFFFFF << (32 - prefix)) & 0xFFFFFFFF))


def netmask_prefix(text: str) -> int:
    """The prefix length of `netmask_text`'s output."""
    if "." not in text:
        return int(text)
    return ipaddress.IPv4Network(f"0.0.0.0/{text}").prefixlen


def _json(op: Operation) -> dict[str, Any]:
    out: dict[str, Any] = {"op": op.op}
    for name in _FIELDS[type(op)]:
        out[name] = getattr(op, name)
    out["command"] = op.describe()
    return out
