"""lbc: a declarative load-balancer compiler.

    >>> import lbc
    >>> cluster = lbc.load("examples/hostnames.toml")          # doctest: +SKIP
    >>> print(lbc.compile(cluster, backend="iptables").text())  # doctest: +SKIP

`load` validates cluster.toml (raising `ConfigError` with every problem), `lower`
turns it into the backend-neutral IR, and `compile` renders the IR with a backend
plugin. Nothing here prints or exits; errors are `lbc.errors.LbcError` subclasses.
"""

from lbc.api import apply, backend_names, backends, compile, delete, diff, plan, verify
from lbc.apply import ApplyResult, FakeKernel, KernelAdapter, Plan
from lbc.backends.base import Artifact, Backend, Feature
from lbc.compiler.load import load, loads, validate
from lbc.compiler.lower import lower
from lbc.compiler.model import Cluster
from lbc.compiler.notes import as_problems as notes
from lbc.errors import (
    ApplyError,
    ConfigError,
    LbcError,
    PluginError,
    Problem,
    Unsupported,
    UnsupportedError,
    UsageError,
)
from lbc.ir.nodes import Program
from lbc.ir.trace import Origin, Trace, Verdict, trace
from lbc.session import Session

__version__ = "0.1.0"

__all__ = [
    "ApplyError",
    "ApplyResult",
    "Artifact",
    "Backend",
    "Cluster",
    "ConfigError",
    "FakeKernel",
    "Feature",
    "KernelAdapter",
    "LbcError",
    "Origin",
    "Plan",
    "PluginError",
    "Problem",
    "Program",
    "Session",
    "Trace",
    "Unsupported",
    "UnsupportedError",
    "UsageError",
    "Verdict",
    "__version__",
    "apply",
    "backend_names",
    "backends",
    "compile",
    "delete",
    "diff",
    "load",
    "loads",
    "lower",
    "notes",
    "plan",
    "trace",
    "validate",
    "verify",
]
