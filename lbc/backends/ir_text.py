"""The `ir` backend: the canonical IR dump, so the IR is golden like any dataplane."""

from __future__ import annotations

from lbc.backends.base import Artifact, Backend, Feature
from lbc.hookspecs import hookimpl
from lbc.ir.dump import dump
from lbc.ir.nodes import Program, Scheduler


class IrBackend(Backend):
    """Prints the IR itself; supports everything the IR can say."""

    name = "ir"
    description = "the backend-neutral IR, as canonical text"
    features = frozenset(Feature)
    schedulers = frozenset(Scheduler)

    def render(self, program: Program) -> Artifact:
        """Dump `program` as text."""
        return Artifact(self.name, {"text": dump(program)})


@hookimpl
def lbc_register_backends(register):  # type: ignore[no-untyped-def]
    """Register the `ir` backend."""
    register(IrBackend())
