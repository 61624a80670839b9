"""A change to `table inet lbc` as one nf_tables netlink batch, without libnftables.

libnftables (nft 1.0.6) fills its cache with every chain of the table before any
transaction that adds a rule or an element: about 4.5 µs per chain, so a one-endpoint
change to a 10k-service × 10-endpoint table (110k chains) spends a second there. The
kernel needs none of it: a rule names its table and chain, a goto names its target,
a lookup names its set. This module encodes the objects a service change touches —
regular chains and their rules, dynamic affinity sets, elements of the shared sets
and maps — as the netlink messages nft itself sends, expression for expression
(`nft --debug=netlink` prints them: the nfproto and l4proto dependencies, byte-aligned
prefixes as shorter loads, numgen results in network order), and sends them as one
batch, so the change is one transaction as before.

What it cannot encode (base chains, the shared chains with their verdict-map
lookups, interval sets, new shared sets) raises `Unencodable`, and the adapter sends
the same change through libnftables instead. Kernel tests apply changes both ways and
compare `nft list` of the results with the canonical text.
"""

from __future__ import annotations

import errno
import ipaddress
import os
import socket
import struct
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field

from lbc.apply.state import Action, Change, Plan
from lbc.backends.nftables import names as n
from lbc.backends.nftables.expr import (
    BinOp,
    Concat,
    Dnat,
    Element,
    Expr,
    Fib,
    Mangle,
    Match,
    Meta,
    NamedSet,
    Numgen,
    Payload,
    Prefix,
    Rule,
    SetRef,
    SetUpdate,
    Value,
    Verdict,
)
from lbc.backends.nftables.generation import (
    HEADER,
    NETLINK_NETFILTER,
    NFNL_SUBSYS_NFTABLES,
    NLM_F_REQUEST,
    NLMSG_ERROR,
)
from lbc.backends.nftables.incremental import ELEMENT, SHARED_CHAINS, Table

NFNL_MSG_BATCH_BEGIN = 0x10
NFNL_MSG_BATCH_END = 0x11
NFPROTO_INET = 1
NFPROTO = {4: 2, 6: 10}  # NFPROTO_IPV4, NFPROTO_IPV6

# nf_tables message types
NEWCHAIN, DELCHAIN, NEWRULE, DELRULE = 3, 5, 6, 8
NEWSET, DELSET, NEWSETELEM, DELSETELEM = 9, 11, 12, 14

NLM_F_ACK = 0x4
NLM_F_CREATE, NLM_F_APPEND = 0x400, 0x800
NLA_F_NESTED = 0x8000

VERDICT = {"goto": -4, "jump": -3, "drop": 0, "accept": 1, "return": -5}
L4PROTO = {"tcp": 6, "udp": 17, "sctp": 132}
FIELDS = {  # (family, field) -> (offset in the network header, length)
    (4, "saddr"): (12, 4),
    (4, "daddr"): (16, 4),
    (6, "saddr"): (8, 16),
    (6, "daddr"): (24, 16),
}
META = {"mark": 3, "nfproto": 15, "l4proto": 16}
PAYLOAD_NETWORK, PAYLOAD_TRANSPORT = 1, 2
CMP = {"==": 0, "!=": 1, "<": 2}
SET_TIMEOUT, SET_EVAL = 0x10, 0x20  # `flags dynamic,timeout`
KEY_TYPES = {"ipv4_addr": (7, 4), "ipv6_addr": (8, 16)}
RTN_LOCAL = 2


class Unencodable(Exception):
    """The change holds something this encoder does not write; use libnftables."""


# --- netlink attributes ------------------------------------------------------------------
def attr(kind: int, payload: bytes) -> bytes:
    """One netlink attribute, padded to four bytes."""
    size = 4 + len(payload)
    return struct.pack("=HH", size, kind) + payload + b"\0" * (-size % 4)


def nest(kind: int, *children: bytes) -> bytes:
    return attr(kind | NLA_F_NESTED, b"".join(children))


def u32(kind: int, value: int) -> bytes:
    return attr(kind, struct.pack(">I", value & 0xFFFFFFFF))


def string(kind: int, value: str) -> bytes:
    return attr(kind, value.encode() + b"\0")


def data(kind: int, value: bytes) -> bytes:
    """An nft_data value attribute (NFTA_DATA_VALUE inside `kind`)."""
    return nest(kind, attr(1, value))


def verdict_data(kind: int, verdict: Verdict) -> bytes:
    """An nft_data verdict (NFTA_DATA_VERDICT: code, chain) inside `kind`."""
    if verdict.kind not in VERDICT:
        raise Unencodable(f"verdict {verdict.kind}")
    parts = [u32(1, VERDICT[verdict.kind])]
    if verdict.target is not None:
        parts.append(string(2, verdict.target))
    return nest(kind, nest(2, *parts))


def expression(name: str, *attrs: bytes) -> bytes:
    """One NFTA_LIST_ELEM of a rule: the expression's name and its data."""
    return nest(1, string(1, name), nest(2, *attrs))


# --- values --------------------------------------------------------------------------------
def address(text: str) -> bytes:
    return ipaddress.ip_address(text).packed


def host_u32(value: int) -> bytes:
    return struct.pack("=I", value & 0xFFFFFFFF)


# The bytes of protocol names and ports in element keys, made once; addresses (nearly
# all distinct) are converted each time.
_KEY_PARTS: dict[str | int, bytes] = {p: bytes((v, 0, 0, 0)) for p, v in L4PROTO.items()}


def key_bytes(key: Expr) -> bytes:
    """A set element's key: one address, or a concatenation of 4-byte-padded fields."""
    if type(key) is Value:
        return _key_address(key.literal)
    if type(key) is not Concat:
        raise Unencodable(f"element key {key.text()}")
    out = []
    for item in key.items:
        if type(item) is not Value:
            raise Unencodable(f"element key part {item.text()}")
        literal = item.literal
        found = _KEY_PARTS.get(literal)
        if found is None:
            if type(literal) is int:
                found = _KEY_PARTS[literal] = struct.pack(">Hxx", literal)
            else:
                found = _key_address(literal)
        out.append(found)
    return b"".join(out)


def _key_address(literal: str | int) -> bytes:
    if type(literal) is not str:
        raise Unencodable(f"element key part {literal}")
    try:
        return socket.inet_pton(socket.AF_INET6 if ":" in literal else socket.AF_INET, literal)
    except OSError:
        raise Unencodable(f"element key part {literal}") from None


# A NEWSETELEM message's element list is one attribute, whose length is 16 bits.
ELEMENTS_PER_MESSAGE_BYTES = 60_000
_ELEM = 1 | NLA_F_NESTED  # NFTA_LIST_ELEM and NFTA_SET_ELEM_KEY, both nested type 1
_ELEMENTS = 3 | NLA_F_NESTED  # NFTA_SET_ELEM_LIST_ELEMENTS


def element_messages(
    table: str, set_name: str, elements: Iterable[Element], add: bool = True
) -> list[tuple[int, int, bytes]]:
    """NEWSETELEM (or DELSETELEM) messages for `elements`, as many as the attribute
    length needs.

    Each element is NFTA_LIST_ELEM { NFTA_SET_ELEM_KEY { NFTA_DATA_VALUE key }, and
    when added to a map, NFTA_SET_ELEM_DATA verdict }. Keys are multiples of four
    bytes, so no attribute here needs padding but the verdict's chain name (made by
    `verdict_data`).
    """
    head = string(1, table) + string(2, set_name)
    kind, flags = (NEWSETELEM, NLM_F_CREATE) if add else (DELSETELEM, 0)
    pack = struct.pack
    verdicts: dict[Verdict, bytes] = {}
    out: list[tuple[int, int, bytes]] = []
    items: list[bytes] = []
    size = 0
    for e in elements:
        key = key_bytes(e.key)
        length = len(key)
        verdict = e.verdict if add else None
        data = b""
        if verdict is not None:
            data = verdicts.get(verdict) or verdicts.setdefault(verdict, verdict_data(2, verdict))
        item = b"".join(
            (pack("=HHHHHH", 12 + length + len(data), _ELEM, 8 + length, _ELEM, 4 + length, 1),
             key, data)
        )  # fmt: skip
        if size + len(item) > ELEMENTS_PER_MESSAGE_BYTES:
            out.append((kind, flags, head + attr(_ELEMENTS, b"".join(items))))
            items, size = [], 0
        items.append(item)
        size += len(item)
    if items:
        out.append((kind, flags, head + attr(_ELEMENTS, b"".join(items))))
    return out


# --- rules ---------------------------------------------------------------------------------
@dataclass
class _Context:
    """What earlier matches of a rule established (nft adds each dependency once)."""

    family: int | None = None
    l4proto: str | None = None
    out: list[bytes] = field(default_factory=list)


def _meta_load(key: str, reg: int = 1) -> bytes:
    return expression("meta", u32(1, reg), u32(2, META[key]))


def _cmp(op: str, value: bytes, reg: int = 1) -> bytes:
    if op not in CMP:
        raise Unencodable(f"comparison {op}")
    return expression("cmp", u32(1, reg), u32(2, CMP[op]), data(3, value))


def _payload(base: int, offset: int, length: int, reg: int = 1) -> bytes:
    return expression("payload", u32(1, reg), u32(2, base), u32(3, offset), u32(4, length))


def _family_dependency(ctx: _Context, family: int) -> None:
    if ctx.family != family:
        ctx.out.append(_meta_load("nfproto"))
        ctx.out.append(_cmp("==", bytes([NFPROTO[family]])))
        ctx.family = family


def _address_field(ctx: _Context, payload: Payload) -> tuple[int, int]:
    family = {"ip": 4, "ip6": 6}.get(payload.protocol)
    if family is None or (family, payload.field) not in FIELDS:
        raise Unencodable(f"payload {payload.text()}")
    _family_dependency(ctx, family)
    return FIELDS[(family, payload.field)]


def _match(ctx: _Context, m: Match) -> None:
    left, right = m.left, m.right
    if isinstance(left, Meta) and left.key == "l4proto" and isinstance(right, Value):
        if m.op != "==" or not isinstance(right.literal, str) or right.literal not in L4PROTO:
            raise Unencodable(m.text())
        ctx.out += [_meta_load("l4proto"), _cmp("==", bytes([L4PROTO[right.literal]]))]
        ctx.l4proto = right.literal
        return
    if isinstance(left, Payload) and left.protocol in L4PROTO and left.field == "dport":
        if not isinstance(right, Value) or not isinstance(right.literal, int):
            raise Unencodable(m.text())
        if ctx.l4proto != left.protocol:
            ctx.out += [_meta_load("l4proto"), _cmp("==", bytes([L4PROTO[left.protocol]]))]
            ctx.l4proto = left.protocol
        ctx.out.append(_payload(PAYLOAD_TRANSPORT, 2, 2))
        ctx.out.append(_cmp(m.op, struct.pack(">H", right.literal)))
        return
    if isinstance(left, Payload):
        offset, length = _address_field(ctx, left)
        if isinstance(right, SetRef):
            ctx.out.append(_payload(PAYLOAD_NETWORK, offset, length))
            if m.op not in ("==", "!="):
                raise Unencodable(m.text())
            flags = [u32(5, 1)] if m.op == "!=" else []
            ctx.out.append(expression("lookup", string(1, right.name), u32(2, 1), *flags))
            return
        if isinstance(right, Value) and isinstance(right.literal, str):
            ctx.out.append(_payload(PAYLOAD_NETWORK, offset, length))
            ctx.out.append(_cmp(m.op, address(right.literal)))
            return
        if isinstance(right, Prefix):
            network = address(right.address)
            if right.length % 8 == 0:  # nft loads only the prefix's bytes
                size = right.length // 8
                ctx.out.append(_payload(PAYLOAD_NETWORK, offset, size))
                ctx.out.append(_cmp(m.op, network[:size]))
                return
            mask = ((1 << right.length) - 1) << (8 * length - right.length)
            mask_bytes = mask.to_bytes(length, "big")
            ctx.out.append(_payload(PAYLOAD_NETWORK, offset, length))
            ctx.out.append(
                expression(
                    "bitwise",
                    u32(1, 1),
                    u32(2, 1),
                    u32(3, length),
                    data(4, mask_bytes),
                    data(5, b"\0" * length),
                )
            )
            masked = bytes(a & b for a, b in zip(network, mask_bytes, strict=True))
            ctx.out.append(_cmp(m.op, masked))
            return
    if isinstance(left, Numgen) and isinstance(right, Value) and isinstance(right.literal, int):
        ctx.out.append(expression("numgen", u32(1, 1), u32(2, left.mod), u32(3, 1)))
        ctx.out.append(
            expression("byteorder", u32(1, 1), u32(2, 1), u32(3, 1), u32(4, 4), u32(5, 4))
        )
        ctx.out.append(_cmp(m.op, struct.pack(">I", right.literal)))
        return
    if (
        isinstance(left, Fib)
        and (left.flag, left.result) == ("saddr", "type")
        and right == Value("local")
        and m.op == "=="
    ):
        ctx.out.append(expression("fib", u32(1, 1), u32(2, 3), u32(3, 1)))
        ctx.out.append(_cmp("==", host_u32(RTN_LOCAL)))
        return
    raise Unencodable(m.text())


def _mangle(ctx: _Context, m: Mangle) -> None:
    value = m.value
    if not (
        m.key == Meta("mark")
        and isinstance(value, BinOp)
        and value.op == "|"
        and value.left == Meta("mark")
        and isinstance(value.right, Value)
        and isinstance(value.right.literal, int)
    ):
        raise Unencodable(m.text())
    bits = value.right.literal
    ctx.out.append(_meta_load("mark"))
    ctx.out.append(
        expression(
            "bitwise",
            u32(1, 1),
            u32(2, 1),
            u32(3, 4),
            data(4, host_u32(~bits)),
            data(5, host_u32(bits)),
        )
    )
    ctx.out.append(expression("meta", u32(2, META["mark"]), u32(3, 1)))


def rule_expressions(rule: Rule) -> list[bytes]:
    """The expressions nft makes of `rule` (each one NFTA_LIST_ELEM)."""
    ctx = _Context()
    for s in rule.statements:
        if isinstance(s, Match):
            _match(ctx, s)
        elif isinstance(s, Verdict):
            ctx.out.append(expression("immediate", u32(1, 0), verdict_data(2, s)))
        elif isinstance(s, Mangle):
            _mangle(ctx, s)
        elif isinstance(s, SetUpdate) and isinstance(s.key, Payload):
            offset, length = _address_field(ctx, s.key)
            ctx.out.append(_payload(PAYLOAD_NETWORK, offset, length))
            ctx.out.append(expression("dynset", string(1, s.set), u32(3, 1), u32(4, 1)))
        elif isinstance(s, Dnat):
            family = 6 if s.family == "ip6" else 4
            ctx.out.append(expression("immediate", u32(1, 1), data(2, address(s.address))))
            ctx.out.append(expression("immediate", u32(1, 2), data(2, struct.pack(">H", s.port))))
            ctx.out.append(
                expression(
                    "nat",
                    u32(1, 1),
                    u32(2, NFPROTO[family]),
                    u32(3, 1),
                    u32(5, 2),
                    u32(7, 2),
                )
            )
        else:
            raise Unencodable(s.text())
    return ctx.out


def rule_message(table: str, chain: str, rule: Rule) -> tuple[int, int, bytes]:
    """`add rule inet TABLE CHAIN ...`."""
    attrs = [string(1, table), string(2, chain), nest(4, *rule_expressions(rule))]
    if rule.comment:
        comment = rule.comment.encode() + b"\0"
        attrs.append(attr(7, bytes([0, len(comment)]) + comment))
    return NEWRULE, NLM_F_CREATE | NLM_F_APPEND, b"".join(attrs)


# --- the batch -----------------------------------------------------------------------------
@dataclass
class Batch:
    """The messages of one transaction on `table inet TABLE`, in the order given."""

    table: str
    messages: list[tuple[int, int, bytes]] = field(default_factory=list)
    _set_ids: dict[str, int] = field(default_factory=dict)

    def add_chain(self, name: str) -> None:
        attrs = string(1, self.table) + string(3, name)
        self.messages.append((NEWCHAIN, NLM_F_CREATE, attrs))

    def flush_chain(self, name: str) -> None:
        self.messages.append((DELRULE, 0, string(1, self.table) + string(2, name)))

    def delete_chain(self, name: str) -> None:
        self.messages.append((DELCHAIN, 0, string(1, self.table) + string(3, name)))

    def add_rules(self, chain: str, rules: Iterable[Rule]) -> None:
        self.messages += [rule_message(self.table, chain, r) for r in rules]

    def add_set(self, s: NamedSet) -> None:
        """A dynamic affinity set (`type ...; size 65535; flags dynamic,timeout; ...`)."""
        if s.is_map or set(s.flags) != {"dynamic", "timeout"} or len(s.key_types) != 1:
            raise Unencodable(f"set {s.name}")
        if s.key_types[0] not in KEY_TYPES or s.timeout is None:
            raise Unencodable(f"set {s.name}")
        kind, length = KEY_TYPES[s.key_types[0]]
        set_id = self._set_ids.setdefault(s.name, len(self._set_ids) + 1)
        attrs = [
            string(1, self.table),
            string(2, s.name),
            u32(3, SET_TIMEOUT | SET_EVAL),
            u32(4, kind),
            u32(5, length),
            nest(9, u32(1, 65535)),
            u32(10, set_id),
            attr(11, struct.pack(">Q", s.timeout * 1000)),
        ]
        self.messages.append((NEWSET, NLM_F_CREATE, b"".join(attrs)))

    def delete_set(self, name: str) -> None:
        self.messages.append((DELSET, 0, string(1, self.table) + string(2, name)))

    def elements(self, set_name: str, elements: Sequence[Element], add: bool) -> None:
        self.messages += element_messages(self.table, set_name, elements, add)


class BatchError(Exception):
    """The kernel refused a message of the batch (nothing was committed)."""


def frame(messages: Sequence[tuple[int, int, bytes]], first_sequence: int, ack_each: bool) -> bytes:
    """`messages` between BATCH_BEGIN and BATCH_END, numbered from `first_sequence`
    (the BEGIN) on: one transaction. Each message asks for an acknowledgement, or with
    not `ack_each` only the last (the kernel reports a failing message regardless)."""
    subsystem = struct.pack("=BBH", socket.AF_UNSPEC, 0, socket.htons(NFNL_SUBSYS_NFTABLES))
    family = struct.pack("=BBH", NFPROTO_INET, 0, 0)
    sequence = first_sequence
    chunks = [HEADER.pack(HEADER.size + 4, NFNL_MSG_BATCH_BEGIN, NLM_F_REQUEST, sequence, 0),
              subsystem]  # fmt: skip
    last = first_sequence + len(messages)
    for kind, flags, attrs in messages:
        sequence += 1
        ack = NLM_F_ACK if ack_each or sequence == last else 0
        size = HEADER.size + 4 + len(attrs)
        msg_type = (NFNL_SUBSYS_NFTABLES << 8) | kind
        chunks += [HEADER.pack(size, msg_type, NLM_F_REQUEST | ack | flags, sequence, 0),
                   family, attrs]  # fmt: skip
    chunks += [HEADER.pack(HEADER.size + 4, NFNL_MSG_BATCH_END, NLM_F_REQUEST, last + 1, 0),
               subsystem]  # fmt: skip
    return b"".join(chunks)


def send(sock: socket.socket, batch: Batch, first_sequence: int) -> int:
    """Send `batch` as one transaction; raises `BatchError` with the kernel's reason.

    Only the last message asks for an acknowledgement (the kernel reports a failing
    message regardless): the kernel queues every answer on the socket before it
    reads any, and one per message overflows a default receive buffer at a few
    hundred messages, so a committed batch would read as refused.
    Returns the next free sequence number.
    """
    if not batch.messages:
        return first_sequence
    sock.send(frame(batch.messages, first_sequence, ack_each=False))
    last = first_sequence + len(batch.messages)
    acknowledged(sock, first_sequence, last)
    return last + 2


def acknowledgements(reply: bytes) -> Iterator[tuple[int, int]]:
    """(sequence, error) of each acknowledgement (NLMSG_ERROR) in one read of replies."""
    offset = 0
    while offset + HEADER.size <= len(reply):
        length, kind, _, sequence, _ = HEADER.unpack_from(reply, offset)
        if length < HEADER.size:
            break
        if kind == NLMSG_ERROR:
            (error,) = struct.unpack_from("=i", reply, offset + HEADER.size)
            yield sequence, error
        offset += (length + 3) & ~3


def acknowledged(sock: socket.socket, first: int, last: int) -> None:
    """Read replies until the acknowledgement of the last message (sequence `last`);
    `BatchError` naming the first message the kernel refused (it then commits nothing,
    and more answers may wait on the socket: the caller drops it)."""
    while True:
        try:
            reply = sock.recv(1 << 20)
        except OSError as exc:
            if exc.errno == errno.ENOBUFS:  # errors overflowed the buffer: it failed
                raise BatchError("the kernel refused the batch (too many errors to read)") from None
            raise
        for sequence, error in acknowledgements(reply):
            if error:
                raise BatchError(f"message {sequence - first}: {os.strerror(-error)}")
            if sequence == last:
                return


def _element_delta(change: Change, name: str, table: Table) -> tuple[list[str], list[str]]:
    """The element lines a set change removes and adds. When the change is the table's
    own last update (the same line tuples), the table says, without a scan of the set."""
    declaration = [x for x in change.after[:8] if not x.startswith(ELEMENT)]
    if any(x.startswith("flags") and "interval" in x for x in declaration):
        raise Unencodable(f"{change.key}: interval set")
    own = table.last_before.get(change.key) is change.before
    if own and table.objects.get(change.key) is change.after and name in table.last_delta:
        return table.last_delta[name]
    before = [x for x in change.before if not x.startswith(ELEMENT)]
    after = [x for x in change.after if not x.startswith(ELEMENT)]
    if before != after:
        raise Unencodable(f"{change.key}: its declaration changed")
    old = {x for x in change.before if x.startswith(ELEMENT)}
    new = {x for x in change.after if x.startswith(ELEMENT)}
    return sorted(old - new), sorted(new - old)


class Writer:
    """A netlink socket of the namespace it is made in, sending batches on it."""

    def __init__(self) -> None:
        self._sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, MAX_BATCH)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        self._sock.bind((0, 0))
        self._sequence = 1

    def send(self, batch: Batch) -> None:
        """Commit `batch` as one transaction; `BatchError` if the kernel refuses it."""
        self._sequence = send(self._sock, batch, self._sequence)

    def close(self) -> None:
        self._sock.close()


MAX_BATCH = 1 << 17  # bytes; larger changes go through libnftables


def batch_for(plan: Plan, table: Table, table_name: str) -> Batch:
    """The batch that carries out `plan` on the session's `table`, in the order an nft
    script of the same change has: sets and chains first, then flushes, element
    removals, rules, element additions, and deletions last."""
    batch = Batch(table_name)
    new_sets: list[NamedSet] = []
    new_chains: list[str] = []
    refill: list[str] = []
    removed_chains: list[str] = []
    removed_sets: list[str] = []
    gone: list[tuple[str, list[Element]]] = []
    came: list[tuple[str, list[Element]]] = []
    for change in plan.changes:
        kind, _, name = change.key.partition(" ")
        if kind == "chain":
            # The shared chains (verdict maps, reject, conntrack) only libnftables writes.
            if name in SHARED_CHAINS or any(line.startswith("type ") for line in change.after[:1]):
                raise Unencodable(f"chain {name}")
            if change.action is Action.ADD:
                new_chains.append(name)
                refill.append(name)
            elif change.action is Action.CHANGE:
                refill.append(name)
            else:
                removed_chains.append(name)
            continue
        if change.action is not Action.CHANGE:
            source = table.sources.get(change.key) if change.action is Action.ADD else None
            if change.action is Action.ADD and isinstance(source, NamedSet):
                new_sets.append(source)
            elif change.action is Action.REMOVE and name.startswith(n.AFFINITY):
                removed_sets.append(name)
            else:
                raise Unencodable(change.key)
            continue
        went, arrived = _element_delta(change, name, table)
        try:
            gone.append((name, [table.element(name, x) for x in went]))
            came.append((name, [table.element(name, x) for x in arrived]))
        except KeyError as exc:  # an element lbc did not make (drift): libnftables
            raise Unencodable(f"{change.key}: element {exc}") from None
    for s in new_sets:
        batch.add_set(s)
    for name in new_chains:
        batch.add_chain(name)
    for name in refill + removed_chains:
        if name not in new_chains:
            batch.flush_chain(name)
    for name, elements in gone:
        batch.elements(name, elements, add=False)
    for name in refill:
        source = table.sources.get(f"chain {name}")
        if source is None or isinstance(source, NamedSet):
            raise Unencodable(f"chain {name}")
        batch.add_rules(name, source.rules)
    for name, elements in came:
        batch.elements(name, elements, add=True)
    for name in removed_chains:
        batch.delete_chain(name)
    for name in removed_sets:
        batch.delete_set(name)
    if sum(len(m[2]) for m in batch.messages) > MAX_BATCH - 4096:
        raise Unencodable("a change this large")
    return batch
