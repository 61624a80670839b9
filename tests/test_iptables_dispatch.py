"""The iptables dispatch tree: a new connection walks a bounded number of rules.

Packets are walked through the rendered chains the way the kernel does it: rule by
rule, into a chain on a matching jump, back out when a chain ends without a verdict.
The walk counts every rule it evaluates until the frontend's own rule matches. The
tree must give the same first match as kube-proxy's flat layout (rendered with
`split_above=None`) for every packet, while walking far fewer rules; a namespace
test sends real traffic through a 2,000-service tree.
"""

from __future__ import annotations

import ipaddress
import json
import random
import shlex
import socket
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cache

import pytest

import lbc
from bench.gen import generate
from lbc.backends.iptables import kernel as ipt_kernel
from lbc.backends.iptables import names as n
from lbc.backends.iptables.dispatch import SPLIT_ABOVE, address_text
from lbc.backends.iptables.render import render_family
from lbc.compiler.lower import lower
from lbc.ir.nodes import Program
from tests import netns
from tests.test_iptables_render import parse_restore, tree_config

BOUND = 100  # rules a new connection may walk to reach any frontend, at any size
BIG = 30_000
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
Chains = dict[str, list[str]]  # one table's chains and their rules, in declaration order


def tables_of(doc: str) -> dict[str, Chains]:
    """The chains of each table of a restore document."""
    return {name: table.by_chain() for name, table in parse_restore(doc).items()}


# --- a packet walker over rendered chains -----------------------------------------------
@dataclass(frozen=True)
class Packet:
    """What the dispatch rules look at: destination, protocol, port, source."""

    destination: IPAddress
    proto: str
    port: int
    source: IPAddress


@dataclass(frozen=True)
class Rule:
    """One rule, parsed for the matches lbc's dispatch chains use; anything else fails."""

    text: str
    destination: IPNetwork | None
    source: IPNetwork | None
    proto: str | None
    ports: tuple[int, int] | None
    target: str

    @classmethod
    def parse(cls, text: str) -> Rule:
        words = shlex.split(text)
        found: dict[str, str] = {}
        i = 0
        while words[i] != "-j":
            word = words[i]
            if word in ("-d", "-s", "-p"):
                found[word] = words[i + 1]
                i += 2
            elif word == "-m" and words[i + 1] == "comment" and words[i + 2] == "--comment":
                i += 4
            elif word == "-m" and words[i + 1] == found.get("-p") and words[i + 2] == "--dport":
                found["--dport"] = words[i + 3]
                i += 4
            else:
                raise AssertionError(f"the walker does not know {word!r} in {text!r}")
        low, _, high = found.get("--dport", "").partition(":")
        return cls(
            text,
            ipaddress.ip_network(found["-d"]) if "-d" in found else None,
            ipaddress.ip_network(found["-s"]) if "-s" in found else None,
            found.get("-p"),
            (int(low), int(high or low)) if low else None,
            words[i + 1],
        )

    def matches(self, packet: Packet) -> bool:
        return (
            (self.destination is None or packet.destination in self.destination)
            and (self.source is None or packet.source in self.source)
            and (self.proto is None or self.proto == packet.proto)
            and (self.ports is None or self.ports[0] <= packet.port <= self.ports[1])
        )


class Walker:
    """Walks packets through one table's dispatch chains (and into LBC-NODEPORTS)."""

    def __init__(self, table: Chains) -> None:
        self.chains = {
            chain: [Rule.parse(rule) for rule in rules]
            for chain, rules in table.items()
            if is_dispatch(chain)
        }

    def walk(self, packet: Packet, chain: str = n.SERVICES) -> tuple[Rule | None, int, list[str]]:
        """(the rule that takes the packet or None, rules evaluated, chains entered)."""
        evaluated, path = 0, [chain]
        for rule in self.chains[chain]:
            evaluated += 1
            if not rule.matches(packet):
                continue
            if rule.target in self.chains:
                found, more, below = self.walk(packet, rule.target)
                evaluated += more
                path += below
                if found is not None:
                    return found, evaluated, path
                continue  # the chain ended: back in this one, at the next rule
            return rule, evaluated, path
        return None, evaluated, path


def packet_for(rule: Rule, source: str) -> Packet:
    """A packet that the frontend rule `rule` matches (its first port, its address)."""
    assert rule.destination is not None and rule.proto is not None and rule.ports is not None
    assert rule.destination.num_addresses == 1, rule.text
    return Packet(
        rule.destination.network_address, rule.proto, rule.ports[0], ipaddress.ip_address(source)
    )


def is_dispatch(chain: str) -> bool:
    """A root dispatch chain or a chain of a tree under one."""
    return chain in (n.SERVICES, n.NODEPORTS, n.CLUSTER_IPS) or chain.startswith(n.DSP)


UNKNOWN_PORT = "no service uses this port of the cluster IP"  # the catch-all REJECTs


def is_frontend(rule: str) -> bool:
    """A frontend's own rule, not a branch rule, a node-address jump or a catch-all."""
    return (
        f"-j {n.DSP}" not in rule
        and f"-j {n.NODEPORTS}" not in rule
        and f"-j {n.CLUSTER_IPS}" not in rule
        and UNKNOWN_PORT not in rule
    )


def frontend_rules(table: Chains) -> list[Rule]:
    """The frontend rules of a table's dispatch chains, flat or tree, in chain order."""
    return [
        Rule.parse(rule)
        for chain, rules in table.items()
        if is_dispatch(chain)
        for rule in rules
        if is_frontend(rule)
    ]


# --- rendering ------------------------------------------------------------------------
@dataclass(frozen=True)
class Rendered:
    """One family's tables, as a tree and as kube-proxy's flat layout."""

    tree: dict[str, Chains]
    flat: dict[str, Chains]


def render(program: Program, family: int) -> Rendered:
    return Rendered(
        tables_of(render_family(program, family)),
        tables_of(render_family(program, family, split_above=None)),
    )


@cache
def big(endpoints: int) -> Rendered:
    """30,000 generated services (1 in 100 NodePort or LoadBalancer), IPv4."""
    text, _ = generate(BIG, endpoints, seed=3, external=True)
    return render(lower(lbc.loads(text)), 4)


@cache
def mixed() -> dict[int, Rendered]:
    """Every kind of frontend in both families (the render tests' dispatch-tree config)."""
    program = lower(lbc.loads(tree_config()))
    return {family: render(program, family) for family in (4, 6)}


def dispatch_chains(tables: dict[str, Chains]) -> Chains:
    """`table chain` -> rules, for the roots and every dispatch chain of both tables."""
    return {
        f"{name} {chain}": rules
        for name, table in tables.items()
        for chain, rules in table.items()
        if is_dispatch(chain)
    }


# --- bounds at 30,000 services ------------------------------------------------------------
@pytest.mark.parametrize(
    ("endpoints", "table"),
    [pytest.param(1, "nat", id="nat"), pytest.param(0, "filter", id="filter-no-endpoints")],
)
def test_every_frontend_is_reached_by_its_own_rule_in_a_bounded_walk(
    endpoints: int, table: str
) -> None:
    """30,000 services: each frontend's packet ends at its own rule within BOUND rules.

    With endpoints, the nat table dispatches every frontend; without, the filter table
    rejects every one of them (it is walked by every new connection).
    """
    rendered = big(endpoints)
    tree, flat = rendered.tree[table], rendered.flat[table]
    walker, rules = Walker(tree), frontend_rules(flat)
    assert len(rules) > BIG  # some services have two ports; node ports come on top
    walked = []
    for rule in rules:
        found, evaluated, _ = walker.walk(packet_for(rule, "192.0.2.1"))
        assert found is not None and found.text == rule.text, rule.text
        assert evaluated <= BOUND, (evaluated, rule.text)
        walked.append(evaluated)
    walked.sort()
    flat_walker = Walker(flat)
    _, flat_last, _ = flat_walker.walk(packet_for(rules[-1], "192.0.2.1"))
    print(
        f"\n  {table}: {len(rules)} frontend rules; rules walked p50 {walked[len(walked) // 2]},"
        f" max {walked[-1]} (flat layout, last frontend: {flat_last})"
    )
    assert flat_last > BIG  # the flat layout really is the linear walk being avoided


@pytest.mark.parametrize("endpoints", [1, 0])
def test_the_tree_holds_each_flat_rule_exactly_once(endpoints: int) -> None:
    """Outside the dispatch chains both layouts are identical; inside, the same rules."""
    rendered = big(endpoints)
    for name in ("filter", "nat"):
        tree, flat = rendered.tree[name], rendered.flat[name]
        outside = [c for c in tree if not c.startswith(n.DSP)]
        assert outside == list(flat)
        for chain in outside:
            if chain not in (n.SERVICES, n.NODEPORTS, n.CLUSTER_IPS):
                assert tree[chain] == flat[chain], chain
        in_tree = Counter(r.text for r in frontend_rules(tree))
        assert in_tree == Counter(r.text for r in frontend_rules(flat)), name
        assert all(count == 1 for count in in_tree.values()), name
        catch_all_tree = Counter(r for c, rules in tree.items() for r in rules if UNKNOWN_PORT in r)
        catch_all_flat = Counter(r for c, rules in flat.items() for r in rules if UNKNOWN_PORT in r)
        assert catch_all_tree == catch_all_flat, name
        assert name == "nat" or len(catch_all_flat) >= BIG, name
        # The node-address jumps stay in the nat root, after the tree.
        jumps = [r for r in flat[n.SERVICES] if f"-j {n.NODEPORTS}" in r]
        assert tree[n.SERVICES][len(tree[n.SERVICES]) - len(jumps) :] == jumps


def test_no_chain_holds_more_than_the_threshold() -> None:
    """Every dispatch chain holds at most SPLIT_ABOVE rules, branches and frontend rules
    together (only rules sharing one key could exceed it, and these configs have none);
    the nat root holds the node-address jumps on top."""
    for rendered in (big(1), big(0), *mixed().values()):
        for key, rules in dispatch_chains(rendered.tree).items():
            branches = [r for r in rules if f"-j {n.DSP}" in r]
            frontends = [r for r in rules if is_frontend(r)]
            assert len(branches) + len(frontends) <= SPLIT_ABOVE, key


# --- the same first match as the flat layout, for any packet --------------------------
def random_packets(table: Chains, family: int, count: int, seed: int) -> Iterator[Packet]:
    """Packets to the table's frontends, next to them, to other ports and protocols, from
    in and out of the load-balancer source ranges."""
    rng = random.Random(seed)
    rules = frontend_rules(table)
    sources = ("203.0.113.9", "192.0.2.1") if family == 4 else ("fd00:203::9", "fd00:192::1")
    for _ in range(count):
        rule = rng.choice(rules)
        assert rule.destination is not None and rule.ports is not None
        destination = rule.destination.network_address + rng.choice((0, 0, 0, 1, -1, 4096))
        port = rule.ports[0] + rng.choice((0, 0, 0, 1, -1, 16))
        proto = rng.choice((rule.proto, rule.proto, "tcp", "udp", "sctp"))
        assert proto is not None
        yield Packet(destination, proto, port, ipaddress.ip_address(rng.choice(sources)))


@pytest.mark.parametrize("family", [4, 6])
def test_every_packet_meets_the_same_rule_as_in_the_flat_layout(family: int) -> None:
    """Hits, near misses, other protocols and sources: the tree's verdict is the flat one."""
    rendered = mixed()[family]
    hits = Counter[str]()
    for name in ("nat", "filter"):
        tree, flat = Walker(rendered.tree[name]), Walker(rendered.flat[name])
        for packet in random_packets(rendered.flat[name], family, 3000, seed=family):
            want, _, _ = flat.walk(packet)
            got, tree_walked, _ = tree.walk(packet)
            assert (got and got.text) == (want and want.text), (name, packet)
            hits[f"{name} {'hit' if want else 'miss'}"] += 1
            assert tree_walked <= BOUND
    print(f"\n  ipv{family}: {dict(hits)}")
    assert len(hits) == 4 and min(hits.values()) > 300  # hits and misses in both tables


def test_many_ports_of_one_address_split_by_protocol_and_port_range() -> None:
    """45 ports on one address: branch rules match `-p tcp -m tcp --dport LO:HI`."""
    nat = mixed()[4].tree["nat"]
    branches = [r for rules in nat.values() for r in rules if f"-j {n.DSP}" in r]
    assert any(
        r.startswith("-d 10.112.0.1/32 -p tcp -m tcp --dport 8000:8015 -j") for r in branches
    )
    assert any(r.startswith("-d 10.112.0.1/32 -p udp -j") for r in branches)
    # Node ports have no address in their key: protocol, then port ranges.
    assert any(r.startswith("-p tcp -m tcp --dport ") for r in nat[n.NODEPORTS])


# --- the flat layout below the threshold, names ---------------------------------------------
NODE = '[node]\nname = "node-1"\npod_cidrs = ["10.244.0.0/16"]\n'


def service(name: str, vip: object) -> str:
    """One single-endpoint service at `vip`."""
    return (
        f'[[services]]\nname = "{name}"\ncluster_ips = ["{vip}"]\n'
        f'ports = [{{ name = "http", port = 80 }}]\nendpoints = [{{ ip = "10.244.1.7" }}]\n'
    )


def cluster(vips: list[str]) -> str:
    """cluster.toml with one single-endpoint service per VIP."""
    return "\n".join([NODE, *(service(f"svc-{i:05d}", vip) for i, vip in enumerate(vips))])


def nat_of(config: str) -> Chains:
    """The ipv4 nat table of a cluster.toml text."""
    return tables_of(lbc.compile(lbc.loads(config), backend="iptables").data[4])["nat"]


def test_up_to_the_threshold_there_is_no_tree() -> None:
    vips = [f"10.0.7.{i}" for i in range(1, SPLIT_ABOVE + 2)]
    small = nat_of(cluster(vips[:SPLIT_ABOVE]))
    assert not [c for c in small if c.startswith(n.DSP)]
    assert len(small[n.SERVICES]) == SPLIT_ABOVE
    one_more = nat_of(cluster(vips))
    assert [c for c in one_more if c.startswith(n.DSP)]
    assert all(f"-j {n.DSP}" in r or "--dport 80" in r for r in one_more[n.SERVICES])


def test_dispatch_chain_names_are_short_and_come_from_the_prefix() -> None:
    tables = mixed()
    names = [c for r in tables.values() for t in r.tree.values() for c in t]
    dispatch = [c for c in names if c.startswith(n.DSP)]
    assert len(dispatch) > 100
    assert all(len(c) <= n.MAX_CHAIN for c in dispatch)
    # Rendering another program with the prefix 10.0.7.0/28 split names it the same way.
    vips = [f"10.0.7.{i}" for i in range(1, 40)]
    first = nat_of(cluster(vips))
    second = nat_of(cluster(vips[:20] + [f"10.9.{i}.1" for i in range(30)]))
    chain = next(r.split()[-1] for r in first[n.SERVICES] if r.startswith("-d 10.0.7.0/28 "))
    assert any(
        r.startswith(f"-d 10.0.7.0/28 -j {chain}") for rules in second.values() for r in rules
    )


@pytest.mark.parametrize(
    "address",
    [
        "fd00:10::1:190",
        "::",
        "::1",
        "::1.2.3.4",
        "::ffff:1.2.3.4",
        "::ffff:0:0",
        "0:0:0:0:1::",
        "fe80::",
        "2001:db8:0:0:1:0:0:1",
        "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff",
    ],
)
def test_ipv6_prefixes_are_printed_as_inet_ntop_prints_them(address: str) -> None:
    """iptables-save prints addresses with glibc's inet_ntop (dotted IPv4 tails)."""
    value = int(ipaddress.IPv6Address(address))
    expected = socket.inet_ntop(socket.AF_INET6, value.to_bytes(16, "big"))
    assert address_text(6, value) == expected


# --- a new service changes only the chains on its path --------------------------------------
def states(config: str) -> dict[str, tuple[str, ...]]:
    """Per-chain state of the ipv4 document, as the apply adapter compares it."""
    doc = lbc.compile(lbc.loads(config), backend="iptables").data[4]
    return ipt_kernel.parse(4, doc)


def changed(before: dict[str, tuple[str, ...]], after: dict[str, tuple[str, ...]]) -> set[str]:
    return {k for k in before.keys() | after.keys() if before.get(k) != after.get(k)}


def test_a_new_service_changes_only_its_leaf_or_splits_it() -> None:
    """2,000 services plus one: its own chains and the leaf that takes its rule change;
    when that leaf overflows, it alone becomes a branch chain over new leaves."""
    rng = random.Random(11)
    taken = {ipaddress.IPv4Address(0x0A600000 + v) for v in rng.sample(range(1, 1 << 20), 2000)}
    base = cluster([str(a) for a in sorted(taken)])
    nat = nat_of(base)
    # Each dispatch chain's prefix, from the branch rule that jumps to it.
    prefixes = {
        rule.target: rule.destination
        for chain in nat
        if is_dispatch(chain)
        for rule in map(Rule.parse, nat[chain])
        if rule.target.startswith(n.DSP)
    }
    leaves = {c: len(nat[c]) for c in prefixes if all(is_frontend(r) for r in nat[c])}
    leaf = max((c for c in leaves if leaves[c] < SPLIT_ABOVE), key=lambda c: (leaves[c], c))
    prefix = prefixes[leaf]
    assert isinstance(prefix, ipaddress.IPv4Network) and prefix.prefixlen < 28
    free = [a for a in prefix.hosts() if a not in taken]
    random.Random(12).shuffle(free)
    # Fits: one more rule in the leaf. Splits: the leaf filled to the threshold first.
    fillers = [
        service(f"filler-{k}", a) for k, a in enumerate(free[1 : SPLIT_ABOVE - leaves[leaf] + 1])
    ]
    for label, before_config in (("fits", base), ("splits", "\n".join([base, *fillers]))):
        before = states(before_config)
        after = states(before_config + "\n" + service("new-one", free[0]))
        touched = changed(before, after)
        # The new cluster IP's catch-all REJECT joins the tree under LBC-CLUSTER-IPS.
        catch_all = {k for k in touched if k.startswith("ipv4 filter ")}
        assert catch_all and all(
            UNKNOWN_PORT in rule or f"-j {n.DSP}" in rule for k in catch_all for rule in after[k]
        ), catch_all
        touched -= catch_all
        own = {k for k in touched if k.split()[2].startswith((n.SVC, n.SEP))}
        # The new service's pool chain: one endpoint in a large cluster, so no endpoint
        # chain; the pool's chain DNATs itself.
        (pool,) = own
        assert pool.split()[2].startswith(n.SVC) and "-j DNAT" in after[pool][-1], own
        assert all(k.startswith("ipv4 nat ") for k in touched), touched
        dispatch = {k.split()[2] for k in touched - own}
        print(f"\n  new service in {prefix} ({label}): {len(touched)} chains change")
        if label == "fits":
            assert dispatch == {leaf}
            assert len(after[f"ipv4 nat {leaf}"]) == leaves[leaf] + 1
            continue
        assert len(before[f"ipv4 nat {leaf}"]) == SPLIT_ABOVE
        # The leaf keeps its name (it is named by its prefix) and now branches; every
        # other changed chain is new and lies under the leaf's prefix.
        assert leaf in dispatch and len(dispatch) >= 3
        for chain in dispatch - {leaf}:
            assert f"ipv4 nat {chain}" not in before, chain
        assert all(f"-j {n.DSP}" in r or is_frontend(r) for r in after[f"ipv4 nat {leaf}"])
        moved = sum(len(after[f"ipv4 nat {c}"]) for c in dispatch)
        assert moved <= 2 * SPLIT_ABOVE + 1, moved


# --- real traffic through a 2,000-service tree --------------------------------------------
TREE_SERVICES = 2000


def deep_config() -> str:
    """2,000 services with random cluster IPs: most reach the seed's pods, every tenth is a
    NodePort, one in 25 has no endpoints; 300 of them also have an IPv6 cluster IP."""
    rng = random.Random(5)
    v4 = rng.sample(range(1, 1 << 20), TREE_SERVICES)
    v6 = rng.sample(range(1, 1 << 16), TREE_SERVICES)
    out = [
        f'[node]\nname = "node-1"\naddresses = ["{netns.NODE_ADDRESS}", "{netns.NODE_ADDRESS6}"]\n'
        'pod_cidrs = ["10.244.0.0/16", "fd00:244::/64"]\n'
    ]
    pods = {4: list(netns.PODS.values()), 6: list(netns.PODS6.values())}
    for i in range(TREE_SERVICES):
        ips = [str(ipaddress.IPv4Address(0x0A600000 + v4[i]))]
        if i < 300:
            ips.append(f"fd00:10::{v6[i]:x}")
        endpoints = ", ".join(
            f'{{ ip = "{a}" }}' for a in pods[4] + (pods[6] if len(ips) == 2 else [])
        )
        node_port = 30000 + i if i % 10 == 0 else None
        port = f'{{ name = "http", port = 80, target_port = {netns.POD_PORT}'
        port += f", node_port = {node_port} }}" if node_port else " }"
        out.append(
            f'[[services]]\nname = "svc-{i:04d}"\n'
            + ('type = "NodePort"\n' if node_port else "")
            + f"cluster_ips = {json.dumps(ips)}\n"
            + f"ports = [{port}]\n"
            + ("" if i % 25 == 7 else f"endpoints = [{endpoints}]\n")
        )
    return "\n".join(out)


def deepest(table: Chains, rules: list[Rule], source: str) -> tuple[Rule, int, list[str]]:
    """The frontend rule whose packet walks the most rules, with that count and its path."""
    walker = Walker(table)
    best: tuple[Rule, int, list[str]] | None = None
    for rule in rules:
        found, evaluated, path = walker.walk(packet_for(rule, source))
        assert found is not None and found.text == rule.text
        if best is None or evaluated > best[1]:
            best = (rule, evaluated, path)
    assert best is not None
    return best


@pytest.fixture(scope="module")
def seed() -> Iterator[netns.Seed]:
    netns.require("iptables-restore", "ip6tables-restore")
    with netns.seed_topology() as topology:
        yield topology


@pytest.mark.netns
def test_traffic_reaches_the_deepest_frontends_of_a_2000_service_tree(seed: netns.Seed) -> None:
    """Cluster IP (both families), node port and a refusal, each the longest walk there is."""
    artifact = lbc.compile(lbc.loads(deep_config()), backend="iptables")
    for family, doc in artifact.data.items():
        seed.node.exec(f"ip{'6' if family == 6 else ''}tables-restore", input=doc)
    pods = set(netns.PODS)
    for family, client in ((4, netns.CLIENT_ADDRESS), (6, netns.CLIENT_ADDRESS6)):
        tables = tables_of(artifact.data[family])
        nat_rules = frontend_rules(tables["nat"])
        cluster_ips = [r for r in nat_rules if r.target.startswith(n.SVC)]
        rule, walked, path = deepest(tables["nat"], cluster_ips, client)
        print(f"\n  ipv{family} cluster IP {rule.destination}: {walked} rules, {len(path)} chains")
        # 2,000 IPv4 addresses make a tree two levels deep, 300 IPv6 ones one level.
        assert len(path) >= (3 if family == 4 else 2) and walked > len(path)
        assert rule.destination is not None
        result = seed.client.request(str(rule.destination.network_address), 80, count=30)
        assert not result.errors, result
        assert set(result.names) <= pods and len(result.names) >= 2, result
        if family == 6:
            continue
        node_ports = [r for r in nat_rules if r.ports and r.ports[0] >= 30000]
        rule, walked, path = deepest(tables["nat"], node_ports, client)
        assert rule.ports is not None
        print(f"  node port {rule.ports[0]}: {walked} rules, {len(path)} chains")
        assert n.NODEPORTS in path and len(path) >= 3
        result = seed.client.request(netns.NODE_ADDRESS, rule.ports[0], count=20)
        assert not result.errors and set(result.names) <= pods, result
        rejects = [r for r in frontend_rules(tables["filter"]) if r.target == "REJECT"]
        rule, walked, path = deepest(tables["filter"], rejects, client)
        assert rule.destination is not None
        print(f"  refused {rule.destination}: {walked} rules, {len(path)} chains")
        assert len(path) >= 2
        result = seed.client.request(str(rule.destination.network_address), 80, timeout=2.0)
        assert result.errors == Counter(refused=1), result
