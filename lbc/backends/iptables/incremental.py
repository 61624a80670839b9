"""The iptables chains kept per service, so that a change renders only its services.

The state objects of a program (`render.render_documents(...).objects`) are the union
of what each service contributes and a shared part:
- each service's own chains (its pools' `LBC-SVC-`/`LBC-SVL-` and endpoint chains,
  its external and firewall chains), named from its content and never shared;
- its frontends' rules for the dispatch chains, its cluster IPs and its node-port
  addresses, from which the shared part is made: the dispatch trees of both tables,
  the cluster-IP catch-all, the fixed chains and the jumps from the built-in chains.

`Table.update` swaps the contributions of the services that changed and returns the
object changes. The shared part is made again only when its inputs changed (a new
frontend, a pool that became empty), not for a change of endpoints. A test holds the
table equal to a whole render after random changes.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from lbc.apply.state import Change, changes
from lbc.backends.iptables.dispatch import SPLIT_ABOVE, Entry
from lbc.backends.iptables.render import LARGE_CLUSTER_ENDPOINTS, FamilyRenderer, endpoint_count
from lbc.compiler.lower import frontend_key
from lbc.ir.names import address_key
from lbc.ir.nodes import Kind, NodeInfo, Program

Lines = tuple[str, ...]
_FrontendKey = tuple[int, int, int, str, int]
# A frontend's rules for the dispatch chains: nat LBC-SERVICES, nat LBC-NODEPORTS,
# filter LBC-SERVICES, each in the order the renderer gathers them.
Rules = tuple[tuple[Entry, ...], tuple[Entry, ...], tuple[Entry, ...]]


@dataclass(frozen=True, slots=True)
class Part:
    """What one service contributes."""

    program: Program  # the service's own program (`lower.lower_service`)
    endpoints: int  # its endpoints, toward the cluster's total
    frontends: tuple[tuple[_FrontendKey, int, Rules], ...]  # (order, family, its rules)
    cluster_ips: frozenset[str]
    node_addresses: frozenset[tuple[int, str]]  # (family, address) of its node ports
    # Its own chains, as rendered for a cluster of either size (`render.is_large`): made
    # when first asked for, in the one form last asked for (a large cluster's has no
    # endpoint chain for a pool of one endpoint).
    _made: dict[bool, Mapping[str, Lines]] = field(default_factory=dict, compare=False, repr=False)

    def objects(self, large: bool) -> Mapping[str, Lines]:
        """The service's own chains in the form for a cluster of that size."""
        made = self._made.get(large)
        if made is None:
            self._made.clear()
            made = self._made[large] = _own_chains(self.program, large)
        return made

    def chain_keys(self) -> Iterable[str]:
        """The keys of its own chains, in the form last made (the form the table holds)."""
        return next(iter(self._made.values())) if self._made else self.objects(False)


def _own_chains(program: Program, large: bool) -> dict[str, Lines]:
    objects: dict[str, Lines] = {}
    for family in program.families():
        renderer = FamilyRenderer(program, family, SPLIT_ABOVE, large)
        renderer.own(renderer.frontends())
        objects.update(renderer.nat.objects(family))
        objects.update(renderer.filter.objects(family))
    return objects


def part_of(program: Program) -> Part:
    """The contribution of the program of one service (`lower.lower_service`)."""
    frontends: list[tuple[_FrontendKey, int, Rules]] = []
    node_addresses: set[tuple[int, str]] = set()
    for family in program.families():
        # The frontends' dispatch rules name no endpoint: the same at any size.
        renderer = FamilyRenderer(program, family, SPLIT_ABOVE, large=False)
        for f in renderer.frontends():
            before = (
                len(renderer.nat_services),
                len(renderer.nat_nodeports),
                len(renderer.filter_services),
            )
            renderer.dispatch(f)
            rules = (
                tuple(renderer.nat_services[before[0] :]),
                tuple(renderer.nat_nodeports[before[1] :]),
                tuple(renderer.filter_services[before[2] :]),
            )
            frontends.append((frontend_key(f), family, rules))
            if f.kind is Kind.NODE_PORT:
                node_addresses.add((family, f.address))
    return Part(
        program,
        endpoint_count(program),
        tuple(frontends),
        frozenset(program.reject_unknown),
        frozenset(node_addresses),
    )


class Table:
    """The desired iptables state, kept as per-service parts and the shared chains."""

    def __init__(self, node: NodeInfo) -> None:
        self.node = node
        self.objects: dict[str, Lines] = {}
        self.parts: dict[str, Part] = {}
        self.endpoints = 0  # of every part together
        self.large = False  # `render.is_large` of the whole: how the parts are rendered
        self._shared: set[str] = set()  # keys of the shared part
        self._made_of: object = None  # what the shared part was made from

    def update(self, parts: Mapping[str, Part | None]) -> tuple[Change, ...]:
        """Give each named service its new part (None: gone); the object changes.

        When the total of endpoints crosses `LARGE_CLUSTER_ENDPOINTS`, every
        service's chains are rendered again in the other form.
        """
        touched: dict[str, Lines | None] = {}

        def drop(part: Part) -> None:
            for key in part.chain_keys():
                touched.setdefault(key, self.objects.pop(key, None))

        for name, new in parts.items():
            old = self.parts.pop(name, None)
            if old is not None:
                drop(old)
                self.endpoints -= old.endpoints
            if new is not None:
                self.parts[name] = new
                self.endpoints += new.endpoints
        large = self.endpoints > LARGE_CLUSTER_ENDPOINTS
        if large == self.large:
            fresh: Iterable[Part | None] = parts.values()
        else:
            for name, part in self.parts.items():
                if name not in parts:
                    drop(part)
            self.large, fresh = large, list(self.parts.values())
        for new in fresh:
            for key, lines in (new.objects(large) if new is not None else {}).items():
                touched.setdefault(key, self.objects.get(key))
                self.objects[key] = lines
        self._remake_shared(touched)
        return changes(sorted(touched), touched.__getitem__, self.objects.get)

    def _remake_shared(self, touched: dict[str, Lines | None]) -> None:
        frontends = sorted(f for part in self.parts.values() for f in part.frontends)
        cluster_ips = frozenset(ip for part in self.parts.values() for ip in part.cluster_ips)
        nodes = frozenset(a for part in self.parts.values() for a in part.node_addresses)
        made_of = (tuple(frontends), cluster_ips, nodes)
        if made_of == self._made_of:
            return
        self._made_of = made_of
        shared: dict[str, Lines] = {}
        ordered_ips = sorted(cluster_ips, key=address_key)  # as lowering orders them
        families = sorted({family for _, family, _ in frontends})
        for family in families:
            renderer = FamilyRenderer(Program(self.node, (), ()), family, SPLIT_ABOVE, False)
            for _, of, (nat_services, nat_nodeports, filter_services) in frontends:
                if of == family:
                    renderer.nat_services += nat_services
                    renderer.nat_nodeports += nat_nodeports
                    renderer.filter_services += filter_services
            addresses = sorted(a for f, a in nodes if f == family)
            renderer.shared(ordered_ips, addresses)
            shared.update(renderer.filter.objects(family))
            shared.update(renderer.nat.objects(family))
        for key in self._shared - shared.keys():
            touched.setdefault(key, self.objects.pop(key, None))
        for key, lines in shared.items():
            if self.objects.get(key) != lines:
                touched.setdefault(key, self.objects.get(key))
                self.objects[key] = lines
        self._shared = set(shared)
