"""The apply engine and the kernel-adapter interface backends implement."""

from lbc.apply.adapter import FakeKernel, KernelAdapter
from lbc.apply.engine import ApplyResult, Engine
from lbc.apply.lock import DEFAULT_LOCK, host_lock
from lbc.apply.state import Action, Change, Plan, State, plan_between

__all__ = [
    "DEFAULT_LOCK",
    "Action",
    "ApplyResult",
    "Change",
    "Engine",
    "FakeKernel",
    "KernelAdapter",
    "Plan",
    "State",
    "host_lock",
    "plan_between",
]
