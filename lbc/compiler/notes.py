"""Notes on a valid cluster: settings that take effect differently than they may seem to.

`lbc check` prints them after "ok"; they never stop a compile. Today: topology hints
that lowering does not follow (kube-proxy logs the same cases and routes to every
ready endpoint), with the reason, so that a reviewer is not left guessing why the
rules ignore `for_zones` or `for_nodes`.
"""

from __future__ import annotations

from collections.abc import Iterator

from lbc.compiler.lower import lower_service, node_info
from lbc.compiler.model import Cluster, Endpoint, Service
from lbc.errors import Problem, UsageError
from lbc.ir.nodes import NodeInfo

Path = tuple[str | int, ...]


def notes(cluster: Cluster) -> list[tuple[Path, str]]:
    """Every note on `cluster` as `(key path, message)`, in file order."""
    out: list[tuple[Path, str]] = []
    info = node_info(cluster)
    for i, svc in enumerate(cluster.services):
        out += _hints(("services", i), svc, info)
    return out


def as_problems(cluster: Cluster, filename: str = "<cluster>", text: str = "") -> list[Problem]:
    """The notes as `Problem`s naming the file, the line (found in the file's `text`,
    when given) and the key path."""
    from lbc.compiler.locate import format_path, key_lines, line_of

    if not isinstance(cluster, Cluster):
        raise UsageError(f"notes() takes a Cluster, not {type(cluster).__name__}")
    found = notes(cluster)
    lines = key_lines(text) if text and found else {}
    return [Problem(filename, format_path(path), line_of(lines, path), m) for path, m in found]


def _hints(at: Path, svc: Service, info: NodeInfo) -> Iterator[tuple[Path, str]]:
    """Why the hints of each family's ready endpoints are not followed, where lowering
    makes a cluster-wide pool (the only one hints narrow: a service with internal
    traffic policy Local and no external frontend has none) that follows no hint."""
    if not any(e.for_nodes or e.for_zones for e in svc.endpoints):
        return
    followed = {p.family: p.hints for p in lower_service(info, svc).pools if not p.local_only}
    for family in sorted(followed):
        if followed[family]:
            continue
        ready = [(k, e) for k, e in enumerate(svc.endpoints) if e.ip.version == family and e.ready]
        reasons = [
            reason
            for reason in (
                _why_not(ready, "for_nodes", "node", info.name),
                _why_not(ready, "for_zones", "zone", info.zone),
            )
            if reason
        ]
        if reasons:
            yield (
                (*at, "endpoints"),
                f"topology hints not followed for IPv{family}: {'; '.join(reasons)}; every "
                "ready endpoint takes traffic",
            )


def _why_not(ready: list[tuple[int, Endpoint]], key: str, kind: str, name: str | None) -> str:
    """Why hints of one kind (`for_nodes` or `for_zones`) are not followed; "" when no
    ready endpoint has any."""
    if not any(getattr(e, key) for _, e in ready):
        return ""
    if name is None:
        return f"{key} hints need node.{kind}, which is not set"
    k, missing = next(((k, e) for k, e in ready if not getattr(e, key)), (None, None))
    if missing is not None:
        return f"endpoints[{k}] ({missing.ip}) is ready and has no {key} hint"
    hinted = [e for _, e in ready if name in getattr(e, key)]
    if not hinted:
        return f"no ready endpoint is hinted for this {kind}, {name}"
    return f"the ready endpoints hinted for {kind} {name} all have weight 0"
