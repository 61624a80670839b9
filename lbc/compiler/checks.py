"""Semantic checks over a schema-valid cluster: conflicts the schema alone cannot see."""

from __future__ import annotations

import ipaddress
from collections.abc import Iterator

from lbc.compiler.locate import Path
from lbc.compiler.model import Cluster, Service

Found = tuple[Path, str]


def check(cluster: Cluster) -> list[Found]:
    """Return every semantic problem as `(key path, message)`, in config order."""
    found: list[Found] = []
    found += _node(cluster)
    found += _services_unique(cluster)
    for i, svc in enumerate(cluster.services):
        found += _service(cluster, ("services", i), svc)
    return found


def _node(cluster: Cluster) -> Iterator[Found]:
    by_family: dict[int, int] = {}
    for i, cidr in enumerate(cluster.node.pod_cidrs):
        if cidr.version in by_family:
            yield (
                ("node", "pod_cidrs", i),
                f"a second IPv{cidr.version} pod CIDR; give at most one per IP family "
                "(as kube-proxy's --cluster-cidr)",
            )
        by_family[cidr.version] = i


def _services_unique(cluster: Cluster) -> Iterator[Found]:
    names: dict[tuple[str, str], int] = {}
    frontends: dict[tuple[str, str, int], str] = {}
    node_ports: dict[tuple[str, int], str] = {}
    for i, svc in enumerate(cluster.services):
        key = (svc.namespace, svc.name)
        if key in names:
            yield (
                ("services", i, "name"),
                f"duplicate service {svc.namespace}/{svc.name} (also services[{names[key]}])",
            )
        else:
            names[key] = i
        who = f"{svc.namespace}/{svc.name}"
        addresses = [
            *((("cluster_ips", j), ip) for j, ip in enumerate(svc.cluster_ips)),
            *((("external_ips", j), ip) for j, ip in enumerate(svc.external_ips)),
            *((("load_balancer_ips", j), ip) for j, ip in enumerate(svc.load_balancer_ips)),
        ]
        for where, ip in addresses:
            for k, port in enumerate(svc.ports):
                fkey = (str(ip), port.protocol, port.port)
                other = frontends.get(fkey)
                if other is not None and other != who:
                    yield (
                        ("services", i, *where),
                        f"{_hostport(ip, port.port)}/{port.protocol.lower()} is already used "
                        f"by {other}",
                    )
                else:
                    frontends[fkey] = who
                if port.node_port is not None and where == ("cluster_ips", 0):
                    nkey = (port.protocol, port.node_port)
                    if nkey in node_ports:
                        yield (
                            ("services", i, "ports", k, "node_port"),
                            f"node port {port.node_port}/{port.protocol.lower()} is already "
                            f"used by {node_ports[nkey]}",
                        )
                    else:
                        node_ports[nkey] = f"{who}:{port.name or port.port}"


def _service(cluster: Cluster, at: Path, svc: Service) -> Iterator[Found]:
    families: dict[int, int] = {}
    for j, ip in enumerate(svc.cluster_ips):
        if ip.version in families:
            yield (
                (*at, "cluster_ips", j),
                f"two IPv{ip.version} cluster IPs; a dual-stack "
                "service has one IPv4 and one IPv6 address",
            )
        families[ip.version] = j
        for cidr in cluster.node.pod_cidrs:
            if ip.version == cidr.version and ip in cidr:
                yield ((*at, "cluster_ips", j), f"cluster IP {ip} is inside the pod CIDR {cidr}")
    for key in ("external_ips", "load_balancer_ips"):
        for j, ip in enumerate(getattr(svc, key)):
            if ip.version not in families:
                yield (
                    (*at, key, j),
                    f"{ip} is IPv{ip.version} but the service has no IPv{ip.version} cluster IP",
                )
    if svc.load_balancer_ips and svc.type != "LoadBalancer":
        yield ((*at, "load_balancer_ips"), 'load_balancer_ips needs type = "LoadBalancer"')
    if svc.load_balancer_source_ranges and svc.type != "LoadBalancer":
        yield (
            (*at, "load_balancer_source_ranges"),
            'load_balancer_source_ranges needs type = "LoadBalancer"',
        )
    yield from _ports(at, svc)
    yield from _endpoints(at, svc, families)


def _ports(at: Path, svc: Service) -> Iterator[Found]:
    names: set[str] = set()
    seen: set[tuple[str, int]] = set()
    for k, port in enumerate(svc.ports):
        where = (*at, "ports", k)
        if len(svc.ports) > 1 and not port.name:
            yield ((*where, "name"), "a service with several ports must name each of them")
        elif port.name in names:
            yield ((*where, "name"), f"duplicate port name {port.name!r}")
        names.add(port.name)
        if (port.protocol, port.port) in seen:
            yield ((*where, "port"), f"port {port.port}/{port.protocol.lower()} appears twice")
        seen.add((port.protocol, port.port))
        if port.node_port is not None and svc.type == "ClusterIP":
            yield ((*where, "node_port"), 'node_port needs type = "NodePort" or "LoadBalancer"')


def _endpoints(at: Path, svc: Service, families: dict[int, int]) -> Iterator[Found]:
    seen: dict[ipaddress.IPv4Address | ipaddress.IPv6Address, int] = {}
    for j, ep in enumerate(svc.endpoints):
        where = (*at, "endpoints", j)
        if ep.ip.version not in families:
            have = "/".join(f"IPv{v}" for v in sorted(families))
            yield (
                (*where, "ip"),
                f"endpoint {ep.ip} is IPv{ep.ip.version} but the service's cluster IPs are {have}",
            )
        if ep.ip in seen:
            yield ((*where, "ip"), f"duplicate endpoint {ep.ip} (also endpoints[{seen[ep.ip]}])")
        else:
            seen[ep.ip] = j


def _hostport(ip: ipaddress.IPv4Address | ipaddress.IPv6Address, port: int) -> str:
    return f"[{ip}]:{port}" if ip.version == 6 else f"{ip}:{port}"
