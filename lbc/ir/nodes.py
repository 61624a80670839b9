"""IR node types: what the dataplane must do, decided once, for every backend.

Lowering has already applied the Kubernetes rules (endpoint readiness, traffic
policies, masquerade decisions), so a backend only translates these nodes.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from lbc.ir.names import digest


class Proto(StrEnum):
    """Transport protocol of a frontend."""

    TCP = "tcp"
    UDP = "udp"
    SCTP = "sctp"


class Kind(StrEnum):
    """How traffic reaches a frontend."""

    CLUSTER_IP = "cluster-ip"
    EXTERNAL_IP = "external-ip"
    LOAD_BALANCER = "load-balancer"
    NODE_PORT = "node-port"


class Masquerade(StrEnum):
    """When a packet entering a frontend gets the masquerade mark."""

    ALWAYS = "always"
    OFF_CLUSTER = "off-cluster"  # unless its source is in the pod CIDR of its family
    NEVER = "never"


class Empty(StrEnum):
    """What a pool with no usable backend does with a new connection."""

    REJECT = "reject"
    DROP = "drop"


class Scheduler(StrEnum):
    """How a pool picks a backend for a new connection."""

    DEFAULT = "default"  # the backend's native weighted choice
    RANDOM = "random"
    ROUND_ROBIN = "rr"
    WEIGHTED_ROUND_ROBIN = "wrr"
    LEAST_CONN = "lc"
    WEIGHTED_LEAST_CONN = "wlc"
    SOURCE_HASH = "sh"
    MAGLEV = "mh"


@dataclass(frozen=True, slots=True)
class Backend:
    """One destination of a pool: a real server that answers for the service.

    `key` names it in its pool's service port: `namespace/name:port/proto/ip:port`
    (brackets around IPv6). Its `id`, the 16 base32 characters of the key's sha256, is
    made on request: only some backends print ids (the IR dump, iptables' endpoint
    chains, nftables' affinity sets), and lowering 100,000 endpoints would otherwise
    spend a third of its time on digests nobody reads.
    """

    key: str
    address: str
    port: int
    weight: int
    local: bool  # runs on this node
    terminating: bool
    # Runs on another node, as its endpoint says (neither this nor `local`: the endpoint
    # names no node). Its own connections mostly pass its own node's NAT rules, not
    # this node's (see `Program.hairpin`).
    remote: bool = False

    @property
    def id(self) -> str:
        """The stable name of this backend: `digest(key)`."""
        return digest(self.key)


@dataclass(frozen=True, slots=True)
class Pool:
    """A weighted set of backends for one service port in one address family."""

    id: str
    service: str  # "namespace/name:port-name", the readable name
    family: int
    proto: Proto
    backends: tuple[Backend, ...]
    scheduler: Scheduler
    affinity_timeout: int | None
    when_empty: Empty
    local_only: bool  # the local-endpoints pool of a traffic policy "Local"
    # UDP only: every endpoint of the service port that is ready or serving (address,
    # target port), before traffic policy, topology hints and the terminating
    # fallback chose `backends`. Flows to these may live on (lbc.apply.conntrack).
    serving: tuple[tuple[str, int], ...] = ()
    # The topology hints that narrowed a cluster-wide pool's ready endpoints ("zone
    # zone-a", "node node-1"), or "" when none did.
    hints: str = ""

    @property
    def active(self) -> tuple[Backend, ...]:
        """Backends that receive new connections (weight above zero)."""
        backends = self.backends
        for b in backends:
            if b.weight <= 0:
                return tuple([b for b in backends if b.weight > 0])
        return backends  # the usual case: every backend, without a copy


@dataclass(frozen=True, slots=True)
class Frontend:
    """An address, protocol and port whose traffic goes to a pool."""

    kind: Kind
    family: int
    address: str
    proto: Proto
    port: int
    service: str
    pool: str
    masquerade: Masquerade
    # Packets from pods or from the node itself go here instead (externalTrafficPolicy
    # Local sends only outside traffic to the local-only pool).
    internal_pool: str | None = None
    source_ranges: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class NodeInfo:
    """The node the program is for."""

    name: str
    addresses: tuple[str, ...]
    pod_cidrs: tuple[str, ...]
    masquerade_mark: int
    masquerade_all: bool
    localhost_node_ports: bool = False  # node ports also on 127.0.0.1
    zone: str | None = None  # the node's topology zone, for endpoints' zone hints

    def pod_cidr(self, family: int) -> str | None:
        """The pod CIDR of `family` (4 or 6), if there is one."""
        sep = ":" if family == 6 else "."
        return next((c for c in self.pod_cidrs if sep in c), None)


@dataclass(frozen=True, slots=True)
class Program:
    """A whole compiled cluster: node facts, pools and frontends in canonical order."""

    node: NodeInfo
    pools: tuple[Pool, ...]
    frontends: tuple[Frontend, ...]
    # Cluster IPs: a new connection to one of them that no frontend takes (a port or
    # protocol no service uses) is rejected, as kube-proxy's nftables mode does.
    reject_unknown: tuple[str, ...] = ()

    def pool_index(self) -> dict[str, Pool]:
        """Pools by id (build once per render; the program itself stays a plain tuple)."""
        return {p.id: p for p in self.pools}

    def open_to_other_nodes(self) -> frozenset[str]:
        """Pools that a pod on another node can reach through this node's rules without
        being masqueraded: the cluster-wide pools that frontends with externalTrafficPolicy
        Local send pod traffic to (a pod elsewhere may address this node's node port).
        Such a pool's remote backends need the hairpin masquerade here too; any other
        remote backend's own connections go through its own node's rules."""
        return frozenset(f.internal_pool for f in self.frontends if f.internal_pool)

    def hairpin(self, pool: Pool, backend: Backend, others: frozenset[str]) -> bool:
        """Whether a connection from `backend` to its own pool must be masqueraded here
        (`others`: `open_to_other_nodes()`)."""
        return not backend.remote or pool.id in others

    def families(self) -> tuple[int, ...]:
        """The address families that have frontends, in order."""
        return tuple(sorted({f.family for f in self.frontends}))
