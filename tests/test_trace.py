"""The packet-flow matrix through the IR tracer, and `lbc explain`."""

from __future__ import annotations

from functools import cache
from pathlib import Path

import pytest
from click.testing import CliRunner

import lbc
from lbc.cli import main
from lbc.ir import Program
from lbc.ir.trace import Origin, Verdict, trace
from tests.flows import FLOWS, Flow

GOLDEN = Path(__file__).resolve().parent.parent / "golden"


@cache
def program(case: str) -> Program:
    return lbc.lower(lbc.load(GOLDEN / case / "cluster.toml"))


@pytest.mark.parametrize("flow", FLOWS, ids=[f.name for f in FLOWS])
def test_flow_through_the_ir(flow: Flow) -> None:
    result = trace(program(flow.case), flow.source, flow.dest, flow.port, flow.proto)
    if isinstance(flow.expect, str):
        assert result.verdict == flow.expect.lower(), result.steps
        assert not result.choices
        return
    assert result.verdict is Verdict.FORWARD, result.steps
    assert {c.address for c in result.choices} == flow.expect
    for choice in result.choices:
        hairpin = choice.address == flow.source
        assert choice.masquerade == (flow.masquerade or hairpin), (choice, result.steps)
    assert sum(c.share for c in result.choices) == pytest.approx(1.0)


def test_matrix_is_large_and_covers_every_golden_case_with_endpoints() -> None:
    assert len(FLOWS) >= 40
    assert len({f.name for f in FLOWS}) == len(FLOWS)
    covered = {f.case for f in FLOWS}
    cases = {p.name for p in GOLDEN.iterdir() if (p / "cluster.toml").exists()}
    assert covered == cases
    assert {str(f.expect) for f in FLOWS if isinstance(f.expect, str)} == {"REJECT", "DROP", "PASS"}


def test_weighted_shares_follow_weights() -> None:
    result = trace(program("weighted"), "10.244.9.9", "10.0.1.176", 80)
    shares = {c.address: c.share for c in result.choices}
    assert shares == pytest.approx({"10.244.1.7": 1 / 6, "10.244.2.3": 2 / 6, "10.244.3.6": 3 / 6})


def test_origin_can_be_overridden() -> None:
    p = program("external-traffic-local")
    as_pod = trace(p, "10.9.9.9", "198.51.100.20", 80, origin=Origin.POD)
    assert {c.address for c in as_pod.choices} == {"10.244.1.7", "10.244.2.3"}


def test_a_loopback_source_is_the_node_itself() -> None:
    # Under externalTrafficPolicy Local the node reaches every endpoint, masqueraded.
    p = program("external-traffic-local")
    for source, destination in (("127.0.0.1", "198.51.100.20"), ("127.0.0.2", "198.51.100.20")):
        result = trace(p, source, destination, 80)
        assert result.origin is Origin.NODE, result.steps
        assert {c.address for c in result.choices} == {"10.244.1.7", "10.244.2.3"}
        assert all(c.masquerade for c in result.choices)


def test_without_a_pod_cidr_cluster_ip_traffic_keeps_its_source() -> None:
    # Off-cluster masquerade needs the pod CIDR to tell pods apart; the backends then
    # mark nothing, and the IR says the same.
    cluster = lbc.loads(
        """
[node]
name = "node-1"
addresses = ["192.168.49.2"]
[[services]]
name = "web"
cluster_ips = ["10.0.1.10"]
ports = [{ port = 80 }]
endpoints = [{ ip = "10.244.1.7" }]
"""
    )
    result = trace(cluster, "198.18.0.5", "10.0.1.10", 80)
    assert result.origin is Origin.EXTERNAL
    assert [(c.address, c.masquerade) for c in result.choices] == [("10.244.1.7", False)]


def test_a_pool_of_weight_zero_endpoints_refuses_like_an_empty_one() -> None:
    cluster = lbc.loads(
        """
[node]
name = "node-1"
pod_cidrs = ["10.244.0.0/16"]
[[services]]
name = "web"
cluster_ips = ["10.0.1.10"]
ports = [{ port = 80 }]
endpoints = [{ ip = "10.244.1.7", weight = 0 }, { ip = "10.244.2.3", weight = 0 }]
"""
    )
    result = trace(cluster, "10.244.9.9", "10.0.1.10", 80)
    assert result.verdict is Verdict.REJECT and not result.choices, result.steps


def test_explain_prints_the_path() -> None:
    result = CliRunner().invoke(
        main,
        [
            "explain",
            str(GOLDEN / "load-balancer" / "cluster.toml"),
            "--from",
            "198.18.0.5",
            "--to",
            "198.51.100.10:443",
        ],
    )
    assert result.exit_code == 0, result.output
    assert "matches load-balancer frontend of default/public:https" in result.output
    assert "source not in 203.0.113.0/24: dropped" in result.output
    assert result.output.rstrip().endswith("verdict: drop")


def test_a_pool_says_which_endpoints_it_holds() -> None:
    hinted = trace(program("topology-hints"), "10.244.9.9", "10.0.1.189", 80)
    assert "(cluster-wide endpoints, narrowed by the hints for zone zone-a)" in hinted.steps[2]
    plain = trace(program("topology-hints"), "10.244.9.9", "10.0.1.190", 80)
    assert "(cluster-wide endpoints)" in plain.steps[2]
    local = trace(program("external-traffic-local"), "203.0.113.5", "192.168.49.2", 30082)
    assert "(this node's endpoints)" in local.steps[2]


def test_explain_rejects_a_bad_destination_without_traceback() -> None:
    result = CliRunner().invoke(
        main,
        [
            "explain",
            str(GOLDEN / "hostnames" / "cluster.toml"),
            "--from",
            "1.2.3.4",
            "--to",
            "10.0.1.175",
        ],
    )
    assert result.exit_code == 2
    assert "is not ADDRESS:PORT" in result.output
    assert "Traceback" not in result.output


def test_hairpin_masquerade_follows_where_the_backend_runs() -> None:
    """A backend on another node reaching its own cluster IP does so through its own
    node's rules: here it is not marked. One reaching this node's node port with
    externalTrafficPolicy Local (pod traffic to the cluster-wide pool) is."""
    from tests.test_nftables_render import PLACED

    p = lbc.lower(lbc.loads(PLACED))
    for source, expected in (("10.244.1.5", True), ("10.244.2.5", False), ("10.244.3.5", True)):
        result = trace(p, source, "10.0.1.10", 80)
        (own,) = [c for c in result.choices if c.address == source]
        assert own.masquerade is expected, result.steps
    result = trace(p, "10.244.2.6", "192.168.49.2", 30080, origin=Origin.POD)
    (own,) = [c for c in result.choices if c.address == "10.244.2.6"]
    assert own.masquerade, result.steps


def test_the_tracer_checks_its_arguments() -> None:
    hostnames = program("hostnames")
    assert lbc.trace(hostnames, "10.244.9.9", "10.0.1.175", 80, "TCP").verdict is Verdict.FORWARD
    # Any spelling of an address is read; the trace names it canonically.
    long_form = trace(hostnames, "10.244.9.9", "10.0.1.175", 80)
    assert long_form.steps[0].startswith("packet 10.244.9.9 -> 10.0.1.175:80/tcp")
    for args, message in [
        (("nope", "10.0.1.175", 80, "tcp"), "source 'nope' is not an IPv4 or IPv6 address"),
        (("1.2.3.4", "10.0.1", 80, "tcp"), "destination '10.0.1' is not"),
        (("1.2.3.4", "10.0.1.175", 70000, "tcp"), "port 70000 is not a port number"),
        (("1.2.3.4", "10.0.1.175", 0, "tcp"), "port 0 is not a port number"),
        (("1.2.3.4", "10.0.1.175", 80, "icmp"), "protocol 'icmp' is not one of tcp, udp, sctp"),
        (("fd00::1", "10.0.1.175", 80, "tcp"), "are of different IP families"),
        (("1.2.3.4", "10.0.1.175", 80, "tcp", "outside"), "origin 'outside' is not one of"),
    ]:
        with pytest.raises(lbc.UsageError, match=message):
            trace(hostnames, *args)  # type: ignore[arg-type]
    with pytest.raises(lbc.UsageError, match="takes a Program or a Cluster, not str"):
        trace("hostnames", "10.244.9.9", "10.0.1.175", 80)  # type: ignore[arg-type]


def test_an_origin_may_be_given_by_its_value() -> None:
    p = program("external-traffic-local")
    by_value = trace(p, "10.244.1.9", "192.168.49.2", 30082, origin="external")
    by_member = trace(p, "10.244.1.9", "192.168.49.2", 30082, origin=Origin.EXTERNAL)
    assert by_value.origin is Origin.EXTERNAL
    assert by_value == by_member
    assert by_value.pool is not None and by_value.pool.local_only, by_value.steps


def test_a_cluster_is_lowered_first() -> None:
    cluster = lbc.load(GOLDEN / "weighted" / "cluster.toml")
    assert trace(cluster, "10.244.9.9", "10.0.1.176", 80) == trace(
        program("weighted"), "10.244.9.9", "10.0.1.176", 80
    )


def test_explain_rejects_a_port_out_of_range() -> None:
    case = str(GOLDEN / "hostnames" / "cluster.toml")
    args = ["explain", case, "--from", "1.2.3.4", "--to", "10.0.1.175:65536"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2
    assert "port 65536 of '10.0.1.175:65536' is out of range 1-65535" in result.output
