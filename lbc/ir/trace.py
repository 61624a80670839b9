"""A packet tracer over the IR: where does a new connection go, and is it masqueraded?

The tracer states lbc's Service semantics in one place, independent of any backend;
the packet-flow tests check that every backend's real dataplane agrees with it.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from enum import StrEnum
from typing import TYPE_CHECKING

from lbc.errors import UsageError
from lbc.ir.names import hostport
from lbc.ir.nodes import Empty, Frontend, Masquerade, Pool, Program, Proto

if TYPE_CHECKING:
    from lbc.compiler.model import Cluster


class Origin(StrEnum):
    """Where a packet comes from, as the dataplane can tell."""

    EXTERNAL = "external"  # from outside the node and outside the pod CIDR
    POD = "pod"  # from the pod CIDR
    NODE = "node"  # from the node itself (a local address)


class Verdict(StrEnum):
    """What happens to the first packet of the connection."""

    FORWARD = "forward"  # DNAT to one of `choices`
    REJECT = "reject"  # the client sees connection refused
    DROP = "drop"  # the client sees a timeout
    PASS = "pass"  # not a service address: lbc leaves it alone


@dataclass(frozen=True, slots=True)
class Choice:
    """One backend the connection may land on, with its share and masquerade."""

    address: str
    port: int
    share: float
    masquerade: bool


@dataclass(frozen=True, slots=True)
class Trace:
    """The result of tracing one packet."""

    verdict: Verdict
    origin: Origin
    frontend: Frontend | None = None
    pool: Pool | None = None
    choices: tuple[Choice, ...] = ()
    steps: tuple[str, ...] = field(default=())

    @property
    def backends(self) -> frozenset[str]:
        """The `ip:port` of every backend the packet may reach."""
        return frozenset(hostport(c.address, c.port) for c in self.choices)


def origin_of(program: Program, source: str) -> Origin:
    """Classify `source`: a node address, an address in a pod CIDR, or external."""
    ip = ipaddress.ip_address(source)
    if source in program.node.addresses or ip.is_loopback:
        return Origin.NODE
    for cidr in program.node.pod_cidrs:
        net = ipaddress.ip_network(cidr)
        if net.version == ip.version and ip in net:
            return Origin.POD
    return Origin.EXTERNAL


def trace(
    program: Program | Cluster,
    source: str,
    destination: str,
    port: int,
    proto: Proto | str = Proto.TCP,
    origin: Origin | str | None = None,
) -> Trace:
    """Trace a new connection from `source` to `destination:port` through `program`
    (or a `Cluster`, lowered first).

    Addresses may be written in any form `ipaddress` reads, the protocol in any case,
    the origin as an `Origin` or its value ("pod", "node", "external"); a malformed
    address, addresses of two families, a port outside 1-65535, an unknown protocol or
    origin raises `UsageError`.
    """
    if not isinstance(program, Program):
        from lbc.compiler.lower import lower
        from lbc.compiler.model import Cluster

        if not isinstance(program, Cluster):
            kind = type(program).__name__
            raise UsageError(f"trace() takes a Program or a Cluster, not {kind}")
        program = lower(program)
    source = _address_text(source, "source")
    destination = _address_text(destination, "destination")
    if (":" in source) != (":" in destination):
        raise UsageError(
            f"source {source} and destination {destination} are of different IP families"
        )
    if origin is not None:
        try:
            origin = Origin(origin)
        except ValueError:
            known = ", ".join(o.value for o in Origin)
            raise UsageError(f"origin {origin!r} is not one of {known}") from None
    if type(port) is not int or not 1 <= port <= 65535:
        raise UsageError(f"port {port!r} is not a port number (1-65535)")
    try:
        proto = Proto(proto.lower() if isinstance(proto, str) else proto)
    except ValueError:
        known = ", ".join(p.value for p in Proto)
        raise UsageError(f"protocol {proto!r} is not one of {known}") from None
    origin = origin or origin_of(program, source)
    steps = [f"packet {source} -> {hostport(destination, port)}/{proto} from {origin}"]
    front = _find_frontend(program, destination, port, proto)
    if front is None:
        if str(ipaddress.ip_address(destination)) in program.reject_unknown:
            steps.append("a cluster IP, but no service uses this port and protocol: rejected")
            return Trace(Verdict.REJECT, origin, steps=tuple(steps))
        steps.append("no frontend matches: lbc does not touch this packet")
        return Trace(Verdict.PASS, origin, steps=tuple(steps))
    steps.append(f"matches {front.kind} frontend of {front.service}")
    pools = program.pool_index()
    if front.source_ranges and not _in_any(source, front.source_ranges):
        steps.append(f"source not in {', '.join(front.source_ranges)}: dropped")
        return Trace(Verdict.DROP, origin, front, steps=tuple(steps))
    pool = pools[front.pool]
    masquerade = _masquerade(program, front, source)
    if front.internal_pool is not None and origin is not Origin.EXTERNAL:
        pool = pools[front.internal_pool]
        masquerade = origin is Origin.NODE
        steps.append(f"{origin} traffic short-circuits to the cluster-wide pool")
    if pool.local_only:
        which = "this node's endpoints"
    elif pool.hints:
        which = f"cluster-wide endpoints, narrowed by the hints for {pool.hints}"
    else:
        which = "cluster-wide endpoints"
    steps.append(f"pool {pool.id} ({which}), masquerade {'yes' if masquerade else 'no'}")
    active = pool.active
    if not active:
        verdict = Verdict.REJECT if pool.when_empty is Empty.REJECT else Verdict.DROP
        steps.append(f"no usable backend: {verdict}")
        return Trace(verdict, origin, front, pool, steps=tuple(steps))
    total = sum(b.weight for b in active)
    others = program.open_to_other_nodes()
    hairpins = [b.address == source and program.hairpin(pool, b, others) for b in active]
    choices = tuple(
        Choice(b.address, b.port, b.weight / total, masquerade or hairpin)
        for b, hairpin in zip(active, hairpins, strict=True)
    )
    for c, hairpin_here in zip(choices, hairpins, strict=True):
        hairpin = " (hairpin: masqueraded)" if hairpin_here else ""
        steps.append(f"  -> {hostport(c.address, c.port)} share {c.share:.4f}{hairpin}")
    if pool.affinity_timeout is not None:
        steps.append(f"client-IP affinity keeps a client on its backend {pool.affinity_timeout}s")
    return Trace(Verdict.FORWARD, origin, front, pool, choices, tuple(steps))


def _address_text(text: str, what: str) -> str:
    """`text` as an address in canonical form, or `UsageError` naming `what` it is."""
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        raise UsageError(f"{what} {text!r} is not an IPv4 or IPv6 address") from None


def _find_frontend(program: Program, address: str, port: int, proto: Proto) -> Frontend | None:
    canonical = str(ipaddress.ip_address(address))
    for f in program.frontends:
        if f.address == canonical and f.port == port and f.proto is proto:
            return f
    return None


def _masquerade(program: Program, front: Frontend, source: str) -> bool:
    if front.masquerade is Masquerade.ALWAYS:
        return True
    if front.masquerade is Masquerade.NEVER:
        return False
    cidr = program.node.pod_cidr(front.family)
    return cidr is not None and not _in_any(source, (cidr,))


def _in_any(address: str, cidrs: tuple[str, ...]) -> bool:
    ip = ipaddress.ip_address(address)
    return any(ip.version == (net := ipaddress.ip_network(c)).version and ip in net for c in cidrs)
