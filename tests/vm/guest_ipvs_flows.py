"""The packet-flow matrix (tests/flows.py) through IPVS: runs inside the VM test_ipvs_vm.py boots.

The same topology, rows and assertions as the iptables and nftables legs
(tests/test_flows_kernel.py): that module builds the namespaces, and its row test
runs here unchanged with backend "ipvs". What differs:

- the rules are loaded with lbc's own apply path, `lbc.apply(cluster, "ipvs",
  netns=node)`, one golden case after another (services, real servers, the
  `lbc-ipvs0` addresses and the helper table, with read-back verification);
- under software emulation a new process costs seconds (an interpreter) or most of
  one (`conntrack`), and each row starts several: the clients of tests/netns.py,
  Python scripts normally started with `python -c` inside a namespace, run in this
  process with the namespace entered around them (a socket stays in the namespace
  it was made in), and the conntrack flush before each row is one netlink request.

A row whose golden case the IPVS backend refuses is skipped with the refusal the
backend's own check gives (`lbc.compile` raising `UnsupportedError`); the host side
checks that only those rows skipped, and that the rest ran.
"""

from __future__ import annotations

import os
import select
import signal
import socket
import struct
import sys
import traceback
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, redirect_stdout
from dataclasses import dataclass
from functools import cache
from io import StringIO
from pathlib import Path

import pytest

import lbc
import tests.test_flows_kernel as kernel_flows
from lbc.apply.netns import inside
from tests import netns
from tests.flows import FLOWS, POD, POD6, Flow

pytestmark = pytest.mark.skipif(
    not os.environ.get("LBC_VM_GUEST"),
    reason="runs inside the IPVS VM; tests/vm/test_ipvs_vm.py boots it",
)

BACKEND = "ipvs"
TOOLS = ("nft", "conntrack", "ipvsadm")
SERVER_START_TIMEOUT = 60.0
# `conntrack -F` as one netlink request: ctnetlink's IPCTNL_MSG_CT_DELETE without
# attributes, for every family (nfgen_family AF_UNSPEC).
NETLINK_NETFILTER = 12
CT_DELETE = (1 << 8) | 2  # NFNL_SUBSYS_CTNETLINK, IPCTNL_MSG_CT_DELETE
NLM_F_REQUEST, NLM_F_ACK = 0x1, 0x4
ROWS = [f for case in kernel_flows.CASES for f in FLOWS if f.case == case]  # case by case
IDS = [f"{BACKEND}:{f.case}:{kernel_flows.slug(f.name)}" for f in ROWS]


@cache
def refusal(case: str) -> str | None:
    """Why the IPVS backend cannot express `case` (its own check), or None when it can."""
    try:
        lbc.compile(kernel_flows.cluster(case), backend=BACKEND)
    except lbc.UnsupportedError as exc:
        return skip_reason(case, exc)
    return None


def skip_reason(case: str, exc: lbc.UnsupportedError) -> str:
    """One line: the case and every item of the backend's refusal."""
    return f"backend {exc.backend!r} refuses {case}: " + "; ".join(str(i) for i in exc.items)


def run_script(ns: str, script: str, argv: Sequence[str]) -> str:
    """Run a `python -c` script of tests/netns.py in this process, inside namespace `ns`.

    Equivalent to `ip netns exec NS python -c SCRIPT ARGV...`: the same argv, and its
    standard output returned.
    """
    out, saved = StringIO(), sys.argv
    sys.argv = ["-c", *argv]
    try:
        with inside(ns), redirect_stdout(out):
            exec(compile(script, "<netns script>", "exec"), {"__name__": "__main__"})
    finally:
        sys.argv = saved
    return out.getvalue()


class InProcess(netns.Netns):
    """A namespace whose Python scripts (the matrix's clients) run in this process."""

    def exec(
        self,
        *args: str,
        input: str | None = None,
        check: bool = True,
        timeout: float = netns.COMMAND_TIMEOUT,
    ) -> str:
        if args[:2] == (sys.executable, "-c") and input is None:
            return run_script(self.name, args[2], args[3:])
        return super().exec(*args, input=input, check=check, timeout=timeout)


def flush_conntrack(ns: str) -> None:
    """Equivalent to `conntrack -F` for IPv4 and IPv6 in namespace `ns`, without a process."""
    with inside(ns):
        sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
    with sock:
        body = struct.pack("=BBH", socket.AF_UNSPEC, 0, 0)  # nfgenmsg: family, version, res_id
        header = struct.pack("=IHHII", 16 + len(body), CT_DELETE, NLM_F_REQUEST | NLM_F_ACK, 1, 0)
        sock.send(header + body)
        reply = sock.recv(4096)
    (error,) = struct.unpack_from("=i", reply, 16)  # the nlmsgerr after the reply's header
    if error:
        raise OSError(-error, f"conntrack flush in {ns}: {os.strerror(-error)}")


@dataclass
class IpvsFlows(kernel_flows.Flows):
    """The matrix topology, its node loaded by `lbc.apply(..., "ipvs")` case by case."""

    lock: Path = Path()

    def load(self, backend: str, case: str) -> None:
        assert backend == BACKEND, backend
        if self.loaded == (backend, case):
            return
        self.loaded = None
        lbc.apply(kernel_flows.cluster(case), BACKEND, netns=self.node.name, lock_path=self.lock)
        self.loaded = (backend, case)

    def forget_connections(self) -> None:
        flush_conntrack(self.node.name)


class ForkedServers:
    """`netns.start_server` by fork: the server script runs in a copy of this process.

    Equivalent to `ip netns exec NS python -c SCRIPT ARGS...` (what netns.start_server
    runs), without a new interpreter: the child enters the namespace, then runs the
    script; it answers "ready" on a pipe. `close` kills every child by its pid.
    """

    def __init__(self) -> None:
        self.pids: list[int] = []

    def __enter__(self) -> ForkedServers:
        return self

    def __exit__(self, *exc: object) -> None:
        for pid in self.pids:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        self.pids.clear()

    def start(self, lab: netns.Lab, ns: netns.Netns, script_and_args: list[str], what: str) -> None:
        script, *argv = script_and_args
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: never returns
            try:
                os.close(read)
                sys.stdout = os.fdopen(write, "w")
                sys.argv = ["-c", *argv]
                with inside(ns.name):
                    exec(compile(script, "<netns server>", "exec"), {"__name__": "__main__"})
            except BaseException:
                traceback.print_exc()
            finally:
                os._exit(1)
        os.close(write)
        self.pids.append(pid)
        with os.fdopen(read) as ready:
            answered, _, _ = select.select([ready], [], [], SERVER_START_TIMEOUT)
            if not answered or ready.readline().strip() != "ready":
                raise netns.NetnsError(f"{what} in {ns.name} did not start")


def sysctl_here(ns: netns.Netns, key: str, value: str | int) -> None:
    """`Netns.sysctl` without a process: write /proc/sys with the namespace entered."""
    with inside(ns.name):
        Path("/proc/sys", key.replace(".", "/")).write_text(f"{value}\n")


@pytest.fixture(scope="module")
def flows(tmp_path_factory: pytest.TempPathFactory) -> Iterator[IpvsFlows]:
    """The matrix topology of the kernel tests, built once; lbc's objects deleted after.

    Built by tests/test_flows_kernel.py's `flow_topology`, with its servers forked and
    its sysctls written from here (new processes cost seconds under emulation).
    """
    netns.require(*kernel_flows.TOOLS, *TOOLS)
    with ForkedServers() as servers, ExitStack() as stack:
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(netns, "start_server", servers.start)
            patch.setattr(netns.Netns, "sysctl", sysctl_here)
            topology = stack.enter_context(kernel_flows.flow_topology())
        node = topology.node
        # Connection tracking whatever the rules use, as in the kernel tests.
        node.exec("nft", "-f", "/dev/stdin", input=kernel_flows.CONNTRACK_ON)
        clients = {a: InProcess(ns.name, ns.role) for a, ns in topology.clients.items()}
        lock = tmp_path_factory.mktemp("lock") / "lbc.lock"
        yield IpvsFlows(InProcess(node.name, node.role), clients, topology.gateways, lock=lock)
        lbc.delete(BACKEND, netns=node.name, lock_path=lock)
        assert node.exec("ipvsadm", "-S", "-n") == "", "lbc.delete left IPVS services"
        assert "lbc-ipvs" not in node.exec("nft", "list", "tables")


@pytest.mark.parametrize("flow", ROWS, ids=IDS)
def test_flow_on_ipvs(flows: IpvsFlows, flow: Flow) -> None:
    reason = refusal(flow.case)
    if reason is not None:
        pytest.skip(reason)
    kernel_flows.test_flow_on_the_kernel(flows, BACKEND, flow)


def test_every_row_is_here_once() -> None:
    assert sorted(ROWS, key=FLOWS.index) == list(FLOWS)
    assert len(set(IDS)) == len(IDS)


def test_forgetting_connections_empties_both_families(flows: IpvsFlows) -> None:
    """The in-process flush does what the kernel tests' `conntrack -F -f ipv4|ipv6` do."""
    pod = flows.clients[POD]
    for address in ("10.0.1.199", "fd00:10::1:199"):  # no service: forwarded, tracked
        pod.request(address, 80, 1, "udp", 0.1)
    listed = {f: flows.node.exec("conntrack", "-L", "-f", f) for f in ("ipv4", "ipv6")}
    assert all(POD in text or POD6 in text for text in listed.values()), listed
    flows.forget_connections()
    for family in ("ipv4", "ipv6"):
        assert flows.node.exec("conntrack", "-L", "-f", family) == "", family
