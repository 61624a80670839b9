"""The nftables netlink writer: the expressions nft would make, and the kernel's proof.

Unit tests decode the encoder's attributes and check the expression sequence of each
rule form (the dependencies nft adds once per rule, the byte-aligned prefix loads);
kernel tests change tables through a session (the netlink path) and compare, chain
by chain, the kernel's bytecode (`nft --debug=netlink list`) with that of the same
table loaded whole by `nft -f`: equal bytecode is equal behaviour. The reader of the
ruleset generation is checked against the replies the kernel sends.
"""

from __future__ import annotations

import errno
import random
import socket
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest

import lbc
from lbc.apply.netns import inside
from lbc.backends.nftables import generation, netlink
from lbc.backends.nftables.expr import (
    BinOp,
    Concat,
    Dnat,
    Element,
    Fib,
    Mangle,
    Match,
    Meta,
    Numgen,
    Payload,
    Prefix,
    Reject,
    Rule,
    SetRef,
    SetUpdate,
    Value,
    Verdict,
    Vmap,
)
from lbc.backends.nftables.render import _MARK
from lbc.compiler.model import Cluster
from tests import netns
from tests.test_session import change, nftables_cases

ROOT = Path(__file__).resolve().parent.parent
MARK = Mangle(_MARK, BinOp("|", _MARK, Value(0x4000, hex=True)))


def attrs(blob: bytes) -> Iterator[tuple[int, bytes]]:
    """(type, payload) of each netlink attribute in `blob`."""
    offset = 0
    while offset < len(blob):
        size, kind = struct.unpack_from("=HH", blob, offset)
        yield kind & 0x3FFF, blob[offset + 4 : offset + size]
        offset += (size + 3) & ~3


def names(rule: Rule) -> list[str]:
    """The expression names of the encoded rule, in order."""
    out = []
    for element in netlink.rule_expressions(rule):
        (_, body), *_ = attrs(element)
        (_, name), *_ = attrs(body)
        out.append(name.rstrip(b"\0").decode())
    return out


def test_a_pool_head_rule_has_each_dependency_once() -> None:
    rule = Rule(
        (
            Match(Payload("ip", "daddr"), Value("10.0.1.1")),
            Match(Payload("tcp", "dport"), Value(80)),
            Match(Payload("ip", "saddr"), Prefix("10.244.0.0", 16), op="!="),
            MARK,
        )
    )
    assert names(rule) == [
        *("meta", "cmp", "payload", "cmp"),  # meta nfproto ipv4, ip daddr
        *("meta", "cmp", "payload", "cmp"),  # meta l4proto tcp, tcp dport
        *("payload", "cmp"),  # ip saddr != /16: two bytes, no mask, no second nfproto
        *("meta", "bitwise", "meta"),  # meta mark set meta mark | 0x4000
    ]


def test_a_prefix_off_a_byte_boundary_is_masked() -> None:
    rule = Rule((Match(Payload("ip", "saddr"), Prefix("10.128.0.0", 9)), Verdict("goto", "x")))
    assert names(rule) == ["meta", "cmp", "payload", "bitwise", "cmp", "immediate"]


def test_endpoint_and_pool_rule_forms() -> None:
    dnat = Rule((Match(Meta("l4proto"), Value("udp")), Dnat("ip6", "fd00::7", 53)))
    assert names(dnat) == ["meta", "cmp", "immediate", "immediate", "nat"]
    pick = Rule((Match(Numgen(6), Value(1), op="<"), Verdict("goto", "e")))
    assert names(pick) == ["numgen", "byteorder", "cmp", "immediate"]
    remember = Rule((SetUpdate("affinity-x", Payload("ip6", "saddr")),))
    assert names(remember) == ["meta", "cmp", "payload", "dynset"]
    known = Rule((Match(Payload("ip", "saddr"), SetRef("affinity-x")), Verdict("goto", "e")))
    assert names(known) == ["meta", "cmp", "payload", "lookup", "immediate"]


@pytest.mark.parametrize(
    "rule",
    [
        Rule((Vmap(Concat((Payload("ip", "daddr"), Meta("l4proto"))), "service-ips4"),)),
        Rule((Reject(),)),
        Rule((Match(Meta("l4proto"), Value("icmp")), Verdict("accept"))),
    ],
    ids=["vmap", "reject", "unknown-protocol"],
)
def test_what_the_encoder_does_not_write_is_refused(rule: Rule) -> None:
    with pytest.raises(netlink.Unencodable):
        netlink.rule_expressions(rule)


def test_element_keys_pad_each_concatenated_field_to_four_bytes() -> None:
    key = Concat((Value("10.0.1.1"), Value("tcp"), Value(80)))
    assert netlink.key_bytes(key) == bytes([10, 0, 1, 1, 6, 0, 0, 0, 0, 80, 0, 0])
    assert netlink.key_bytes(Value("fd00::1")) == bytes.fromhex("fd00" + "00" * 13 + "01")
    with pytest.raises(netlink.Unencodable):
        netlink.key_bytes(Concat((Value("10.0.1.1"), Prefix("10.0.0.0", 8))))


def test_an_element_with_a_verdict_carries_it() -> None:
    batch = netlink.Batch("lbc")
    element = Element(Value("10.0.1.1"), Verdict("goto", "service-x"))
    batch.elements("cluster-ips4", [element], add=True)
    ((kind, flags, body),) = batch.messages
    assert kind == netlink.NEWSETELEM and flags & netlink.NLM_F_CREATE
    assert b"service-x\0" in body and bytes([10, 0, 1, 1]) in body


# --- the ruleset generation ----------------------------------------------------------
class Answers:
    """A stand-in netlink socket: keeps what is sent, answers with canned replies."""

    def __init__(self, *replies: bytes) -> None:
        self.sent: list[bytes] = []
        self.replies = list(replies)

    def send(self, data: bytes) -> int:
        self.sent.append(data)
        return len(data)

    def recv(self, size: int) -> bytes:
        return self.replies.pop(0)

    def close(self) -> None:
        pass


def generation_reply(sequence: int, value: int) -> bytes:
    """NFT_MSG_NEWGEN as the kernel sends it (`nf_tables_fill_gen_info`): nfgenmsg, then
    NFTA_GEN_ID (big-endian) and NFTA_GEN_PROC_PID."""
    body = struct.pack("=BBH", socket.AF_UNSPEC, 0, 0)
    body += struct.pack("=HH", 8, 1) + struct.pack(">I", value)
    body += struct.pack("=HH", 8, 2) + struct.pack(">I", 4242)
    header = struct.pack("=IHHII", 16 + len(body), (10 << 8) | 15, 0, sequence, 0)
    return header + body


def reader_answering(*replies: bytes) -> tuple[generation.GenerationReader, Answers]:
    reader = generation.GenerationReader()
    reader.close()
    answers = Answers(*replies)
    reader._sock = answers  # type: ignore[assignment]
    return reader, answers


def test_the_generation_is_read_from_the_answer_to_this_request() -> None:
    """An answer to an earlier request (one that timed out) is skipped."""
    reader, answers = reader_answering(generation_reply(1, 7), generation_reply(2, 0x01000002))
    reader._sequence = 1
    assert reader.read() == 0x01000002
    ((length, kind, _, sequence, _),) = [struct.unpack_from("=IHHII", m) for m in answers.sent]
    assert (length, kind, sequence) == (20, (10 << 8) | 16, 2)  # NFT_MSG_GETGEN, nfgenmsg


def test_a_refused_generation_request_is_an_os_error_with_the_kernels_reason() -> None:
    refusal = struct.pack("=IHHII", 36, 2, 0, 1, 0) + struct.pack("=i", -errno.EPERM)
    reader, _ = reader_answering(refusal + struct.pack("=IHHII", 20, 0xA10, 1, 1, 0))
    with pytest.raises(OSError) as refused:
        reader.read()
    assert refused.value.errno == errno.EPERM


def test_a_generation_reply_with_a_malformed_attribute_is_an_error_not_a_hang() -> None:
    body = struct.pack("=BBH", socket.AF_UNSPEC, 0, 0) + struct.pack("=HH", 0, 5) + bytes(8)
    malformed = struct.pack("=IHHII", 16 + len(body), (10 << 8) | 15, 0, 1, 0) + body
    reader, _ = reader_answering(malformed)
    with pytest.raises(OSError, match="no NFTA_GEN_ID"):
        reader.read()


def test_commit_announcements_are_read_per_transaction() -> None:
    """`Monitor`'s reading of what the kernel announces (`nft monitor`'s messages):
    object messages, then NEWGEN; which touched the followed table; and a malformed
    attribute ends the message's attributes instead of looping."""
    monitor = generation.Monitor(generation.in_table(1, "lbc"))
    monitor.close()

    class Drained:
        def recv(self, size: int) -> bytes:
            raise BlockingIOError

    monitor._sock = Drained()  # type: ignore[assignment]

    def message(kind: int, family: int, *attributes: tuple[int, bytes]) -> bytes:
        body = struct.pack("=BBH", family, 0, 0)
        for number, value in attributes:
            body += struct.pack("=HH", 4 + len(value), number) + value
            body += bytes(-len(value) % 4)
        return struct.pack("=IHHII", 16 + len(body), (10 << 8) | kind, 0, 0, 0) + body

    def newgen(number: int) -> bytes:
        return message(15, 0, (1, struct.pack(">I", number)))

    rule_in_lbc = message(6, 1, (1, b"lbc\0"), (2, b"services\0"))
    rule_elsewhere = message(6, 1, (1, b"other\0"), (2, b"c\0"))
    ip_lbc = message(0, 2, (1, b"lbc\0"))  # table `ip lbc`: another family
    # A rule message whose first attribute claims a size of 0, then lbc's table name.
    broken = message(6, 1, (0, b""), (1, b"lbc\0"))
    broken = broken[:16] + struct.pack("=BBH", 1, 0, 0) + struct.pack("=HH", 0, 7) + broken[24:]
    monitor._read(rule_elsewhere + ip_lbc + newgen(11) + rule_in_lbc + newgen(12))
    monitor._read(broken + newgen(13))
    monitor.start = 10
    assert monitor._commits == {11: False, 12: True, 13: False}
    assert monitor.quiet(10, 11) and not monitor.quiet(11, 12) and monitor.quiet(11, 13, own=1)
    assert not monitor.quiet(12, 14), "generation 14 was never announced"


# --- on the kernel ----------------------------------------------------------------------
def bytecode(ns: netns.Netns) -> dict[str, list[str]]:
    """Each chain's rules as the kernel holds them, and each set's elements (sorted):
    the dumps of `nft --debug=netlink list`."""
    out: dict[str, list[str]] = {}
    name: str | None = None
    for line in ns.exec("nft", "--debug=netlink", "list", "table", "inet", "lbc").splitlines():
        if line.startswith("inet lbc "):
            name = line.split()[2]
            if not name.startswith("@"):
                out.setdefault(name, []).append("")
        elif name is not None and line.startswith("\telement "):
            out.setdefault(name, []).append(line.strip())
        elif name is not None and line.startswith(("  [", "  userdata")):
            out[name][-1] += line.strip() + "\n"
        elif not line.strip():
            name = None
    return {k: sorted(v) if k.startswith("@") else v for k, v in out.items()}


@pytest.fixture
def pair() -> Iterator[tuple[netns.Netns, netns.Netns]]:
    netns.require("nft")
    with netns.Lab() as lab:
        yield lab.namespace("nl-session"), lab.namespace("nl-whole")


def load_whole(ns: netns.Netns, cluster: Cluster) -> None:
    ns.exec("nft", "-f", "-", input=lbc.compile(cluster, "nftables").text())


CASES = nftables_cases()


@pytest.mark.netns
@pytest.mark.parametrize(("name", "cluster"), CASES, ids=[n for n, _ in CASES])
def test_session_changes_hold_the_bytecode_nft_makes(
    name: str, cluster: Cluster, pair: tuple[netns.Netns, netns.Netns], tmp_path: Path
) -> None:
    """Random service changes through a session; after each, every chain's bytecode
    equals that of the same table loaded whole by nft."""
    ours, whole = pair
    session = lbc.Session("nftables", netns=ours.name, lock_path=tmp_path / "lock")
    session.apply(cluster)
    rng, spare, current = random.Random(name), [], cluster
    for _ in range(8):
        current = change(rng, current, spare)
        session.apply(current)
        assert lbc.verify(current, "nftables", netns=ours.name).in_sync
        load_whole(whole, current)
        held = bytecode(ours)
        assert held == bytecode(whole)
        chains = lbc.compile(current, "nftables").text().count("\tchain ")
        rules = [r for key, dumps in held.items() if key[0] != "@" for r in dumps]
        assert len(held) >= chains and all("[ " in r for r in rules)
    kernel = session.engine.kernel
    print(f"  {name}: {getattr(kernel, 'netlink_commits', 0)} of 8 changes by netlink")


# Every rule form the encoder writes, also those the rendered tables do not hold yet
# (transport-header ports, negated lookups, prefixes off a byte boundary).
PROBES = [
    Rule(
        (
            Match(Payload("ip", "daddr"), Value("10.0.1.1")),
            Match(Payload("tcp", "dport"), Value(80)),
            Match(Payload("ip", "saddr"), Prefix("10.244.0.0", 16), op="!="),
            MARK,
        ),
        comment="pool head",
    ),
    Rule((Match(Meta("l4proto"), Value("udp")), Match(Payload("udp", "dport"), Value(53)))),
    Rule((Match(Payload("sctp", "dport"), Value(9), op="!="), Verdict("return"))),
    Rule((Match(Payload("ip", "saddr"), Prefix("10.128.0.0", 9)), Verdict("goto", "target"))),
    Rule((Match(Payload("ip6", "daddr"), Prefix("fd00:10::", 33)), Verdict("jump", "target"))),
    Rule((Match(Payload("ip6", "saddr"), Value("fd00::1"), op="!="), Verdict("drop"))),
    Rule((Match(Payload("ip", "saddr"), SetRef("known4"), op="!="), Verdict("accept"))),
    Rule((Match(Payload("ip", "saddr"), SetRef("known4")), Verdict("goto", "target"))),
    Rule((SetUpdate("known4", Payload("ip", "saddr")), Verdict("goto", "target"))),
    Rule((Match(Numgen(6), Value(1), op="<"), Verdict("goto", "target"))),
    Rule((Match(Fib("saddr", "type"), Value("local")), MARK)),
    Rule((Match(Meta("l4proto"), Value("tcp")), Dnat("ip", "10.244.1.7", 8080))),
    Rule((Match(Meta("l4proto"), Value("udp")), Dnat("ip6", "fd00::7", 53))),
]
PROBE_TABLE = """table inet lbc {
	set known4 { type ipv4_addr; size 65535; flags dynamic,timeout; timeout 3h; }
	chain target { }
}
"""


@pytest.mark.netns
def test_each_rule_form_holds_the_bytecode_nft_makes_of_its_text(
    pair: tuple[netns.Netns, netns.Netns],
) -> None:
    """Each rule the encoder can write, sent by netlink into one namespace, is the
    bytecode nft makes of the rule's text in the other."""
    ours, theirs = pair
    for ns in pair:
        ns.exec("nft", "-f", "-", input=PROBE_TABLE)
    batch = netlink.Batch("lbc")
    batch.add_chain("probe")
    batch.add_rules("probe", PROBES)
    with inside(ours.name):
        writer = netlink.Writer()
    try:
        writer.send(batch)
    finally:
        writer.close()
    script = "add chain inet lbc probe\n" + "".join(
        f"add rule inet lbc probe {rule.text()}\n" for rule in PROBES
    )
    theirs.exec("nft", "-f", "-", input=script)
    held = bytecode(ours)
    assert len(held["probe"]) == len(PROBES)
    assert held == bytecode(theirs)


@pytest.mark.netns
def test_most_changes_of_a_large_cluster_go_by_netlink(
    pair: tuple[netns.Netns, netns.Netns], tmp_path: Path
) -> None:
    cluster = CASES[-1][1]
    ours, _ = pair
    session = lbc.Session("nftables", netns=ours.name, lock_path=tmp_path / "lock")
    session.apply(cluster)
    rng, spare, current = random.Random(3), [], cluster
    for _ in range(20):
        current = change(rng, current, spare)
        session.apply(current)
    assert lbc.verify(current, "nftables", netns=ours.name).in_sync
    assert getattr(session.engine.kernel, "netlink_commits", 0) >= 15


@pytest.mark.netns
def test_a_refused_batch_changes_nothing(
    pair: tuple[netns.Netns, netns.Netns], tmp_path: Path
) -> None:
    """A batch the kernel refuses at its last message leaves the table as it was."""
    ours, _ = pair
    cluster = CASES[-1][1]
    lbc.apply(cluster, "nftables", netns=ours.name, lock_path=tmp_path / "lock")
    before = ours.exec("nft", "list", "table", "inet", "lbc")
    batch = netlink.Batch("lbc")
    batch.add_chain("zz-new")
    batch.add_rules("zz-new", [Rule((Verdict("accept"),))])
    batch.add_rules("no-such-chain", [Rule((Verdict("accept"),))])
    kernel = lbc.backends()["nftables"].kernel(ours.name)
    with pytest.raises(lbc.ApplyError, match="No such file or directory"):
        kernel._send(batch)  # type: ignore[attr-defined]
    assert ours.exec("nft", "list", "table", "inet", "lbc") == before


@pytest.mark.netns
def test_a_session_repairs_elements_it_did_not_make(
    pair: tuple[netns.Netns, netns.Netns], tmp_path: Path
) -> None:
    """Drift inside lbc's table (an element another tool added) is read, planned and
    removed; the netlink writer hands what it did not make to libnftables."""
    ours, _ = pair
    cluster = CASES[-1][1]
    session = lbc.Session("nftables", netns=ours.name, lock_path=tmp_path / "lock")
    session.apply(cluster)
    add_foreign_dispatch_element(ours, cluster)
    result = session.apply(cluster)
    assert result.read and [c.key for c in result.plan.changes] == ["map service-ips4"]
    assert lbc.verify(cluster, "nftables", netns=ours.name).in_sync


def add_foreign_dispatch_element(ns: netns.Netns, applied: lbc.Cluster) -> None:
    """Another tool's element in lbc's dispatch map, to the first service chain of the
    cluster applied."""
    text = lbc.compile(applied, "nftables").text()
    chain = next(x.split()[1] for x in text.splitlines() if x.startswith("\tchain service-"))
    element = f"{{ 10.99.99.99 . tcp . 80 : goto {chain} }}"
    ns.exec("nft", "add", "element", "inet", "lbc", "service-ips4", element)


@pytest.mark.netns
def test_a_session_repairs_drift_in_a_map_its_own_change_also_touches(
    pair: tuple[netns.Netns, netns.Netns], tmp_path: Path
) -> None:
    """Another writer's element in a shared map, and a version that changes that map
    too: the plan is the kernel's listing against the version, and the commit takes
    the element out along with the version's own change."""
    ours, _ = pair
    cluster = CASES[-1][1]
    fewer = cluster.model_copy(update={"services": cluster.services[1:]})
    session = lbc.Session("nftables", netns=ours.name, lock_path=tmp_path / "lock")
    session.apply(fewer)
    add_foreign_dispatch_element(ours, fewer)
    result = session.apply(cluster)
    assert result.read and "map service-ips4" in [c.key for c in result.plan.changes]
    assert lbc.verify(cluster, "nftables", netns=ours.name).in_sync
    assert "10.99.99.99" not in ours.exec("nft", "list", "map", "inet", "lbc", "service-ips4")


def with_source_range(source_range: str) -> Cluster:
    """The load-balancer golden case and a second LoadBalancer service admitting
    `source_range`: a /32 is a plain address among the interval set's elements."""
    one = (ROOT / "golden" / "load-balancer" / "cluster.toml").read_text()
    return lbc.loads(
        one + '[[services]]\nname = "other"\ntype = "LoadBalancer"\n'
        'cluster_ips = ["10.0.1.182"]\nload_balancer_ips = ["198.51.100.11"]\n'
        f'load_balancer_source_ranges = ["{source_range}"]\n'
        "ports = [{ port = 443, target_port = 8443, node_port = 30444 }]\n"
        'endpoints = [{ ip = "10.244.1.7" }]\n'
    )


@pytest.mark.netns
def test_a_change_to_an_interval_set_holds_the_bytecode_nft_makes(
    pair: tuple[netns.Netns, netns.Netns], tmp_path: Path
) -> None:
    """Each element of an interval set has a range end, which the netlink writer does
    not encode: a session's change to one, even of plain addresses, holds the bytecode
    nft makes of the whole table."""
    ours, whole = pair
    session = lbc.Session("nftables", netns=ours.name, lock_path=tmp_path / "lock")
    session.apply(with_source_range("203.0.113.7/32"))
    changed = with_source_range("203.0.113.8/32")
    result = session.apply(changed)
    assert [c.key for c in result.plan.changes] == ["set firewall-allow4"]
    load_whole(whole, changed)
    assert bytecode(ours) == bytecode(whole)


def sticky_services(count: int, endpoints: int) -> Cluster:
    """`count` ClientIP services of `endpoints` endpoints each: many small objects."""
    services = "".join(
        f'[[services]]\nname = "s{i}"\ncluster_ips = ["10.0.{i // 250}.{i % 250 + 1}"]\n'
        'session_affinity = "ClientIP"\nports = [{ port = 80 }]\nendpoints = ['
        + ", ".join(f'{{ ip = "10.{100 + i // 250}.{i % 250}.{j + 1}" }}' for j in range(endpoints))
        + "]\n"
        for i in range(count)
    )
    node = '[node]\nname = "n"\naddresses = ["192.168.49.2"]\npod_cidrs = ["10.244.0.0/16"]\n'
    return lbc.loads(node + services)


@pytest.mark.netns
def test_a_change_too_large_for_one_netlink_batch_goes_through_libnftables(
    pair: tuple[netns.Netns, netns.Netns], tmp_path: Path
) -> None:
    """39 services with affinity added at once: more bytes than the writer's socket
    sends in one batch, so libnftables carries the change, and it lands whole."""
    ours, _ = pair
    cluster = sticky_services(40, 3)
    one = cluster.model_copy(update={"services": cluster.services[:1]})
    session = lbc.Session("nftables", netns=ours.name, lock_path=tmp_path / "lock")
    session.apply(one)
    kernel = session.engine.kernel
    before = getattr(kernel, "netlink_commits", 0)
    assert session.apply(cluster).applied
    assert getattr(kernel, "netlink_commits", 0) == before
    assert lbc.verify(cluster, "nftables", netns=ours.name).in_sync


class StockWriter(netlink.Writer):
    """A writer whose receive buffer is what a host with the default
    `net.core.rmem_max` (212992) gives it: room for about 600 acknowledgements."""

    def __init__(self) -> None:
        super().__init__()
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 212992)


@pytest.mark.netns
def test_a_batch_of_many_messages_is_not_lost_in_its_acknowledgements(
    pair: tuple[netns.Netns, netns.Netns], tmp_path: Path
) -> None:
    """A session change of over a thousand messages (removing 99 services with
    affinity: their chains, rules and sets) goes as one netlink batch; the kernel's
    answers to it must fit a host's default socket buffer, or a committed change
    reads as refused."""
    ours, _ = pair
    cluster = sticky_services(100, 3)
    session = lbc.Session("nftables", netns=ours.name, lock_path=tmp_path / "lock")
    session.apply(cluster)
    kernel = session.engine.kernel
    with inside(ours.name):
        kernel._writer = StockWriter()  # type: ignore[attr-defined]
    smaller = cluster.model_copy(update={"services": cluster.services[:1]})
    result = session.apply(smaller)
    assert getattr(kernel, "netlink_commits", 0) == 1 and not result.read
    assert lbc.verify(smaller, "nftables", netns=ours.name).in_sync


@pytest.mark.netns
def test_a_batch_after_a_refused_one_reads_its_own_answer(
    pair: tuple[netns.Netns, netns.Netns], tmp_path: Path
) -> None:
    """The kernel answers every failing message of a refused batch; none of those
    answers may be taken for the next batch's."""
    ours, _ = pair
    lbc.apply(CASES[-1][1], "nftables", netns=ours.name, lock_path=tmp_path / "lock")
    kernel = lbc.backends()["nftables"].kernel(ours.name)
    refused = netlink.Batch("lbc")
    refused.add_rules("no-such-chain", [Rule((Verdict("accept"),))])
    refused.add_rules("no-such-chain-either", [Rule((Verdict("accept"),))])
    with pytest.raises(lbc.ApplyError, match="No such file or directory"):
        kernel._send(refused)  # type: ignore[attr-defined]
    accepted = netlink.Batch("lbc")
    accepted.add_chain("zz-new")
    kernel._send(accepted)  # type: ignore[attr-defined]
    assert "chain zz-new" in ours.exec("nft", "list", "table", "inet", "lbc")
