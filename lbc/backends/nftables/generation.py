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
        return not same

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
