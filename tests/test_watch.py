"""`lbc watch` (`lbc.watch.watch`): a file followed through a session, on an in-memory
kernel with generations (nftables' objects); `test_watch_kernel.py` runs the command
against the real kernel."""

from __future__ import annotations

import os
import shlex
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

import lbc
from lbc.apply import FakeKernel, host_lock
from lbc.backends.nftables.incremental import objects
from lbc.backends.nftables.render import build
from lbc.cli import main
from lbc.watch import Event, Outcome, watch

ROOT = Path(__file__).resolve().parent.parent
HOSTNAMES = (ROOT / "examples" / "hostnames.toml").read_text()
ADDED = HOSTNAMES + '\n[[services.endpoints]]\nip = "10.244.4.4"\nnode = "node-4"\n'
BROKEN = HOSTNAMES.replace("port = 80,", "port = 70000,")
WAIT = 10.0  # seconds: generous for a loaded machine; a passing run takes milliseconds


def whole(text: str) -> dict[str, tuple[str, ...]]:
    """The nftables objects of `text`'s cluster: what the kernel must hold."""
    return objects(build(lbc.lower(lbc.loads(text))))


def changed(kernel: FakeKernel) -> str:
    """An object that applying ADDED over HOSTNAMES writes."""
    return next(k for k, lines in whole(ADDED).items() if kernel.objects.get(k) != lines)


def replace(path: Path, text: str) -> None:
    """Write `path` as tools do: a new file renamed over the old one."""
    tmp = path.with_name(path.name + ".new")
    tmp.write_text(text)
    os.replace(tmp, path)


class Watching:
    """`watch` running in a thread on `path`, its events collected."""

    def __init__(
        self, path: Path, kernel: FakeKernel, lock: Path, resync: float, interval: float = 0.01
    ) -> None:
        self.events: list[Event] = []
        self.stop = threading.Event()
        session = lbc.Session("nftables", kernel=kernel, lock_path=lock)
        self.thread = threading.Thread(
            target=watch,
            args=(path, session, self.events.append),
            kwargs={"interval": interval, "resync": resync, "stop": self.stop},
        )
        self.thread.start()

    def until(self, outcome: Outcome, count: int = 1) -> Event:
        """The `count`-th event of `outcome`, waited for."""
        return until(lambda: [e for e in self.events if e.outcome is outcome][count - 1 :])[0]


def until(found: Callable[[], list[Event] | bool]) -> list[Event]:
    deadline = time.monotonic() + WAIT
    while time.monotonic() < deadline:
        result = found()
        if result:
            return result if isinstance(result, list) else []
        time.sleep(0.01)
    raise AssertionError("not within the wait")


# Starts `watch` on a file holding `text` (None: no file) with resyncs every `resync` s.
Start = Callable[..., tuple[Watching, FakeKernel, Path]]


@pytest.fixture
def watching(tmp_path: Path) -> Iterator[Start]:
    started: list[Watching] = []

    def start(
        text: str | None = HOSTNAMES, resync: float = 0.0, interval: float = 0.01
    ) -> tuple[Watching, FakeKernel, Path]:
        path = tmp_path / "cluster.toml"
        if text is not None:
            replace(path, text)
        kernel = FakeKernel(generations=True)
        started.append(Watching(path, kernel, tmp_path / "lock", resync, interval))
        return started[-1], kernel, path

    yield start
    for w in started:
        w.stop.set()
        w.thread.join(WAIT)
        assert not w.thread.is_alive(), "the loop did not stop when told"


def test_each_new_version_is_applied_and_only_the_change_is_written(watching: Start) -> None:
    w, kernel, path = watching()
    first = w.until(Outcome.APPLIED)
    assert kernel.objects == whole(HOSTNAMES)
    assert first.result is not None and first.result.applied
    replace(path, ADDED)
    second = w.until(Outcome.APPLIED, 2)
    assert kernel.objects == whole(ADDED)
    assert second.result is not None
    counts = second.result.plan.counts()
    assert counts["remove"] == 0 and 0 < counts["add"] + counts["change"] <= 4, counts
    assert second.message == second.result.summary()


def test_a_file_touched_but_unchanged_is_not_applied_again(watching: Start) -> None:
    w, kernel, path = watching()
    w.until(Outcome.APPLIED)
    commits = kernel.commits
    replace(path, HOSTNAMES)  # a new inode and time, the same text
    replace(path, ADDED)
    w.until(Outcome.APPLIED, 2)
    assert [e.outcome for e in w.events] == [Outcome.APPLIED, Outcome.APPLIED]
    assert kernel.commits == commits + 1


def test_an_invalid_version_is_reported_and_the_last_good_one_stays(watching: Start) -> None:
    w, kernel, path = watching()
    w.until(Outcome.APPLIED)
    replace(path, BROKEN)
    skipped = w.until(Outcome.SKIPPED)
    line = next(n for n, x in enumerate(BROKEN.splitlines(), 1) if "70000" in x)
    assert f"{path}:{line}: services[0].ports[0].port: port 70000 is out of range" in (
        skipped.message
    )
    assert "last version applied stay in force" in skipped.message
    assert kernel.objects == whole(HOSTNAMES)
    replace(path, ADDED)
    w.until(Outcome.APPLIED, 2)
    assert kernel.objects == whole(ADDED)


def test_a_missing_file_is_reported_once_then_applied_when_it_appears(watching: Start) -> None:
    w, kernel, path = watching(text=None)
    skipped = w.until(Outcome.SKIPPED)
    assert "cannot read file" in skipped.message
    time.sleep(0.1)  # ten more looks at the missing file
    assert len(w.events) == 1, w.events
    assert kernel.objects == {}
    replace(path, HOSTNAMES)
    w.until(Outcome.APPLIED)
    assert kernel.objects == whole(HOSTNAMES)


def test_a_version_the_backend_cannot_express_is_skipped(watching: Start) -> None:
    w, kernel, path = watching()
    w.until(Outcome.APPLIED)
    cluster = (ROOT / "golden" / "scheduler-rr" / "cluster.toml").read_text()
    replace(path, cluster)
    skipped = w.until(Outcome.SKIPPED)
    assert "cannot express" in skipped.message
    assert kernel.objects == whole(HOSTNAMES)


def test_a_resync_repairs_what_another_writer_changed(watching: Start) -> None:
    w, kernel, _ = watching(resync=0.05)
    w.until(Outcome.APPLIED)
    time.sleep(0.2)  # resyncs with nothing to repair say nothing and write nothing
    assert [e.outcome for e in w.events] == [Outcome.APPLIED]
    assert kernel.commits == 1
    victim = next(k for k in kernel.objects if k.startswith("chain "))
    kernel.write(victim, None)
    repaired = w.until(Outcome.REPAIRED)
    assert repaired.message.startswith("resync: nftables: applied: 1 added")
    assert kernel.objects == whole(HOSTNAMES)


def test_a_refused_version_is_tried_again_at_the_next_resync(watching: Start) -> None:
    w, kernel, path = watching(resync=0.1)
    w.until(Outcome.APPLIED)
    kernel.fail_on = changed(kernel)
    replace(path, ADDED)
    failed = w.until(Outcome.FAILED)
    assert "trying again at the next resync" in failed.message
    assert kernel.objects == whole(HOSTNAMES)
    kernel.fail_on = None
    w.until(Outcome.APPLIED, 2)
    assert kernel.objects == whole(ADDED)


def test_without_resyncs_a_refused_version_waits_for_the_next_change(watching: Start) -> None:
    w, kernel, path = watching(resync=0)
    w.until(Outcome.APPLIED)
    kernel.fail_on = changed(kernel)
    replace(path, ADDED)
    w.until(Outcome.FAILED)
    kernel.fail_on = None
    time.sleep(0.1)
    assert kernel.objects == whole(HOSTNAMES)
    replace(path, ADDED + "\n# again\n")
    w.until(Outcome.APPLIED, 2)
    assert kernel.objects == whole(ADDED)


def test_a_change_its_status_does_not_show_is_read_at_the_next_resync(
    watching: Start, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A rewrite in place of the same size within one timestamp tick leaves the file's
    status as it was: the resync reads the file anyway."""
    # (device, inode, size, mtime, ctime) that never change
    monkeypatch.setattr(lbc.watch, "_status", lambda path: (1, 1, 1, 0, 0))
    w, kernel, path = watching(resync=0.1)
    w.until(Outcome.APPLIED)
    path.write_text(ADDED)
    w.until(Outcome.APPLIED, 2)
    assert kernel.objects == whole(ADDED)


def test_a_file_written_in_place_is_read_only_once_its_writer_is_done(
    watching: Start,
) -> None:
    """A writer that rewrites the file line by line: its prefixes are often valid TOML
    and sometimes a valid cluster with services missing. None of them is read, let
    alone applied: the file is read once it has stopped changing for an interval."""
    extra = "".join(
        f'[[services]]\nname = "extra-{i}"\ncluster_ips = ["10.0.3.{i}"]\n'
        f'ports = [{{ name = "web", port = 80, target_port = 8080 }}]\n'
        f'endpoints = [{{ ip = "10.244.9.{i}" }}]\n'
        for i in range(1, 11)
    )
    final = ADDED + extra
    w, kernel, path = watching(interval=0.5)
    w.until(Outcome.APPLIED)
    with path.open("w") as f:  # truncated, then written a line every 20 ms (~1 s)
        for line in final.splitlines(keepends=True):
            f.write(line)
            f.flush()
            time.sleep(0.02)
    w.until(Outcome.APPLIED, 2)
    assert kernel.objects == whole(final)
    assert [e.outcome for e in w.events] == [Outcome.APPLIED, Outcome.APPLIED]


def test_a_file_dated_in_the_future_is_read_once_it_stops_changing(watching: Start) -> None:
    """A modification time ahead of this host's clock (a file server's clock) never
    looks quiet; the same status at two looks in a row is enough."""
    w, kernel, path = watching()
    w.until(Outcome.APPLIED)
    tmp = path.with_name("dated-ahead")
    tmp.write_text(ADDED)
    ahead = time.time() + 3600
    os.utime(tmp, (ahead, ahead))
    os.replace(tmp, path)
    w.until(Outcome.APPLIED, 2)
    assert kernel.objects == whole(ADDED)


def test_a_file_written_to_while_it_is_read_is_read_again(
    watching: Start, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What was read is dropped when the file's status changed during the read; the
    next version is read once it settles."""
    final = ADDED.replace('node = "node-4"', 'node = "node-4"\nweight = 3')

    def read_then_written(path: Path) -> str:
        text = path.read_text()
        if text == ADDED:  # the writer goes on as the read ends
            time.sleep(0.01)  # a later modification time, whatever the clock's tick
            path.write_text(final)
        return text

    monkeypatch.setattr(lbc.watch, "read", read_then_written)
    w, kernel, path = watching()
    w.until(Outcome.APPLIED)
    replace(path, ADDED)
    w.until(Outcome.APPLIED, 2)
    assert kernel.objects == whole(final)
    assert [e.outcome for e in w.events] == [Outcome.APPLIED, Outcome.APPLIED]


def test_a_stop_ends_a_wait_for_another_applys_lock(tmp_path: Path) -> None:
    """With the stop event as the session's `cancel` (as `lbc watch` makes it), a stop
    while another apply holds the lock ends the loop at once, not after the lock
    timeout, and the report does not promise another try."""
    path, lock = tmp_path / "cluster.toml", tmp_path / "lock"
    replace(path, HOSTNAMES)
    stop = threading.Event()
    events: list[Event] = []
    kernel = FakeKernel(generations=True)
    session = lbc.Session("nftables", kernel=kernel, lock_path=lock, lock_timeout=60, cancel=stop)
    loop = threading.Thread(
        target=watch, args=(path, session, events.append), kwargs={"stop": stop, "interval": 0.01}
    )
    with host_lock(lock):
        loop.start()
        try:
            time.sleep(0.3)  # the loop is waiting for the lock
        finally:
            stop.set()
            loop.join(10)
        assert not loop.is_alive()
    (event,) = events
    assert event.outcome is Outcome.FAILED
    assert "stopped while waiting for" in event.message
    assert "trying again" not in event.message
    assert kernel.commits == 0


def test_the_loop_listens_to_the_kernels_announcements_at_every_look(tmp_path: Path) -> None:
    """Between applies the loop reads the commit announcements of other writers
    (`Session.listen`) each time it looks at the file, applying or not."""

    class Listening(FakeKernel):
        def __init__(self) -> None:
            super().__init__(generations=True)
            self.listened = 0

        def listen(self) -> None:
            self.listened += 1

    path = tmp_path / "cluster.toml"
    replace(path, HOSTNAMES)
    kernel = Listening()
    session = lbc.Session("nftables", kernel=kernel, lock_path=tmp_path / "lock")
    stop = threading.Event()
    events: list[Event] = []
    loop = threading.Thread(
        target=watch, args=(path, session, events.append), kwargs={"stop": stop, "interval": 0.01}
    )
    loop.start()
    try:
        until(lambda: kernel.listened >= 5)
    finally:
        stop.set()
        loop.join(WAIT)
    assert [e.outcome for e in events] == [Outcome.APPLIED]
    assert kernel.commits == 1


def test_the_example_systemd_unit_runs_a_valid_watch_command() -> None:
    """examples/lbc-watch.service: its ExecStart is an `lbc watch` command line that
    parses, with the options it names."""
    unit = (ROOT / "examples" / "lbc-watch.service").read_text()
    (line,) = [x for x in unit.splitlines() if x.startswith("ExecStart=")]
    program, *args = shlex.split(line.removeprefix("ExecStart="))
    assert program.endswith("/lbc") and args[0] == "watch"
    context = main.make_context("lbc", args)
    with context:
        sub = main.get_command(context, args[0])
        assert sub is not None
        params = sub.make_context("watch", args[1:]).params
    assert params["file"] == Path("/etc/lbc/cluster.toml")
    assert params["backend"] in lbc.backend_names()
    assert params["resync"] == 30.0
