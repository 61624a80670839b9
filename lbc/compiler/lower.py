"""Lowering: the validated config model becomes an `ir.Program`.

All Kubernetes Service semantics are decided here, once, so that every backend
implements the same decisions: which endpoints are usable (ready, else serving and
terminating), which pool each frontend uses under the traffic policies, when a
packet is masqueraded, and what an empty pool does.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Callable, Iterable
from dataclasses import dataclass, fields
from operator import attrgetter, itemgetter

from lbc.collector import paused
from lbc.compiler.model import Cluster, Endpoint, Service, ServicePort
from lbc.errors import ConfigError, Problem, UsageError
from lbc.ir.names import digest, hostport, service_port_name
from lbc.ir.nodes import (
    Backend,
    Empty,
    Frontend,
    Kind,
    Masquerade,
    NodeInfo,
    Pool,
    Program,
    Proto,
    Scheduler,
)

_KIND_ORDER = {k: n for n, k in enumerate(Kind)}
LOCALHOST = "127.0.0.1"  # where node ports also listen with `localhost_node_ports`
# Enum lookups by value without EnumType.__call__, once per service port.
_PROTOS = {p.value: p for p in Proto}
_SCHEDULERS = {s.value: s for s in Scheduler}
_FrontendKey = tuple[int, int, int, str, int]
_ntoa = socket.inet_ntoa
_IPv4 = ipaddress.IPv4Address
_IPv6 = ipaddress.IPv6Address
# An endpoint's address as an integer, `int(e.ip)` without a Python-level call.
_ip_int = attrgetter("ip._ip")


@paused
def lower(cluster: Cluster) -> Program:
    """Lower a validated cluster to its IR program (pure; canonical order)."""
    if not isinstance(cluster, Cluster):
        raise UsageError(f"lower() takes a Cluster, not {type(cluster).__name__}")
    info = node_info(cluster)
    pools: list[Pool] = []
    frontends: list[tuple[_FrontendKey, Frontend]] = []
    for svc in sorted(cluster.services, key=lambda s: (s.namespace, s.name)):
        _lower_service(info, svc, pools, frontends)
    cluster_ips = {ip for svc in cluster.services for ip in svc.cluster_ips}
    return assemble(info, pools, frontends, cluster_ips)


def node_info(cluster: Cluster) -> NodeInfo:
    """The node facts every part of the program shares."""
    node = cluster.node
    return NodeInfo(
        name=node.name,
        addresses=tuple(str(a) for a in sorted(node.addresses, key=_ip_key)),
        pod_cidrs=tuple(str(c) for c in sorted(node.pod_cidrs, key=lambda c: c.version)),
        masquerade_mark=int(node.masquerade_mark),
        masquerade_all=node.masquerade_all,
        localhost_node_ports=node.localhost_node_ports,
        zone=node.zone,
    )


@paused
def lower_service(info: NodeInfo, svc: Service) -> Program:
    """The program of one service alone on the node (what it adds to the whole).

    `lower` of a cluster holds exactly the pools, frontends and cluster IPs of the
    `lower_service` programs of its services, so a change to one service can be
    lowered without the others (`lbc.Session` does).
    """
    pools: list[Pool] = []
    frontends: list[tuple[_FrontendKey, Frontend]] = []
    _lower_service(info, svc, pools, frontends)
    return assemble(info, pools, frontends, set(svc.cluster_ips))


def assemble(
    info: NodeInfo,
    pools: list[Pool],
    frontends: list[tuple[_FrontendKey, Frontend]],
    cluster_ips: set[ipaddress.IPv4Address | ipaddress.IPv6Address],
) -> Program:
    """The program of lowered parts, in canonical order."""
    pools.sort(key=lambda p: (p.service, p.family, p.proto, p.local_only))
    frontends.sort(key=itemgetter(0))  # stable, and never compares the frontends
    _claimed_once(frontends)
    return Program(
        node=info,
        pools=tuple(pools),
        frontends=tuple(f for _, f in frontends),
        reject_unknown=tuple(str(ip) for ip in sorted(cluster_ips, key=_ip_key)),
    )


def _claimed_once(frontends: list[tuple[_FrontendKey, Frontend]]) -> None:
    """Raise `ConfigError` if two service ports claim one address, protocol and port.

    `lbc.load` refuses such a cluster; one built or changed in code may still hold it
    (`lbc.validate` finds that and everything else), and no backend can express it.
    """
    owners: dict[tuple[int, int, str, int], str] = {}
    for (family, _, number, proto, port), frontend in frontends:
        owner = owners.setdefault((family, number, proto, port), frontend.service)
        if owner != frontend.service:
            where = f"{hostport(frontend.address, port)}/{proto}"
            message = f"{where} is claimed by both {owner} and {frontend.service}"
            raise ConfigError([Problem("<cluster>", "", None, message)])


def _lower_service(
    info: NodeInfo,
    svc: Service,
    pools: list[Pool],
    frontends: list[tuple[_FrontendKey, Frontend]],
) -> None:
    families = sorted({ip.version for ip in svc.cluster_ips})
    # Endpoint selection depends on the service and family, not on the port:
    # done once here rather than for every port.
    chosen = {family: _Chosen.of(svc, family, info) for family in families}
    for port in svc.ports:
        for family in families:
            _lower_port(info, svc, port, family, chosen[family], pools, frontends)


# What a backend needs of an endpoint: its address as text, weight, whether it runs
# on this node, whether it is terminating, whether it runs on another named node.
_Pick = tuple[str, int, bool, bool, bool]


@dataclass(frozen=True, slots=True)
class _Chosen:
    """The usable endpoints of a service in one family, cluster-wide and on this node."""

    everywhere: list[_Pick]
    local: list[_Pick]
    serving: list[str]  # every ready or serving endpoint's address, before any choice
    hints: str = ""  # the topology hints that narrowed `everywhere` ("zone zone-a")

    @staticmethod
    def of(svc: Service, family: int, info: NodeInfo) -> _Chosen:
        """Endpoints of `family` in address order, then kube-proxy's readiness rule:
        the ready ones; when there are none, the serving terminating ones.

        `ready` alone decides, as in kube-proxy: an endpoint both ready and terminating
        (a Service with `publishNotReadyAddresses` reports its terminating pods so)
        takes traffic like any ready one, and keeps its terminating flag in the IR.

        Topology hints narrow the ready endpoints of the cluster-wide pool (never the
        local ones, never the terminating fallback), as kube-proxy does: `_hinted`.
        """
        node = info.name
        kind = _IPv4 if family == 4 else _IPv6
        numbered = [(_ip_int(e), e) for e in svc.endpoints if isinstance(e.ip, kind)]
        numbered.sort(key=itemgetter(0))  # stable; addresses are unique (checked)
        ready: list[_Pick] = []
        ready_endpoints: list[Endpoint] = []
        serving: list[_Pick] = []
        local_ready: list[_Pick] = []
        local_serving: list[_Pick] = []
        idle: list[str] = []
        for number, e in numbered:
            terminating = e.terminating
            if e.ready:
                usable, usable_here = ready, local_ready
                ready_endpoints.append(e)
            elif terminating and (e.ready if e.serving is None else e.serving):
                usable, usable_here = serving, local_serving
            else:
                if e.serving:  # serving, neither ready nor terminating: takes no traffic
                    idle.append(_ntoa(number.to_bytes(4)) if family == 4 else str(e.ip))
                continue
            address = _ntoa(number.to_bytes(4)) if family == 4 else str(e.ip)
            where = e.node
            local = where == node
            pick = (address, e.weight, local, terminating, where is not None and not local)
            usable.append(pick)
            if local:
                usable_here.append(pick)
        every = [p[0] for p in ready] + [p[0] for p in serving] + idle
        hints = ""
        if ready:
            ready, hints = _hinted(ready, ready_endpoints, node, info.zone)
        return _Chosen(ready or serving, local_ready or local_serving, every, hints)


def _hinted(
    ready: list[_Pick], endpoints: list[Endpoint], node: str, zone: str | None
) -> tuple[list[_Pick], str]:
    """The ready endpoints that topology hints leave for this node (kube-proxy's rule),
    and which hints they followed ("node NAME", "zone NAME" or "").

    Node hints first: when every ready endpoint has some and at least one names this
    node, only those. Otherwise zone hints: when every ready endpoint has some and at
    least one names this node's zone, only those. Otherwise (a hint missing anywhere,
    none for this node or zone, or a node without a zone) every ready endpoint.
    Weights are lbc's own: a selection whose endpoints all have weight 0 would take
    no connection at all, so it counts as no endpoint for this node or zone.
    """
    if endpoints[0].for_nodes and all(e.for_nodes for e in endpoints):
        kept = [p for p, e in zip(ready, endpoints, strict=True) if node in e.for_nodes]
        if any(p[1] for p in kept):
            return kept, f"node {node}"
    if zone is not None and endpoints[0].for_zones and all(e.for_zones for e in endpoints):
        kept = [p for p, e in zip(ready, endpoints, strict=True) if zone in e.for_zones]
        if any(p[1] for p in kept):
            return kept, f"zone {zone}"
    return ready, ""


def _lower_port(
    node: NodeInfo,
    svc: Service,
    port: ServicePort,
    family: int,
    chosen: _Chosen,
    pools: list[Pool],
    frontends: list[tuple[_FrontendKey, Frontend]],
) -> None:
    spn = service_port_name(svc.namespace, svc.name, port.name)
    proto = _PROTOS[port.protocol.lower()]
    target = port.target_port or port.port
    everywhere = chosen.everywhere
    scheduler = _SCHEDULERS[svc.scheduler] if svc.scheduler else Scheduler.DEFAULT
    affinity = svc.session_affinity_timeout if svc.session_affinity == "ClientIP" else None
    # A backend's key is "spn/proto/ip:port" (brackets around IPv6); its id, the key's
    # digest, is made when a backend prints it (`Backend.id`).
    id_prefix = f"{spn}/{proto}/"
    open_bracket, port_suffix = ("[", f"]:{target}") if family == 6 else ("", f":{target}")

    def backends(selected: list[_Pick]) -> tuple[Backend, ...]:
        return tuple(
            [
                _backend(
                    f"{id_prefix}{open_bracket}{address}{port_suffix}",
                    address,
                    target,
                    weight,
                    local,
                    terminating,
                    remote,
                )
                for address, weight, local, terminating, remote in selected
            ]
        )

    made: dict[bool, Pool] = {}
    serving = tuple([(a, target) for a in chosen.serving]) if proto is Proto.UDP else ()

    def pool(local_only: bool) -> Pool:
        """The cluster-wide or the local-only pool, created on first use."""
        if local_only not in made:
            variant = "local" if local_only else "cluster"
            # An empty local pool of a service that has endpoints elsewhere drops (as
            # kube-proxy does); a service with no endpoints at all rejects.
            when_empty = Empty.DROP if local_only and everywhere else Empty.REJECT
            selected = chosen.local if local_only else everywhere
            made[local_only] = Pool(
                id=digest(f"{spn}/{proto}/ipv{family}/{variant}"),
                service=spn,
                family=family,
                proto=proto,
                backends=backends(selected),
                scheduler=scheduler,
                affinity_timeout=affinity,
                when_empty=when_empty,
                local_only=local_only,
                serving=serving,
                hints="" if local_only else chosen.hints,
            )
            pools.append(made[local_only])
        return made[local_only]

    internal = pool(local_only=svc.internal_traffic_policy == "Local")
    external_ips = [str(ip) for ip in svc.external_ips if ip.version == family]
    lb_ips = [str(ip) for ip in svc.load_balancer_ips if ip.version == family]
    node_ips = []
    if port.node_port is not None:
        node_ips = [a for a in node.addresses if (":" in a) == (family == 6)]
        if family == 4 and node.localhost_node_ports:
            node_ips.append(LOCALHOST)
    has_external = bool(external_ips or lb_ips or node_ips)
    external = internal  # replaced below whenever an external frontend exists
    ext_masq, ext_internal = Masquerade.ALWAYS, None
    if has_external:
        external_local = svc.external_traffic_policy == "Local"
        external = pool(local_only=external_local)
        if external_local:
            ext_masq, ext_internal = Masquerade.NEVER, pool(local_only=False).id

    def add(kind: Kind, address: str, number: int, target_pool: Pool, **extra: object) -> None:
        frontend = Frontend(
            kind=kind,
            family=family,
            address=address,
            proto=proto,
            port=number,
            service=spn,
            pool=target_pool.id,
            **extra,  # type: ignore[arg-type]
        )
        frontends.append((frontend_key(frontend), frontend))

    cluster_masq = Masquerade.ALWAYS if node.masquerade_all else Masquerade.OFF_CLUSTER
    for ip in svc.cluster_ips:
        if ip.version == family:
            add(Kind.CLUSTER_IP, _ip_text(ip), port.port, internal, masquerade=cluster_masq)
    for address in external_ips:
        add(
            Kind.EXTERNAL_IP,
            address,
            port.port,
            external,
            masquerade=ext_masq,
            internal_pool=ext_internal,
        )
    ranges = _source_ranges(node, svc, family, lb_ips) if svc.load_balancer_source_ranges else ()
    for address in lb_ips:
        add(
            Kind.LOAD_BALANCER,
            address,
            port.port,
            external,
            masquerade=ext_masq,
            internal_pool=ext_internal,
            source_ranges=ranges,
        )
    for address in node_ips:
        add(
            Kind.NODE_PORT,
            address,
            port.node_port or 0,
            external,
            masquerade=ext_masq,
            internal_pool=ext_internal,
        )


def _source_ranges(node: NodeInfo, svc: Service, family: int, lb_ips: list[str]) -> tuple[str, ...]:
    """Who may use the service's load-balancer addresses in `family`.

    As in kube-proxy, when a range holds an address of this node the load-balancer
    addresses themselves are allowed as sources too: a node that has an LB address
    as a local one (MetalLB in layer-2 mode, a VIP routed to the node) reaches it
    with that address as the source, not through the load balancer.
    """
    networks = [r for r in svc.load_balancer_source_ranges if r.version == family]
    ranges = [str(r) for r in networks]
    own = [ipaddress.ip_address(a) for a in node.addresses]
    if any(a in r for r in networks for a in own if a.version == family):
        host = "/32" if family == 4 else "/128"
        ranges += [
            a + host for a in lb_ips if not any(ipaddress.ip_address(a) in r for r in networks)
        ]
    return tuple(ranges)


def _slot_setters(cls: type) -> list[Callable[[object, object], None]]:
    """The setters of the instance slots of a slotted dataclass, in field order."""
    return [vars(cls)[f.name].__set__ for f in fields(cls)]


_set_backend = _slot_setters(Backend)
_new = object.__new__


def _backend(
    key: str,
    address: str,
    port: int,
    weight: int,
    local: bool,
    terminating: bool,
    remote: bool = False,
) -> Backend:
    """`Backend(...)`: the same frozen instance, its slots set without the frozen
    dataclass's `object.__setattr__` per field (a backend is made per endpoint and port)."""
    b: Backend = _new(Backend)
    (set_key, set_address, set_port, set_weight, set_local, set_terminating, set_remote) = (
        _set_backend
    )
    set_key(b, key)
    set_address(b, address)
    set_port(b, port)
    set_weight(b, weight)
    set_local(b, local)
    set_terminating(b, terminating)
    set_remote(b, remote)
    return b


def _ip_text(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str:
    """`str(ip)`; IPv4 through inet_ntoa, which is the same text twice as fast."""
    if ip.version == 4:
        return socket.inet_ntoa(int(ip).to_bytes(4, "big"))
    return str(ip)


def _ip_key(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> tuple[int, int]:
    return (ip.version, int(ip))


def frontend_key(f: Frontend) -> _FrontendKey:
    return (f.family, _KIND_ORDER[f.kind], _address_int(f.address), f.proto, f.port)


def _address_int(address: str) -> int:
    """`int(ip_address(address))`; IPv4 (always dotted quads here) through inet_aton."""
    if ":" not in address:
        return int.from_bytes(socket.inet_aton(address), "big")
    return int(ipaddress.ip_address(address))


@paused
def merge(info: NodeInfo, programs: Iterable[Program]) -> Program:
    """One program of the programs of single services (`lower_service`), as `lower` makes."""
    pools: list[Pool] = []
    frontends: list[tuple[_FrontendKey, Frontend]] = []
    cluster_ips: set[ipaddress.IPv4Address | ipaddress.IPv6Address] = set()
    for program in programs:
        pools += program.pools
        frontends += [(frontend_key(f), f) for f in program.frontends]
        cluster_ips.update(ipaddress.ip_address(a) for a in program.reject_unknown)
    return assemble(info, pools, frontends, cluster_ips)
