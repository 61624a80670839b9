"""The `inet lbc` table kept per service, so that a change rebuilds only its services.

The table is the union of what each service contributes plus a shared part:
- each service's own objects: its pool, external and endpoint chains and affinity
  sets, named from its content, never shared with another service;
- its elements of the shared sets and maps (`service-ips4`, `cluster-ips6`, ...),
  counted, because two services can add the same element (a node address to
  `nodeport-ips4`, a cluster IP two services share to `cluster-ips4`);
- the shared chains and the declarations of the shared sets, which depend on the
  services only through which sets have elements, which families have frontends
  and whether any empty frontend rejects (`render.shared_chains`).

`Table.update` swaps the contributions of the services that changed and returns the
object changes: the work is proportional to the change, not to the table. A test
proves that the table equals the whole-program build after any sequence of updates.
"""

from __future__ import annotations

from bisect import bisect_left, insort
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from lbc.apply.state import Change, State, changes
from lbc.backends.nftables import names as n
from lbc.backends.nftables.expr import AnyChain, Concat, Element, NamedSet, Ruleset, Value
from lbc.backends.nftables.render import build, set_shapes, shared_chains
from lbc.backends.nftables.text import declaration, hook_line
from lbc.ir.nodes import NodeInfo, Program

ELEMENT = "element "
Lines = tuple[str, ...]
SHARED_CHAINS = frozenset(
    {
        *n.BASE_CHAINS,
        n.SERVICES,
        n.FIREWALL_CHECK,
        n.ENDPOINTS_CHECK,
        n.REJECT_CHAIN,
        n.CLUSTER_IPS_CHECK,
    }
)


def chain_lines(c: AnyChain) -> Lines:
    """A chain as the kernel adapter keeps it: the hook line (base chains), then rules."""
    hook = hook_line(c)
    fast = getattr(c, "lines", None)  # pool chains print their rules' text directly
    rules = fast() if fast is not None else [r.text() for r in c.rules]
    return (hook, *rules) if hook is not None else tuple(rules)


def set_key(s: NamedSet) -> str:
    """`map NAME` or `set NAME`, the object's key."""
    return f"{'map' if s.is_map else 'set'} {s.name}"


def set_lines(s: NamedSet, elements: Iterable[str]) -> Lines:
    """A set as the kernel adapter keeps it: declaration, then sorted `element` lines."""
    return (*declaration(s), *sorted(elements))


def element_line(e: Element) -> str:
    """`element KEY [: VERDICT]`: `e.text()` with the usual keys (plain values, joined)
    made without a call per value (a large table has hundreds of thousands)."""
    key = e.key
    if type(key) is Concat and e.verdict is None:
        parts = []
        for item in key.items:
            if type(item) is not Value or item.hex:
                return ELEMENT + e.text()
            literal = item.literal
            parts.append(literal if type(literal) is str else str(literal))
        return ELEMENT + " . ".join(parts)
    return ELEMENT + e.text()


def objects(ruleset: Ruleset) -> dict[str, Lines]:
    """Every object of `ruleset` in the kernel adapter's canonical form (`kernel.parse`)."""
    out: dict[str, Lines] = {}
    for s in ruleset.sets:
        out[set_key(s)] = set_lines(s, [element_line(e) for e in s.elements])
    for c in ruleset.chains:
        out[f"chain {c.name}"] = chain_lines(c)
    return out


@dataclass(frozen=True, slots=True)
class Part:
    """What one service contributes to the table."""

    objects: Mapping[str, Lines]  # its own chains and affinity sets
    elements: tuple[tuple[str, str], ...]  # (shared set name, element line)
    families: frozenset[int]  # the families it has frontends in
    rejects: bool  # some frontend of it rejects (it needs the reject chain)
    # The same as structures, for writers that need more than text (netlink):
    sources: Mapping[str, AnyChain | NamedSet]  # object key -> chain or set
    element_sources: tuple[Element, ...]  # aligned with `elements`


def part_of(program: Program) -> Part:
    """The contribution of the program of one service (`lower.lower_service`)."""
    ruleset = build(program)
    own: dict[str, Lines] = {}
    sources: dict[str, AnyChain | NamedSet] = {}
    elements: list[tuple[str, str]] = []
    element_sources: list[Element] = []
    rejects = False
    for c in ruleset.chains:
        if c.name in SHARED_CHAINS:
            rejects = rejects or c.name == n.REJECT_CHAIN
        else:
            own[f"chain {c.name}"] = chain_lines(c)
            sources[f"chain {c.name}"] = c
    for s in ruleset.sets:
        if s.name.startswith(n.AFFINITY):
            own[set_key(s)] = set_lines(s, ())
            sources[set_key(s)] = s
        else:
            elements += [(s.name, ELEMENT + e.text()) for e in s.elements]
            element_sources += s.elements
    return Part(
        own,
        tuple(elements),
        frozenset(program.families()),
        rejects,
        sources,
        tuple(element_sources),
    )


@dataclass(frozen=True, slots=True)
class TableState(State):
    """A desired state that also carries the table it came from (for netlink writers)."""

    table: Table | None = None


class ConflictError(ValueError):
    """Two services made the same object: only a whole build can say what it is."""


class Table:
    """The desired `inet lbc` table, kept as per-service parts and their union."""

    def __init__(self, node: NodeInfo) -> None:
        self.node = node
        self.objects: dict[str, Lines] = {}  # the whole desired table
        self.parts: dict[str, Part] = {}
        self._refs: Counter[tuple[str, str]] = Counter()
        # Shared set name -> its element lines, kept sorted (bisect) so that a change
        # costs no sort of a 100k-element set.
        self._elements: dict[str, list[str]] = {}
        # What the last update did to each shared set (element lines gone, came), and
        # the lines of each object it touched before it: writers that diff sets use it.
        self.last_delta: dict[str, tuple[list[str], list[str]]] = {}
        self.last_before: dict[str, Lines | None] = {}
        self._made_of: tuple[object, ...] | None = None  # what the shared chains came from
        self._families: Counter[int] = Counter()
        self._rejecting = 0
        # For netlink writers: the chain or set of each service object, and the element
        # of each element line (those of the last update's removed parts included).
        self.sources: dict[str, AnyChain | NamedSet] = {}
        self.element_sources: dict[tuple[str, str], Element] = {}
        self._gone_elements: dict[tuple[str, str], Element] = {}

    def update(self, parts: Mapping[str, Part | None]) -> tuple[Change, ...]:
        """Give each named service its new part (None: the service is gone).

        Returns the object changes in key order. Raises `ConflictError`, with the
        table unchanged, when a new part would make an object another service has.
        """
        replaced = {key for name in parts if name in self.parts for key in self.parts[name].objects}
        made: set[str] = set()
        for name, new in parts.items():
            for key in new.objects if new is not None else ():
                if key in made or (key in self.objects and key not in replaced):
                    raise ConflictError(f"{name} makes {key}, which another service makes too")
                made.add(key)
        touched: dict[str, Lines | None] = {}  # key -> its lines before this update
        sets: set[str] = set()  # shared sets whose elements changed
        self._gone_elements = {}
        self._came: dict[str, list[str]] = {}
        self._went: dict[str, list[str]] = {}
        for name in parts:
            old = self.parts.pop(name, None)
            if old is not None:
                self._remove(old, touched, sets)
        for name, new in parts.items():
            if new is not None:
                self.parts[name] = new
                self._add(new, touched, sets)
        self._shared(touched, sets)
        self.last_before = touched
        self.last_delta = {}
        for name in sets:
            went, came = set(self._went.get(name, ())), set(self._came.get(name, ()))
            self.last_delta[name] = (sorted(went - came), sorted(came - went))
        return self._changes(touched)

    def _remove(self, part: Part, touched: dict[str, Lines | None], sets: set[str]) -> None:
        for key in part.objects:
            self._put(key, None, touched)
            self.sources.pop(key, None)
        for ref, element in zip(part.elements, part.element_sources, strict=True):
            self._refs[ref] -= 1
            if not self._refs[ref]:
                del self._refs[ref]
                lines = self._elements[ref[0]]
                del lines[bisect_left(lines, ref[1])]
                self._went.setdefault(ref[0], []).append(ref[1])
                self._gone_elements[ref] = self.element_sources.pop(ref, element)
                sets.add(ref[0])
        self._families.subtract(part.families)
        self._rejecting -= part.rejects

    def _add(self, part: Part, touched: dict[str, Lines | None], sets: set[str]) -> None:
        for key, lines in part.objects.items():
            self._put(key, lines, touched)
        self.sources.update(part.sources)
        for ref, element in zip(part.elements, part.element_sources, strict=True):
            self._refs[ref] += 1
            if self._refs[ref] == 1:
                insort(self._elements.setdefault(ref[0], []), ref[1])
                self._came.setdefault(ref[0], []).append(ref[1])
                self.element_sources[ref] = element
                sets.add(ref[0])
        self._families.update(part.families)
        self._rejecting += part.rejects

    def _shared(self, touched: dict[str, Lines | None], sets: set[str]) -> None:
        """The shared chains and sets, made anew from what the parts now add up to."""
        families = tuple(sorted(f for f, count in self._families.items() if count > 0))

        def has(name: str) -> bool:
            return bool(self._elements.get(name))

        # The shared chains depend only on these; most updates leave them alone.
        made_of = (
            families,
            frozenset(k for k, v in self._elements.items() if v),
            self._rejecting > 0,
        )
        if made_of != self._made_of:
            self._made_of = made_of
            chains = shared_chains(self.node, families, has, self._rejecting > 0)
            made = {f"chain {c.name}" for c in chains}
            for c in chains:
                self._put(f"chain {c.name}", chain_lines(c), touched)
            for name in SHARED_CHAINS:
                if f"chain {name}" not in made:
                    self._put(f"chain {name}", None, touched)
        for family in (4, 6):
            for name, key_types, is_map, flags in set_shapes(family):
                shape = NamedSet(name, key_types, (), is_map, flags)
                key = set_key(shape)
                present = family in families and has(name)
                if not present:
                    self._put(key, None, touched)
                elif name in sets or key not in self.objects:
                    self._put(key, (*declaration(shape), *self._elements[name]), touched)

    def element(self, set_name: str, line: str) -> Element:
        """The element of an element line now in the table or removed by the last update."""
        ref = (set_name, line)
        found = self.element_sources.get(ref) or self._gone_elements.get(ref)
        if found is None:
            raise KeyError(ref)
        return found

    def _put(self, key: str, lines: Lines | None, touched: dict[str, Lines | None]) -> None:
        before = self.objects.get(key)
        if key not in touched:
            touched[key] = before
        if lines is None:
            self.objects.pop(key, None)
        else:
            self.objects[key] = lines

    def _changes(self, touched: Mapping[str, Lines | None]) -> tuple[Change, ...]:
        return changes(sorted(touched), touched.__getitem__, self.objects.get)
