"""Which UDP conntrack entries apply deletes (`lbc.apply.conntrack.stale`), without a kernel."""

from __future__ import annotations

import ipaddress

import lbc
from lbc.apply.conntrack import Tracked, stale, udp_endpoints

CONFIG = """
[node]
name = "node-1"
addresses = ["192.168.49.2"]
pod_cidrs = ["10.244.0.0/16"]

[[services]]
name = "dns"
type = "NodePort"
cluster_ips = ["10.0.0.10"]
external_traffic_policy = "Local"
ports = [
  {{ name = "dns", protocol = "UDP", port = 53, target_port = {target}, node_port = 30053 }},
  {{ name = "dns-tcp", protocol = "TCP", port = 53, target_port = {target}, node_port = 30054 }},
]
endpoints = [
  {{ ip = "10.244.1.1", node = "node-1" }},
  {{ ip = "10.244.2.2", node = "node-2" }},
  {{ ip = "10.244.3.3", node = "node-2", weight = 0 }},
]
"""


def program(target: int = 5353) -> lbc.Program:
    return lbc.lower(lbc.loads(CONFIG.format(target=target)))


def flow(dest: str, dport: int, reply: str, rport: int) -> Tracked:
    ip = ipaddress.ip_address
    return Tracked(4, (ip("192.168.49.10"), 40000), (ip(dest), dport), (ip(reply), rport))


def test_udp_frontends_list_every_endpoint_their_pools_may_use() -> None:
    served = udp_endpoints(program())
    ip = ipaddress.ip_address
    everyone = {(ip(a), 5353) for a in ("10.244.1.1", "10.244.2.2", "10.244.3.3")}
    assert served[(ip("10.0.0.10"), 53)] == everyone
    # The node port's pool is the local one; its cluster pool (for the node's own
    # traffic under policy Local) counts too.
    assert served[(ip("192.168.49.2"), 30053)] == everyone
    assert set(served) == {(ip("10.0.0.10"), 53), (ip("192.168.49.2"), 30053)}  # no TCP


def test_flows_to_endpoints_still_in_the_service_stay() -> None:
    flows = [
        flow("10.0.0.10", 53, "10.244.1.1", 5353),
        flow("10.0.0.10", 53, "10.244.3.3", 5353),  # weight 0: keeps its flows
        flow("192.168.49.2", 30053, "10.244.2.2", 5353),
    ]
    assert stale(program(), flows) == []


def test_flows_to_gone_endpoints_untranslated_flows_and_old_target_ports_are_stale() -> None:
    flows = [
        flow("10.0.0.10", 53, "10.244.9.9", 5353),  # the endpoint left
        flow("10.0.0.10", 53, "10.0.0.10", 53),  # passed by before the service existed
        flow("10.0.0.10", 53, "10.244.1.1", 53),  # the target port changed
    ]
    assert stale(program(), flows) == flows


def test_flows_to_addresses_or_ports_lbc_does_not_serve_are_not_its_business() -> None:
    flows = [
        flow("10.0.0.99", 53, "10.244.9.9", 5353),
        flow("10.0.0.10", 54, "10.244.9.9", 5353),
        flow("192.168.49.2", 30054, "192.168.49.2", 30054),
    ]
    assert stale(program(), flows) == []


def test_a_flow_reads_as_one_line() -> None:
    ip = ipaddress.ip_address
    entry = Tracked(6, (ip("fd00::1"), 4000), (ip("fd00:10::1"), 53), (ip("fd00:244::1"), 5353))
    assert str(entry) == "udp [fd00::1]:4000 -> [fd00:10::1]:53 (replies from [fd00:244::1]:5353)"


HINTED = """
[node]
name = "node-1"
zone = "zone-a"
addresses = ["192.168.49.2"]
pod_cidrs = ["10.244.0.0/16"]

[[services]]
name = "dns"
cluster_ips = ["10.0.0.10"]
internal_traffic_policy = "{policy}"
ports = [{{ name = "dns", protocol = "UDP", port = 53 }}]
endpoints = [
  {{ ip = "10.244.1.1", node = "node-1", for_zones = ["zone-a"] }},
  {{ ip = "10.244.2.2", node = "node-2", for_zones = ["zone-b"] }},
  {{ ip = "10.244.3.3", node = "node-2", ready = false, serving = true, terminating = true }},
  {{ ip = "10.244.4.4", ready = false, serving = false, terminating = true }},
  {{ ip = "10.244.5.5", ready = false, serving = true }},
]
"""


def test_flows_to_serving_endpoints_stay_whatever_chose_new_flows() -> None:
    # As kube-proxy's cleanup: traffic policy, topology hints and the terminating
    # fallback choose where new flows go, not which flows may go on.
    for policy in ("Cluster", "Local"):
        p = lbc.lower(lbc.loads(HINTED.format(policy=policy)))
        flows = [
            flow("10.0.0.10", 53, "10.244.1.1", 53),  # chosen
            flow("10.0.0.10", 53, "10.244.2.2", 53),  # another zone; remote under Local
            flow("10.0.0.10", 53, "10.244.3.3", 53),  # terminating, still serving
            flow("10.0.0.10", 53, "10.244.5.5", 53),  # serving, neither ready nor terminating
        ]
        assert stale(p, flows) == []
        not_serving = [flow("10.0.0.10", 53, "10.244.4.4", 53)]
        assert stale(p, not_serving) == not_serving


def test_every_flow_to_a_frontend_that_is_gone_is_stale() -> None:
    ip = ipaddress.ip_address
    gone = [(ip("10.0.0.99"), 53), (ip("10.0.0.10"), 53)]
    flows = [
        flow("10.0.0.99", 53, "10.244.1.1", 5353),  # its service was removed
        flow("10.0.0.10", 53, "10.244.1.1", 5353),  # served again: only its endpoints count
    ]
    assert stale(program(), flows, gone) == flows[:1]
