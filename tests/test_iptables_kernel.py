"""The iptables backend on this machine's kernel: the rules load, and real traffic follows them.

Run with `pytest -s` to see the counts. Shares are checked against the binomial
distribution: a count further than Z = 5 standard deviations from its mean has a
two-sided probability below 6e-7, so a failure means the rules are wrong, not luck.
"""

from __future__ import annotations

import math
import shlex
from collections import Counter
from collections.abc import Iterator, Mapping
from pathlib import Path

import pytest

import lbc
from lbc.backends.iptables import kernel as ipt_kernel
from lbc.backends.iptables.render import comment
from tests import netns

# OUTPUTS: every golden iptables output, plus generated ones such as the worst case.
from tests.configs import ANY_SOURCE_AND_DOTTED_TAILS
from tests.golden import GOLDEN
from tests.test_iptables_render import OUTPUTS, RESTORE, parse_restore, sections, shares

pytestmark = pytest.mark.netns

ROOT = Path(__file__).resolve().parent.parent
SAVE = {4: "iptables-save", 6: "ip6tables-save"}
TOOLS = (*RESTORE.values(), *SAVE.values(), "iptables")
Z = 5.0
HOSTNAMES_VIP = "10.0.1.175"
WEIGHTED_VIP = "10.0.1.176"
EMPTY_VIP = "10.0.1.177"
UDP_VIP = "10.0.1.187"  # golden/udp-sctp
MASQ_ALL_VIP = "10.0.1.186"  # golden/masquerade-all
DNS_PORT = 5353  # the target port of golden/udp-sctp
# Target ports of golden/affinity and golden/external-traffic-local, golden/load-balancer.
HTTP_PORT, HTTPS_PORT = 8080, 8443
ALLOWED_SOURCE = "203.0.113.5"  # inside golden/load-balancer's source range


@pytest.fixture
def scratch() -> Iterator[netns.Netns]:
    """An empty namespace of its own, deleted afterwards."""
    netns.require(*TOOLS)
    with netns.Lab() as lab:
        yield lab.namespace("rules")


@pytest.fixture(scope="module")
def seed() -> Iterator[netns.Seed]:
    """The seed demo (client, node, three pods serving the golden cases' ports), for the module."""
    netns.require(*TOOLS)
    ports = (netns.POD_PORT, DNS_PORT, HTTP_PORT, HTTPS_PORT)
    with netns.seed_topology(ports=ports) as topology:
        yield topology


def restore(ns: netns.Netns, doc: str, family: int = 4) -> None:
    """Replace lbc's tables in `ns`; equivalent to `ip netns exec NS iptables-restore < doc`."""
    ns.exec(RESTORE[family], input=doc)


def saved(ns: netns.Netns, family: int = 4) -> str:
    """What the kernel holds; equivalent to `ip netns exec NS iptables-save`."""
    return ns.exec(SAVE[family])


def compiled(source: str | Path, family: int = 4) -> str:
    """The restore document of `family` that lbc compiles from a cluster.toml path."""
    artifact = lbc.compile(lbc.load(source), backend="iptables")
    doc: str = artifact.data[family]
    return doc


def assert_shares(label: str, counts: Counter[str], weights: Mapping[str, int]) -> None:
    """Each name's count is within Z standard deviations of its binomial mean."""
    n, total = sum(counts.values()), sum(weights.values())
    assert set(counts) == {k for k, w in weights.items() if w}, f"{label}: {counts}"
    for name, w in weights.items():
        p = w / total
        mean, sigma = n * p, math.sqrt(n * p * (1 - p))
        print(f"  {label}: {name} {counts[name]}/{n} (expected {mean:.1f} ± {Z * sigma:.1f})")
        assert abs(counts[name] - mean) <= Z * sigma, f"{label}: {name} got {counts[name]}/{n}"


# --- the harness itself -------------------------------------------------------------
def test_the_lab_removes_namespaces_and_servers_even_on_failure() -> None:
    netns.require()
    with pytest.raises(RuntimeError, match="test failed here"), netns.Lab() as lab:
        a, b = lab.namespace("a"), lab.namespace("b")
        lab.link(a, ["10.9.0.1/24"], b, ["10.9.0.2/24"])
        server = lab.serve(b, "web", "10.9.0.2", 8080)
        result = a.request("10.9.0.2", 8080, count=3)
        assert result.sources == Counter({("web", "10.9.0.1"): 3})
        assert a.request("10.9.0.2", 8081, count=1).errors == Counter(refused=1)
        raise RuntimeError("test failed here")
    assert server.poll() is not None, "the server process was not killed"
    for ns in (a, b):
        assert not Path("/run/netns", ns.name).exists(), f"{ns.name} was not deleted"


# --- every generated document loads ---------------------------------------------------
@pytest.mark.parametrize("case", sorted(OUTPUTS))
def test_output_loads_into_the_kernel(case: str, scratch: netns.Netns) -> None:
    """A real restore (not --test) of every family section; iptables-save then prints back
    exactly the rendered chains and rules, byte for byte (what makes plan and verify exact)."""
    docs = sections(OUTPUTS[case])
    assert docs, f"{case} has no `# ipvN:` sections"
    for family, doc in docs.items():
        restore(scratch, doc, family)
        assert ipt_kernel.parse(family, saved(scratch, family)) == ipt_kernel.parse(family, doc)


def test_the_kernel_holds_exactly_the_compiled_rules(scratch: netns.Netns) -> None:
    """`iptables -C` finds every rule of the seed demo as written, matches and targets alike."""
    doc = compiled(ROOT / "examples" / "hostnames.toml")
    restore(scratch, doc)
    tables = parse_restore(doc)
    checked = 0
    for name, table in tables.items():
        for chain, rule in table.rules:
            scratch.exec("iptables", "-w", "-t", name, "-C", chain, *shlex.split(rule))
            checked += 1
    print(f"  {checked} rules found with iptables -C")
    assert checked == sum(len(t.rules) for t in tables.values()) > 20


def test_a_broken_document_fails_to_load_and_changes_nothing(scratch: netns.Netns) -> None:
    """The load check catches a jump to an undeclared chain; the old rules stay in place."""
    good = compiled(ROOT / "examples" / "hostnames.toml")
    restore(scratch, good)
    before = [line for line in saved(scratch).splitlines() if not line.startswith("#")]
    bad = good.replace(
        "-A LBC-MARK-MASQ -j MARK --set-xmark 0x4000/0x4000", "-A LBC-MARK-MASQ -j LBC-NOWHERE"
    )
    assert bad != good
    with pytest.raises(netns.NetnsError, match="LBC-NOWHERE"):
        restore(scratch, bad)
    after = [line for line in saved(scratch).splitlines() if not line.startswith("#")]
    assert after == before


def test_escaped_comments_reach_the_kernel_intact(scratch: netns.Netns) -> None:
    tricky = 'say "hi" \\o/ -j DROP'
    doc = f"*filter\n:LBC-TEST - [0:0]\n-A LBC-TEST {comment(tricky)} -j RETURN\nCOMMIT\n"
    restore(scratch, doc)
    (rule,) = parse_restore(saved(scratch))["filter"].chain("LBC-TEST")
    words = shlex.split(rule)
    assert words[words.index("--comment") + 1] == tricky
    assert words[-2:] == ["-j", "RETURN"]


def test_rules_that_iptables_prints_differently_read_back_in_sync(
    scratch: netns.Netns, tmp_path: Path
) -> None:
    """Every rendered rule reads back as written, so verify finds no drift and an apply
    that reads back (`--full`, iptables-legacy, another writer) is not rolled back."""
    cluster = lbc.loads(ANY_SOURCE_AND_DOTTED_TAILS)
    lock = tmp_path / "lock"
    lbc.apply(cluster, "iptables", netns=scratch.name, lock_path=lock)
    drift = lbc.verify(cluster, "iptables", netns=scratch.name)
    assert drift.in_sync, [line for c in drift.changes for line in c.diff()]
    full = lbc.apply(cluster, "iptables", netns=scratch.name, lock_path=lock, full=True)
    assert full.applied
    again = lbc.apply(cluster, "iptables", netns=scratch.name, lock_path=tmp_path / "other")
    assert again.plan.in_sync and not again.applied


# --- real traffic through the node ------------------------------------------------------
def test_seed_demo_reaches_all_three_pods(seed: netns.Seed) -> None:
    """300 connections to 10.0.1.175:80 reach every pod about equally, masqueraded."""
    restore(seed.node, compiled(ROOT / "examples" / "hostnames.toml"))
    result = seed.client.request(HOSTNAMES_VIP, 80, count=300)
    print(f"\n  hostnames, client -> {HOSTNAMES_VIP}:80 x300: {result}")
    assert not result.errors
    assert_shares("hostnames", result.names, dict.fromkeys(netns.PODS, 1))
    # The client is outside the pod CIDR: each pod sees the node's address on its link.
    for (name, source), _ in result.sources.items():
        assert source == seed.gateways[name], (name, source)


def test_weights_set_the_shares(seed: netns.Seed) -> None:
    """Weights 1:2:3 give shares 1/6, 2/6, 3/6, in the kernel's copy and in real traffic."""
    doc = compiled(GOLDEN / "weighted" / "cluster.toml")
    restore(seed.node, doc)
    # The kernel keeps each probability as a 31-bit fraction; multiplied out, it still
    # gives the weights to better than 1e-9.
    held = shares(saved(seed.node))
    for address, weight in {"10.244.1.7": 1, "10.244.2.3": 2, "10.244.3.6": 3}.items():
        assert abs(held[f"{address}:{netns.POD_PORT}"] - weight / 6) < 1e-9
    result = seed.client.request(WEIGHTED_VIP, 80, count=600)
    print(f"\n  weighted 1:2:3, client -> {WEIGHTED_VIP}:80 x600: {result}")
    assert not result.errors
    weights = {seed.pod_named("10.244.1.7"): 1, seed.pod_named("10.244.2.3"): 2}
    weights[seed.pod_named("10.244.3.6")] = 3
    assert_shares("weighted", result.names, weights)


def test_a_service_without_endpoints_refuses_at_once(seed: netns.Seed) -> None:
    """REJECT: the client hears "refused" within milliseconds instead of waiting for a timeout.

    The node rate-limits the ICMP errors it sends to one client (a burst of 6, then one
    a second: net.ipv4.icmp_ratelimit), so only the first few refusals are immediate;
    later ones arrive with the SYN retransmitted a second later. Five stay in the burst.
    """
    restore(seed.node, compiled(ROOT / "examples" / "hostnames.toml"))
    before = seed.client.request(EMPTY_VIP, 80, count=1, timeout=0.5)
    print(f"\n  no rules for {EMPTY_VIP}:80 x1: {before}")
    assert before.errors == Counter(timeout=1), "without the REJECT rule the packet is dropped"
    restore(seed.node, compiled(GOLDEN / "no-endpoints" / "cluster.toml"))
    result = seed.client.request(EMPTY_VIP, 80, count=5, timeout=2.0)
    print(f"  no-endpoints, client -> {EMPTY_VIP}:80 x5: {result}")
    assert result.errors == Counter(refused=5)
    assert result.seconds < 0.5, "refusals must not wait for a SYN retransmission or the timeout"


def test_pods_keep_their_source_and_hairpin_is_masqueraded(seed: netns.Seed) -> None:
    """From a pod: other pods see the pod's own address; landing on itself, the node's."""
    restore(seed.node, compiled(ROOT / "examples" / "hostnames.toml"))
    me = "hostnames-yp2kp"
    result = seed.pods[me].request(HOSTNAMES_VIP, 80, count=90)
    print(f"\n  hostnames, pod {me} -> {HOSTNAMES_VIP}:80 x90: {result}")
    print(f"  sources seen: {dict(result.sources)}")
    assert not result.errors
    # Every pod answers at least once: missing one by chance has probability < 1e-15.
    assert set(result.names) == set(netns.PODS)
    for (name, source), _ in result.sources.items():
        expected = seed.gateways[me] if name == me else seed.addresses[me]
        assert source == expected, (name, source)


def test_masquerade_all_masquerades_pods_too(seed: netns.Seed) -> None:
    """masquerade_all with mark 0x8000: even a pod's request arrives from the node."""
    restore(seed.node, compiled(GOLDEN / "masquerade-all" / "cluster.toml"))
    me = "hostnames-bvc05"
    result = seed.pods[me].request(MASQ_ALL_VIP, 80, count=20)
    print(f"\n  masquerade-all, pod {me} -> {MASQ_ALL_VIP}:80 x20: {result}")
    target = seed.pod_named("10.244.1.7")
    assert result.sources == Counter({(target, seed.gateways[target]): 20})


def test_udp_and_tcp_ports_of_one_service(seed: netns.Seed) -> None:
    """golden/udp-sctp: UDP datagrams and TCP connections to port 53 both reach both pods."""
    restore(seed.node, compiled(GOLDEN / "udp-sctp" / "cluster.toml"))
    pods = {seed.pod_named("10.244.1.7"): 1, seed.pod_named("10.244.2.3"): 1}
    for proto in ("udp", "tcp"):
        result = seed.client.request(UDP_VIP, 53, count=200, proto=proto)
        print(f"\n  udp-sctp, client -> {UDP_VIP}:53/{proto} x200: {result}")
        assert not result.errors
        assert_shares(f"udp-sctp {proto}", result.names, pods)


def test_session_affinity_sticks_to_one_pod(seed: netns.Seed) -> None:
    """ClientIP affinity: 40 connections from one client all reach the same pod."""
    restore(seed.node, compiled(GOLDEN / "affinity" / "cluster.toml"))
    result = seed.client.request("10.0.1.179", 80, count=40)
    print(f"\n  affinity, client -> 10.0.1.179:80 x40: {result}")
    assert not result.errors
    # Without affinity, all 40 on one of two pods has probability 2 * 2**-40.
    assert len(result.names) == 1 and sum(result.names.values()) == 40


def test_external_traffic_policy_local_keeps_the_client_address(seed: netns.Seed) -> None:
    """Node port and external IP with policy Local: only the node's own pod, no masquerade."""
    restore(seed.node, compiled(GOLDEN / "external-traffic-local" / "cluster.toml"))
    local = seed.pod_named("10.244.1.7")  # the endpoint on node-1
    for address, port in ((netns.NODE_ADDRESS, 30082), ("198.51.100.20", 80)):
        result = seed.client.request(address, port, count=30)
        print(f"\n  external-traffic-local, client -> {address}:{port} x30: {result}")
        assert result.sources == Counter({(local, netns.CLIENT_ADDRESS): 30})


def test_load_balancer_source_ranges(seed: netns.Seed) -> None:
    """Only 203.0.113.0/24 may use the load-balancer IP; others are dropped (a timeout)."""
    restore(seed.node, compiled(GOLDEN / "load-balancer" / "cluster.toml"))
    seed.client.ip("addr", "add", f"{ALLOWED_SOURCE}/32", "dev", "eth0")
    try:
        allowed = seed.client.request("198.51.100.10", 443, count=40, source=ALLOWED_SOURCE)
        denied = seed.client.request("198.51.100.10", 443, count=2, timeout=0.3)
    finally:
        seed.client.ip("addr", "del", f"{ALLOWED_SOURCE}/32", "dev", "eth0")
    print(f"\n  load-balancer from {ALLOWED_SOURCE} x40: {allowed}")
    print(f"  load-balancer from {netns.CLIENT_ADDRESS} x2: {denied}")
    assert not allowed.errors
    assert set(allowed.names) == {seed.pod_named("10.244.1.7"), seed.pod_named("10.244.2.3")}
    # External traffic is masqueraded (policy Cluster): pods see the node.
    assert all(source == seed.gateways[name] for name, source in allowed.sources)
    assert denied.errors == Counter(timeout=2)
    # The timeouts come from lbc's DROP rule: it counted both SYNs.
    drops = [
        line
        for line in seed.node.exec("iptables-save", "-c", "-t", "filter").splitlines()
        if "traffic not accepted by" in line and line.endswith("-j DROP")
    ]
    assert len(drops) == 1 and drops[0].startswith("[2:"), drops


def test_ipv6_service(seed: netns.Seed) -> None:
    """golden/ipv6 through ip6tables: both pods answer [fd00:10::1:175]:80, masqueraded."""
    restore(seed.node, compiled(GOLDEN / "ipv6" / "cluster.toml", family=6), family=6)
    result = seed.client.request("fd00:10::1:175", 80, count=200)
    print(f"\n  ipv6, client -> [fd00:10::1:175]:80 x200: {result}")
    assert not result.errors
    pods = {seed.pod_named("fd00:244::1:7"): 1, seed.pod_named("fd00:244::2:3"): 1}
    assert_shares("ipv6", result.names, pods)
    assert all(source == seed.gateways6[name] for name, source in result.sources)


def test_dual_stack_service_answers_on_both_families(seed: netns.Seed) -> None:
    """golden/dual-stack: one restore per family; each cluster IP reaches its family's pod."""
    for family in (4, 6):
        restore(seed.node, compiled(GOLDEN / "dual-stack" / "cluster.toml", family), family)
    pod = seed.pod_named("10.244.1.7")
    for vip, gateways in (("10.0.1.178", seed.gateways), ("fd00:10::1:178", seed.gateways6)):
        result = seed.client.request(vip, 80, count=20)
        print(f"\n  dual-stack, client -> {vip} port 80 x20: {result}")
        assert result.sources == Counter({(pod, gateways[pod]): 20})


# --- localhost node ports and route_localnet -------------------------------------------
LOOPBACK_ONLY_PORTS = (9998, 9999)  # services of the node's own, bound to 127.0.0.1


def half_open_from(ns: netns.Netns, port: int) -> list[str]:
    """The peers whose SYN a listener of `ns` on `port` answered and that have not
    completed the handshake; equivalent to `ss -Htn state syn-recv sport = :PORT`."""
    out = ns.exec("ss", "-Htn", "state", "syn-recv", "sport", "=", f":{port}")
    return [line.split()[-1] for line in out.splitlines()]


def test_localhost_node_ports_keep_the_loopback_off_the_network() -> None:
    """route_localnet, which node ports on 127.0.0.1 need, lets a neighbour reach what
    listens on the node's loopback (CVE-2020-8558); lbc's rules drop that, and only that.

    A neighbour routes 127.0.0.1 to the node. With the rules of a cluster without
    localhost node ports, the node's loopback-only server answers the neighbour's SYN
    (the neighbour's own kernel then drops a reply from 127.0.0.1, so the half-open
    connection on the node tells); with `localhost_node_ports` the SYN is dropped before
    it, while the node's own connections to its loopback still succeed."""
    netns.require(*TOOLS)
    case = GOLDEN / "localhost-node-port" / "cluster.toml"
    without = lbc.loads(case.read_text().replace("localhost_node_ports = true", ""))
    with netns.Lab() as lab:
        node, neighbour = lab.namespace("node"), lab.namespace("nbr")
        lab.link(node, ["192.168.49.2/24"], neighbour, ["192.168.49.9/24"], b_name="eth0")
        node.sysctl("net.ipv4.conf.all.route_localnet", 1)  # what `lbc apply` sets
        neighbour.sysctl("net.ipv4.conf.all.route_localnet", 1)  # may send to 127.0.0.1
        neighbour.ip("route", "del", "local", "127.0.0.0/8", "dev", "lo", "table", "local")
        neighbour.ip("route", "del", "local", "127.0.0.1", "dev", "lo", "table", "local")
        neighbour.ip("route", "add", "127.0.0.1/32", "via", "192.168.49.2", "dev", "eth0")
        lab.serve(node, "loopback-only", "127.0.0.1", *LOOPBACK_ONLY_PORTS)
        exposed, guarded = LOOPBACK_ONLY_PORTS
        restore(node, lbc.compile(without, "iptables").data[4])
        neighbour.request("127.0.0.1", exposed, timeout=0.5)
        peers = [peer.rsplit(":", 1)[0] for peer in half_open_from(node, exposed)]
        assert peers == ["192.168.49.9"], "the setup does not show the exposure"
        restore(node, compiled(case))
        neighbour.request("127.0.0.1", guarded, timeout=0.5)
        assert half_open_from(node, guarded) == []
        local = node.request("127.0.0.1", guarded, count=3)
        assert local.names == Counter({"loopback-only": 3}), local
