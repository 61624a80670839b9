"""Network-namespace lab for kernel tests: namespaces, veth links, name-telling servers, a client.

A `Lab` owns everything it creates and removes it by name when it closes, also when
a test fails half way::

    with Lab() as lab:
        a, b = lab.namespace("a"), lab.namespace("b")
        lab.link(a, ["10.9.0.1/24"], b, ["10.9.0.2/24"])
        lab.serve(b, "web", "10.9.0.2", 8080)
        result = a.request("10.9.0.2", 8080, count=10)
        assert result.names == Counter({"web": 10})

Namespaces are called `lbc-<role>-<pid>-<random>`, so parallel runs never collide,
and veth pairs are created directly inside their namespaces, so the host's own
interfaces are never touched. A server answers every TCP connection and UDP
datagram with one line, `<name> <source address it saw>`, like the serve_hostname
pods of the seed demo. A client runs N requests from ONE Python process inside a
namespace and counts the answers and the errors (`refused`, `timeout`, ...).

`serve_addresses()` runs one such server for many addresses of a namespace, and
`sctp_request()` opens SCTP associations over raw sockets, for kernels that translate
SCTP but have no SCTP sockets.

`seed_topology()` builds the seed demo: a client, a node that routes (the rules go
there) and three backend pods, all with addresses from examples/hostnames.toml.
Tests using this module are marked `netns`; `require()` skips them with the
reason when the machine cannot run them (not root, no `ip netns`).
"""

from __future__ import annotations

import ipaddress
import json
import os
import secrets
import select
import shutil
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from functools import cache

import pytest

# Every command has a time limit so a wedged kernel call cannot hang the run.
COMMAND_TIMEOUT = 20.0
SERVER_START_TIMEOUT = 10.0

SERVER = r"""
import selectors, socket, sys

name, host, ports = sys.argv[1], sys.argv[2], [int(p) for p in sys.argv[3:]]
family = socket.AF_INET6 if ":" in host else socket.AF_INET
selector = selectors.DefaultSelector()
for port in ports:
    tcp = socket.socket(family, socket.SOCK_STREAM)
    tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    tcp.bind((host, port))
    tcp.listen(1024)
    udp = socket.socket(family, socket.SOCK_DGRAM)
    udp.bind((host, port))
    selector.register(tcp, selectors.EVENT_READ, "tcp")
    selector.register(udp, selectors.EVENT_READ, "udp")
print("ready", flush=True)
while True:
    for key, _ in selector.select():
        sock = key.fileobj
        if key.data == "udp":
            data, peer = sock.recvfrom(2048)
            sock.sendto(f"{name} {peer[0]}\n".encode(), peer)
            continue
        conn, peer = sock.accept()
        conn.settimeout(2.0)
        try:
            conn.sendall(f"{name} {peer[0]}\n".encode())
            # The client closes first, so TIME_WAIT stays on its side, where the
            # kernel's port choice avoids it; waiting here costs one round trip.
            conn.recv(64)
        except OSError:
            pass
        finally:
            conn.close()
"""

CLIENT = r"""
import errno, json, socket, sys, time

host, port, count, proto, timeout, source = sys.argv[1:7]
port, count, timeout = int(port), int(count), float(timeout)
family = socket.AF_INET6 if ":" in host else socket.AF_INET
kind = socket.SOCK_STREAM if proto == "tcp" else socket.SOCK_DGRAM
replies, errors = {}, {}
start = time.monotonic()
for _ in range(count):
    sock = socket.socket(family, kind)
    sock.settimeout(timeout)
    try:
        if source:
            sock.bind((source, 0))
        sock.connect((host, port))
        if kind == socket.SOCK_DGRAM:
            sock.send(b"?\n")
        data = b""
        while not data.endswith(b"\n") and len(data) < 512:
            chunk = sock.recv(512)
            if not chunk:
                break
            data += chunk
        line = data.decode(errors="replace").strip()
        key, table = (line, replies) if line else ("empty", errors)
    except ConnectionRefusedError:
        key, table = "refused", errors
    except ConnectionResetError:
        key, table = "reset", errors
    except TimeoutError:
        key, table = "timeout", errors
    except OSError as exc:
        key, table = errno.errorcode.get(exc.errno or 0, str(exc)).lower(), errors
    finally:
        sock.close()
    table[key] = table.get(key, 0) + 1
print(json.dumps({"replies": replies, "errors": errors, "seconds": time.monotonic() - start}))
"""


LOADER = r"""
import json, signal, socket, sys, time

host, port, limit, timeout = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), float(sys.argv[4])
family = socket.AF_INET6 if ":" in host else socket.AF_INET
stop = False


def finish(*_):
    global stop
    stop = True


signal.signal(signal.SIGTERM, finish)
replies, errors = {}, {}
end = time.monotonic() + limit
print("ready", flush=True)
while not stop and time.monotonic() < end:
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        sock.connect((host, port))
        data = b""
        while not data.endswith(b"\n") and len(data) < 512:
            chunk = sock.recv(512)
            if not chunk:
                break
            data += chunk
        name = data.decode(errors="replace").split()[0] if data.strip() else ""
        key, table = (name, replies) if name else ("empty", errors)
    except OSError as exc:
        key, table = type(exc).__name__, errors
    finally:
        sock.close()
    table[key] = table.get(key, 0) + 1
print(json.dumps({"replies": replies, "errors": errors}), flush=True)
"""


class NetnsError(RuntimeError):
    """A command in a namespace failed; the message carries the command and its stderr."""


@cache
def unavailable() -> str | None:
    """Why network-namespace tests cannot run here, or None when they can."""
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        return "needs root (network namespaces, veth, iptables)"
    if shutil.which("ip") is None:
        return "needs `ip` from iproute2"
    probe = unique_name("probe")
    made = subprocess.run(
        ["ip", "netns", "add", probe], capture_output=True, text=True, timeout=COMMAND_TIMEOUT
    )
    subprocess.run(["ip", "netns", "del", probe], capture_output=True, timeout=COMMAND_TIMEOUT)
    if made.returncode != 0:
        return f"`ip netns add` does not work here: {made.stderr.strip()}"
    return None


def require(*tools: str) -> None:
    """Skip the calling test unless namespaces work and every command in `tools` exists."""
    reason = unavailable()
    if reason is None:
        missing = [t for t in tools if shutil.which(t) is None]
        reason = f"needs {', '.join(missing)}" if missing else None
    if reason is not None:
        pytest.skip(reason)


def unique_name(role: str) -> str:
    """`lbc-<role>-<pid>-<random>`: unique across parallel test runs."""
    return f"lbc-{role}-{os.getpid()}-{secrets.token_hex(3)}"


def run(
    args: Sequence[str],
    input: str | None = None,
    check: bool = True,
    timeout: float = COMMAND_TIMEOUT,
) -> str:
    """Run `args` (no shell) with a time limit; return stdout, raise `NetnsError` on failure."""
    done = subprocess.run(list(args), input=input, capture_output=True, text=True, timeout=timeout)
    if check and done.returncode != 0:
        raise NetnsError(f"{' '.join(args)} exited {done.returncode}: {done.stderr.strip()}")
    return done.stdout


@dataclass(frozen=True)
class Results:
    """What a client's requests got back: answer lines and errors, with counts."""

    replies: Counter[str]
    errors: Counter[str]
    seconds: float

    @property
    def names(self) -> Counter[str]:
        """Answers by the name of the backend that gave them."""
        out: Counter[str] = Counter()
        for line, n in self.replies.items():
            out[line.split()[0]] += n
        return out

    @property
    def sources(self) -> Counter[tuple[str, str]]:
        """Answers by (backend name, the source address the backend saw)."""
        out: Counter[tuple[str, str]] = Counter()
        for line, n in self.replies.items():
            name, source = line.split()[:2]
            out[name, source] += n
        return out

    def __str__(self) -> str:
        names = ", ".join(f"{k}={v}" for k, v in sorted(self.names.items()))
        errors = ", ".join(f"{k}={v}" for k, v in sorted(self.errors.items()))
        return f"answers [{names}] errors [{errors}] in {self.seconds:.3f}s"


@dataclass(frozen=True)
class Netns:
    """One network namespace, by its unique name."""

    name: str
    role: str

    def exec(
        self,
        *args: str,
        input: str | None = None,
        check: bool = True,
        timeout: float = COMMAND_TIMEOUT,
    ) -> str:
        """Run a command inside; equivalent to `ip netns exec NAME ARGS...`."""
        cmd = ["ip", "netns", "exec", self.name, *args]
        return run(cmd, input=input, check=check, timeout=timeout)

    def ip(self, *args: str) -> str:
        """Equivalent to `ip -n NAME ARGS...`."""
        return run(["ip", "-n", self.name, *args])

    def sysctl(self, key: str, value: str | int) -> None:
        """Equivalent to `ip netns exec NAME sysctl -qw KEY=VALUE`."""
        self.exec("sysctl", "-qw", f"{key}={value}")

    def request(
        self,
        host: str,
        port: int,
        count: int = 1,
        proto: str = "tcp",
        timeout: float = 1.0,
        source: str | None = None,
    ) -> Results:
        """Make `count` requests to host:port one after another, from one process in here."""
        if not 0 < count <= 10_000 or not 0 < timeout <= 10:
            raise ValueError(f"count {count} or timeout {timeout} is out of range")
        out = self.exec(
            sys.executable,
            "-c",
            CLIENT,
            host,
            str(port),
            str(count),
            proto,
            str(timeout),
            source or "",
            # Every request may time out; the process gets that long and a margin.
            timeout=COMMAND_TIMEOUT + count * timeout,
        )
        data = json.loads(out)
        return Results(Counter(data["replies"]), Counter(data["errors"]), data["seconds"])


def start_server(
    lab: Lab, ns: Netns, script_and_args: list[str], what: str
) -> subprocess.Popen[str]:
    """Run a Python server script in `ns` (killed with `lab`); wait for its "ready" line."""
    proc = subprocess.Popen(
        ["ip", "netns", "exec", ns.name, sys.executable, "-c", *script_and_args],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    lab.processes.append(proc)
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], SERVER_START_TIMEOUT)
    line = proc.stdout.readline() if ready else ""
    if line.strip() != "ready":
        proc.kill()
        _, err = proc.communicate(timeout=COMMAND_TIMEOUT)
        raise NetnsError(f"{what} in {ns.name} did not start: {err}")
    return proc


@dataclass
class Load:
    """Requests sent back to back by a background client until `stop`."""

    process: subprocess.Popen[str]

    def stop(self) -> Results:
        """Stop sending; the counts of replies (by backend name) and errors."""
        self.process.terminate()
        out, _ = self.process.communicate(timeout=COMMAND_TIMEOUT)
        data = json.loads(out.splitlines()[-1])
        return Results(Counter(data["replies"]), Counter(data["errors"]), 0.0)


@dataclass
class Lab:
    """Namespaces, links and server processes of one test; `close` removes them all."""

    namespaces: list[Netns] = field(default_factory=list)
    processes: list[subprocess.Popen[str]] = field(default_factory=list)

    def __enter__(self) -> Lab:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def namespace(self, role: str) -> Netns:
        """A new namespace with `lo` up; equivalent to `ip netns add lbc-ROLE-PID-RAND`."""
        ns = Netns(unique_name(role), role)
        # Recorded before it exists, so a failure half way is still cleaned up.
        self.namespaces.append(ns)
        run(["ip", "netns", "add", ns.name])
        ns.ip("link", "set", "lo", "up")
        # Until duplicate address detection ends (a second or two after a link comes up),
        # a router sends no neighbour solicitations for forwarded IPv6 packets; skip it.
        ns.sysctl("net.ipv6.conf.all.accept_dad", 0)
        ns.sysctl("net.ipv6.conf.default.accept_dad", 0)
        return ns

    def link(
        self,
        a: Netns,
        a_addresses: Sequence[str],
        b: Netns,
        b_addresses: Sequence[str],
        a_name: str | None = None,
        b_name: str | None = None,
    ) -> tuple[str, str]:
        """A veth pair between `a` and `b`, addressed and up; returns the two interface names.

        Equivalent to `ip -n A link add A_NAME type veth peer name B_NAME netns B`, then
        `ip addr add` and `ip link set up` on each side.
        """
        a_name = a_name or f"v-{b.role}"[:15]
        b_name = b_name or f"v-{a.role}"[:15]
        a.ip("link", "add", a_name, "type", "veth", "peer", "name", b_name, "netns", b.name)
        for ns, ifname, addresses in ((a, a_name, a_addresses), (b, b_name, b_addresses)):
            for cidr in addresses:
                # Duplicate address detection would hold IPv6 addresses back for seconds.
                extra = ["nodad"] if ipaddress.ip_interface(cidr).version == 6 else []
                ns.ip("addr", "add", cidr, "dev", ifname, *extra)
            ns.ip("link", "set", ifname, "up")
        return a_name, b_name

    def serve(self, ns: Netns, name: str, address: str, *ports: int) -> subprocess.Popen[str]:
        """Start a server in `ns` answering `name <source>` on address:port (TCP and UDP)."""
        if not ports:
            raise ValueError("serve needs at least one port")
        return start_server(
            self,
            ns,
            [SERVER, name, address, *(str(p) for p in ports)],
            f"server {name} on {address}",
        )

    def load(self, ns: Netns, host: str, port: int, seconds: float = 60.0) -> Load:
        """Start a client in `ns` connecting to host:port over and over, for `seconds` at most."""
        process = subprocess.Popen(
            [
                "ip",
                "netns",
                "exec",
                ns.name,
                sys.executable,
                "-c",
                LOADER,
                host,
                str(port),
                str(seconds),
                "1.0",
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        self.processes.append(process)
        assert process.stdout is not None
        if process.stdout.readline().strip() != "ready":
            raise NetnsError("the load client did not start")
        return Load(process)

    def close(self) -> None:
        """Kill every process this lab started (by pid), then delete its namespaces by name."""
        for proc in self.processes:
            if proc.poll() is None:
                proc.kill()
            with suppress(subprocess.TimeoutExpired):
                proc.communicate(timeout=COMMAND_TIMEOUT)
        self.processes.clear()
        failed = []
        for ns in reversed(self.namespaces):
            done = subprocess.run(
                ["ip", "netns", "del", ns.name],
                capture_output=True,
                text=True,
                timeout=COMMAND_TIMEOUT,
            )
            exists = os.path.exists(f"/run/netns/{ns.name}")
            if done.returncode != 0 and exists:
                failed.append(f"{ns.name}: {done.stderr.strip()}")
        self.namespaces.clear()
        if failed:
            raise NetnsError("could not delete namespaces: " + "; ".join(failed))


# --- the seed demo -------------------------------------------------------------------

# The three serve_hostname pods of the seed, at the addresses of examples/hostnames.toml
# (and, for IPv6, of golden/ipv6 and golden/dual-stack).
PODS: Mapping[str, str] = {
    "hostnames-0uton": "10.244.3.6",
    "hostnames-yp2kp": "10.244.1.7",
    "hostnames-bvc05": "10.244.2.3",
}
PODS6: Mapping[str, str] = {
    "hostnames-0uton": "fd00:244::3:6",
    "hostnames-yp2kp": "fd00:244::1:7",
    "hostnames-bvc05": "fd00:244::2:3",
}
POD_PORT = 9376
# Each pod sits on its own small network with the node at its first address (10.244.1.1,
# fd00:244::1:1), like a per-node pod range; both are inside the pod CIDRs.
POD_PREFIX = {4: 24, 6: 112}
CLIENT_ADDRESS, CLIENT_ADDRESS6 = "192.168.49.10", "fd00:49::10"
NODE_ADDRESS, NODE_ADDRESS6 = "192.168.49.2", "fd00:49::2"  # the golden cases' node addresses
OUTSIDE_PREFIX = {4: 24, 6: 64}


@dataclass(frozen=True)
class Seed:
    """The seed demo's machines: a client, a routing node and three pods running servers."""

    lab: Lab
    client: Netns
    node: Netns
    pods: Mapping[str, Netns]  # pod name -> its namespace
    addresses: Mapping[str, str]  # pod name -> pod IPv4 address
    gateways: Mapping[str, str]  # pod name -> the node's IPv4 address on that pod's link
    addresses6: Mapping[str, str]  # the same for IPv6
    gateways6: Mapping[str, str]

    def pod_named(self, address: str) -> str:
        """The name of the pod that has `address` (either family)."""
        both = [*self.addresses.items(), *self.addresses6.items()]
        return next(name for name, a in both if a == address)


def gateway(address: str) -> str:
    """The node's address on the link of the pod with `address`: the link's first address."""
    family = ipaddress.ip_address(address).version
    net = ipaddress.ip_interface(f"{address}/{POD_PREFIX[family]}").network
    return str(net[1])


@contextmanager
def seed_topology(
    pods: Mapping[str, str] = PODS,
    pods6: Mapping[str, str] = PODS6,
    ports: Sequence[int] = (POD_PORT,),
) -> Iterator[Seed]:
    """Build the seed demo (client -- node -- pods, servers running); tear it all down after.

    Dual-stack: every pod has its IPv4 address from `pods` and, if listed, its IPv6
    address from `pods6`, with a server on each. The client is outside the pod CIDRs
    and reaches everything through the node. The node's default routes point back at
    the client, standing in for the upstream router of a real node: a VIP without
    rules is then forwarded (and times out) rather than failing in the routing lookup,
    so FORWARD-chain REJECTs are reachable. The client does not forward, so such
    packets end there.
    """
    with Lab() as lab:
        client = lab.namespace("client")
        node = lab.namespace("node")
        node.sysctl("net.ipv4.ip_forward", 1)
        node.sysctl("net.ipv6.conf.all.forwarding", 1)
        # A hairpin (a pod reaching itself through a VIP) leaves by the interface it came
        # in on; a redirect would tell the pod to bypass the node and the VIP's rules.
        node.sysctl("net.ipv4.conf.all.send_redirects", 0)
        node.sysctl("net.ipv4.conf.default.send_redirects", 0)
        client.sysctl("net.ipv4.ip_forward", 0)
        lab.link(
            node,
            [f"{NODE_ADDRESS}/{OUTSIDE_PREFIX[4]}", f"{NODE_ADDRESS6}/{OUTSIDE_PREFIX[6]}"],
            client,
            [f"{CLIENT_ADDRESS}/{OUTSIDE_PREFIX[4]}", f"{CLIENT_ADDRESS6}/{OUTSIDE_PREFIX[6]}"],
            b_name="eth0",
        )
        client.ip("route", "add", "default", "via", NODE_ADDRESS)
        client.ip("-6", "route", "add", "default", "via", NODE_ADDRESS6)
        node.ip("route", "add", "default", "via", CLIENT_ADDRESS)
        node.ip("-6", "route", "add", "default", "via", CLIENT_ADDRESS6)
        spaces = {}
        for name in pods:
            mine = [a for a in (pods[name], pods6.get(name)) if a is not None]
            pod = lab.namespace(name.rsplit("-", 1)[-1])
            pod.sysctl("net.ipv4.ip_forward", 0)
            family = {a: ipaddress.ip_address(a).version for a in mine}
            lab.link(
                node,
                [f"{gateway(a)}/{POD_PREFIX[family[a]]}" for a in mine],
                pod,
                [f"{a}/{POD_PREFIX[family[a]]}" for a in mine],
                b_name="eth0",
            )
            for a in mine:
                pod.ip(f"-{family[a]}", "route", "add", "default", "via", gateway(a))
                lab.serve(pod, name, a, *ports)
            spaces[name] = pod
        yield Seed(
            lab,
            client,
            node,
            spaces,
            dict(pods),
            {name: gateway(a) for name, a in pods.items()},
            {name: pods6[name] for name in pods if name in pods6},
            {name: gateway(pods6[name]) for name in pods if name in pods6},
        )


# --- many addresses per namespace, and SCTP without SCTP sockets -----------------------

# CRC-32C, the SCTP checksum (RFC 9260 appendix A), shared by the SCTP scripts below.
# The kernel here tracks and translates SCTP (conntrack, NAT) but has no SCTP sockets,
# so INIT and INIT ACK chunks are sent and read on raw sockets (protocol 132).
SCTP_WIRE = r"""
import struct

def crc32c(data):
    crc = 0xFFFFFFFF
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 & -(crc & 1))
    return crc ^ 0xFFFFFFFF

def sctp_packet(sport, dport, vtag, chunk):
    body = struct.pack("!HHII", sport, dport, vtag, 0) + chunk
    # The checksum goes on the wire least significant byte first, as Linux writes it.
    return body[:8] + struct.pack("<I", crc32c(body)) + body[12:]

def init_chunk(kind, tag, params=b""):
    # INIT (1) or INIT ACK (2): initiate tag, a_rwnd, streams out and in, first TSN.
    body = struct.pack("!IIHHI", tag, 65535, 1, 1, tag) + params
    return struct.pack("!BBH", kind, 0, 4 + len(body)) + body

def sctp_payload(data, family):
    # An IPv4 raw socket hands over the IP header too; an IPv6 one does not.
    return data[(data[0] & 0x0F) * 4:] if family == 4 else data
"""

MANY_SERVER = (
    SCTP_WIRE
    + r"""
import json, os, selectors, socket, sys

listeners = json.loads(sys.argv[1])  # [[address, [port, ...]], ...]
selector = selectors.DefaultSelector()
for host, ports in listeners:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    for port in ports:
        tcp = socket.socket(family, socket.SOCK_STREAM)
        tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        tcp.bind((host, port))
        tcp.listen(1024)
        udp = socket.socket(family, socket.SOCK_DGRAM)
        udp.bind((host, port))
        selector.register(tcp, selectors.EVENT_READ, ("tcp", host, None))
        selector.register(udp, selectors.EVENT_READ, ("udp", host, None))
    # One raw socket per address sees every SCTP packet sent to it.
    raw = socket.socket(family, socket.SOCK_RAW, 132)
    raw.bind((host, 0))
    selector.register(raw, selectors.EVENT_READ, ("sctp", host, set(ports)))
print("ready", flush=True)
while True:
    for key, _ in selector.select():
        sock, (kind, host, ports) = key.fileobj, key.data
        if kind == "udp":
            data, peer = sock.recvfrom(2048)
            sock.sendto(f"{host} {peer[0]}\n".encode(), peer)
        elif kind == "sctp":
            data, peer = sock.recvfrom(2048)
            sctp = sctp_payload(data, 6 if ":" in host else 4)
            if len(sctp) < 32 or sctp[12] != 1:
                continue  # only INIT chunks open an association
            sport, dport = struct.unpack("!HH", sctp[:4])
            (their_tag,) = struct.unpack("!I", sctp[16:20])
            if dport not in ports:
                continue
            # INIT ACK; its State Cookie carries the answer line, padded to 4 bytes.
            line = f"{host} {peer[0]}\n".encode()
            line += b" " * (-len(line) % 4)
            cookie = struct.pack("!HH", 7, 4 + len(line)) + line
            chunk = init_chunk(2, int.from_bytes(os.urandom(4), "big") | 1, cookie)
            sock.sendto(sctp_packet(dport, sport, their_tag, chunk), (peer[0], 0))
        else:
            conn, peer = sock.accept()
            conn.settimeout(2.0)
            try:
                conn.sendall(f"{host} {peer[0]}\n".encode())
                conn.recv(64)  # the client closes first, keeping TIME_WAIT on its side
            except OSError:
                pass
            finally:
                conn.close()
"""
)

SCTP_CLIENT = (
    SCTP_WIRE
    + r"""
import json, os, select, socket, sys, time

host, port, count, timeout, source = sys.argv[1:6]
port, count, timeout = int(port), int(count), float(timeout)
family = 6 if ":" in host else 4
replies, errors = {}, {}
start = time.monotonic()
def refusal(data, sport):
    # ICMP port unreachable quoting our INIT: IPv4 sockets see the IP header, IPv6 not.
    if family == 4:
        ihl = (data[0] & 0x0F) * 4
        icmp = data[ihl:]
        if icmp[:2] != bytes([3, 3]):
            return False
        inner = icmp[8:]
        quoted = inner[(inner[0] & 0x0F) * 4:]
    else:
        if data[:2] != bytes([1, 4]):
            return False
        quoted = data[48:]
    return len(quoted) >= 4 and struct.unpack("!HH", quoted[:4]) == (sport, port)


for _ in range(count):
    sock = socket.socket(socket.AF_INET6 if family == 6 else socket.AF_INET, socket.SOCK_RAW, 132)
    icmp = socket.socket(
        socket.AF_INET6 if family == 6 else socket.AF_INET,
        socket.SOCK_RAW,
        socket.IPPROTO_ICMPV6 if family == 6 else socket.IPPROTO_ICMP,
    )
    key, table = "timeout", errors
    try:
        if source:
            sock.bind((source, 0))
        sport = 1024 + int.from_bytes(os.urandom(2), "big") % 64000
        tag = int.from_bytes(os.urandom(4), "big") | 1
        sock.sendto(sctp_packet(sport, port, 0, init_chunk(1, tag)), (host, 0))
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            ready, _, _ = select.select([sock, icmp], [], [], left)
            if icmp in ready and refusal(icmp.recv(2048), sport):
                key = "refused"
                break
            if sock not in ready:
                continue
            sctp = sctp_payload(sock.recv(2048), family)
            if len(sctp) < 36 or sctp[12] != 2:
                continue
            their_sport, their_dport, vtag = struct.unpack("!HHI", sctp[:8])
            if (their_sport, their_dport, vtag) != (port, sport, tag):
                continue
            kind, length = struct.unpack("!HH", sctp[32:36])
            line = sctp[36:32 + length].decode(errors="replace").strip() if kind == 7 else ""
            key, table = (line, replies) if line else ("empty", errors)
            break
    except TimeoutError:
        pass
    except OSError as exc:
        key = type(exc).__name__
    finally:
        sock.close()
        icmp.close()
    table[key] = table.get(key, 0) + 1
print(json.dumps({"replies": replies, "errors": errors, "seconds": time.monotonic() - start}))
"""
)


def serve_addresses(lab: Lab, ns: Netns, listeners: Mapping[str, Sequence[int]]) -> None:
    """One server in `ns` for many addresses: each answers `<address> <source>` on its ports.

    TCP and UDP on every (address, port); SCTP too, as an INIT ACK whose State Cookie
    holds the answer line (read by `sctp_request`). The process joins `lab`'s processes.
    """
    if not listeners or not all(listeners.values()):
        raise ValueError("serve_addresses needs at least one port per address")
    spec = json.dumps([[address, list(ports)] for address, ports in listeners.items()])
    start_server(lab, ns, [MANY_SERVER, spec], f"server for {len(listeners)} addresses")


def sctp_request(
    ns: Netns,
    host: str,
    port: int,
    count: int = 1,
    timeout: float = 1.0,
    source: str | None = None,
) -> Results:
    """Open `count` SCTP associations to host:port from `ns` (INIT, wait for the INIT ACK).

    The answer is the State Cookie of a `serve_addresses` server; an ICMP port
    unreachable quoting the INIT counts as `refused`, and nothing within `timeout`
    as `timeout`.
    Raw sockets: no SCTP socket support is needed.
    """
    if not 0 < count <= 10_000 or not 0 < timeout <= 10:
        raise ValueError(f"count {count} or timeout {timeout} is out of range")
    out = ns.exec(
        sys.executable,
        "-c",
        SCTP_CLIENT,
        host,
        str(port),
        str(count),
        str(timeout),
        source or "",
        timeout=COMMAND_TIMEOUT + count * timeout,
    )
    data = json.loads(out)
    return Results(Counter(data["replies"]), Counter(data["errors"]), data["seconds"])
