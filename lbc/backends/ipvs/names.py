"""Names of the kernel objects the IPVS backend owns, in one place."""

from __future__ import annotations

# The dummy interface that holds every virtual address (kube-proxy's kube-ipvs0).
# Interface names are at most 15 bytes (IFNAMSIZ - 1).
LINK = "lbc-ipvs0"

# The nftables table of helper rules (masquerade marks, SNAT, filtering). It is not
# `lbc`, the nftables backend's table, so the two backends never touch each other's.
TABLE_FAMILY = "inet"
TABLE = "lbc-ipvs"

# Base chains of the helper table.
NAT_PREROUTING = "nat-prerouting"
NAT_OUTPUT = "nat-output"
NAT_POSTROUTING = "nat-postrouting"
FILTER_INPUT = "filter-input"
FILTER_OUTPUT = "filter-output"
# Regular chains: the one both nat hooks jump to, and the one both filter hooks do.
MARK_FOR_MASQUERADE = "mark-for-masquerade"
SERVICE_FILTER = "service-filter"

# Sets, one per address family (suffix "-v4" or "-v6").
VIPS = "vips"  # addresses bound to LINK
SERVICES = "services"  # address . protocol . port of every virtual service
MASQUERADE_ALWAYS = "masquerade-always"  # frontends whose packets are all masqueraded
MASQUERADE_OFF_CLUSTER = "masquerade-off-cluster"  # ... unless they come from the pod CIDR
HAIRPIN = "hairpin"  # endpoint . protocol . port . endpoint: a backend reaching itself
FIREWALLED = "firewalled"  # frontends with load-balancer source ranges
SOURCE_RANGES = "source-ranges"  # frontend . allowed source range
NO_ENDPOINTS_REJECT = "no-endpoints-reject"  # frontends of empty pools that reject
NO_ENDPOINTS_DROP = "no-endpoints-drop"  # ... and that drop

# Kernel parameters IPVS needs in the node's network namespace, as kube-proxy sets
# them. Without `conntrack`, IPVS connections bypass netfilter's NAT and the
# masquerade rules never apply to them. Without `expire_nodest_conn`, a packet of a
# connection whose real server was deleted is dropped, and each one refreshes the
# connection's timer: a UDP client that keeps its source port (a DNS resolver) is cut
# off for as long as it keeps sending; with it, the connection expires and the next
# packet is scheduled afresh. `expire_quiescent_template` does the same for a
# client-IP affinity template whose real server has weight 0 (draining).
SYSCTLS = (
    ("net.ipv4.vs.conntrack", "1"),
    ("net.ipv4.vs.expire_nodest_conn", "1"),
    ("net.ipv4.vs.expire_quiescent_template", "1"),
)


def family_suffix(family: int) -> str:
    """`-v4` or `-v6`: the suffix of a per-family set name."""
    return f"-v{family}"
