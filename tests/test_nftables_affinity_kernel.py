"""nftables session affinity on this machine's kernel, with real traffic.

- A full affinity set costs new clients their stickiness, never their connection: the
  kernel abandons a rule whose `update` fails, so the DNAT is a rule of its own (in
  the backend's affinity chain, as kube-proxy's endpoint chains do), and the pool's
  `numgen` rule has chosen that chain before, so the shares stay exact.
- A service's affinity timeout is part of its sets' names: changing it adds new sets
  and deletes the old ones of that service alone, through a session or a one-shot
  apply, and every other service keeps the clients it remembers.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

import lbc
from tests import netns
from tests.test_iptables_kernel import assert_shares

pytestmark = pytest.mark.netns

PORT = 8080
SET_SIZE = 65535  # what nft gives a dynamic set without a size
A_VIP, B_VIP = "10.0.1.179", "10.0.1.180"


def cluster(a_timeout: int = 600, b_timeout: int = 600) -> lbc.Cluster:
    """Two ClientIP services, a and b, both on the seed's first two pods."""
    pods = list(netns.PODS.values())[:2]
    endpoints = ", ".join(f'{{ ip = "{p}" }}' for p in pods)
    text = '[node]\nname = "node-1"\naddresses = ["192.168.49.2"]\npod_cidrs = ["10.244.0.0/16"]\n'
    for name, vip, timeout in (("a", A_VIP, a_timeout), ("b", B_VIP, b_timeout)):
        text += (
            f'\n[[services]]\nname = "{name}"\ncluster_ips = ["{vip}"]\n'
            f'session_affinity = "ClientIP"\nsession_affinity_timeout = {timeout}\n'
            f'ports = [{{ name = "http", port = 80, target_port = {PORT} }}]\n'
            f"endpoints = [{endpoints}]\n"
        )
    return lbc.loads(text)


def affinity_sets(node: netns.Netns) -> dict[str, list[str]]:
    """Every affinity set of `inet lbc`, by name, with the addresses it holds."""
    listed = json.loads(node.exec("nft", "-j", "list", "sets", "inet"))["nftables"]
    out: dict[str, list[str]] = {}
    for obj in listed:
        body = obj.get("set")
        if body is None or not body["name"].startswith("affinity-"):
            continue
        elements = []
        for e in body.get("elem", []):
            value = e["elem"]["val"] if isinstance(e, dict) and "elem" in e else e
            elements.append(str(value))
        out[body["name"]] = elements
    return out


def of_service(sets: dict[str, list[str]], service: str) -> dict[str, list[str]]:
    return {name: e for name, e in sets.items() if f"-default/{service}/" in name}


def fill(node: netns.Netns, set_name: str, count: int = SET_SIZE) -> None:
    """Add `count` made-up clients (10.100.0.0 on) to an affinity set: full at 65535."""
    addresses = [f"10.{100 + i // 65536}.{(i >> 8) & 255}.{i & 255}" for i in range(count)]
    lines = [
        f"add element inet lbc {set_name} {{ {', '.join(addresses[i : i + 4096])} }}"
        for i in range(0, count, 4096)
    ]
    node.exec("nft", "-f", "/dev/stdin", input="\n".join(lines) + "\n", timeout=60)


@pytest.fixture(scope="module")
def seed() -> Iterator[netns.Seed]:
    netns.require("nft")
    with netns.seed_topology(pods6={}, ports=(PORT,)) as topology:
        yield topology


@pytest.fixture
def node(seed: netns.Seed, tmp_path: Path) -> Iterator[netns.Netns]:
    """The seed's node, without lbc's table afterwards."""
    yield seed.node
    lbc.delete("nftables", netns=seed.node.name, lock_path=tmp_path / "cleanup")


def test_full_affinity_sets_still_forward_new_clients_with_exact_shares(
    seed: netns.Seed, node: netns.Netns, tmp_path: Path
) -> None:
    """Both of a's sets full: every new connection still reaches a pod (before the fix
    every one was refused), half to each, and the client is remembered nowhere."""
    lbc.apply(cluster(), "nftables", netns=node.name, lock_path=tmp_path / "lock")
    sets = of_service(affinity_sets(node), "a")
    assert len(sets) == 2
    for name in sets:
        fill(node, name)
    with pytest.raises(netns.NetnsError):  # the kernel holds no more than the size
        node.exec("nft", "add", "element", "inet", "lbc", next(iter(sets)), "{ 10.99.0.1 }")
    result = seed.client.request(A_VIP, 80, count=200, timeout=2.0)
    print(f"\n  affinity sets full, client -> {A_VIP}:80 x200: {result}")
    assert not result.errors, result
    # Never remembered, each connection is a new choice: the shares are the pool's.
    pods = [seed.pod_named(a) for a in list(netns.PODS.values())[:2]]
    assert_shares("full affinity sets", result.names, dict.fromkeys(pods, 1))
    after = of_service(affinity_sets(node), "a")
    assert all(netns.CLIENT_ADDRESS not in e and len(e) == SET_SIZE for e in after.values())


def test_one_full_set_keeps_the_other_backend_sticky(
    seed: netns.Seed, node: netns.Netns, tmp_path: Path
) -> None:
    """Only a full set loses stickiness: with the first backend's set full, a client
    that lands on the second stays there."""
    lbc.apply(cluster(), "nftables", netns=node.name, lock_path=tmp_path / "lock")
    first = netns.PODS[next(iter(netns.PODS))]
    (full,) = [n for n in of_service(affinity_sets(node), "a") if f"__{first}/" in n]
    fill(node, full)
    result = seed.client.request(A_VIP, 80, count=40, timeout=2.0)
    assert not result.errors, result
    # Connections go to the first pod, unremembered, until one lands on the second;
    # from then on every one does.
    second = seed.pod_named(list(netns.PODS.values())[1])
    assert result.names[second] >= 1
    remembered = {n: e for n, e in of_service(affinity_sets(node), "a").items() if n != full}
    assert [netns.CLIENT_ADDRESS] in remembered.values()


@pytest.mark.parametrize("way", ["session", "one-shot"])
def test_a_timeout_change_keeps_other_services_clients(
    seed: netns.Seed, node: netns.Netns, tmp_path: Path, way: str
) -> None:
    """b remembers the client; a's timeout changes; b still remembers it, and a's new
    sets carry the new timeout (the change went by service, not by a whole new table)."""
    lock = tmp_path / "lock"
    session = lbc.Session("nftables", netns=node.name, lock_path=lock)
    if way == "session":
        session.apply(cluster())
    else:
        lbc.apply(cluster(), "nftables", netns=node.name, lock_path=lock)
    result = seed.client.request(B_VIP, 80, count=3, timeout=2.0)
    assert not result.errors and len(result.names) == 1, result
    b_before = of_service(affinity_sets(node), "b")
    assert sorted(map(len, b_before.values())) == [0, 1], b_before
    a_before = set(of_service(affinity_sets(node), "a"))

    changed = cluster(a_timeout=1200)
    if way == "session":
        applied = session.apply(changed)
    else:
        applied = lbc.apply(changed, "nftables", netns=node.name, lock_path=lock)
    assert applied.applied
    touched = {c.key.split(" ", 1)[1] for c in applied.plan.changes}
    assert all("-default/a/" in name for name in touched), touched

    assert of_service(affinity_sets(node), "b") == b_before, "b's client was forgotten"
    a_after = of_service(affinity_sets(node), "a")
    assert len(a_after) == 2 and not set(a_after) & a_before
    listing = node.exec("nft", "list", "table", "inet", "lbc")
    assert listing.count("timeout 20m") == 2 and listing.count("timeout 10m") == 2
    assert lbc.verify(changed, "nftables", netns=node.name).in_sync
    # a still works, and sticks.
    again = seed.client.request(A_VIP, 80, count=5, timeout=2.0)
    assert not again.errors and len(again.names) == 1, again
