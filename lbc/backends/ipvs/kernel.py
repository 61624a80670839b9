"""The IPVS kernel adapter: lbc's IPVS objects as a `State`, written by undoable steps.

Equivalent to `ip -d addr show lbc-ipvs0`, `ipvsadm -S -n` and `nft list table inet
lbc-ipvs` for the snapshot, and to a sequence of single `ip`, `ipvsadm`, `sysctl`
and `nft -f` commands for the commit (through pyroute2 and libnftables, in the
target network namespace; `netlink.Pyroute2Dataplane`). The objects, by state key:

    link lbc-ipvs0                 `lbc-ipvs0 dummy down`
    addresses lbc-ipvs0            one `10.0.1.175/32` line per virtual address
    service -t 10.0.1.175:80       its `-A` line and `-a` lines, as `ipvsadm -S -n`
    sysctl net.ipv4.vs.conntrack   `net.ipv4.vs.conntrack=1`, while lbc has services
                                   (and so on for each of `names.SYSCTLS`)
    nft table inet lbc-ipvs, nft set vips-v4, nft chain nat-output, ...
                                   the helper table, as `nft list table` prints it

Ownership: an IPVS virtual service is lbc's when its address is bound to lbc-ipvs0,
or when lbc's helper table records it (the `services-v4`/`-v6` sets hold every
address . protocol . port lbc serves, node ports on the node's own addresses
included). Every other service (another tool's, fwmark services) is never read
into the state, changed or deleted; an apply that would bind an address another
tool's service uses is refused before any change (bound, theirs would read as lbc's).
An `lbc-ipvs0` that is not a dummy is not lbc's: its addresses own nothing, and apply
and delete refuse to touch it. Protocol numbers nft lists without /etc/protocols are
read as names. A sysctl is shared (`State.shared`): lbc sets it, and leaves it when
it stops needing it (no plan, `lbc delete`'s included, removes one). A service's flags
and persistence netmask are read back (`-o`, `-b`, `-M` in its line): another tool's
one-packet scheduling shows as drift.

A commit is an ordered list of single writes, each with its undo, computed from the
live kernel and the desired state (`plan_steps`), so only what differs is written:
1. the interface, then new addresses (a service's address is bound before it exists);
   an interface found up is set down, which drops its IPv6 addresses (with
   keep_addr_on_down=0, the default): they are deleted before and bound again after;
2. services no longer wanted (the helper table still records them);
3. sysctls, then the helper table, replaced whole in one nftables transaction;
4. new services with their real servers; changed services: new real servers first,
   then changed ones, then removed ones (make before break);
5. addresses no longer wanted, then the interface.
At every point between two steps, every lbc service in the kernel is owned by the
rule above, so an apply killed half way leaves nothing that a later apply would not
recognise as its own and converge. On any failure, the steps already done are
undone in reverse order and `ApplyError` names the step and the kernel's answer. The
engine's rollback after a read-back mismatch (a commit back to the snapshot the last
one started from) writes back the sysctls that commit changed, as the undo would: a
snapshot holds every sysctl's value, lbc's services or not.

Graceful termination (kube-proxy's deleteRsFunc): a real server the config no longer
wants is deleted at once when it is UDP or SCTP (the next packet of its connections is
scheduled afresh, `expire_nodest_conn`), or TCP without connections (ActiveConn +
InActConn: a closed connection counts until IPVS expires it, as in kube-proxy).
Otherwise it is set to weight 0 and marked as draining, in the kernel only: weight
0, upper connection threshold 2**31-1 (the largest the kernel takes; never reached)
and lower threshold the CLOCK_BOOTTIME second draining began (a lower threshold only
ends an overload the upper one started, so both are inert). `ipvsadm -S` does not
print thresholds; lbc's lines add them as `-x UPPER -y LOWER` when set. While it has
connections and `drain_timeout` has not passed, the snapshot leaves it out:
`verify` shows no drift and `apply` has nothing to do for it. Once drained (or timed
out) it shows up again, at weight 0, and the next apply deletes it. A draining
server the config wants again is set back to its weight; a weight-0 server left
behind by anyone else is shown as such and restored or removed by the next apply.
"""

from __future__ import annotations

import ipaddress
import re
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Protocol

from lbc.apply.state import Plan, State, plan_between
from lbc.backends.base import Artifact
from lbc.backends.ipvs import names as n
from lbc.backends.ipvs.netlink import (
    FWD_FLAGS,
    AddressStep,
    Dest,
    DestStep,
    LinkStep,
    Live,
    RulesStep,
    ServiceStep,
    Step,
    SysctlStep,
)
from lbc.backends.ipvs.ops import (
    IPVSADM_PROTO,
    AddAddress,
    AddDestination,
    AddService,
    EnsureDummy,
    LoadRules,
    SetSysctl,
)
from lbc.backends.nftables.incremental import ELEMENT
from lbc.backends.nftables.kernel import incremental_script, parse
from lbc.errors import ApplyError
from lbc.ir.names import address_key
from lbc.ir.nodes import Proto

LINK_KEY = f"link {n.LINK}"
ADDRESSES_KEY = f"addresses {n.LINK}"
SERVICE = "service "
SYSCTL = "sysctl "
RULES = "nft "
TABLE = f"{n.TABLE_FAMILY} {n.TABLE}"
TABLE_KEY = f"{RULES}table {TABLE}"

DRAIN_UPPER = 0x7FFFFFFF  # the upper threshold that marks a real server as draining
DRAIN_TIMEOUT = 300.0  # seconds a removed real server may keep its connections

_PROTO_BY_FLAG = {flag: proto for proto, flag in IPVSADM_PROTO.items()}
_FWD_BY_FLAG = {flag: method for method, flag in FWD_FLAGS.items()}
_MARK_NUMBER = re.compile(r"\b0x([0-9a-f]+)\b")
_ZERO = re.compile(r"((?:==|!=) )0(\s|$)")
_MASKED = re.compile(r"meta mark & 0x([0-9a-f]{8}) (==|!=) 0x([0-9a-f]{8})")


def boottime() -> float:
    """Seconds since boot, suspend included: a clock every process of this boot shares."""
    return time.clock_gettime(time.CLOCK_BOOTTIME)


class Dataplane(Protocol):
    """The adapter's kernel I/O: read everything raw, and perform single steps."""

    def read(self) -> Live:
        """The namespace's interface, IPVS services, helper table and sysctls."""
        ...

    def writer(self) -> AbstractContextManager[Callable[[Step], None]]:
        """A context yielding a function that performs one step or raises `ApplyError`."""
        ...


@dataclass(frozen=True, slots=True)
class Undoable:
    """One step of a commit and the steps that take it back."""

    step: Step
    undo: tuple[Step, ...] = ()


@dataclass(frozen=True, slots=True)
class View:
    """What lbc owns in a `Live` read: the state, and the records behind it."""

    state: State
    services: Mapping[str, tuple[AddService, tuple[Dest, ...]]]  # every real server
    hidden: frozenset[tuple[str, str, int]]  # (service key, address, port) draining


def service_key(service: AddService) -> str:
    """`service -t 10.0.1.175:80`."""
    return SERVICE + service.virtual()


def service_lines(service: AddService, dests: Iterable[Dest]) -> tuple[str, ...]:
    """The `-A` line and the `-a` lines in lbc's order (address, then port)."""
    ordered = sorted(dests, key=lambda d: (*address_key(d.address), d.port))
    return (service.line(), *(d.line(service) for d in ordered))


def parse_service(lines: Sequence[str]) -> tuple[AddService, dict[tuple[str, int], Dest]]:
    """A service object's lines back into records (the inverse of `service_lines`)."""
    words = lines[0].split()
    address, port = _split_hostport(words[2])
    scheduler = words[words.index("-s") + 1]
    persistence = int(words[words.index("-p") + 1]) if "-p" in words else None
    flags, netmask = AddService.options(words[3:])
    service = AddService(
        _PROTO_BY_FLAG[words[1]], address, port, scheduler, persistence, flags, netmask
    )
    dests: dict[tuple[str, int], Dest] = {}
    for line in lines[1:]:
        words = line.split()
        address, port = _split_hostport(words[4])
        fwd = words[5]
        method = _FWD_BY_FLAG[fwd] if fwd in _FWD_BY_FLAG else int(fwd.partition("=")[2])
        options = dict(zip(words[6::2], words[7::2], strict=False))
        dests[(address, port)] = Dest(
            address,
            port,
            int(options["-w"]),
            method,
            int(options.get("-x", 0)),
            int(options.get("-y", 0)),
        )
    return service, dests


def _split_hostport(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host.strip("[]"), int(port)


def listed(table: str) -> str:
    """The rendered helper table as `nft list table` prints it back.

    nft prints marks as 8 hex digits, compares them with 0x00000000, and names the
    ICMP type of a `reject` after an IPv4 or IPv6 match. A mask of leading ones (a
    prefix: bit 31 alone is /1) it prints as a prefix, `meta mark 0x00000000/1`, and
    `== ` left out. Every golden case is checked against a real `nft list` in the
    IPVS VM suite.
    """
    out = []
    for line in table.splitlines():
        body = line.strip()
        if "meta mark" in body:
            line = _MARK_NUMBER.sub(lambda m: f"0x{int(m.group(1), 16):08x}", line)
            line = _ZERO.sub(r"\g<1>0x00000000\2", line)
            line = _MASKED.sub(_as_prefix, line)
        if body.endswith(" reject") and body.startswith("ip6 "):
            line += " with icmpv6 port-unreachable"
        elif body.endswith(" reject") and body.startswith("ip "):
            line += " with icmp port-unreachable"
        out.append(line)
    return "\n".join(out) + "\n"


def _as_prefix(m: re.Match[str]) -> str:
    """`meta mark & MASK OP VALUE` as nft lists it when MASK is a prefix (leading ones)."""
    mask, op, value = int(m.group(1), 16), m.group(2), m.group(3)
    length = 32 - (~mask & 0xFFFFFFFF).bit_length()
    if mask != (0xFFFFFFFF << (32 - length)) & 0xFFFFFFFF or length == 0:
        return m.group(0)  # not a prefix: nft keeps the `&`
    negate = "!= " if op == "!=" else ""
    return f"meta mark {negate}0x{value}" + (f"/{length}" if length < 32 else "")


def rules_objects(listing: str) -> dict[str, tuple[str, ...]]:
    """The helper table's state objects: the table itself, then its sets and chains,
    as `parse` reads a listing (protocol numbers as names, marks and IPv6 addresses as
    lbc writes them, a dormant table's flags as an object)."""
    return {TABLE_KEY: (), **{RULES + k: v for k, v in parse(listing, listed=True).items()}}


def rules_step(objects: Mapping[str, tuple[str, ...]]) -> RulesStep:
    """One nft transaction that makes the helper table hold `objects` (none: no table)."""
    head = [f"add table {TABLE}", f"delete table {TABLE}"]
    if not objects:
        return RulesStep("\n".join(head) + "\n", "deleting")
    items = [(k.removeprefix(RULES), v) for k, v in objects.items() if k != TABLE_KEY]
    items.sort(key=lambda item: item[0].startswith("chain "))  # sets before the rules using them
    body = [f"table {TABLE} {{"]
    for name, lines in items:
        kind, _, obj = name.partition(" ")
        body.append(f"\t{kind} {obj} {{")
        body += [f"\t\t{line}" for line in lines if not line.startswith(ELEMENT)]
        elements = [line.removeprefix(ELEMENT) for line in lines if line.startswith(ELEMENT)]
        if elements:
            body.append("\t\telements = { " + ", ".join(elements) + " }")
        body.append("\t}")
    return RulesStep("\n".join([*head, *body, "}"]) + "\n", "replacing")


def rules_change(
    before: Mapping[str, tuple[str, ...]], after: Mapping[str, tuple[str, ...]]
) -> RulesStep:
    """The transaction from one helper table to another: only the elements and chains
    that differ when both exist (a change of services is elements), else the whole."""
    if not before or not after:
        return rules_step(after)
    old = State({k.removeprefix(RULES): v for k, v in before.items() if k != TABLE_KEY})
    new = State({k.removeprefix(RULES): v for k, v in after.items() if k != TABLE_KEY})
    script = incremental_script(old, new, plan_between("ipvs", old, new), TABLE)
    return rules_step(after) if script is None else RulesStep(script, "changing")


def recorded_services(objects: Mapping[str, tuple[str, ...]]) -> set[tuple[str, Proto, int]]:
    """(address, protocol, port) of every service the helper table's sets record."""
    found: set[tuple[str, Proto, int]] = set()
    for family in (4, 6):
        for line in objects.get(f"{RULES}set {n.SERVICES}{n.family_suffix(family)}", ()):
            parts = [p.strip() for p in line.removeprefix(ELEMENT).split(" . ")]
            if not line.startswith(ELEMENT) or len(parts) != 3:
                continue
            try:
                address = str(ipaddress.ip_address(parts[0]))
                found.add((address, Proto(parts[1]), int(parts[2])))
            except ValueError:
                continue
    return found


def is_marked(dest: Dest) -> bool:
    """Set to drain by lbc: weight 0 and the drain mark in its thresholds."""
    return dest.weight == 0 and dest.upper == DRAIN_UPPER and dest.lower > 0


def connections(proto: Proto, dest: Dest) -> int:
    """The connections a removed real server waits for, as kube-proxy's deleteRsFunc:
    TCP's active and inactive ones (a closed connection is inactive until IPVS expires
    it); none for UDP and SCTP, whose real servers are deleted at once (the next
    packet of their connections is scheduled afresh: `expire_nodest_conn`)."""
    return dest.active + dest.inactive if proto is Proto.TCP else 0


def is_draining(proto: Proto, dest: Dest, now: float, drain_timeout: float) -> bool:
    """Marked, still with connections (`connections`), and its drain timeout not passed."""
    return is_marked(dest) and connections(proto, dest) > 0 and now < dest.lower + drain_timeout


def view(
    live: Live,
    now: float,
    drain_timeout: float = DRAIN_TIMEOUT,
    settling: frozenset[tuple[str, str, int]] = frozenset(),
) -> View:
    """lbc's objects in `live`; draining real servers (and `settling` ones) left out."""
    objects: dict[str, tuple[str, ...]] = {}
    if live.link is not None:
        objects[LINK_KEY] = (live.link.line(n.LINK),)
    addresses = owned_addresses(live)
    if addresses:
        objects[ADDRESSES_KEY] = tuple(sorted(addresses, key=address_key))
    rules = rules_objects(live.rules) if live.rules is not None else {}
    bound = {a.partition("/")[0] for a in addresses}
    recorded = recorded_services(rules)
    owned: dict[str, tuple[AddService, tuple[Dest, ...]]] = {}
    hidden: set[tuple[str, str, int]] = set()
    for service, dests in live.services:
        ident = (service.address, service.proto, service.port)
        if service.address not in bound and ident not in recorded:
            continue  # not lbc's
        key = service_key(service)
        owned[key] = (service, dests)
        shown = []
        for d in dests:
            where = (key, d.address, d.port)
            if is_draining(service.proto, d, now, drain_timeout) or (
                where in settling and is_marked(d)
            ):
                hidden.add(where)
            else:
                shown.append(d)
        objects[key] = service_lines(service, shown)
    shared = {SYSCTL + name: (f"{name}={live.sysctls.get(name) or ''}",) for name, _ in n.SYSCTLS}
    objects.update(rules)
    return View(State(objects, shared), owned, frozenset(hidden))


def owned_addresses(live: Live) -> tuple[str, ...]:
    """The addresses of lbc's interface: none when `lbc-ipvs0` is not a dummy (not lbc's)."""
    return live.addresses if live.link is not None and live.link.kind == "dummy" else ()


def foreign_link(live: Live) -> ApplyError:
    """The refusal to change an `lbc-ipvs0` that is not lbc's dummy interface."""
    assert live.link is not None
    return ApplyError(
        f"ipvs: an interface {n.LINK} exists but is a {live.link.kind!r}, not lbc's "
        f"dummy interface; nothing was changed (remove it: `ip link del {n.LINK}`)"
    )


def desired_state(ops: Iterable[object]) -> State:
    """The state an artifact's operations build, in the snapshot's canonical form."""
    objects: dict[str, tuple[str, ...]] = {}
    shared: dict[str, tuple[str, ...]] = {}
    addresses: list[str] = []
    services: dict[str, tuple[AddService, list[Dest]]] = {}
    for op in ops:
        if isinstance(op, EnsureDummy):
            objects[LINK_KEY] = (op.line(),)
        elif isinstance(op, AddAddress):
            addresses.append(op.line())
        elif isinstance(op, AddService):
            services[service_key(op)] = (op, [])
        elif isinstance(op, AddDestination):
            services[SERVICE + op.virtual()][1].append(Dest(op.address, op.port, op.weight))
        elif isinstance(op, SetSysctl):
            shared[SYSCTL + op.key] = (op.line(),)
        elif isinstance(op, LoadRules):
            objects.update(rules_objects(listed(op.text)))
    if addresses:
        objects[ADDRESSES_KEY] = tuple(sorted(addresses, key=address_key))
    for key, (service, dests) in services.items():
        objects[key] = service_lines(service, dests)
    return State(objects, shared)


@dataclass
class Steps:
    """A commit's steps, the real servers it sets draining, and those the read-back
    after it does not show even if their drain ended meanwhile: these and the ones the
    view before it hid (drained by an earlier apply)."""

    steps: list[Undoable] = field(default_factory=list)
    drained: set[tuple[str, str, int]] = field(default_factory=set)
    tolerated: set[tuple[str, str, int]] = field(default_factory=set)

    def add(self, step: Step, *undo: Step) -> None:
        self.steps.append(Undoable(step, undo))


def plan_steps(
    live: Live,
    seen: View,
    desired: State,
    *,
    full: bool = False,
    now: float = 0.0,
    drain_timeout: float = DRAIN_TIMEOUT,
) -> Steps:
    """The ordered, undoable steps that turn the kernel (`live`, as `seen`) into `desired`.

    `full` rewrites every object lbc wants even where it matches (`apply --full`).
    """
    before, after = seen.state.objects, desired.objects
    out = Steps(tolerated=set(seen.hidden))
    if live.link is not None and live.link.kind != "dummy":
        # Not lbc's: never bound to, set or deleted; `lbc delete` refuses as `apply` does.
        raise foreign_link(live)
    want, have = after.get(ADDRESSES_KEY, ()), before.get(ADDRESSES_KEY, ())
    if LINK_KEY in after:
        if live.link is None:
            out.add(LinkStep("add", n.LINK), LinkStep("del", n.LINK))
        elif live.link.up:
            # Setting it down drops its IPv6 addresses (net.ipv6.conf.*.keep_addr_on_down
            # is 0 by default): they are deleted first, whatever that sysctl says, and
            # those wanted are bound again below, like new ones. Undone: up, then re-added.
            for address in (a for a in have if ":" in a):
                out.add(AddressStep("del", n.LINK, address), AddressStep("add", n.LINK, address))
            out.add(LinkStep("down", n.LINK), LinkStep("up", n.LINK))
            have = tuple(a for a in have if ":" not in a)
    binding = [a for a in want if a not in have]
    _refuse_foreign_services(live, seen, {a.partition("/")[0] for a in binding})
    for address in binding:
        out.add(AddressStep("add", n.LINK, address), AddressStep("del", n.LINK, address))

    for key in sorted(k for k in seen.services if k not in after):
        service, dests = seen.services[key]
        out.add(
            ServiceStep("del", service),
            ServiceStep("add", service),
            *(DestStep("add", service, d) for d in dests),
        )

    values = {}
    for lines in desired.shared.values():  # the sysctls
        name, _, value = lines[0].partition("=")
        values[name] = value
    for name, value in sorted(values.items()):
        if not value:
            # Read where there was no such parameter (ip_vs not loaded yet): nothing to
            # set, nor to put back when a rollback returns to that snapshot.
            continue
        old = live.sysctls.get(name)
        if old != value or full:
            out.add(SysctlStep(name, value), *([SysctlStep(name, old)] if old is not None else []))
    rules_before = {k: v for k, v in before.items() if k.startswith(RULES)}
    rules_after = {k: v for k, v in after.items() if k.startswith(RULES)}
    if rules_before != rules_after or (full and rules_after):
        if full:
            out.add(rules_step(rules_after), rules_step(rules_before))
        else:
            out.add(
                rules_change(rules_before, rules_after), rules_change(rules_after, rules_before)
            )

    for key in sorted(k for k in after if k.startswith(SERVICE)):
        if key not in seen.services:
            service, wanted = parse_service(after[key])
            out.add(ServiceStep("add", service), ServiceStep("del", service))
            for d in wanted.values():
                out.add(DestStep("add", service, d))  # undone with its service
        elif after[key] != before.get(key) or full:
            _change_service(out, seen, key, after[key], full, now, drain_timeout)

    for address in (a for a in have if a not in want):
        out.add(AddressStep("del", n.LINK, address), AddressStep("add", n.LINK, address))
    if LINK_KEY not in after and live.link is not None:
        up = [LinkStep("up", n.LINK)] if live.link.up else []
        out.add(LinkStep("del", n.LINK), LinkStep("add", n.LINK), *up)
    return out


def _refuse_foreign_services(live: Live, seen: View, binding: set[str]) -> None:
    """Refuse, before any change, to bind an address another tool's service uses.

    A service on an address bound to lbc-ipvs0 is lbc's (see the module's ownership
    rule): once bound, theirs would read as lbc's, and a rollback or the next apply
    would delete it.
    """
    theirs = sorted(
        service_key(service).removeprefix(SERVICE)
        for service, _ in live.services
        if service.address in binding and service_key(service) not in seen.services
    )
    if theirs:
        raise ApplyError(
            f"ipvs: another tool's IPVS service(s) {', '.join(theirs)} use an address lbc "
            f"would bind to {n.LINK} (and so own); nothing was changed (remove them, or "
            "move the service off that address)"
        )


def _change_service(
    out: Steps,
    seen: View,
    key: str,
    lines: tuple[str, ...],
    full: bool,
    now: float,
    drain_timeout: float,
) -> None:
    service, wanted = parse_service(lines)
    old_service, records = seen.services[key]
    kernel = {(d.address, d.port): d for d in records}
    if service != old_service or full:
        out.add(ServiceStep("set", service), ServiceStep("set", old_service))
    for where, d in wanted.items():
        old = kernel.get(where)
        if old is None:
            out.add(DestStep("add", service, d), DestStep("del", service, d))
        elif old != d or full:  # also a draining server wanted again
            out.add(DestStep("set", service, d), DestStep("set", service, old))
    shown = {where for where in kernel if (key, *where) not in seen.hidden}
    for where in sorted(shown - wanted.keys(), key=lambda w: (*address_key(w[0]), w[1])):
        old = kernel[where]
        timed_out = is_marked(old) and now >= old.lower + drain_timeout
        if connections(service.proto, old) > 0 and drain_timeout > 0 and not timed_out:
            since = old.lower if is_marked(old) else max(1, int(now))
            drain = Dest(old.address, old.port, 0, old.fwd_method, DRAIN_UPPER, since)
            out.add(DestStep("set", service, drain), DestStep("set", service, old))
            out.drained.add((key, *where))
            out.tolerated.add((key, *where))
        else:
            out.add(DestStep("del", service, old), DestStep("add", service, old))


def run(steps: Sequence[Undoable], perform: Callable[[Step], None]) -> None:
    """Perform `steps` in order; on a failure undo the done ones in reverse and raise."""
    done: list[Undoable] = []
    for item in steps:
        try:
            perform(item.step)
        except Exception as exc:  # anything at all: the kernel must be left as it was
            failed = _undo(done, perform)
            what = f"ipvs: `{item.step.describe()}` failed: {exc}"
            if failed:
                raise ApplyError(
                    f"{what}; undoing the {len(done)} step(s) before it failed too: "
                    + "; ".join(failed)
                ) from exc
            raise ApplyError(f"{what}; the {len(done)} step(s) before it were undone") from exc
        done.append(item)


def _undo(done: Sequence[Undoable], perform: Callable[[Step], None]) -> list[str]:
    failed = []
    for item in reversed(done):
        for step in item.undo:
            try:
                perform(step)
            except Exception as exc:  # keep undoing the rest
                failed.append(f"`{step.describe()}`: {exc}")
    return failed


class IpvsKernel:
    """Snapshot and commit lbc's IPVS dataplane in the host or a named network namespace."""

    def __init__(
        self,
        netns: str | None = None,
        dataplane: Dataplane | None = None,
        drain_timeout: float = DRAIN_TIMEOUT,
        clock: Callable[[], float] = boottime,
    ) -> None:
        if dataplane is None:
            from lbc.backends.ipvs.netlink import Pyroute2Dataplane

            dataplane = Pyroute2Dataplane(netns)
        self.dataplane = dataplane
        self.drain_timeout = drain_timeout
        self.clock = clock
        self._last: tuple[Live, View] | None = None
        # Real servers the last commit set draining or found draining: the read-back
        # right after it does not show them even if their last connection closed in
        # between.
        self._settling: frozenset[tuple[str, str, int]] = frozenset()

    def snapshot(self) -> State:
        """lbc's objects in the kernel; real servers draining gracefully left out."""
        live = self.dataplane.read()
        seen = view(live, self.clock(), self.drain_timeout, self._settling)
        self._settling = frozenset()
        self._last = (live, seen)
        return seen.state

    def desired(self, artifact: Artifact) -> State:
        """The state the artifact's operations build."""
        return desired_state(artifact.data)

    def steps(self, live: State, desired: State, full: bool = False) -> Steps:
        """The steps a commit from `live` to `desired` would take (reads the kernel
        unless `live` is the last snapshot)."""
        if self._last is not None and self._last[1].state == live:
            raw, seen = self._last
        else:
            raw = self.dataplane.read()
            seen = view(raw, self.clock(), self.drain_timeout)
        return plan_steps(
            raw,
            seen,
            desired,
            full=full,
            now=self.clock(),
            drain_timeout=self.drain_timeout,
        )

    def commit(self, live: State, desired: State, plan: Plan) -> None:
        """Perform the steps from `live` to `desired`; on failure undo them and raise."""
        planned = self.steps(live, desired, plan.full)
        self._last, self._settling = None, frozenset()
        if not planned.steps:
            return
        with self.dataplane.writer() as perform:
            run(planned.steps, perform)
        self._settling = frozenset(planned.tolerated)
