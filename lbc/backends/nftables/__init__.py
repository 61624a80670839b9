"""The nftables backend: one `inet lbc` table in kube-proxy's nftables shape.

`render` is pure: it builds the ruleset once (`render.build`) and prints it twice,
as an `nft -f` file (format "text", the golden file) and as the libnftables JSON
document a kernel adapter hands to `Nftables().json_cmd` (format "json").
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from lbc.backends.base import Artifact, Backend, Feature, LazyFormats
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
        return Artifact(
            self.name,
            LazyFormats(
                {
                    "text": lambda: to_text(ruleset, program.node.name),
                    "json": lambda: dumps(to_json(ruleset)),
                }
            ),
            data=ruleset,
        )

    def kernel(self, netns: str | None = None) -> NftablesKernel:
        """The libnftables adapter (imported only when applying)."""
        from lbc.backends.nftables.kernel import NftablesKernel

        return NftablesKernel(netns)


@hookimpl
def lbc_register_backends(register: Callable[[Backend], None]) -> None:
    """Register the nftables backend."""
    register(NftablesBackend())
