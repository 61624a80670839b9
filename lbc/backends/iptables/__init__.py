"""The iptables backend: kube-proxy's nat-table layout under lbc's own chain names."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from lbc.backends.base import Artifact, Backend, Feature
from lbc.backends.iptables.render import render_documents
from lbc.hookspecs import hookimpl
from lbc.ir.nodes import Program, Scheduler

if TYPE_CHECKING:
    from lbc.backends.iptables.kernel import IptablesKernel

RESTORE_COMMAND = {4: "iptables-restore", 6: "ip6tables-restore"}


class IptablesBackend(Backend):
    """iptables-restore documents per family; endpoint choice by `statistic` probabilities."""

    name = "iptables"
    extension = "rules"
    description = "kube-proxy-style iptables rules (iptables-restore format, IPv4 and IPv6)"
    features = frozenset(Feature)
    schedulers = frozenset({Scheduler.DEFAULT, Scheduler.RANDOM})

    def render(self, program: Program) -> Artifact:
        """One restore document per family, joined under `# ipvN:` headers."""
        docs = render_documents(program)
        # One join of every line: the documents are printed on their own only if an
        # apply restores a whole family (tens of megabytes each for a large cluster).
        lines = [f"# lbc iptables rules for node {program.node.name}; generated, do not edit"]
        for family in docs:
            lines.append(f"# ipv{family}: {RESTORE_COMMAND[family]}")
            lines += docs.lines(family)
        lines.append("")
        return Artifact(self.name, {"text": "\n".join(lines)}, data=docs)

    def kernel(self, netns: str | None = None) -> IptablesKernel:
        """The iptables-save/iptables-restore adapter (imported only when applying)."""
        from lbc.backends.iptables.kernel import IptablesKernel

        return IptablesKernel(netns)


@hookimpl
def lbc_register_backends(register: Callable[[Backend], None]) -> None:
    """Register the iptables backend."""
    register(IptablesBackend())
