"""The IPVS backend: kube-proxy's IPVS mode as an exact list of kernel operations.

`render` is pure. It lowers the IR to operations (`plan.operations`): a dummy
interface `lbc-ipvs0`, kept down, holding every virtual address as a /32 or /128;
one IPVS virtual service per frontend (node ports on each node address) with its
real servers, always NAT (masquerading) and weighted; kube-proxy's sysctls
(`names.SYSCTLS`: `net.ipv4.vs.conntrack`, `expire_nodest_conn`,
`expire_quiescent_template`); and a table of helper rules. The artifact's "text" is
the canonical form (the golden file, the `ipvs` section being `ipvsadm -S -n`),
"json" is the operation list, and
`data` is the tuple of operations. `lbc.backends.ipvs.netlink` turns operations into
pyroute2 requests and performs them; it is imported only by whoever applies them.

Helper rules are an nftables table (`inet lbc-ipvs`), not iptables and ipset as in
kube-proxy: a single `nft -f` batch replaces rules and sets in one transaction,
where iptables-restore and ipset restore are two, and one inet table serves IPv4
and IPv6 with typed concatenated sets (address . protocol . port) instead of
ipset's hash:ip,port. The rules are fixed per address family; services only
change set elements (see `rules`).

Schedulers: rr by default, wrr when endpoint weights differ; rr, wrr, lc, wlc, sh
and mh when asked for. What IPVS cannot express is refused in `check`, never
rendered differently:
- the random scheduler: IPVS has none;
- rr or lc with unequal weights: both ignore weights;
- external traffic policy Local: pods and the node itself must reach an external
  address through all endpoints while outside clients get the local ones, but
  IPVS chooses real servers by virtual address and port alone (kube-proxy's IPVS
  mode sends both to the local endpoints).
A ClientIP affinity is IPVS persistence per virtual service: a client that reaches
one service through two of its addresses may stick to a different endpoint on each.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

from lbc.backends.base import Artifact, Backend, Feature
from lbc.backends.ipvs.ops import Operation
from lbc.backends.ipvs.plan import NATIVE, UNWEIGHTED, operations
from lbc.backends.ipvs.text import formats
from lbc.errors import Unsupported, UnsupportedError
from lbc.hookspecs import hookimpl
from lbc.ir.names import hostport
from lbc.ir.nodes import Program, Scheduler

if TYPE_CHECKING:
    from lbc.backends.ipvs.kernel import IpvsKernel


class IpvsBackend(Backend):
    """IPVS virtual services through netlink, plus an nftables table of helper rules."""

    name = "ipvs"
    extension = "txt"
    description = "kube-proxy-style IPVS: dummy interface, virtual services, nftables helpers"
    # No route_localnet DNAT; and a virtual service is one pool for every source
    # (`_ipvs_limits` says why external traffic policy Local cannot be expressed).
    features = frozenset(Feature) - {Feature.LOCALHOST_NODE_PORT, Feature.EXTERNAL_LOCAL_POLICY}
    schedulers = frozenset({Scheduler.DEFAULT, *NATIVE})

    def check(self, program: Program) -> None:
        """Raise `UnsupportedError` with everything IPVS cannot express, all at once."""
        items: list[Unsupported] = []
        try:
            super().check(program)
        except UnsupportedError as exc:
            local = str(Feature.EXTERNAL_LOCAL_POLICY)
            items += [item for item in exc.items if item.feature != local]
        items += _ipvs_limits(self.name, program)
        if items:
            raise UnsupportedError(self.name, list(dict.fromkeys(items)))

    def render(self, program: Program) -> Artifact:
        """Operations, as canonical text ("text") and as a JSON list ("json")."""
        ops: tuple[Operation, ...] = operations(program)
        return Artifact(self.name, formats(ops, program.node.name), data=ops)

    def kernel(self, netns: str | None = None) -> IpvsKernel:
        """The pyroute2 + libnftables adapter (imported only when applying)."""
        from lbc.backends.ipvs.kernel import IpvsKernel

        return IpvsKernel(netns)


def _ipvs_limits(backend: str, program: Program) -> Iterator[Unsupported]:
    for pool in program.pools:
        who = f"{pool.service}/{pool.proto} ipv{pool.family}"
        name = NATIVE.get(pool.scheduler)
        if name in UNWEIGHTED and len({b.weight for b in pool.active}) > 1:
            yield Unsupported(
                backend,
                who,
                str(Feature.WEIGHTS),
                f"IPVS scheduler {name} ignores endpoint weights",
            )
    taken = Counter((f.proto, f.address, f.port) for f in program.frontends)
    for f in program.frontends:
        who = f"{f.service}/{f.proto} ipv{f.family}"
        if f.internal_pool is not None:
            yield Unsupported(
                backend,
                who,
                str(Feature.EXTERNAL_LOCAL_POLICY),
                "external traffic policy Local: IPVS picks real servers by address and port "
                "alone, so pod and node traffic to "
                f"{hostport(f.address, f.port)} cannot reach the endpoints of other nodes",
            )
        if taken[(f.proto, f.address, f.port)] > 1:
            yield Unsupported(
                backend,
                who,
                "frontends",
                f"{hostport(f.address, f.port)}/{f.proto} is one IPVS virtual service "
                "but several frontends",
            )


@hookimpl
def lbc_register_backends(register: Callable[[Backend], None]) -> None:
    """Register the IPVS backend."""
    register(IpvsBackend())
