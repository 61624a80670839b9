"""Semantic checks over schema-valid parts of a cluster: conflicts the schema cannot see."""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Iterator, Sequence

from lbc.compiler.locate import Path, format_path
from lbc.compiler.model import Node, Service

Found = tuple[Path, str]
Indexed = Sequence[tuple[int, Service]]
# A service that failed the schema: its index, what of it passed, the keys that did not.
Partial = tuple[int, Service, frozenset[str]]
IP = ipaddress.IPv4Address | ipaddress.IPv6Address

# Keys of a service that hold the addresses it answers on, in the order they are checked.
_ADDRESS_KEYS = ("cluster_ips", "external_ips", "load_balancer_ips")
_LABEL = {"cluster_ips": "cluster IP", "external_ips": "external IP", "load_balancer_ips": "LB IP"}


def check(node: Node | None, services: Indexed, partial: Sequence[Partial] = ()) -> list[Found]:
    """Every semantic problem as `(key path, message)`.

    `node` is None when it failed schema validation, and `services` holds only the
    services that passed it, with their index in the file; checks that need a part
    which is missing are skipped, so a schema error never causes a false report here.
    `partial` holds the services that failed it, each with the keys that passed it on
    their own (the others unset or empty) and the set of keys that did not: each gets
    the checks of one service that read none of its broken keys, so that one run
    reports as much as it can. Across services such a service takes part by its name
    only (a duplicate name shows at once); its addresses and ports are compared with
    other services' once it passes the schema.
    """
    found: list[Found] = []
    if node is not None:
        found += _node(node)
    if partial:
        named = [(i, _name_only(s)) for i, s, _ in partial]
        found += _across_services(sorted([*services, *named], key=lambda item: item[0]))
    else:
        found += _across_services(services)
    if node is not None:
        found += _node_address_ports(node, services)
    for i, svc in services:
        at: Path = ("services", i)
        found += _addresses(at, svc)
        found += _settings(at, svc)
        found += _ports(at, svc)
        found += _endpoints(at, svc)
        if node is not None:
            found += _against_node(at, svc, node)
    for i, svc, broken in partial:
        at = ("services", i)
        for checker, reads in _READS:
            if not reads & broken:
                found += checker(at, svc)
        if "ports" not in broken:
            found += _ports(at, svc, by_type="type" not in broken)
        if node is not None and not _AGAINST_NODE_READS & broken:
            found += _against_node(at, svc, node)
    return found


# --- addresses no service, endpoint or node may have -----------------------------------
#
# Kubernetes' API validation (ValidateNonSpecialIP for service and node addresses, and
# its endpoint IP validation) refuses the unspecified, loopback, link-local and
# multicast addresses: none of them names one host that other hosts reach. lbc also
# refuses the IPv4 broadcast address, and IPv4-mapped IPv6 addresses, which a rule
# would match only in IPv6 packets while the traffic they mean arrives as IPv4.

_V4 = ipaddress.IPv4Address
# IPv4 addresses by their first byte: those of which some are special (0.0.0.0,
# 127/8, 169.254/16, 224/4, 255.255.255.255). One lookup clears nearly every address.
_V4_SUSPECT = tuple(b in (0, 127, 169, 255) or 224 <= b <= 239 for b in range(256))
_SPECIAL_BLOCKS: tuple[tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, str], ...] = tuple(
    (ipaddress.ip_network(cidr), kind)
    for cidr, kind in (
        ("0.0.0.0/32", "unspecified"),
        ("127.0.0.0/8", "loopback"),
        ("169.254.0.0/16", "link-local"),
        ("224.0.0.0/4", "multicast"),
        ("255.255.255.255/32", "broadcast"),
        ("::/128", "unspecified"),
        ("::1/128", "loopback"),
        ("fe80::/10", "link-local"),
        ("ff00::/8", "multicast"),
        ("::ffff:0:0/96", "IPv4-mapped"),
    )
)
_REFUSED = "which Kubernetes does not allow"


def _special(ip: IP) -> str | None:
    """What makes `ip` unusable as a service, endpoint or node address, or None."""
    if type(ip) is _V4 and not _V4_SUSPECT[int(ip) >> 24]:
        return None
    for block, kind in _SPECIAL_BLOCKS:
        if ip.version != block.version or ip not in block:
            continue
        if block.num_addresses == 1:
            return f"the {kind} address, {_REFUSED}"
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            return f"an {kind} IPv6 address, {_REFUSED}; write {ip.ipv4_mapped}"
        return f"a {kind} address ({block}), {_REFUSED}"
    return None


def _shown(ip: IP) -> str:
    """`ip` as a message shows it: an IPv4-mapped address in its usual `::ffff:a.b.c.d`
    form (Python before 3.13 prints `::ffff:a00:1`)."""
    mapped = getattr(ip, "ipv4_mapped", None)
    return f"::ffff:{mapped}" if mapped is not None else str(ip)


def _special_network(cidr: ipaddress.IPv4Network | ipaddress.IPv6Network) -> str | None:
    """The special range that holds all of `cidr` (no pod has such addresses), or None."""
    for block, kind in _SPECIAL_BLOCKS:
        # (the versions are equal, which mypy cannot see through the union)
        if cidr.version == block.version and cidr.subnet_of(block):  # type: ignore[arg-type]
            return f"the {kind} range {block}" if block.num_addresses > 1 else f"the {kind} address"
    return None


def _node(node: Node) -> Iterator[Found]:
    families: set[int] = set()
    for i, cidr in enumerate(node.pod_cidrs):
        if cidr.version in families:
            yield (
                ("node", "pod_cidrs", i),
                f"a second IPv{cidr.version} pod CIDR; give at most one per IP family",
            )
        families.add(cidr.version)
        why = _special_network(cidr)
        if why is not None:
            yield (("node", "pod_cidrs", i), f"pod CIDR {cidr} is inside {why}; pods cannot use it")
    seen: dict[IP, int] = {}
    for i, ip in enumerate(node.addresses):
        if ip in seen:
            yield (("node", "addresses", i), f"{ip} is listed twice (also addresses[{seen[ip]}])")
        seen.setdefault(ip, i)
        why = _special(ip)
        if why is not None:
            yield (("node", "addresses", i), f"node address {_shown(ip)} is {why}")


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


def _node_address_ports(node: Node, services: Indexed) -> Iterator[Found]:
    """An external or LB IP that is a node address, on a port that is a node port: the
    two frontends would claim one address, port and protocol."""
    own = set(node.addresses)
    outside = (ip for _, svc in services for ip in (*svc.external_ips, *svc.load_balancer_ips))
    if not any(ip in own for ip in outside):
        return
    node_ports: dict[tuple[str, int], str] = {}
    for _, svc in services:
        if svc.type != "ClusterIP":
            for port in svc.ports:
                if port.node_port is not None:
                    node_ports.setdefault(
                        (port.protocol, port.node_port), f"{_who(svc)}:{port.name or port.port}"
                    )
    for i, svc in services:
        for key in ("external_ips", "load_balancer_ips"):
            for j, ip in enumerate(getattr(svc, key)):
                if ip not in own:
                    continue
                for port in svc.ports:
                    other = node_ports.get((port.protocol, port.port))
                    if other is not None:
                        yield (
                            ("services", i, key, j),
                            f"{_hostport(ip, port.port)}/{port.protocol.lower()}: {ip} is a "
                            f"node address and {port.port} is the node port of {other}",
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
            # (`_special`'s own first test, inline: most addresses pass it, and a call
            # per cluster IP is noticeable with ten thousand services)
            why = _special(ip) if type(ip) is not _V4 or _V4_SUSPECT[int(ip) >> 24] else None
            if why is not None:
                yield (where, f"{_LABEL[key]} {_shown(ip)} is {why}")
                continue
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


def _ports(at: Path, svc: Service, by_type: bool = True) -> Iterator[Found]:
    """Port names and numbers, and (`by_type`) node ports against the service's type."""
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
        if not by_type:
            continue
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
    v4 = seen.get(_V4)
    suspect = _V4_SUSPECT
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
        n = int(ip)
        # An IPv4 address is cleared by its first byte here, without a call (there may be
        # a hundred thousand endpoints); the rest, and IPv6, by `_special`.
        if numbers is not v4 or suspect[n >> 24]:
            why = _special(ip)
            if why is not None:
                yield ((*at, "endpoints", j, "ip"), f"endpoint {_shown(ip)} is {why}")
                continue
        first = numbers.setdefault(n, j)
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


# The keys each check of one service reads: a service that failed the schema gets the
# check only if none of them is broken (a default in place of a broken key misleads).
# `_ports` reads `ports`, and `type` only for its node-port checks.
_READS: tuple[tuple[Callable[[Path, Service], Iterator[Found]], frozenset[str]], ...] = (
    (_addresses, frozenset(_ADDRESS_KEYS)),
    (
        _settings,
        frozenset(
            {
                "type",
                "external_ips",
                "load_balancer_ips",
                "load_balancer_source_ranges",
                "external_traffic_policy",
                "session_affinity",
                "session_affinity_timeout",
            }
        ),
    ),
    (_endpoints, frozenset({"cluster_ips", "endpoints"})),
)
_AGAINST_NODE_READS = frozenset({"cluster_ips", "ports", "type"})


def _name_only(svc: Service) -> Service:
    """`svc`'s namespace and name, without addresses or ports."""
    return Service.model_construct(namespace=svc.namespace, name=svc.name, cluster_ips=[], ports=[])


def _who(svc: Service) -> str:
    return f"{svc.namespace}/{svc.name}"


def _hostport(ip: IP, port: int) -> str:
    return f"[{ip}]:{port}" if ip.version == 6 else f"{ip}:{port}"
