"""Apply benchmark: lbc's engine against the kernel tools alone, and the cost of a change.

    python bench/apply.py --services 1000 10000 --endpoints 10 --backend nftables iptables

For each size and backend, in throwaway network namespaces (root):
- `tool alone`: `nft -f` (or `iptables-restore` per family) of lbc's own rendered rules
  into an empty namespace — the floor for a full apply;
- `full apply`: the apply engine given the same compiled artifact, into an empty
  namespace (lock, snapshot, plan, commit, verify), and its ratio to the tool: the
  engine's overhead (compiling is `bench/compile.py`'s subject);
- `one-endpoint change`: one more endpoint on one service, end to end from the
  in-memory cluster model: lower + render + snapshot + plan + commit + verify, as a
  one-shot `lbc.apply` does it;
- `session change`: the same change through a `lbc.Session` that applied the cluster
  before (what a node agent runs): only the changed service is lowered and rendered,
  the kernel is not read while its ruleset generation is the one the session left;
- `after another writer`: the same, each change right after another tool committed a
  rule to a table of its own (`nft add rule ip another-tool ...`), which moves the
  generation: an nftables session that followed the commits knows lbc's table was
  left alone and still reads nothing; an iptables session reads the kernel again.
Figures are wall-clock medians of `--repeat` runs; the machine is shared, so compare
the ratios.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import lbc
from bench.gen import generate
from lbc.apply import Engine
from lbc.compiler.model import Cluster, Endpoint

RESTORE = {4: "iptables-restore", 6: "ip6tables-restore"}


@contextmanager
def namespace() -> Iterator[str]:
    """A fresh, empty network namespace, deleted afterwards."""
    name = f"lbc-bench-{uuid.uuid4().hex[:8]}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def tool_alone(backend: str, artifact: lbc.Artifact, ns: str) -> None:
    """Load the rendered rules with the kernel tool only."""
    if backend == "nftables":
        with tempfile.NamedTemporaryFile("w", suffix=".nft") as f:
            f.write(artifact.text())
            f.flush()
            subprocess.run(["ip", "netns", "exec", ns, "nft", "-f", f.name], check=True)
        return
    for family, doc in artifact.data.items():
        subprocess.run(
            ["ip", "netns", "exec", ns, RESTORE[family]], input=doc, text=True, check=True
        )


def engine(backend: str, ns: str, lock: Path) -> Engine:
    """The apply engine of `backend` for namespace `ns`."""
    chosen = lbc.backends()[backend]
    return Engine(chosen, chosen.kernel(ns), lock)


def with_one_more_endpoint(cluster: Cluster) -> Cluster:
    """The cluster with one new ready endpoint on its first service."""
    first = cluster.services[0]
    extra = Endpoint(ip=first.endpoints[0].ip + 200, node="node-0001")  # type: ignore[operator]
    changed = first.model_copy(update={"endpoints": [*first.endpoints, extra]})
    return cluster.model_copy(update={"services": [changed, *cluster.services[1:]]})


def measure(
    backend: str, services: int, endpoints: int, repeat: int, one_shot: bool = True
) -> dict[str, float]:
    text, _ = generate(services, endpoints, seed=1)
    cluster = lbc.loads(text)
    program = lbc.lower(cluster)
    artifact = lbc.compile(program, backend)
    artifact.text()  # print once, outside the timings
    with tempfile.TemporaryDirectory(prefix="lbc-bench-") as scratch:
        return _measure(backend, cluster, artifact, Path(scratch) / "lock", repeat, one_shot)


def _measure(
    backend: str,
    cluster: Cluster,
    artifact: lbc.Artifact,
    lock: Path,
    repeat: int,
    one_shot: bool,
) -> dict[str, float]:
    """The figures of `measure`; the lock file (and apply's records) live beside `lock`."""
    tool, full, change, session_change, foreign = [], [], [], [], []
    bigger = with_one_more_endpoint(cluster)
    for _ in range(repeat):
        with namespace() as ns:
            tool.append(timed(lambda: tool_alone(backend, artifact, ns)))
        with namespace() as ns:
            full.append(timed(lambda: engine(backend, ns, lock).apply(artifact)))
            if one_shot:
                change.append(timed(lambda: lbc.apply(bigger, backend, netns=ns, lock_path=lock)))
        with namespace() as ns:
            session = lbc.Session(backend, netns=ns, lock_path=lock)
            session.apply(cluster)
            session.apply(bigger)  # warm: the first change pays for imports
            for version in (cluster, bigger) * 2:
                session_change.append(timed(lambda: session.apply(version)))  # noqa: B023
            another_tool(ns, "add table ip another-tool; add chain ip another-tool c")
            for version in (cluster, bigger):
                another_tool(ns, "add rule ip another-tool c counter")
                foreign.append(timed(lambda: session.apply(version)))  # noqa: B023
    return {
        "tool": statistics.median(tool),
        "full": statistics.median(full),
        "change": statistics.median(change) if change else float("nan"),
        "session": statistics.median(session_change),
        "foreign": statistics.median(foreign),
    }


def another_tool(ns: str, script: str) -> None:
    """Another writer's nft transaction in the namespace."""
    subprocess.run(["ip", "netns", "exec", ns, "nft", script], check=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--services", type=int, nargs="+", default=[100, 1000, 10000])
    parser.add_argument("--endpoints", type=int, default=10)
    parser.add_argument("--backend", nargs="+", default=["nftables", "iptables"])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument(
        "--no-one-shot",
        action="store_true",
        help="skip the one-shot lbc.apply change (seconds at 10k services)",
    )
    args = parser.parse_args(argv)
    print(
        f"{'backend':<9} {'services':>8} {'tool alone':>11} {'full apply':>11} "
        f"{'ratio':>6} {'1-endpoint change':>18} {'session change':>15} "
        f"{'after another writer':>21}"
    )
    for backend in args.backend:
        for n in args.services:
            m = measure(backend, n, args.endpoints, args.repeat, not args.no_one_shot)
            print(
                f"{backend:<9} {n:>8} {m['tool']:>10.3f}s {m['full']:>10.3f}s "
                f"{m['full'] / m['tool']:>6.2f} {m['change'] * 1000:>16.1f}ms "
                f"{m['session'] * 1000:>13.1f}ms {m['foreign'] * 1000:>19.1f}ms",
                flush=True,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
