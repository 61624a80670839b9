"""The backend-neutral load-balancing IR: node types, canonical dump, stable names."""

from lbc.ir.dump import dump
from lbc.ir.nodes import (
    Backend,
    Empty,
    Frontend,
    Kind,
    Masquerade,
    NodeInfo,
    Pool,
    Program,
    Proto,
    Scheduler,
)

__all__ = [
    "Backend",
    "Empty",
    "Frontend",
    "Kind",
    "Masquerade",
    "NodeInfo",
    "Pool",
    "Program",
    "Proto",
    "Scheduler",
    "dump",
]
