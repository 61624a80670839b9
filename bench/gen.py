"""A synthetic, deterministic cluster.toml generator for benchmarks and scale tests.

    python bench/gen.py --services 10000 --endpoints 10 > big.toml
    python bench/gen.py --services 1000 --endpoints 5 --external --seed 7 > mixed.toml

The cluster looks like a real one: services spread over a few dozen namespaces,
one or two ports each, cluster IPs drawn at random from the service CIDR
10.96.0.0/12, endpoints in the pod CIDR 10.128.0.0/9 where every node owns a /24
and runs at most `PODS_PER_NODE` pods (so some endpoints are on the compiling
node and most are not), and a few endpoints not ready or terminating. With
`external`, one service in `EXTERNAL_EVERY` is a NodePort or a LoadBalancer.

`generate()` returns the TOML text; the same arguments always give the same bytes.
"""

from __future__ import annotations

import argparse
import ipaddress
import random
import sys
from dataclasses import dataclass

NODE = "node-0000"  # the node the cluster is compiled for
NODE_ADDRESS = "192.168.0.10"
SERVICE_CIDR = ipaddress.IPv4Network("10.96.0.0/12")
POD_CIDR = ipaddress.IPv4Network("10.128.0.0/9")
PODS_PER_NODE = 110  # kubelet's default --max-pods
EXTERNAL_EVERY = 100
NODE_PORTS = range(30000, 32768)
LB_RANGE = ipaddress.IPv4Network("198.18.0.0/15")  # ingress IPs (RFC 2544 benchmarking)
NOT_READY = 0.02  # share of endpoints that are not ready
TERMINATING = 0.01  # share that are terminating (and still serving)

NAMESPACES = (
    "default", "kube-system", "monitoring", "logging", "ingress", "cert-manager",
    "payments", "checkout", "cart", "catalog", "search", "accounts", "auth",
    "orders", "shipping", "inventory", "notifications", "analytics", "ml", "data",
    "platform", "billing", "support", "media", "recommendations", "reviews",
    "frontend", "backend", "staging", "qa",
)  # fmt: skip
WORDS = (
    "api", "web", "auth", "cart", "search", "db", "cache", "queue", "worker",
    "gateway", "proxy", "metrics", "events", "users", "profile", "images",
    "index", "feed", "mail", "sms", "ledger", "rates", "quotes", "session",
    "config", "store", "stream", "report", "audit", "tokens",
)  # fmt: skip
# (name, protocol, port, target port); a second port is drawn from the ones after the first.
PORTS = (
    ("http", "TCP", 80, 8080),
    ("https", "TCP", 443, 8443),
    ("grpc", "TCP", 9090, 9090),
    ("metrics", "TCP", 9100, 9100),
    ("redis", "TCP", 6379, 6379),
    ("dns", "UDP", 53, 5353),
    ("postgres", "TCP", 5432, 5432),
)


@dataclass(frozen=True)
class Counts:
    """What `generate` produced: services, service ports, endpoints, external services."""

    services: int
    ports: int
    endpoints: int
    external: int


def generate(
    services: int, endpoints: int, seed: int = 0, external: bool = False
) -> tuple[str, Counts]:
    """cluster.toml text with `services` services of `endpoints` endpoints each."""
    if services < 0 or endpoints < 0:
        raise ValueError("services and endpoints must not be negative")
    if services > SERVICE_CIDR.num_addresses - 2:
        raise ValueError(f"at most {SERVICE_CIDR.num_addresses - 2} services fit {SERVICE_CIDR}")
    if external and (services // EXTERNAL_EVERY + 1) * 2 > len(NODE_PORTS):
        raise ValueError(f"too many external services for the {len(NODE_PORTS)} node ports")
    rng = random.Random(seed)
    pods = _Pods(rng, services * endpoints)
    service_base = int(SERVICE_CIDR.network_address)
    cluster_ips = rng.sample(range(1, SERVICE_CIDR.num_addresses - 1), services)
    node_ports = iter(NODE_PORTS)
    lb_hosts = iter(LB_RANGE.hosts())
    out = [
        f"# {services} synthetic services x {endpoints} endpoints (bench/gen.py, seed {seed})",
        "[node]",
        f'name = "{NODE}"',
        f'addresses = ["{NODE_ADDRESS}"]',
        f'pod_cidrs = ["{POD_CIDR}"]',
    ]
    n_ports = n_external = 0
    for i in range(services):
        kind = "ClusterIP"
        if external and i % EXTERNAL_EVERY == EXTERNAL_EVERY // 2:
            kind = "LoadBalancer" if (i // EXTERNAL_EVERY) % 2 else "NodePort"
            n_external += 1
        first = rng.randrange(len(PORTS))
        chosen = [PORTS[first]]
        if rng.random() < 0.3 and first + 1 < len(PORTS):
            chosen.append(PORTS[rng.randrange(first + 1, len(PORTS))])
        n_ports += len(chosen)
        ports = []
        for name, proto, port, target in chosen:
            extra = ""
            if kind != "ClusterIP":
                extra = f", node_port = {next(node_ports)}"
            ports.append(
                f'{{ name = "{name}", protocol = "{proto}", port = {port}, '
                f"target_port = {target}{extra} }}"
            )
        out += [
            "",
            "[[services]]",
            f'namespace = "{NAMESPACES[rng.randrange(len(NAMESPACES))]}"',
            f'name = "{WORDS[rng.randrange(len(WORDS))]}-{WORDS[rng.randrange(len(WORDS))]}'
            f'-{i:05d}"',
        ]
        if kind != "ClusterIP":
            out.append(f'type = "{kind}"')
        out.append(f'cluster_ips = ["{ipaddress.IPv4Address(service_base + cluster_ips[i])}"]')
        if kind == "LoadBalancer":
            out.append(f'load_balancer_ips = ["{next(lb_hosts)}"]')
        out.append(f"ports = [{', '.join(ports)}]")
        if endpoints:
            out.append("endpoints = [")
            for _ in range(endpoints):
                ip, node = pods.next()
                state = ""
                draw = rng.random()
                if draw < TERMINATING:
                    state = ", ready = false, serving = true, terminating = true"
                elif draw < TERMINATING + NOT_READY:
                    state = ", ready = false"
                out.append(f'  {{ ip = "{ip}", node = "{node}"{state} }},')
            out.append("]")
    counts = Counts(services, n_ports, services * endpoints, n_external)
    return "\n".join(out) + "\n", counts


class _Pods:
    """Pod addresses: each node owns a /24 of the pod CIDR and fills it in order."""

    def __init__(self, rng: random.Random, total: int) -> None:
        self.rng = rng
        self.nodes = max(3, -(-total // (PODS_PER_NODE * 3 // 4)))  # ~75% full on average
        if self.nodes > POD_CIDR.num_addresses // 256:
            raise ValueError(f"{total} endpoints do not fit the pod CIDR {POD_CIDR}")
        self.used = [0] * self.nodes
        self.base = int(POD_CIDR.network_address)

    def next(self) -> tuple[ipaddress.IPv4Address, str]:
        while True:
            node = self.rng.randrange(self.nodes)
            if self.used[node] < PODS_PER_NODE:
                break
        self.used[node] += 1
        # .0 is the network, .1 the node's bridge: pods start at .2
        ip = ipaddress.IPv4Address(self.base + node * 256 + 1 + self.used[node])
        return ip, f"node-{node:04d}"


def main(argv: list[str] | None = None) -> None:
    """Write a synthetic cluster.toml to standard output."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--services", type=int, default=1000, help="number of services")
    parser.add_argument("--endpoints", type=int, default=10, help="endpoints per service")
    parser.add_argument("--seed", type=int, default=0, help="random seed (same seed, same file)")
    parser.add_argument(
        "--external",
        action="store_true",
        help=f"make one service in {EXTERNAL_EVERY} a NodePort or LoadBalancer",
    )
    args = parser.parse_args(argv)
    text, counts = generate(args.services, args.endpoints, seed=args.seed, external=args.external)
    sys.stdout.write(text)
    print(
        f"{counts.services} services, {counts.ports} ports, {counts.endpoints} endpoints, "
        f"{counts.external} external",
        file=sys.stderr,
    )


if __name__ == "__main__":
    main()
