"""Connect latency of new TCP connections through lbc's dataplanes, as services grow.

    sudo python bench/dataplane.py                          # N = 100, 10000, 30000
    sudo python bench/dataplane.py --sizes 100 10000 --rounds 50 --repeat 5
    sudo python bench/dataplane.py --client outside --json dataplane.json

For every N, `bench/gen.py` makes N services (one endpoint each, seed 0) and lbc
compiles them. Every (variant, N) gets its own three network namespaces, client --
node -- backend, joined by veth, with the variant's rules loaded in the node:

- `none`: no rules at all; the client connects to the backend's own address,
  routed through the node (the floor);
- `conntrack`: no NAT, only connection tracking (one `ct state new` rule in the
  node's forward hook): the floor of every NAT variant, since each new
  connection costs a conntrack entry;
- `iptables-linear`: lbc's iptables rules rendered without the dispatch tree
  (`render_family(..., split_above=None)`), i.e. kube-proxy's layout: one rule per
  service in LBC-SERVICES, walked in order by the first packet of a connection;
- `iptables`: lbc's iptables rules (the dispatch tree of `LBC-DSP-` chains);
- `nftables`: lbc's nftables ruleset (one verdict-map lookup per packet).

The client aims at the service whose rule comes last in the linear LBC-SERVICES
chain (the highest cluster IP: the worst case of the linear walk; in the tree, the
last branch at every level). Every connect is a new connection, so its SYN walks
the nat rules and the filter table's NEW-connection rules. One Python process does
all the connects: it enters each client namespace in turn (`setns`), makes
`--batch` connects there and moves on, for `--rounds` rounds in a rotating order,
so that whatever the shared host does meanwhile falls on every (variant, N) alike.
A connect is: a socket with SO_LINGER 0 (close sends a RST: no TIME_WAIT, ports are
not exhausted), a blocking `connect()` timed with `perf_counter_ns` (SYN out,
DNAT, SYN-ACK back), close. A backend process accepts and closes. Before timing,
one connect per path reads the backend's greeting, proving that the path works;
the first round is a warm-up and is not counted.

Percentiles are over all of a process's samples of a (variant, N); `--repeat` runs
that many processes and the report gives the median of their percentiles, then
ratios: a variant's p50 against its own p50 at the smallest N, and against `none`
at the same N. Namespaces are named `lbc-bench-<role>-<pid>-<random>` and deleted by
name (processes killed by pid) whatever happens.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from typing import Any

from gen import generate

import lbc
from lbc.backends.iptables.dispatch import SPLIT_ABOVE
from lbc.backends.iptables.render import render_family
from lbc.compiler.lower import lower
from lbc.ir.nodes import Frontend, Kind, Program, Proto

VARIANTS = ("none", "conntrack", "iptables-linear", "iptables", "nftables")
# The client's address and the node's on its link: a pod (10.255.255.0/24 is in gen.py's
# pod CIDR 10.128.0.0/9 and no generated node's range) or a host outside the cluster,
# whose connections lbc also masquerades.
CLIENTS = {"pod": ("10.255.255.10", "10.255.255.1"), "outside": ("192.168.49.10", "192.168.49.2")}
CONNTRACK_ONLY = (
    "table inet lbc-bench {\n\tchain forward {\n"
    "\t\ttype filter hook forward priority filter; policy accept;\n"
    "\t\tct state new counter\n\t}\n}\n"
)
LOAD_TIMEOUT = 900.0  # seconds a restore of 30,000 services may take on a busy host
COMMAND_TIMEOUT = 60.0

SERVER = r"""
import socket, sys
server = socket.socket()
server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
server.bind((sys.argv[1], int(sys.argv[2])))
server.listen(4096)
print("ready", flush=True)
while True:
    conn, _ = server.accept()
    try:
        conn.send(b"backend\n")
    except OSError:
        pass  # the client has reset it already
    conn.close()
"""

CONNECTS = r"""
import ctypes, json, os, socket, struct, sys, time

CLONE_NEWNET = 0x40000000
paths = json.loads(sys.argv[1])  # [[client namespace, host, port], ...]
rounds, batch = int(sys.argv[2]), int(sys.argv[3])
libc = ctypes.CDLL(None, use_errno=True)
handles = [os.open(f"/run/netns/{name}", os.O_RDONLY) for name, _, _ in paths]


def enter(i):
    # Equivalent to `ip netns exec`: sockets made from now on live in that namespace.
    if libc.setns(handles[i], CLONE_NEWNET) != 0:
        raise OSError(ctypes.get_errno(), f"setns {paths[i][0]}")


greetings = []
for i, (_, host, port) in enumerate(paths):
    enter(i)
    with socket.create_connection((host, port), timeout=3) as probe:
        probe.settimeout(3)
        greetings.append(probe.recv(64).decode().strip())
linger = struct.pack("ii", 1, 0)
clock = time.perf_counter_ns
samples = [[] for _ in paths]
errors = [{} for _ in paths]
for r in range(rounds + 1):  # round 0 warms up
    for k in range(len(paths)):
        i = (k + r) % len(paths)
        enter(i)
        host, port = paths[i][1], paths[i][2]
        took, failed = samples[i], errors[i]
        for _ in range(batch):
            sock = socket.socket()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, linger)
            try:
                start = clock()
                sock.connect((host, port))  # blocking; tcp_syn_retries bounds it
                end = clock()
                if r:
                    took.append(end - start)
            except OSError as exc:
                failed[type(exc).__name__] = failed.get(type(exc).__name__, 0) + 1
            finally:
                sock.close()
print(json.dumps({"greetings": greetings, "ns": samples, "errors": errors}))
"""


def run(args: Sequence[str], stdin: str | None = None, timeout: float = COMMAND_TIMEOUT) -> str:
    """Run a command (no shell) with a time limit; raise with its stderr if it fails."""
    done = subprocess.run(list(args), input=stdin, capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(args[:6])} exited {done.returncode}: {done.stderr[:2000]}")
    return done.stdout


@dataclass
class Lab:
    """Namespaces and processes of the benchmark; `close` removes them by name and pid."""

    namespaces: list[str] = field(default_factory=list)
    processes: list[subprocess.Popen[str]] = field(default_factory=list)

    def namespace(self, role: str) -> str:
        """Equivalent to `ip netns add lbc-bench-ROLE-PID-RAND` and `ip link set lo up`."""
        name = f"lbc-bench-{role}-{os.getpid()}-{secrets.token_hex(3)}"
        self.namespaces.append(name)  # recorded first: a failure half way is cleaned up
        run(["ip", "netns", "add", name])
        run(["ip", "-n", name, "link", "set", "lo", "up"])
        return name

    def start(self, ns: str, script: str, *args: str) -> None:
        """A Python process in `ns` that prints `ready` once it serves."""
        proc = subprocess.Popen(
            ["ip", "netns", "exec", ns, sys.executable, "-c", script, *args],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.processes.append(proc)
        assert proc.stdout is not None
        if proc.stdout.readline().strip() != "ready":
            raise RuntimeError(f"the server in {ns} did not start")

    def close(self) -> None:
        """Kill the processes (by pid), then delete the namespaces (by name), come what may."""
        try:
            for proc in self.processes:
                if proc.poll() is None:
                    proc.kill()
                with suppress(subprocess.TimeoutExpired):
                    proc.communicate(timeout=COMMAND_TIMEOUT)
        finally:
            self.processes.clear()
            for name in reversed(self.namespaces):
                subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=120)
            self.namespaces.clear()


@contextmanager
def lab() -> Iterator[Lab]:
    made = Lab()
    try:
        yield made
    finally:
        made.close()


@dataclass(frozen=True)
class Path:
    """One (variant, N): the client namespace and where it connects."""

    variant: str
    services: int
    client: str
    host: str
    port: int
    load_s: float


def topology(made: Lab, endpoint: str, port: int, kind: str) -> tuple[str, str]:
    """client -- node -- backend, the backend serving endpoint:port; (client, node).

    Equivalent to `ip link add ... type veth peer ... netns ...`, addresses and routes.
    The backend is a pod on the node's /24 of the pod CIDR (gen.py gives .1 to the node).
    """
    client_address, client_gateway = CLIENTS[kind]
    pod_gateway = endpoint.rsplit(".", 1)[0] + ".1"
    client, node, backend = (made.namespace(role) for role in ("client", "node", "backend"))
    run(["ip", "netns", "exec", node, "sysctl", "-qw", "net.ipv4.ip_forward=1"])
    # A lost SYN is retried once (after 1 s), not six times: a broken path fails fast.
    run(["ip", "netns", "exec", client, "sysctl", "-qw", "net.ipv4.tcp_syn_retries=1"])
    for peer, here, address in (
        (client, "to-client", client_gateway),
        (backend, "to-pod", pod_gateway),
    ):
        run(
            [
                "ip",
                "-n",
                node,
                "link",
                "add",
                here,
                "type",
                "veth",
                "peer",
                "name",
                "eth0",
                "netns",
                peer,
            ]
        )
        run(["ip", "-n", node, "addr", "add", f"{address}/24", "dev", here])
        run(["ip", "-n", node, "link", "set", here, "up"])
        run(["ip", "-n", peer, "link", "set", "eth0", "up"])
    run(["ip", "-n", client, "addr", "add", f"{client_address}/24", "dev", "eth0"])
    run(["ip", "-n", client, "route", "add", "default", "via", client_gateway])
    run(["ip", "-n", backend, "addr", "add", f"{endpoint}/24", "dev", "eth0"])
    run(["ip", "-n", backend, "route", "add", "default", "via", pod_gateway])
    made.start(backend, SERVER, endpoint, str(port))
    return client, node


def target(program: Program) -> tuple[Frontend, str, int, int]:
    """The TCP cluster IP last in the linear chain, its endpoint, and its place there."""
    pools = program.pool_index()
    rules = [
        f
        for f in program.frontends
        if f.family == 4 and f.kind is not Kind.NODE_PORT and pools[f.pool].active
    ]
    place = max(
        i for i, f in enumerate(rules) if f.kind is Kind.CLUSTER_IP and f.proto is Proto.TCP
    )
    chosen = rules[place]
    backend = pools[chosen.pool].active[0]
    return chosen, backend.address, backend.port, place + 1


def load(variant: str, node: str, program: Program) -> float:
    """Load a variant's rules in `node` (`iptables-restore` or `nft -f -`); wall seconds."""
    if variant == "none":
        return 0.0
    if variant == "conntrack":
        argv, doc = ["nft", "-f", "-"], CONNTRACK_ONLY
    elif variant == "nftables":
        argv, doc = ["nft", "-f", "-"], lbc.compile(program, backend="nftables").text()
    else:
        split = None if variant == "iptables-linear" else SPLIT_ABOVE
        argv, doc = ["iptables-restore"], render_family(program, 4, split_above=split)
    start = time.perf_counter()
    run(["ip", "netns", "exec", node, *argv], stdin=doc, timeout=LOAD_TIMEOUT)
    return time.perf_counter() - start


def percentiles(samples: Sequence[int]) -> dict[str, float]:
    """p10, p50, p90 and p99 in microseconds (nearest rank)."""
    ordered = sorted(samples)
    pick = {"p10": 0.10, "p50": 0.50, "p90": 0.90, "p99": 0.99}
    return {
        k: ordered[min(len(ordered) - 1, int(q * len(ordered)))] / 1000 for k, q in pick.items()
    }


def setup(made: Lab, size: int, args: argparse.Namespace) -> list[Path]:
    """Every variant of `size` services, loaded, each behind its own client namespace."""
    text, counts = generate(size, 1, seed=args.seed)
    program = lower(lbc.loads(text))
    chosen, endpoint, port, place = target(program)
    print(
        f"{size} services ({counts.ports} ports): target {chosen.service} at "
        f"{chosen.address}:{chosen.port} -> {endpoint}:{port}, rule {place} of the linear chain",
        flush=True,
    )
    paths = []
    for variant in args.variants:
        client, node = topology(made, endpoint, port, args.client)
        seconds = load(variant, node, program)
        direct = variant in ("none", "conntrack")
        host, to = (endpoint, port) if direct else (chosen.address, chosen.port)
        paths.append(Path(variant, size, client, host, to, seconds))
        print(f"  {variant}: loaded in {seconds:.1f} s", flush=True)
    return paths


def measure(paths: Sequence[Path], args: argparse.Namespace) -> list[dict[str, Any]]:
    """`--repeat` client processes; per path, the median of their percentiles."""
    spec = json.dumps([[p.client, p.host, p.port] for p in paths])
    per_run: list[list[dict[str, float]]] = [[] for _ in paths]
    errors = [0] * len(paths)
    for repeat in range(args.repeat):
        out = run(
            [sys.executable, "-c", CONNECTS, spec, str(args.rounds), str(args.batch)],
            timeout=COMMAND_TIMEOUT + len(paths) * args.rounds * args.batch * 0.01,
        )
        data = json.loads(out)
        for i, path in enumerate(paths):
            if data["greetings"][i] != "backend":
                raise RuntimeError(f"{path.variant} at {path.services}: no answer from the backend")
            if len(data["ns"][i]) < args.rounds * args.batch // 2:
                raise RuntimeError(f"{path.variant} at {path.services}: {data['errors'][i]}")
            per_run[i].append(percentiles(data["ns"][i]))
            errors[i] += sum(data["errors"][i].values())
        print(f"  run {repeat + 1} of {args.repeat} done", flush=True)
    results = []
    for i, path in enumerate(paths):
        row: dict[str, Any] = {"variant": path.variant, "services": path.services}
        for k in ("p10", "p50", "p90", "p99"):
            row[k] = round(statistics.median(r[k] for r in per_run[i]), 1)
        row["p50_runs"] = [r["p50"] for r in per_run[i]]
        row.update(errors=errors[i], load_s=round(path.load_s, 1))
        results.append(row)
    return results


def report(rows: list[dict[str, Any]]) -> str:
    """A markdown table: medians over runs, and p10 and p50 ratios."""
    lines = [
        "| variant | services | p10 µs | p50 µs | p90 µs | p99 µs | p10 / own smallest N "
        "| p50 / own smallest N | p50 / none | load s |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    smallest = min(r["services"] for r in rows)
    first = {r["variant"]: r for r in rows if r["services"] == smallest}
    none = {r["services"]: r for r in rows if r["variant"] == "none"}
    for row in sorted(rows, key=lambda r: (VARIANTS.index(r["variant"]), r["services"])):
        floor = none.get(row["services"])
        vs_none = f"{row['p50'] / floor['p50']:.2f}" if floor else "-"
        own = first[row["variant"]]
        lines.append(
            f"| {row['variant']} | {row['services']:,} | {row['p10']:.1f} | {row['p50']:.1f} "
            f"| {row['p90']:.1f} | {row['p99']:.1f} | {row['p10'] / own['p10']:.2f} "
            f"| {row['p50'] / own['p50']:.2f} | {vs_none} | {row['load_s']:.1f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[100, 10_000, 30_000])
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    parser.add_argument("--rounds", type=int, default=40, help="rounds over every path")
    parser.add_argument("--batch", type=int, default=100, help="connects per path and round")
    parser.add_argument("--repeat", type=int, default=3, help="client processes, one after another")
    parser.add_argument("--seed", type=int, default=0, help="bench/gen.py seed")
    parser.add_argument(
        "--client",
        choices=sorted(CLIENTS),
        default="pod",
        help="connect from a pod (no masquerade) or from outside the cluster (masqueraded)",
    )
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args(argv)
    needed = ("ip", "iptables-restore", "nft")
    if os.geteuid() != 0 or any(shutil.which(t) is None for t in needed):
        sys.exit(f"needs root and {', '.join(needed)}")
    if not 0 < args.rounds <= 1000 or not 0 < args.batch <= 10_000 or not 0 < args.repeat <= 50:
        sys.exit("--rounds must be 1..1000, --batch 1..10000, --repeat 1..50")
    who = "a pod" if args.client == "pod" else "outside the cluster"
    print(
        f"connect latency from {who}: {args.rounds} rounds x {args.batch} connects per path "
        f"(+1 warm-up round), {args.repeat} runs; load average {os.getloadavg()[0]:.1f}",
        flush=True,
    )
    with lab() as made:
        paths = [p for size in args.sizes for p in setup(made, size, args)]
        rows = measure(paths, args)
    print()
    print(report(rows))
    print(f"\nload average at the end {os.getloadavg()[0]:.1f}")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
