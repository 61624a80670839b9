"""The nftables backend: one `inet lbc` table in kube-proxy's nftables shape.

`render` is pure: it builds the ruleset once (`render.build`) and prints it twice,
as an `nft -f` file (format "text", the golden file) and as the libnftables JSON
document a kernel adapter hands to `Nftables().json_cmd` (format "json").
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import TYPE_CHECKING

from lbc.backends.base import Artifact, Backend, Feature
from lbc.backends.nftables.expr import Ruleset
from lbc.backends.nftables.jsonform import dumps, to_json
from lbc.backends.nftables.render import build
from lbc.backends.nftables.text import to_text
from lbc.hookspecs import hookimpl
from lbc.ir.nodes import Program, Scheduler

if TYPE_CHECKING:
    from lbc.backends.nftables.kernel import NftablesKernel


class NftablesBackend(Backend):
    """Verdict-map dispatch, chained `numgen` endpoint choice, masquerade by mark."""

    name = "nftables"
    extension = "nft"
    description = "kube-proxy-style nftables ruleset (table inet lbc; nft -f text or JSON)"
    features = frozenset(Feature) - {Feature.LOCALHOST_NODE_PORT}  # as kube-proxy's nftables
    schedulers = frozenset({Scheduler.DEFAULT, Scheduler.RANDOM})

    def render(self, program: Program) -> Artifact:
        """The `inet lbc` table as nft text and libnftables JSON; `data` is the ruleset."""
        ruleset = build(program)
        return Artifact(self.name, _Formats(ruleset, program.node.name), data=ruleset)

    def kernel(self, netns: str | None = None) -> NftablesKernel:
        """The libnftables adapter (imported only when applying)."""
        from lbc.backends.nftables.kernel import NftablesKernel

        return NftablesKernel(netns)


class _Formats(Mapping[str, str]):
    """The artifact's formats, each printed on first use (JSON for 30k services takes s)."""

    def __init__(self, ruleset: Ruleset, node: str) -> None:
        self._printers: dict[str, Callable[[], str]] = {
            "text": lambda: to_text(ruleset, node),
            "json": lambda: dumps(to_json(ruleset)),
        }
        self._done: dict[str, str] = {}

    def __getitem__(self, key: str) -> str:
        if key not in self._done:
            self._done[key] = self._printers[key]()
        return self._done[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._printers)

    def __len__(self) -> int:
        return len(self._printers)


@hookimpl
def lbc_register_backends(register: Callable[[Backend], None]) -> None:
    """Register the nftables backend."""
    register(NftablesBackend())
