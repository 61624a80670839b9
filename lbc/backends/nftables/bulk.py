"""Loading the whole `inet lbc` table into an empty ruleset without libnftables' parse.

At 10k services x 10 endpoints the table is 120k rules and tens of thousands of set
elements. `nft -f` of its text spends more time in libnftables (parsing, evaluating,
600+ MiB of memory) than the kernel spends adding the objects, and asks the kernel for
an acknowledgement of every message, which doubles the kernel's share. A load from
empty therefore goes in several transactions:

1. libnftables writes the skeleton: the table, the shared chains (base chains and
   the chains that look up the shared sets and maps), the declarations of every set
   and map, the dynamic affinity sets, and the interval sets with their elements;
2. netlink batches encoded here add every other chain with its rules, about 40k
   rules a batch;
3. a last one adds the elements of the other sets and maps.

Each batch is encoded while the kernel works through the one before (sending
releases the GIL), so the encoding costs little more than the first batch.

Each batch asks for one acknowledgement, of its last message (the kernel reports
any failing message regardless). Until the last commits, no packet reaches a
service chain: the dispatch maps are empty, as they were when there was no table.
If a batch fails, the table is deleted again, so the load is all or nothing.
`NftablesKernel.commit` takes this path only into an empty ruleset; if the encoder
meets something it does not write (`Unencodable`), the table is deleted and loaded
whole through libnftables as before.

Pool chains, nearly all of the rules, are encoded from byte strings made once per
distinct part (protocol, weight fraction, port) rather than rule by rule through
`netlink.rule_expressions`; a test holds the two byte-identical. Elements and the
batch framing are `netlink`'s, shared with a session's changes.
"""

from __future__ import annotations

import functools
import socket
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from lbc.apply.state import State
from lbc.backends.nftables import names as n
from lbc.backends.nftables.expr import AnyChain, Element, NamedSet, Ruleset
from lbc.backends.nftables.generation import NETLINK_NETFILTER
from lbc.backends.nftables.incremental import ELEMENT, SHARED_CHAINS, TableState
from lbc.backends.nftables.netlink import (
    L4PROTO,
    NEWCHAIN,
    NEWRULE,
    NLA_F_NESTED,
    NLM_F_APPEND,
    NLM_F_CREATE,
    Unencodable,
    acknowledged,
    element_messages,
    frame,
    rule_expressions,
    rule_message,
    string,
)
from lbc.backends.nftables.render import PoolChain, shares_of

Message = tuple[int, int, bytes]  # nf_tables message type, flags, attributes
Lines = tuple[str, ...]
SO_SNDBUFFORCE, SO_RCVBUFFORCE = 32, 33
_NESTED_LIST = 4 | NLA_F_NESTED  # NFTA_RULE_EXPRESSIONS
_RULE_FLAGS = NLM_F_CREATE | NLM_F_APPEND


@dataclass(frozen=True, slots=True)
class RulesetState(State):
    """A desired state that also carries the ruleset it was read from (for the bulk
    load); compared by its objects only."""

    ruleset: Ruleset | None = field(default=None, compare=False)


@dataclass
class Load:
    """A load from empty: the skeleton's objects (for libnftables), then the chains of
    single services with their rules and the elements of the sets the skeleton
    declares, for netlink batches (`batches`)."""

    table: str
    skeleton: dict[str, Lines]
    chains: list[AnyChain]
    elements: dict[str, list[Element]]

    def batches(self) -> list[Callable[[], list[Message]]]:
        """Encoders of the batches, in the order they must be sent: every chain and the
        first rules, more rules, the elements last. Each raises `Unencodable` for what
        this module does not write (not expected of a rendered table)."""
        rules = PoolRules(self.table)
        groups: list[list[AnyChain]] = [[]]
        count = 0
        for c in self.chains:
            if count >= RULES_PER_BATCH:
                groups.append([])
                count = 0
            groups[-1].append(c)
            count += len(c.backends) if isinstance(c, PoolChain) else 1
        encoders: list[Callable[[], list[Message]]] = []
        for i, group in enumerate(groups):
            created = self.chains if i == 0 else ()
            encoders.append(functools.partial(_chain_messages, self.table, created, group, rules))
        if self.elements:
            encoders.append(self.element_messages)
        return encoders

    def element_messages(self) -> list[Message]:
        """The messages adding the elements."""
        out: list[Message] = []
        for set_name in sorted(self.elements):
            out += element_messages(self.table, set_name, self.elements[set_name])
        return out


# Rules per batch of a load: while the kernel adds one batch (sending releases the
# GIL), the next is encoded; the first, which waits for nothing, stays small.
RULES_PER_BATCH = 40_000


def load_of(desired: State, table: str) -> Load | None:
    """The load of `desired` from empty, or None when the state does not carry its
    structures (a state read from text)."""
    chains: list[AnyChain]
    elements: dict[str, list[Element]] = {}
    if isinstance(desired, RulesetState) and desired.ruleset is not None:
        ruleset = desired.ruleset
        chains = [c for c in ruleset.chains if c.name not in SHARED_CHAINS]
        for s in ruleset.sets:
            if _bulk(s):
                elements[s.name] = list(s.elements)
    elif isinstance(desired, TableState) and desired.table is not None:
        kept = desired.table
        chains = [c for k, c in kept.sources.items() if k.startswith("chain ")]  # type: ignore[misc]
        for (set_name, _), element in kept.element_sources.items():
            elements.setdefault(set_name, []).append(element)
    else:
        return None
    skeleton: dict[str, Lines] = {}
    for key, lines in desired.objects.items():
        kind, _, name = key.partition(" ")
        if kind == "chain":
            if name in SHARED_CHAINS:
                skeleton[key] = lines
        elif name in elements and not _interval(lines):
            skeleton[key] = tuple(line for line in lines if not line.startswith(ELEMENT))
        else:
            skeleton[key] = lines  # affinity and interval sets: whole, by libnftables
            elements.pop(name, None)
    return Load(table, skeleton, chains, elements)


def _bulk(s: NamedSet) -> bool:
    """Whether the batch adds this set's elements (not dynamic, not an interval set)."""
    return not s.name.startswith(n.AFFINITY) and "interval" not in s.flags


def _interval(lines: Lines) -> bool:
    return any(line.startswith("flags") and "interval" in line for line in lines[:4])


def _chain_messages(
    table: str, created: Sequence[AnyChain], chains: Sequence[AnyChain], rules: PoolRules
) -> list[Message]:
    """NEWCHAIN for each of `created` (all chains, so that rules may jump to any),
    then the rules of `chains`."""
    table_attr = string(1, table)
    out: list[Message] = [(NEWCHAIN, NLM_F_CREATE, table_attr + string(3, c.name)) for c in created]
    for c in chains:
        if isinstance(c, PoolChain) and c.affinity is None:
            out += rules.messages(c)
        else:
            out += [rule_message(table, c.name, r) for r in c.rules]
    return out


class PoolRules:
    """The NEWRULE messages of pool chains without affinity, from parts made once."""

    def __init__(self, table: str) -> None:
        self.table_attr = string(1, table)
        self._fixed: dict[tuple[int, str], tuple[bytes, bytes, bytes]] = {}
        self._choice: dict[tuple[int, int], bytes] = {}
        self._port: dict[int, bytes] = {}

    def _parts(self, family: int, proto: str) -> tuple[bytes, bytes, bytes]:
        """The l4proto match, the immediate-address expression without its address,
        and the nat expression."""
        found = self._fixed.get((family, proto))
        if found is None:
            if proto not in L4PROTO:
                raise Unencodable(f"protocol {proto}")
            sample = "0.0.0.0" if family == 4 else "::"
            meta, cmp, immediate, _, nat = _sample(family, proto, sample, 1, (1,))
            size = 4 if family == 4 else 16
            found = self._fixed[(family, proto)] = (meta + cmp, immediate[:-size], nat)
        return found

    def _choice_of(self, k: int, m: int) -> bytes:
        """numgen, byteorder and cmp of `numgen random mod m < k` (k/m reduced)."""
        found = self._choice.get((k, m))
        if found is None:
            expressions = _sample(4, "tcp", "0.0.0.0", 1, (k, m - k))
            found = self._choice[(k, m)] = b"".join(expressions[2:5])
        return found

    def _port_of(self, port: int) -> bytes:
        found = self._port.get(port)
        if found is None:
            found = self._port[port] = _sample(4, "tcp", "0.0.0.0", port, (1,))[3]
        return found

    def messages(self, chain: PoolChain) -> list[Message]:
        family = chain.family
        l4, head, nat = self._parts(family, chain.proto)
        af = socket.AF_INET if family == 4 else socket.AF_INET6
        pton = socket.inet_pton
        prefix = self.table_attr + string(2, chain.name)
        choices = [self._choice_of(k, m) for k, m in shares_of(chain.weights)]
        choices.append(b"")  # the last backend takes what is left: no numgen
        out: list[Message] = []
        for (address, port), choice in zip(chain.backends, choices, strict=True):
            body = b"".join((l4, choice, head, pton(af, address), self._port_of(port), nat))
            header = struct.pack("=HH", 4 + len(body), _NESTED_LIST)
            out.append((NEWRULE, _RULE_FLAGS, prefix + header + body))
        return out


def _sample(
    family: int, proto: str, address: str, port: int, weights: tuple[int, ...]
) -> list[bytes]:
    """The generic encoder's expressions of the first rule of a sample pool chain."""
    backends = tuple((address, port) for _ in weights)
    chain = PoolChain("sample", family, backends, proto, weights, None)
    return rule_expressions(chain.rules[0])


# --- sending -------------------------------------------------------------------------------
def send(messages: Sequence[Message], first_sequence: int = 1) -> None:
    """Send `messages` as one transaction on a new socket of the current namespace;
    raises `BatchError` with the kernel's reason for the first message it refused."""
    payload = frame(messages, first_sequence, ack_each=False)
    last = first_sequence + len(messages)
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER) as sock:
        # The batch goes in one message (the kernel takes a transaction from one
        # sendmsg); the default buffer limit is far smaller than a whole table.
        try:
            sock.setsockopt(socket.SOL_SOCKET, SO_SNDBUFFORCE, len(payload) + (1 << 16))
            sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, 1 << 22)
        except PermissionError:  # no CAP_NET_ADMIN over this namespace's buffers
            raise Unencodable("a batch this large (the socket's buffer cannot grow)") from None
        sock.bind((0, 0))
        sock.sendall(payload)
        sock.settimeout(60)
        acknowledged(sock, first_sequence, last)
