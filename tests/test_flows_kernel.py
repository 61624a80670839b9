"""The packet-flow matrix (tests/flows.py) on this machine's kernel, through iptables and nftables.

Every row runs as real traffic in one network-namespace topology that has every
source role of the matrix:

    outside (203.0.113.5, 198.18.0.5, 2001:db8::5) --+
    pod client (10.244.9.9, fd00:244::9:9) ----------+-- node (192.168.49.2; the rules)
    one namespace per pod network (10.244.1.0/24,    |
      fd00:244::1:0/112, ...) holding every endpoint-+
      address of the golden cases, each serving its target ports

The node itself is a source too (requests from inside it, bound to 192.168.49.2, or
to 198.51.100.12, a load-balancer address it holds on its loopback device),
and so is a backend (the hairpin row: from the backend's namespace, bound to its
address). Every server answers `<its address> <the source address it saw>` over TCP,
UDP and SCTP. This kernel tracks and translates SCTP but has no SCTP sockets, so
SCTP rows send a real INIT on a raw socket and read the INIT ACK (tests/netns.py).

What each row asserts:
- FORWARD: every expected backend answers and no other; each saw the client's own
  address, or, when masqueraded (and always on a hairpin), the node's address on the
  backend's link. The count of connections makes missing a backend by chance less
  likely than 1e-6. With client-IP affinity, all answers come from one backend.
- REJECT: "connection refused" within milliseconds. The node's ICMP rate limits are
  off (net.ipv4.icmp_ratelimit=0, net.ipv6.icmp.ratelimit=0), so no refusal waits.
- DROP: a timeout (0.3 s, twice).
- REJECT and DROP alike: the node's conntrack table has no entry for the flow, so
  a filter rule stopped the packet. (A packet lbc ignores is forwarded to the outside
  namespace, which does not route and loses it: a timeout too, but a tracked one.)
- PASS: no backend answers, and every conntrack entry of the flow is untranslated.
  The node itself listens on every node port a row uses: a PASS row to the node gets
  the node's own answer, and any other row that the rules fail to handle does too.

Every row runs through iptables, through iptables in its large-cluster form (forced on
each small case: endpoint rules without comments, pools of one endpoint without an
endpoint chain) and through nftables.

Rules are loaded once per (backend, golden case), replacing the previous case's:
the rows run grouped by backend, then case.
"""

from __future__ import annotations

import ipaddress
import re
from collections import Counter, defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cache

import pytest

import lbc
from lbc.backends.iptables.dispatch import SPLIT_ABOVE
from lbc.backends.iptables.render import FamilyRenderer
from lbc.ir import Program
from lbc.ir.trace import trace
from tests import netns
from tests.flows import (
    DROP,
    EXTERNAL,
    EXTERNAL6,
    FLOWS,
    LOOPBACK,
    NODE,
    NODE_LB,
    OUTSIDER,
    PASS,
    POD,
    POD6,
    REJECT,
    Flow,
)
from tests.golden import GOLDEN

pytestmark = pytest.mark.netns

# "iptables-large": the iptables backend's large-cluster form (`render.is_large`: no
# endpoint comments, no endpoint chain for a pool of one endpoint), forced on each case.
LARGE = "iptables-large"
BACKENDS = ("iptables", LARGE, "nftables")
TOOLS = ("nft", "iptables-restore", "ip6tables-restore", "conntrack")
RESTORE = {4: "iptables-restore", 6: "ip6tables-restore"}
NODE6 = "fd00:49::2"
OUTSIDE = {4: "192.168.49.10", 6: "fd00:49::10"}  # the outside namespace on the node's link
OUTSIDE_PREFIX = {4: 24, 6: 64}
MISS = 1e-6  # the largest chance that luck alone hides an expected backend
DROP_TIMEOUT = 0.3
FORWARD_TIMEOUT = 1.0  # an answer takes milliseconds; a lost SYN is retried only after 1 s
REJECT_COUNT = 3  # well inside the ICMP burst of 6 even if the rate limit were on


# The kernel tracks connections in a namespace only once some rule there needs it. A
# real node always does; here this table makes sure, so that the REJECT, DROP and PASS
# checks, which read the conntrack table, never depend on what the rules under test use.
CONNTRACK_ON = """table inet conntrack-on {
	chain new-connections {
		type filter hook prerouting priority 0; policy accept;
		ct state new counter
	}
}
"""


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def backend_of(variant: str) -> str:
    """The backend a variant of the matrix renders with."""
    return "iptables" if variant == LARGE else variant


def refused_by(variant: str, case: str) -> bool:
    """The backend cannot express the case: its golden file is `<backend>.unsupported`."""
    return (GOLDEN / case / f"{backend_of(variant)}.unsupported").exists()


CASES = tuple(dict.fromkeys(f.case for f in FLOWS))  # in the matrix's order
PLAN = [(b, f) for b in BACKENDS for case in CASES for f in FLOWS if f.case == case]
IDS = [
    f"{b}:{f.case}:{slug(f.name)}" + (":backend-refuses-case" if refused_by(b, f.case) else "")
    for b, f in PLAN
]


@cache
def cluster(case: str) -> lbc.Cluster:
    return lbc.load(GOLDEN / case / "cluster.toml")


@cache
def program(case: str) -> Program:
    return lbc.lower(cluster(case))


def listeners() -> dict[str, set[int]]:
    """Every endpoint address of every case in the matrix, with every target port it has."""
    out: dict[str, set[int]] = defaultdict(set)
    for case in CASES:
        for service in cluster(case).services:
            for endpoint in service.endpoints:
                for port in service.ports:
                    out[str(endpoint.ip)].add(port.target_port or port.port)
    return out


def node_listeners() -> dict[str, list[int]]:
    """Every node (address, port) a row aims at: a program of the node's own listens there.

    Whatever lbc does not translate or stop reaches it and answers as the node: a node
    port row then fails visibly instead of being refused by the node's TCP stack, which
    a REJECT would look the same as.
    """
    out: dict[str, set[int]] = defaultdict(set)
    for flow in FLOWS:
        if flow.dest in (NODE, NODE6):
            out[flow.dest].add(flow.port)
    return {address: sorted(ports) for address, ports in out.items()}


def family_of(address: str) -> int:
    return ipaddress.ip_address(address).version


# --- the topology -----------------------------------------------------------------------
@dataclass
class Flows:
    """The namespaces of the matrix, and which golden case the node holds for which backend."""

    node: netns.Netns
    clients: dict[str, netns.Netns]  # source address -> the namespace that owns it
    gateways: dict[str, str]  # backend address -> the node's address on its link
    loaded: tuple[str, str] | None = None

    def load(self, backend: str, case: str) -> None:
        """Replace whatever the node holds with `case` compiled for `backend`."""
        if self.loaded == (backend, case):
            return
        self.loaded = None
        # Empty lbc's iptables tables (whichever iptables variant), then every nft table.
        for command in RESTORE.values():
            self.node.exec(command, input="*filter\nCOMMIT\n*nat\nCOMMIT\n")
        self.node.exec("nft", "flush", "ruleset")
        self.node.exec("nft", "-f", "/dev/stdin", input=CONNTRACK_ON)
        artifact = lbc.compile(cluster(case), backend=backend_of(backend))
        if backend == LARGE:
            for family in sorted(artifact.data):
                doc = FamilyRenderer(program(case), family, SPLIT_ABOVE, large=True).render()
                self.node.exec(RESTORE[family], input=doc)
        elif backend == "iptables":
            for family, doc in sorted(artifact.data.items()):
                self.node.exec(RESTORE[family], input=doc)
        else:
            self.node.exec("nft", "-f", "/dev/stdin", input=artifact.text())
        self.loaded = (backend, case)

    def forget_connections(self) -> None:
        """Equivalent to `conntrack -F` for both families in the node."""
        for family in ("ipv4", "ipv6"):
            self.node.exec("conntrack", "-F", "-f", family)

    def tracked(self, flow: Flow) -> list[tuple[str, int]]:
        """The reply source (address, port) of each node conntrack entry of `flow`."""
        family = f"ipv{family_of(flow.dest)}"
        text = self.node.exec("conntrack", "-L", "-f", family, "-p", flow.proto)
        out = []
        for line in text.splitlines():
            pairs = [w.split("=", 1) for w in line.split() if "=" in w]
            values: dict[str, list[str]] = defaultdict(list)
            for key, value in pairs:
                values[key].append(value)
            if len(values["src"]) < 2 or len(values["dport"]) < 2:
                continue
            original = (values["src"][0], values["dst"][0], int(values["dport"][0]))
            if same(original, (flow.source, flow.dest, flow.port)):
                out.append((values["src"][1], int(values["sport"][1])))
        return out


def same(a: tuple[str, str, int], b: tuple[str, str, int]) -> bool:
    return (ipaddress.ip_address(a[0]), ipaddress.ip_address(a[1]), a[2]) == (
        ipaddress.ip_address(b[0]),
        ipaddress.ip_address(b[1]),
        b[2],
    )


def pod_network(address: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    prefix = netns.POD_PREFIX[family_of(address)]
    return ipaddress.ip_interface(f"{address}/{prefix}").network


@contextmanager
def flow_topology() -> Iterator[Flows]:
    """Build the matrix's namespaces (servers running); remove them all afterwards."""
    with netns.Lab() as lab:
        node = lab.namespace("node")
        for key, value in (
            ("net.ipv4.ip_forward", 1),
            ("net.ipv6.conf.all.forwarding", 1),
            # A hairpin leaves by the interface it came in on: no redirects.
            ("net.ipv4.conf.all.send_redirects", 0),
            ("net.ipv4.conf.default.send_redirects", 0),
            # Sources such as 203.0.113.5 are not on any link of the node.
            ("net.ipv4.conf.all.rp_filter", 0),
            ("net.ipv4.conf.default.rp_filter", 0),
            # Every REJECT answers at once, however many rows ask in a row.
            ("net.ipv4.icmp_ratelimit", 0),
            ("net.ipv6.icmp.ratelimit", 0),
            # Node ports on 127.0.0.1: what `lbc apply` sets (rules here are loaded raw).
            ("net.ipv4.conf.all.route_localnet", 1),
        ):
            node.sysctl(key, value)

        outside = lab.namespace("outside")
        outside.sysctl("net.ipv4.ip_forward", 0)
        lab.link(
            node,
            [f"{NODE}/{OUTSIDE_PREFIX[4]}", f"{NODE6}/{OUTSIDE_PREFIX[6]}"],
            outside,
            [f"{OUTSIDE[4]}/{OUTSIDE_PREFIX[4]}", f"{OUTSIDE[6]}/{OUTSIDE_PREFIX[6]}"],
            b_name="eth0",
        )
        outside.ip("addr", "add", f"{EXTERNAL}/32", "dev", "eth0")
        outside.ip("addr", "add", f"{OUTSIDER}/32", "dev", "eth0")
        outside.ip("addr", "add", f"{EXTERNAL6}/128", "dev", "eth0", "nodad")
        outside.ip("route", "add", "default", "via", NODE)
        outside.ip("-6", "route", "add", "default", "via", NODE6)
        # The node's upstream: replies to outside sources, and whatever lbc leaves alone.
        node.ip("route", "add", "default", "via", OUTSIDE[4])
        node.ip("-6", "route", "add", "default", "via", OUTSIDE[6])

        pod = lab.namespace("pod")
        pod.sysctl("net.ipv4.ip_forward", 0)
        prefix = netns.POD_PREFIX
        lab.link(
            node,
            [f"{netns.gateway(POD)}/{prefix[4]}", f"{netns.gateway(POD6)}/{prefix[6]}"],
            pod,
            [f"{POD}/{prefix[4]}", f"{POD6}/{prefix[6]}"],
            b_name="eth0",
        )
        pod.ip("route", "add", "default", "via", netns.gateway(POD))
        pod.ip("-6", "route", "add", "default", "via", netns.gateway(POD6))

        clients = {EXTERNAL: outside, OUTSIDER: outside, EXTERNAL6: outside}
        # A load-balancer address the node holds itself, as MetalLB's layer-2 mode does.
        node.ip("addr", "add", f"{NODE_LB}/32", "dev", "lo")
        clients |= {POD: pod, POD6: pod, NODE: node, NODE6: node, LOOPBACK: node, NODE_LB: node}
        gateways = {}
        ports = listeners()
        by_network: dict[object, list[str]] = defaultdict(list)
        for address in sorted(ports, key=lambda a: ipaddress.ip_address(a).packed):
            by_network[pod_network(address)].append(address)
        for index, (network, addresses) in enumerate(by_network.items()):
            assert network not in {pod_network(POD), pod_network(POD6)}, network
            first, *more = addresses
            gateway, length = netns.gateway(first), netns.POD_PREFIX[family_of(first)]
            assert gateway not in addresses, f"{gateway} is both the node and an endpoint"
            space = lab.namespace(f"ep{index}")
            lab.link(node, [f"{gateway}/{length}"], space, [f"{first}/{length}"], b_name="eth0")
            for address in more:
                extra = ["nodad"] if family_of(address) == 6 else []
                space.ip("addr", "add", f"{address}/{length}", "dev", "eth0", *extra)
            space.ip(f"-{family_of(first)}", "route", "add", "default", "via", gateway)
            netns.serve_addresses(lab, space, {a: sorted(ports[a]) for a in addresses})
            for address in addresses:
                clients[address], gateways[address] = space, gateway
        if own := node_listeners():
            netns.serve_addresses(lab, node, own)
        yield Flows(node, clients, gateways)


@pytest.fixture(scope="module")
def flows() -> Iterator[Flows]:
    """The whole matrix topology, built once for the module."""
    netns.require(*TOOLS)
    with flow_topology() as topology:
        yield topology


# --- one row ----------------------------------------------------------------------------
def send(client: netns.Netns, flow: Flow, count: int, timeout: float) -> netns.Results:
    """`count` new connections (or UDP exchanges, or SCTP INITs) of `flow`, one after another."""
    if flow.proto == "sctp":
        return netns.sctp_request(client, flow.dest, flow.port, count, timeout, flow.source)
    return client.request(flow.dest, flow.port, count, flow.proto, timeout, flow.source)


def smallest(miss: float, chances: list[float]) -> int:
    """The smallest n with sum(c ** n for c in chances) < miss (each chance below 1)."""
    n = 1
    while sum(c**n for c in chances) >= miss:
        n += 1
    return n


def plan_count(flow: Flow) -> tuple[int, bool]:
    """How many connections a FORWARD row needs, and whether client-IP affinity applies.

    Shares come from the IR's weights; without affinity, n makes missing any expected
    backend less likely than MISS; with it, n makes a dataplane that ignores affinity
    less likely than MISS to put every connection on one backend.
    """
    assert not isinstance(flow.expect, str)
    result = trace(program(flow.case), flow.source, flow.dest, flow.port, flow.proto)
    shares = {c.address: c.share for c in result.choices}
    if set(shares) != flow.expect:  # the tracer disagrees (test_trace says so): be fair
        shares = dict.fromkeys(flow.expect, 1 / len(flow.expect))
    sticky = result.pool is not None and result.pool.affinity_timeout is not None
    if sticky:
        return max(smallest(MISS, list(shares.values())), 10), True
    return max(smallest(MISS, [1 - s for s in shares.values()]), 10), False


@pytest.mark.parametrize(("backend", "flow"), PLAN, ids=IDS)
def test_flow_on_the_kernel(flows: Flows, backend: str, flow: Flow) -> None:
    if refused_by(backend, flow.case):
        # Nothing to load: the backend says it cannot express the case, as its golden says.
        with pytest.raises(lbc.UnsupportedError):
            lbc.compile(cluster(flow.case), backend=backend_of(backend))
        return
    flows.load(backend, flow.case)
    flows.forget_connections()
    client = flows.clients[flow.source]
    label = f"{backend} {flow.case}: {flow.source} -> {flow.dest} {flow.port}/{flow.proto}"

    if flow.expect in (REJECT, DROP, PASS):
        reject = flow.expect == REJECT
        count, timeout = (REJECT_COUNT, 1.0) if reject else (2, DROP_TIMEOUT)
        result = send(client, flow, count, timeout)
        tracked = flows.tracked(flow)
        print(f"\n  {label} x{count}: {result}; conntrack {tracked}")
        if flow.expect == PASS:
            # Only the destination itself may answer (the node's own listener), untouched.
            assert not set(result.names) & set(flows.gateways), f"a backend answered: {result}"
            if flow.dest in node_listeners():
                assert result.sources == Counter({(flow.dest, flow.source): count}), result
            else:
                assert not result.replies, result
            assert tracked, "the node never saw the packet"
            dest = ipaddress.ip_address(flow.dest)
            translated = [
                t for t in tracked if (ipaddress.ip_address(t[0]), t[1]) != (dest, flow.port)
            ]
            assert not translated, f"lbc translated a flow it must leave alone: {translated}"
            return
        assert not result.replies, f"{flow.expect} row answered: {result}"
        assert not tracked, f"{flow.expect}: the packet got through the node's filters"
        if reject:
            assert result.errors == Counter(refused=count), result
            assert result.seconds < 0.5, f"refusals must come at once: {result}"
        else:
            assert result.errors == Counter(timeout=count), result
        return

    assert not isinstance(flow.expect, str)
    count, sticky = plan_count(flow)
    # One connection first, so that a row the rules black-hole fails in seconds, not minutes.
    first = send(client, flow, 1, FORWARD_TIMEOUT)
    assert not first.errors, f"{label}: the first connection failed: {first}"
    rest = send(client, flow, count - 1, FORWARD_TIMEOUT)
    result = netns.Results(
        first.replies + rest.replies, first.errors + rest.errors, first.seconds + rest.seconds
    )
    print(f"\n  {label} x{count}: {result}")
    assert not result.errors, result
    assert sum(result.replies.values()) == count, result
    answered = set(result.names)
    if sticky:
        assert len(answered) == 1 and answered <= flow.expect, f"affinity broken: {result}"
    else:
        assert answered == flow.expect, result
    for (address, seen), n in result.sources.items():
        masqueraded = flow.masquerade or address == flow.source
        want = flows.gateways[address] if masqueraded else flow.source
        assert ipaddress.ip_address(seen) == ipaddress.ip_address(want), (
            f"{address} saw {seen} on {n} connections, expected {want}"
        )


def test_the_plan_runs_every_row_for_every_backend() -> None:
    """Each row runs once per backend, grouped by case so each case loads once."""
    assert len(PLAN) == len(BACKENDS) * len(FLOWS) == len(set(IDS))
    for backend in BACKENDS:
        order = [f.case for b, f in PLAN if b == backend]
        assert [c for i, c in enumerate(order) if i == 0 or order[i - 1] != c] == list(CASES)


def test_counts_make_a_missed_backend_unlikely() -> None:
    """Three equal backends need 37 tries: 3 * (2/3) ** 37 < 1e-6 <= 3 * (2/3) ** 36."""
    assert smallest(MISS, [2 / 3] * 3) == 37
    # Weights 1:2:3: the 1/6 backend dominates, (5/6) ** 76 < 1e-6 <= (5/6) ** 75 (+ the rest).
    assert smallest(MISS, [5 / 6, 4 / 6, 3 / 6]) == 76
