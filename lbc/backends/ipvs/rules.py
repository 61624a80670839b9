"""The helper rules IPVS still needs, as one nftables table (`inet lbc-ipvs`).

IPVS only load-balances; packet marks, SNAT and filtering stay in netfilter. The
rules are fixed per address family and every service-dependent fact is a set
element, so a change of services or endpoints changes elements, not rules:

- nat prerouting and output mark packets for masquerading: to frontends that
  always masquerade, and to cluster IPs from outside the pod CIDR;
- nat postrouting masquerades marked packets and hairpin traffic (a backend that
  IPVS sent back to itself);
- filter input and output, before IPVS's own hooks (IPVS takes the node's own
  connections at local-out, priority -99), drop traffic from outside a load
  balancer's source ranges, reject or drop new connections to frontends whose
  pool is empty, and reject traffic to a virtual address on a port no service
  uses (a socket of the node listening on all addresses would answer).

On an empty pool: a connection to a virtual service without destinations is
refused at once, not silently dropped (measured on Linux 6.1): right for "reject",
wrong for "drop". The rules make both verdicts explicit instead of relying on it.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable

from lbc.backends.ipvs import names as n
from lbc.backends.ipvs.ops import PROTO_NUMBER
from lbc.ir.names import address_key
from lbc.ir.nodes import Empty, Frontend, Kind, Masquerade, Pool, Program

_ADDR_TYPE = {4: "ipv4_addr", 6: "ipv6_addr"}
_ADDR_MATCH = {4: "ip", 6: "ip6"}
# How each base chain hooks in. IPVS hooks local-in at priority 99 and local-out at
# -99 (the node's own connections): marks and filters must come first. nft accepts
# the keyword `dstnat` at prerouting only, hence -100 at output.
_BASE = {
    n.NAT_PREROUTING: "type nat hook prerouting priority dstnat; policy accept;",
    n.NAT_OUTPUT: "type nat hook output priority -100; policy accept;",
    n.NAT_POSTROUTING: "type nat hook postrouting priority srcnat; policy accept;",
    n.FILTER_INPUT: "type filter hook input priority filter; policy accept;",
    n.FILTER_OUTPUT: "type filter hook output priority -110; policy accept;",
}


def virtual_addresses(program: Program) -> list[str]:
    """Addresses to bind to the dummy interface: every frontend address but node ports'.

    A node's own address is local already; binding it again would take it over.
    """
    node = set(program.node.addresses)
    found = {
        f.address
        for f in program.frontends
        if f.kind is not Kind.NODE_PORT and f.address not in node
    }
    return sorted(found, key=address_key)


def render_rules(program: Program) -> str:
    """The `table inet lbc-ipvs { ... }` definition for `program` (pure, canonical)."""
    return _Rules(program).render()


class _Rules:
    def __init__(self, program: Program) -> None:
        self.program = program
        self.pools = program.pool_index()
        self.mark = f"{program.node.masquerade_mark:#x}"
        self.vips = virtual_addresses(program)

    def render(self) -> str:
        sets: list[str] = []
        marks: list[str] = []
        post: list[str] = []
        filters: list[str] = []
        for family in self.program.families():
            sets += self.family_sets(family)
            marks += self.mark_rules(family)
            post += self.hairpin_rules(family)
            filters += self.filter_rules(family)
        post += [
            f"meta mark & {self.mark} == 0 return",
            f"meta mark set meta mark ^ {self.mark}",
            "masquerade fully-random",
        ]
        chains = [
            (n.NAT_PREROUTING, [f"jump {n.MARK_FOR_MASQUERADE}"]),
            (n.NAT_OUTPUT, [f"jump {n.MARK_FOR_MASQUERADE}"]),
            (n.MARK_FOR_MASQUERADE, marks),
            (n.NAT_POSTROUTING, post),
            (n.FILTER_INPUT, [f"ct state new jump {n.SERVICE_FILTER}"]),
            (n.FILTER_OUTPUT, [f"ct state new jump {n.SERVICE_FILTER}"]),
            (n.SERVICE_FILTER, filters),
        ]
        out = [f"table {n.TABLE_FAMILY} {n.TABLE} {{", *sets]
        for name, rules in chains:
            out.append(f"\tchain {name} {{")
            out += [f"\t\t{line}" for line in ([_BASE[name]] if name in _BASE else []) + rules]
            out.append("\t}")
        return "\n".join([*out, "}"]) + "\n"

    # --- sets -------------------------------------------------------------------------
    def frontends(self, family: int) -> list[Frontend]:
        found = [f for f in self.program.frontends if f.family == family]
        return sorted(found, key=lambda f: (*address_key(f.address), PROTO_NUMBER[f.proto], f.port))

    def pool(self, f: Frontend) -> Pool:
        return self.pools[f.pool]

    def family_sets(self, family: int) -> list[str]:
        addr = _ADDR_TYPE[family]
        vport = f"{addr} . inet_proto . inet_service"
        frontends = self.frontends(family)
        cidr = self.program.node.pod_cidr(family)
        # Only backends whose own connections may pass this node (`Program.hairpin`).
        hairpin: dict[str, None] = {}
        others = self.program.open_to_other_nodes()
        for f in frontends:
            pool = self.pool(f)
            for b in pool.active:
                if self.program.hairpin(pool, b, others):
                    hairpin[f"{b.address} . {f.proto} . {b.port} . {b.address}"] = None
        empty = [f for f in frontends if not self.pool(f).active]
        sets = [
            (n.VIPS, addr, False, [a for a in self.vips if (":" in a) == (family == 6)]),
            (n.SERVICES, vport, False, [_key(f) for f in frontends]),
            (
                n.MASQUERADE_ALWAYS,
                vport,
                False,
                [_key(f) for f in frontends if f.masquerade is Masquerade.ALWAYS],
            ),
            (
                n.MASQUERADE_OFF_CLUSTER,
                vport,
                False,
                [_key(f) for f in frontends if cidr and f.masquerade is Masquerade.OFF_CLUSTER],
            ),
            (n.HAIRPIN, f"{vport} . {addr}", False, list(hairpin)),
            (n.FIREWALLED, vport, False, [_key(f) for f in frontends if f.source_ranges]),
            (
                n.SOURCE_RANGES,
                f"{vport} . {addr}",
                True,
                [
                    f"{_key(f)} . {r}"
                    for f in frontends
                    if f.source_ranges
                    for r in _ranges(f.source_ranges)
                ],
            ),
            (
                n.NO_ENDPOINTS_REJECT,
                vport,
                False,
                [_key(f) for f in empty if self.pool(f).when_empty is Empty.REJECT],
            ),
            (
                n.NO_ENDPOINTS_DROP,
                vport,
                False,
                [_key(f) for f in empty if self.pool(f).when_empty is Empty.DROP],
            ),
        ]
        out: list[str] = []
        for name, type_, interval, elements in sets:
            out += _set(name + n.family_suffix(family), type_, interval, elements)
        return out

    # --- rules ------------------------------------------------------------------------
    def mark_rules(self, family: int) -> list[str]:
        ip, sfx = _ADDR_MATCH[family], n.family_suffix(family)
        dest = f"{ip} daddr . meta l4proto . th dport"
        mark = f"meta mark set meta mark | {self.mark}"
        rules = [f"{dest} @{n.MASQUERADE_ALWAYS}{sfx} {mark}"]
        cidr = self.program.node.pod_cidr(family)
        if cidr:
            rules.append(f"{ip} saddr != {cidr} {dest} @{n.MASQUERADE_OFF_CLUSTER}{sfx} {mark}")
        return rules

    def hairpin_rules(self, family: int) -> list[str]:
        ip, sfx = _ADDR_MATCH[family], n.family_suffix(family)
        return [f"{ip} daddr . meta l4proto . th dport . {ip} saddr @{n.HAIRPIN}{sfx} masquerade"]

    def filter_rules(self, family: int) -> list[str]:
        ip, sfx = _ADDR_MATCH[family], n.family_suffix(family)
        dest = f"{ip} daddr . meta l4proto . th dport"
        return [
            f"{dest} @{n.FIREWALLED}{sfx} {dest} . {ip} saddr != @{n.SOURCE_RANGES}{sfx} drop",
            f"{dest} @{n.NO_ENDPOINTS_DROP}{sfx} drop",
            f"{dest} @{n.NO_ENDPOINTS_REJECT}{sfx} reject",
            f"{ip} daddr @{n.VIPS}{sfx} {dest} != @{n.SERVICES}{sfx} reject",
        ]


def _ranges(ranges: Iterable[str]) -> list[str]:
    """Source ranges as elements of an interval set, in the form nft lists them.

    An interval set refuses overlapping elements, so ranges inside others are merged
    away; a single address (/32, /128) is written without its prefix length.
    """
    networks = [ipaddress.ip_network(r, strict=False) for r in ranges]
    v4 = [n for n in networks if isinstance(n, ipaddress.IPv4Network)]
    v6 = [n for n in networks if isinstance(n, ipaddress.IPv6Network)]
    merged: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = [
        *ipaddress.collapse_addresses(v4),
        *ipaddress.collapse_addresses(v6),
    ]
    return [
        str(net.network_address) if net.prefixlen == net.max_prefixlen else str(net)
        for net in merged
    ]


def _key(f: Frontend) -> str:
    return f"{f.address} . {f.proto} . {f.port}"


def _set(name: str, type_: str, interval: bool, elements: Iterable[str]) -> list[str]:
    out = [f"\tset {name} {{", f"\t\ttype {type_}"]
    if interval:
        out.append("\t\tflags interval")
    items = list(elements)
    if items:
        out.append("\t\telements = {")
        out += [f"\t\t\t{item}," for item in items[:-1]] + [f"\t\t\t{items[-1]}"]
        out.append("\t\t}")
    return [*out, "\t}"]
