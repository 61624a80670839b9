"""The benchmark's synthetic cluster: valid, compilable, deterministic, and as large as asked."""

from __future__ import annotations

import ipaddress

import pytest

import lbc
from bench.gen import NODE, POD_CIDR, SERVICE_CIDR, generate, main
from tests.golden import builtin_backends


def test_output_loads_and_counts_are_right() -> None:
    text, counts = generate(250, 4, seed=3, external=True)
    cluster = lbc.loads(text)
    assert len(cluster.services) == counts.services == 250
    assert sum(len(s.ports) for s in cluster.services) == counts.ports
    assert 250 < counts.ports < 500  # one or two ports each
    assert all(len(s.endpoints) == 4 for s in cluster.services)
    assert counts.endpoints == 1000
    external = [s for s in cluster.services if s.type != "ClusterIP"]
    assert len(external) == counts.external == 2  # services 50 and 150 of 250
    assert {s.type for s in external} == {"NodePort", "LoadBalancer"}


def test_addresses_are_realistic() -> None:
    cluster = lbc.loads(generate(300, 5, seed=1)[0])
    cluster_ips = [ip for s in cluster.services for ip in s.cluster_ips]
    assert len(set(cluster_ips)) == len(cluster_ips)
    assert all(ip in SERVICE_CIDR and ip not in POD_CIDR for ip in cluster_ips)
    endpoints = [e for s in cluster.services for e in s.endpoints]
    assert all(e.ip in POD_CIDR for e in endpoints)
    # every node owns a /24 of the pod CIDR, so an address says which node it is on
    assert all(int(e.ip) >> 8 == int(_node_block(e.node)) >> 8 for e in endpoints)
    local = sum(e.node == NODE for e in endpoints)
    assert 0 < local < len(endpoints)
    assert any(not e.ready for e in endpoints)
    assert len({s.namespace for s in cluster.services}) > 10


def _node_block(node: str | None) -> ipaddress.IPv4Address:
    assert node is not None
    return POD_CIDR.network_address + int(node.removeprefix("node-")) * 256


@pytest.mark.parametrize("backend", sorted(builtin_backends()))
def test_output_compiles(backend: str) -> None:
    cluster = lbc.loads(generate(40, 3, seed=2, external=True)[0])
    assert lbc.compile(cluster, backend=builtin_backends()[backend]).text()


def test_deterministic_and_seedable() -> None:
    assert generate(30, 3, seed=5) == generate(30, 3, seed=5)
    assert generate(30, 3, seed=5)[0] != generate(30, 3, seed=6)[0]


def test_command_line(capsys: pytest.CaptureFixture[str]) -> None:
    main(["--services", "7", "--endpoints", "2", "--seed", "4"])
    out, err = capsys.readouterr()
    assert out == generate(7, 2, seed=4)[0]
    assert "7 services" in err
