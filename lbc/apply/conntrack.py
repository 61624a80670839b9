"""Stale UDP flows: conntrack entries that would keep sending datagrams to the wrong place.

UDP has no connection to end, so a conntrack entry lives as long as datagrams keep
coming: a client that sends every few seconds (DNS resolvers reuse their source port,
so do syslog and metrics agents) stays on the endpoint it was first translated to,
even after that endpoint is gone, and stays untranslated after a service that had no
endpoints gets some. kube-proxy deletes such entries after every sync; so does lbc's
apply, with the same rule: an entry is stale when it is UDP, its original destination
is one of the program's frontends (address, port) and the place it replies from is
not one of that frontend's endpoints (address and target port) in the program, an
untranslated entry included (it replies from the frontend itself). Entries for
addresses and ports the program does not serve are left alone: they are not lbc's.

TCP and SCTP need none of this: a connection to a gone endpoint fails and the client
opens a new one, which the rules translate afresh.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import socket
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

from lbc.errors import ApplyError
from lbc.ir import Program, Proto

if TYPE_CHECKING:
    from lbc.apply.engine import ApplyResult

Address = ipaddress.IPv4Address | ipaddress.IPv6Address
Place = tuple[Address, int]  # an address and a port


@dataclass(frozen=True, slots=True)
class Tracked:
    """One conntrack entry: its original direction and where replies come from."""

    family: int  # 4 or 6
    source: Place
    dest: Place  # what the client sent to
    reply_source: Place  # where replies come from: the endpoint it was translated to

    def __str__(self) -> str:
        def text(place: Place) -> str:
            address, port = place
            return f"[{address}]:{port}" if address.version == 6 else f"{address}:{port}"

        return (
            f"udp {text(self.source)} -> {text(self.dest)} (replies from {text(self.reply_source)})"
        )


def udp_endpoints(program: Program) -> dict[Place, frozenset[Place]]:
    """Each UDP frontend (address, port) of `program`, with the endpoints it may use.

    The endpoints are those of the frontend's pool and of its pool for cluster
    traffic (traffic policy Local has both), weight 0 included: such an endpoint
    takes no new flows but keeps the ones it has.
    """
    pools = program.pool_index()
    out: dict[Place, set[Place]] = {}
    for f in program.frontends:
        if f.proto is not Proto.UDP:
            continue
        places = out.setdefault((ipaddress.ip_address(f.address), f.port), set())
        for pool_id in (f.pool, f.internal_pool):
            if pool_id is not None:
                places.update(
                    (ipaddress.ip_address(b.address), b.port) for b in pools[pool_id].backends
                )
    return {frontend: frozenset(places) for frontend, places in out.items()}


def stale(program: Program, entries: Iterable[Tracked]) -> list[Tracked]:
    """The UDP `entries` (all of them UDP) that `program` would no longer send where they go."""
    served = udp_endpoints(program)
    out = []
    for entry in entries:
        allowed = served.get(entry.dest)
        if allowed is not None and entry.reply_source not in allowed:
            out.append(entry)
    return out


def clear_stale(program: Program, netns: str | None = None) -> list[Tracked]:
    """Delete the stale UDP entries of the kernel's conntrack table (in `netns`).

    Returns what was deleted. Reads nothing when `program` has no UDP frontend. An
    entry that vanished meanwhile (it timed out) is not an error. Raises `ApplyError`
    when the table cannot be read or an entry cannot be deleted.
    """
    if not any(f.proto is Proto.UDP for f in program.frontends):
        return []
    from pyroute2.conntrack import Conntrack
    from pyroute2.netlink.exceptions import NetlinkError
    from pyroute2.netlink.nfnetlink.nfctsocket import NFCTAttrTuple

    from lbc.backends.ipvs.netlink import network_namespace

    deleted: list[Tracked] = []
    families = sorted({f.family for f in program.frontends if f.proto is Proto.UDP})
    try:
        with network_namespace(netns):
            for family in families:
                af = socket.AF_INET if family == 4 else socket.AF_INET6
                with Conntrack(nfgen_family=af) as ct:
                    query = NFCTAttrTuple(family=af, proto=socket.IPPROTO_UDP)
                    entries = list(_entries(family, ct.dump_entries(tuple_orig=query)))
                    for entry in stale(program, entries):
                        original = NFCTAttrTuple(
                            family=af,
                            saddr=str(entry.source[0]),
                            daddr=str(entry.dest[0]),
                            proto=socket.IPPROTO_UDP,
                            sport=entry.source[1],
                            dport=entry.dest[1],
                        )
                        try:
                            ct.entry("del", tuple_orig=original)
                        except NetlinkError as exc:
                            if exc.code != 2:  # ENOENT: it expired meanwhile
                                raise
                            continue
                        deleted.append(entry)
    except (NetlinkError, OSError) as exc:
        raise ApplyError(f"cannot clear stale UDP flows from the conntrack table: {exc}") from exc
    return deleted


def after_apply(result: ApplyResult, program: Program, netns: str | None) -> ApplyResult:
    """`result` with the stale UDP flows of `program` cleared (`clear_stale`), or with
    the reason they could not be among its warnings: the rules stay applied."""
    try:
        cleared = clear_stale(program, netns)
    except ApplyError as exc:
        return dataclasses.replace(result, warnings=(*result.warnings, str(exc)))
    return dataclasses.replace(result, cleared=tuple(cleared))


def _entries(family: int, dumped: Iterable[object]) -> Iterator[Tracked]:
    """pyroute2's conntrack entries as `Tracked` (UDP only; the dump is filtered already)."""
    for e in dumped:
        orig, reply = e.tuple_orig, e.tuple_reply  # type: ignore[attr-defined]
        if orig.proto != socket.IPPROTO_UDP:
            continue
        yield Tracked(
            family,
            (ipaddress.ip_address(orig.saddr), orig.sport),
            (ipaddress.ip_address(orig.daddr), orig.dport),
            (ipaddress.ip_address(reply.saddr), reply.sport),
        )
