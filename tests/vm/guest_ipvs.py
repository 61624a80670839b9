"""IPVS on a real kernel: runs inside the VM that tests/vm/test_ipvs_vm.py boots.

Every golden case's operations are executed through pyroute2 in a fresh network
namespace, and the kernel must then hold exactly what the golden file says. For the
seed's `hostnames` service, a client and three serve_hostname-like backends in their
own namespaces exchange real TCP traffic through the virtual IP.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import threading
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import lbc
from lbc.apply.netns import inside
from lbc.backends.ipvs import netlink
from lbc.backends.ipvs.kernel import IpvsKernel
from lbc.backends.ipvs.ops import AddService
from lbc.backends.ipvs.text import canonical_save, sections
from lbc.ir.nodes import Proto
from tests.golden import GOLDEN

pytestmark = pytest.mark.skipif(
    not os.environ.get("LBC_VM_GUEST"),
    reason="runs inside the IPVS VM; tests/vm/test_ipvs_vm.py boots it",
)

CASES = sorted(p.parent.name for p in GOLDEN.glob("*/ipvs.txt"))


def run(*argv: str) -> str:
    """Run a command (argument list, no shell) and return its stdout."""
    done = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    if done.returncode != 0:
        raise AssertionError(f"{' '.join(argv)} exited {done.returncode}: {done.stderr}")
    return done.stdout


class Namespaces:
    """Makes uniquely named network namespaces (loopback up) and deletes them."""

    def __init__(self, scope: str) -> None:
        self.scope = scope
        self.made: list[str] = []

    def __call__(self, role: str, *commands: str) -> str:
        """A new namespace with loopback up, after `ip` `commands` ran in it."""
        name = f"lbc-vm-{self.scope}-{role}-{os.getpid()}"
        run("ip", "netns", "add", name)
        self.made.append(name)
        batch(name, "link set lo up", *commands)
        return name

    def delete(self) -> None:
        for name in reversed(self.made):
            subprocess.run(["ip", "netns", "delete", name], check=False)


@pytest.fixture
def netns() -> Iterator[Namespaces]:
    """Namespaces for one test."""
    made = Namespaces("t")
    yield made
    made.delete()


def batch(ns: str, *commands: str) -> None:
    """Run `ip` commands in namespace `ns`, all in one `ip -batch` process."""
    done = subprocess.run(
        ["ip", "-n", ns, "-batch", "-"],
        input="\n".join(commands) + "\n",
        capture_output=True,
        text=True,
        timeout=60,
    )
    if done.returncode != 0:
        raise AssertionError(f"ip -n {ns} -batch failed: {done.stderr}")


def sysctl(ns: str, key: str) -> str:
    """A sysctl of namespace `ns`, read through /proc/sys."""
    with inside(ns):
        return Path("/proc/sys", key.replace(".", "/")).read_text().strip()


def operations(case: str) -> tuple[Any, ...]:
    return tuple(lbc.compile(lbc.load(GOLDEN / case / "cluster.toml"), backend="ipvs").data)


def connect(ns: str, address: str, port: int, timeout: float = 5.0) -> str:
    """One TCP connection from namespace `ns`: the line the server sends."""
    with inside(ns):
        conn = socket.create_connection((address, port), timeout=timeout)
    with conn, conn.makefile() as reply:
        return reply.readline().strip()


def opens(ns: str, address: str, port: int, timeout: float = 5.0) -> None:
    """Open and close one TCP connection from namespace `ns`."""
    with inside(ns):
        conn = socket.create_connection((address, port), timeout=timeout)
    conn.close()


@pytest.mark.parametrize("case", CASES)
def test_the_kernel_holds_what_the_golden_file_says(case: str, netns: Namespaces) -> None:
    program = lbc.lower(lbc.load(GOLDEN / case / "cluster.toml"))
    # The node's own addresses, where its node ports are.
    node = netns(
        "node",
        "link add node0 type dummy",
        "link set node0 up",
        *(f"addr add {a}/{128 if ':' in a else 32} dev node0" for a in program.node.addresses),
    )
    artifact = lbc.compile(program, backend="ipvs")
    ops = tuple(artifact.data)
    netlink.execute(ops, netns=node)
    golden = sections((GOLDEN / case / "ipvs.txt").read_text())

    # The apply adapter reads back exactly the state the artifact means: services and
    # real servers (node ports owned through the helper table), addresses, the
    # helper table as nft lists it, and the sysctl.
    adapter = IpvsKernel(node)
    assert adapter.snapshot() == adapter.desired(artifact)

    save = run("ip", "netns", "exec", node, "ipvsadm", "-S", "-n")
    assert canonical_save(save) == golden["ipvs"]
    if case == "hostnames":
        assert save == golden["ipvs"]  # byte for byte, as ipvsadm prints it

    (link,) = json.loads(run("ip", "-j", "-d", "-n", node, "addr", "show", "dev", "lbc-ipvs0"))
    assert link["linkinfo"]["info_kind"] == "dummy"
    assert "UP" not in link["flags"]
    bound = sorted(f"{a['local']}/{a['prefixlen']}" for a in link["addr_info"])
    assert bound == sorted(golden["addresses"].splitlines())

    for line in golden["sysctl"].splitlines():
        key, value = line.split("=")
        assert sysctl(node, key) == value

    # Frontends of empty pools, from the node itself and from another host: refused,
    # or dropped (also when a load balancer's source ranges exclude the source, as
    # they do every source here). IPVS alone would refuse: a drop proves the rules.
    rules = golden["rules"]
    verdicts = {}
    for op in ops:
        if isinstance(op, AddService) and op.proto is not Proto.SCTP:
            key, sfx = f"{op.address} . {op.proto} . {op.port}", f"-v{op.family}"
            if key in _set(rules, f"no-endpoints-drop{sfx}"):
                verdicts[op] = "drop"
            elif key in _set(rules, f"no-endpoints-reject{sfx}"):
                firewalled = key in _set(rules, f"firewalled{sfx}")
                verdicts[op] = "drop" if firewalled else "reject"
    if not verdicts:
        return
    client = netns("client")
    batch(
        node,
        f"link add to-client type veth peer eth0 netns {client}",
        "addr add 172.31.255.1/30 dev to-client",
        "addr add fd00:31::1/64 dev to-client nodad",
        "link set to-client up",
    )
    batch(
        client,
        "addr add 172.31.255.2/30 dev eth0",
        "addr add fd00:31::2/64 dev eth0 nodad",
        "link set eth0 up",
        "route add default via 172.31.255.1",
        "route add default via fd00:31::1",
    )
    for op, verdict in verdicts.items():
        for ns in (node, client):
            # A drop at the node's own output fails the send at once (EPERM).
            dropped = (PermissionError, TimeoutError) if ns == node else TimeoutError
            with pytest.raises(ConnectionRefusedError if verdict == "reject" else dropped):
                probe(ns, op.proto, op.address, op.port, timeout=1)


def probe(ns: str, proto: Proto, address: str, port: int, timeout: float = 5.0) -> None:
    """A TCP connection, or a UDP datagram and its answer, from namespace `ns`."""
    if proto is Proto.TCP:
        opens(ns, address, port, timeout)
        return
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    with inside(ns):
        sock = socket.socket(family, socket.SOCK_DGRAM)
    with sock:
        sock.settimeout(timeout)
        sock.connect((address, port))
        sock.send(b"?")
        sock.recv(512)


def test_real_servers_are_masqueraded_not_direct_routed(netns: Namespaces) -> None:
    """Read back raw: pyroute2's IPVSDest.from_message() would report its default, 3."""
    from pyroute2 import IPVS

    node = netns("node")
    netlink.execute(operations("weighted"), netns=node)
    service = next(op for op in operations("weighted") if isinstance(op, AddService))
    with inside(node), IPVS() as ipvs:
        dests = ipvs.dest("dump", service=netlink.service_spec(service))
    found = sorted(
        (
            d.get_attr("IPVS_CMD_ATTR_DEST").get_attr("IPVS_DEST_ATTR_FWD_METHOD"),
            d.get_attr("IPVS_CMD_ATTR_DEST").get_attr("IPVS_DEST_ATTR_WEIGHT"),
        )
        for d in dests
    )
    assert found == [(0, 1), (0, 2), (0, 3)]


def test_set_changes_and_update_deletes(netns: Namespaces) -> None:
    """The pyroute2 trap on a real kernel: "update" removes the service; "set" edits it."""
    from pyroute2 import IPVS

    node = netns("node")
    netlink.execute(operations("hostnames"), netns=node)
    service = next(op for op in operations("hostnames") if isinstance(op, AddService))
    changed = AddService(service.proto, service.address, service.port, "sh", 30)
    with inside(node), IPVS() as ipvs:
        request = netlink.change_request(changed)
        getattr(ipvs, request.method)(request.command, **request.kwargs)
        after_set = run("ip", "netns", "exec", node, "ipvsadm", "-S", "-n")
        ipvs.service("update", service=netlink.service_spec(changed))
        after_update = run("ip", "netns", "exec", node, "ipvsadm", "-S", "-n")
    assert after_set.splitlines()[0] == "-A -t 10.0.1.175:80 -s sh -p 30"
    assert len(after_set.splitlines()) == 4
    assert after_update == ""


class HostnameServer:
    """serve_hostname: answers every TCP connection with its name and the peer's address."""

    def __init__(self, ns: str, name: str, address: str, port: int) -> None:
        self.name = name
        with inside(ns):
            self.sock = socket.create_server((address, port))
        self.thread = threading.Thread(target=self.serve, daemon=True)
        self.thread.start()

    def serve(self) -> None:
        while True:
            try:
                conn, peer = self.sock.accept()
            except OSError:
                return
            with conn:
                conn.sendall(f"{self.name} {peer[0]}\n".encode())

    def close(self) -> None:
        self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()
        self.thread.join(timeout=5)


@pytest.fixture(scope="module")
def hostnames() -> Iterator[dict[str, str]]:
    """The seed's topology: node, client and three pods; the node runs lbc's operations.

    client 192.168.49.100 --- 192.168.49.2 node 10.244.N.1 --- 10.244.N.x pod (x3)
    """
    netns = Namespaces("hostnames")
    node, client = netns("node"), netns("client")
    names: dict[str, str] = {"node": node, "client": client}
    wiring = [
        f"link add to-client type veth peer eth0 netns {client}",
        "addr add 192.168.49.2/24 dev to-client",
        "link set to-client up",
    ]
    pods = {"10.244.1.7": "1", "10.244.2.3": "2", "10.244.3.6": "3"}
    for pod, n in pods.items():
        names[pod] = netns(f"pod{n}")
        wiring += [
            f"link add to-pod{n} type veth peer eth0 netns {names[pod]}",
            f"addr add 10.244.{n}.1/24 dev to-pod{n}",
            f"link set to-pod{n} up",
        ]
    batch(node, *wiring)
    batch(
        client,
        "addr add 192.168.49.100/24 dev eth0",
        "link set eth0 up",
        "route add default via 192.168.49.2",
    )
    servers: list[HostnameServer] = []
    for pod, n in pods.items():
        batch(
            names[pod],
            f"addr add {pod}/24 dev eth0",
            "link set eth0 up",
            f"route add default via 10.244.{n}.1",
        )
        servers.append(HostnameServer(names[pod], f"hostnames-{n}", pod, 9376))
    with inside(node):
        Path("/proc/sys/net/ipv4/ip_forward").write_text("1\n")
    netlink.execute(operations("hostnames"), netns=node)
    yield names
    for server in servers:
        server.close()
    netns.delete()


def test_a_client_reaches_all_three_backends_through_the_vip(hostnames: dict[str, str]) -> None:
    replies = [connect(hostnames["client"], "10.0.1.175", 80).split() for _ in range(9)]
    # rr: each backend exactly once per round.
    assert Counter(name for name, _ in replies) == {
        "hostnames-1": 3,
        "hostnames-2": 3,
        "hostnames-3": 3,
    }
    # From outside the pod CIDR: masqueraded to the node's address towards each pod.
    assert {(name, peer) for name, peer in replies} == {
        ("hostnames-1", "10.244.1.1"),
        ("hostnames-2", "10.244.2.1"),
        ("hostnames-3", "10.244.3.1"),
    }


def test_pods_keep_their_address_and_reach_themselves(hostnames: dict[str, str]) -> None:
    pod = hostnames["10.244.1.7"]
    replies = {tuple(connect(pod, "10.0.1.175", 80).split()) for _ in range(3)}
    assert replies == {
        ("hostnames-1", "10.244.1.1"),  # hairpin: back to itself, masqueraded
        ("hostnames-2", "10.244.1.7"),  # from the pod CIDR: source kept
        ("hostnames-3", "10.244.1.7"),
    }


def test_ports_no_service_uses_are_rejected_on_the_vip(hostnames: dict[str, str]) -> None:
    # Something on the node listens on every address, so without the helper rules
    # the VIP would answer for it.
    with inside(hostnames["node"]):
        listener = socket.create_server(("0.0.0.0", 8022))
    with listener:
        opens(hostnames["client"], "192.168.49.2", 8022)
        with pytest.raises(ConnectionRefusedError):
            opens(hostnames["client"], "10.0.1.175", 8022)


def _set(rules: str, name: str) -> str:
    """The text of set `name` in an nft table."""
    start = rules.index(f"\tset {name} {{")
    return rules[start : rules.index("\n\t}", start)]
