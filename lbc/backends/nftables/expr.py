"""The few nftables expressions and statements lbc uses, each printable two ways.

Every node knows its nft text (`text()`) and its libnftables JSON (`json()`, the
shapes of libnftables-json(5)), so the two outputs of the backend are made from one
ruleset and cannot drift apart.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol, TypeAlias

Json: TypeAlias = Any


@dataclass(frozen=True, slots=True)
class Value:
    """A literal: an address, a protocol name, a port or a mark."""

    literal: str | int
    hex: bool = False  # marks read best in hex in text; JSON always takes the number

    def text(self) -> str:
        literal = self.literal
        if type(literal) is str:
            return literal
        if self.hex:
            return f"0x{literal:08x}"  # as `nft list` prints marks
        return str(literal)

    def json(self) -> Json:
        return self.literal


@dataclass(frozen=True, slots=True)
class Prefix:
    """An address prefix, `10.244.0.0/16`."""

    address: str
    length: int

    def text(self) -> str:
        return f"{self.address}/{self.length}"

    def json(self) -> Json:
        return {"prefix": {"addr": self.address, "len": self.length}}


@dataclass(frozen=True, slots=True)
class Payload:
    """A packet header field, `ip daddr` or `th dport`."""

    protocol: str
    field: str

    def text(self) -> str:
        return f"{self.protocol} {self.field}"

    def json(self) -> Json:
        return {"payload": {"protocol": self.protocol, "field": self.field}}


@dataclass(frozen=True, slots=True)
class Meta:
    """Packet metadata, `meta mark` or `meta l4proto`."""

    key: str

    def text(self) -> str:
        return f"meta {self.key}"

    def json(self) -> Json:
        return {"meta": {"key": self.key}}


@dataclass(frozen=True, slots=True)
class Ct:
    """Connection-tracking state, `ct state`."""

    key: str

    def text(self) -> str:
        return f"ct {self.key}"

    def json(self) -> Json:
        return {"ct": {"key": self.key}}


@dataclass(frozen=True, slots=True)
class Fib:
    """A route lookup, `fib saddr type` (is the source one of this host's addresses)."""

    flag: str
    result: str

    def text(self) -> str:
        return f"fib {self.flag} {self.result}"

    def json(self) -> Json:
        return {"fib": {"result": self.result, "flags": [self.flag]}}


@dataclass(frozen=True, slots=True)
class Numgen:
    """A uniform random number in [0, mod), drawn anew for every rule that asks."""

    mod: int

    def text(self) -> str:
        return f"numgen random mod {self.mod}"

    def json(self) -> Json:
        return {"numgen": {"mode": "random", "mod": self.mod, "offset": 0}}


@dataclass(frozen=True, slots=True)
class BinOp:
    """A bitwise operation, `meta mark & 0x4000`."""

    op: str  # "&", "|" or "^"
    left: Expr
    right: Value

    def text(self) -> str:
        return f"{self.left.text()} {self.op} {self.right.text()}"

    def json(self) -> Json:
        return {self.op: [self.left.json(), self.right.json()]}


@dataclass(frozen=True, slots=True)
class Concat:
    """Expressions joined into one key, `ip daddr . meta l4proto . th dport`."""

    items: tuple[Expr, ...]

    def text(self) -> str:
        return " . ".join([i.text() for i in self.items])

    def json(self) -> Json:
        return {"concat": [i.json() for i in self.items]}


@dataclass(frozen=True, slots=True)
class SetRef:
    """A named set or map, `@service-ips4`."""

    name: str

    def text(self) -> str:
        return f"@{self.name}"

    def json(self) -> Json:
        return f"@{self.name}"


Expr: TypeAlias = Value | Prefix | Payload | Meta | Ct | Fib | Numgen | BinOp | Concat | SetRef


@dataclass(frozen=True, slots=True)
class Match:
    """`left op right`; `==` is implicit in text, `in` is a flag test (`ct state new`)."""

    left: Expr
    right: Expr
    op: str = "=="

    def text(self) -> str:
        op = self.op
        if op == "==" or op == "in":
            return f"{self.left.text()} {self.right.text()}"
        return f"{self.left.text()} {op} {self.right.text()}"

    def json(self) -> Json:
        return {"match": {"op": self.op, "left": self.left.json(), "right": self.right.json()}}


@dataclass(frozen=True, slots=True)
class Verdict:
    """`goto chain`, `jump chain`, `drop`, `accept` or `return`."""

    kind: str
    target: str | None = None

    def text(self) -> str:
        return f"{self.kind} {self.target}" if self.target else self.kind

    def json(self) -> Json:
        return {self.kind: {"target": self.target} if self.target else None}


@dataclass(frozen=True, slots=True)
class Vmap:
    """Look `key` up in a verdict map and take the verdict it holds, if any."""

    key: Expr
    map: str

    def text(self) -> str:
        return f"{self.key.text()} vmap @{self.map}"

    def json(self) -> Json:
        return {"vmap": {"key": self.key.json(), "data": f"@{self.map}"}}


@dataclass(frozen=True, slots=True)
class Mangle:
    """`key set value`, e.g. `meta mark set meta mark | 0x4000`."""

    key: Meta
    value: Expr

    def text(self) -> str:
        return f"{self.key.text()} set {self.value.text()}"

    def json(self) -> Json:
        return {"mangle": {"key": self.key.json(), "value": self.value.json()}}


@dataclass(frozen=True, slots=True)
class Dnat:
    """Destination NAT to one backend, `dnat ip to 10.244.1.7:9376`."""

    family: str  # "ip" or "ip6": an inet table must say which
    address: str
    port: int

    def text(self) -> str:
        host = f"[{self.address}]" if self.family == "ip6" else self.address
        return f"dnat {self.family} to {host}:{self.port}"

    def json(self) -> Json:
        return {"dnat": {"family": self.family, "addr": self.address, "port": self.port}}


@dataclass(frozen=True, slots=True)
class Masquerade:
    """Source NAT to the outgoing interface's address, ports chosen fully at random."""

    def text(self) -> str:
        return "masquerade fully-random"

    def json(self) -> Json:
        return {"masquerade": {"flags": "fully-random"}}


@dataclass(frozen=True, slots=True)
class Reject:
    """Reject with port-unreachable: icmpx in an inet table, or icmp/icmpv6 after a match
    that fixes the family (as `nft list` then prints it)."""

    family: int | None = None

    def text(self) -> str:
        if self.family is None:
            return "reject"
        return f"reject with {self._type()} port-unreachable"

    def json(self) -> Json:
        return {"reject": {"type": self._type(), "expr": "port-unreachable"}}

    def _type(self) -> str:
        return {None: "icmpx", 4: "icmp", 6: "icmpv6"}[self.family]


@dataclass(frozen=True, slots=True)
class SetUpdate:
    """Add `key` to a dynamic set, or refresh its timeout: `update @set { ip saddr }`."""

    set: str
    key: Expr

    def text(self) -> str:
        return f"update @{self.set} {{ {self.key.text()} }}"

    def json(self) -> Json:
        return {"set": {"op": "update", "elem": self.key.json(), "set": f"@{self.set}"}}


Statement: TypeAlias = Match | Verdict | Vmap | Mangle | Dnat | Masquerade | Reject | SetUpdate


@dataclass(frozen=True, slots=True)
class Rule:
    """Statements run left to right; an optional comment says why the rule exists."""

    statements: tuple[Statement, ...]
    comment: str | None = None

    def text(self) -> str:
        body = " ".join([s.text() for s in self.statements])
        return f'{body} comment "{self.comment}"' if self.comment else body

    def json(self) -> list[Json]:
        return [s.json() for s in self.statements]


@dataclass(frozen=True, slots=True)
class Element:
    """One set element, or one map element with the verdict it maps to."""

    key: Expr
    verdict: Verdict | None = None

    def text(self) -> str:
        key = self.key.text()
        return f"{key} : {self.verdict.text()}" if self.verdict else key

    def json(self) -> Json:
        return [self.key.json(), self.verdict.json()] if self.verdict else self.key.json()


@dataclass(frozen=True, slots=True)
class NamedSet:
    """A named set (or verdict map, with `is_map`) and its elements."""

    name: str
    key_types: tuple[str, ...]
    elements: tuple[Element, ...] = ()
    is_map: bool = False
    flags: tuple[str, ...] = ()
    timeout: int | None = None  # seconds; elements of a dynamic set expire after it


@dataclass(frozen=True, slots=True)
class BaseHook:
    """Where a base chain hooks into netfilter."""

    type: str
    hook: str
    priority_text: str
    priority: int


@dataclass(frozen=True, slots=True)
class Chain:
    """A chain: base (hooked, policy accept) or regular (reached by goto/jump)."""

    name: str
    rules: tuple[Rule, ...]
    base: BaseHook | None = None

    def lines(self) -> list[str]:
        """The text of each rule."""
        return [r.text() for r in self.rules]


class AnyChain(Protocol):
    """What printers read of a chain: a `Chain`, or one whose rules are made on demand."""

    @property
    def name(self) -> str: ...

    @property
    def rules(self) -> tuple[Rule, ...]: ...

    @property
    def base(self) -> BaseHook | None: ...

    def lines(self) -> list[str]:
        """The text of each rule, as `[r.text() for r in rules]` (printed without them)."""
        ...


@dataclass(frozen=True, slots=True)
class Ruleset:
    """lbc's whole table: sets and maps, then chains, in canonical order."""

    family: str
    table: str
    sets: tuple[NamedSet, ...]
    chains: tuple[AnyChain, ...]
