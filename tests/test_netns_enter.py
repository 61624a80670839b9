"""`lbc.apply.netns.inside`: entering a named network namespace and coming back."""

from __future__ import annotations

import os
import threading

import pytest

from lbc.apply.netns import NamespaceError, inside
from tests import netns

pytestmark = pytest.mark.netns


def _current() -> int:
    """The identity (inode) of the calling thread's network namespace."""
    return os.stat("/proc/thread-self/ns/net").st_ino


def _identity(ns: netns.Netns) -> int:
    return os.stat(f"/run/netns/{ns.name}").st_ino


def test_a_thread_comes_back_to_its_own_namespace_not_the_main_threads() -> None:
    """Nested entries from a worker thread unwind to where that thread was."""
    reason = netns.unavailable()
    if reason:
        pytest.skip(reason)
    seen: dict[str, int] = {}
    failures: list[BaseException] = []
    with netns.Lab() as lab:
        outer, inner = lab.namespace("outer"), lab.namespace("inner")

        def worker() -> None:
            try:
                with inside(outer.name):
                    seen["outer"] = _current()
                    with inside(inner.name):
                        seen["inner"] = _current()
                    seen["after inner"] = _current()
                seen["after outer"] = _current()
            except BaseException as exc:  # reported by the main thread
                failures.append(exc)

        home = _current()
        thread = threading.Thread(target=worker)
        thread.start()
        thread.join()
        assert not failures, failures
        assert seen == {
            "outer": _identity(outer),
            "inner": _identity(inner),
            "after inner": _identity(outer),
            "after outer": home,
        }
        assert _current() == home


def test_a_missing_namespace_is_a_namespace_error_and_leaves_the_thread_home() -> None:
    reason = netns.unavailable()
    if reason:
        pytest.skip(reason)
    home = _current()
    missing = netns.unique_name("absent")
    expected = f"cannot enter network namespace '{missing}'"
    with pytest.raises(NamespaceError, match=expected), inside(missing):
        pytest.fail("the block ran")
    assert _current() == home
    assert not os.path.exists(f"/run/netns/{missing}")


def test_no_namespace_runs_the_block_where_the_thread_is() -> None:
    home = _current()
    with inside(None):
        assert _current() == home


@pytest.mark.parametrize("name", ["", "a/b", ".."])
def test_a_name_that_is_no_namespace_name_is_refused(name: str) -> None:
    home = _current()
    with pytest.raises(NamespaceError, match="not a namespace name"), inside(name):
        pytest.fail("the block ran")
    assert _current() == home
