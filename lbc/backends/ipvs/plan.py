"""IR -> the ordered list of kernel operations of an IPVS dataplane (pure).

Order: the dummy interface, its addresses, each virtual service followed by its
real servers, the sysctls IPVS needs, then the helper table. Services and real
servers are in one total order (family, protocol number, address, port), which is
also the order `ipvsadm -S -n` prints whenever addresses are less than 2**31 apart
(ipvsadm compares addresses by a wrapping 32-bit subtraction, which is not a total
order; `text.canonical_save` sorts its output the way lbc does).
"""

from __future__ import annotations

from itertools import pairwise

from lbc.backends.ipvs import names as n
from lbc.backends.ipvs.ops import (
    PROTO_NUMBER,
    AddAddress,
    AddDestination,
    AddService,
    EnsureDummy,
    LoadRules,
    Operation,
    SetSysctl,
)
from lbc.backends.ipvs.rules import render_rules, virtual_addresses
from lbc.errors import Unsupported, UnsupportedError
from lbc.ir.names import address_key
from lbc.ir.nodes import Backend, Frontend, Pool, Program, Scheduler

# IR schedulers IPVS has under the same name (IPVS has no random scheduler).
NATIVE = {
    Scheduler.ROUND_ROBIN: "rr",
    Scheduler.WEIGHTED_ROUND_ROBIN: "wrr",
    Scheduler.LEAST_CONN: "lc",
    Scheduler.WEIGHTED_LEAST_CONN: "wlc",
    Scheduler.SOURCE_HASH: "sh",
    Scheduler.MAGLEV: "mh",
}
# IPVS schedulers that ignore destination weights (other than weight 0).
UNWEIGHTED = frozenset({"rr", "lc"})


def scheduler_name(pool: Pool) -> str:
    """The IPVS scheduler of `pool`: rr by default, wrr when active weights differ."""
    if pool.scheduler is Scheduler.DEFAULT:
        return "wrr" if len({b.weight for b in pool.active}) > 1 else "rr"
    if pool.scheduler in NATIVE:
        return NATIVE[pool.scheduler]
    who = f"{pool.service}/{pool.proto} ipv{pool.family}"
    raise UnsupportedError(
        "ipvs",
        [Unsupported("ipvs", who, str(pool.scheduler), "IPVS has no random scheduler")],
    )


def frontend_key(f: Frontend) -> tuple[int, int, int, int]:
    """Total order of virtual services: family, protocol number, address, port."""
    family, value = address_key(f.address)
    return family, PROTO_NUMBER[f.proto], value, f.port


def operations(program: Program) -> tuple[Operation, ...]:
    """Every operation that builds `program`'s dataplane in an empty namespace, in order."""
    pools = program.pool_index()
    ops: list[Operation] = [EnsureDummy(n.LINK)]
    ops += [AddAddress(n.LINK, a) for a in virtual_addresses(program)]
    frontends = sorted(program.frontends, key=frontend_key)
    for f in frontends:
        pool = pools[f.pool]
        ops.append(
            AddService(f.proto, f.address, f.port, scheduler_name(pool), pool.affinity_timeout)
        )
        proto, address, port = f.proto, f.address, f.port
        ops += [
            AddDestination(proto, address, port, b.address, b.port, b.weight)
            for b in _in_order(pool.active)
        ]
    if frontends:
        ops += [SetSysctl(key, value) for key, value in n.SYSCTLS]
    ops.append(LoadRules(n.TABLE_FAMILY, n.TABLE, render_rules(program)))
    return tuple(ops)


def _destination_key(b: Backend) -> tuple[int, int, int]:
    return (*address_key(b.address), b.port)


def _in_order(backends: tuple[Backend, ...]) -> tuple[Backend, ...] | list[Backend]:
    """`backends` in the real servers' order: family, address, port.

    Lowering lists a pool's backends in that order already; they are sorted only
    when they are not (a program made by hand), which one pass over them tells.
    """
    keys = [_destination_key(b) for b in backends]
    if all(a < b for a, b in pairwise(keys)):
        return backends
    return sorted(backends, key=_destination_key)
