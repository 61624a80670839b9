"""The packet-flow matrix: lbc's Service semantics as a table over the golden cases.

Each row is a new connection: which golden case, from which source, to which
destination; what must happen (the backends it may reach, or REJECT, DROP, PASS for
"not lbc's business") and whether the backend sees the node's address (masquerade).
The same rows run through the IR tracer and, where a kernel is available, through
each backend's real dataplane.
"""

from __future__ import annotations

from dataclasses import dataclass

# Sources, as the kernel tests' topology also places them.
EXTERNAL = "203.0.113.5"  # a client outside the node, inside the LB source range
OUTSIDER = "198.18.0.5"  # a client outside the node and outside the LB source range
POD = "10.244.9.9"  # a pod on this node
NODE = "192.168.49.2"  # the node itself
LOOPBACK = "127.0.0.1"  # the node itself, on its loopback address
NODE_LB = "198.51.100.12"  # the node itself, on a load-balancer address it holds (MetalLB)
EXTERNAL6 = "2001:db8::5"
POD6 = "fd00:244::9:9"

REJECT, DROP, PASS = "REJECT", "DROP", "PASS"


@dataclass(frozen=True)
class Flow:
    """One row: a new connection and what must happen to it."""

    name: str
    case: str
    source: str
    dest: str
    port: int
    expect: frozenset[str] | str
    masquerade: bool | None = None  # for FORWARD rows; hairpin choices always masquerade
    proto: str = "tcp"


def to(*addresses: str) -> frozenset[str]:
    """The backend addresses a forwarded connection may reach."""
    return frozenset(addresses)


HOSTNAMES = to("10.244.1.7", "10.244.2.3", "10.244.3.6")
TWO = to("10.244.1.7", "10.244.2.3")

FLOWS: tuple[Flow, ...] = (
    Flow(
        "cluster IP from outside is masqueraded",
        "hostnames",
        EXTERNAL,
        "10.0.1.175",
        80,
        HOSTNAMES,
        True,
    ),
    Flow(
        "cluster IP from a pod keeps its source",
        "hostnames",
        POD,
        "10.0.1.175",
        80,
        HOSTNAMES,
        False,
    ),
    Flow(
        "cluster IP from the node is masqueraded",
        "hostnames",
        NODE,
        "10.0.1.175",
        80,
        HOSTNAMES,
        True,
    ),
    Flow(
        "hairpin: a backend reaching its own service",
        "hostnames",
        "10.244.1.7",
        "10.0.1.175",
        80,
        HOSTNAMES,
        False,
    ),
    Flow(
        "a cluster IP port no service uses is refused", "hostnames", POD, "10.0.1.175", 81, REJECT
    ),
    Flow("an address no service has is not lbc's", "hostnames", POD, "10.0.1.199", 80, PASS),
    Flow(
        "UDP to a TCP-only service is refused",
        "hostnames",
        POD,
        "10.0.1.175",
        80,
        REJECT,
        proto="udp",
    ),
    Flow(
        "weighted endpoints all take traffic", "weighted", POD, "10.0.1.176", 80, HOSTNAMES, False
    ),
    Flow(
        "no endpoints: pod gets connection refused", "no-endpoints", POD, "10.0.1.177", 80, REJECT
    ),
    Flow(
        "no endpoints: outside client gets refused",
        "no-endpoints",
        EXTERNAL,
        "10.0.1.177",
        80,
        REJECT,
    ),
    Flow(
        "IPv6 cluster IP from outside",
        "ipv6",
        EXTERNAL6,
        "fd00:10::1:175",
        80,
        to("fd00:244::1:7", "fd00:244::2:3"),
        True,
    ),
    Flow(
        "IPv6 cluster IP from a pod",
        "ipv6",
        POD6,
        "fd00:10::1:175",
        80,
        to("fd00:244::1:7", "fd00:244::2:3"),
        False,
    ),
    Flow(
        "dual-stack: IPv4 reaches IPv4 endpoints",
        "dual-stack",
        POD,
        "10.0.1.178",
        80,
        to("10.244.1.7"),
        False,
    ),
    Flow(
        "dual-stack: IPv6 reaches IPv6 endpoints",
        "dual-stack",
        POD6,
        "fd00:10::1:178",
        80,
        to("fd00:244::1:7"),
        False,
    ),
    Flow(
        "hairpin: the only backend of an IPv4 pool reaching its service",
        "dual-stack",
        "10.244.1.7",
        "10.0.1.178",
        80,
        to("10.244.1.7"),
        False,
    ),
    Flow(
        "hairpin: the only backend of an IPv6 pool reaching its service",
        "dual-stack",
        "fd00:244::1:7",
        "fd00:10::1:178",
        80,
        to("fd00:244::1:7"),
        False,
    ),
    Flow("session affinity service forwards", "affinity", POD, "10.0.1.179", 80, TWO, False),
    Flow("node port from outside is masqueraded", "node-port", EXTERNAL, NODE, 30080, TWO, True),
    Flow("node port from a pod is masqueraded", "node-port", POD, NODE, 30080, TWO, True),
    Flow(
        "NodePort service's cluster IP from outside",
        "node-port",
        EXTERNAL,
        "10.0.1.180",
        80,
        TWO,
        True,
    ),
    Flow("an unused node port is not lbc's", "node-port", EXTERNAL, NODE, 30081, PASS),
    Flow(
        "localhost node port from the node itself",
        "localhost-node-port",
        LOOPBACK,
        LOOPBACK,
        30090,
        TWO,
        True,
    ),
    Flow(
        "a localhost node port service on the node address",
        "localhost-node-port",
        EXTERNAL,
        NODE,
        30090,
        TWO,
        True,
    ),
    Flow(
        "LB IP from inside the source range",
        "load-balancer",
        EXTERNAL,
        "198.51.100.10",
        443,
        TWO,
        True,
    ),
    Flow(
        "LB IP from outside the source range is dropped",
        "load-balancer",
        OUTSIDER,
        "198.51.100.10",
        443,
        DROP,
    ),
    Flow(
        "LB IP from a pod outside the range is dropped",
        "load-balancer",
        POD,
        "198.51.100.10",
        443,
        DROP,
    ),
    Flow(
        "source ranges do not filter the node port",
        "load-balancer",
        OUTSIDER,
        NODE,
        30443,
        TWO,
        True,
    ),
    Flow(
        "LB IP from the node, whose address is in the source range",
        "load-balancer-from-node",
        NODE,
        NODE_LB,
        443,
        TWO,
        True,
    ),
    Flow(
        "LB IP from the LB address the node holds: allowed as the range holds the node",
        "load-balancer-from-node",
        NODE_LB,
        NODE_LB,
        443,
        TWO,
        True,
    ),
    Flow(
        "LB IP from outside a range that holds the node is dropped",
        "load-balancer-from-node",
        EXTERNAL,
        NODE_LB,
        443,
        DROP,
    ),
    Flow(
        "zone hints keep cluster traffic in the node's zone",
        "topology-hints",
        POD,
        "10.0.1.189",
        80,
        to("10.244.1.7"),
        False,
    ),
    Flow(
        "an endpoint without hints turns the others' hints off",
        "topology-hints",
        POD,
        "10.0.1.190",
        80,
        TWO,
        False,
    ),
    Flow(
        "node hints keep cluster traffic on the node",
        "topology-hints",
        EXTERNAL,
        "10.0.1.191",
        80,
        to("10.244.2.3"),
        True,
    ),
    Flow("LB service's cluster IP from a pod", "load-balancer", POD, "10.0.1.181", 443, TWO, False),
    Flow(
        "empty LB service refuses sources in its range",
        "load-balancer-empty",
        EXTERNAL,
        "198.51.100.11",
        443,
        REJECT,
    ),
    Flow(
        "empty LB service drops sources outside its range",
        "load-balancer-empty",
        OUTSIDER,
        "198.51.100.11",
        443,
        DROP,
    ),
    Flow(
        "empty LB service's node port refuses", "load-balancer-empty", OUTSIDER, NODE, 30444, REJECT
    ),
    Flow(
        "ETP Local: node port from outside stays local, unmasqueraded",
        "external-traffic-local",
        EXTERNAL,
        NODE,
        30082,
        to("10.244.1.7"),
        False,
    ),
    Flow(
        "ETP Local: external IP from outside stays local",
        "external-traffic-local",
        EXTERNAL,
        "198.51.100.20",
        80,
        to("10.244.1.7"),
        False,
    ),
    Flow(
        "ETP Local: pods reach every endpoint via the external IP",
        "external-traffic-local",
        POD,
        "198.51.100.20",
        80,
        TWO,
        False,
    ),
    Flow(
        "ETP Local: the node reaches every endpoint, masqueraded",
        "external-traffic-local",
        NODE,
        "198.51.100.20",
        80,
        TWO,
        True,
    ),
    Flow(
        "ETP Local: pods reach every endpoint via the node port",
        "external-traffic-local",
        POD,
        NODE,
        30082,
        TWO,
        False,
    ),
    Flow(
        "ETP Local does not restrict the cluster IP",
        "external-traffic-local",
        EXTERNAL,
        "10.0.1.182",
        80,
        TWO,
        True,
    ),
    Flow(
        "ITP Local without local endpoints drops",
        "internal-traffic-local",
        POD,
        "10.0.1.183",
        53,
        DROP,
        proto="udp",
    ),
    Flow(
        "ITP Local picks the local endpoint",
        "internal-traffic-local",
        POD,
        "10.0.1.184",
        53,
        to("10.244.1.8"),
        False,
        proto="udp",
    ),
    Flow(
        "ITP Local from outside still local only",
        "internal-traffic-local",
        EXTERNAL,
        "10.0.1.184",
        53,
        to("10.244.1.8"),
        True,
        proto="udp",
    ),
    Flow(
        "ITP Local service has no TCP port 53: refused",
        "internal-traffic-local",
        POD,
        "10.0.1.184",
        53,
        REJECT,
    ),
    Flow(
        "only serving terminating endpoints take traffic",
        "terminating",
        POD,
        "10.0.1.185",
        80,
        to("10.244.1.7"),
        False,
    ),
    Flow(
        "masquerade_all masquerades pods too",
        "masquerade-all",
        POD,
        "10.0.1.186",
        80,
        to("10.244.1.7"),
        True,
    ),
    Flow("TCP port of a multi-protocol service", "udp-sctp", POD, "10.0.1.187", 53, TWO, False),
    Flow(
        "UDP port of a multi-protocol service",
        "udp-sctp",
        POD,
        "10.0.1.187",
        53,
        TWO,
        False,
        proto="udp",
    ),
    Flow(
        "SCTP port of a multi-protocol service",
        "udp-sctp",
        POD,
        "10.0.1.187",
        2905,
        TWO,
        False,
        proto="sctp",
    ),
    Flow(
        "SCTP on a port only TCP and UDP use: refused",
        "udp-sctp",
        POD,
        "10.0.1.187",
        53,
        REJECT,
        proto="sctp",
    ),
    Flow(
        "the last of many services",
        "many-services",
        POD,
        "10.0.2.24",
        80,
        to("10.244.1.33", "10.244.2.33", "10.244.3.33", "10.244.4.33"),
        False,
    ),
    Flow(
        "the first of many services",
        "many-services",
        EXTERNAL,
        "10.0.2.1",
        80,
        to("10.244.1.10"),
        True,
    ),
    Flow("round-robin service forwards", "scheduler-rr", POD, "10.0.1.188", 80, TWO, False),
)
