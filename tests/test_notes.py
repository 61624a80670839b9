"""`lbc.notes` and `lbc check`'s notes: topology hints that lowering does not follow."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

import lbc
from lbc.cli import main

GOLDEN = Path(__file__).resolve().parent.parent / "golden"

NODE = """
[node]
name = "node-1"
{zone}
addresses = ["192.168.49.2"]
pod_cidrs = ["10.244.0.0/16"]
"""


def cluster(endpoints: str, zone: str | None = "zone-a") -> lbc.Cluster:
    node = NODE.format(zone=f'zone = "{zone}"' if zone else "")
    return lbc.loads(
        node
        + f"""
[[services]]
name = "web"
cluster_ips = ["10.0.1.10"]
ports = [{{ port = 80 }}]
endpoints = [{endpoints}]
"""
    )


CASES = {
    "followed": (
        '{ ip = "10.244.1.7", for_zones = ["zone-a"] }, '
        '{ ip = "10.244.2.3", for_zones = ["zone-b"] }',
        "zone-a",
        None,
    ),
    "a-ready-endpoint-without-hints": (
        '{ ip = "10.244.1.7", for_zones = ["zone-a"] }, { ip = "10.244.2.3" }',
        "zone-a",
        "endpoints[1] (10.244.2.3) is ready and has no for_zones hint",
    ),
    "an-endpoint-without-hints-that-is-not-ready": (
        '{ ip = "10.244.1.7", for_zones = ["zone-a"] }, { ip = "10.244.2.3", ready = false }',
        "zone-a",
        None,
    ),
    "an-endpoint-without-hints-that-is-not-ready-and-none-for-this-zone": (
        '{ ip = "10.244.1.7", ready = false }, { ip = "10.244.2.3", for_zones = ["zone-b"] }',
        "zone-a",
        "no ready endpoint is hinted for this zone, zone-a",
    ),
    "hints-only-on-an-endpoint-that-is-not-ready": (
        '{ ip = "10.244.1.7", ready = false, for_zones = ["zone-b"] }, { ip = "10.244.2.3" }',
        "zone-a",
        None,
    ),
    "a-node-without-a-zone": (
        '{ ip = "10.244.1.7", for_zones = ["zone-a"] }',
        None,
        "for_zones hints need node.zone, which is not set",
    ),
    "no-hint-for-this-zone": (
        '{ ip = "10.244.1.7", for_zones = ["zone-b"] }, '
        '{ ip = "10.244.2.3", for_zones = ["zone-c"] }',
        "zone-a",
        "no ready endpoint is hinted for this zone, zone-a",
    ),
    "only-weight-0-for-this-zone": (
        '{ ip = "10.244.1.7", weight = 0, for_zones = ["zone-a"] }, '
        '{ ip = "10.244.2.3", for_zones = ["zone-b"] }',
        "zone-a",
        "the ready endpoints hinted for zone zone-a all have weight 0",
    ),
    "node-hints-for-another-node-and-zone-hints-followed": (
        '{ ip = "10.244.1.7", for_nodes = ["node-2"], for_zones = ["zone-a"] }, '
        '{ ip = "10.244.2.3", for_nodes = ["node-3"], for_zones = ["zone-b"] }',
        "zone-a",
        None,
    ),
    "only-node-hints-none-for-this-node": (
        '{ ip = "10.244.1.7", for_nodes = ["node-2"] }',
        "zone-a",
        "no ready endpoint is hinted for this node, node-1",
    ),
    "neither-node-nor-zone-hints-followed": (
        '{ ip = "10.244.1.7", for_nodes = ["node-2"], for_zones = ["zone-b"] }',
        "zone-a",
        "no ready endpoint is hinted for this node, node-1; "
        "no ready endpoint is hinted for this zone, zone-a",
    ),
}


@pytest.mark.parametrize("case", CASES)
def test_a_note_says_why_hints_are_not_followed(case: str) -> None:
    endpoints, zone, reason = CASES[case]
    found = lbc.notes(cluster(endpoints, zone))
    if reason is None:
        assert found == []
        return
    (note,) = found
    assert note.path == "services[0].endpoints"
    assert note.message == (
        f"topology hints not followed for IPv4: {reason}; every ready endpoint takes traffic"
    )


def _hinted_but_not_followed(c: lbc.Cluster) -> set[str]:
    """The services (namespace/name) lowering gave hints it did not follow, by the IR."""
    hinted = {
        f"{s.namespace}/{s.name}"
        for s in c.services
        if any(e.ready and (e.for_zones or e.for_nodes) for e in s.endpoints)
    }
    followed = {p.service.rsplit(":", 1)[0] for p in lbc.lower(c).pools if p.hints}
    return hinted - followed


@pytest.mark.parametrize(
    "c",
    [cluster(*CASES[name][:2]) for name in CASES]
    + [lbc.load(GOLDEN / "topology-hints" / "cluster.toml")],
    ids=[*CASES, "golden-topology-hints"],
)
def test_notes_agree_with_what_lowering_follows(c: lbc.Cluster) -> None:
    noted = set()
    for note in lbc.notes(c):
        index = int(note.path.removeprefix("services[").partition("]")[0])
        noted.add(f"{c.services[index].namespace}/{c.services[index].name}")
    assert noted == _hinted_but_not_followed(c)


def test_check_prints_notes_with_their_lines() -> None:
    path = GOLDEN / "topology-hints" / "cluster.toml"
    result = CliRunner().invoke(main, ["check", str(path)])
    assert result.exit_code == 0
    lines = result.stdout.splitlines()
    assert lines[0] == f"{path}: ok (3 services)"
    assert lines[1:] == [
        f"  note: {path}:26: services[1].endpoints: topology hints not followed for IPv4: "
        "endpoints[1] (10.244.2.3) is ready and has no for_zones hint; every ready endpoint "
        "takes traffic"
    ]


def test_check_of_a_file_without_notes_prints_only_ok() -> None:
    path = GOLDEN / "hostnames" / "cluster.toml"
    result = CliRunner().invoke(main, ["check", str(path)])
    assert (result.exit_code, result.stdout) == (0, f"{path}: ok (1 service)\n")


def test_no_note_on_hints_of_a_service_without_a_cluster_wide_pool() -> None:
    # Under internal traffic policy Local, a service without external addresses sends
    # only to this node's endpoints: no pool follows hints, and none ignores them (as
    # kube-proxy, which reads hints only for its cluster-wide endpoints).
    hinted = '{ ip = "10.244.1.7", for_zones = ["zone-b"] }'
    local = cluster(hinted).model_copy(deep=True)
    svc = local.services[0].model_copy(update={"internal_traffic_policy": "Local"})
    local = lbc.validate(local.model_copy(update={"services": [svc]}))
    assert [p.local_only for p in lbc.lower(local).pools] == [True]
    assert lbc.notes(local) == []
    # With a node port it has one again, for external traffic, and the note is due.
    port = svc.ports[0].model_copy(update={"node_port": 30080})
    exposed = svc.model_copy(update={"type": "NodePort", "ports": [port]})
    exposed_cluster = lbc.validate(local.model_copy(update={"services": [exposed]}))
    assert [p.local_only for p in lbc.lower(exposed_cluster).pools] == [False, True]
    assert [n.message.split(":")[0] for n in lbc.notes(exposed_cluster)] == [
        "topology hints not followed for IPv4"
    ]
