"""Stale UDP flows after `lbc apply`, on this machine's kernel (iptables and nftables).

A UDP client that keeps its source port (as DNS resolvers do) rides one conntrack
entry for as long as it keeps sending. These tests prove on the seed topology that:

- when the endpoint a flow was translated to leaves the service, apply deletes the
  entry and the client's next datagram goes to an endpoint still in the service;
- when a service that the rules did not handle gets endpoints, the untranslated entry
  of a flow that was passing by is deleted and the next datagram reaches an endpoint;
- with `clear_stale_udp=False` both flows stay where they were: the problem the
  cleanup solves is real on this kernel, not only in theory.
"""

from __future__ import annotations

import ipaddress
import json
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

import lbc
from lbc.apply import conntrack
from lbc.apply.conntrack import after_apply
from tests import netns
from tests.test_flows_kernel import CONNTRACK_ON

pytestmark = pytest.mark.netns

BACKENDS = ("iptables", "nftables")
TOOLS = ("iptables-restore", "ip6tables-restore", "nft", "conntrack")
VIPS = {4: "10.0.1.175", 6: "fd00:10::1:175"}
PORT = 53
# Each test sends from its own source port, so no two ever share a flow.
SOURCE_PORTS = iter(range(40000, 41000))

# One datagram from (source, sport) to host:port; prints the answering pod's name.
UDP_FROM = r"""
import socket, sys

host, port, source, sport, timeout = sys.argv[1:6]
family = socket.AF_INET6 if ":" in host else socket.AF_INET
sock = socket.socket(family, socket.SOCK_DGRAM)
sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
sock.bind((source, int(sport)))
sock.settimeout(float(timeout))
sock.sendto(b"?\n", (host, int(port)))
try:
    print(sock.recv(512).decode().split()[0])
except TimeoutError:
    print("timeout")
"""


def config(family: int, pods: dict[str, str]) -> lbc.Cluster:
    """One UDP service (53 -> 9376) in `family` whose endpoints are `pods`' addresses."""
    endpoints = ", ".join(f'{{ ip = "{address}" }}' for address in pods.values())
    return lbc.loads(
        f"""
[node]
name = "node-1"
addresses = ["{netns.NODE_ADDRESS}", "{netns.NODE_ADDRESS6}"]
pod_cidrs = ["10.244.0.0/16", "fd00:244::/64"]

[[services]]
name = "dns"
cluster_ips = ["{VIPS[family]}"]
ports = [{{ name = "dns", protocol = "UDP", port = {PORT}, target_port = {netns.POD_PORT} }}]
endpoints = [{endpoints}]
"""
    )


@pytest.fixture(scope="module")
def seed() -> Iterator[netns.Seed]:
    netns.require(*TOOLS)
    with netns.seed_topology() as topology:
        # A namespace tracks connections only once some rule needs it; a real node's
        # always does. This table (not lbc's: apply and delete leave it be) makes sure,
        # also while lbc has no rules loaded.
        topology.node.exec("nft", "-f", "/dev/stdin", input=CONNTRACK_ON)
        yield topology


@pytest.fixture
def lock(seed: netns.Seed, tmp_path: Path) -> Iterator[Path]:
    """The lock file for this test's applies; lbc's objects are deleted again after it.

    The node's conntrack table starts empty: no test sees another's flows.
    """
    for family in ("ipv4", "ipv6"):
        seed.node.exec("conntrack", "-F", "-f", family)
    path = tmp_path / "lock"
    yield path
    for backend in BACKENDS:
        lbc.delete(backend, netns=seed.node.name, lock_path=path)


def pods_of(seed: netns.Seed, family: int) -> dict[str, str]:
    return dict(seed.addresses if family == 4 else seed.addresses6)


def client_address(family: int) -> str:
    return netns.CLIENT_ADDRESS if family == 4 else netns.CLIENT_ADDRESS6


def ask(seed: netns.Seed, family: int, sport: int) -> str:
    """The pod that answers a datagram from the client's `sport` to the VIP, or "timeout"."""
    out = seed.client.exec(
        sys.executable,
        "-c",
        UDP_FROM,
        VIPS[family],
        str(PORT),
        client_address(family),
        str(sport),
        "1.0",
    )
    return out.strip()


@pytest.mark.parametrize("family", [4, 6])
@pytest.mark.parametrize("clear", [True, False], ids=["cleared", "kept"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_a_flow_leaves_the_endpoint_that_left(
    seed: netns.Seed, lock: Path, backend: str, clear: bool, family: int
) -> None:
    node, sport = seed.node.name, next(SOURCE_PORTS)
    pods = pods_of(seed, family)
    lbc.apply(config(family, pods), backend, netns=node, lock_path=lock)
    first = ask(seed, family, sport)
    assert first in pods, first
    assert ask(seed, family, sport) == first  # one flow, one endpoint

    rest = {name: address for name, address in pods.items() if name != first}
    result = lbc.apply(
        config(family, rest), backend, netns=node, lock_path=lock, clear_stale_udp=clear
    )
    after = ask(seed, family, sport)
    if clear:
        (gone,) = result.cleared
        assert gone.reply_source == (ipaddress.ip_address(pods[first]), netns.POD_PORT)
        assert gone.source == (ipaddress.ip_address(client_address(family)), sport)
        assert "1 stale UDP flow cleared" in result.summary()
        assert after in rest, after
    else:
        assert result.cleared == ()
        assert after == first, "the kernel no longer keeps stale UDP flows: revisit the test"


@pytest.mark.parametrize("family", [4, 6])
@pytest.mark.parametrize("clear", [True, False], ids=["cleared", "kept"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_a_flow_passing_by_reaches_a_service_that_appears(
    seed: netns.Seed, lock: Path, backend: str, clear: bool, family: int
) -> None:
    node, sport = seed.node.name, next(SOURCE_PORTS)
    # No rules yet: the node forwards the datagram upstream (nobody answers) and tracks it.
    assert ask(seed, family, sport) == "timeout"
    pods = pods_of(seed, family)
    result = lbc.apply(
        config(family, pods), backend, netns=node, lock_path=lock, clear_stale_udp=clear
    )
    after = ask(seed, family, sport)
    if clear:
        (passing,) = result.cleared
        assert passing.reply_source == (ipaddress.ip_address(VIPS[family]), PORT)
        assert after in pods, after
    else:
        assert after == "timeout"


@pytest.mark.parametrize("backend", BACKENDS)
def test_flows_of_other_addresses_are_left_alone(
    seed: netns.Seed, lock: Path, backend: str
) -> None:
    # A flow to an address no service has stays tracked: it is not lbc's.
    node, sport = seed.node.name, next(SOURCE_PORTS)
    stranger = "10.0.9.9"
    out = seed.client.exec(
        sys.executable,
        "-c",
        UDP_FROM,
        stranger,
        str(PORT),
        netns.CLIENT_ADDRESS,
        str(sport),
        "0.3",
    )
    assert out.strip() == "timeout"
    result = lbc.apply(config(4, pods_of(seed, 4)), backend, netns=node, lock_path=lock)
    assert result.cleared == ()
    tracked = seed.node.exec("conntrack", "-L", "-p", "udp", "--orig-dst", stranger, check=False)
    assert f"sport={sport}" in tracked, tracked


def session_with_a_flow(
    seed: netns.Seed, lock: Path, backend: str
) -> tuple[lbc.Session, int, dict[str, str], str]:
    """A session that applied the service, a source port, the pods, and the pod the
    flow from that port reached."""
    sport = next(SOURCE_PORTS)
    pods = pods_of(seed, 4)
    session = lbc.Session(backend, netns=seed.node.name, lock_path=lock)
    session.apply(config(4, pods))
    first = ask(seed, 4, sport)
    assert first in pods, first
    return session, sport, pods, first


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_session_clears_the_flows_of_the_services_it_changes(
    seed: netns.Seed, lock: Path, backend: str
) -> None:
    session, sport, pods, first = session_with_a_flow(seed, lock, backend)
    rest = {name: address for name, address in pods.items() if name != first}
    result = session.apply(config(4, rest))
    assert [entry.reply_source[0] for entry in result.cleared] == [
        ipaddress.ip_address(pods[first])
    ]
    assert ask(seed, 4, sport) in rest
    # Nothing changed, nothing to look at: an unchanged cluster clears nothing.
    assert session.apply(config(4, rest)).cleared == ()


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_session_clears_the_flows_of_a_service_it_removes(
    seed: netns.Seed, lock: Path, backend: str
) -> None:
    session, sport, pods, _ = session_with_a_flow(seed, lock, backend)
    empty = config(4, pods).model_copy(update={"services": []})
    result = session.apply(empty)
    assert [entry.source[1] for entry in result.cleared] == [sport]
    # No rules: the datagram is forwarded upstream untranslated, not to the pod.
    assert ask(seed, 4, sport) == "timeout"


def test_a_cleanup_that_fails_is_a_warning_and_the_rules_stay(seed: netns.Seed, lock: Path) -> None:
    # The program is applied to the node; its cleanup looks in a namespace that does
    # not exist (as if conntrack could not be read there).
    program = lbc.lower(config(4, pods_of(seed, 4)))
    result = lbc.apply(program, "nftables", netns=seed.node.name, lock_path=lock)
    assert result.applied and not result.warnings
    missing = f"{seed.node.name}-missing"
    after = after_apply(result, program, missing)
    (warning,) = after.warnings
    assert warning.startswith("cannot clear stale UDP flows from the conntrack table: ")
    assert after.cleared == () and after.applied


@pytest.mark.parametrize("family", [4, 6])
def test_many_ports_are_read_in_one_dump_of_every_udp_flow(
    seed: netns.Seed, lock: Path, family: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Past PORTS_UP_TO distinct ports, one dump of the whole UDP table replaces the
    # dumps the kernel filters by port: forced here with a limit of 0.
    monkeypatch.setattr(conntrack, "PORTS_UP_TO", 0)
    node, sport = seed.node.name, next(SOURCE_PORTS)
    pods = pods_of(seed, family)
    lbc.apply(config(family, pods), "nftables", netns=node, lock_path=lock)
    first = ask(seed, family, sport)
    rest = {name: address for name, address in pods.items() if name != first}
    result = lbc.apply(config(family, rest), "nftables", netns=node, lock_path=lock)
    assert [entry.reply_source[0] for entry in result.cleared] == [
        ipaddress.ip_address(pods[first])
    ]
    assert ask(seed, family, sport) in rest


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_one_shot_apply_clears_the_flows_of_a_service_the_last_one_served(
    seed: netns.Seed, lock: Path, backend: str
) -> None:
    # The UDP frontends each apply served are kept beside the lock file, per namespace.
    sport = next(SOURCE_PORTS)
    pods = pods_of(seed, 4)
    lbc.apply(config(4, pods), backend, netns=seed.node.name, lock_path=lock)
    (record,) = lock.parent.glob(f"{lock.name}.udp.netns-*.json")
    assert json.loads(record.read_text()) == [[VIPS[4], PORT]]
    assert ask(seed, 4, sport) in pods
    empty = config(4, pods).model_copy(update={"services": []})
    result = lbc.apply(empty, backend, netns=seed.node.name, lock_path=lock)
    assert [entry.source[1] for entry in result.cleared] == [sport]
    assert json.loads(record.read_text()) == []
    assert ask(seed, 4, sport) == "timeout"


def test_a_session_whose_cleanup_failed_checks_every_service_on_its_next_apply(
    seed: netns.Seed, lock: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    session, sport, pods, first = session_with_a_flow(seed, lock, "nftables")
    rest = {name: address for name, address in pods.items() if name != first}

    def broken(*args: object) -> list[conntrack.Tracked]:
        raise lbc.ApplyError("conntrack is unreachable")

    with monkeypatch.context() as patch:
        patch.setattr(conntrack, "clear_stale", broken)
        failed = session.apply(config(4, rest))
    assert failed.applied and failed.warnings == ("conntrack is unreachable",)
    assert ask(seed, 4, sport) == first  # the stale flow is still there
    # Nothing changed since, yet the session looks again, at every service.
    again = session.apply(config(4, rest))
    assert not again.applied and not again.warnings
    assert [entry.source[1] for entry in again.cleared] == [sport]
    assert ask(seed, 4, sport) in rest
    assert session.apply(config(4, rest)).cleared == ()


def for_zone(cluster: lbc.Cluster, zone: str) -> lbc.Cluster:
    """`cluster` on a node in another topology zone: a change of node for a session."""
    return cluster.model_copy(update={"node": cluster.node.model_copy(update={"zone": zone})})


def no_services(cluster: lbc.Cluster) -> lbc.Cluster:
    return cluster.model_copy(update={"services": []})


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_session_clears_the_flows_of_a_service_removed_as_the_node_changes(
    seed: netns.Seed, lock: Path, backend: str
) -> None:
    # A change of node lowers every service again; the ones gone are still looked at.
    session, sport, pods, _ = session_with_a_flow(seed, lock, backend)
    result = session.apply(no_services(for_zone(config(4, pods), "zone-b")))
    assert [entry.source[1] for entry in result.cleared] == [sport]
    assert ask(seed, 4, sport) == "timeout"


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_dry_run_for_another_node_leaves_the_session_as_it_was(
    seed: netns.Seed, lock: Path, backend: str
) -> None:
    session, sport, pods, first = session_with_a_flow(seed, lock, backend)
    planned = session.apply(for_zone(config(4, pods), "zone-b"), dry_run=True)
    assert planned.cleared == ()
    assert ask(seed, 4, sport) == first
    # The session still knows the service it applied, so removing it clears its flow.
    result = session.apply(no_services(for_zone(config(4, pods), "zone-b")))
    assert [entry.source[1] for entry in result.cleared] == [sport]
    assert ask(seed, 4, sport) == "timeout"


def test_a_session_whose_cleanup_failed_looks_again_at_the_services_it_removed(
    seed: netns.Seed, lock: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    session, sport, pods, first = session_with_a_flow(seed, lock, "nftables")

    def broken(*args: object) -> list[conntrack.Tracked]:
        raise lbc.ApplyError("conntrack is unreachable")

    empty = no_services(config(4, pods))
    with monkeypatch.context() as patch:
        patch.setattr(conntrack, "clear_stale", broken)
        failed = session.apply(empty)
    assert failed.applied and failed.warnings == ("conntrack is unreachable",)
    assert ask(seed, 4, sport) == first  # the flow outlives the rules
    again = session.apply(empty)
    assert not again.applied and not again.warnings
    assert [entry.source[1] for entry in again.cleared] == [sport]
    assert ask(seed, 4, sport) == "timeout"
    # Looked at once it worked: nothing left to look at.
    assert session.apply(empty).cleared == ()


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_new_session_clears_the_flows_of_a_service_the_last_session_served(
    seed: netns.Seed, lock: Path, backend: str
) -> None:
    # `lbc watch` restarted (an upgrade, a crash) after the file lost a UDP service: the
    # new session never applied it, yet its flows are stale all the same.
    _, sport, pods, _ = session_with_a_flow(seed, lock, backend)
    restarted = lbc.Session(backend, netns=seed.node.name, lock_path=lock)
    result = restarted.apply(no_services(config(4, pods)))
    assert [entry.source[1] for entry in result.cleared] == [sport]
    assert ask(seed, 4, sport) == "timeout"


@pytest.mark.parametrize("backend", BACKENDS)
def test_sessions_and_one_shot_applies_know_what_the_other_served(
    seed: netns.Seed, lock: Path, backend: str
) -> None:
    pods = pods_of(seed, 4)
    sport = next(SOURCE_PORTS)
    lbc.apply(config(4, pods), backend, netns=seed.node.name, lock_path=lock)
    assert ask(seed, 4, sport) in pods
    session = lbc.Session(backend, netns=seed.node.name, lock_path=lock)
    result = session.apply(no_services(config(4, pods)))
    assert [entry.source[1] for entry in result.cleared] == [sport]
    assert ask(seed, 4, sport) == "timeout"

    sport = next(SOURCE_PORTS)
    session.apply(config(4, pods))
    assert ask(seed, 4, sport) in pods
    result = lbc.apply(no_services(config(4, pods)), backend, netns=seed.node.name, lock_path=lock)
    assert [entry.source[1] for entry in result.cleared] == [sport]
    assert ask(seed, 4, sport) == "timeout"


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_failed_apply_for_another_node_leaves_the_session_as_it_was(
    seed: netns.Seed, lock: Path, backend: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    session, sport, pods, first = session_with_a_flow(seed, lock, backend)

    def refused(*args: object) -> None:
        raise lbc.ApplyError("the kernel refused the transaction")

    moved = no_services(for_zone(config(4, pods), "zone-b"))
    with monkeypatch.context() as patch:
        patch.setattr(session.engine.kernel, "commit", refused)
        with pytest.raises(lbc.ApplyError, match="refused"):
            session.apply(moved)
    assert ask(seed, 4, sport) == first
    # The session still knows the service it applied, so the retry clears its flow.
    result = session.apply(moved)
    assert [entry.source[1] for entry in result.cleared] == [sport]
    assert ask(seed, 4, sport) == "timeout"


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_session_stops_recording_the_frontends_it_no_longer_serves(
    seed: netns.Seed, lock: Path, backend: str
) -> None:
    # Else a restarted session would clear the flows of an address lbc left long ago.
    session, _, pods, _ = session_with_a_flow(seed, lock, backend)
    (record,) = lock.parent.glob(f"{lock.name}.udp.netns-*.json")
    assert json.loads(record.read_text()) == [[VIPS[4], PORT]]
    session.apply(no_services(config(4, pods)))
    assert json.loads(record.read_text()) == []
