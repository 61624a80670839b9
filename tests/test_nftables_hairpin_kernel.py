"""nftables hairpin masquerade on this machine's kernel, with real traffic.

nat postrouting marks `saddr . daddr` pairs of `hairpin-ips4` for masquerade: a
backend that reached itself through a service. An endpoint on the node's own address
(host network) puts `node . node` in that set, so the rule matches only DNATed
traffic (`ct status dnat`): otherwise every connection of the node to itself, on any
port, would be masqueraded, not only service traffic.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

import lbc
from tests import netns

pytestmark = pytest.mark.netns

PORT = 8080
HOST_VIP, POD_VIP = "10.0.1.190", "10.0.1.191"
OTHER_PORT = 9090  # a port of the node no service uses

# Listens on (laddr, lport), connects to (host, port) from (saddr, sport) and prints the
# peer its listener saw: whether the node's own connection was translated.
PROBE = r"""
import json, socket, sys

laddr, lport, host, port, saddr, sport = sys.argv[1:7]
server = socket.socket()
server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
server.bind((laddr, int(lport)))
server.listen(4)
server.settimeout(5)
client = socket.socket()
client.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
client.bind((saddr, int(sport)))
client.settimeout(5)
client.connect((host, int(port)))
conn, peer = server.accept()
print(json.dumps(list(peer)))
"""


def cluster() -> lbc.Cluster:
    """A service on a host-network endpoint (the node's address) and one on a pod."""
    pod = next(iter(netns.PODS.values()))
    return lbc.loads(
        f"""
[node]
name = "node-1"
addresses = ["{netns.NODE_ADDRESS}"]
pod_cidrs = ["10.244.0.0/16"]

[[services]]
name = "host"
cluster_ips = ["{HOST_VIP}"]
ports = [{{ name = "http", port = 80, target_port = {PORT} }}]
endpoints = [{{ ip = "{netns.NODE_ADDRESS}" }}]

[[services]]
name = "pod"
cluster_ips = ["{POD_VIP}"]
ports = [{{ name = "http", port = 80, target_port = {PORT} }}]
endpoints = [{{ ip = "{pod}" }}]
"""
    )


def seen(node: netns.Netns, listen: int, host: str, port: int, sport: int) -> tuple[str, int]:
    """The (address, port) a listener on the node's address sees for a connection the
    node makes from its address and `sport`."""
    node_address = netns.NODE_ADDRESS
    args = (node_address, str(listen), host, str(port), node_address, str(sport))
    address, peer_port = json.loads(node.exec("python3", "-c", PROBE, *args))
    return address, peer_port


@pytest.fixture(scope="module")
def seed() -> Iterator[netns.Seed]:
    netns.require("nft")
    with netns.seed_topology(pods6={}, ports=(PORT,)) as topology:
        yield topology


@pytest.fixture
def node(seed: netns.Seed, tmp_path: Path) -> Iterator[netns.Netns]:
    seed.node.ip("link", "set", "lo", "up")
    lbc.apply(cluster(), "nftables", netns=seed.node.name, lock_path=tmp_path / "lock")
    assert "hairpin-ips4" in seed.node.exec("nft", "list", "table", "inet", "lbc")
    yield seed.node
    lbc.delete("nftables", netns=seed.node.name, lock_path=tmp_path / "lock")


def test_the_nodes_own_connections_to_itself_keep_their_source(node: netns.Netns) -> None:
    """node -> node address, a port no service uses: untranslated (before the fix,
    `masquerade fully-random` gave it a new source port)."""
    for sport in (40001, 40002, 40003):
        assert seen(node, OTHER_PORT, netns.NODE_ADDRESS, OTHER_PORT, sport) == (
            netns.NODE_ADDRESS,
            sport,
        )


def test_a_host_network_endpoint_reaching_itself_is_masqueraded(node: netns.Netns) -> None:
    """node -> the host service's VIP -> DNAT to the node itself: masqueraded."""
    translated = [seen(node, PORT, HOST_VIP, 80, sport) for sport in (40011, 40012, 40013)]
    assert [port for _, port in translated] != [40011, 40012, 40013], translated


def test_a_pod_reaching_itself_is_still_masqueraded(seed: netns.Seed, node: netns.Netns) -> None:
    """The hairpin mark itself (a pod's own source is never masqueraded otherwise):
    the pod hears itself from the node's address on its link."""
    pod = next(iter(netns.PODS))
    result = seed.pods[pod].request(POD_VIP, 80, count=5, timeout=2.0)
    assert not result.errors, result
    assert set(result.sources) == {(pod, seed.gateways[pod])}, result.sources
