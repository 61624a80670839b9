"""Loading the whole table into an empty ruleset: libnftables' skeleton, one netlink batch.

Without a kernel: the fast pool-rule and element encoders give exactly the bytes the
general encoder gives, for every pool chain and set of every case. On the kernel: a
load from empty holds, chain by chain and element by element, the bytecode `nft -f`
makes of the same table; it is two transactions the engine can count (no read-back);
a refused batch leaves no table behind and other tables untouched.
"""

from __future__ import annotations

import ipaddress
import socket
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest

import lbc
from lbc.apply.state import State
from lbc.backends.nftables import bulk, netlink
from lbc.backends.nftables.expr import Chain, Element, Prefix, Rule, Verdict
from lbc.backends.nftables.incremental import objects
from lbc.backends.nftables.kernel import NftablesKernel
from lbc.backends.nftables.render import PoolChain, build
from lbc.compiler.lower import lower
from lbc.compiler.model import Cluster
from tests import netns
from tests.test_nftables_netlink import attrs, bytecode, load_whole
from tests.test_session import nftables_cases

CASES = nftables_cases()
IDS = [name for name, _ in CASES]


@pytest.mark.parametrize(("name", "cluster"), CASES, ids=IDS)
def test_pool_rules_are_the_bytes_the_general_encoder_makes(name: str, cluster: Cluster) -> None:
    ruleset = build(lower(cluster))
    fast = bulk.PoolRules("lbc")
    pools = [c for c in ruleset.chains if isinstance(c, PoolChain) and c.affinity is None]
    # (The affinity and no-endpoint cases have none: their chains take the general path.)
    assert pools or name in ("affinity", "no-endpoints", "load-balancer-empty")
    for chain in pools:
        general = [netlink.rule_message("lbc", chain.name, rule) for rule in chain.rules]
        assert fast.messages(chain) == general, chain.name


def expected_key(text: str) -> bytes:
    """An element key's bytes, field by field, from its text (`a . tcp . 80`)."""
    out = b""
    for part in text.split(" . "):
        if part.isdigit():
            out += struct.pack(">H", int(part)) + b"\0\0"
        elif part in ("tcp", "udp", "sctp"):
            out += bytes([{"tcp": 6, "udp": 17, "sctp": 132}[part], 0, 0, 0])
        else:
            out += ipaddress.ip_address(part).packed
    return out


@pytest.mark.parametrize(("name", "cluster"), CASES, ids=IDS)
def test_set_elements_encode_each_key_field_by_field(name: str, cluster: Cluster) -> None:
    ruleset = build(lower(cluster))
    compared = 0
    for s in ruleset.sets:
        if not s.elements or "interval" in s.flags:
            continue
        (message,) = netlink.element_messages("lbc", s.name, s.elements)
        for element, item in zip(s.elements, elements_in(message), strict=True):
            (key_nest, *data) = [payload for _, payload in attrs(item)]
            ((_, key),) = list(attrs(key_nest))
            assert key == expected_key(element.key.text()), element.text()
            assert bool(data) == (element.verdict is not None)
            if element.verdict is not None and element.verdict.target:
                assert element.verdict.target.encode() + b"\0" in data[0]
            compared += 1
    assert compared >= 2


def elements_in(message: tuple[int, int, bytes]) -> list[bytes]:
    """The element attributes of a NEWSETELEM message."""
    (body,) = [payload for kind, payload in attrs(message[2]) if kind == 3]
    return [payload for _, payload in attrs(body)]


def test_a_large_set_is_split_into_messages_the_attribute_length_allows() -> None:
    ruleset = build(lower(CASES[-1][1]))
    biggest = max(
        (s for s in ruleset.sets if "interval" not in s.flags), key=lambda s: len(s.elements)
    )
    many = biggest.elements * 40
    messages = netlink.element_messages("lbc", biggest.name, many)
    assert len(messages) > 1
    assert all(len(body) < 65_535 for _, _, body in messages)
    split = [item for m in messages for item in elements_in(m)]
    one_by_one = [
        elements_in(netlink.element_messages("lbc", biggest.name, [e])[0])[0] for e in many
    ]
    assert split == one_by_one


def test_a_state_read_from_text_has_no_load() -> None:
    """Only a desired state that carries its ruleset (or session table) loads in bulk."""
    cluster = CASES[0][1]
    artifact = lbc.compile(cluster, "nftables")
    kernel = NftablesKernel(runner=lambda script: "")
    desired = kernel.desired(artifact)
    load = bulk.load_of(desired, "lbc")
    assert load is not None and all(encode() for encode in load.batches())
    assert bulk.load_of(State(dict(desired.objects)), "lbc") is None
    # The skeleton holds no chain of a single service and no element of a bulk set.
    assert set(load.skeleton) <= set(desired.objects)
    assert not any(k.startswith("chain service-") for k in load.skeleton)


# --- on the kernel ----------------------------------------------------------------------
@pytest.fixture
def pair() -> Iterator[tuple[netns.Netns, netns.Netns]]:
    netns.require("nft")
    with netns.Lab() as lab:
        yield lab.namespace("bulk-ours"), lab.namespace("bulk-whole")


@pytest.mark.netns
@pytest.mark.parametrize(("name", "cluster"), CASES, ids=IDS)
def test_a_load_from_empty_holds_the_bytecode_nft_makes(
    name: str, cluster: Cluster, pair: tuple[netns.Netns, netns.Netns], tmp_path: Path
) -> None:
    ours, whole = pair
    backend = lbc.backends()["nftables"]
    kernel = backend.kernel(ours.name)
    steps: list[str] = []
    result = lbc.apply(
        cluster, backend, kernel=kernel, lock_path=tmp_path / "lock", progress=steps.append
    )
    assert getattr(kernel, "bulk_loads", 0) == 1, "an empty ruleset is loaded in bulk"
    assert result.applied
    # Two transactions, counted by the generation: the engine need not read back.
    assert any(s.startswith("verified: the commit was the only change") for s in steps), steps
    load_whole(whole, cluster)
    assert bytecode(ours) == bytecode(whole)
    assert lbc.verify(cluster, "nftables", netns=ours.name).in_sync


@pytest.mark.netns
def test_a_load_in_many_batches_is_the_same_table(
    pair: tuple[netns.Netns, netns.Netns], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ours, whole = pair
    monkeypatch.setattr(bulk, "RULES_PER_BATCH", 50)
    cluster = CASES[-1][1]
    kernel = NftablesKernel(ours.name)
    steps: list[str] = []
    lbc.apply(
        cluster, "nftables", kernel=kernel, lock_path=tmp_path / "lock", progress=steps.append
    )
    assert kernel.bulk_loads == 1 and kernel.transactions > 5, "skeleton, rule batches, elements"
    assert any(s.startswith("verified: the commit was the only change") for s in steps), steps
    load_whole(whole, cluster)
    assert bytecode(ours) == bytecode(whole)


@pytest.mark.netns
def test_a_session_starts_with_a_load_from_empty(
    pair: tuple[netns.Netns, netns.Netns], tmp_path: Path
) -> None:
    ours, whole = pair
    cluster = CASES[-1][1]
    session = lbc.Session("nftables", netns=ours.name, lock_path=tmp_path / "lock")
    session.apply(cluster)
    assert getattr(session.engine.kernel, "bulk_loads", 0) == 1
    load_whole(whole, cluster)
    assert bytecode(ours) == bytecode(whole)


def prepared(ns: netns.Netns, cluster: Cluster) -> tuple[NftablesKernel, State, bulk.Load]:
    """The adapter of `ns`, the desired state of `cluster` and its load from empty."""
    kernel = NftablesKernel(ns.name)
    desired = kernel.desired(lbc.compile(cluster, "nftables"))
    load = bulk.load_of(desired, "lbc")
    assert load is not None
    return kernel, desired, load


@pytest.mark.netns
def test_a_refused_load_leaves_no_table_and_touches_no_other(
    pair: tuple[netns.Netns, netns.Netns],
) -> None:
    ours, _ = pair
    ours.exec("nft", "add", "table", "ip", "someone-else")
    ours.exec("nft", "add", "chain", "ip", "someone-else", "keep")
    cluster = CASES[-1][1]
    kernel, desired, load = prepared(ours, cluster)
    # The kernel refuses a rule that jumps to a chain that does not exist.
    load.chains.append(Chain("zz-last", (Rule((Verdict("goto", "no-such-chain"),)),)))
    with pytest.raises(lbc.ApplyError, match="No such file or directory"):
        kernel._load(load, desired)
    tables = ours.exec("nft", "list", "tables")
    assert "inet lbc" not in tables and "ip someone-else" in tables
    assert "chain keep" in ours.exec("nft", "list", "table", "ip", "someone-else")


@pytest.mark.netns
def test_a_refused_element_batch_takes_the_committed_chains_away_too(
    pair: tuple[netns.Netns, netns.Netns],
) -> None:
    """The chains are committed before the elements: when the kernel refuses the
    elements, the table (chains included) is deleted again."""
    ours, _ = pair
    kernel, desired, load = prepared(ours, CASES[-1][1])
    some = next(iter(load.elements.values()))[:1]
    load.elements["zz-no-such-set"] = some
    with pytest.raises(lbc.ApplyError, match="No such file or directory"):
        kernel._load(load, desired)
    assert "inet lbc" not in ours.exec("nft", "list", "tables")


@pytest.mark.netns
def test_elements_the_encoder_cannot_write_load_through_libnftables(
    pair: tuple[netns.Netns, netns.Netns], tmp_path: Path
) -> None:
    ours, _ = pair
    cluster = CASES[-1][1]
    kernel, desired, load = prepared(ours, cluster)
    name = next(iter(load.elements))
    load.elements[name] = [Element(Prefix("10.0.0.0", 8)), *load.elements[name]]
    kernel._load(load, desired)
    assert kernel.transactions == -1 and kernel.bulk_loads == 0
    assert lbc.verify(cluster, "nftables", netns=ours.name).in_sync


@pytest.mark.netns
def test_without_large_socket_buffers_the_load_goes_through_libnftables(
    pair: tuple[netns.Netns, netns.Netns], monkeypatch: pytest.MonkeyPatch
) -> None:
    ours, _ = pair

    class Capped(socket.socket):
        def setsockopt(self, level: int, option: int, value: object, *rest: object) -> None:
            if option == bulk.SO_SNDBUFFORCE:
                raise PermissionError(1, "Operation not permitted")
            super().setsockopt(level, option, value, *rest)  # type: ignore[call-overload]

    monkeypatch.setattr(bulk.socket, "socket", Capped)
    cluster = CASES[-1][1]
    kernel, desired, load = prepared(ours, cluster)
    kernel._load(load, desired)
    assert kernel.bulk_loads == 0 and kernel.transactions == -1
    assert lbc.verify(cluster, "nftables", netns=ours.name).in_sync


def test_the_state_of_a_ruleset_compares_by_its_objects() -> None:
    ruleset = build(lower(CASES[0][1]))
    carried = bulk.RulesetState(objects(ruleset), ruleset=ruleset)
    assert carried == bulk.RulesetState(objects(ruleset), ruleset=None)
    assert carried != bulk.RulesetState({}, ruleset=ruleset)
