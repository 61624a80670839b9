"""Lowering decides Service semantics once, for every backend."""

from __future__ import annotations

import pytest

import lbc
from lbc.compiler.lower import _backend
from lbc.ir import Empty, Kind, Masquerade, Program
from lbc.ir.nodes import Backend

NODE = """
[node]
name = "node-1"
addresses = ["192.168.49.2", "fd00:49::2"]
pod_cidrs = ["10.244.0.0/16", "fd00:244::/64"]
"""


def program(services: str, node: str = NODE) -> Program:
    return lbc.lower(lbc.loads(node + services))


def svc(extra: str = "", endpoints: str = "") -> str:
    return f"""
[[services]]
name = "s"
cluster_ips = ["10.0.0.10"]
ports = [{{ name = "p", port = 80, target_port = 8080, node_port = 30080 }}]
type = "NodePort"
{extra}
endpoints = [{endpoints}]
"""


def addresses(p: Program, pool_id: str) -> list[str]:
    return [b.address for b in p.pool_index()[pool_id].active]


def frontend(p: Program, kind: Kind) -> lbc.ir.Frontend:
    (f,) = [f for f in p.frontends if f.kind is kind]
    return f


def test_ready_endpoints_win_over_terminating_ones() -> None:
    p = program(
        svc(
            endpoints="""
        { ip = "10.244.1.1" },
        { ip = "10.244.1.2", ready = false, serving = true, terminating = true },
        { ip = "10.244.1.3", ready = false },
    """
        )
    )
    assert addresses(p, frontend(p, Kind.CLUSTER_IP).pool) == ["10.244.1.1"]


def test_ready_terminating_endpoints_count_as_ready() -> None:
    # kube-proxy looks at `ready` alone: with publishNotReadyAddresses a terminating
    # pod stays ready, and it keeps taking traffic beside the other ready ones.
    p = program(
        svc(
            endpoints="""
        { ip = "10.244.1.1" },
        { ip = "10.244.1.2", ready = true, terminating = true },
        { ip = "10.244.1.3", ready = false, serving = true, terminating = true },
        { ip = "10.244.1.4", ready = true, serving = false },
    """
        )
    )
    pool = p.pool_index()[frontend(p, Kind.CLUSTER_IP).pool]
    assert [(b.address, b.terminating) for b in pool.backends] == [
        ("10.244.1.1", False),
        ("10.244.1.2", True),
        ("10.244.1.4", False),  # ready though not serving (publishNotReadyAddresses)
    ]


def test_serving_terminating_endpoints_are_the_fallback() -> None:
    p = program(
        svc(
            endpoints="""
        { ip = "10.244.1.2", ready = false, serving = true, terminating = true },
        { ip = "10.244.1.4", ready = false, serving = false, terminating = true },
        { ip = "10.244.1.3", ready = false },
    """
        )
    )
    pool = p.pool_index()[frontend(p, Kind.CLUSTER_IP).pool]
    assert [b.address for b in pool.backends] == ["10.244.1.2"]
    assert pool.backends[0].terminating


def test_serving_endpoints_neither_ready_nor_terminating_take_no_traffic() -> None:
    # Not ready and not terminating: starting up or failing its probe, never a fallback.
    p = program(svc(endpoints='{ ip = "10.244.1.1", ready = false, serving = true }'))
    pool = p.pool_index()[frontend(p, Kind.CLUSTER_IP).pool]
    assert not pool.backends and pool.when_empty is Empty.REJECT


def test_a_terminating_endpoint_without_serving_is_not_the_fallback() -> None:
    # A missing `serving` reads as `ready` (false here), unlike kube-proxy's "true".
    p = program(svc(endpoints='{ ip = "10.244.1.1", ready = false, terminating = true }'))
    pool = p.pool_index()[frontend(p, Kind.CLUSTER_IP).pool]
    assert not pool.backends and pool.when_empty is Empty.REJECT


def test_the_local_pool_falls_back_to_this_nodes_terminating_endpoints() -> None:
    p = program(
        svc(
            'internal_traffic_policy = "Local"',
            """
        { ip = "10.244.1.1", node = "node-1", ready = false, serving = true, terminating = true },
        { ip = "10.244.2.1", node = "node-2" },
    """,
        )
    )
    assert addresses(p, frontend(p, Kind.CLUSTER_IP).pool) == ["10.244.1.1"]
    # A ready endpoint here wins over a terminating one here, as cluster-wide.
    p = program(
        svc(
            'internal_traffic_policy = "Local"',
            """
        { ip = "10.244.1.1", node = "node-1", ready = false, serving = true, terminating = true },
        { ip = "10.244.1.2", node = "node-1" },
        { ip = "10.244.2.1", node = "node-2" },
    """,
        )
    )
    assert addresses(p, frontend(p, Kind.CLUSTER_IP).pool) == ["10.244.1.2"]


def test_weight_zero_endpoints_take_no_new_connections() -> None:
    p = program(svc(endpoints='{ ip = "10.244.1.1", weight = 0 }, { ip = "10.244.1.2" }'))
    pool = p.pool_index()[frontend(p, Kind.CLUSTER_IP).pool]
    assert len(pool.backends) == 2
    assert [b.address for b in pool.active] == ["10.244.1.2"]


def test_no_endpoints_rejects_everywhere() -> None:
    p = program(svc())
    for f in p.frontends:
        assert p.pool_index()[f.pool].when_empty is Empty.REJECT
        assert not p.pool_index()[f.pool].backends


@pytest.mark.parametrize("policy", ["internal_traffic_policy", "external_traffic_policy"])
def test_a_local_pool_of_a_service_without_endpoints_rejects(policy: str) -> None:
    # DROP is for a service whose endpoints are all elsewhere; none at all is REJECT.
    p = program(svc(f'{policy} = "Local"'))
    assert any(pool.local_only for pool in p.pools)
    assert all(pool.when_empty is Empty.REJECT for pool in p.pools)


def test_internal_traffic_policy_local_uses_only_local_endpoints_and_drops() -> None:
    here = program(
        svc(
            'internal_traffic_policy = "Local"',
            '{ ip = "10.244.1.1", node = "node-1" }, { ip = "10.244.2.1" }',
        )
    )
    f = frontend(here, Kind.CLUSTER_IP)
    assert addresses(here, f.pool) == ["10.244.1.1"]
    elsewhere = program(svc('internal_traffic_policy = "Local"', '{ ip = "10.244.2.1" }'))
    pool = elsewhere.pool_index()[frontend(elsewhere, Kind.CLUSTER_IP).pool]
    assert pool.local_only and not pool.backends and pool.when_empty is Empty.DROP
    # External traffic still reaches every endpoint under externalTrafficPolicy Cluster.
    node_port = frontend(elsewhere, Kind.NODE_PORT)
    assert addresses(elsewhere, node_port.pool) == ["10.244.2.1"]


def test_external_traffic_policy_local_keeps_source_and_short_circuits_internal() -> None:
    p = program(
        svc(
            'external_traffic_policy = "Local"',
            '{ ip = "10.244.1.1", node = "node-1" }, { ip = "10.244.2.1", node = "n2" }',
        )
    )
    np = frontend(p, Kind.NODE_PORT)
    assert np.masquerade is Masquerade.NEVER
    assert addresses(p, np.pool) == ["10.244.1.1"]
    assert np.internal_pool is not None
    assert addresses(p, np.internal_pool) == ["10.244.1.1", "10.244.2.1"]
    cluster = frontend(p, Kind.CLUSTER_IP)
    assert cluster.masquerade is Masquerade.OFF_CLUSTER and cluster.internal_pool is None
    assert addresses(p, cluster.pool) == ["10.244.1.1", "10.244.2.1"]


def test_external_traffic_policy_cluster_masquerades_external_traffic() -> None:
    p = program(svc(endpoints='{ ip = "10.244.1.1" }'))
    assert frontend(p, Kind.NODE_PORT).masquerade is Masquerade.ALWAYS
    assert frontend(p, Kind.CLUSTER_IP).masquerade is Masquerade.OFF_CLUSTER


def test_masquerade_all_masquerades_cluster_ip_traffic_from_pods_too() -> None:
    node = NODE + "masquerade_all = true\n"
    p = program(svc(endpoints='{ ip = "10.244.1.1" }'), node=node)
    assert frontend(p, Kind.CLUSTER_IP).masquerade is Masquerade.ALWAYS


def test_node_ports_listen_on_node_addresses_of_the_family() -> None:
    p = program(svc(endpoints='{ ip = "10.244.1.1" }'))
    assert [(f.address, f.port) for f in p.frontends if f.kind is Kind.NODE_PORT] == [
        ("192.168.49.2", 30080)
    ]


def test_localhost_node_ports_are_ipv4_only() -> None:
    p = program(
        svc(endpoints='{ ip = "10.244.1.1" }, { ip = "fd00:244::1" }').replace(
            '["10.0.0.10"]', '["10.0.0.10", "fd00:10::10"]'
        ),
        node=NODE + "localhost_node_ports = true\n",
    )
    assert [(f.family, f.address) for f in p.frontends if f.kind is Kind.NODE_PORT] == [
        (4, "127.0.0.1"),
        (4, "192.168.49.2"),
        (6, "fd00:49::2"),
    ]


def test_dual_stack_splits_endpoints_by_family() -> None:
    p = program("""
[[services]]
name = "d"
cluster_ips = ["10.0.0.10", "fd00:10::10"]
ports = [{ port = 80 }]
endpoints = [{ ip = "10.244.1.1" }, { ip = "fd00:244::1" }]
""")
    by_family = {f.family: addresses(p, f.pool) for f in p.frontends}
    assert by_family == {4: ["10.244.1.1"], 6: ["fd00:244::1"]}


def test_unused_pools_are_not_emitted() -> None:
    p = program(
        svc('internal_traffic_policy = "Local"\ntype = "ClusterIP"', '{ ip = "10.244.1.1" }')
        .replace('type = "NodePort"\n', "")
        .replace(", node_port = 30080", "")
    )
    assert [pool.local_only for pool in p.pools] == [True]


@pytest.mark.parametrize("reverse", [False, True])
def test_program_does_not_depend_on_config_order(reverse: bool) -> None:
    services = [
        svc(endpoints=f'{{ ip = "10.244.1.{i}" }}, {{ ip = "10.244.2.{i}" }}')
        .replace('"s"', f'"s{i}"')
        .replace("10.0.0.10", f"10.0.0.{i + 10}")
        .replace("30080", str(30080 + i))
        for i in range(4)
    ]
    forward = program("".join(services))
    flipped_eps = [s.replace('{ ip = "10.244.1.', '{ ip = "10.244.9.') for s in services]
    assert forward != program("".join(flipped_eps))  # the comparison can fail
    ordered = services[::-1] if reverse else services
    ordered = [
        s.replace(
            f'{{ ip = "10.244.1.{i}" }}, {{ ip = "10.244.2.{i}" }}',
            f'{{ ip = "10.244.2.{i}" }}, {{ ip = "10.244.1.{i}" }}',
        )
        for i, s in zip(range(3, -1, -1) if reverse else range(4), ordered, strict=True)
    ]
    assert program("".join(ordered)) == forward


def test_names_come_from_content_not_positions() -> None:
    one = program(svc(endpoints='{ ip = "10.244.1.1" }'))
    two = program(
        svc(endpoints='{ ip = "10.244.1.1" }')
        + svc(endpoints='{ ip = "10.244.1.2" }')
        .replace('"s"', '"a"')
        .replace("10.0.0.10", "10.0.0.11")
        .replace("30080", "30081")
    )
    ids_one = {p.id for p in one.pools} | {b.id for p in one.pools for b in p.backends}
    ids_two = {p.id for p in two.pools} | {b.id for p in two.pools for b in p.backends}
    assert ids_one < ids_two


def test_a_backend_made_by_lowering_is_the_dataclass_made_by_its_constructor() -> None:
    args = ("ABCDEFGHIJKLMNOP", "10.0.0.1", 8080, 3, True, False)
    fast, plain = _backend(*args), Backend(*args)
    assert type(fast) is Backend
    assert fast == plain and hash(fast) == hash(plain) and repr(fast) == repr(plain)


def test_a_backend_knows_whether_it_runs_here_elsewhere_or_unplaced() -> None:
    cluster = lbc.loads(
        """
[node]
name = "node-1"
[[services]]
name = "web"
cluster_ips = ["10.0.1.10"]
ports = [{ port = 80 }]
endpoints = [{ ip = "10.244.1.5", node = "node-1" }, { ip = "10.244.2.5", node = "node-2" },
             { ip = "10.244.3.5" }]
"""
    )
    (pool,) = lbc.lower(cluster).pools
    where = {b.address: (b.local, b.remote) for b in pool.backends}
    assert where == {
        "10.244.1.5": (True, False),
        "10.244.2.5": (False, True),
        "10.244.3.5": (False, False),
    }


def lb_ranges(ranges: str, lb_ips: str) -> dict[int, tuple[str, ...]]:
    """Each family's source ranges of a dual-stack LB service (node 192.168.49.2, fd00:49::2)."""
    p = program(
        f"""
[[services]]
name = "s"
type = "LoadBalancer"
cluster_ips = ["10.0.0.10", "fd00:10::10"]
load_balancer_ips = {lb_ips}
load_balancer_source_ranges = {ranges}
ports = [{{ name = "p", port = 80, node_port = 30080 }}]
endpoints = [{{ ip = "10.244.1.1" }}, {{ ip = "fd00:244::1" }}]
"""
    )
    return {f.family: f.source_ranges for f in p.frontends if f.kind is Kind.LOAD_BALANCER}


def test_a_source_range_holding_the_node_also_admits_the_lb_addresses() -> None:
    # kube-proxy: a node holding an LB address reaches it from that address.
    assert lb_ranges(
        '["192.168.49.0/24", "fd00:49::/64"]', '["198.51.100.1", "198.51.100.2", "2001:db8::1"]'
    ) == {
        4: ("192.168.49.0/24", "198.51.100.1/32", "198.51.100.2/32"),
        6: ("fd00:49::/64", "2001:db8::1/128"),
    }


def test_lb_addresses_are_admitted_only_in_the_family_whose_range_holds_the_node() -> None:
    assert lb_ranges(
        '["192.168.49.2/32", "2001:db8:9::/48"]', '["198.51.100.1", "2001:db8::1"]'
    ) == {
        4: ("192.168.49.2/32", "198.51.100.1/32"),
        6: ("2001:db8:9::/48",),
    }


def test_lb_addresses_already_in_a_range_are_not_repeated() -> None:
    assert lb_ranges('["192.168.0.0/16", "198.51.100.0/24"]', '["198.51.100.1"]') == {
        4: ("192.168.0.0/16", "198.51.100.0/24")
    }


def hinted(endpoints: str, node_zone: str | None = "zone-a", policy: str = "") -> list[str]:
    """The cluster IP pool's endpoints on node-1 (in `node_zone`)."""
    zone = f'zone = "{node_zone}"\n' if node_zone else ""
    node = NODE.replace('name = "node-1"\n', f'name = "node-1"\n{zone}')
    p = program(svc(policy, endpoints), node)
    return addresses(p, frontend(p, Kind.CLUSTER_IP).pool)


def test_zone_hints_keep_cluster_traffic_in_the_node_zone() -> None:
    eps = """
        { ip = "10.244.1.1", for_zones = ["zone-a", "zone-c"] },
        { ip = "10.244.1.2", for_zones = ["zone-b"] },
        { ip = "10.244.1.3", for_zones = ["zone-a"] },
    """
    assert hinted(eps) == ["10.244.1.1", "10.244.1.3"]
    # A node without a zone, or in a zone no endpoint is hinted for: hints ignored.
    assert hinted(eps, None) == ["10.244.1.1", "10.244.1.2", "10.244.1.3"]
    assert hinted(eps, "zone-z") == ["10.244.1.1", "10.244.1.2", "10.244.1.3"]


def test_zone_hints_count_only_when_every_ready_endpoint_has_them() -> None:
    eps = """
        { ip = "10.244.1.1", for_zones = ["zone-a"] },
        { ip = "10.244.1.2" },
        { ip = "10.244.1.3", ready = false, serving = true, terminating = true },
    """
    assert hinted(eps) == ["10.244.1.1", "10.244.1.2"]
    # Endpoints that are not ready do not count.
    eps = """
        { ip = "10.244.1.1", for_zones = ["zone-a"] },
        { ip = "10.244.1.2", for_zones = ["zone-b"] },
        { ip = "10.244.1.3", ready = false },
    """
    assert hinted(eps) == ["10.244.1.1"]


def test_node_hints_count_only_when_every_ready_endpoint_has_them() -> None:
    eps = """
        { ip = "10.244.1.1", for_nodes = ["node-1"] },
        { ip = "10.244.1.2" },
    """
    assert hinted(eps) == ["10.244.1.1", "10.244.1.2"]


def test_node_hints_come_first_and_fall_back_to_zone_hints() -> None:
    eps = """
        { ip = "10.244.1.1", for_nodes = ["node-1"], for_zones = ["zone-a"] },
        { ip = "10.244.1.2", for_nodes = ["node-2"], for_zones = ["zone-a"] },
        { ip = "10.244.1.3", for_nodes = ["node-3"], for_zones = ["zone-b"] },
    """
    assert hinted(eps) == ["10.244.1.1"]
    no_node = eps.replace('"node-1"', '"node-9"')
    assert hinted(no_node) == ["10.244.1.1", "10.244.1.2"]


def test_hints_never_narrow_the_local_pools() -> None:
    p = program(
        svc(
            'external_traffic_policy = "Local"',
            """
        { ip = "10.244.1.1", node = "node-1", for_zones = ["zone-b"] },
        { ip = "10.244.1.2", node = "node-2", for_zones = ["zone-a"] },
    """,
        ),
        NODE.replace('name = "node-1"\n', 'name = "node-1"\nzone = "zone-a"\n'),
    )
    assert addresses(p, frontend(p, Kind.NODE_PORT).pool) == ["10.244.1.1"]
    assert addresses(p, frontend(p, Kind.CLUSTER_IP).pool) == ["10.244.1.2"]
    # The IR names the hints a pool followed: the local pool followed none.
    hints = {pool.local_only: pool.hints for pool in p.pools}
    assert hints == {False: "zone zone-a", True: ""}


def test_hints_that_leave_only_weight_zero_endpoints_are_not_followed() -> None:
    eps = """
        { ip = "10.244.1.1", weight = 0, for_zones = ["zone-a"] },
        { ip = "10.244.1.2", for_zones = ["zone-b"] },
    """
    assert hinted(eps) == ["10.244.1.2"]  # active backends: the weight-0 one takes none
    eps = """
        { ip = "10.244.1.1", weight = 0, for_nodes = ["node-1"], for_zones = ["zone-a"] },
        { ip = "10.244.1.2", for_nodes = ["node-2"], for_zones = ["zone-a"] },
        { ip = "10.244.1.3", for_nodes = ["node-3"], for_zones = ["zone-b"] },
    """
    assert hinted(eps) == ["10.244.1.2"]  # node hints give way to zone hints
