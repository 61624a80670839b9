"""lbc builds with the cyclic garbage collector paused, and leaves it as it found it."""

from __future__ import annotations

import gc
import importlib
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import lbc
from lbc.apply import FakeKernel, State
from lbc.backends.base import Artifact, Backend, LazyFormats
from lbc.collector import paused
from lbc.ir.nodes import Program

# The modules, not the functions of the same names the package exports.
loading = importlib.import_module("lbc.compiler.load")
lowering = importlib.import_module("lbc.compiler.lower")
ROOT = Path(__file__).resolve().parent.parent
HOSTNAMES = ROOT / "golden" / "hostnames" / "cluster.toml"


@pytest.fixture(autouse=True)
def collector_enabled() -> Iterator[None]:
    """Every test starts with the collector on and leaves it on, whatever it asserts."""
    was = gc.isenabled()
    gc.enable()
    yield
    if was:
        gc.enable()
    else:
        gc.disable()


class Probe(Backend):
    """A backend that notes whether the collector ran while it rendered and printed."""

    name = "gc-probe"
    description = "records gc.isenabled()"

    def __init__(self, fail: bool = False) -> None:
        self.seen: list[tuple[str, bool]] = []
        self.fail = fail

    def render(self, program: Program) -> Artifact:
        self.seen.append(("render", gc.isenabled()))
        if self.fail:
            raise RuntimeError("render failed")

        def text() -> str:
            self.seen.append(("text", gc.isenabled()))
            return "probe\n"

        return Artifact(self.name, LazyFormats({"text": text}))


def recording(seen: list[bool], fn: Callable[..., Any]) -> Callable[..., Any]:
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        seen.append(gc.isenabled())
        return fn(*args, **kwargs)

    return wrapper


def test_loading_and_lowering_run_with_the_collector_paused(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    seen: list[bool] = []
    monkeypatch.setattr(loading, "prevalidate", recording(seen, loading.prevalidate))
    monkeypatch.setattr(lowering, "_lower_service", recording(seen, lowering._lower_service))
    program = lbc.lower(lbc.load(HOSTNAMES))
    assert seen == [False, False], "prevalidate, then the one service's lowering"
    assert program.pools and gc.isenabled()


def test_rendering_and_printing_run_with_the_collector_paused() -> None:
    probe = Probe()
    artifact = lbc.compile(lbc.load(HOSTNAMES), probe)
    assert gc.isenabled()
    assert artifact.text() == "probe\n"
    assert probe.seen == [("render", False), ("text", False)]
    assert gc.isenabled()


def test_the_collector_is_enabled_again_when_the_work_raises() -> None:
    with pytest.raises(RuntimeError, match="render failed"):
        lbc.compile(lbc.load(HOSTNAMES), Probe(fail=True))
    assert gc.isenabled()


def test_a_caller_that_disabled_the_collector_keeps_it_disabled() -> None:
    gc.disable()
    probe = Probe()
    lbc.compile(lbc.load(HOSTNAMES), probe).text()
    assert not gc.isenabled()
    assert probe.seen == [("render", False), ("text", False)]


def test_an_apply_plans_and_commits_with_the_collector_paused(tmp_path: Path) -> None:
    seen: list[tuple[str, bool]] = []

    class Recording(FakeKernel):
        def snapshot(self) -> State:
            seen.append(("snapshot", gc.isenabled()))
            return super().snapshot()

    kernel = Recording()
    lbc.apply(lbc.load(HOSTNAMES), "ir", kernel=kernel, lock_path=tmp_path / "lock")
    session = lbc.Session("ir", kernel=Recording(), lock_path=tmp_path / "lock")
    session.apply(lbc.load(HOSTNAMES))
    # Each apply reads the kernel before and (no generations to trust) after its commit.
    assert seen == [("snapshot", False)] * 4
    assert gc.isenabled()


def test_nested_pauses_resume_only_when_the_outermost_returns() -> None:
    states: list[bool] = []

    @paused
    def inner() -> None:
        states.append(gc.isenabled())

    @paused
    def outer() -> None:
        inner()
        states.append(gc.isenabled())

    outer()
    assert states == [False, False]
    assert gc.isenabled()


def test_calls_in_two_threads_resume_the_collector_when_the_last_returns() -> None:
    second_in = threading.Event()
    first_returned = threading.Event()
    seen: dict[str, bool] = {}

    @paused
    def first() -> None:
        thread.start()
        assert second_in.wait(10)
        seen["first"] = gc.isenabled()

    @paused
    def second() -> None:
        second_in.set()
        assert first_returned.wait(10)
        seen["second, after the first returned"] = gc.isenabled()

    thread = threading.Thread(target=second)
    first()  # returns while `second` runs in its thread
    seen["between"] = gc.isenabled()
    first_returned.set()
    thread.join(10)
    assert seen == {"first": False, "between": False, "second, after the first returned": False}
    assert gc.isenabled()
