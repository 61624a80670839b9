"""The apply engine against the in-memory kernel: plans, no-ops, atomicity, rollback, lock."""

from __future__ import annotations

import dataclasses
import random
import threading
import time
from collections.abc import Iterable
from pathlib import Path

import pytest
from click.testing import CliRunner

import lbc
from lbc.apply import Action, Engine, FakeKernel, State, host_lock
from lbc.apply.conntrack import udp_frontends
from lbc.apply.state import changes, plan_between
from lbc.backends.ir_text import IrBackend
from lbc.cli import main

ROOT = Path(__file__).resolve().parent.parent
HOSTNAMES = ROOT / "golden" / "hostnames" / "cluster.toml"
WEIGHTED = ROOT / "golden" / "weighted" / "cluster.toml"
MANY = ROOT / "golden" / "many-services" / "cluster.toml"


@pytest.fixture
def lock(tmp_path: Path) -> Path:
    return tmp_path / "lbc.lock"


def apply(cluster: Path, kernel: FakeKernel, lock: Path, **kw: object) -> lbc.ApplyResult:
    return lbc.apply(lbc.load(cluster), "ir", kernel=kernel, lock_path=lock, **kw)  # type: ignore[arg-type]


def test_first_apply_adds_then_reapply_is_a_no_op(lock: Path) -> None:
    kernel = FakeKernel()
    first = apply(MANY, kernel, lock)
    assert first.applied and first.plan.counts()["add"] == len(kernel.objects) > 20
    assert kernel.commits == 1
    second = apply(MANY, kernel, lock)
    assert second.plan.in_sync and not second.applied
    assert kernel.commits == 1, "a re-apply of the same config must not write"
    assert lbc.plan(lbc.load(MANY), "ir", kernel=kernel).in_sync


def test_plan_reads_only_and_names_each_change(lock: Path) -> None:
    kernel = FakeKernel()
    apply(HOSTNAMES, kernel, lock)
    before = dict(kernel.objects)
    plan = lbc.plan(lbc.load(WEIGHTED), "ir", kernel=kernel)
    assert kernel.objects == before
    actions = {c.key.split()[1]: c.action for c in plan.changes if c.key.startswith("service")}
    assert actions == {
        "default/hostnames:default": Action.REMOVE,
        "default/weighted:http": Action.ADD,
    }
    # The node paragraph lists the cluster IPs whose unused ports are refused.
    (node,) = [c for c in plan.changes if c.action is Action.CHANGE]
    assert node.key.startswith("# lbc IR") and "  reject-unknown-ports 10.0.1.176" in node.after
    assert plan.summary() == "1 to add, 1 to change, 1 to remove"


def test_a_failed_transaction_leaves_the_kernel_byte_identical(lock: Path) -> None:
    kernel = FakeKernel()
    apply(HOSTNAMES, kernel, lock)
    before = dict(kernel.objects)
    target = next(iter(lbc.plan(lbc.load(WEIGHTED), "ir", kernel=kernel).changes)).key
    kernel.fail_on = target
    with pytest.raises(lbc.ApplyError, match="refused"):
        apply(WEIGHTED, kernel, lock)
    assert kernel.objects == before


def test_drift_is_detected_and_apply_repairs_it(lock: Path) -> None:
    kernel = FakeKernel()
    apply(HOSTNAMES, kernel, lock)
    key = next(k for k in kernel.objects if k.startswith("service"))
    kernel.objects[key] = kernel.objects[key][:-1]  # someone deleted a backend
    drift = lbc.verify(lbc.load(HOSTNAMES), "ir", kernel=kernel)
    assert [(c.key, c.action) for c in drift.changes] == [(key, Action.CHANGE)]
    assert any(line.startswith("+") and "backend" in line for line in drift.changes[0].diff())
    assert apply(HOSTNAMES, kernel, lock).plan.counts() == {"add": 0, "change": 1, "remove": 0}
    assert lbc.verify(lbc.load(HOSTNAMES), "ir", kernel=kernel).in_sync


def test_delete_removes_everything_it_planned(lock: Path) -> None:
    kernel = FakeKernel()
    apply(MANY, kernel, lock)
    result = lbc.delete("ir", kernel=kernel, lock_path=lock)
    assert result.plan.counts()["remove"] > 20 and kernel.objects == {}


def test_dry_run_writes_nothing(lock: Path) -> None:
    kernel = FakeKernel()
    result = apply(HOSTNAMES, kernel, lock, dry_run=True)
    assert not result.applied and result.plan.counts()["add"] > 0
    assert kernel.objects == {} and kernel.commits == 0


class _LyingKernel(FakeKernel):
    """Accepts a commit but reads back something else once: the engine must roll back."""

    def __init__(self) -> None:
        super().__init__()
        self.lie = False

    def snapshot(self) -> State:
        state = super().snapshot()
        if self.lie and self.commits == 2:
            objects = dict(state.objects)
            objects["phantom"] = ("left behind",)
            return State(objects)
        return state


def test_read_back_mismatch_rolls_back_to_the_previous_state(lock: Path) -> None:
    kernel = _LyingKernel()
    apply(HOSTNAMES, kernel, lock)
    before = dict(kernel.objects)
    kernel.lie = True
    with pytest.raises(lbc.ApplyError, match="rolled back"):
        apply(WEIGHTED, kernel, lock)
    assert kernel.objects == before


def test_a_second_apply_waits_for_the_lock_then_fails_clearly(lock: Path) -> None:
    kernel = FakeKernel()
    # flock: another open of the file conflicts, in this thread too.
    with host_lock(lock), pytest.raises(lbc.ApplyError, match="another lbc apply holds"):
        apply(HOSTNAMES, kernel, lock, lock_timeout=0.3)
    assert kernel.commits == 0
    assert apply(HOSTNAMES, FakeKernel(), lock, lock_timeout=0.3).applied


def test_a_wait_for_the_lock_ends_when_the_session_is_cancelled(lock: Path) -> None:
    """`lbc watch` stops at once on SIGTERM even while another apply holds the lock:
    the session's `cancel` event cuts the wait short, long before the timeout."""
    cancel = threading.Event()
    kernel = FakeKernel()
    session = lbc.Session("nftables", kernel=kernel, lock_path=lock, lock_timeout=60)
    session_cancelled = lbc.Session(
        "nftables", kernel=kernel, lock_path=lock, lock_timeout=60, cancel=cancel
    )
    with host_lock(lock):
        threading.Timer(0.2, cancel.set).start()
        started = time.monotonic()
        with pytest.raises(lbc.ApplyError, match=r"stopped while waiting for .*nothing was"):
            session_cancelled.apply(lbc.load(HOSTNAMES))
        assert time.monotonic() - started < 10
        assert kernel.commits == 0
    # Without a wait, a set `cancel` stops nothing; a session without one is unaffected.
    assert session_cancelled.apply(lbc.load(HOSTNAMES)).applied
    assert session.apply(lbc.load(HOSTNAMES)).plan.in_sync


def test_engine_is_usable_directly_with_a_backend_instance(lock: Path) -> None:
    kernel = FakeKernel()
    engine = Engine(lbc.backends()["ir"], kernel, lock)
    artifact = lbc.compile(lbc.load(HOSTNAMES), "ir")
    assert not engine.plan(artifact).in_sync
    engine.apply(artifact)
    assert engine.verify(artifact).in_sync


def test_compile_only_backends_refuse_to_apply() -> None:
    with pytest.raises(lbc.UnsupportedError, match="only compiles"):
        lbc.plan(lbc.load(HOSTNAMES), "ir")


def test_diff_command_shows_only_the_changed_rules(tmp_path: Path) -> None:
    new = tmp_path / "new.toml"
    new.write_text(
        HOSTNAMES.read_text().replace('ip = "10.244.2.3"', 'ip = "10.244.2.4"'), encoding="utf-8"
    )
    result = CliRunner().invoke(main, ["diff", str(HOSTNAMES), str(new), "-b", "iptables"])
    assert result.exit_code == 1, result.output
    changed = [
        line
        for line in result.output.splitlines()
        if line[:1] in "+-" and not line.startswith(("+++", "---"))
    ]
    assert changed and all("10.244.2." in line or "LBC-SEP-" in line for line in changed)
    same = CliRunner().invoke(main, ["diff", str(HOSTNAMES), str(HOSTNAMES)])
    assert same.exit_code == 0 and same.output == ""


def test_full_resync_rewrites_even_when_in_sync(lock: Path) -> None:
    kernel = FakeKernel()
    apply(HOSTNAMES, kernel, lock)
    result = apply(HOSTNAMES, kernel, lock, full=True)
    assert result.applied and result.plan.full and result.plan.in_sync
    assert kernel.commits == 2
    assert "full resync" in result.summary()


def test_progress_reports_each_phase_of_an_apply(lock: Path) -> None:
    phases: list[str] = []
    kernel = FakeKernel()
    lbc.apply(lbc.load(HOSTNAMES), "ir", kernel=kernel, lock_path=lock, progress=phases.append)
    assert [p.split()[0] for p in phases] == ["waiting", "reading", "committing:", "reading"]
    assert phases[2].startswith("committing: ") and "to add" in phases[2]
    phases.clear()
    lbc.apply(lbc.load(HOSTNAMES), "ir", kernel=kernel, lock_path=lock, progress=phases.append)
    assert [p.split()[0] for p in phases] == ["waiting", "reading"], "in sync: no commit"


class Remembering(FakeKernel):
    """A fake kernel with generations and an identity, as the nftables adapter has."""

    def __init__(self) -> None:
        super().__init__(generations=True)

    def identity(self) -> str:
        return "netns-1"


def test_an_apply_plans_from_the_record_of_the_last_one(lock: Path) -> None:
    kernel = Remembering()
    first = apply(HOSTNAMES, kernel, lock)
    assert first.read and (lock.parent / f"{lock.name}.ir.netns-1.json").exists()
    second = apply(WEIGHTED, kernel, lock)
    assert second.applied and not second.read and kernel.snapshots == 1


def test_a_record_that_cannot_be_written_is_no_record(lock: Path) -> None:
    """The apply succeeds; the next one reads the kernel."""
    (lock.parent / f"{lock.name}.ir.netns-1.json").mkdir()  # in the way of the record
    kernel = Remembering()
    assert apply(HOSTNAMES, kernel, lock).applied
    again = apply(WEIGHTED, kernel, lock)
    assert again.applied and again.read


def test_a_lock_path_given_as_a_string_works(tmp_path: Path) -> None:
    lock_text = str(tmp_path / "sub" / "lbc.lock")
    result = lbc.apply(lbc.load(HOSTNAMES), "ir", kernel=FakeKernel(), lock_path=lock_text)
    assert result.applied
    session = lbc.Session("ir", kernel=FakeKernel(), lock_path=lock_text)
    assert session.apply(lbc.load(HOSTNAMES)).applied
    assert Path(lock_text).exists()


def test_a_plan_holds_every_differing_object_in_key_order() -> None:
    """Against the plain definition: every key of either state whose lines differ."""
    rng = random.Random(7)
    for _ in range(50):
        live = {f"k{rng.randrange(40)}": (f"v{rng.randrange(3)}",) for _ in range(25)}
        desired = {f"k{rng.randrange(40)}": (f"v{rng.randrange(3)}",) for _ in range(25)}
        keys = sorted(live.keys() | desired.keys())
        plain = changes(keys, live.get, desired.get)
        plan = plan_between("x", State(live), State(desired))
        assert plan.changes == plain and plan.changes


def test_a_plan_sets_shared_settings_the_desired_state_names_and_never_removes_one() -> None:
    live = State({"b": ("1",)}, shared={"s1": ("s1=0",), "s2": ("s2=0",), "s3": ("s3=1",)})
    desired = State({"b": ("2",)}, shared={"s1": ("s1=1",), "s3": ("s3=1",), "s4": ("s4=1",)})
    plan = plan_between("x", live, desired)
    assert [(c.key, c.action, c.after) for c in plan.changes] == [
        ("b", Action.CHANGE, ("2",)),
        ("s1", Action.CHANGE, ("s1=1",)),
        ("s4", Action.ADD, ("s4=1",)),
    ]
    # Nothing desired (`lbc delete`): the objects go, the shared settings stay.
    assert [c.key for c in plan_between("x", live, State({})).changes] == ["b"]
    assert plan_between("x", live, State(live.objects, shared={"s3": ("s3=1",)})).in_sync


def test_a_plan_sets_shared_settings_a_live_state_does_not_have_yet() -> None:
    """A kernel that reports none of the settings (a fresh node): each one desired is
    added."""
    desired = State({"b": ("1",)}, shared={"s1": ("s1=1",), "s2": ("s2=1",)})
    assert len(desired) == 1, "a state's size counts the objects lbc owns"
    plan = plan_between("x", State({"b": ("1",)}), desired)
    assert [(c.key, c.action, c.after) for c in plan.changes] == [
        ("s1", Action.ADD, ("s1=1",)),
        ("s2", Action.ADD, ("s2=1",)),
    ]


def test_a_plans_summary_and_json_count_and_show_each_action_apart() -> None:
    """Three objects added, two changed, one removed: each count in its own place, and
    each change with its lines before and after."""
    live = State({"c1": ("old",), "c2": ("old",), "r": ("gone",)})
    desired = State({"a1": ("x",), "a2": ("x",), "a3": ("x",), "c1": ("new",), "c2": ("new",)})
    plan = plan_between("x", live, desired)
    assert plan.summary() == "3 to add, 2 to change, 1 to remove"
    doc = plan.to_json()
    assert doc["in_sync"] is False and doc["counts"] == {"add": 3, "change": 2, "remove": 1}
    by_object = {c["object"]: c for c in doc["changes"]}
    assert by_object["c1"] == {
        "object": "c1",
        "action": "change",
        "before": ["old"],
        "after": ["new"],
    }
    assert (by_object["r"]["before"], by_object["r"]["after"]) == (["gone"], [])
    assert (by_object["a1"]["before"], by_object["a1"]["after"]) == ([], ["x"])
    assert plan_between("x", live, live).to_json()["in_sync"] is True


@pytest.mark.parametrize("where", ["directory", "under-a-file"])
def test_a_lock_file_that_cannot_be_opened_is_an_apply_error(tmp_path: Path, where: str) -> None:
    plain = tmp_path / "plain"
    plain.write_text("", encoding="utf-8")
    path = tmp_path if where == "directory" else plain / "lbc.lock"
    kernel = FakeKernel()
    with pytest.raises(lbc.ApplyError, match=f"cannot open the lock file {path}: "):
        apply(MANY, kernel, path)
    assert kernel.objects == {} and kernel.commits == 0


def test_a_plan_orders_shared_settings_among_the_objects_by_key() -> None:
    live = State({"a": ("1",), "c": ("1",)}, shared={"b": ("b=0",)})
    desired = State({"a": ("2",), "c": ("2",)}, shared={"b": ("b=1",), "d": ("d=1",)})
    assert [c.key for c in plan_between("x", live, desired).changes] == ["a", "b", "c", "d"]


def test_a_dry_run_runs_no_work_after_the_commit(lock: Path) -> None:
    """`after` clears conntrack entries: a dry run must not."""
    ran: list[lbc.ApplyResult] = []

    def after(result: lbc.ApplyResult) -> lbc.ApplyResult:
        ran.append(result)
        return result

    engine = Engine(lbc.backends()["ir"], FakeKernel(), lock)
    assert not engine.converge(State({"a": ("1",)}), dry_run=True, after=after).applied
    artifact = lbc.compile(lbc.load(HOSTNAMES), "ir")
    assert not engine.apply(artifact, dry_run=True, after=after).applied
    assert ran == []
    assert engine.converge(State({"a": ("1",)}), after=after).applied and len(ran) == 1


def test_a_dry_run_leaves_no_record_that_the_next_apply_would_trust(lock: Path) -> None:
    kernel = Remembering()
    apply(HOSTNAMES, kernel, lock)
    assert apply(WEIGHTED, kernel, lock, dry_run=True).plan.changes
    result = apply(WEIGHTED, kernel, lock)
    assert result.applied and not result.read
    assert kernel.objects == kernel.desired(lbc.compile(lbc.load(WEIGHTED), "ir")).objects


def test_a_failed_apply_forgets_the_record_and_the_next_one_reads_the_kernel(lock: Path) -> None:
    kernel = Remembering()
    apply(HOSTNAMES, kernel, lock)
    record = lock.parent / f"{lock.name}.ir.netns-1.json"
    assert record.exists()
    kernel.fail_on = next(iter(kernel.objects))
    with pytest.raises(lbc.ApplyError):
        apply(WEIGHTED, kernel, lock)
    assert not record.exists()
    kernel.fail_on = None
    assert apply(WEIGHTED, kernel, lock).read


class TwoTables(FakeKernel):
    """A kernel whose commit is two transactions (iptables-nft: one per restored table)."""

    transactions = 2

    def __init__(self) -> None:
        super().__init__(generations=True)

    def commit(self, live: State, desired: State, plan: lbc.Plan) -> None:
        super().commit(live, desired, plan)
        self.current += 1


def test_a_commit_of_several_transactions_is_verified_by_as_many_generations(lock: Path) -> None:
    kernel = TwoTables()
    engine = Engine(lbc.backends()["ir"], kernel, lock)
    result = engine.converge(State({"a": ("1",)}))
    assert result.applied and kernel.snapshots == 1, "verified by generation, not read back"


def test_delete_takes_the_lock_at_its_lock_path(lock: Path) -> None:
    with (
        host_lock(lock),
        pytest.raises(lbc.ApplyError, match=f"another lbc apply holds {lock}"),
    ):
        lbc.delete("ir", kernel=FakeKernel(), lock_path=lock, lock_timeout=0.1)


def test_an_apply_to_a_callers_kernel_clears_no_conntrack_entries(
    lock: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The conntrack table is the host's (or the namespace's), not the caller's kernel.
    cleared: list[object] = []
    monkeypatch.setattr("lbc.api.after_apply", lambda *args, **kw: cleared.append(args))
    assert apply(ROOT / "golden" / "udp-sctp" / "cluster.toml", FakeKernel(), lock).applied
    assert cleared == []


def test_frontends_whose_stale_flows_were_not_cleared_are_tried_again_next_apply(
    lock: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # With lbc's own kernel, each apply clears the flows of the UDP frontends that went
    # away since the last; when that fails, the next apply still knows them.
    kernel = FakeKernel()

    class OwnKernel(IrBackend):
        def kernel(self, netns: str | None = None) -> FakeKernel:
            return kernel

    record = tmp_path / "served"
    monkeypatch.setattr("lbc.api.served_record", lambda lock_path, netns: record)
    gone: list[set[object]] = []
    fail = [False, True, False]

    def after_apply(
        result: lbc.ApplyResult,
        program: object,
        netns: object,
        stale: Iterable[object],
        **kw: object,
    ) -> lbc.ApplyResult:
        gone.append(set(stale))
        failed = ("conntrack: cannot clear",) if fail[len(gone) - 1] else ()
        return dataclasses.replace(result, warnings=failed)

    monkeypatch.setattr("lbc.api.after_apply", after_apply)
    udp = lbc.load(ROOT / "golden" / "udp-sctp" / "cluster.toml")
    for cluster in (udp, lbc.load(HOSTNAMES), lbc.load(HOSTNAMES)):
        lbc.apply(cluster, OwnKernel(), lock_path=lock)
    udp_places = udp_frontends([lbc.lower(udp)])
    assert udp_places
    assert gone == [set(), udp_places, udp_places]
