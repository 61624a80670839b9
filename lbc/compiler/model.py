"""The cluster.toml schema: pydantic models used only at the input boundary."""

from __future__ import annotations

import ipaddress
import socket
from typing import Annotated, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, WithJsonSchema
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


def _wrong_type(expected: str) -> PydanticCustomError:
    # One error instead of one per union member; load.py words it from `expected`.
    return PydanticCustomError("wrong_type", "expected {expected}", {"expected": expected})


def _address(value: object) -> object:
    # Strings only: pydantic would otherwise read an integer as an IPv4 address.
    if isinstance(value, ipaddress.IPv4Address | ipaddress.IPv6Address):
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
        return ipaddress.ip_address(value)
    except ValueError:
        pass
    _, slash, prefix = value.partition("/")
    hint = ""
    if slash:
        try:
            ipaddress.ip_interface(value)
            hint = f" (drop the '/{prefix}')"
        except ValueError:
            pass
    raise ValueError(f"{quote(value)} is not an IPv4 or IPv6 address{hint}")


def _network(value: object) -> object:
    if isinstance(value, ipaddress.IPv4Network | ipaddress.IPv6Network):
        return value
    if not isinstance(value, str):
        raise _wrong_type("a CIDR string")
    try:
        return ipaddress.ip_network(value, strict=True)
    except ValueError:
        pass
    try:
        loose = ipaddress.ip_network(value, strict=False)
    except ValueError:
        raise ValueError(f"{quote(value)} is not a CIDR such as '10.244.0.0/16'") from None
    raise ValueError(f"{quote(value)} has host bits set; did you mean '{loose}'?")


def _protocol(value: object) -> object:
    if isinstance(value, str):
        if value.upper() not in PROTOCOLS:
            raise ValueError(f"protocol {quote(value)} is not TCP, UDP or SCTP")
        return value.upper()
    return value


def _mark(value: object) -> object:
    if isinstance(value, str):
        text = value
        try:
            value = int(text, 0)
        except ValueError:
            raise ValueError(f"{quote(text)} is not an integer such as 0x4000") from None
    if isinstance(value, int) and not isinstance(value, bool):
        if value <= 0 or value >= 1 << 32 or value & (value - 1):
            raise ValueError(f"{value:#x} is not a single bit of a 32-bit mark, such as 0x4000")
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
    WithJsonSchema({"anyOf": [{"type": "integer"}, {"type": "string"}]}),
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
