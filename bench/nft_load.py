"""How long the kernel takes to load lbc's nftables ruleset, as the number of services grows.

    sudo python bench/nft_load.py                          # N = 1000, 10000, 30000
    sudo python bench/nft_load.py --sizes 1000 5000 10000 --endpoints 5
    sudo python bench/nft_load.py --form json              # libnftables JSON (`nft -j -f`)
    sudo python bench/nft_load.py --anonymous-vmap --sizes 1000 2000 4000

N cluster-IP services with E endpoints each are built directly as IR (no TOML
parsing), rendered by the nftables backend and loaded with `nft -f` into a throwaway
network namespace (`unshare --net`), which disappears with the process. The report
gives the wall time of the load, its user (nft) and system (kernel) CPU time, the
wall time per service and the ratio to linear growth, (t_N / t_first) / (N / N_first),
of the wall time and of the CPU time: near 1 when loading is linear, growing like
N / N_first when it is quadratic. On a shared machine the CPU ratio is the steadier.

`--anonymous-vmap` rewrites each service chain's endpoint choice into kube-proxy's
form, `numgen random mod E vmap { 0 : goto ..., 1 : goto ... }`, to show what
lbc's chained `numgen ... < k` rules avoid: every anonymous map of a transaction is
named by the kernel scanning all sets of the table, which makes the load quadratic.
(The chain and rule counts printed are those of lbc's own ruleset.)
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

from lbc.backends.nftables import NftablesBackend
from lbc.ir.names import digest
from lbc.ir.nodes import (
    Backend,
    Empty,
    Frontend,
    Kind,
    Masquerade,
    NodeInfo,
    Pool,
    Program,
    Proto,
    Scheduler,
)

SERVICE_CIDR = ipaddress.IPv4Network("10.96.0.0/12")
POD_CIDR = ipaddress.IPv4Network("10.128.0.0/9")
NODE = NodeInfo("node-0", ("192.168.0.10",), (str(POD_CIDR),), 0x4000, False)


def program(services: int, endpoints: int) -> Program:
    """`services` cluster-IP services (TCP 80 -> 8080) of `endpoints` backends each."""
    pools, frontends = [], []
    for i in range(services):
        name = f"bench/svc-{i:05d}:http"
        backends = tuple(
            Backend(
                key=f"{name}/tcp/{addr}:8080",
                address=str(addr),
                port=8080,
                weight=1,
                local=False,
                terminating=False,
            )
            for addr in (POD_CIDR[1 + i * endpoints + j] for j in range(endpoints))
        )
        pool = Pool(
            id=digest(f"{name}/tcp/ipv4/cluster"),
            service=name,
            family=4,
            proto=Proto.TCP,
            backends=backends,
            scheduler=Scheduler.DEFAULT,
            affinity_timeout=None,
            when_empty=Empty.REJECT,
            local_only=False,
        )
        pools.append(pool)
        frontends.append(
            Frontend(
                kind=Kind.CLUSTER_IP,
                family=4,
                address=str(SERVICE_CIDR[1 + i]),
                proto=Proto.TCP,
                port=80,
                service=name,
                pool=pool.id,
                masquerade=Masquerade.OFF_CLUSTER,
            )
        )
    return Program(node=NODE, pools=tuple(pools), frontends=tuple(frontends))


_CHOICE = re.compile(r"^\t\t(meta l4proto \S+) (?:numgen random mod \d+ < \d+ )?(dnat .*)$")


def anonymous_vmaps(text: str) -> str:
    """kube-proxy's form: every pool chain's chained numgen rules become one anonymous
    verdict map to a chain per endpoint (which does the DNAT)."""
    out: list[str] = []
    targets: list[tuple[str, str]] = []
    endpoints: list[str] = []
    chain = ""
    for line in text.splitlines():
        if line.startswith("\tchain "):
            chain = line.split()[1]
        m = _CHOICE.match(line)
        if m is not None:
            targets.append((m[1], m[2]))
            continue
        if targets:
            names = [f"endpoint-{k}-{chain}" for k in range(len(targets))]
            pairs = ", ".join(f"{k} : goto {name}" for k, name in enumerate(names))
            out.append(f"\t\tnumgen random mod {len(targets)} vmap {{ {pairs} }}")
            for name, (proto, dnat) in zip(names, targets, strict=True):
                endpoints.append(f"\tchain {name} {{\n\t\t{proto} {dnat}\n\t}}")
            targets = []
        if line == "}":  # the end of the table
            out += endpoints
        out.append(line)
    return "\n".join(out) + "\n"


@dataclass(frozen=True)
class Measurement:
    """One load: wall seconds and the CPU seconds `nft` (user) and the kernel (system) spent."""

    wall: float
    user: float
    system: float


def load(path: str, json_form: bool) -> Measurement:
    """Equivalent to `unshare --net nft [-j] -f PATH`, timed."""
    args = ["unshare", "--net", "--", "nft", *(["-j"] if json_form else []), "-f", path]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    done = subprocess.run(args, capture_output=True, text=True)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode != 0:
        sys.exit(f"{' '.join(args)} failed: {done.stderr.strip()[:2000]}")
    return Measurement(wall, after.ru_utime - before.ru_utime, after.ru_stime - before.ru_stime)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000, 30000])
    parser.add_argument("--endpoints", type=int, default=3)
    parser.add_argument("--form", choices=("text", "json"), default="text")
    parser.add_argument("--anonymous-vmap", action="store_true")
    parser.add_argument("--repeat", type=int, default=1, help="loads per size; the best counts")
    args = parser.parse_args(argv)
    if os.geteuid() != 0 or shutil.which("unshare") is None or shutil.which("nft") is None:
        sys.exit("needs root, unshare and nft")
    if args.anonymous_vmap and args.form != "text":
        sys.exit("--anonymous-vmap rewrites the text form only")
    backend = NftablesBackend()
    form = "text with anonymous vmaps" if args.anonymous_vmap else args.form
    print(f"nft -f, {args.endpoints} endpoints per service, {form} form")
    header = (
        "services  render_s  load_s   user_s   sys_s  us/service  vs_linear  cpu_vs_linear"
        "  chains   rules"
    )
    print(header)
    first: tuple[int, float, float] | None = None
    for size in args.sizes:
        start = time.perf_counter()
        artifact = backend.render(program(size, args.endpoints))
        doc = artifact.text(args.form)
        if args.anonymous_vmap:
            doc = anonymous_vmaps(doc)
        rendered = time.perf_counter() - start
        chains = len(artifact.data.chains)
        rules = sum(len(c.rules) for c in artifact.data.chains)
        with tempfile.NamedTemporaryFile("w", suffix=".nft", delete=False) as f:
            f.write(doc)
        try:
            best = min(
                (load(f.name, args.form == "json") for _ in range(args.repeat)),
                key=lambda m: m.wall,
            )
        finally:
            os.unlink(f.name)
        cpu = best.user + best.system
        first = first or (size, best.wall, cpu)
        ratio = (best.wall / first[1]) / (size / first[0])
        cpu_ratio = (cpu / first[2]) / (size / first[0])
        print(
            f"{size:8d}  {rendered:8.2f}  {best.wall:6.2f}  {best.user:7.2f}  {best.system:6.2f}"
            f"  {best.wall / size * 1e6:10.1f}  {ratio:9.2f}  {cpu_ratio:13.2f}"
            f"  {chains:6d}  {rules:6d}",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
