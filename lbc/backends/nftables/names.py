"""Names of lbc's nftables table, chains, sets and maps, and how per-service names are made.

Per-service objects are named like kube-proxy's nftables mode: a prefix, eight
characters of a content hash, and a readable part, e.g.
`service-MAF5EIX4-default/edge/tcp/http`. The hash is the start of the IR id of the
pool (or backend), so a name is stable, never depends on list positions, and can be
looked up in `lbc compile --backend ir`. The readable part is only for people; it
is reduced to the characters an nft identifier may hold and cut to the kernel's
length limit, which the hash keeps unique.
"""

from __future__ import annotations

import re

FAMILY = "inet"
TABLE = "lbc"

# Base chains, `<type>-<hook>`: (type, hook, priority as nft reads it, priority value).
# nft 1.0.6 knows `dstnat` only at prerouting: the output hook's -100 is written out.
NAT_PREROUTING = "nat-prerouting"
NAT_OUTPUT = "nat-output"
NAT_POSTROUTING = "nat-postrouting"
FILTER_PREROUTING = "filter-prerouting"  # source ranges, before DNAT
FILTER_OUTPUT = "filter-output"  # source ranges for the node's own traffic, before DNAT
FILTER_INPUT = "filter-input"  # frontends without endpoints, after DNAT
FILTER_FORWARD = "filter-forward"
FILTER_OUTPUT_POST_DNAT = "filter-output-post-dnat"
BASE_CHAINS: dict[str, tuple[str, str, str, int]] = {
    FILTER_PREROUTING: ("filter", "prerouting", "dstnat - 10", -110),
    FILTER_OUTPUT: ("filter", "output", "-110", -110),
    FILTER_INPUT: ("filter", "input", "filter - 10", -10),
    FILTER_FORWARD: ("filter", "forward", "filter - 10", -10),
    FILTER_OUTPUT_POST_DNAT: ("filter", "output", "filter - 10", -10),
    NAT_PREROUTING: ("nat", "prerouting", "dstnat", -100),
    NAT_OUTPUT: ("nat", "output", "-100", -100),
    NAT_POSTROUTING: ("nat", "postrouting", "srcnat", 100),
}

# Regular chains shared by every service.
SERVICES = "services"
FIREWALL_CHECK = "firewall-check"
ENDPOINTS_CHECK = "service-endpoints-check"
REJECT_CHAIN = "reject-chain"
CLUSTER_IPS_CHECK = "cluster-ips-check"

# Sets and maps, one of each per address family: `service-ips4`, `service-ips6`, ...
SERVICE_IPS = "service-ips"  # address . l4proto . port : goto a service's chain
NODEPORT_IPS = "nodeport-ips"  # the node addresses that take node ports
SERVICE_NODEPORTS = "service-nodeports"  # l4proto . port : goto, on a node-port address
NO_ENDPOINT_SERVICES = "no-endpoint-services"  # address . l4proto . port : reject or drop
NO_ENDPOINT_NODEPORTS = "no-endpoint-nodeports"  # l4proto . port : reject or drop
FIREWALL_IPS = "firewall-ips"  # load-balancer frontends that have source ranges
FIREWALL_ALLOW = "firewall-allow"  # address . l4proto . port . allowed source range
CLUSTER_IPS = "cluster-ips"  # every cluster IP: what reaches one undiverted is rejected
# cluster IP . l4proto . port whose traffic is marked for masquerade: all of it, or
# what does not come from the pod CIDR
MARK_ALWAYS = "masquerade-always"
MARK_OFF_CLUSTER = "masquerade-off-cluster"
HAIRPIN = "hairpin-ips"  # backend . backend: a backend that reached itself, masqueraded

# Per-service objects.
SERVICE = "service-"  # the cluster-wide pool of a service port
LOCAL = "local-"  # its local-endpoints pool (traffic policy Local)
EXTERNAL = "external-"  # external traffic of a service port: masquerade, policy
AFFINITY = "affinity-"  # the clients a backend has seen recently (ClientIP affinity)

MAX_NAME = 255  # NFT_CHAIN_MAXNAMELEN and NFT_SET_MAXNAMELEN, less the NUL
HASH_LENGTH = 8
_NOT_IN_IDENTIFIER = re.compile(r"[^A-Za-z0-9/_.-]")


def per_family(name: str, family: int) -> str:
    """`service-ips4` or `service-ips6`: the set or map of `name` for one family."""
    return f"{name}{family}"


def readable(service: str, proto: str) -> str:
    """`namespace/name/proto/port` from an IR service name `namespace/name:port`."""
    head, sep, port = service.rpartition(":")
    return f"{head}/{proto}/{port}" if sep else f"{service}/{proto}"


def endpoint_readable(service: str, proto: str, address: str, port: int) -> str:
    """`namespace/name/proto/port__address/port`, the readable part of an endpoint name."""
    return f"{readable(service, proto)}__{address}/{port}"


def object_name(prefix: str, content_id: str, readable_part: str) -> str:
    """`<prefix><HASH8>-<readable>`, reduced to identifier characters and the length limit."""
    return f"{prefix}{content_id[:HASH_LENGTH]}-{identifier(readable_part)}"[:MAX_NAME]


def identifier(text: str) -> str:
    """`text` in nft's identifier alphabet: IPv6 colons become dots, anything else '_'.

    Character by character, so the parts of a name can be reduced apart and joined.
    """
    return _NOT_IN_IDENTIFIER.sub("_", text.replace(":", "."))


class EndpointNames:
    """The names of one pool's endpoint (or affinity) objects: `object_name` of
    `endpoint_readable`, with the pool's part of the name reduced once."""

    def __init__(self, prefix: str, service: str, proto: str) -> None:
        self.prefix = prefix
        self.service_part = identifier(readable(service, proto))

    def name(self, content_id: str, address: str, port: int, suffix: str = "") -> str:
        """The name of the object of the backend `content_id` at `address:port`;
        `suffix` (identifier characters) ends it however long the rest is."""
        # A dotted quad is in the identifier alphabet already.
        where = address if "." in address and ":" not in address else identifier(address)
        head = f"{self.prefix}{content_id[:HASH_LENGTH]}-{self.service_part}__{where}/{port}"
        return head[: MAX_NAME - len(suffix)] + suffix


def timeout_suffix(seconds: int) -> str:
    """`__600s`: an affinity set's timeout, in its name, so that a new timeout makes a
    new set (added, the old one deleted) instead of changing a set's declaration."""
    return f"__{seconds}s"
