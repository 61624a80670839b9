"""The dispatch tree: frontend rules spread over chains keyed by bits of what they match.

In kube-proxy's layout the first packet of every connection walks one rule per
service in KUBE-SERVICES: about 10 ns a service, 0.3 ms at 30,000 services. Here a
chain that would hold more than `SPLIT_ABOVE` frontend rules holds instead one
branch rule per `STRIDE` bits of the key (so at most 16), each jumping to a child
chain that holds the rules under that prefix::

    -A LBC-SERVICES -d 10.96.0.0/16 -j LBC-DSP-...    # the service CIDR's 16 /16s
    -A LBC-DSP-...  -d 10.97.16.0/20 -j LBC-DSP-...   # that /16's /20s
    -A LBC-DSP-...  -d 10.97.18.0/24 -j LBC-DSP-...   # that /20's /24s
    -A LBC-DSP-...  -d 10.97.18.5/32 -p tcp ... --dport 80 -j LBC-SVC-...   # a leaf

so a packet walks at most 16 rules a level and a handful of levels. The key of a
frontend rule is its destination address, then its protocol (one 4-bit digit), then
its port (16 bits): many ports of one address are split by protocol and port ranges
(`-d 10.0.0.1/32 -p tcp -m tcp --dport 30720:31743`). Node ports have no address in
their key. A child with one rule is not a chain: the rule sits in the parent, where
it costs what a jump would. A split chain whose rules would all fall under one child
is skipped (the root's too): the parent jumps to where the keys part, here from the
root straight to /16s of 10.96.0.0/12.

Chain names come from content only (`LBC-DSP-` and a digest of family, table, root
chain and the branch match), so adding a service changes the chains on its path: one
leaf gains a rule, or, when the leaf overflows, that leaf splits. Below the threshold
there is no tree and the root chain is kube-proxy's flat list.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Sequence
from dataclasses import dataclass, field
from itertools import groupby

from lbc.backends.iptables import names as n
from lbc.ir.names import digest
from lbc.ir.nodes import Proto

STRIDE = 4  # bits a level decides: at most 2**4 = 16 branch rules in a chain
SPLIT_ABOVE = 16  # a chain with more frontend rules than this becomes a branch chain
PORT_BITS = 16
PROTO_BITS = STRIDE  # the protocol takes one digit, so levels stay aligned
_PROTO_CODE = {proto: i for i, proto in enumerate(Proto)}
_CODE_PROTO = dict(enumerate(Proto))


def address_text(family: int, value: int) -> str:
    """An address as iptables-save prints it (glibc's inet_ntop, dotted tails included)."""
    if family == 4:
        return socket.inet_ntoa(value.to_bytes(4, "big"))
    words = [(value >> (112 - 16 * i)) & 0xFFFF for i in range(8)]
    tail = socket.inet_ntoa((value & 0xFFFFFFFF).to_bytes(4, "big"))
    # inet_ntop writes an IPv4-compatible or IPv4-mapped address with a dotted tail.
    if words[:6] == [0] * 6 and words[6]:
        return f"::{tail}"
    if words[:5] == [0] * 5 and words[5] == 0xFFFF:
        return f"::ffff:{tail}"
    return ipaddress.IPv6Address(value).compressed


def _address_int(address: str) -> int:
    """`int(ip_address(address))`; a dotted quad through inet_pton, in C."""
    try:
        return int.from_bytes(socket.inet_pton(socket.AF_INET, address))
    except OSError:
        return int(ipaddress.ip_address(address))


@dataclass(frozen=True, slots=True)
class KeySpace:
    """How keys read: an address of `address_bits` (0: none), a protocol digit, a port."""

    family: int
    address_bits: int

    @property
    def width(self) -> int:
        """Bits in a key."""
        return self.address_bits + PROTO_BITS + PORT_BITS

    def key(self, address: str | None, proto: Proto, port: int) -> int:
        """The key of a rule matching `-d address -p proto --dport port`."""
        head = 0 if address is None else _address_int(address)
        return (head << (PROTO_BITS + PORT_BITS)) | (_PROTO_CODE[proto] << PORT_BITS) | port

    def match(self, value: int, length: int) -> str:
        """The match of the branch rule for the keys starting with `length` bits of `value`.

        In iptables-save's order: `-d NET/LEN`, `-p PROTO`, `-m PROTO --dport LO:HI`.
        """
        words = []
        if self.address_bits:
            address = value >> (PROTO_BITS + PORT_BITS)
            prefix = min(length, self.address_bits)
            words.append(f"-d {address_text(self.family, address)}/{prefix}")
        if length >= self.address_bits + PROTO_BITS:
            proto = _CODE_PROTO[(value >> PORT_BITS) & ((1 << PROTO_BITS) - 1)]
            words.append(f"-p {proto}")
            fixed = length - self.address_bits - PROTO_BITS
            if fixed:
                low = value & ((1 << PORT_BITS) - 1)
                high = low | ((1 << (PORT_BITS - fixed)) - 1)
                ports = f"{low}" if low == high else f"{low}:{high}"
                words.append(f"-m {proto} --dport {ports}")
        return " ".join(words)


@dataclass(frozen=True, slots=True)
class Entry:
    """A frontend rule (without `-A CHAIN`) and the key of the packets it matches."""

    key: int
    rule: str


@dataclass
class Tree:
    """What a root chain holds: its own rules and the dispatch chains under it, in preorder."""

    rules: list[str]
    chains: dict[str, list[str]] = field(default_factory=dict)


def build(
    entries: Sequence[Entry],
    space: KeySpace,
    label: str,
    split_above: int | None = SPLIT_ABOVE,
) -> Tree:
    """Spread `entries` over a tree of chains; `label` (family, table, root) seeds the names.

    With `split_above` None, or no more entries than that, the root holds them all, in
    the order given (kube-proxy's flat chain).
    """
    if split_above is None or len(entries) <= split_above:
        return Tree([e.rule for e in entries])
    builder = _Builder(space, label, split_above)
    # Sorting is stable: rules with one key (a frontend's source ranges) keep their order.
    ordered = sorted(entries, key=lambda e: e.key)
    length = builder.parting(ordered, 0)
    if length == space.width:
        return Tree([e.rule for e in ordered])
    return Tree(builder.split(ordered, length), builder.chains)


@dataclass
class _Builder:
    space: KeySpace
    label: str
    split_above: int
    chains: dict[str, list[str]] = field(default_factory=dict)

    def parting(self, entries: list[Entry], length: int) -> int:
        """How many leading bits all of `entries` (sorted) share, in whole `STRIDE`s.

        A chain that would hold one branch rule is skipped this way: the tree goes
        straight down to where the keys part.
        """
        width = self.space.width
        while length < width:
            shift = width - length - STRIDE
            if entries[0].key >> shift != entries[-1].key >> shift:
                break
            length += STRIDE
        return length

    def split(self, entries: list[Entry], length: int) -> list[str]:
        """The rules of a chain that branches on the `STRIDE` bits after `length`."""
        shift = self.space.width - length - STRIDE

        def digit(entry: Entry) -> int:
            return entry.key >> shift

        return [
            self.place(list(group), length + STRIDE) for _, group in groupby(entries, key=digit)
        ]

    def place(self, entries: list[Entry], length: int) -> str:
        """The parent's rule for `entries`, which share their first `length` bits."""
        if len(entries) == 1:
            return entries[0].rule
        width = self.space.width
        splits = len(entries) > self.split_above
        if splits:
            length = self.parting(entries, length)
            # Equal keys cannot be told apart: they stay together, however many.
            splits = length < width
        shift = width - length
        match = self.space.match(entries[0].key >> shift << shift, length)
        chain = n.DSP + digest(f"{self.label} {match}")
        self.chains[chain] = []  # declared before its children: the file reads top down
        self.chains[chain] = self.split(entries, length) if splits else [e.rule for e in entries]
        return f"{match} -j {chain}"
