"""A third-party lbc backend: one line per frontend, `address:port/proto -> backends`.

It exists to prove that a package outside lbc can add a backend through the `lbc`
entry point group, using only lbc's public names.
"""

from __future__ import annotations

from collections.abc import Callable

from lbc.backends import Artifact, Backend, Feature
from lbc.hookspecs import hookimpl
from lbc.ir import Program


class ExampleBackend(Backend):
    """Lists where each frontend sends traffic; cannot express session affinity."""

    name = "example"
    description = "a flat listing of frontends and their backends (test plugin)"
    extension = "txt"
    features = frozenset(Feature) - {Feature.AFFINITY}

    def render(self, program: Program) -> Artifact:
        """One line per frontend."""
        pools = program.pool_index()
        lines = []
        for f in program.frontends:
            targets = " ".join(f"{b.address}:{b.port}" for b in pools[f.pool].active)
            lines.append(f"{f.address}:{f.port}/{f.proto} -> {targets or pools[f.pool].when_empty}")
        return Artifact(self.name, {"text": "\n".join(lines) + "\n"})


@hookimpl
def lbc_register_backends(register: Callable[[Backend], None]) -> None:
    """Register the example backend."""
    register(ExampleBackend())
