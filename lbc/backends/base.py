"""What a backend is: capability flags, a pure `render`, and the artifact it returns."""

from __future__ import annotations

import ipaddress
import json
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import TYPE_CHECKING, Any, ClassVar

from lbc.collector import paused
from lbc.errors import Unsupported, UnsupportedError, UsageError
from lbc.ir.nodes import Kind, Masquerade, Program, Proto, Scheduler

if TYPE_CHECKING:
    from lbc.apply.adapter import KernelAdapter


class Feature(StrEnum):
    """Something a program may need that a backend may or may not express."""

    IPV6 = "ipv6"
    SCTP = "sctp"
    WEIGHTS = "weights"
    AFFINITY = "affinity"
    EXTERNAL_IP = "external-ip"
    LOAD_BALANCER = "load-balancer"
    NODE_PORT = "node-port"
    SOURCE_RANGES = "source-ranges"
    LOCAL_POLICY = "local-traffic-policy"  # a pool of this node's endpoints only
    # externalTrafficPolicy Local: outside traffic to this node's endpoints, while pod
    # and node traffic to the same address and port reaches every endpoint
    EXTERNAL_LOCAL_POLICY = "external-traffic-policy-local"
    LOCALHOST_NODE_PORT = "localhost-node-port"


_KIND_FEATURE = {
    Kind.EXTERNAL_IP: Feature.EXTERNAL_IP,
    Kind.LOAD_BALANCER: Feature.LOAD_BALANCER,
    Kind.NODE_PORT: Feature.NODE_PORT,
}


class LazyFormats(Mapping[str, str]):
    """An artifact's formats, each printed on first use (a large ruleset's JSON takes
    seconds to print, and most callers only ask for the text)."""

    def __init__(self, printers: dict[str, Callable[[], str]]) -> None:
        self._printers = printers
        self._done: dict[str, str] = {}

    @paused
    def __getitem__(self, key: str) -> str:
        if key not in self._done:
            self._done[key] = self._printers[key]()
        return self._done[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._printers)

    def __len__(self) -> int:
        return len(self._printers)


@dataclass(frozen=True)
class Artifact:
    """A backend's output: canonical text (the golden file) and other formats."""

    backend: str
    formats: Mapping[str, str]
    data: Any = field(default=None, compare=False)

    def text(self, fmt: str = "text") -> str:
        """The artifact in format `fmt` ("text" is the canonical, reviewable form); a
        format this backend does not offer is a `UsageError`."""
        try:
            if not isinstance(fmt, str):  # (an unhashable one fails the lookup itself)
                raise KeyError(fmt)
            return self.formats[fmt]
        except KeyError:
            known = ", ".join(sorted(self.formats))
            raise UsageError(
                f"format {fmt!r} is not one of {known} (the formats of backend {self.backend!r})"
            ) from None


class Backend:
    """Base class of backends: a table of capability flags plus a pure renderer."""

    name: ClassVar[str]
    description: ClassVar[str]
    extension: ClassVar[str] = "txt"  # golden file: golden/<case>/<name>.<extension>
    features: ClassVar[frozenset[Feature]] = frozenset()
    schedulers: ClassVar[frozenset[Scheduler]] = frozenset({Scheduler.DEFAULT})

    def render(self, program: Program) -> Artifact:
        """Turn `program` into this backend's artifact (pure, deterministic)."""
        raise NotImplementedError

    def check(self, program: Program) -> None:
        """Raise `UnsupportedError` listing everything in `program` this backend lacks."""
        missing = [
            Unsupported(self.name, subject, str(feature), reason)
            for feature, subject, reason in requirements(program)
            if (isinstance(feature, Feature) and feature not in self.features)
            or (isinstance(feature, Scheduler) and feature not in self.schedulers)
        ]
        if missing:
            unique = list(dict.fromkeys(missing))
            raise UnsupportedError(self.name, unique)

    @paused
    def compile(self, program: Program) -> Artifact:
        """`check` then `render`."""
        self.check(program)
        return self.render(program)

    def kernel(self, netns: str | None = None) -> KernelAdapter:
        """The adapter that reads and writes this backend's objects in the kernel."""
        raise UnsupportedError(
            self.name,
            [Unsupported(self.name, "kernel", "apply", "this backend only compiles")],
        )


def requirements(program: Program) -> Iterator[tuple[Feature | Scheduler, str, str]]:
    """Every (feature, subject, reason) the program needs, in canonical order."""
    for pool in program.pools:
        who = f"{pool.service}/{pool.proto} ipv{pool.family}"
        if pool.family == 6:
            yield Feature.IPV6, who, "IPv6 service"
        if pool.proto is Proto.SCTP:
            yield Feature.SCTP, who, "SCTP port"
        if len({b.weight for b in pool.active}) > 1:
            yield Feature.WEIGHTS, who, "endpoints with different weights"
        if pool.affinity_timeout is not None:
            yield Feature.AFFINITY, who, "session affinity ClientIP"
        if pool.local_only:
            yield Feature.LOCAL_POLICY, who, "traffic policy Local"
        yield pool.scheduler, who, f"scheduler {pool.scheduler!s}"
    for f in program.frontends:
        who = f"{f.service}/{f.proto} ipv{f.family}"
        if f.kind in _KIND_FEATURE:
            yield _KIND_FEATURE[f.kind], who, f"{f.kind} frontend {f.address}:{f.port}"
        if f.kind is Kind.NODE_PORT and ipaddress.ip_address(f.address).is_loopback:
            yield Feature.LOCALHOST_NODE_PORT, who, f"node port on {f.address}:{f.port}"
        if f.source_ranges:
            yield Feature.SOURCE_RANGES, who, "load_balancer_source_ranges"
        if f.internal_pool or f.masquerade is Masquerade.NEVER:
            yield Feature.EXTERNAL_LOCAL_POLICY, who, "external traffic policy Local"


def dumps_json(value: Any) -> str:
    """Canonical JSON: sorted keys, two-space indent, trailing newline."""
    return json.dumps(value, indent=2, sort_keys=True) + "\n"
