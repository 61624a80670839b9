"""The nftables backend: one `inet lbc` table in kube-proxy's nftables shape.

`render` is pure: it builds the ruleset once (`render.build`) and prints it twice,
as an `nft -f` file (format "text", the golden file) and as the libnftables JSON
document a kernel adapter hands to `Nftables().json_cmd` (format "json").
"""

from __future__ import annotations

from collections.abc import Callable

from lbc.backends.base import Artifact, Backend, Feature, dumps_json
from lbc.backends.nftables.jsonform import to_json
from lbc.backends.nftables.render import build
from lbc.backends.nftables.text import to_text
from lbc.hookspecs import hookimpl
from lbc.ir.nodes import Program, Scheduler


class NftablesBackend(Backend):
    """Verdict-map dispatch, chained `numgen` endpoint choice, masquerade by mark."""

    name = "nftables"
    extension = "nft"
    description = "kube-proxy-style nftables ruleset (table inet lbc; nft -f text or JSON)"
    features = frozenset(Feature)
    schedulers = frozenset({Scheduler.DEFAULT, Scheduler.RANDOM})

    def render(self, program: Program) -> Artifact:
        """The `inet lbc` table as nft text and libnftables JSON; `data` is the ruleset."""
        ruleset = build(program)
        formats = {
            "text": to_text(ruleset, program.node.name),
            "json": dumps_json(to_json(ruleset)),
        }
        return Artifact(self.name, formats, data=ruleset)


@hookimpl
def lbc_register_backends(register: Callable[[Backend], None]) -> None:
    """Register the nftables backend."""
    register(NftablesBackend())
