"""Semantic checks over schema-valid parts of a cluster: conflicts the schema cannot see."""

from __future__ import annotations

import ipaddress
from collections.abc import Iterator, Sequence

from lbc.compiler.locate import Path, format_path
from lbc.compiler.model import Node, Service

Found = tuple[Path, str]
Indexed = Sequence[tuple[int, Service]]
IP = ipaddress.IPv4Address | ipaddress.IPv6Address

# Keys of a service that hold the addresses it answers on, in the order they are checked.
_ADDRESS_KEYS = ("cluster_ips", "external_ips", "load_balancer_ips")
_LABEL = {"cluster_ips": "cluster IP", "external_ips": "external IP", "load_balancer_ips": "LB IP"}


def check(node: Node | None, services: Indexed) -> list[Found]:
    """Every semantic problem as `(key path, message)`.

    `node` is None when it failed schema validation, and `services` holds only the
    services that passed it, with their index in the file; checks that need a part
    which is missing are skipped, so a schema error never causes a false report here.
    """
    found: list[Found] = []
    if node is not None:
        found += _node(node)
    found += _across_services(services)
    for i, svc in services:
        at: Path = ("services", i)
        found += _addresses(at, svc)
        found += _settings(at, svc)
        found += _ports(at, svc)
        found += _endpoints(at, svc)
        if node is not None:
            found += _against_node(at, svc, node)
    return found


def _node(node: Node) -> Iterator[Found]:
    families: set[int] = set()
    for i, cidr in enumerate(node.pod_cidrs):
        if cidr.version in families:
            yield (
                ("node", "pod_cidrs", i),
                f"a second IPv{cidr.version} pod CIDR; give at most one per IP family",
            )
        families.add(cidr.version)
    seen: dict[IP, int] = {}
    for i, ip in enumerate(node.addresses):
        if ip in seen:
            yield (("node", "addresses", i), f"{ip} is listed twice (also addresses[{seen[ip]}])")
        seen.setdefault(ip, i)


def _across_services(services: Indexed) -> Iterator[Found]:
    names: dict[tuple[str, str], int] = {}
    cluster_ips: dict[IP, str] = {}
    for i, svc in services:
        key = (svc.namespace, svc.name)
        if key in names:
            yield (
                ("services", i, "name"),
                f"duplicate service {_who(svc)} (also services[{names[key]}])",
            )
        names.setdefault(key, i)
        for j, ip in enumerate(svc.cluster_ips):
            owner = cluster_ips.setdefault(ip, _who(svc))
            if owner != _who(svc):
                yield (
                    ("services", i, "cluster_ips", j),
                    f"cluster IP {ip} is already used by {owner}",
                )
    yield from _frontends(services, cluster_ips)
    yield from _node_ports(services)


def _frontends(services: Indexed, cluster_ips: dict[IP, str]) -> Iterator[Found]:
    """External and LB IPs: not another service's cluster IP, and no address:port/proto twice."""
    taken: dict[tuple[IP, str, int], str] = {}
    for i, svc in services:
        for key in ("external_ips", "load_balancer_ips"):
            for j, ip in enumerate(getattr(svc, key)):
                where = ("services", i, key, j)
                owner = cluster_ips.get(ip)
                if owner is not None and owner != _who(svc):
                    yield (where, f"{_LABEL[key]} {ip} is the cluster IP of {owner}")
                    continue
                for port in svc.ports:
                    fkey = (ip, port.protocol, port.port)
                    other = taken.setdefault(fkey, _who(svc))
                    if other != _who(svc):
                        yield (
                            where,
                            f"{_hostport(ip, port.port)}/{port.protocol.lower()} is already "
                            f"used by {other}",
                        )


def _node_ports(services: Indexed) -> Iterator[Found]:
    taken: dict[tuple[str, int], str] = {}
    for i, svc in services:
        for k, port in enumerate(svc.ports):
            if port.node_port is None:
                continue
            mine = f"{_who(svc)}:{port.name or port.port}"
            other = taken.setdefault((port.protocol, port.node_port), mine)
            if other != mine:
                yield (
                    ("services", i, "ports", k, "node_port"),
                    f"node port {port.node_port}/{port.protocol.lower()} is already used by "
                    f"{other}",
                )


def _addresses(at: Path, svc: Service) -> Iterator[Found]:
    families: set[int] = set()
    for j, ip in enumerate(svc.cluster_ips):
        if ip.version in families:
            yield (
                (*at, "cluster_ips", j),
                f"two IPv{ip.version} cluster IPs; a dual-stack service has one IPv4 "
                "and one IPv6 address",
            )
        families.add(ip.version)
    seen: dict[IP, Path] = {}
    for key in _ADDRESS_KEYS:
        for j, ip in enumerate(getattr(svc, key)):
            where = (*at, key, j)
            if ip in seen:
                yield (where, f"{ip} is already listed at {format_path(seen[ip])}")
                continue
            seen[ip] = (key, j)
            if key != "cluster_ips" and ip.version not in families:
                yield (
                    where,
                    f"{_LABEL[key]} {ip} is IPv{ip.version} but the service has no "
                    f"IPv{ip.version} cluster IP",
                )


def _settings(at: Path, svc: Service) -> Iterator[Found]:
    """Settings that mean nothing for this service (Kubernetes refuses them too)."""
    if svc.type != "LoadBalancer":
        for key in ("load_balancer_ips", "load_balancer_source_ranges"):
            if getattr(svc, key):
                yield ((*at, key), f'{key} needs type = "LoadBalancer" (the type is {svc.type!r})')
    if svc.external_traffic_policy == "Local" and svc.type == "ClusterIP" and not svc.external_ips:
        yield (
            (*at, "external_traffic_policy"),
            "external_traffic_policy applies to external traffic, but this ClusterIP "
            "service has no external_ips",
        )
    if "session_affinity_timeout" in svc.model_fields_set and svc.session_affinity != "ClientIP":
        yield (
            (*at, "session_affinity_timeout"),
            'session_affinity_timeout needs session_affinity = "ClientIP"',
        )


def _ports(at: Path, svc: Service) -> Iterator[Found]:
    names: dict[str, int] = {}
    seen: dict[tuple[str, int], int] = {}
    for k, port in enumerate(svc.ports):
        where = (*at, "ports", k)
        if len(svc.ports) > 1 and not port.name:
            yield ((*where, "name"), "a service with several ports must name each of them")
        elif port.name in names:
            yield (
                (*where, "name"),
                f"duplicate port name {port.name!r} (also ports[{names[port.name]}])",
            )
        names.setdefault(port.name, k)
        pkey = (port.protocol, port.port)
        if pkey in seen:
            yield (
                (*where, "port"),
                f"port {port.port}/{port.protocol.lower()} is already ports[{seen[pkey]}]",
            )
        seen.setdefault(pkey, k)
        if port.node_port is not None and svc.type == "ClusterIP":
            yield ((*where, "node_port"), 'node_port needs type = "NodePort" or "LoadBalancer"')
        if port.node_port is None and svc.type == "NodePort":
            # Kubernetes would allocate one; lbc has no allocator, and silently leaving the
            # port off the nodes would surprise whoever asked for a NodePort service.
            yield (where, 'type = "NodePort" needs a node_port on every port')


_VERSION_OF = {ipaddress.IPv4Address: 4, ipaddress.IPv6Address: 6}


def _endpoints(at: Path, svc: Service) -> Iterator[Found]:
    families = sorted({ip.version for ip in svc.cluster_ips})
    # Keyed by the address's integer, one dict per family: equal exactly when the
    # addresses are, and hashed in C (an address object hashes in Python); the family
    # by the address's type (`version` is a Python property). Key paths are made only
    # for a problem.
    seen: dict[type, dict[int, int]] = {t: {} for t, v in _VERSION_OF.items() if v in families}
    for j, ep in enumerate(svc.endpoints):
        ip = ep.ip
        numbers = seen.get(type(ip))
        if numbers is None:
            have = " and ".join(f"IPv{v}" for v in families)
            yield (
                (*at, "endpoints", j, "ip"),
                f"endpoint {ip} is IPv{ip.version} but the service is {have} only",
            )
            continue
        first = numbers.setdefault(int(ip), j)
        if first != j:
            yield (
                (*at, "endpoints", j, "ip"),
                f"duplicate endpoint {ip} (also endpoints[{first}])",
            )


def _against_node(at: Path, svc: Service, node: Node) -> Iterator[Found]:
    for j, ip in enumerate(svc.cluster_ips):
        where = (*at, "cluster_ips", j)
        for cidr in node.pod_cidrs:
            if ip.version == cidr.version and ip in cidr:
                yield (where, f"cluster IP {ip} is inside the pod CIDR {cidr}")
        if ip in node.addresses:
            yield (where, f"cluster IP {ip} is the node's own address")
    node_ports = [(k, p.node_port) for k, p in enumerate(svc.ports) if p.node_port is not None]
    if svc.type == "ClusterIP" or not node_ports:
        return
    families = {ip.version for ip in svc.cluster_ips}
    if not families & {a.version for a in node.addresses}:
        k, number = node_ports[0]
        need = " or ".join(f"IPv{v}" for v in sorted(families))
        yield (
            (*at, "ports", k, "node_port"),
            f"node port {number} needs an {need} address in node.addresses",
        )


def _who(svc: Service) -> str:
    return f"{svc.namespace}/{svc.name}"


def _hostport(ip: IP, port: int) -> str:
    return f"[{ip}]:{port}" if ip.version == 6 else f"{ip}:{port}"
