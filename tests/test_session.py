"""`lbc.Session`: per-service lowering, the incremental nftables table, and applies
that read the kernel only when its generation says someone else wrote.

The kernel here is the in-memory `FakeKernel` (with generations, as nftables has);
`test_apply_kernel.py` runs a session against the real kernel.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from pathlib import Path

import pytest

import lbc
from bench.gen import generate
from lbc.apply import Action, Engine, FakeKernel, State
from lbc.apply.state import Known, plan_between
from lbc.backends.nftables.incremental import (
    ELEMENT,
    ConflictError,
    Part,
    Table,
    objects,
    part_of,
)
from lbc.backends.nftables.kernel import parse
from lbc.backends.nftables.render import build
from lbc.backends.nftables.text import to_text
from lbc.compiler.lower import lower, lower_service, merge, node_info
from lbc.compiler.model import Cluster, Endpoint, Service
from lbc.errors import UnsupportedError
from lbc.ir.nodes import NodeInfo, Program

ROOT = Path(__file__).resolve().parent.parent
GOLDEN = sorted((ROOT / "golden").glob("*/cluster.toml"))


def nftables_cases() -> list[tuple[str, Cluster]]:
    """Every golden cluster nftables can express, and three generated ones."""
    cases = []
    for path in GOLDEN:
        cluster = lbc.load(path)
        try:
            lbc.compile(cluster, "nftables")
        except UnsupportedError:
            continue
        cases.append((path.parent.name, cluster))
    for seed in range(3):
        cases.append((f"generated-{seed}", lbc.loads(generate(120, 4, seed=seed)[0])))
    return cases


CASES = nftables_cases()
IDS = [name for name, _ in CASES]


def whole(cluster: Cluster) -> dict[str, tuple[str, ...]]:
    """The nftables objects of a whole-program build: what the table must equal."""
    return objects(build(lower(cluster)))


def key(svc: Service) -> str:
    return f"{svc.namespace}/{svc.name}"


def table_of(cluster: Cluster) -> Table:
    info = node_info(cluster)
    table = Table(info)
    table.update({key(s): part_of(lower_service(info, s)) for s in cluster.services})
    return table


def test_the_golden_cases_include_the_shared_set_features() -> None:
    """The equivalence tests below cover node ports, source ranges, affinity, no endpoints."""
    names = set(IDS)
    assert {"node-port", "load-balancer", "affinity", "no-endpoints", "dual-stack"} <= names


@pytest.mark.parametrize(("name", "cluster"), CASES, ids=IDS)
def test_per_service_programs_merge_to_the_whole_program(name: str, cluster: Cluster) -> None:
    info = node_info(cluster)
    parts = [lower_service(info, s) for s in reversed(cluster.services)]
    assert merge(info, parts) == lower(cluster)


@pytest.mark.parametrize(("name", "cluster"), CASES, ids=IDS)
def test_objects_of_a_ruleset_are_what_the_kernel_adapter_parses(
    name: str, cluster: Cluster
) -> None:
    ruleset = build(lower(cluster))
    assert objects(ruleset) == parse(to_text(ruleset, "node"))


@pytest.mark.parametrize(("name", "cluster"), CASES, ids=IDS)
def test_table_of_per_service_parts_equals_the_whole_build(name: str, cluster: Cluster) -> None:
    assert table_of(cluster).objects == whole(cluster)


def change(rng: random.Random, cluster: Cluster, spare: list[Service]) -> Cluster:
    """One random edit a controller could make: endpoints, readiness, policy, services."""
    services = list(cluster.services)
    i = rng.randrange(len(services))
    svc = services[i]
    edit = rng.choice(["add-endpoint", "drop-endpoint", "unready", "policy", "remove", "add"])
    if edit == "add-endpoint" and svc.endpoints:
        ip = svc.endpoints[0].ip + 1000 + rng.randrange(1000)
        if all(e.ip != ip for e in svc.endpoints):
            extra = Endpoint(ip=ip, node=rng.choice(["node-a", "node-0001"]))
            services[i] = svc.model_copy(update={"endpoints": [*svc.endpoints, extra]})
    elif edit == "drop-endpoint" and svc.endpoints:
        services[i] = svc.model_copy(update={"endpoints": svc.endpoints[1:]})
    elif edit == "unready":
        endpoints = [e.model_copy(update={"ready": False}) for e in svc.endpoints]
        services[i] = svc.model_copy(update={"endpoints": endpoints})
    elif edit == "policy":
        affinity = "None" if svc.session_affinity == "ClientIP" else "ClientIP"
        services[i] = svc.model_copy(update={"session_affinity": affinity})
    elif edit == "remove" and len(services) > 1:
        spare.append(services.pop(i))
    elif edit == "add" and spare:
        services.append(spare.pop())
    return cluster.model_copy(update={"services": services})


def updates(current: Cluster, new: Cluster) -> dict[str, Part | None]:
    """What `Table.update` takes to go from `current` to `new`: the part of each new or
    changed service (by identity, as a session tells them), None for each one gone."""
    info = node_info(new)
    old_keys = {key(s): s for s in current.services}
    new_keys = {key(s): s for s in new.services}
    out: dict[str, Part | None] = {
        k: part_of(lower_service(info, s)) for k, s in new_keys.items() if old_keys.get(k) is not s
    }
    out.update({k: None for k in old_keys.keys() - new_keys.keys()})
    return out


@pytest.mark.parametrize(("name", "cluster"), CASES, ids=IDS)
def test_table_follows_any_sequence_of_changes(name: str, cluster: Cluster) -> None:
    """After every update the table equals the whole build, and the changes it returns,
    in key order, turn the previous objects into the new ones."""
    rng = random.Random(name)
    table = table_of(cluster)
    spare: list[Service] = []
    current = cluster
    for _ in range(25):
        before = dict(table.objects)
        new = change(rng, current, spare)
        changes = table.update(updates(current, new))
        assert table.objects == whole(new)
        assert [c.key for c in changes] == sorted(c.key for c in changes), "in key order"
        for c in changes:
            assert before.get(c.key, ()) == c.before
            if c.action is Action.REMOVE:
                del before[c.key]
            else:
                before[c.key] = c.after
        assert before == table.objects
        current = new


def with_extra_endpoint(cluster: Cluster, index: int = 0) -> Cluster:
    svc = cluster.services[index]
    extra = Endpoint(ip=svc.endpoints[0].ip + 77, node="node-a")
    changed = svc.model_copy(update={"endpoints": [*svc.endpoints, extra]})
    services = list(cluster.services)
    services[index] = changed
    return cluster.model_copy(update={"services": services})


@pytest.fixture
def cluster() -> Cluster:
    return lbc.loads(generate(60, 3, seed=7)[0])


@pytest.fixture
def lock(tmp_path: Path) -> Path:
    return tmp_path / "lbc.lock"


def session(kernel: FakeKernel, lock: Path, backend: str = "nftables") -> lbc.Session:
    return lbc.Session(backend, kernel=kernel, lock_path=lock)


def started(cluster: Cluster, lock: Path) -> tuple[FakeKernel, lbc.Session]:
    """A kernel with generations and a session that has applied `cluster` to it."""
    kernel = FakeKernel(generations=True)
    s = session(kernel, lock)
    s.apply(cluster)
    return kernel, s


def test_session_reads_the_kernel_once_then_trusts_its_generation(
    cluster: Cluster, lock: Path
) -> None:
    kernel = FakeKernel(generations=True)
    s = session(kernel, lock)
    first = s.apply(cluster)
    assert first.read and kernel.snapshots == 1 and kernel.commits == 1
    assert kernel.objects == whole(cluster)
    again = s.apply(cluster)
    assert again.plan.in_sync and not again.applied and not again.read
    bigger = with_extra_endpoint(cluster, 3)
    result = s.apply(bigger)
    assert not result.read and kernel.snapshots == 1, "no snapshot while the generation holds"
    assert kernel.commits == 2
    assert kernel.objects == whole(bigger)
    svc = bigger.services[3].name
    assert result.plan.changes
    assert all(svc in c.key or c.key == "set hairpin-ips4" for c in result.plan.changes)


def test_session_reads_again_after_another_writer_and_repairs(cluster: Cluster, lock: Path) -> None:
    kernel, s = started(cluster, lock)
    kernel.write("chain intruder", ("accept",))
    victim = next(k for k in kernel.objects if k.startswith("chain service-"))
    kernel.write(victim, ())
    bigger = with_extra_endpoint(cluster)
    result = s.apply(bigger)
    assert result.read and kernel.snapshots == 2
    assert kernel.objects == whole(bigger)
    assert {"chain intruder", victim} <= {c.key for c in result.plan.changes}


def test_session_failed_commit_changes_nothing_and_the_retry_converges(
    cluster: Cluster, lock: Path
) -> None:
    kernel, s = started(cluster, lock)
    before = dict(kernel.objects)
    smaller = cluster.model_copy(update={"services": cluster.services[1:]})
    kernel.fail_on = next(k for k in before if cluster.services[0].name in k)
    with pytest.raises(lbc.ApplyError):
        s.apply(smaller)
    assert kernel.objects == before
    kernel.fail_on = None
    s.apply(smaller)
    assert kernel.objects == whole(smaller)
    assert kernel.snapshots == 1, "the failed commit changed nothing, so nothing is re-read"


def test_session_dry_run_writes_nothing_and_forgets_the_change(
    cluster: Cluster, lock: Path
) -> None:
    kernel, s = started(cluster, lock)
    bigger = with_extra_endpoint(cluster)
    dry = s.apply(bigger, dry_run=True)
    assert not dry.applied and dry.plan.changes and kernel.objects == whole(cluster)
    assert s.apply(bigger).plan == dry.plan
    assert kernel.objects == whole(bigger)


def test_session_follows_a_node_change(cluster: Cluster, lock: Path) -> None:
    kernel, s = started(cluster, lock)
    node = cluster.node.model_copy(update={"masquerade_mark": 0x8000})
    moved = cluster.model_copy(update={"node": node})
    s.apply(moved)
    assert kernel.objects == whole(moved)


@pytest.mark.parametrize("backend", ["iptables", "ir"])
def test_session_of_other_backends_applies_what_lbc_apply_does(
    cluster: Cluster, lock: Path, backend: str
) -> None:
    """Without generations the session reads the kernel every time, and it renders
    the whole program from its kept per-service programs."""
    ours, reference = FakeKernel(), FakeKernel()
    s = session(ours, lock, backend)
    versions = [cluster, with_extra_endpoint(cluster), with_extra_endpoint(cluster, 5)]
    for version in versions:
        s.apply(version)
        lbc.apply(version, backend, kernel=reference, lock_path=lock)
        assert ours.objects == reference.objects
    assert ours.snapshots == 2 * len(versions), "a snapshot and a read-back per apply"


def test_session_refuses_what_the_backend_cannot_express(lock: Path) -> None:
    cluster = lbc.load(ROOT / "golden" / "localhost-node-port" / "cluster.toml")
    kernel = FakeKernel(generations=True)
    with pytest.raises(UnsupportedError):
        session(kernel, lock).apply(cluster)
    assert kernel.commits == 0


class Racing(FakeKernel):
    """A kernel where another writer commits right after lbc's first commit."""

    def __init__(self, race: Callable[[FakeKernel], None]) -> None:
        super().__init__(generations=True)
        self.race: Callable[[FakeKernel], None] | None = race

    def commit(self, live: State, desired: State, plan: lbc.Plan) -> None:
        super().commit(live, desired, plan)
        if self.race is not None:
            self.race(self)
            self.race = None


def test_engine_trusts_a_generation_one_past_its_snapshot(lock: Path) -> None:
    kernel = FakeKernel(generations=True)
    engine = Engine(lbc.backends()["ir"], kernel, lock)
    result = engine.converge(State({"a": ("1",)}))
    assert result.applied and kernel.snapshots == 1, "verified by generation, not read back"
    assert result.generation == kernel.current


def test_engine_reads_back_when_another_writer_raced_its_commit(lock: Path) -> None:
    kernel = Racing(lambda k: k.write("a", ("tampered",)))
    engine = Engine(lbc.backends()["ir"], kernel, lock)
    with pytest.raises(lbc.ApplyError, match="read-back after commit differs"):
        engine.converge(State({"a": ("1",)}))
    assert kernel.snapshots == 2
    assert "a" not in kernel.objects, "rolled back to the state before the apply"


def test_engine_ignores_a_known_state_of_an_older_generation(lock: Path) -> None:
    kernel = FakeKernel({"a": ("live",)}, generations=True)
    engine = Engine(lbc.backends()["ir"], kernel, lock)
    stale = Known(kernel.current - 1, State({"a": ("old",)}))
    result = engine.converge(State({"a": ("new",)}), known=stale)
    assert result.read and result.plan.changes[0].before == ("live",)


@pytest.mark.parametrize(("name", "cluster"), CASES[-3:], ids=IDS[-3:])
def test_session_follows_any_sequence_of_changes(name: str, cluster: Cluster, lock: Path) -> None:
    """Random edits, each applied by the session: the kernel always holds the whole build."""
    rng, spare, current = random.Random(name), [], cluster
    kernel, s = started(cluster, lock)
    for _ in range(30):
        current = change(rng, current, spare)
        s.apply(current)
        assert kernel.objects == whole(current)
    assert kernel.snapshots == 1


def test_session_sees_a_service_swapped_for_another_in_the_same_place(
    cluster: Cluster, lock: Path
) -> None:
    """Same length, one position holding a different service: one gone, one new."""
    kernel, s = started(cluster, lock)
    other = lbc.loads(generate(3, 3, seed=99)[0]).services[0]
    assert all(o.name != other.name for o in cluster.services)
    swapped = cluster.model_copy(update={"services": [other, *cluster.services[1:]]})
    s.apply(swapped)
    assert kernel.objects == whole(swapped)
    s.apply(cluster)
    assert kernel.objects == whole(cluster)


def test_table_refuses_an_object_two_services_make() -> None:
    """In one update, or one service in an update and another already in the table."""
    cluster = lbc.load(ROOT / "golden" / "hostnames" / "cluster.toml")
    info = node_info(cluster)
    part = part_of(lower_service(info, cluster.services[0]))
    table = Table(info)
    with pytest.raises(ConflictError, match="b/two makes"):
        table.update({"a/one": part, "b/two": part})
    assert table.objects == {} and table.parts == {}
    table.update({"a/one": part})
    before = dict(table.objects)
    with pytest.raises(ConflictError, match="b/two makes"):
        table.update({"b/two": part})
    assert table.objects == before and set(table.parts) == {"a/one"}


def element_lines(objects: dict[str, tuple[str, ...]]) -> dict[str, set[str]]:
    """Shared set name -> its element lines."""
    return {
        k.split()[1]: {line for line in lines if line.startswith("element ")}
        for k, lines in objects.items()
        if k.startswith(("set ", "map "))
    }


@pytest.mark.parametrize(("name", "cluster"), CASES, ids=IDS)
def test_table_tells_netlink_writers_each_element_and_object_it_changed(
    name: str, cluster: Cluster
) -> None:
    """`last_delta` holds the element lines each update took out and put in, `element`
    gives the element of each (those taken out too), and `sources` the chain or set
    of each service object the table holds, and of no other."""
    rng = random.Random(name)
    table = table_of(cluster)
    spare: list[Service] = []
    current = cluster
    for _ in range(25):
        before = element_lines(table.objects)
        new = change(rng, current, spare)
        table.update(updates(current, new))
        after = element_lines(table.objects)
        for set_name in before.keys() | after.keys():
            went = sorted(before.get(set_name, set()) - after.get(set_name, set()))
            came = sorted(after.get(set_name, set()) - before.get(set_name, set()))
            if went or came:
                assert table.last_delta[set_name] == (went, came)
            for line in went + came:
                assert ELEMENT + table.element(set_name, line).text() == line
        for set_name, (went, came) in table.last_delta.items():
            assert (went, came) == (
                sorted(before.get(set_name, set()) - after.get(set_name, set())),
                sorted(after.get(set_name, set()) - before.get(set_name, set())),
            )
        own = {k for part in table.parts.values() for k in part.objects}
        assert set(table.sources) == own
        current = new


def test_session_without_a_table_plans_from_what_it_last_wrote(
    cluster: Cluster, lock: Path
) -> None:
    """With generations, a session of a backend without a per-service table plans from
    its record of the kernel: the plans are those a fresh read would give, also when it
    started on a kernel that already held the cluster (a restarted agent)."""
    kernel = FakeKernel(generations=True)
    lbc.apply(cluster, "ir", kernel=kernel, lock_path=lock)
    s = session(kernel, lock, "ir")
    assert s.apply(cluster).plan.in_sync
    smaller = cluster.model_copy(update={"services": cluster.services[1:]})
    for version in [smaller, with_extra_endpoint(smaller, 4), cluster]:
        expected = lbc.plan(version, "ir", kernel=kernel)
        result = s.apply(version)
        assert not result.read and result.plan == expected
        assert kernel.objects == kernel.desired(lbc.compile(version, "ir")).objects


def test_session_without_a_table_dry_run_forgets_the_change(cluster: Cluster, lock: Path) -> None:
    kernel = FakeKernel(generations=True)
    s = session(kernel, lock, "ir")
    s.apply(cluster)
    bigger = with_extra_endpoint(cluster)
    assert s.apply(bigger, dry_run=True).plan.changes
    assert s.apply(bigger).applied
    assert kernel.objects == kernel.desired(lbc.compile(bigger, "ir")).objects


@pytest.mark.parametrize("case", ["external-traffic-local", "internal-traffic-local"])
@pytest.mark.parametrize("dry_run_first", [False, True])
def test_session_removes_what_a_node_change_takes_away(
    case: str, dry_run_first: bool, lock: Path
) -> None:
    """Renaming the node changes which endpoints are local: some objects go."""
    cluster = lbc.load(ROOT / "golden" / case / "cluster.toml")
    moved = cluster.model_copy(
        update={"node": cluster.node.model_copy(update={"name": "elsewhere"})}
    )
    assert whole(cluster).keys() - whole(moved).keys()
    kernel, s = started(cluster, lock)
    if dry_run_first:
        s.apply(moved, dry_run=True)
        assert kernel.objects == whole(cluster)
    before = dict(kernel.objects)
    result = s.apply(moved)
    assert kernel.objects == whole(moved)
    expected = plan_between("nftables", State(before), State(whole(moved)))
    assert result.plan.changes == expected.changes


def test_session_lowers_no_service_equal_to_the_one_it_applied(
    cluster: Cluster, lock: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`lbc watch` loads the file anew for each version: every service is a new object,
    and only those not equal to the one applied are lowered again."""
    kernel, s = started(cluster, lock)
    lowered: list[str] = []

    def counting(info: NodeInfo, svc: Service) -> Program:
        lowered.append(svc.name)
        return lower_service(info, svc)

    monkeypatch.setattr("lbc.session.lower_service", counting)
    again = lbc.validate(cluster.model_copy(deep=True))
    assert all(a is not b for a, b in zip(again.services, cluster.services, strict=True))
    assert s.apply(again).plan.in_sync and lowered == []
    bigger = with_extra_endpoint(again, 2)
    s.apply(bigger)
    assert lowered == [bigger.services[2].name]
    assert kernel.objects == whole(bigger)
