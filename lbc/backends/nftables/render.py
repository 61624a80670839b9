"""IR -> lbc's nftables ruleset (one `inet lbc` table), in kube-proxy's nftables shape.

Pure: no kernel, no files. Packet cost does not grow with the number of services:
the nat base chains jump to `services`, which finds a frontend's chain with ONE
verdict-map lookup keyed by `ip daddr . meta l4proto . th dport` (node ports: one
lookup keyed by `meta l4proto . th dport` on the node's addresses). Frontends without
usable endpoints are rejected or dropped, after DNAT, by the same kind of lookup in
`no-endpoint-services`; load-balancer source ranges are checked, before DNAT, by two
set lookups (is this a firewalled frontend; is `frontend . source` in the allowed
ranges).

Load time is linear in the number of services because the ruleset has no per-service
set or map: every anonymous set in a transaction is named `__map%d` by the kernel
(`nf_tables_set_alloc_name`), which scans every set of the table to find a free
number, and every named set is found by walking the table's set list. So instead of
kube-proxy's `numgen random mod N vmap { 0 : goto a, ... }`, a pool picks its backend
with chained rules, as iptables does with probabilities:
`numgen random mod 6 < 1 dnat to a`, `numgen random mod 5 < 2 dnat to b`, `dnat to c`
gives weights 1:2:3 the shares 1/6, 2/6, 3/6 exactly (as far as the kernel's draw
allows: `numgen random` scales a 32-bit random number, each fraction is within 2^-32).
The one exception is session
affinity, which needs a dynamic set per backend (kube-proxy's `affinity-` sets), so
services with ClientIP affinity still cost more to load, in proportion to their
backends. Their pools also keep a chain per backend, named as its set: the pool's
rules (known clients by set lookup, then the `numgen` choice) `goto` it, and it
remembers the client (`update @set { ip saddr }`) and DNATs in two rules, as
kube-proxy's endpoint chains do. The kernel abandons a rule whose `update` fails (a
full set), DNAT included; in a rule of its own, a full set costs new clients only
their stickiness, and each backend keeps its exact share. The set's name ends in
its timeout (`__600s`), so a new timeout is a new set of that service
(added, and the old one deleted) rather than a changed declaration, which only a
replacement of the whole table, and of every service's remembered clients, could
carry out.

Cluster-IP traffic is marked for masquerade in `services`, before the dispatch, by one
lookup per policy in `masquerade-always4`/`masquerade-off-cluster4` (and the `6`s) of
`address . l4proto . port`, not by a rule in every pool's chain: a pool's chain is its
choice of backend alone. The kernel revalidates every rule of the table on each
transaction that adds one (docs/kernel-notes.md), so rules that are not there cost
nothing then.

Otherwise no chain per endpoint: the rule that picks a backend also DNATs to it, and hairpin
traffic (a backend reaching its own service) is marked for masquerade in nat
postrouting by one lookup of `saddr . daddr` in `hairpin-ips4`/`hairpin-ips6`, which
hold a `backend . backend` pair per backend (after DNAT, such a packet's source and
destination are the same backend), for DNATed packets only (`ct status dnat`): a
backend on the node's own address would otherwise masquerade every connection of the
node to itself. kube-proxy makes a chain per endpoint for the
hairpin mark; at 10k services × 10 endpoints that is 100k chains more, which makes
loading several times slower and the kernel's validation of the table — repeated on
every transaction that adds a rule — about five times longer.

Why one `inet` table rather than `ip lbc` and `ip6 lbc`: lbc compiles both families
from one program and replaces its rules in one transaction, so one table is one
object to own, replace (`add`, `delete`, `add` table) and delete, and the base chains,
the masquerade rule and the reject chain exist once. The cost is that sets and maps
keyed by an address exist per family (`service-ips4`, `service-ips6`) and their
lookups are written per family; `reject` in an inet table answers with ICMP or ICMPv6
as the packet needs.
"""

from __future__ import annotations

import functools
import ipaddress
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import NamedTuple

from lbc.backends.nftables import names as n
from lbc.backends.nftables.expr import (
    AnyChain,
    BaseHook,
    BinOp,
    Chain,
    Concat,
    Ct,
    Dnat,
    Element,
    Expr,
    Fib,
    Mangle,
    Masquerade,
    Match,
    Meta,
    NamedSet,
    Numgen,
    Payload,
    Prefix,
    Reject,
    Rule,
    Ruleset,
    SetRef,
    SetUpdate,
    Statement,
    Value,
    Verdict,
    Vmap,
)
from lbc.ir.names import digest
from lbc.ir.nodes import Empty, Frontend, Kind, NodeInfo, Pool, Program
from lbc.ir.nodes import Masquerade as Masq

_L4PROTO = Meta("l4proto")
_DPORT = Payload("th", "dport")
_MARK = Meta("mark")
_NEW = Match(Ct("state"), Value("new"), op="in")
_DNAT = Match(Ct("status"), Value("dnat"), op="in")
# Expressions are immutable: one instance of each serves every rule that uses it.
_SADDR = {4: Payload("ip", "saddr"), 6: Payload("ip6", "saddr")}


def ip_proto(family: int) -> str:
    """The payload protocol of an address family: `ip` or `ip6`."""
    return "ip" if family == 4 else "ip6"


def addr_type(family: int) -> str:
    """The nft data type of an address of `family`."""
    return "ipv4_addr" if family == 4 else "ipv6_addr"


def shares(weights: list[int]) -> list[tuple[int, int]]:
    """(numerator, modulus) of each chained `numgen random mod M < K` rule but the last.

    Rule i fires with chance w_i / (w_i + ... + w_n) given that no earlier rule did, so
    backend i is chosen with chance w_i / total, exactly (the kernel's 32-bit draw puts
    each rule's chance within 2^-32 of its fraction). Fractions are reduced.
    """
    return list(shares_of(tuple(weights)))


@functools.lru_cache(maxsize=4096)
def shares_of(weights: tuple[int, ...]) -> tuple[tuple[int, int], ...]:
    """`shares` of a tuple of weights, made once per tuple (most pools have equal ones)."""
    out = []
    remaining = sum(weights)
    for w in weights[:-1]:
        g = math.gcd(w, remaining)
        out.append((w // g, remaining // g))
        remaining -= w
    return tuple(out)


# Pool and endpoint chains are kept as the facts they are made of, and their rules are
# made when read: at 100k endpoints the ruleset then holds one small object per chain
# rather than a dozen per endpoint (rules, matches, values) that the garbage collector
# would walk again and again while the ruleset grows. An endpoint chain is a tuple of
# strings and integers, which the collector stops tracking altogether. Both print
# their rules' text directly (`lines`), the same text as their rules' `text()`.


class PoolChain(NamedTuple):
    """A pool's chain: the weighted choice, each choice a DNAT in the same rule (no
    chain per endpoint); with affinity, known clients first and each choice a `goto`
    to the backend's affinity chain (`affinity_rules`)."""

    name: str
    family: int
    backends: tuple[tuple[str, int], ...]  # (address, port) of the active backends
    proto: str  # tcp, udp or sctp
    weights: tuple[int, ...]
    affinity: tuple[str, ...] | None  # their affinity sets, if the pool has affinity

    @property
    def base(self) -> None:
        """Never a base chain."""
        return None

    @property
    def rules(self) -> tuple[Rule, ...]:
        """Known clients to their backend; then `numgen` chances, the last one certain.

        With affinity, each choice is a `goto` to the backend's affinity chain
        (`affinity_rules`), which remembers the client and DNATs in two rules.
        """
        affinity = self.affinity
        if affinity is not None:
            saddr = _SADDR[self.family]
            rules = [
                Rule((Match(saddr, SetRef(set_name)), Verdict("goto", affinity_chain(set_name))))
                for set_name in affinity
            ]
            gotos = [Verdict("goto", affinity_chain(set_name)) for set_name in affinity]
            for i, (k, m) in enumerate(shares_of(self.weights)):
                rules.append(Rule((Match(Numgen(m), Value(k), op="<"), gotos[i])))
            rules.append(Rule((gotos[-1],)))
            return tuple(rules)
        family = ip_proto(self.family)
        l4proto = Match(_L4PROTO, Value(self.proto))
        dnat = [Dnat(family, address, port) for address, port in self.backends]
        out = [
            Rule((l4proto, Match(Numgen(m), Value(k), op="<"), dnat[i]))
            for i, (k, m) in enumerate(shares_of(self.weights))
        ]
        out.append(Rule((l4proto, dnat[-1])))
        return tuple(out)

    def lines(self) -> list[str]:
        """The text of `rules`."""
        if self.affinity is not None:
            return [r.text() for r in self.rules]
        l4proto = f"meta l4proto {self.proto}"
        if self.family == 4:
            dnat = [f"dnat ip to {address}:{port}" for address, port in self.backends]
        else:
            dnat = [f"dnat ip6 to [{address}]:{port}" for address, port in self.backends]
        out = [
            f"{l4proto} numgen random mod {m} < {k} {to}"
            for to, (k, m) in zip(dnat, shares_of(self.weights), strict=False)
        ]
        out.append(f"{l4proto} {dnat[-1]}")
        return out


def affinity_chain(set_name: str) -> str:
    """The chain of an affinity set's backend: the set's name, in chains' own namespace."""
    return set_name


def affinity_rules(set_name: str, family: int, proto: str, address: str, port: int) -> Chain:
    """A backend of a pool with affinity: remember the client, then DNAT, in two rules.

    As in kube-proxy's endpoint chains: the kernel abandons a rule whose `update` fails
    (the set is full), so the DNAT is a rule of its own and a full set costs only the
    stickiness of new clients, never their connection. The share stays exact: the pool
    chain's `numgen` rule chose this chain before the `update`.
    """
    saddr = _SADDR[family]
    return Chain(
        affinity_chain(set_name),
        (
            Rule((SetUpdate(set_name, saddr),)),
            Rule((Match(_L4PROTO, Value(proto)), Dnat(ip_proto(family), address, port))),
        ),
    )


def build(program: Program) -> Ruleset:
    """The whole `inet lbc` table for `program`."""
    return _Builder(program).build()


@dataclass
class _Sets:
    """The elements of every per-family set and map, gathered while frontends are visited."""

    elements: dict[str, list[Element]] = field(default_factory=dict)

    def add(self, name: str, element: Element) -> None:
        self.elements.setdefault(name, []).append(element)

    def has(self, name: str) -> bool:
        return bool(self.elements.get(name))


class _Builder:
    def __init__(self, program: Program) -> None:
        self.program = program
        self.pools = program.pool_index()
        self.mark = Value(program.node.masquerade_mark, hex=True)
        # Statements are immutable: one instance serves every rule (fewer objects to make).
        self.set_mark = Mangle(_MARK, BinOp("|", _MARK, self.mark))
        self.chains: dict[str, list[Rule] | PoolChain | Chain] = {}
        self.affinity_made: set[str] = set()
        self.hairpin_made: set[tuple[str, str]] = set()
        self.open_to_other_nodes = program.open_to_other_nodes()
        self.sets = _Sets()
        self.affinity: list[NamedSet] = []
        self.cluster_ips: dict[str, list[Frontend]] = {}  # pool id -> its cluster-IP frontends
        # Shared, made on first use: the pod CIDR by family.
        self.pod_cidrs: dict[int, Prefix | None] = {}
        for f in program.frontends:
            if f.kind is Kind.CLUSTER_IP:
                self.cluster_ips.setdefault(f.pool, []).append(f)

    # --- whole table --------------------------------------------------------------
    def build(self) -> Ruleset:
        families = self.program.families()
        for family in families:
            self.frontends(family)
        for address in self.program.reject_unknown:
            family = 6 if ":" in address else 4
            self.sets.add(n.per_family(n.CLUSTER_IPS, family), Element(Value(address)))
        for pool in self.program.pools:
            self.pool_chain(pool)
        for f in self.program.frontends:
            self.external_chain(f)
        shared = self.shared_chains(families)
        per_service = [
            Chain(name, tuple(rules)) if isinstance(rules, list) else rules
            for name, rules in self.chains.items()
        ]
        return Ruleset(
            family=n.FAMILY,
            table=n.TABLE,
            sets=(*self.named_sets(families), *self.affinity),
            chains=(*shared, *per_service),
        )

    def mark_for_masquerade(self, *matches: Statement, comment: str | None = None) -> Rule:
        return Rule((*matches, self.set_mark), comment)

    def shared_chains(self, families: tuple[int, ...]) -> list[AnyChain]:
        """Base chains and the chains every service shares; only the parts in use."""
        return shared_chains(self.program.node, families, self.sets.has, self.uses_reject())

    def uses_reject(self) -> bool:
        return any(
            e.verdict is not None and e.verdict.target == n.REJECT_CHAIN
            for elements in self.sets.elements.values()
            for e in elements
        )

    def named_sets(self, families: tuple[int, ...]) -> list[NamedSet]:
        out = []
        for family in families:
            for name, key_types, is_map, flags in set_shapes(family):
                if self.sets.has(name):
                    elements = tuple(self.sets.elements[name])
                    out.append(NamedSet(name, key_types, elements, is_map, flags))
        return out

    # --- frontends: the elements of the dispatch maps ------------------------------
    def frontends(self, family: int) -> None:
        mine = [f for f in self.program.frontends if f.family == family]
        node_port_addresses = sorted(
            {f.address for f in mine if f.kind is Kind.NODE_PORT}, key=ipaddress.ip_address
        )
        by_port: dict[tuple[str, int], list[Frontend]] = {}
        for f in mine:
            if f.kind is Kind.NODE_PORT:
                by_port.setdefault((f.proto, f.port), []).append(f)
            else:
                self.frontend(f, per_port=False)
            if f.source_ranges:
                self.firewall(f)
        grouped = False
        for group in by_port.values():
            # A node port open on every node-port address, all to one place, is one
            # `l4proto . port` element; anything else stays an address element.
            addresses = sorted({f.address for f in group}, key=ipaddress.ip_address)
            one_place = len({(self.target(f), self.no_endpoint_verdict(f)) for f in group}) == 1
            if addresses == node_port_addresses and one_place:
                self.frontend(group[0], per_port=True)
                grouped = True
            else:
                for f in group:
                    self.frontend(f, per_port=False)
        if grouped:
            for address in node_port_addresses:
                self.sets.add(n.per_family(n.NODEPORT_IPS, family), Element(Value(address)))

    def frontend(self, f: Frontend, per_port: bool) -> None:
        key: Expr
        if per_port:
            key = Concat((Value(f.proto), Value(f.port)))
            dispatch, no_endpoints = n.SERVICE_NODEPORTS, n.NO_ENDPOINT_NODEPORTS
        else:
            key = Concat((Value(f.address), Value(f.proto), Value(f.port)))
            dispatch, no_endpoints = n.SERVICE_IPS, n.NO_ENDPOINT_SERVICES
        target = self.target(f)
        if target is not None:
            self.sets.add(n.per_family(dispatch, f.family), Element(key, Verdict("goto", target)))
        verdict = self.no_endpoint_verdict(f)
        if verdict is not None:
            self.sets.add(n.per_family(no_endpoints, f.family), Element(key, verdict))

    def firewall(self, f: Frontend) -> None:
        frontend = (Value(f.address), Value(f.proto), Value(f.port))
        self.sets.add(n.per_family(n.FIREWALL_IPS, f.family), Element(Concat(frontend)))
        networks = [ipaddress.ip_network(r, strict=False) for r in f.source_ranges]
        v4 = [net for net in networks if isinstance(net, ipaddress.IPv4Network)]
        v6 = [net for net in networks if isinstance(net, ipaddress.IPv6Network)]
        # An interval set refuses overlapping elements: merge them first.
        merged: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = [
            *ipaddress.collapse_addresses(v4),
            *ipaddress.collapse_addresses(v6),
        ]
        for net in merged:
            # One address is an element of its own, as nft lists it (not a /32 prefix).
            single = net.prefixlen == net.max_prefixlen
            source: Value | Prefix = (
                Value(str(net.network_address))
                if single
                else Prefix(str(net.network_address), net.prefixlen)
            )
            self.sets.add(
                n.per_family(n.FIREWALL_ALLOW, f.family), Element(Concat((*frontend, source)))
            )

    def target(self, f: Frontend) -> str | None:
        """The chain a frontend's new connections go to, or None when nothing serves them."""
        pool = self.pools[f.pool]
        if f.kind is Kind.CLUSTER_IP:
            return self.pool_name(pool) if pool.active else None
        if not pool.active and f.internal_pool is None:
            return None
        return self.external_name(f)

    def no_endpoint_verdict(self, f: Frontend) -> Verdict | None:
        """Reject or drop for a frontend whose pool is empty (only undNATed packets meet it)."""
        pool = self.pools[f.pool]
        if pool.active:
            return None
        if pool.when_empty is Empty.REJECT:
            return Verdict("goto", n.REJECT_CHAIN)
        return Verdict("drop")

    # --- per-pool and per-endpoint chains -------------------------------------------
    def pool_name(self, pool: Pool) -> str:
        prefix = n.LOCAL if pool.local_only else n.SERVICE
        return n.object_name(prefix, pool.id, n.readable(pool.service, pool.proto))

    def affinity_names(self, pool: Pool) -> n.EndpointNames:
        return n.EndpointNames(n.AFFINITY, pool.service, pool.proto)

    def external_name(self, f: Frontend) -> str:
        content = digest(f"{f.pool}/{f.masquerade}/{f.internal_pool}")
        return n.object_name(n.EXTERNAL, content, n.readable(f.service, f.proto))

    def pool_chain(self, pool: Pool) -> None:
        active = pool.active
        if not active:
            return
        # Its cluster-IP frontends' traffic is marked for masquerade in `services`, by
        # one set lookup per policy (all of it, or from outside the pod CIDR).
        for f in self.cluster_ips.get(pool.id, []):
            kind = self.mark_kind(f)
            if kind is not None:
                key = Concat((Value(f.address), Value(f.proto), Value(f.port)))
                self.sets.add(n.per_family(kind, f.family), Element(key))
        sets: tuple[str, ...] | None = None
        timeout = pool.affinity_timeout
        family = pool.family
        if timeout is not None:
            affinity = self.affinity_names(pool)
            # The timeout is part of the set's name: a new timeout is a new set (and
            # chain) of this service alone, never a changed declaration, which only a
            # replacement of the whole table could carry out.
            suffix = n.timeout_suffix(timeout)
            sets = tuple([affinity.name(b.id, b.address, b.port, suffix) for b in active])
            for set_name, b in zip(sets, active, strict=True):
                if set_name not in self.affinity_made:  # a backend in a service's two pools
                    self.affinity_made.add(set_name)
                    self.affinity.append(
                        NamedSet(
                            set_name,
                            (addr_type(family),),
                            flags=("dynamic", "timeout"),
                            timeout=timeout,
                        )
                    )
                    self.chains[affinity_chain(set_name)] = affinity_rules(
                        set_name, family, str(pool.proto), b.address, b.port
                    )
        name = self.pool_name(pool)
        weights = tuple([b.weight for b in active])
        backends = tuple([(b.address, b.port) for b in active])
        self.chains[name] = PoolChain(name, family, backends, str(pool.proto), weights, sets)
        # A backend that reaches its own service is masqueraded (hairpin): nat
        # postrouting marks `saddr . daddr` pairs of this set, after DNAT. Only for
        # backends whose connections may pass this node's rules (`Program.hairpin`:
        # not those on another node, unless a pod elsewhere can reach the pool here
        # unmasqueraded); kube-proxy marks every endpoint.
        hairpin = n.per_family(n.HAIRPIN, family)
        for b in active:
            if not self.program.hairpin(pool, b, self.open_to_other_nodes):
                continue
            address = b.address
            if (hairpin, address) not in self.hairpin_made:
                self.hairpin_made.add((hairpin, address))
                value = Value(address)  # one immutable value serves both halves
                self.sets.add(hairpin, Element(Concat((value, value))))

    def mark_kind(self, f: Frontend) -> str | None:
        """The set that marks a cluster-IP frontend's traffic for masquerade, as its
        policy says (all of it, or from outside the pod CIDR), or None for none."""
        if f.masquerade is Masq.ALWAYS:
            return n.MARK_ALWAYS
        if f.masquerade is Masq.OFF_CLUSTER and self.pod_cidr(f.family):
            return n.MARK_OFF_CLUSTER
        return None

    def masquerade(self, f: Frontend) -> tuple[Statement, ...] | None:
        """The matches that select the packets to mark, or None for no marking at all."""
        if f.masquerade is Masq.ALWAYS:
            return ()
        pod_cidr = self.pod_cidr(f.family)
        if f.masquerade is Masq.OFF_CLUSTER and pod_cidr:
            return (Match(_SADDR[f.family], pod_cidr, op="!="),)
        return None

    def pod_cidr(self, family: int) -> Prefix | None:
        """The node's pod CIDR of `family` as a prefix, if it has one."""
        if family not in self.pod_cidrs:
            cidr = self.program.node.pod_cidr(family)
            self.pod_cidrs[family] = _prefix(cidr) if cidr else None
        return self.pod_cidrs[family]

    def external_chain(self, f: Frontend) -> None:
        if f.kind is Kind.CLUSTER_IP or self.target(f) is None:
            return
        name = self.external_name(f)
        if name in self.chains:
            return
        pool = self.pools[f.pool]
        family = ip_proto(f.family)
        rules: list[Rule] = []
        internal = self.pools[f.internal_pool] if f.internal_pool else None
        if internal is not None and internal.active:
            to_internal = Verdict("goto", self.pool_name(internal))
            pod_cidr = self.pod_cidr(f.family)
            local = Match(Fib("saddr", "type"), Value("local"))
            if pod_cidr:
                rules.append(
                    Rule(
                        (Match(Payload(family, "saddr"), pod_cidr), to_internal),
                        "pods reach external addresses through the cluster pool",
                    )
                )
            rules.append(
                self.mark_for_masquerade(local, comment="masquerade the node's own traffic")
            )
            rules.append(Rule((local, to_internal), "the node reaches them the same way"))
        masq = self.masquerade(f)
        if masq is not None:
            rules.append(self.mark_for_masquerade(*masq))
        if pool.active:
            rules.append(Rule((Verdict("goto", self.pool_name(pool)),)))
        self.chains[name] = rules


SetShape = tuple[str, tuple[str, ...], bool, tuple[str, ...]]


def set_shapes(family: int) -> list[SetShape]:
    """(name, key types, is a map, flags) of every shared set and map of `family`."""
    addr = addr_type(family)
    by_ip = (addr, "inet_proto", "inet_service")
    by_port = ("inet_proto", "inet_service")
    shapes: list[SetShape] = [
        (n.SERVICE_IPS, by_ip, True, ()),
        (n.NODEPORT_IPS, (addr,), False, ()),
        (n.SERVICE_NODEPORTS, by_port, True, ()),
        (n.NO_ENDPOINT_SERVICES, by_ip, True, ()),
        (n.NO_ENDPOINT_NODEPORTS, by_port, True, ()),
        (n.FIREWALL_IPS, by_ip, False, ()),
        (n.FIREWALL_ALLOW, (*by_ip, addr), False, ("interval",)),
        (n.CLUSTER_IPS, (addr,), False, ()),
        (n.HAIRPIN, (addr, addr), False, ()),
        (n.MARK_ALWAYS, by_ip, False, ()),
        (n.MARK_OFF_CLUSTER, by_ip, False, ()),
    ]
    return [
        (n.per_family(name, family), keys, is_map, flags) for name, keys, is_map, flags in shapes
    ]


def shared_chains(
    node: NodeInfo,
    families: tuple[int, ...],
    has: Callable[[str], bool],
    uses_reject: bool,
) -> list[AnyChain]:
    """Base chains and the chains every service shares; only the parts in use.

    They depend on the services only through which shared sets have elements (`has`)
    and whether any no-endpoint verdict goes to the reject chain.
    """
    chains: list[AnyChain] = []
    mark = Value(node.masquerade_mark, hex=True)
    set_mark = Mangle(_MARK, BinOp("|", _MARK, mark))

    def base(name: str, *rules: Rule) -> None:
        chains.append(Chain(name, rules, BaseHook(*n.BASE_CHAINS[name])))

    def lookups(families: tuple[int, ...] | list[int], by_ip: str, by_port: str) -> list[Rule]:
        """The one-lookup dispatch rules of each family: by address, then node ports."""
        rules = []
        for family in families:
            daddr = Payload(ip_proto(family), "daddr")
            if has(n.per_family(by_ip, family)):
                key = Concat((daddr, _L4PROTO, _DPORT))
                rules.append(Rule((Vmap(key, n.per_family(by_ip, family)),)))
            if has(n.per_family(by_port, family)):
                rules.append(
                    Rule(
                        (
                            Match(daddr, SetRef(n.per_family(n.NODEPORT_IPS, family))),
                            Vmap(Concat((_L4PROTO, _DPORT)), n.per_family(by_port, family)),
                        )
                    )
                )
        return rules

    firewall = [f for f in families if has(n.per_family(n.FIREWALL_IPS, f))]
    no_endpoints = [
        f
        for f in families
        if has(n.per_family(n.NO_ENDPOINT_SERVICES, f))
        or has(n.per_family(n.NO_ENDPOINT_NODEPORTS, f))
    ]
    if firewall:
        to_firewall = Rule((_NEW, Verdict("jump", n.FIREWALL_CHECK)))
        base(n.FILTER_PREROUTING, to_firewall)
        base(n.FILTER_OUTPUT, to_firewall)
    cluster_ips = [f for f in families if has(n.per_family(n.CLUSTER_IPS, f))]
    # After DNAT: whatever still heads for a frontend or a cluster IP found no backend.
    post_dnat: dict[str, list[Rule]] = {
        n.FILTER_INPUT: [],
        n.FILTER_FORWARD: [],
        n.FILTER_OUTPUT_POST_DNAT: [],
    }
    if no_endpoints:
        to_check = Rule((_NEW, Verdict("jump", n.ENDPOINTS_CHECK)))
        for rules in post_dnat.values():
            rules.append(to_check)
    if cluster_ips:
        to_cluster_check = Rule((_NEW, Verdict("jump", n.CLUSTER_IPS_CHECK)))
        post_dnat[n.FILTER_FORWARD].append(to_cluster_check)
        post_dnat[n.FILTER_OUTPUT_POST_DNAT].append(to_cluster_check)
    for name, rules in post_dnat.items():
        if rules:
            base(name, *rules)
    to_services = Rule((Verdict("jump", n.SERVICES),))
    base(n.NAT_PREROUTING, to_services)
    base(n.NAT_OUTPUT, to_services)
    hairpin = [
        Rule(
            (
                # Only DNATed traffic: a backend on the node's own address (host
                # network) would otherwise masquerade all the node's traffic to itself.
                _DNAT,
                Match(
                    Concat((Payload(ip_proto(f), "saddr"), Payload(ip_proto(f), "daddr"))),
                    SetRef(n.per_family(n.HAIRPIN, f)),
                ),
                Mangle(_MARK, BinOp("|", _MARK, mark)),
            ),
            "a backend reaching itself through a service",
        )
        for f in families
        if has(n.per_family(n.HAIRPIN, f))
    ]
    base(
        n.NAT_POSTROUTING,
        *hairpin,
        Rule(
            (
                Match(BinOp("&", _MARK, mark), Value(0, hex=True), op="!="),
                Mangle(_MARK, BinOp("^", _MARK, mark)),
                Masquerade(),
            ),
            "masquerade what lbc marked",
        ),
    )
    marks = []
    for family in families:
        frontend = Concat((Payload(ip_proto(family), "daddr"), _L4PROTO, _DPORT))
        if has(n.per_family(n.MARK_ALWAYS, family)):
            always = Match(frontend, SetRef(n.per_family(n.MARK_ALWAYS, family)))
            marks.append(Rule((always, set_mark)))
        pod_cidr = node.pod_cidr(family)
        if pod_cidr and has(n.per_family(n.MARK_OFF_CLUSTER, family)):
            outside = Match(_SADDR[family], _prefix(pod_cidr), op="!=")
            off = Match(frontend, SetRef(n.per_family(n.MARK_OFF_CLUSTER, family)))
            marks.append(Rule((outside, off, set_mark)))
    dispatch = lookups(families, n.SERVICE_IPS, n.SERVICE_NODEPORTS)
    chains.append(Chain(n.SERVICES, (*marks, *dispatch)))
    if firewall:
        rules = []
        for family in firewall:
            daddr = Payload(ip_proto(family), "daddr")
            saddr = Payload(ip_proto(family), "saddr")
            frontend = Concat((daddr, _L4PROTO, _DPORT))
            allowed = Concat((daddr, _L4PROTO, _DPORT, saddr))
            rules.append(
                Rule(
                    (
                        Match(frontend, SetRef(n.per_family(n.FIREWALL_IPS, family))),
                        Match(
                            allowed,
                            SetRef(n.per_family(n.FIREWALL_ALLOW, family)),
                            op="!=",
                        ),
                        Verdict("drop"),
                    ),
                    "source not in the frontend's source ranges",
                )
            )
        chains.append(Chain(n.FIREWALL_CHECK, tuple(rules)))
    if no_endpoints:
        rules = lookups(no_endpoints, n.NO_ENDPOINT_SERVICES, n.NO_ENDPOINT_NODEPORTS)
        chains.append(Chain(n.ENDPOINTS_CHECK, tuple(rules)))
    if cluster_ips:
        checks = tuple(
            Rule(
                (
                    Match(
                        Payload(ip_proto(f), "daddr"),
                        SetRef(n.per_family(n.CLUSTER_IPS, f)),
                    ),
                    Reject(f),
                ),
                "a port or protocol no service uses on a cluster IP",
            )
            for f in cluster_ips
        )
        chains.append(Chain(n.CLUSTER_IPS_CHECK, checks))
    if uses_reject:
        chains.append(Chain(n.REJECT_CHAIN, (Rule((Reject(),)),)))
    return chains


def _prefix(cidr: str) -> Prefix:
    net = ipaddress.ip_network(cidr, strict=False)
    return Prefix(str(net.network_address), net.prefixlen)
