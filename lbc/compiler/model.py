"""The cluster.toml schema: pydantic models used only at the input boundary."""

from __future__ import annotations

import difflib
import ipaddress
import re
import socket
from typing import Annotated, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    WithJsonSchema,
)
from pydantic_core import PydanticCustomError

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

# RFC 1123 DNS label, as Kubernetes requires for namespaces and Service names. Keeping
# names this strict is also what makes them safe inside rule comments.
DNS_LABEL = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
PORT_NAME = r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?)?$"
# RFC 1123 DNS subdomain, as Kubernetes requires for node names.
DNS_SUBDOMAIN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
# A Kubernetes label value, as the topology.kubernetes.io/zone label holds.
LABEL_VALUE = r"^([A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?)?$"
PROTOCOLS = ("TCP", "UDP", "SCTP")

Port = Annotated[int, Field(ge=1, le=65535)]


def quote(text: str) -> str:
    """A config string as a message shows it: quoted, and cut short when long."""
    return repr(text if len(text) <= 40 else text[:37] + "...")


_LONG = 10**20  # integers from here on are shown cut short


def number(value: int, hexadecimal: bool = False) -> str:
    """A config integer as a message shows it: cut short when long, as `quote` does.

    A TOML hex, octal or binary literal may be thousands of digits long, and Python
    refuses to write an integer of more than 4300 decimal digits (`str()` raises), so
    a long one is shown by its leading digits and its length.
    """
    if -_LONG < value < _LONG:
        return f"{value:#x}" if hexadecimal else str(value)
    sign, value = ("-", -value) if value < 0 else ("", value)
    if hexadecimal:
        digits = (value.bit_length() + 3) // 4
        return f"{sign}{value >> 4 * (digits - 16):#x}...({digits} hex digits)"
    # Estimate the count of decimal digits from the bit length (a little low, never
    # high: 0.30102 < log10(2)), then correct it with exact comparisons.
    digits = int((value.bit_length() - 1) * 0.30102) + 1
    while value >= 10**digits:
        digits += 1
    return f"{sign}{value // 10 ** (digits - 16)}...({digits} digits)"


def _wrong_type(expected: str) -> PydanticCustomError:
    # One error instead of one per union member; load.py words it from `expected`.
    return PydanticCustomError("wrong_type", "expected {expected}", {"expected": expected})


def _zone_id(text: str, plain: str) -> ValueError:
    # `fe80::1%eth0` names an interface of one host; a rule cannot match on it, and
    # `fd00::1%eth0` would not even compare equal to `fd00::1` in duplicate checks.
    zone = text[text.index("%") :].partition("/")[0]
    return ValueError(
        f"{quote(text)}: an IPv6 zone id ({quote(zone)}) is not allowed here; write {plain!r}"
    )


def _address(value: object) -> object:
    # Strings only: pydantic would otherwise read an integer as an IPv4 address.
    if isinstance(value, ipaddress.IPv4Address | ipaddress.IPv6Address):
        if getattr(value, "scope_id", None) is not None:
            raise _zone_id(str(value), str(value).partition("%")[0])
        return value
    if not isinstance(value, str):
        raise _wrong_type("an IP address string")
    try:
        # A dotted quad, parsed in C (ip_address parses it in Python, octet by octet);
        # whatever inet_pton refuses goes through ip_address, which has the last word.
        return ipaddress.IPv4Address(socket.inet_pton(socket.AF_INET, value))
    except (OSError, ValueError):
        pass
    try:
        parsed = ipaddress.ip_address(value)
    except ValueError:
        pass
    else:
        if "%" in value:
            raise _zone_id(value, value.partition("%")[0])
        return parsed
    _, slash, prefix = value.partition("/")
    hint = ""
    if slash:
        try:
            ipaddress.ip_interface(value)
        except ValueError:
            pass
        else:
            if "%" in value:
                raise _zone_id(value, value.partition("%")[0])
            hint = f" (drop the '/{prefix}')"
    raise ValueError(f"{quote(value)} is not an IPv4 or IPv6 address{hint}")


def _network(value: object) -> object:
    if isinstance(value, ipaddress.IPv4Network | ipaddress.IPv6Network):
        if "%" in str(value):
            raise _zone_id(str(value), _unzoned(str(value)))
        return value
    if not isinstance(value, str):
        raise _wrong_type("a CIDR string")
    try:
        parsed = ipaddress.ip_network(value, strict=True)
    except ValueError:
        pass
    else:
        if "%" in value:
            raise _zone_id(value, _unzoned(value))
        return parsed
    try:
        loose = ipaddress.ip_network(value, strict=False)
    except ValueError:
        raise ValueError(f"{quote(value)} is not a CIDR such as '10.244.0.0/16'") from None
    if "%" in value:
        raise _zone_id(value, _unzoned(str(loose)))
    raise ValueError(f"{quote(value)} has host bits set; did you mean '{loose}'?")


def _unzoned(cidr: str) -> str:
    """`fd00::%1/64` without its zone id: `fd00::/64`."""
    address, _, rest = cidr.partition("%")
    return address + rest[rest.find("/") :] if "/" in rest else address


def _protocol(value: object) -> object:
    if isinstance(value, str):
        if value.upper() not in PROTOCOLS:
            close = difflib.get_close_matches(value.upper(), PROTOCOLS, n=1, cutoff=0.6)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ValueError(f"protocol {quote(value)} is not TCP, UDP or SCTP{hint}")
        return value.upper()
    return value


# The README promises "an integer or a hex string": "0x" and hex digits, nothing else
# (`int(text, 0)` would also take " 0b100_0000_0000_0000 " or "16384").
_HEX = re.compile(r"0[xX][0-9a-fA-F]+", re.ASCII)


def _mark(value: object) -> object:
    if isinstance(value, str):
        text = value
        if not _HEX.fullmatch(text):
            hint = ""
            if text.strip().isascii() and text.strip().isdigit():
                hint = f" (or write the integer without quotes: {text.strip()})"
            raise ValueError(f"{quote(text)} is not a hex string such as '0x4000'{hint}")
        value = int(text, 16)
    if isinstance(value, int) and not isinstance(value, bool):
        if value <= 0 or value >= 1 << 32 or value & (value - 1):
            shown = number(value, hexadecimal=True)
            raise ValueError(f"{shown} is not a single bit of a 32-bit mark, such as 0x4000")
        return value
    raise _wrong_type("an integer or a hex string")


Address = Annotated[IPAddress, BeforeValidator(_address)]
Network = Annotated[IPNetwork, BeforeValidator(_network)]
ProtocolName = Annotated[
    Literal["TCP", "UDP", "SCTP"],
    BeforeValidator(_protocol),
    WithJsonSchema({"enum": [*PROTOCOLS, *(p.lower() for p in PROTOCOLS)], "type": "string"}),
]
Mark = Annotated[
    int,
    BeforeValidator(_mark),
    WithJsonSchema(
        {"anyOf": [{"type": "integer"}, {"type": "string", "pattern": f"^{_HEX.pattern}$"}]}
    ),
]


class _Strict(BaseModel):
    # strict: TOML values are typed, so "80" where a port belongs is a mistake to
    # report, not a string to coerce.
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class Node(_Strict):
    """The node lbc compiles for: its name, addresses, pod CIDRs and NAT settings."""

    name: Annotated[str, Field(min_length=1, max_length=253, pattern=DNS_SUBDOMAIN)] = Field(
        description="Node name; endpoints whose `node` equals it are local."
    )
    addresses: list[Address] = Field(
        default_factory=list, description="The node's own addresses (NodePort listens on them)."
    )
    pod_cidrs: list[Network] = Field(
        default_factory=list,
        description="Pod CIDRs, at most one per IP family; traffic from outside them is "
        "masqueraded when it reaches a cluster IP.",
    )
    masquerade_mark: Mark = Field(
        default=0x4000,
        description="The single firewall-mark bit meaning 'masquerade this packet' "
        '(an integer or a hex string such as "0x4000").',
    )
    masquerade_all: bool = Field(
        default=False, description="Masquerade all traffic to service IPs, as kube-proxy's flag."
    )
    localhost_node_ports: bool = Field(
        default=False,
        description="Also open IPv4 node ports on 127.0.0.1 (iptables only; applying sets "
        "net.ipv4.conf.all.route_localnet=1, as kube-proxy does).",
    )
    zone: Annotated[str, Field(min_length=1, max_length=63, pattern=LABEL_VALUE)] | None = Field(
        default=None,
        description="The node's topology zone (its topology.kubernetes.io/zone label); "
        "endpoints' zone hints are matched against it.",
    )


class ServicePort(_Strict):
    """One port of a Service."""

    name: Annotated[str, Field(max_length=63, pattern=PORT_NAME)] = Field(
        default="", description="Port name (required to be unique when a service has several)."
    )
    protocol: ProtocolName = Field(default="TCP", description="TCP, UDP or SCTP.")
    port: Port = Field(description="The port on the service's IPs.")
    target_port: Port | None = Field(
        default=None, description="The port on the endpoints (defaults to `port`)."
    )
    node_port: Port | None = Field(
        default=None, description="The node port (types NodePort and LoadBalancer)."
    )


class Endpoint(_Strict):
    """One backend of a Service, as an EndpointSlice endpoint describes it."""

    ip: Address = Field(description="The endpoint's address.")
    node: Annotated[str, Field(min_length=1, max_length=253, pattern=DNS_SUBDOMAIN)] | None = Field(
        default=None, description="The node it runs on."
    )
    zone: Annotated[str, Field(max_length=63, pattern=LABEL_VALUE)] | None = Field(
        default=None, description="Its topology zone."
    )
    weight: Annotated[int, Field(ge=0, le=65535)] = Field(
        default=1, description="Relative share of new connections; 0 takes none."
    )
    ready: bool = Field(default=True, description="Ready to receive traffic.")
    serving: bool | None = Field(
        default=None, description="Serving (defaults to `ready`); used while terminating."
    )
    terminating: bool = Field(default=False, description="The endpoint is shutting down.")
    for_zones: tuple[
        Annotated[str, Field(min_length=1, max_length=63, pattern=LABEL_VALUE)], ...
    ] = Field(
        default=(),
        strict=False,  # a TOML array; the names inside stay strictly strings
        description="Topology hints: the zones whose nodes should send cluster traffic "
        "here (an EndpointSlice's hints.forZones).",
    )
    for_nodes: tuple[
        Annotated[str, Field(min_length=1, max_length=253, pattern=DNS_SUBDOMAIN)], ...
    ] = Field(
        default=(),
        strict=False,
        description="Topology hints: the nodes that should send cluster traffic here "
        "(hints.forNodes, trafficDistribution PreferSameNode).",
    )


class Service(_Strict):
    """A Kubernetes-style Service with its endpoints."""

    namespace: Annotated[str, Field(max_length=63, pattern=DNS_LABEL)] = "default"
    name: Annotated[str, Field(max_length=63, pattern=DNS_LABEL)]
    type: Literal["ClusterIP", "NodePort", "LoadBalancer"] = "ClusterIP"
    cluster_ips: Annotated[list[Address], Field(min_length=1, max_length=2)] = Field(
        description="One cluster IP, or one per family for a dual-stack service."
    )
    ports: Annotated[list[ServicePort], Field(min_length=1)]
    external_ips: list[Address] = Field(default_factory=list)
    load_balancer_ips: list[Address] = Field(
        default_factory=list, description="Load-balancer ingress IPs (type LoadBalancer)."
    )
    load_balancer_source_ranges: list[Network] = Field(
        default_factory=list,
        description="Only these sources may reach the load-balancer IPs (type LoadBalancer).",
    )
    session_affinity: Literal["None", "ClientIP"] = "None"
    session_affinity_timeout: Annotated[int, Field(ge=1, le=86400)] = 10800
    external_traffic_policy: Literal["Cluster", "Local"] = "Cluster"
    internal_traffic_policy: Literal["Cluster", "Local"] = "Cluster"
    scheduler: Literal["random", "rr", "wrr", "lc", "wlc", "sh", "mh"] | None = Field(
        default=None,
        description="Endpoint choice; unset means the backend's own default "
        "(weighted random for iptables and nftables, rr/wrr for IPVS).",
    )
    endpoints: list[Endpoint] = Field(default_factory=list)


class Cluster(_Strict):
    """The whole of cluster.toml."""

    node: Node
    services: list[Service] = Field(default_factory=list)
