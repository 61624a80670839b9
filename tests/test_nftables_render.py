"""The nftables renderer without a kernel: exact shares, jump targets, stable names, JSON = text."""

from __future__ import annotations

import json
import random
import re
import subprocess
import sys
from dataclasses import dataclass, field, replace
from fractions import Fraction
from typing import Any

import pytest

import lbc
from lbc.backends.nftables import names as n
from lbc.backends.nftables.expr import Ruleset
from lbc.backends.nftables.render import build, shares
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
from tests.configs import worst_case_config
from tests.golden import CASES, GOLDEN

IDENTIFIER = re.compile(r"^[A-Za-z_.][A-Za-z0-9/_.-]*$")  # nft 1.0.6's unquoted names
# A pool's choice: `meta l4proto P numgen random mod M < K [update @set { ip saddr }]
# dnat ip to ADDRESS:PORT`; the last choice has no numgen; known clients come first.
_TO = r"(?:update @\S+ \{ ip6? saddr \} )?dnat ip6? to (\S+)"
NUMGEN = re.compile(r"^meta l4proto \S+ numgen random mod (\d+) < (\d+) " + _TO + "$")
LAST = re.compile(r"^meta l4proto \S+ " + _TO + "$")
TARGET = re.compile(r"\b(?:goto|jump) (\S+?)(?:,|$| )")
SET_REF = re.compile(r"@([^\s,]+)")
NODE = '[node]\nname = "node-1"\naddresses = ["192.168.49.2"]\npod_cidrs = ["10.244.0.0/16"]\n'


# --- helpers shared with the kernel test --------------------------------------------
@dataclass
class Parsed:
    """An lbc nft file read back: chains with their rules, sets and maps with elements."""

    chains: dict[str, list[str]] = field(default_factory=dict)
    base: dict[str, str] = field(default_factory=dict)  # chain -> its `type ... hook` line
    sets: dict[str, list[str]] = field(default_factory=dict)
    commands: list[str] = field(default_factory=list)  # top-level lines before the table


def parse_nft(text: str) -> Parsed:
    """Parse the text form lbc writes (one tab per level); fail on anything unexpected."""
    out = Parsed()
    chain: str | None = None
    named: str | None = None
    in_elements = False
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        if not line.startswith("\t"):
            if line not in ("}",) and not line.startswith("table "):
                out.commands.append(line)
            continue
        body = line.strip()
        if line.startswith("\tchain "):
            chain = body.split()[1]
            assert chain not in out.chains, f"chain {chain} declared twice"
            out.chains[chain] = []
        elif line.startswith(("\tset ", "\tmap ")):
            named = body.split()[1]
            assert named not in out.sets, f"set {named} declared twice"
            out.sets[named] = []
        elif line == "\t}":
            chain = named = None
        elif named is not None:
            if body == "elements = {":
                in_elements = True
            elif body == "}":
                in_elements = False
            elif in_elements:
                out.sets[named].append(body.rstrip(","))
        elif chain is not None:
            if body.startswith("type "):
                out.base[chain] = body
            else:
                out.chains[chain].append(body)
        else:
            raise AssertionError(f"unexpected line {line!r}")
    return out


def nft_text(config: str) -> str:
    """The nftables text of a cluster.toml text."""
    return lbc.compile(lbc.loads(config), backend="nftables").text()


def chosen_shares(parsed: Parsed, chain: str) -> dict[str, Fraction]:
    """Each backend's (`address:port`) exact chance of being picked by a pool chain's
    numgen rules."""
    left, out = Fraction(1), {}
    for rule in parsed.chains[chain]:
        if " saddr @affinity-" in rule:
            continue  # affinity: only for clients seen before
        if (m := NUMGEN.match(rule)) is not None:
            mod, below, target = int(m[1]), int(m[2]), m[3]
            assert 0 < below < mod
            out[target] = out.get(target, Fraction(0)) + left * Fraction(below, mod)
            left *= 1 - Fraction(below, mod)
        elif (m := LAST.match(rule)) is not None:
            target = m[1]
            out[target] = out.get(target, Fraction(0)) + left
            left = Fraction(0)
    assert left == 0, f"{chain} can fall through with chance {left}"
    return out


def outputs() -> dict[str, str]:
    """Every golden nftables output, and the worst case."""
    out = {
        case: (GOLDEN / case / "nftables.nft").read_text(encoding="utf-8")
        for case in CASES
        if (GOLDEN / case / "nftables.nft").is_file()
    }
    out["worst-case"] = nft_text(worst_case_config())
    return out


OUTPUTS = outputs()


def program(weights: list[int], affinity: int | None = None) -> Program:
    """One cluster-IP service whose backends have `weights`, built as IR directly."""
    backends = tuple(
        Backend(
            key=f"default/w:http/tcp/10.244.{i // 250}.{i % 250 + 1}:8080",
            address=f"10.244.{i // 250}.{i % 250 + 1}",
            port=8080,
            weight=w,
            local=False,
            terminating=False,
        )
        for i, w in enumerate(weights)
    )
    pool = Pool(
        id="POOLPOOLPOOLPOOL",
        service="default/w:http",
        family=4,
        proto=Proto.TCP,
        backends=backends,
        scheduler=Scheduler.DEFAULT,
        affinity_timeout=affinity,
        when_empty=Empty.REJECT,
        local_only=False,
    )
    front = Frontend(
        kind=Kind.CLUSTER_IP,
        family=4,
        address="10.0.1.1",
        proto=Proto.TCP,
        port=80,
        service=pool.service,
        pool=pool.id,
        masquerade=Masquerade.OFF_CLUSTER,
    )
    node = NodeInfo("node-1", ("192.168.49.2",), ("10.244.0.0/16",), 0x4000, False)
    return Program(node=node, pools=(pool,), frontends=(front,))


def text_of(p: Program) -> str:
    return lbc.compile(p, backend="nftables").text()


# --- endpoint choice ------------------------------------------------------------------
WEIGHT_VECTORS = [
    [1],
    [1, 1],
    [1, 1, 1],
    [1, 2, 3],
    [3, 2, 1],
    [5, 0, 5],
    [2, 4, 6, 8],
    [65535, 1],
    [1, 65535, 7],
    [7, 11, 13, 17, 19, 23],
    [random.Random(7).randint(1, 100) for _ in range(100)],
    [random.Random(8).randint(0, 65535) for _ in range(1000)],
]


@pytest.mark.parametrize("weights", WEIGHT_VECTORS, ids=lambda w: f"{len(w)}-{sum(w)}")
def test_each_backend_gets_exactly_weight_over_total(weights: list[int]) -> None:
    """From the rendered rules alone: chance(endpoint) == weight / total, as a fraction."""
    parsed = parse_nft(text_of(program(weights)))
    (chain,) = [c for c in parsed.chains if c.startswith(n.SERVICE)]
    got = chosen_shares(parsed, chain)
    total = sum(weights)
    active = [(i, w) for i, w in enumerate(weights) if w]
    assert len(got) == len(active), "one choice per active backend"
    for i, w in active:
        backend = f"10.244.{i // 250}.{i % 250 + 1}:8080"
        assert got[backend] == Fraction(w, total), backend
        assert abs(float(got[backend]) - w / total) < 1e-9
    assert sum(got.values()) == 1


def test_shares_are_reduced_fractions() -> None:
    assert shares([1, 2, 3]) == [(1, 6), (2, 5)]
    assert shares([2, 2]) == [(1, 2)]
    assert shares([4]) == []


def test_affinity_is_checked_before_the_random_choice() -> None:
    parsed = parse_nft(text_of(program([1, 1], affinity=600)))
    (chain,) = [c for c in parsed.chains if c.startswith(n.SERVICE)]
    rules = parsed.chains[chain]
    affinity = [r for r in rules if r.startswith("ip saddr @affinity-")]
    assert len(affinity) == 2 and rules.index(affinity[-1]) < rules.index(
        next(r for r in rules if " numgen " in r or r.startswith("numgen "))
    )
    for rule in affinity:
        aset, target = rule.split()[2][1:], rule.split()[-1]
        assert aset in parsed.sets and aset.endswith("__600s")
        assert rule == f"ip saddr @{aset} goto {aset}" and target in parsed.chains
        chosen = [r for r in rules if r not in affinity and r.endswith(f"goto {aset}")]
        assert len(chosen) == 1
    assert all(
        "timeout 10m" in t
        for t in re.findall(r"set affinity-[^{]+\{[^}]+\}", text_of(program([1, 1], affinity=600)))
    )


def test_affinity_remembers_and_dnats_in_separate_rules() -> None:
    """The kernel abandons a rule whose `update` fails (a full set), DNAT included: the
    DNAT is a rule of its own, after the update, in the backend's affinity chain."""
    parsed = parse_nft(text_of(program([1, 1], affinity=600)))
    chains = {c: r for c, r in parsed.chains.items() if c.startswith(n.AFFINITY)}
    assert len(chains) == 2
    for name, rules in chains.items():
        assert rules[0] == f"update @{name} {{ ip saddr }}"
        assert len(rules) == 2 and rules[1].startswith("meta l4proto tcp dnat ip to ")
        assert "update" not in rules[1]
    pool = [r for c, rs in parsed.chains.items() if c.startswith(n.SERVICE) for r in rs]
    assert not any("dnat" in r or "update" in r for r in pool)


def test_an_affinity_timeout_is_in_the_set_names() -> None:
    """A new timeout is new sets (and chains), not a changed declaration."""
    before = parse_nft(text_of(program([1, 1], affinity=600)))
    after = parse_nft(text_of(program([1, 1], affinity=1200)))
    old = {s for s in before.sets if s.startswith(n.AFFINITY)}
    new = {s for s in after.sets if s.startswith(n.AFFINITY)}
    assert len(old) == len(new) == 2 and not old & new
    assert all(s.endswith("__1200s") for s in new)


# --- structure ------------------------------------------------------------------------
@pytest.mark.parametrize("case", sorted(OUTPUTS))
def test_every_jump_and_set_reference_exists(case: str) -> None:
    parsed = parse_nft(OUTPUTS[case])
    rules = [r for rs in parsed.chains.values() for r in rs]
    elements = [e for es in parsed.sets.values() for e in es]
    targets = {t for line in rules + elements for t in TARGET.findall(line)}
    assert targets <= set(parsed.chains), targets - set(parsed.chains)
    refs = {r for line in rules for r in SET_REF.findall(line)}
    assert refs <= set(parsed.sets), refs - set(parsed.sets)
    # Nothing is left unreachable: every regular chain is a target, every set is used.
    regular = set(parsed.chains) - set(parsed.base)
    assert regular == targets, regular ^ targets
    assert refs == set(parsed.sets), set(parsed.sets) - refs


@pytest.mark.parametrize("case", sorted(OUTPUTS))
def test_names_are_valid_nft_identifiers(case: str) -> None:
    parsed = parse_nft(OUTPUTS[case])
    for name in [*parsed.chains, *parsed.sets]:
        assert IDENTIFIER.match(name), name
        assert len(name) <= n.MAX_NAME, (len(name), name)


def test_worst_case_names_are_cut_to_the_limit_and_stay_unique() -> None:
    parsed = parse_nft(OUTPUTS["worst-case"])
    longest = max([*parsed.chains, *parsed.sets], key=len)
    assert len(longest) == n.MAX_NAME
    assert any(".ffff.ffff" in c for c in parsed.sets), "IPv6 colons become dots"


@pytest.mark.parametrize("case", sorted(OUTPUTS))
def test_the_file_replaces_the_table_atomically(case: str) -> None:
    parsed = parse_nft(OUTPUTS[case])
    assert parsed.commands == ["add table inet lbc", "delete table inet lbc"]
    assert OUTPUTS[case].count("\ntable inet lbc {\n") == 1


def test_dispatch_costs_the_same_for_one_service_or_two_hundred() -> None:
    """The chains every packet walks hold a fixed number of rules, whatever the cluster."""

    def config(count: int) -> str:
        services = "".join(
            f'\n[[services]]\nname = "s{i}"\ncluster_ips = ["10.0.{i // 250}.{i % 250 + 1}"]\n'
            f'ports = [{{ name = "http", port = 80 }}]\n'
            f'endpoints = [{{ ip = "10.244.1.{i % 250 + 1}" }}]\n'
            for i in range(count)
        )
        return NODE + services

    small, big = parse_nft(nft_text(config(1))), parse_nft(nft_text(config(200)))
    for chain in (*small.base, n.SERVICES):
        assert small.chains[chain] == big.chains[chain], chain
    assert len(big.sets["service-ips4"]) == 200


def test_overlapping_source_ranges_are_merged() -> None:
    """An interval set refuses overlaps: 10.0.0.0/8 swallows 10.1.0.0/16."""
    text = nft_text(
        NODE
        + """
[[services]]
name = "lb"
type = "LoadBalancer"
cluster_ips = ["10.0.1.1"]
load_balancer_ips = ["198.51.100.1"]
load_balancer_source_ranges = ["10.1.0.0/16", "10.0.0.0/8", "192.0.2.0/25", "192.0.2.128/25"]
ports = [{ name = "http", port = 80, node_port = 30001 }]
endpoints = [{ ip = "10.244.1.7" }]
"""
    )
    allowed = parse_nft(text).sets["firewall-allow4"]
    assert allowed == [
        "198.51.100.1 . tcp . 80 . 10.0.0.0/8",
        "198.51.100.1 . tcp . 80 . 192.0.2.0/24",
    ]


def test_node_ports_not_open_on_every_node_address_stay_address_keyed() -> None:
    """An IR whose node port listens on one of two addresses cannot use the port-only map."""
    p = program([1])
    node = NodeInfo("node-1", ("192.168.49.2", "192.168.50.2"), ("10.244.0.0/16",), 0x4000, False)
    common = {"family": 4, "proto": Proto.TCP, "pool": p.pools[0].id, "service": "default/w:http"}
    fronts = (
        *p.frontends,
        Frontend(Kind.NODE_PORT, address="192.168.49.2", port=30001,
                 masquerade=Masquerade.ALWAYS, **common),  # type: ignore[arg-type]
        Frontend(Kind.NODE_PORT, address="192.168.49.2", port=30002,
                 masquerade=Masquerade.ALWAYS, **common),  # type: ignore[arg-type]
        Frontend(Kind.NODE_PORT, address="192.168.50.2", port=30002,
                 masquerade=Masquerade.ALWAYS, **common),  # type: ignore[arg-type]
    )  # fmt: skip
    parsed = parse_nft(text_of(Program(node=node, pools=p.pools, frontends=fronts)))
    assert [e.split(" : ")[0] for e in parsed.sets["service-nodeports4"]] == ["tcp . 30002"]
    assert parsed.sets["nodeport-ips4"] == ["192.168.49.2", "192.168.50.2"]
    by_ip = [e.split(" : ")[0] for e in parsed.sets["service-ips4"]]
    assert by_ip == ["10.0.1.1 . tcp . 80", "192.168.49.2 . tcp . 30001"]


def test_scheduler_round_robin_is_refused_and_random_is_not() -> None:
    p = program([1, 1])
    for scheduler in (Scheduler.ROUND_ROBIN, Scheduler.SOURCE_HASH, Scheduler.MAGLEV):
        other = replace(p, pools=(replace(p.pools[0], scheduler=scheduler),))
        with pytest.raises(lbc.UnsupportedError, match=f"scheduler {scheduler}"):
            lbc.compile(other, backend="nftables")
    rnd = replace(p, pools=(replace(p.pools[0], scheduler=Scheduler.RANDOM),))
    assert text_of(rnd) == text_of(p)


# --- stable names ---------------------------------------------------------------------
def test_compiling_twice_gives_identical_text_and_json() -> None:
    one = lbc.compile(lbc.loads(worst_case_config()), backend="nftables")
    two = lbc.compile(lbc.loads(worst_case_config()), backend="nftables")
    assert one.formats == two.formats


def test_adding_a_service_renames_nothing_else() -> None:
    base = (GOLDEN / "many-services" / "cluster.toml").read_text(encoding="utf-8")
    extra = """
[[services]]
namespace = "aaa"
name = "first-in-order"
cluster_ips = ["10.0.9.9"]
ports = [{ name = "http", port = 80 }]
endpoints = [{ ip = "10.244.9.9" }, { ip = "10.244.1.10" }]
"""
    before, after = parse_nft(nft_text(base)), parse_nft(nft_text(base + extra))
    assert set(before.chains) < set(after.chains)
    for chain, rules in before.chains.items():
        if chain != n.SERVICES:
            assert after.chains[chain] == rules, chain
    added = set(after.chains) - set(before.chains)
    assert added and all("aaa/first-in-order" in c for c in added), added
    assert set(before.sets["service-ips4"]) < set(after.sets["service-ips4"])


def test_names_carry_the_ir_ids() -> None:
    """`service-<first 8 of the pool id>-...`: a chain can be looked up in the IR dump."""
    for case in ("hostnames", "affinity"):
        ir = (GOLDEN / case / "ir.txt").read_text(encoding="utf-8")
        parsed = parse_nft(OUTPUTS[case])
        named = [c for c in parsed.chains if c.startswith(n.SERVICE)]
        named += [s for s in parsed.sets if s.startswith(n.AFFINITY)]
        assert named
        for name in named:
            assert f" {name.split('-')[1]}" in ir, name
    assert "service-7ADJGQOF-default/sticky/tcp/http" in OUTPUTS["affinity"]


# --- the JSON form --------------------------------------------------------------------
def json_doc(case: str) -> list[dict[str, Any]]:
    if case == "worst-case":
        artifact = lbc.compile(lbc.loads(worst_case_config()), backend="nftables")
    else:
        artifact = lbc.compile(lbc.load(GOLDEN / case / "cluster.toml"), backend="nftables")
    commands: list[dict[str, Any]] = json.loads(artifact.text("json"))["nftables"]
    return commands


@pytest.mark.parametrize("case", sorted(OUTPUTS))
def test_json_and_text_hold_the_same_objects(case: str) -> None:
    parsed = parse_nft(OUTPUTS[case])
    commands = json_doc(case)
    chains = [c["add"]["chain"] for c in commands if "chain" in c.get("add", {})]
    assert [c["name"] for c in chains] == list(parsed.chains)
    rules: dict[str, int] = {}
    for c in commands:
        if "rule" in c.get("add", {}):
            rules[c["add"]["rule"]["chain"]] = rules.get(c["add"]["rule"]["chain"], 0) + 1
    assert rules == {k: len(v) for k, v in parsed.chains.items() if v}
    sets = {
        body["name"]: body
        for c in commands
        for kind, body in c.get("add", {}).items()
        if kind in ("set", "map")
    }
    assert list(sets) == list(parsed.sets)
    elements = {
        c["add"]["element"]["name"]: len(c["add"]["element"]["elem"])
        for c in commands
        if "element" in c.get("add", {})
    }
    assert elements == {k: len(v) for k, v in parsed.sets.items() if v}
    for chain in chains:
        assert ("hook" in chain) == (chain["name"] in parsed.base)


@pytest.mark.parametrize("case", sorted(OUTPUTS))
def test_json_commands_come_in_the_order_the_kernel_needs(case: str) -> None:
    commands = json_doc(case)
    table = {"table": {"family": "inet", "name": "lbc"}}
    assert commands[1:4] == [{"add": table}, {"delete": table}, {"add": table}]
    order = {"chain": 0, "set": 1, "map": 1, "element": 2, "rule": 3}
    kinds = [order[next(iter(c["add"]))] for c in commands[4:]]
    assert kinds == sorted(kinds)


def test_render_imports_nothing_heavy() -> None:
    """Compiling never loads the libnftables binding (the kernel adapter's business)."""
    code = (
        "import sys, lbc\n"
        "lbc.compile(lbc.load(sys.argv[1]), backend='nftables')\n"
        "assert 'nftables' not in sys.modules, 'render imported nftables'\n"
    )
    subprocess.run(
        [sys.executable, "-c", code, str(GOLDEN / "hostnames" / "cluster.toml")], check=True
    )


def _ruleset(case: str) -> Ruleset:
    if case == "worst-case":
        cluster = lbc.loads(worst_case_config())
    else:
        cluster = lbc.load(GOLDEN / case / "cluster.toml")
    return build(lbc.lower(cluster))


@pytest.mark.parametrize("case", sorted(OUTPUTS))
def test_chains_print_the_text_of_their_rules(case: str) -> None:
    # The printer reads `lines()`, which pool and endpoint chains make without making
    # their rules; the JSON form and the kernel adapters read `rules`.
    chains = _ruleset(case).chains
    assert chains
    for chain in chains:
        assert chain.lines() == [r.text() for r in chain.rules], chain.name


PLACED = """
[node]
name = "node-1"
addresses = ["192.168.49.2"]
pod_cidrs = ["10.244.0.0/16"]

[[services]]
name = "web"
cluster_ips = ["10.0.1.10"]
ports = [{ name = "http", port = 80, target_port = 8080 }]
endpoints = [
  { ip = "10.244.1.5", node = "node-1" },
  { ip = "10.244.2.5", node = "node-2" },
  { ip = "10.244.3.5" },
]

[[services]]
name = "edge"
type = "NodePort"
external_traffic_policy = "Local"
cluster_ips = ["10.0.1.11"]
ports = [{ name = "http", port = 80, target_port = 8080, node_port = 30080 }]
endpoints = [
  { ip = "10.244.1.6", node = "node-1" },
  { ip = "10.244.2.6", node = "node-2" },
]
"""


def hairpin_elements(config: str) -> set[str]:
    ruleset = build(lbc.lower(lbc.loads(config)))
    (hairpin,) = [s for s in ruleset.sets if s.name == n.per_family(n.HAIRPIN, 4)]
    return {e.text() for e in hairpin.elements}


def test_hairpin_marks_only_backends_whose_connections_can_pass_this_node() -> None:
    """This node's endpoint and one whose node is not given may reach themselves through
    this node's rules; one on another node only through its own node's, unless a pod
    there can address this node's node port with externalTrafficPolicy Local (its pod
    traffic goes unmasqueraded to the cluster-wide pool)."""
    assert hairpin_elements(PLACED) == {
        "10.244.1.5 . 10.244.1.5",
        "10.244.3.5 . 10.244.3.5",
        "10.244.1.6 . 10.244.1.6",
        "10.244.2.6 . 10.244.2.6",
    }
