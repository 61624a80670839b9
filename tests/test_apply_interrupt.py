"""SIGINT and SIGTERM during an apply: held back while a commit writes (`lbc.apply.shield`).

The fake kernels here write a commit in two halves and raise the signal between them,
as a Ctrl-C or a `kill` lands between two of IPVS's netlink calls or iptables'
restores. The same on the kernel, with `lbc apply` as its own process, is in
tests/test_apply_interrupt_kernel.py.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
import threading
from pathlib import Path
from types import FrameType

import pytest
from click.testing import CliRunner

import lbc
from lbc.apply import FakeKernel, Plan, State
from lbc.apply.shield import shielded
from lbc.cli import EXIT_INTERRUPTED, main

ROOT = Path(__file__).resolve().parent.parent
HOSTNAMES = ROOT / "examples" / "hostnames.toml"


class HalfwaySignal(FakeKernel):
    """Commits half of a plan's changes, raises `signum` in this process, then the rest."""

    def __init__(
        self,
        signum: int,
        objects: dict[str, tuple[str, ...]] | None = None,
        log: Path | None = None,
    ) -> None:
        super().__init__(objects)
        self.signum = signum
        self.halves: list[int] = []  # how many objects the kernel held after each half
        self.log = log  # a file that gets a line per half written, as it is written

    def commit(self, live: State, desired: State, plan: Plan) -> None:
        changes = plan.changes
        middle = len(changes) // 2
        for half in (changes[:middle], changes[middle:]):
            super().commit(live, desired, Plan(plan.backend, half, plan.full))
            self.halves.append(len(self.objects))
            if self.log is not None:
                with self.log.open("a") as f:
                    f.write(f"{len(self.objects)}\n")
            if len(self.halves) == 1:
                signal.raise_signal(self.signum)


def test_sigint_during_a_commit_is_raised_once_the_commit_is_whole(tmp_path: Path) -> None:
    cluster = lbc.load(HOSTNAMES)
    wanted = FakeKernel()
    lbc.apply(cluster, "nftables", kernel=wanted, lock_path=tmp_path / "other")
    kernel = HalfwaySignal(signal.SIGINT)
    with pytest.raises(KeyboardInterrupt):
        lbc.apply(cluster, "nftables", kernel=kernel, lock_path=tmp_path / "lock")
    assert len(kernel.halves) == 2  # the second half was written after the signal
    assert kernel.objects == wanted.objects
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_sigint_during_a_rollback_waits_for_the_rollback(tmp_path: Path) -> None:
    """The read-back differs, the engine writes the old state back, and the signal
    that arrives meanwhile is raised only when the old state is whole again."""
    before = {"LBC-OTHER": ("-A x",), "LBC-GONE": ("-A y",)}

    class Misreading(HalfwaySignal):
        def __init__(self) -> None:
            super().__init__(signal.SIGINT, before)
            self.reads = 0

        def snapshot(self) -> State:
            self.reads += 1
            state = super().snapshot()
            if self.reads == 2:  # the read-back after the commit
                return State({**state.objects, "LBC-STRAY": ("-A z",)})
            return state

        def commit(self, live: State, desired: State, plan: Plan) -> None:
            if self.reads < 2:  # the apply itself: written whole, no signal
                FakeKernel.commit(self, live, desired, plan)
            else:  # the rollback: interrupted half way
                super().commit(live, desired, plan)

    kernel = Misreading()
    with pytest.raises(KeyboardInterrupt) as caught:
        lbc.apply(lbc.load(HOSTNAMES), "nftables", kernel=kernel, lock_path=tmp_path / "lock")
    assert kernel.objects == before
    assert len(kernel.halves) == 2
    # The rollback's own report is not lost: it is the interruption's context.
    assert isinstance(caught.value.__context__, lbc.ApplyError)
    assert "rolled back" in str(caught.value.__context__)


def test_sigint_before_the_commit_stops_the_apply_with_nothing_written(tmp_path: Path) -> None:
    class InterruptedRead(FakeKernel):
        def snapshot(self) -> State:
            signal.raise_signal(signal.SIGINT)
            return super().snapshot()

    kernel = InterruptedRead()
    with pytest.raises(KeyboardInterrupt):
        lbc.apply(lbc.load(HOSTNAMES), "nftables", kernel=kernel, lock_path=tmp_path / "lock")
    assert kernel.commits == 0
    assert kernel.objects == {}


def test_a_handler_of_the_programs_own_is_left_alone(tmp_path: Path) -> None:
    kernel = HalfwaySignal(signal.SIGINT)
    seen: list[int] = []

    def handler(signum: int, frame: FrameType | None) -> None:
        seen.append(len(kernel.objects))

    previous = signal.signal(signal.SIGINT, handler)
    try:
        lbc.apply(lbc.load(HOSTNAMES), "nftables", kernel=kernel, lock_path=tmp_path / "lock")
        assert signal.getsignal(signal.SIGINT) is handler
    finally:
        signal.signal(signal.SIGINT, previous)
    # Called at once, half way through the commit, not held back to its end.
    assert seen == kernel.halves[:1]
    assert kernel.halves[0] < kernel.halves[1]


def test_an_apply_in_another_thread_runs_without_touching_signals(tmp_path: Path) -> None:
    kernel = FakeKernel()
    errors: list[BaseException] = []

    def run() -> None:
        try:
            lbc.apply(lbc.load(HOSTNAMES), "nftables", kernel=kernel, lock_path=tmp_path / "l")
        except BaseException as exc:  # reported below, in the test's thread
            errors.append(exc)

    worker = threading.Thread(target=run)
    worker.start()
    worker.join()
    assert errors == []
    assert kernel.commits == 1
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


def test_sigterm_during_a_commit_ends_the_process_once_the_commit_is_whole(
    tmp_path: Path,
) -> None:
    """SIG_DFL ends the process: after the commit, not during it, and nothing of the
    program after the apply runs."""
    log = tmp_path / "halves"
    script = textwrap.dedent(
        f"""
        import signal, sys
        from pathlib import Path
        sys.path.insert(0, {str(ROOT)!r})
        import lbc
        from tests.test_apply_interrupt import HalfwaySignal

        kernel = HalfwaySignal(signal.SIGTERM, log=Path({str(log)!r}))
        try:
            lbc.apply(lbc.load({str(HOSTNAMES)!r}), "nftables", kernel=kernel,
                      lock_path={str(tmp_path / "lock")!r})
        finally:
            print("a finally block ran")
        print("the program went on after the apply")
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == -signal.SIGTERM, done.stderr
    # Both halves were written before the shield lifted; then SIG_DFL ended the process
    # where it stood, so nothing after it ran, not even a `finally`.
    halves = [int(line) for line in log.read_text().split()]
    assert len(halves) == 2 and halves[0] < halves[1]
    assert done.stdout == ""


def test_shield_delivers_a_signal_held_back_after_the_block() -> None:
    order: list[str] = []
    with pytest.raises(KeyboardInterrupt), shielded():
        signal.raise_signal(signal.SIGINT)
        signal.raise_signal(signal.SIGINT)
        order.append("block finished")
    assert order == ["block finished"]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_apply_command_says_it_was_interrupted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def interrupted(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(lbc.api, "apply", interrupted)
    monkeypatch.setattr(lbc.api, "delete", interrupted)
    runner = CliRunner()
    for args in (["apply", str(HOSTNAMES)], ["delete"]):
        result = runner.invoke(main, [*args, "--lock-file", str(tmp_path / "lock")])
        assert result.exit_code == EXIT_INTERRUPTED == 130
        assert "lbc: interrupted; a commit in progress was finished" in result.stderr
        assert "Traceback" not in result.output
