"""The nftables kernel adapter: read `table inet lbc`, write changes in one transaction.

Equivalent to `nft list table inet lbc` for the snapshot and to one `nft -f` batch
for the commit, both through libnftables (the `nftables` Python binding) inside the
target network namespace. A commit sends only what changed: added and removed
map/set elements, and the chains whose rules differ (flushed and refilled), so a
one-endpoint change to a 10k-service ruleset is a handful of commands. The whole
table is replaced instead when a base chain or a set's declaration changed. A session's
changes go as lbc's own netlink batch (`netlink`), and a table that does not exist yet
is loaded as a libnftables skeleton plus netlink batches (`bulk`). Only the table
`inet lbc` is ever read or written.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from lbc.apply.netns import NamespaceError, inside, require_net_admin
from lbc.apply.state import Plan, State
from lbc.backends.base import Artifact
from lbc.backends.nftables import bulk
from lbc.backends.nftables import names as n
from lbc.backends.nftables.bulk import RulesetState
from lbc.backends.nftables.expr import Ruleset
from lbc.backends.nftables.generation import Following, Generations, Touches, in_table
from lbc.backends.nftables.incremental import ELEMENT, TableState, objects
from lbc.backends.nftables.netlink import (
    NFPROTO_INET,
    Batch,
    BatchError,
    Unencodable,
    Writer,
    batch_for,
)
from lbc.errors import ApplyError

TABLE = f"{n.FAMILY} {n.TABLE}"
TABLE_FLAGS = "table flags"  # the live table's flags (lbc's own table has none)
_BLOCK = re.compile(r"^\s*(chain|set|map) (\S+) \{\s*$")
# Any other object of the table, as nft lists one (`counter c {`, `ct helper h {`,
# `flowtable f {`): lbc makes none, so each is drift that a full replace removes.
_OTHER_BLOCK = re.compile(r"^\t([a-z]+(?: [a-z]+)?) (\S+) \{\s*$")


def parse(text: str, listed: bool = False) -> dict[str, tuple[str, ...]]:
    """lbc's objects in `nft list table inet lbc` output (or lbc's own nft file).

    Chains map to their lines (a base chain's `type ...` line first); sets and maps to
    their declaration lines followed by `element ...` lines in sorted order, as the
    kernel lists elements in an order of its own. Elements of affinity sets are
    connection state the kernel keeps, not configuration, so they are left out.
    With `listed` (the kernel's listing), a mark mask nft lists as a prefix is read
    as the `&` lbc writes, IPv6 addresses nft lists with a dotted IPv4 tail as lbc
    writes them (`::10.0.0.1` is `::a00:1`), and the table's flags (`flags dormant`:
    every hook off), which lbc never sets, are an object `table flags` that only a
    full replace removes. So is every object of another kind than chains, sets and
    maps (a counter, a quota, a conntrack helper, a flowtable someone added to lbc's
    table), keyed by its kind and name.
    """
    objects: dict[str, tuple[str, ...]] = {}
    lines = iter(text.splitlines())
    for line in lines:
        m = _BLOCK.match(line)
        if not m:
            if listed and line.startswith("\tflags "):
                objects[TABLE_FLAGS] = (line.strip(),)
            other = _OTHER_BLOCK.match(line) if listed else None
            if other is not None:
                kind, name = other.groups()
                objects[f"{kind} {name}"] = tuple(_body(lines))
            continue
        kind, name = m.groups()
        body = list(_body(lines))
        if kind == "chain":
            rules = (_L4PROTO_NUMBER.sub(_l4proto_name, b) for b in body)
            if listed:
                rules = (_as_written(_MARK_PREFIX.sub(_mark_mask, b)) for b in rules)
            objects[f"chain {name}"] = tuple(rules)
            continue
        declaration = [b for b in body if not b.startswith("elements = ")]
        elements = [b for b in body if b.startswith("elements = ")]
        items: list[str] = []
        if elements and not name.startswith(n.AFFINITY):
            inner = elements[0].removeprefix("elements = {").removesuffix("}")
            protos = _proto_fields(declaration)
            items = sorted(
                ELEMENT + _proto_names(_as_written(e.strip()) if listed else e.strip(), protos)
                for e in inner.split(",")
                if e.strip()
            )
        objects[f"{kind} {name}"] = (*declaration, *items)
    return objects


# Without /etc/protocols nft lists protocols by number (`meta l4proto 6`, elements
# `10.0.1.187 . 17 . 53`); lbc writes names, so numbers become the names nft uses.
_PROTOCOL_NAMES = {"6": "tcp", "17": "udp", "132": "sctp", "1": "icmp", "58": "ipv6-icmp"}
_L4PROTO_NUMBER = re.compile(r"\bmeta l4proto (\d+)\b")


def _l4proto_name(m: re.Match[str]) -> str:
    number = m.group(1)
    return f"meta l4proto {_PROTOCOL_NAMES.get(number, number)}"


# nft lists a mark mask that is a prefix (the top bit, `masquerade_mark = 0x80000000`)
# as one: `meta mark & 0x80000000 != 0x00000000` comes back `meta mark != 0x00000000/1`.
_MARK_PREFIX = re.compile(r"\bmeta mark != (0x[0-9a-f]{8})/(\d+)\b")


def _mark_mask(m: re.Match[str]) -> str:
    length = int(m.group(2))
    mask = ((1 << length) - 1) << (32 - length)
    return f"meta mark & {mask:#010x} != {m.group(1)}"


# nft (glibc's inet_ntop) lists an IPv6 address whose first 96 bits are zero, or an
# IPv4-mapped one, with a dotted tail; lbc writes Python's text of it.
_DOTTED_V6 = re.compile(r"(?<![\w.:])[0-9a-f:]*::[0-9a-f:]*?\d{1,3}(?:\.\d{1,3}){3}(?![\w.])")


def _as_written(text: str) -> str:
    """`text` with each IPv6 address nft lists with a dotted tail as lbc writes it."""
    if "::" not in text or "." not in text:
        return text
    return _DOTTED_V6.sub(_v6_text, text)


def _v6_text(m: re.Match[str]) -> str:
    try:
        return str(ipaddress.IPv6Address(m.group(0)))
    except ValueError:
        return m.group(0)


def _proto_fields(declaration: list[str]) -> tuple[int, ...]:
    """The positions of `inet_proto` in a set's key (`type ipv4_addr . inet_proto ...`)."""
    for line in declaration:
        if line.startswith("type "):
            key = line.removeprefix("type ").split(" : ")[0]
            return tuple(i for i, t in enumerate(key.split(" . ")) if t.strip() == "inet_proto")
    return ()


def _proto_names(element: str, fields: tuple[int, ...]) -> str:
    """`element` with the protocol numbers at `fields` of its key as names."""
    if not fields:
        return element
    key, sep, value = element.partition(" : ")
    parts = key.split(" . ")
    for i in fields:
        if i < len(parts):
            parts[i] = _PROTOCOL_NAMES.get(parts[i], parts[i])
    return " . ".join(parts) + sep + value


def _body(lines: Iterator[str]) -> Iterator[str]:
    """The lines of one block up to its closing brace; `elements = { ... }` joined."""
    pending = ""
    for raw in lines:
        line = raw.strip()
        if pending:
            pending += " " + line
            if line.endswith("}"):
                yield pending
                pending = ""
            continue
        if line == "}":
            return
        if line.startswith("elements = {") and not line.endswith("}"):
            pending = line
        elif line:
            yield line


def _name(key: str) -> tuple[str, str]:
    kind, _, name = key.partition(" ")
    return kind, name


def _declaration(lines: tuple[str, ...]) -> tuple[str, ...]:
    return tuple(line for line in lines if not line.startswith(ELEMENT))


def _elements(lines: tuple[str, ...]) -> set[str]:
    return {line.removeprefix(ELEMENT) for line in lines if line.startswith(ELEMENT)}


def _is_base(lines: tuple[str, ...]) -> bool:
    return bool(lines) and lines[0].startswith("type ")


def full_script(desired: State) -> str:
    """Replace the whole table: `add table`, `delete table`, then every object."""
    out = [f"add table {TABLE}", f"delete table {TABLE}", f"table {TABLE} {{"]
    for key in _ordered(desired.objects):
        kind, name = _name(key)
        lines = desired.objects[key]
        out.append(f"\t{kind} {name} {{")
        if kind == "chain":
            out += [f"\t\t{line}" for line in lines]
        else:
            out += [f"\t\t{line}" for line in _declaration(lines)]
            items = sorted(_elements(lines))
            if items:
                out.append("\t\telements = { " + ", ".join(items) + " }")
        out.append("\t}")
    out.append("}")
    return "\n".join(out) + "\n"


def _ordered(objects: dict[str, tuple[str, ...]] | Any) -> list[str]:
    # Sets and maps before chains: a rule that names @set needs the set to exist.
    return sorted(objects, key=lambda k: (k.startswith("chain "), k))


def incremental_script(live: State, desired: State, plan: Plan, table: str = TABLE) -> str | None:
    """The commands that turn `live` into `desired`, or None if only a full replace can
    (`table`: the table they are in; the IPVS backend's helper table uses it too)."""
    before, after = live.objects, desired.objects
    new_sets, new_chains, changed_chains, removed_chains, removed_sets = [], [], [], [], []
    add_elements: list[tuple[str, list[str]]] = []
    del_elements: list[tuple[str, list[str]]] = []
    for change in plan.changes:
        kind, name = _name(change.key)
        old, new = before.get(change.key), after.get(change.key)
        if kind not in ("chain", "set", "map"):
            return None  # the table's own flags, another writer's counter: replace all
        if kind == "chain":
            if old is None:
                new_chains.append(name)
            elif new is None:
                removed_chains.append(name)
            elif _is_base(old) or _is_base(new):
                if old[:1] != new[:1]:
                    return None  # a base chain's hook or priority changed
                changed_chains.append(name)
            else:
                changed_chains.append(name)
            continue
        if old is not None and new is not None and _declaration(old) != _declaration(new):
            return None  # a set's type or flags changed
        if old is None:
            new_sets.append((kind, name))
        elif new is None:
            removed_sets.append((kind, name))
        gone = sorted(_elements(old or ()) - _elements(new or ()))
        came = sorted(_elements(new or ()) - _elements(old or ()))
        if gone and new is not None:
            del_elements.append((name, gone))
        if came:
            add_elements.append((name, came))
    out = [f"add table {table}"]
    for kind, name in new_sets:
        decl = "; ".join(_declaration(after[f"{kind} {name}"]))
        out.append(f"add {kind} {table} {name} {{ {decl}; }}")
    for name in new_chains:
        lines = after[f"chain {name}"]
        head = f" {{ {lines[0]} }}" if _is_base(lines) else ""
        out.append(f"add chain {table} {name}{head}")
    for name in changed_chains + removed_chains:
        out.append(f"flush chain {table} {name}")
    for name, items in del_elements:
        out.append(f"delete element {table} {name} {{ {', '.join(items)} }}")
    for name in new_chains + changed_chains:
        for line in after[f"chain {name}"]:
            if not line.startswith("type "):
                out.append(f"add rule {table} {name} {line}")
    for name, items in add_elements:
        out.append(f"add element {table} {name} {{ {', '.join(items)} }}")
    # Sets and maps go before chains: a removed map's elements may still name a
    # removed chain, and the kernel refuses to delete a chain something points to.
    for kind, name in removed_sets:
        out.append(f"delete {kind} {table} {name}")
    for name in removed_chains:
        out.append(f"delete chain {table} {name}")
    return "\n".join(out) + "\n"


Runner = Callable[[str], str]


def _one_ahead(
    worker: ThreadPoolExecutor, encoders: list[Callable[[], list[bulk.Message]]]
) -> Iterator[list[bulk.Message]]:
    """The encoders' batches in order, the next one encoded (by `worker`) while the
    caller sends the one it was given."""
    future = worker.submit(encoders[0]) if encoders else None
    for following in encoders[1:]:
        assert future is not None
        batch = future.result()
        future = worker.submit(following)
        yield batch
    if future is not None:
        yield future.result()


class NftablesKernel(Following):
    """Snapshot and commit `table inet lbc` in the host or a named network namespace."""

    def __init__(self, netns: str | None = None, runner: Runner | None = None) -> None:
        self.netns = netns
        self.runner = runner or self._libnftables
        self._kernel = runner is None  # a stand-in runner has no generations to read
        # Opened inside the namespace on first use and kept: a libnftables context and
        # a netlink socket belong to the namespace they were made in.
        self._context: Any = None
        self._generations = Generations(netns)
        self.transactions = 1  # each commit is one transaction
        self._writer: Writer | None = None
        self.netlink_commits = 0  # changes sent as a netlink batch, without libnftables
        self.bulk_loads = 0  # loads from empty in netlink batches (`bulk`)

    def generation(self) -> int | None:
        """The namespace's nftables ruleset generation (netlink NFT_MSG_GETGEN).

        The kernel advances it by one for every committed transaction that changes
        anything, in any table, so an unchanged generation means an unchanged ruleset.
        """
        if not self._kernel:
            return None
        if self._generations.replaced():
            # The named namespace was deleted and made again: what was opened in the old
            # one is dropped, and no generation vouches for a state known from it.
            self._context = None
            if self._writer is not None:
                self._writer.close()
                self._writer = None
            return None
        return self._generations.read()

    def _followed(self) -> Touches | None:
        """Anything in `inet lbc`, for `follow` (nothing with a stand-in runner)."""
        return in_table(NFPROTO_INET, n.TABLE) if self._kernel else None

    def _libnftables(self, script: str) -> str:
        try:
            import nftables
        except (ImportError, OSError) as exc:
            raise ApplyError(
                f"the nftables binding is not usable ({exc}); install Debian's libnftables1"
            ) from exc
        if self._context is None:
            require_net_admin("nftables: reading or changing table inet lbc")
            with inside(self.netns):
                self._context = nftables.Nftables()
        rc, out, err = self._context.cmd(script)
        if rc != 0:
            raise ApplyError(f"nftables refused the transaction: {err.strip()}")
        return str(out)

    def identity(self) -> str | None:
        """Which ruleset this is, for remembering it between runs: the network
        namespace's cookie (unique for the boot; /run does not outlive a boot)."""
        return self._generations.identity() if self._kernel else None

    def _send(self, batch: Batch) -> None:
        try:
            if self._writer is None:
                with inside(self.netns):
                    self._writer = Writer()
            self._writer.send(batch)
        except (OSError, BatchError) as exc:
            # Answers to a refused batch may still wait on the socket: a new one next.
            if self._writer is not None:
                self._writer.close()
                self._writer = None
            raise ApplyError(f"nftables refused the transaction: {exc}") from exc
        self.netlink_commits += 1

    def _load(self, load: bulk.Load, desired: State) -> None:
        """Into an empty ruleset: the skeleton by libnftables, then the chains and the
        elements as netlink batches, each encoded while the kernel takes the one before;
        if one fails, the table is deleted again (see `bulk`)."""
        self.runner(full_script(State(load.skeleton)))
        sent = 1
        try:
            with inside(self.netns), ThreadPoolExecutor(max_workers=1) as worker:
                for batch in _one_ahead(worker, load.batches()):
                    if batch:
                        bulk.send(batch)
                        sent += 1
        except Unencodable:
            # Not expected of a rendered table: load it the usual way instead.
            self.runner(full_script(desired))
            self.transactions = -1  # uncounted: the engine reads back
            return
        except (OSError, BatchError) as exc:
            try:
                self.runner(f"delete table {TABLE}\n")
            except ApplyError as undo:
                raise ApplyError(
                    f"nftables refused the load: {exc}; deleting the table failed too: {undo}"
                ) from exc
            raise ApplyError(f"nftables refused the load (nothing was left): {exc}") from exc
        self.transactions = sent
        self.bulk_loads += 1

    def snapshot(self) -> State:
        """Equivalent to `nft list table inet lbc` (empty when the table does not exist)."""
        try:
            listing = self.runner(f"list table {TABLE}")
        except NamespaceError:
            raise
        except ApplyError as exc:
            if "No such file or directory" in str(exc):
                return State({})
            raise
        return State(parse(listing, listed=True))

    def desired(self, artifact: Artifact) -> State:
        """The objects of the artifact's ruleset (the same as parsing its nft text)."""
        if isinstance(artifact.data, Ruleset):
            # The ruleset rides along, for a load from empty (`bulk`).
            return RulesetState(objects(artifact.data), ruleset=artifact.data)
        return State(parse(artifact.text()))

    def commit(self, live: State, desired: State, plan: Plan) -> None:
        """Into an empty ruleset, the bulk load; otherwise one transaction: lbc's netlink
        batch for a session's change, else libnftables, incremental when it can be,
        else the whole table.

        Any commit but the netlink batch (at most `MAX_BATCH` bytes) may announce more
        objects than a follower's queue holds (a table's load or deletion: one message
        per object), so it stops following first; a session follows afresh after it.
        """
        self.transactions = 1
        incremental = desired.objects and live.objects and not plan.full
        if incremental and isinstance(desired, TableState) and self._kernel:
            try:
                assert desired.table is not None
                batch = batch_for(plan, desired.table, n.TABLE)
            except Unencodable:
                pass
            else:
                self._send(batch)
                return
        self._generations.unfollow()
        if not desired.objects:
            self.runner(f"add table {TABLE}\ndelete table {TABLE}\n")
            return
        if not live.objects and self._kernel:
            load = bulk.load_of(desired, n.TABLE)
            if load is not None:
                self._load(load, desired)
                return
        script = None
        if live.objects and not plan.full:
            script = incremental_script(live, desired, plan)
        self.runner(script if script is not None else full_script(desired))
