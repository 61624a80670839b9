"""The nftables ruleset generation of a network namespace, read over netlink.

The kernel numbers the ruleset: every transaction that changes anything, in any
table, advances the generation by one (`nf_tables_commit`), and NFT_MSG_GETGEN
returns it. One request and one reply on a socket kept open, about a tenth of a
millisecond, so the apply engine can ask before and after every commit.
"""

from __future__ import annotations

import os
import socket
import struct
from collections.abc import Callable

from lbc.apply.netns import NamespaceError, inside
from lbc.errors import ApplyError

NETLINK_NETFILTER = 12
NFNL_SUBSYS_NFTABLES = 10
NFT_MSG_GETGEN = 16
NFTA_GEN_ID = 1
NLM_F_REQUEST = 1
NLMSG_ERROR = 2
SO_NETNS_COOKIE = 71
HEADER = struct.Struct("=IHHII")  # nlmsghdr: length, type, flags, sequence, port
_NFGEN = struct.Struct("=BBH")  # nfgenmsg: family, version, resource id
_ATTR = struct.Struct("=HH")  # nlattr: length, type


class GenerationReader:
    """A netlink socket of the namespace it is made in, asking for the generation."""

    def __init__(self) -> None:
        self._sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
        self._sock.bind((0, 0))
        self._sequence = 0

    def read(self) -> int:
        """The current generation; raises OSError when the kernel refuses."""
        self._sequence += 1
        kind = (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_GETGEN
        body = _NFGEN.pack(socket.AF_UNSPEC, 0, 0)
        self._sock.send(
            HEADER.pack(HEADER.size + len(body), kind, NLM_F_REQUEST, self._sequence, 0) + body
        )
        while True:
            reply = self._sock.recv(65536)
            length, got, _, sequence, _ = HEADER.unpack_from(reply)
            if sequence != self._sequence:
                continue  # an answer to an earlier request that timed out
            if got == NLMSG_ERROR:
                (error,) = struct.unpack_from("=i", reply, HEADER.size)
                raise OSError(-error, os.strerror(-error))
            return _generation(reply[HEADER.size + _NFGEN.size : length])

    def cookie(self) -> int | None:
        """The namespace's cookie (SO_NETNS_COOKIE): unique for the boot, never reused,
        unlike the namespace's inode number. None on kernels older than 5.14."""
        try:
            raw = self._sock.getsockopt(socket.SOL_SOCKET, SO_NETNS_COOKIE, 8)
        except OSError:
            return None
        return int(struct.unpack("=Q", raw)[0])

    def close(self) -> None:
        """Close the socket."""
        self._sock.close()


def _generation(attributes: bytes) -> int:
    offset = 0
    while offset + _ATTR.size <= len(attributes):
        size, kind = _ATTR.unpack_from(attributes, offset)
        if size < _ATTR.size:
            break  # malformed: no attribute is shorter than its header
        if kind & 0x3FFF == NFTA_GEN_ID:
            (value,) = struct.unpack_from(">I", attributes, offset + _ATTR.size)
            return int(value)
        offset += (size + 3) & ~3
    raise OSError("the kernel's generation reply has no NFTA_GEN_ID")


class Generations:
    """The ruleset generation and the identity of one network namespace (None: ours)."""

    def __init__(self, netns: str | None) -> None:
        self.netns = netns
        self._reader: GenerationReader | None = None
        self._inode = 0  # the namespace the reader was opened in
        self._monitor: Monitor | None = None

    def _open(self) -> GenerationReader:
        if self._reader is None:
            with inside(self.netns):
                self._reader = GenerationReader()
                self._inode = os.stat("/proc/thread-self/ns/net").st_ino
        return self._reader

    def replaced(self) -> bool:
        """Whether the name now stands for another namespace than the one the reader
        was opened in (deleted and made again), or for none; the reader is then closed.
        The old namespace lives on while a socket holds it, so its number is not reused."""
        if self._reader is None or self.netns is None:
            return False
        try:
            with inside(self.netns):
                same = os.stat("/proc/thread-self/ns/net").st_ino == self._inode
        except NamespaceError:
            same = False
        if not same:
            self._reader.close()
            self._reader = None
            self.unfollow()
        return not same

    def follow(self, touches: Touches) -> None:
        """Follow the commits in the namespace from now on (`Monitor`), unless already
        following without a loss; `quiet` then answers for later generations."""
        if self._monitor is not None:
            self._monitor.drain()  # so that a loss since the last look shows now
            if not self._monitor.lost:
                return
        self.unfollow()
        try:
            with inside(self.netns):
                monitor = Monitor(touches)
        except (OSError, NamespaceError):
            return  # no monitor: every question gets "not known"
        try:
            # Subscribed first, then the generation: every commit after it is seen.
            monitor.start = self._open().read()
        except (OSError, NamespaceError):
            monitor.close()
            return
        self._monitor = monitor

    def unfollow(self) -> None:
        """Stop following commits."""
        if self._monitor is not None:
            self._monitor.close()
            self._monitor = None

    def listen(self) -> None:
        """Read the commit announcements queued so far, if following."""
        if self._monitor is not None:
            self._monitor.drain()

    def quiet(self, since: int, until: int, own: int = 0) -> bool:
        """`Monitor.quiet`; False when not following."""
        return self._monitor is not None and self._monitor.quiet(since, until, own)

    def read(self) -> int:
        """The generation now; `ApplyError` when it cannot be read."""
        try:
            return self._open().read()
        except OSError as exc:
            raise ApplyError(f"cannot read the nftables ruleset generation: {exc}") from exc

    def identity(self) -> str | None:
        """`netns-<cookie>`, unique for the boot, or None on kernels without cookies."""
        try:
            cookie = self._open().cookie()
        except OSError:
            return None
        return None if cookie is None else f"netns-{cookie}"


NFNLGRP_NFTABLES = 7  # the multicast group of committed nftables changes
SOL_NETLINK = 270
NETLINK_ADD_MEMBERSHIP = 1
SO_RCVBUFFORCE = 33
NFT_MSG_NEWGEN = 15
# Every nftables object message names its table in attribute 1 (NFTA_TABLE_NAME,
# NFTA_CHAIN_TABLE, NFTA_RULE_TABLE, NFTA_SET_TABLE, NFTA_SET_ELEM_LIST_TABLE,
# NFTA_OBJ_TABLE, NFTA_FLOWTABLE_TABLE); a chain's message names the chain in
# attribute 3 (NFTA_CHAIN_NAME), a rule's its chain in attribute 2 (NFTA_RULE_CHAIN).
NFTA_ANY_TABLE = 1
NFTA_RULE_CHAIN = 2
NFTA_CHAIN_NAME = 3
NFT_MSG_NEWCHAIN, NFT_MSG_DELCHAIN, NFT_MSG_DESTROYCHAIN = 3, 5, 27
NFT_MSG_NEWRULE, NFT_MSG_DELRULE, NFT_MSG_DESTROYRULE = 6, 8, 28
# Whether an announced object message (family, message type, attributes) is of the
# objects a monitor follows.
Touches = Callable[[int, int, dict[int, bytes]], bool]


def in_table(family: int, table: str) -> Touches:
    """Any object of one table (nftables: `inet lbc`, all of it lbc's)."""
    name = table.encode() + b"\0"

    def touches(got: int, kind: int, attributes: dict[int, bytes]) -> bool:
        return got == family and attributes.get(NFTA_ANY_TABLE) == name

    return touches


def in_chains(
    families: tuple[int, ...], tables: tuple[str, ...], prefix: str, shared: tuple[str, ...]
) -> Touches:
    """Chains named `prefix...` and the `shared` chains of some tables, and anything of
    those tables that is not a chain or a rule (iptables-nft: lbc's `LBC-` chains and
    its jumps from the built-in chains, in tables other tools use too)."""
    names = {t.encode() + b"\0" for t in tables}
    start = prefix.encode()
    chains = {c.encode() + b"\0" for c in shared}

    def touches(family: int, kind: int, attributes: dict[int, bytes]) -> bool:
        if family not in families or attributes.get(NFTA_ANY_TABLE) not in names:
            return False
        if kind in (NFT_MSG_NEWCHAIN, NFT_MSG_DELCHAIN, NFT_MSG_DESTROYCHAIN):
            chain = attributes.get(NFTA_CHAIN_NAME)
        elif kind in (NFT_MSG_NEWRULE, NFT_MSG_DELRULE, NFT_MSG_DESTROYRULE):
            chain = attributes.get(NFTA_RULE_CHAIN)
        else:
            return True  # the table itself, a set: not told apart
        return chain is None or chain.startswith(start) or chain in chains

    return touches


MONITOR_BUFFER = 16 << 20  # bytes the kernel may queue for the monitor (then: read)


class Monitor:
    """The transactions committed in a namespace, as the kernel announces them.

    Subscribed to NFNLGRP_NFTABLES (what `nft monitor` reads): for every committed
    transaction the kernel sends a message per object it changed, each naming its
    table, then NFT_MSG_NEWGEN with the new generation. Transactions are committed one
    at a time, so the messages of two never mix.
    Made in the namespace it follows; `start` is the generation after which every
    commit is known (set by the owner right after subscribing). If the kernel drops a
    message (the queue full), nothing after `start` can be vouched for: the owner
    makes a new monitor.
    """

    def __init__(self, touches: Touches, buffer: int | None = None) -> None:
        buffer = buffer or MONITOR_BUFFER
        self.touches = touches
        sock = socket.socket(
            socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_NONBLOCK, NETLINK_NETFILTER
        )
        try:
            try:
                sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, buffer)
            except OSError:  # without CAP_NET_ADMIN: as much as rmem_max allows
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, buffer)
            sock.bind((0, 0))
            sock.setsockopt(SOL_NETLINK, NETLINK_ADD_MEMBERSHIP, NFNLGRP_NFTABLES)
        except OSError:
            sock.close()
            raise
        self._sock = sock
        self.start: int | None = None
        self.lost = False  # a message was dropped: nothing can be vouched for
        self._commits: dict[int, bool] = {}  # generation: whether it touched the table
        self._touching = False  # the transaction being announced touched the table

    def drain(self) -> None:
        """Read the announcements queued so far (none waits: the socket does not block)."""
        while not self.lost:
            try:
                data = self._sock.recv(1 << 20)
            except BlockingIOError:
                return
            except OSError:  # ENOBUFS: the kernel dropped messages
                self.lost = True
                return
            self._read(data)

    def _read(self, data: bytes) -> None:
        offset = 0
        while offset + HEADER.size <= len(data):
            length, kind, _, _, _ = HEADER.unpack_from(data, offset)
            if length < HEADER.size:
                return
            if kind >> 8 == NFNL_SUBSYS_NFTABLES:
                family = data[offset + HEADER.size]
                attributes = data[offset + HEADER.size + _NFGEN.size : offset + length]
                if kind & 0xFF == NFT_MSG_NEWGEN:
                    generation = _attributes(attributes).get(NFTA_GEN_ID)
                    if generation is not None:
                        number = int(struct.unpack(">I", generation[:4])[0])
                        self._commits[number] = self._touching
                    self._touching = False
                elif not self._touching and self.touches(
                    family, kind & 0xFF, _attributes(attributes)
                ):
                    self._touching = True
            offset += (length + 3) & ~3

    def quiet(self, since: int, until: int, own: int = 0) -> bool:
        """Whether every transaction after generation `since` up to `until` is known, and
        exactly `own` of them touched the table: the caller's own commits, when it made
        `own` transactions in that span under the host lock, so that every other one
        left the table alone. Forgets the transactions up to `since`."""
        self.drain()
        if self.lost or self.start is None or since < self.start or own < 0:
            return False
        for number in [n for n in self._commits if n <= since]:
            del self._commits[number]
        touched = 0
        for number in range(since + 1, until + 1):
            if number not in self._commits:
                return False
            touched += self._commits[number]
        return touched == own

    def close(self) -> None:
        """Close the socket."""
        self._sock.close()


def _attributes(data: bytes) -> dict[int, bytes]:
    """The top-level netlink attributes of `data`, by type."""
    found: dict[int, bytes] = {}
    offset = 0
    while offset + _ATTR.size <= len(data):
        size, kind = _ATTR.unpack_from(data, offset)
        if size < _ATTR.size:
            break
        found[kind & 0x3FFF] = data[offset + _ATTR.size : offset + size]
        offset += (size + 3) & ~3
    return found


class Following:
    """`follow`, `listen` and `quiet` for a kernel adapter that keeps `_generations`
    and says in `_followed` which announced objects are lbc's (None: none can be)."""

    _generations: Generations

    def _followed(self) -> Touches | None:
        raise NotImplementedError

    def follow(self) -> None:
        """Follow the namespace's commits from now on (a long-lived session), so that
        `quiet` can tell other writers' transactions that left lbc's objects alone."""
        touches = self._followed()
        if touches is not None:
            self._generations.follow(touches)

    def listen(self) -> None:
        """Read the commit announcements that arrived since the last call (`follow`):
        a caller that applies seldom calls it often, so a burst of other writers'
        commits between two applies cannot overflow the queue."""
        self._generations.listen()

    def quiet(self, since: int, until: int, own: int = 0) -> bool:
        """Whether the transactions after generation `since` up to `until` are known to
        have left lbc's objects alone, but for `own` of this process's (`follow`)."""
        return self._generations.quiet(since, until, own)
