"""`lbc apply --backend ipvs` on a real kernel: runs inside the VM tests/vm/test_ipvs_vm.py boots.

The seed demo through `lbc.apply`; re-apply writes nothing; a step failing anywhere
leaves the namespace as it was; another tool's IPVS services survive apply, re-apply
and delete; drift is shown and repaired; an apply killed half way is converged by the
next; a removed real server with an open connection drains at weight 0 until
the connection closes (or its drain timeout passes), then goes; and a UDP client that
keeps its source port moves on from a removed real server.
"""

from __future__ import annotations

import ctypes
import os
import signal
import socket
import struct
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from click.testing import CliRunner

import lbc
from lbc.apply.netns import inside
from lbc.backends.ipvs.kernel import (
    DRAIN_TIMEOUT,
    DRAIN_UPPER,
    Dataplane,
    IpvsKernel,
    boottime,
)
from lbc.backends.ipvs.netlink import Dest, Live, Pyroute2Dataplane, Step
from lbc.cli import main
from tests.golden import ROOT
from tests.vm.guest_ipvs import Namespaces, batch, run

pytestmark = pytest.mark.skipif(
    not os.environ.get("LBC_VM_GUEST"),
    reason="runs inside the IPVS VM; tests/vm/test_ipvs_vm.py boots it",
)

VIP = "10.0.1.175"
NODE = "192.168.49.2"
PODS = {"10.244.1.7": "hostnames-1", "10.244.2.3": "hostnames-2", "10.244.3.6": "hostnames-3"}
SEED = ROOT / "examples" / "hostnames.toml"


def config(*pods: str, vip: str = VIP, node_port: bool = False) -> lbc.Cluster:
    """hostnames on `vip` with these pods, and optionally a NodePort service `web`."""
    return lbc.loads(config_text(*pods, vip=vip, node_port=node_port))


def config_text(*pods: str, vip: str = VIP, node_port: bool = False) -> str:
    """The cluster.toml of `config`."""
    endpoints = ", ".join(f'{{ ip = "{p}" }}' for p in pods)
    text = (
        '[node]\nname = "node-1"\naddresses = ["192.168.49.2"]\npod_cidrs = ["10.244.0.0/16"]\n'
        f'[[services]]\nname = "hostnames"\ncluster_ips = ["{vip}"]\n'
        'ports = [{ name = "default", port = 80, target_port = 9376 }]\n'
        f"endpoints = [{endpoints}]\n"
    )
    if node_port:
        text += (
            '[[services]]\nname = "web"\ntype = "NodePort"\ncluster_ips = ["10.0.1.180"]\n'
            'ports = [{ name = "http", port = 80, target_port = 9376, node_port = 30080 }]\n'
            f"endpoints = [{endpoints}]\n"
        )
    return text


class HoldingServer:
    """serve_hostname that keeps each connection open: its name and the peer's address,
    then an echo of every line until the client closes."""

    def __init__(self, ns: str, name: str, address: str, port: int) -> None:
        self.name = name
        with inside(ns):
            self.sock = socket.create_server((address, port))
            self.udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            self.udp.bind((address, port))
        threading.Thread(target=self.serve, daemon=True).start()
        threading.Thread(target=self.answer, daemon=True).start()

    def answer(self) -> None:
        """UDP: each datagram gets `<name> <source address>` back."""
        while True:
            try:
                _, peer = self.udp.recvfrom(512)
                self.udp.sendto(f"{self.name} {peer[0]}\n".encode(), peer)
            except OSError:
                return

    def serve(self) -> None:
        while True:
            try:
                conn, peer = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self.talk, args=(conn, peer[0]), daemon=True).start()

    def talk(self, conn: socket.socket, peer: str) -> None:
        with conn, conn.makefile("rwb") as stream:
            stream.write(f"{self.name} {peer}\n".encode())
            stream.flush()
            for line in stream:
                stream.write(line)
                stream.flush()

    def close(self) -> None:
        self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()
        self.udp.close()


@dataclass
class Seed:
    """The seed topology: names of the node and client namespaces, and of each pod's."""

    node: str
    client: str
    pods: dict[str, str]
    lock: Path


@pytest.fixture(scope="module")
def seed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Seed]:
    """client 192.168.49.100 --- 192.168.49.2 node 10.244.N.1 --- 10.244.N.x pod (x3)."""
    netns = Namespaces("apply")
    node, client = netns("node"), netns("client")
    wiring = [
        f"link add to-client type veth peer eth0 netns {client}",
        f"addr add {NODE}/24 dev to-client",
        "link set to-client up",
    ]
    pods: dict[str, str] = {}
    servers = []
    for n, pod in enumerate(PODS, start=1):
        pods[pod] = netns(f"pod{n}")
        wiring += [
            f"link add to-pod{n} type veth peer eth0 netns {pods[pod]}",
            f"addr add 10.244.{n}.1/24 dev to-pod{n}",
            f"link set to-pod{n} up",
        ]
    batch(node, *wiring)
    batch(client, "addr add 192.168.49.100/24 dev eth0", "link set eth0 up")
    batch(client, f"route add default via {NODE}")
    for n, (pod, ns) in enumerate(pods.items(), start=1):
        batch(ns, f"addr add {pod}/24 dev eth0", "link set eth0 up")
        batch(ns, f"route add default via 10.244.{n}.1")
        servers.append(HoldingServer(ns, PODS[pod], pod, 9376))
    with inside(node):
        Path("/proc/sys/net/ipv4/ip_forward").write_text("1\n")
    yield Seed(node, client, pods, tmp_path_factory.mktemp("lock") / "lock")
    for server in servers:
        server.close()
    netns.delete()


@pytest.fixture
def node(seed: Seed) -> Iterator[str]:
    """The node namespace; lbc's objects are deleted after each test, and must be gone."""
    yield seed.node
    lbc.delete("ipvs", netns=seed.node, lock_path=seed.lock)
    assert "lbc-ipvs0" not in run("ip", "-n", seed.node, "link", "show")
    assert "lbc-ipvs" not in run("ip", "netns", "exec", seed.node, "nft", "list", "tables")


def ipvsadm(ns: str, *args: str) -> str:
    return run("ip", "netns", "exec", ns, "ipvsadm", *args)


def everything(ns: str) -> tuple[str, str, str]:
    """ipvsadm -S -n, the interface with its addresses, and the helper table: all of it."""
    links = run("ip", "-n", ns, "-d", "addr", "show")
    rules = run("ip", "netns", "exec", ns, "nft", "list", "ruleset")
    return ipvsadm(ns, "-S", "-n"), links, rules


@contextmanager
def connection(
    ns: str, address: str, port: int, reset: bool = False
) -> Iterator[tuple[str, Callable[[str], str]]]:
    """A TCP connection held open: the backend's name, and an echo function.

    `reset`: closed with a RST, which IPVS expires in 10 s (a FIN leaves the connection
    inactive for 2 minutes, TIME_WAIT, and a TCP real server drains until then).
    """
    with inside(ns):
        conn = socket.create_connection((address, port), timeout=5)
    if reset:
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    with conn, conn.makefile("rwb") as stream:

        def echo(text: str) -> str:
            stream.write(f"{text}\n".encode())
            stream.flush()
            return stream.readline().decode().strip()

        yield stream.readline().decode().split()[0], echo


def names(ns: str, address: str, port: int, count: int) -> Counter[str]:
    """The backends `count` new connections reach."""
    found: Counter[str] = Counter()
    for _ in range(count):
        with connection(ns, address, port) as (name, _):
            found[name] += 1
    return found


@dataclass
class Wrapped:
    """A dataplane that counts the steps performed; fails or pauses at the n-th."""

    inner: Dataplane
    fail_at: int | None = None
    pause_at: int | None = None
    marker: Path | None = None
    performed: list[Step] = field(default_factory=list)

    def read(self) -> Live:
        return self.inner.read()

    @contextmanager
    def writer(self) -> Iterator[Callable[[Step], None]]:
        with self.inner.writer() as perform:

            def wrapped(step: Step) -> None:
                self.performed.append(step)
                if len(self.performed) == self.fail_at:
                    raise lbc.ApplyError("injected failure")
                if len(self.performed) == self.pause_at and self.marker is not None:
                    self.marker.write_text(step.describe())
                    time.sleep(3600)
                perform(step)

            yield wrapped


def kernel(ns: str, **wrapping: object) -> tuple[IpvsKernel, Wrapped]:
    wrapped = Wrapped(Pyroute2Dataplane(ns), **wrapping)  # type: ignore[arg-type]
    return IpvsKernel(dataplane=wrapped), wrapped


def step_count(ns: str, target: lbc.Cluster) -> int:
    """How many steps applying `target` takes from the namespace's present state."""
    adapter = IpvsKernel(ns)
    desired = adapter.desired(lbc.compile(target, "ipvs"))
    return len(adapter.steps(adapter.snapshot(), desired).steps)


# --- the proofs ---------------------------------------------------------------------
def test_seed_demo_through_apply(seed: Seed, node: str) -> None:
    result = lbc.apply(lbc.load(SEED), "ipvs", netns=node, lock_path=seed.lock)
    assert result.applied and result.plan.counts()["add"] > 0
    assert lbc.verify(lbc.load(SEED), "ipvs", netns=node).in_sync
    # rr: each backend once per round.
    assert names(seed.client, VIP, 80, 9) == {name: 3 for name in PODS.values()}
    verified = CliRunner().invoke(main, ["verify", str(SEED), "-b", "ipvs", "--netns", node])
    assert verified.exit_code == 0, verified.output


def test_reapply_is_a_no_op_without_netlink_writes(seed: Seed, node: str) -> None:
    adapter, wrapped = kernel(node)
    lbc.apply(lbc.load(SEED), "ipvs", kernel=adapter, lock_path=seed.lock)
    first = len(wrapped.performed)
    assert first >= 7  # link, address, rules, a service and its three real servers
    before = everything(node)
    again = lbc.apply(lbc.load(SEED), "ipvs", kernel=adapter, lock_path=seed.lock)
    assert again.plan.in_sync and not again.applied
    assert len(wrapped.performed) == first, "no step was performed"
    assert everything(node) == before


def test_a_failing_step_leaves_everything_as_it_was(seed: Seed, node: str) -> None:
    lbc.apply(lbc.load(SEED), "ipvs", netns=node, lock_path=seed.lock)
    target = config("10.244.1.7", "10.244.2.3", vip="10.0.1.176", node_port=True)
    before, state = everything(node), IpvsKernel(node).snapshot()
    total = step_count(node, target)
    assert total >= 10
    for n in sorted({1, total // 2, total}):
        adapter, wrapped = kernel(node, fail_at=n)
        with pytest.raises(lbc.ApplyError, match="injected failure") as failure:
            lbc.apply(target, "ipvs", kernel=adapter, lock_path=seed.lock)
        assert f"`{wrapped.performed[n - 1].describe()}` failed" in str(failure.value)
        assert f"the {n - 1} step(s) before it were undone" in str(failure.value)
        assert IpvsKernel(node).snapshot() == state, f"failing step {n} of {total}"
        assert everything(node) == before, f"failing step {n} of {total}"
    assert names(seed.client, VIP, 80, 3) == {name: 1 for name in PODS.values()}


def test_other_tools_services_survive_apply_reapply_and_delete(seed: Seed, node: str) -> None:
    theirs = [
        ["-A", "-t", "10.9.9.9:80", "-s", "rr"],
        ["-a", "-t", "10.9.9.9:80", "-r", "10.244.1.7:9376", "-m", "-w", "1"],
        ["-A", "-t", f"{NODE}:8443", "-s", "wlc"],
        ["-a", "-t", f"{NODE}:8443", "-r", "10.244.2.3:9376", "-m", "-w", "2"],
    ]
    for argv in theirs:
        ipvsadm(node, *argv)
    try:
        save = ipvsadm(node, "-S", "-n")
        for step in (
            lambda: lbc.apply(lbc.load(SEED), "ipvs", netns=node, lock_path=seed.lock),
            lambda: lbc.apply(lbc.load(SEED), "ipvs", netns=node, lock_path=seed.lock),
            lambda: lbc.apply(
                config("10.244.1.7", node_port=True), "ipvs", netns=node, lock_path=seed.lock
            ),
            lambda: lbc.delete("ipvs", netns=node, lock_path=seed.lock),
        ):
            step()
            now = ipvsadm(node, "-S", "-n").splitlines()
            assert [line for line in now if "10.9.9.9" in line or ":8443" in line] == [
                line for line in save.splitlines()
            ]
        assert ipvsadm(node, "-S", "-n") == save, "delete left only theirs"
    finally:
        ipvsadm(node, "-D", "-t", "10.9.9.9:80")
        ipvsadm(node, "-D", "-t", f"{NODE}:8443")


def test_drift_is_shown_and_repaired(seed: Seed, node: str) -> None:
    lbc.apply(lbc.load(SEED), "ipvs", netns=node, lock_path=seed.lock)
    ipvsadm(node, "-d", "-t", f"{VIP}:80", "-r", "10.244.2.3:9376")
    run("ip", "-n", node, "addr", "del", f"{VIP}/32", "dev", "lbc-ipvs0")
    verify = ["verify", str(SEED), "-b", "ipvs", "--netns", node]
    shown = CliRunner().invoke(main, verify)
    assert shown.exit_code == 1, shown.output
    assert f"~ change service -t {VIP}:80" in shown.output
    assert f"-a -t {VIP}:80 -r 10.244.2.3:9376 -m -w 1" in shown.output
    assert "addresses lbc-ipvs0" in shown.output
    fixed = lbc.apply(lbc.load(SEED), "ipvs", netns=node, lock_path=seed.lock)
    assert fixed.plan.counts() == {"add": 1, "change": 1, "remove": 0}
    assert CliRunner().invoke(main, verify).exit_code == 0
    assert names(seed.client, VIP, 80, 3) == {name: 1 for name in PODS.values()}


def test_an_apply_killed_half_way_is_converged_by_the_next(
    seed: Seed, node: str, tmp_path: Path
) -> None:
    lbc.apply(lbc.load(SEED), "ipvs", netns=node, lock_path=seed.lock)
    target = config("10.244.1.7", "10.244.2.3", vip="10.0.1.176", node_port=True)
    total = step_count(node, target)
    marker = tmp_path / "paused"
    # A forked child is a whole process with lbc already imported (a new interpreter
    # takes 20 s to start under emulation); it pauses in the middle of its steps.
    child = os.fork()
    if child == 0:
        try:
            adapter, _ = kernel(node, pause_at=total // 2, marker=marker)
            lbc.apply(target, "ipvs", kernel=adapter, lock_path=seed.lock)
        finally:
            os._exit(1)
    try:
        deadline = time.monotonic() + 60
        while not marker.exists():
            assert os.waitpid(child, os.WNOHANG) == (0, 0), "the apply ended before its pause"
            assert time.monotonic() < deadline, "the apply never reached its pause"
            time.sleep(0.05)
    finally:
        os.kill(child, signal.SIGKILL)
        os.waitpid(child, 0)
    print(f"  killed before step {total // 2} of {total}: {marker.read_text()}")
    assert not lbc.verify(target, "ipvs", netns=node).in_sync, "it stopped half way"
    result = lbc.apply(target, "ipvs", netns=node, lock_path=seed.lock)
    assert result.applied
    assert lbc.verify(target, "ipvs", netns=node).in_sync
    assert set(names(seed.client, "10.0.1.176", 80, 4)) == {"hostnames-1", "hostnames-2"}
    assert set(names(seed.client, NODE, 30080, 4)) == {"hostnames-1", "hostnames-2"}
    assert VIP not in ipvsadm(node, "-S", "-n")


def dest_line(node: str, pod: str) -> str:
    """The pod's `-a` line in `ipvsadm -S -n`, or "" when it is not a real server."""
    found = [line for line in ipvsadm(node, "-S", "-n").splitlines() if f"-r {pod}:" in line]
    return found[0] if found else ""


def record(node: str, pod: str) -> Dest | None:
    """The pod's real-server record as the kernel holds it (thresholds and counts too)."""
    live = Pyroute2Dataplane(node).read()
    found = [d for _, dests in live.services for d in dests if d.address == pod]
    return found[0] if found else None


def wait_drained(adapter: IpvsKernel, pod: str, timeout: float = 60) -> None:
    """Until the pod has no connection, active or inactive (a closed TCP connection
    counts as inactive until IPVS expires it; TCP real servers drain until then)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        live = adapter.dataplane.read()
        counts = [
            (d.active, d.inactive) for _, dests in live.services for d in dests if d.address == pod
        ]
        if counts == [(0, 0)]:
            return
        time.sleep(0.2)
    raise AssertionError(f"{pod} still has connections")


def test_a_removed_backend_drains_until_its_connection_closes(seed: Seed, node: str) -> None:
    every = config(*PODS)
    lbc.apply(every, "ipvs", netns=node, lock_path=seed.lock)
    with connection(seed.client, VIP, 80, reset=True) as (name, echo):
        pod = next(p for p, n in PODS.items() if n == name)
        rest = config(*(p for p in PODS if p != pod))
        lbc.apply(rest, "ipvs", netns=node, lock_path=seed.lock)
        assert dest_line(node, pod).endswith(" -m -w 0")
        marked = record(node, pod)
        assert marked is not None and (marked.upper, marked.active) == (DRAIN_UPPER, 1)
        assert 0 < marked.lower <= boottime(), "the mark is when draining began"
        assert lbc.verify(rest, "ipvs", netns=node).in_sync, "draining is not drift"
        adapter, wrapped = kernel(node)
        assert not lbc.apply(rest, "ipvs", kernel=adapter, lock_path=seed.lock).applied
        assert wrapped.performed == []
        assert name not in names(seed.client, VIP, 80, 6), "no new connection reaches it"
        assert echo("still there") == "still there", "the open connection still works"

        # Wanted again while draining: its weight comes back, the connection lives on.
        lbc.apply(every, "ipvs", netns=node, lock_path=seed.lock)
        assert dest_line(node, pod).endswith(" -m -w 1")
        lbc.apply(rest, "ipvs", netns=node, lock_path=seed.lock)
        assert dest_line(node, pod).endswith(" -m -w 0")
        assert echo("and again") == "and again"
    wait_drained(IpvsKernel(node), pod)
    drift = lbc.verify(rest, "ipvs", netns=node)
    assert [c.key for c in drift.changes] == [f"service -t {VIP}:80"]
    lbc.apply(rest, "ipvs", netns=node, lock_path=seed.lock)
    assert dest_line(node, pod) == ""
    assert lbc.verify(rest, "ipvs", netns=node).in_sync


def test_a_drain_ends_at_its_timeout(seed: Seed, node: str) -> None:
    lbc.apply(config(*PODS), "ipvs", netns=node, lock_path=seed.lock)
    with connection(seed.client, VIP, 80) as (name, echo):
        pod = next(p for p, n in PODS.items() if n == name)
        rest = config(*(p for p in PODS if p != pod))
        lbc.apply(rest, "ipvs", netns=node, lock_path=seed.lock)
        assert dest_line(node, pod).endswith(" -m -w 0")
        # The same kernel read DRAIN_TIMEOUT seconds later (no sleeping under emulation).
        later = IpvsKernel(node, clock=lambda: boottime() + DRAIN_TIMEOUT)
        assert lbc.verify(rest, "ipvs", netns=node).in_sync
        assert not lbc.verify(rest, "ipvs", kernel=later).in_sync
        assert echo("open") == "open"
        lbc.apply(rest, "ipvs", kernel=later, lock_path=seed.lock)
        assert record(node, pod) is None, "deleted although its connection is open"
        assert lbc.verify(rest, "ipvs", netns=node).in_sync


def udp_config(*pods: str) -> lbc.Cluster:
    """hostnames as a UDP service, 53 -> 9376, with these pods."""
    return lbc.loads(
        config_text(*pods).replace(
            'ports = [{ name = "default", port = 80, target_port = 9376 }]',
            'ports = [{ name = "dns", protocol = "UDP", port = 53, target_port = 9376 }]',
        )
    )


def ask_udp(ns: str, sport: int) -> str:
    """The pod answering a datagram from the client's port `sport` to VIP:53, or "timeout"."""
    with inside(ns):
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    with sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("192.168.49.100", sport))
        sock.settimeout(1.0)
        sock.sendto(b"?\n", (VIP, 53))
        try:
            return sock.recv(512).decode().split()[0]
        except TimeoutError:
            return "timeout"


def test_a_udp_client_moves_on_from_a_removed_real_server(seed: Seed, node: str) -> None:
    # UDP real servers have no active connections: a removed one is deleted at once.
    # The client's IPVS connection still points at it; expire_nodest_conn (set by
    # lbc, as by kube-proxy) ends that connection on its next datagram instead of
    # dropping datagram after datagram for as long as the client keeps sending.
    lbc.apply(udp_config(*PODS), "ipvs", netns=node, lock_path=seed.lock)
    sport = 41000
    first = ask_udp(seed.client, sport)
    assert first in PODS.values(), first
    assert ask_udp(seed.client, sport) == first
    pod = next(p for p, n in PODS.items() if n == first)
    rest = udp_config(*(p for p in PODS if p != pod))
    lbc.apply(rest, "ipvs", netns=node, lock_path=seed.lock)
    assert f"-r {pod}:9376" not in ipvsadm(node, "-S", "-n")
    after = [ask_udp(seed.client, sport) for _ in range(3)]
    assert all(name in PODS.values() and name != first for name in after), after

    # Without expire_nodest_conn, the same removal cuts the client off: every datagram
    # is dropped and refreshes the connection's timer. (Set to 0 here, and the real
    # server deleted as apply deletes it; with 1, the kernel expires the connections
    # of a deleted real server at once.)
    lbc.apply(udp_config(*PODS), "ipvs", netns=node, lock_path=seed.lock)
    with inside(node):
        Path("/proc/sys/net/ipv4/vs/expire_nodest_conn").write_text("0\n")
    sport = 41001
    first = ask_udp(seed.client, sport)
    pod = next(p for p, n in PODS.items() if n == first)
    ipvsadm(node, "-d", "-u", f"{VIP}:53", "-r", f"{pod}:9376")
    assert [ask_udp(seed.client, sport) for _ in range(2)] == ["timeout", "timeout"]
    # The next apply sets it again (drift), and the client's next datagram moves on.
    rest = udp_config(*(p for p in PODS if p != pod))
    assert not lbc.verify(rest, "ipvs", netns=node).in_sync
    lbc.apply(rest, "ipvs", netns=node, lock_path=seed.lock)
    assert ask_udp(seed.client, sport) not in ("timeout", first)


# --- reviewed findings ----------------------------------------------------------------------
def test_a_bit_31_masquerade_mark_reads_back_in_sync(seed: Seed, node: str) -> None:
    """nft lists `meta mark & 0x80000000 == 0` as `meta mark 0x00000000/1`."""
    text = config_text(*PODS).replace(
        'pod_cidrs = ["10.244.0.0/16"]\n',
        'pod_cidrs = ["10.244.0.0/16"]\nmasquerade_mark = "0x80000000"\n',
    )
    cluster = lbc.loads(text)
    assert lbc.apply(cluster, "ipvs", netns=node, lock_path=seed.lock).applied
    rules = run("ip", "netns", "exec", node, "nft", "list", "table", "inet", "lbc-ipvs")
    assert "meta mark 0x00000000/1 return" in rules
    assert lbc.verify(cluster, "ipvs", netns=node).in_sync
    assert names(seed.client, VIP, 80, 3) == {name: 1 for name in PODS.values()}


CLONE_NEWNS = 0x00020000


def test_the_helper_table_reads_in_sync_without_etc_protocols(seed: Seed, node: str) -> None:
    """Without /etc/protocols (no netbase) nft lists protocols as numbers: 6, not tcp."""
    cluster = config(*PODS, node_port=True)
    lbc.apply(cluster, "ipvs", netns=node, lock_path=seed.lock)
    child = os.fork()
    if child == 0:  # a mount namespace of its own, where /etc/protocols is empty
        status = 2
        try:
            if ctypes.CDLL(None, use_errno=True).unshare(CLONE_NEWNS) != 0:
                raise OSError(ctypes.get_errno(), "unshare")
            subprocess.run(["mount", "--make-rprivate", "/"], check=True)
            subprocess.run(["mount", "--bind", "/dev/null", "/etc/protocols"], check=True)
            listing = run("ip", "netns", "exec", node, "nft", "list", "table", "inet", "lbc-ipvs")
            assert " . 6 . " in listing, listing
            status = 0 if lbc.verify(cluster, "ipvs", netns=node).in_sync else 1
        finally:
            os._exit(status)
    _, status = os.waitpid(child, 0)
    assert os.waitstatus_to_exitcode(status) == 0, "drift (1) or no numeric listing (2)"


def test_an_up_interface_with_ipv6_vips_is_applied_in_sync(seed: Seed, node: str) -> None:
    """Setting lbc-ipvs0 down drops its IPv6 addresses (keep_addr_on_down=0): apply
    binds them again after it, and the read-back is in sync (no rollback)."""
    dual = lbc.load(ROOT / "golden" / "dual-stack" / "cluster.toml")
    v6 = "fd00:10::1:178"
    with inside(node):
        keep = Path("/proc/sys/net/ipv6/conf/default/keep_addr_on_down").read_text().strip()
    assert keep == "0"
    batch(
        node,
        "link add lbc-ipvs0 type dummy",
        "link set lbc-ipvs0 up",
        f"addr add {v6}/128 dev lbc-ipvs0 nodad",
    )
    result = lbc.apply(dual, "ipvs", netns=node, lock_path=seed.lock)
    assert result.applied
    assert lbc.verify(dual, "ipvs", netns=node).in_sync
    shown = run("ip", "-n", node, "-d", "addr", "show", "dev", "lbc-ipvs0")
    assert f"inet6 {v6}/128" in shown and "inet 10.0.1.178/32" in shown
    flags = shown.splitlines()[0].partition("<")[2].partition(">")[0].split(",")
    assert "UP" not in flags, shown
    assert ipvsadm(node, "-L", "-n", "-t", f"[{v6}]:80")


def test_service_flags_and_netmask_are_drift_and_repaired(seed: Seed, node: str) -> None:
    udp = udp_config(*PODS)
    lbc.apply(udp, "ipvs", netns=node, lock_path=seed.lock)
    before = ipvsadm(node, "-S", "-n")
    # One-packet scheduling (UDP only), then a persistence netmask.
    for change in (["-o"], ["-p", "30", "-M", "255.255.255.0"]):
        ipvsadm(node, "-E", "-u", f"{VIP}:53", "-s", "rr", *change)
        drift = lbc.verify(udp, "ipvs", netns=node)
        assert [c.key for c in drift.changes] == [f"service -u {VIP}:53"], change
        fixed = lbc.apply(udp, "ipvs", netns=node, lock_path=seed.lock)
        assert fixed.applied
        assert lbc.verify(udp, "ipvs", netns=node).in_sync
        assert ipvsadm(node, "-S", "-n") == before
