"""Configs that more than one backend's tests compile."""

from __future__ import annotations


def worst_case_config() -> str:
    """Every kind of object at once, with names and addresses as long as the schema allows:
    both families, every service type and protocol, node ports, source ranges, both
    traffic policies, session affinity and weights."""
    ns, name, port = "n" * 63, "s" * 63, "p" * 63
    return f"""
[node]
name = "node-1"
addresses = ["192.168.49.2", "fd00:49::2"]
pod_cidrs = ["10.244.0.0/16", "fd00:244::/64"]

[[services]]
namespace = "{ns}"
name = "{name}"
type = "LoadBalancer"
cluster_ips = ["10.0.1.190", "fd00:10::1:190"]
external_ips = ["198.51.100.30", "fd00:198:51:100::30"]
load_balancer_ips = ["198.51.100.31", "fd00:198:51:100::31"]
load_balancer_source_ranges = ["203.0.113.0/24", "203.0.113.128/25", "fd00:203:0:113::/64"]
external_traffic_policy = "Local"
session_affinity = "ClientIP"
ports = [
  {{ name = "{port}", port = 443, target_port = 65535, node_port = 30443 }},
  {{ name = "dns", protocol = "UDP", port = 53, node_port = 30053 }},
  {{ name = "sig", protocol = "SCTP", port = 2905 }},
]
endpoints = [
  {{ ip = "10.244.1.7", node = "node-1", weight = 3 }},
  {{ ip = "10.244.2.3", node = "node-2" }},
  {{ ip = "fd00:244:ffff:ffff:ffff:ffff:ffff:ffff", node = "node-1" }},
  {{ ip = "fd00:244::2:3", node = "node-2" }},
]

[[services]]
namespace = "{ns}"
name = "{"e" * 63}"
type = "NodePort"
external_traffic_policy = "Local"
cluster_ips = ["10.0.1.191", "fd00:10::1:191"]
ports = [{{ name = "{port}", port = 80, node_port = 30080 }}]
endpoints = [{{ ip = "10.244.2.9", node = "node-2" }}]
"""


# Valid input that the kernel's tools print differently from Python's text of it:
# source ranges of every address (iptables keeps no `-s` for them) and IPv6 addresses
# whose first 96 bits are zero (glibc writes them with a dotted IPv4 tail, `::10.0.0.1`,
# in iptables-save's and nft's listings).
ANY_SOURCE_AND_DOTTED_TAILS = """
[node]
name = "node-1"
addresses = ["192.168.49.2", "fd00::2"]
pod_cidrs = ["10.244.0.0/16", "fd00:244::/64"]

[[services]]
name = "open"
type = "LoadBalancer"
cluster_ips = ["10.0.1.10", "fd00:96::10"]
load_balancer_ips = ["198.51.100.10", "2001:db8::10"]
load_balancer_source_ranges = ["0.0.0.0/0", "::/0"]
ports = [{ port = 80, node_port = 30080 }]
endpoints = [{ ip = "10.244.1.7" }, { ip = "fd00:244::8" }]

[[services]]
name = "closed"
type = "LoadBalancer"
cluster_ips = ["10.0.1.11"]
load_balancer_ips = ["198.51.100.11"]
load_balancer_source_ranges = ["0.0.0.0/0"]
ports = [{ port = 80, node_port = 30081 }]

[[services]]
name = "compat"
type = "LoadBalancer"
cluster_ips = ["fd00:96::12"]
external_ips = ["::c000:201"]
load_balancer_ips = ["2001:db8::12"]
load_balancer_source_ranges = ["::c000:200/120"]
ports = [{ port = 80, node_port = 30082 }]
endpoints = [{ ip = "::a00:1" }]
"""
