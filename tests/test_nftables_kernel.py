"""The nftables backend on this machine's kernel: both forms load, agree, and real traffic obeys.

Run with `pytest -s` to see the counts. Shares are checked against the binomial
distribution: a count further than Z = 5 standard deviations from its mean has a
two-sided probability below 6e-7, so a failure means the rules are wrong, not luck.
"""

from __future__ import annotations

import json
import sys
from collections import Counter
from collections.abc import Iterator
from fractions import Fraction
from pathlib import Path
from typing import Any

import pytest

import lbc
from lbc.backends.nftables import kernel as nft_kernel
from lbc.backends.nftables.generation import Generations, in_table
from lbc.backends.nftables.netlink import NFPROTO_INET
from tests import netns
from tests.configs import ANY_SOURCE_AND_DOTTED_TAILS, worst_case_config
from tests.golden import GOLDEN
from tests.test_iptables_kernel import assert_shares
from tests.test_nftables_render import OUTPUTS, Parsed, chosen_shares, parse_nft

pytestmark = pytest.mark.netns

ROOT = Path(__file__).resolve().parent.parent
TABLE = ("inet", "lbc")
# Ports the seed pods serve: hostnames 9376, udp-sctp 5353, most goldens 8080, LB 8443.
POD_PORTS = (netns.POD_PORT, 5353, 8080, 8443)
# The libnftables binding, run inside a namespace: one json_cmd, one transaction.
JSON_LOADER = r"""
import json, sys
import nftables
nft = nftables.Nftables()
rc, out, err = nft.json_cmd(json.load(sys.stdin))
sys.stderr.write(err)
sys.exit(rc)
"""


# --- helpers --------------------------------------------------------------------------
def artifact(source: str | Path) -> lbc.Artifact:
    """The nftables artifact of a cluster.toml path, or of TOML text."""
    if isinstance(source, Path):
        return lbc.compile(lbc.load(source), backend="nftables")
    return lbc.compile(lbc.loads(source), backend="nftables")


def load_text(ns: netns.Netns, text: str) -> None:
    """Equivalent to `ip netns exec NS nft -f FILE`."""
    ns.exec("nft", "-f", "/dev/stdin", input=text)


def load_json(ns: netns.Netns, doc: str) -> None:
    """Equivalent to `Nftables().json_cmd(doc)` inside NS (the future apply's path)."""
    ns.exec(sys.executable, "-c", JSON_LOADER, input=doc)


def listing(ns: netns.Netns) -> list[dict[str, Any]]:
    """`nft -j list table inet lbc` without handles (the kernel numbers objects as it likes)."""
    objects = json.loads(ns.exec("nft", "-j", "list", "table", *TABLE))["nftables"]
    out = []
    for obj in objects:
        if "metainfo" in obj:
            continue
        for body in obj.values():
            body.pop("handle", None)
        out.append(obj)
    return out


def held_chains(ns: netns.Netns) -> Parsed:
    """The chains the kernel holds, read from `nft list table inet lbc` (rules only)."""
    text = ns.exec("nft", "list", "table", *TABLE)
    parsed = Parsed()
    chain = None
    for line in text.splitlines():
        body = line.strip()
        if line.startswith("\tchain "):
            chain = body.split()[1]
            parsed.chains[chain] = []
        elif line == "\t}":
            chain = None
        elif chain is not None and body and not body.startswith("type "):
            parsed.chains[chain].append(body)
    return parsed


@pytest.fixture
def scratch() -> Iterator[netns.Netns]:
    """An empty namespace of its own, deleted afterwards."""
    netns.require("nft")
    with netns.Lab() as lab:
        yield lab.namespace("nft")


@pytest.fixture
def pair() -> Iterator[tuple[netns.Netns, netns.Netns]]:
    """Two empty namespaces: one for the text form, one for the JSON form."""
    netns.require("nft")
    with netns.Lab() as lab:
        yield lab.namespace("nft-text"), lab.namespace("nft-json")


@pytest.fixture(scope="module")
def seed() -> Iterator[netns.Seed]:
    """The seed demo (client, node, three pods serving POD_PORTS), shared by the module."""
    netns.require("nft")
    with netns.seed_topology(ports=POD_PORTS) as topology:
        yield topology


# --- every output loads, and both forms mean the same thing ----------------------------
@pytest.mark.parametrize("case", sorted(OUTPUTS))
def test_output_loads_into_the_kernel(case: str, scratch: netns.Netns) -> None:
    """`nft -f` of every golden file; the kernel then holds every chain with every rule."""
    load_text(scratch, OUTPUTS[case])
    ours, held = parse_nft(OUTPUTS[case]), held_chains(scratch)
    assert list(held.chains) == list(ours.chains)
    for chain, rules in ours.chains.items():
        assert len(held.chains[chain]) == len(rules), chain


@pytest.mark.parametrize("case", sorted(OUTPUTS))
def test_the_kernel_lists_back_exactly_the_rendered_objects(
    case: str, scratch: netns.Netns
) -> None:
    """`nft list table inet lbc` gives back every rule, set and element as rendered, so
    plan and verify compare like with like (elements as sets: the kernel orders them)."""
    load_text(scratch, OUTPUTS[case])
    listed = scratch.exec("nft", "list", "table", "inet", "lbc")
    assert nft_kernel.parse(listed) == nft_kernel.parse(OUTPUTS[case])


@pytest.mark.parametrize("mark", ["0x4000", "0x40000000", "0x80000000"])
def test_every_masquerade_mark_lists_back_as_rendered(
    mark: str, scratch: netns.Netns, tmp_path: Path
) -> None:
    """nft lists `meta mark & 0x80000000 != 0` as a prefix (`meta mark != 0x00000000/1`);
    read as rendered, the top bit's table is in sync after an apply, not drift forever."""
    text = (GOLDEN / "affinity" / "cluster.toml").read_text()
    cluster = lbc.loads(text.replace("[node]\n", f'[node]\nmasquerade_mark = "{mark}"\n', 1))
    lbc.apply(cluster, "nftables", netns=scratch.name, lock_path=tmp_path / "lock")
    assert lbc.verify(cluster, "nftables", netns=scratch.name).in_sync


def test_addresses_nft_lists_in_another_form_read_back_in_sync(
    scratch: netns.Netns, tmp_path: Path
) -> None:
    """IPv6 addresses whose first 96 bits are zero come back from nft with a dotted tail
    (`::10.0.0.1` for `::a00:1`): read as written, verify finds no drift and an apply
    that reads back (`--full`) is not rolled back."""
    cluster = lbc.loads(ANY_SOURCE_AND_DOTTED_TAILS)
    lock = tmp_path / "lock"
    lbc.apply(cluster, "nftables", netns=scratch.name, lock_path=lock)
    assert "::10.0.0.1" in scratch.exec("nft", "list", "table", *TABLE)
    drift = lbc.verify(cluster, "nftables", netns=scratch.name)
    assert drift.in_sync, [line for c in drift.changes for line in c.diff()]
    assert lbc.apply(cluster, "nftables", netns=scratch.name, lock_path=lock, full=True).applied
    again = lbc.apply(cluster, "nftables", netns=scratch.name, lock_path=tmp_path / "other")
    assert again.plan.in_sync and not again.applied


@pytest.mark.parametrize("by", ["apply", "session"])
def test_a_dormant_table_is_drift_and_apply_wakes_it(
    by: str, scratch: netns.Netns, tmp_path: Path
) -> None:
    """`flags dormant` on `inet lbc` turns every hook of it off: verify reports it, and
    an apply (one-shot or a session's) brings the table back without the flag."""
    cluster = lbc.load(GOLDEN / "hostnames" / "cluster.toml")
    lock = tmp_path / "lock"
    session = lbc.Session("nftables", netns=scratch.name, lock_path=lock)
    session.apply(cluster)
    scratch.exec("nft", "add", "table", *TABLE, "{ flags dormant; }")
    assert not lbc.verify(cluster, "nftables", netns=scratch.name).in_sync
    if by == "apply":
        lbc.apply(cluster, "nftables", netns=scratch.name, lock_path=lock)
    else:
        session.apply(cluster)
    assert "dormant" not in scratch.exec("nft", "list", "table", *TABLE)
    assert lbc.verify(cluster, "nftables", netns=scratch.name).in_sync


def test_a_session_follows_its_namespace_when_it_is_made_again(
    scratch: netns.Netns, tmp_path: Path
) -> None:
    """`ip netns del` and `ip netns add` of the same name: the session's sockets still
    hold the old namespace, whose generation never moves; the next apply must go to
    the namespace the name stands for now, and later ones trust its generation."""
    cluster = lbc.load(GOLDEN / "hostnames" / "cluster.toml")
    session = lbc.Session("nftables", netns=scratch.name, lock_path=tmp_path / "lock")
    session.apply(cluster)
    netns.run(["ip", "netns", "del", scratch.name])
    netns.run(["ip", "netns", "add", scratch.name])
    (svc,) = cluster.services
    fewer = svc.model_copy(update={"endpoints": svc.endpoints[:1]})
    smaller = cluster.model_copy(update={"services": [fewer]})
    assert session.apply(smaller).read
    assert lbc.verify(smaller, "nftables", netns=scratch.name).in_sync
    again = session.apply(cluster)
    assert not again.read, "the new namespace's generation vouches for what it wrote"
    assert lbc.verify(cluster, "nftables", netns=scratch.name).in_sync


def test_a_session_whose_namespace_is_gone_writes_nowhere(
    scratch: netns.Netns, tmp_path: Path
) -> None:
    """`ip netns del` alone: the session's sockets still hold the old namespace, but
    the name stands for none, so the next apply fails and writes nothing."""
    cluster = lbc.load(GOLDEN / "hostnames" / "cluster.toml")
    session = lbc.Session("nftables", netns=scratch.name, lock_path=tmp_path / "lock")
    session.apply(cluster)
    kernel = session.engine.kernel
    netns.run(["ip", "netns", "del", scratch.name])
    (svc,) = cluster.services
    fewer = svc.model_copy(update={"endpoints": svc.endpoints[:1]})
    with pytest.raises(lbc.ApplyError, match=scratch.name):
        session.apply(cluster.model_copy(update={"services": [fewer]}))
    assert getattr(kernel, "netlink_commits", 0) == 0


def test_following_commits_tells_which_left_lbcs_table_alone(scratch: netns.Netns) -> None:
    """`Generations.follow`: the commits after it are known, each as touching
    `inet lbc` or not; a table of the same name in another family is not lbc's."""
    generations = Generations(scratch.name)
    try:
        generations.follow(in_table(NFPROTO_INET, "lbc"))
        start = generations.read()
        scratch.exec("nft", "add", "table", "ip", "lbc")  # another family's `lbc`
        scratch.exec("nft", "add", "table", "inet", "another-tool")
        assert generations.read() == start + 2
        assert generations.quiet(start, start + 2)
        assert not generations.quiet(start, start + 2, own=1)
        assert not generations.quiet(start - 1, start + 2), "before following: unknown"
        assert not generations.quiet(start, start + 3), "not committed yet: unknown"
        scratch.exec("nft", "add", "table", "inet", "lbc")
        scratch.exec("nft", "add", "counter", "inet", "lbc", "c")
        assert not generations.quiet(start + 2, start + 4)
        assert generations.quiet(start + 2, start + 4, own=2)
        assert generations.quiet(start + 3, start + 4, own=1)
    finally:
        generations.unfollow()
        scratch.exec("nft", "delete", "table", "ip", "lbc")
        scratch.exec("nft", "delete", "table", "inet", "another-tool")
        scratch.exec("nft", "delete", "table", "inet", "lbc")


def json_form(case: str) -> str:
    if case == "worst-case":
        return artifact(worst_case_config()).text("json")
    return artifact(GOLDEN / case / "cluster.toml").text("json")


@pytest.mark.parametrize("case", sorted(OUTPUTS))
def test_text_and_json_build_the_same_table(
    case: str, pair: tuple[netns.Netns, netns.Netns]
) -> None:
    """nft -f of the text and json_cmd of the JSON leave identical `nft -j list` output."""
    by_text, by_json = pair
    load_text(by_text, OUTPUTS[case])
    load_json(by_json, json_form(case))
    from_text, from_json = listing(by_text), listing(by_json)
    assert len(from_text) > 5
    assert from_text == from_json


def test_loading_again_replaces_the_whole_table(scratch: netns.Netns) -> None:
    """Each form is a full replace: after hostnames then weighted, only weighted remains."""
    weighted = OUTPUTS["weighted"]
    load_text(scratch, weighted)
    fresh = listing(scratch)
    load_text(scratch, OUTPUTS["hostnames"])
    load_text(scratch, weighted)
    assert listing(scratch) == fresh
    load_json(scratch, json_form("hostnames"))
    load_json(scratch, json_form("weighted"))
    assert listing(scratch) == fresh


def test_a_broken_document_changes_nothing(scratch: netns.Netns) -> None:
    """A goto to a missing chain fails the whole transaction, in either form."""
    load_text(scratch, OUTPUTS["hostnames"])
    before = listing(scratch)
    weighted_text, weighted_json = OUTPUTS["weighted"], json_form("weighted")
    last = parse_nft(weighted_text).chains
    victim = next(c for c in last if c.startswith("service-"))
    bad_text = weighted_text.replace(f"goto {victim}", "goto service-NOWHERE", 1)
    assert bad_text != weighted_text
    with pytest.raises(netns.NetnsError, match="NOWHERE"):
        load_text(scratch, bad_text)
    assert listing(scratch) == before
    bad_json = weighted_json.replace(f'"target":"{victim}"', '"target":"service-NOWHERE"', 1)
    assert json.loads(bad_json) != json.loads(weighted_json)
    with pytest.raises(netns.NetnsError):
        load_json(scratch, bad_json)
    assert listing(scratch) == before


def test_the_kernel_keeps_the_exact_shares(scratch: netns.Netns) -> None:
    """Read back from the kernel, the numgen rules still give weights 1:2:3 exactly."""
    load_text(scratch, OUTPUTS["weighted"])
    held = held_chains(scratch)
    (chain,) = [c for c in held.chains if c.startswith("service-")]
    got = chosen_shares(held, chain)
    by_address = {k.rsplit(":", 1)[0]: v for k, v in got.items()}
    assert by_address == {
        "10.244.1.7": Fraction(1, 6),
        "10.244.2.3": Fraction(2, 6),
        "10.244.3.6": Fraction(3, 6),
    }


# --- real traffic through the node ----------------------------------------------------
@pytest.mark.parametrize("form", ["text", "json"])
def test_seed_demo_reaches_all_three_pods(seed: netns.Seed, form: str) -> None:
    """300 connections to 10.0.1.175:80 reach every pod about equally, masqueraded."""
    compiled = artifact(ROOT / "examples" / "hostnames.toml")
    if form == "text":
        load_text(seed.node, compiled.text())
    else:
        load_json(seed.node, compiled.text("json"))
    result = seed.client.request("10.0.1.175", 80, count=300)
    print(f"\n  hostnames ({form}), client -> 10.0.1.175:80 x300: {result}")
    assert not result.errors
    assert_shares("hostnames", result.names, dict.fromkeys(netns.PODS, 1))
    # The client is outside the pod CIDR: each pod sees the node's address on its link.
    for (name, source), _ in result.sources.items():
        assert source == seed.gateways[name], (name, source)


def test_weights_set_the_shares(seed: netns.Seed) -> None:
    """Weights 1:2:3 give shares 1/6, 2/6, 3/6 in real traffic."""
    load_text(seed.node, OUTPUTS["weighted"])
    result = seed.client.request("10.0.1.176", 80, count=600, timeout=2.0)
    print(f"\n  weighted 1:2:3, client -> 10.0.1.176:80 x600: {result}")
    assert not result.errors
    weights = {seed.pod_named("10.244.1.7"): 1, seed.pod_named("10.244.2.3"): 2}
    weights[seed.pod_named("10.244.3.6")] = 3
    assert_shares("weighted", result.names, weights)


def test_a_service_without_endpoints_refuses_at_once(seed: netns.Seed) -> None:
    """reject: the client hears "refused" at once instead of waiting for a timeout."""
    load_text(seed.node, OUTPUTS["hostnames"])
    before = seed.client.request("10.0.1.177", 80, count=1, timeout=0.5)
    assert before.errors == Counter(timeout=1), "without the reject the packet is lost"
    load_text(seed.node, OUTPUTS["no-endpoints"])
    result = seed.client.request("10.0.1.177", 80, count=5, timeout=2.0)
    print(f"\n  no-endpoints, client -> 10.0.1.177:80 x5: {result}")
    assert result.errors == Counter(refused=5)
    assert result.seconds < 0.5


def test_pods_keep_their_source_and_hairpin_is_masqueraded(seed: netns.Seed) -> None:
    """From a pod: other pods see the pod's own address; landing on itself, the node's."""
    load_text(seed.node, OUTPUTS["hostnames"])
    me = "hostnames-yp2kp"
    result = seed.pods[me].request("10.0.1.175", 80, count=90)
    print(f"\n  hostnames, pod {me} -> 10.0.1.175:80 x90: {result}")
    assert not result.errors
    assert set(result.names) == set(netns.PODS)
    for (name, source), _ in result.sources.items():
        expected = seed.gateways[me] if name == me else seed.addresses[me]
        assert source == expected, (name, source)


def test_masquerade_all_masquerades_pods_too(seed: netns.Seed) -> None:
    """masquerade_all with mark 0x8000: even a pod's request arrives from the node."""
    load_text(seed.node, OUTPUTS["masquerade-all"])
    me = "hostnames-bvc05"
    result = seed.pods[me].request("10.0.1.186", 80, count=20)
    print(f"\n  masquerade-all, pod {me} -> 10.0.1.186:80 x20: {result}")
    target = seed.pod_named("10.244.1.7")
    assert result.sources == Counter({(target, seed.gateways[target]): 20})


def test_udp_and_tcp_ports_of_one_service(seed: netns.Seed) -> None:
    """golden/udp-sctp: UDP datagrams and TCP connections to port 53 both reach both pods."""
    load_text(seed.node, OUTPUTS["udp-sctp"])
    pods = {seed.pod_named("10.244.1.7"): 1, seed.pod_named("10.244.2.3"): 1}
    for proto in ("udp", "tcp"):
        result = seed.client.request("10.0.1.187", 53, count=200, proto=proto)
        print(f"\n  udp-sctp, client -> 10.0.1.187:53/{proto} x200: {result}")
        assert not result.errors
        assert_shares(f"udp-sctp {proto}", result.names, pods)


def test_node_port_is_masqueraded(seed: netns.Seed) -> None:
    """golden/node-port: the node's address at 30080 reaches both pods, from the node."""
    load_text(seed.node, OUTPUTS["node-port"])
    result = seed.client.request(netns.NODE_ADDRESS, 30080, count=100)
    print(f"\n  node-port, client -> {netns.NODE_ADDRESS}:30080 x100: {result}")
    assert not result.errors
    pods = {seed.pod_named("10.244.1.7"): 1, seed.pod_named("10.244.2.3"): 1}
    assert_shares("node-port", result.names, pods)
    for (name, source), _ in result.sources.items():
        assert source == seed.gateways[name], (name, source)


def test_external_traffic_local_keeps_the_source_and_pods_short_circuit(
    seed: netns.Seed,
) -> None:
    """ETP Local: outside traffic only to the local pod, unmasqueraded; pods and the node
    itself are sent to the cluster-wide pool (the node's traffic masqueraded)."""
    load_text(seed.node, OUTPUTS["external-traffic-local"])
    local, remote = seed.pod_named("10.244.1.7"), seed.pod_named("10.244.2.3")
    for host, port in (("198.51.100.20", 80), (netns.NODE_ADDRESS, 30082)):
        result = seed.client.request(host, port, count=40)
        print(f"\n  external-traffic-local, client -> {host}:{port} x40: {result}")
        assert result.sources == Counter({(local, netns.CLIENT_ADDRESS): 40})
    result = seed.pods[remote].request("198.51.100.20", 80, count=60)
    print(f"  external-traffic-local, pod {remote} -> 198.51.100.20:80 x60: {result}")
    assert not result.errors
    assert set(result.names) == {local, remote}, "pods go to the cluster-wide pool"
    result = seed.node.request("198.51.100.20", 80, count=60)
    print(f"  external-traffic-local, the node itself -> 198.51.100.20:80 x60: {result}")
    assert set(result.names) == {local, remote}, "so does the node, masqueraded"
    for (name, source), _ in result.sources.items():
        assert source == seed.gateways[name], (name, source)


def test_load_balancer_source_ranges(seed: netns.Seed) -> None:
    """golden/load-balancer admits 203.0.113.0/24 only: other sources are dropped."""
    load_text(seed.node, OUTPUTS["load-balancer"])
    inside = "203.0.113.5"
    seed.client.ip("addr", "add", f"{inside}/32", "dev", "eth0")
    try:
        refused = seed.client.request("198.51.100.10", 443, count=2, timeout=0.5)
        print(f"\n  load-balancer, client {netns.CLIENT_ADDRESS} x2: {refused}")
        assert refused.errors == Counter(timeout=2)
        allowed = seed.client.request("198.51.100.10", 443, count=40, source=inside)
        print(f"  load-balancer, client {inside} x40: {allowed}")
        assert not allowed.errors
        assert set(allowed.names) == {seed.pod_named("10.244.1.7"), seed.pod_named("10.244.2.3")}
        # The cluster IP has no source ranges.
        assert not seed.client.request("10.0.1.181", 443, count=5).errors
    finally:
        seed.client.ip("addr", "del", f"{inside}/32", "dev", "eth0")


def test_session_affinity_sticks(seed: netns.Seed) -> None:
    """ClientIP affinity: after the first choice, every connection goes to the same pod."""
    load_text(seed.node, OUTPUTS["affinity"])
    result = seed.client.request("10.0.1.179", 80, count=40)
    print(f"\n  affinity, client -> 10.0.1.179:80 x40: {result}")
    assert not result.errors
    assert len(result.names) == 1, result.names
    (chosen,) = result.names
    address = seed.addresses[chosen]
    sets = json.loads(seed.node.exec("nft", "-j", "list", "sets", "inet"))["nftables"]
    remembered = {
        s["set"]["name"]: s["set"].get("elem", [])
        for s in sets
        if "set" in s and s["set"]["name"].startswith("affinity-")
    }
    holding = [name for name, elements in remembered.items() if elements]
    assert len(holding) == 1 and f"__{address}/8080" in holding[0], remembered
