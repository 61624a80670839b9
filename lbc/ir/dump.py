"""The canonical text form of an IR program (`lbc compile --backend ir`)."""

from __future__ import annotations

from itertools import groupby

from lbc.ir.names import hostport
from lbc.ir.nodes import Frontend, Pool, Program


def dump(program: Program) -> str:
    """Render `program` as canonical text: one service port and family per paragraph."""
    node = program.node
    out = [
        f"# lbc IR for node {node.name}",
        f"node {node.name}",
        f"  masquerade-mark {node.masquerade_mark:#x}",
        f"  masquerade-all {'yes' if node.masquerade_all else 'no'}",
    ]
    if node.localhost_node_ports:
        out.append("  localhost-node-ports yes")
    if node.zone is not None:
        out.append(f"  zone {node.zone}")
    out += [f"  address {a}" for a in node.addresses]
    out += [f"  pod-cidr {c}" for c in node.pod_cidrs]
    out += [f"  reject-unknown-ports {a}" for a in program.reject_unknown]
    by_service: dict[tuple[str, int, str], list[Frontend]] = {}
    for f in program.frontends:
        by_service.setdefault((f.service, f.family, f.proto), []).append(f)
    for key, pools in groupby(program.pools, key=lambda p: (p.service, p.family, p.proto)):
        service, family, proto = key
        out.append("")
        out.append(f"service {service} {proto} ipv{family}")
        for f in by_service.get(key, []):
            out.append("  " + _frontend(f))
        for pool in pools:
            out += _pool(pool)
    return "\n".join(out) + "\n"


def _frontend(f: Frontend) -> str:
    words = [f"frontend {f.kind} {hostport(f.address, f.port)} -> {f.pool}"]
    words.append(f"masquerade {f.masquerade}")
    if f.internal_pool:
        words.append(f"internal -> {f.internal_pool}")
    if f.source_ranges:
        words.append("from " + ",".join(f.source_ranges))
    return ", ".join(words)


def _pool(pool: Pool) -> list[str]:
    affinity = "none" if pool.affinity_timeout is None else f"client-ip {pool.affinity_timeout}s"
    hints = f" (hints for {pool.hints})" if pool.hints else ""
    head = (
        f"  pool {pool.id} {'local' if pool.local_only else 'cluster'}{hints}: scheduler "
        f"{pool.scheduler}, affinity {affinity}, when-empty {pool.when_empty}"
    )
    lines = [head]
    for b in pool.backends:
        # Where it runs: this node, another named node, or no node given.
        flags = ["local" if b.local else "remote" if b.remote else "unplaced"]
        if b.terminating:
            flags.append("terminating")
        lines.append(
            f"    backend {hostport(b.address, b.port)} weight {b.weight} {' '.join(flags)}"
            f" id {b.id}"
        )
    if not pool.backends:
        lines.append("    (no backends)")
    return lines
