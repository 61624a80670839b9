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

import contextlib
import dataclasses
import errno
import ipaddress
import json
import os
import socket
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lbc.apply.netns import inside
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
    """Each UDP frontend (address, port) of `program`, with the places flows may go on to:
    every ready or serving endpoint of its service port (`Pool.serving`)."""
    pools = program.pool_index()
    by_pool: dict[str, frozenset[Place]] = {}  # a pool serves several frontends
    out: dict[Place, frozenset[Place]] = {}
    for f in program.frontends:
        if f.proto is not Proto.UDP:
            continue
        places = by_pool.get(f.pool)
        if places is None:
            serving = pools[f.pool].serving
            places = by_pool[f.pool] = frozenset(
                (ipaddress.ip_address(address), port) for address, port in serving
            )
        out[(ipaddress.ip_address(f.address), f.port)] = places
    return out


def stale(
    program: Program, entries: Iterable[Tracked], gone: Iterable[Place] = ()
) -> list[Tracked]:
    """The UDP `entries` that `program` would no longer send where they go.

    `gone` are frontends that no longer exist: every flow to one of them is stale,
    unless the program serves that address and port again.
    """
    return _stale(_served(program, gone), entries)


def _served(program: Program, gone: Iterable[Place]) -> dict[Place, frozenset[Place]]:
    served = udp_endpoints(program)
    for place in gone:
        served.setdefault(place, frozenset())
    return served


def _stale(served: dict[Place, frozenset[Place]], entries: Iterable[Tracked]) -> list[Tracked]:
    out = []
    for entry in entries:
        allowed = served.get(entry.dest)
        if allowed is not None and entry.reply_source not in allowed:
            out.append(entry)
    return out


# How the entries to check are read. pyroute2 takes about 4 ms a dump request and
# 0.2 ms a dumped entry, so the kernel's own filter (kernel 5.8 and later) keeps the
# requests few and the entries relevant: up to PORTS_UP_TO distinct ports, one dump per
# port (the filter's address match is left out: pyroute2 0.9.7's IPv6 one matches
# nothing, and a dump per frontend costs more than the entries it spares); more ports,
# one dump of every UDP entry. Older kernels ignore the filter and return everything;
# `_stale` checks each entry anyway.
PORTS_UP_TO = 64


def clear_stale(
    program: Program, netns: str | None = None, gone: Iterable[Place] = ()
) -> list[Tracked]:
    """Delete the stale UDP entries of the kernel's conntrack table (in `netns`).

    Returns what was deleted. Reads nothing when there is no UDP frontend to check.
    An entry that vanished meanwhile (it timed out) is not an error. Raises
    `ApplyError` when the table cannot be read or an entry cannot be deleted.
    """
    served = _served(program, gone)
    if not served:
        return []
    try:
        return _clear(served, netns)
    except Exception as exc:  # the namespace, netlink, decoding: whatever goes wrong
        code = getattr(exc, "code", None)
        reason = os.strerror(code) if isinstance(code, int) and code > 0 else str(exc)
        raise ApplyError(
            f"cannot clear stale UDP flows from the conntrack table: {reason}"
        ) from exc


def _clear(served: dict[Place, frozenset[Place]], netns: str | None) -> list[Tracked]:
    from pyroute2.conntrack import Conntrack
    from pyroute2.netlink.exceptions import NetlinkError
    from pyroute2.netlink.nfnetlink.nfctsocket import NFCTAttrTuple

    deleted: list[Tracked] = []
    with inside(netns):
        for family in sorted({address.version for address, _ in served}):
            af = socket.AF_INET if family == 4 else socket.AF_INET6
            places = [p for p in served if p[0].version == family]
            ports = sorted({port for _, port in places})
            udp = socket.IPPROTO_UDP
            if len(ports) <= PORTS_UP_TO:
                queries = [NFCTAttrTuple(family=af, dport=port, proto=udp) for port in ports]
            else:
                queries = [NFCTAttrTuple(family=af, proto=udp)]
            with Conntrack(nfgen_family=af) as ct:
                found: dict[tuple[Place, Place], Tracked] = {}
                for query in queries:
                    for message in ct.dump(tuple_orig=query):
                        entry = _tracked(family, message)
                        if entry is not None:
                            found[(entry.source, entry.dest)] = entry
                for entry in _stale(served, found.values()):
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
                        if exc.code != errno.ENOENT:  # not "it expired meanwhile"
                            raise
                        continue
                    deleted.append(entry)
    return deleted


def after_apply(
    result: ApplyResult,
    program: Program,
    netns: str | None,
    gone: Iterable[Place] = (),
    progress: Callable[[str], None] | None = None,
) -> ApplyResult:
    """`result` with the stale UDP flows of `program` cleared (`clear_stale`), or with
    the reason they could not be among its warnings: the rules stay applied. The time
    it took is added to the result's."""
    gone = list(gone)
    if not gone and not any(f.proto is Proto.UDP for f in program.frontends):
        return result  # nothing to look at: not even a progress line
    start = time.perf_counter()
    if progress is not None:
        progress("clearing stale UDP flows")
    try:
        cleared = tuple(clear_stale(program, netns, gone))
    except ApplyError as exc:
        return dataclasses.replace(
            result,
            warnings=(*result.warnings, str(exc)),
            seconds=result.seconds + time.perf_counter() - start,
        )
    return dataclasses.replace(
        result, cleared=cleared, seconds=result.seconds + time.perf_counter() - start
    )


def udp_frontends(programs: Iterable[Program]) -> set[Place]:
    """The UDP frontends (address, port) of `programs`."""
    return {
        (ipaddress.ip_address(f.address), f.port)
        for p in programs
        for f in p.frontends
        if f.proto is Proto.UDP
    }


def _tracked(family: int, message: Any) -> Tracked | None:
    """One dumped conntrack message as `Tracked`; None unless it is UDP."""
    orig = message.get_attr("CTA_TUPLE_ORIG")
    reply = message.get_attr("CTA_TUPLE_REPLY")
    if orig is None or reply is None:
        return None
    proto = orig.get_attr("CTA_TUPLE_PROTO")
    if proto.get_attr("CTA_PROTO_NUM") != socket.IPPROTO_UDP:
        return None
    src, dst = (
        ("CTA_IP_V4_SRC", "CTA_IP_V4_DST") if family == 4 else ("CTA_IP_V6_SRC", "CTA_IP_V6_DST")
    )
    orig_ip = orig.get_attr("CTA_TUPLE_IP")
    reply_ip = reply.get_attr("CTA_TUPLE_IP")
    reply_proto = reply.get_attr("CTA_TUPLE_PROTO")
    ip = ipaddress.ip_address
    return Tracked(
        family,
        (ip(orig_ip.get_attr(src)), proto.get_attr("CTA_PROTO_SRC_PORT")),
        (ip(orig_ip.get_attr(dst)), proto.get_attr("CTA_PROTO_DST_PORT")),
        (ip(reply_ip.get_attr(src)), reply_proto.get_attr("CTA_PROTO_SRC_PORT")),
    )


def served_record(lock_path: Path, netns: str | None) -> Path | None:
    """Where the UDP frontends last applied in `netns` are kept: beside the lock file,
    named by the namespace's cookie (unique for the boot; /run is emptied at boot).
    None when the kernel has no namespace cookies."""
    from lbc.backends.nftables.generation import GenerationReader

    try:
        with inside(netns):
            reader = GenerationReader()
        try:
            cookie = reader.cookie()
        finally:
            reader.close()
    except (OSError, ApplyError):  # no such namespace, no netlink: no record
        return None
    if cookie is None:
        return None
    return lock_path.with_name(f"{lock_path.name}.udp.netns-{cookie}.json")


def load_places(path: Path) -> set[Place]:
    """The frontends of a record; none when there is none or it cannot be read."""
    try:
        doc = json.loads(path.read_text())
        return {(ipaddress.ip_address(address), int(port)) for address, port in doc}
    except (OSError, ValueError, TypeError):
        return set()


def save_places(path: Path, places: Iterable[Place]) -> None:
    """Write the record atomically, readable by root only; a record that cannot be
    written is none (the next apply then cannot tell which frontends went away)."""
    doc = sorted([str(address), port] for address, port in places)
    tmp = path.with_name(path.name + ".tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(doc, f)
        os.replace(tmp, path)
    except OSError:
        for stale_file in (tmp, path):
            with contextlib.suppress(OSError):
                stale_file.unlink(missing_ok=True)
