"""cluster.toml to IR: config model, validation and lowering."""

from lbc.compiler.load import load, loads
from lbc.compiler.lower import lower
from lbc.compiler.model import Cluster

__all__ = ["Cluster", "load", "loads", "lower"]
