"""The IPVS kernel adapter's logic against an in-memory netlink: no kernel needed.

`FakeNetlink` keeps what `Pyroute2Dataplane` reads (interface, addresses, IPVS
services and real servers with connection counts, the helper table's text, sysctls)
and performs steps with the kernel's refusals (EEXIST on duplicates, ESRCH/ENOENT on
missing objects, ERANGE on thresholds). The real kernel is the VM suite's business;
here: which steps, in which order, what they undo, ownership, and draining.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import partial
from pathlib import Path

import pytest

import lbc
from bench.gen import generate
from lbc.backends.ipvs import kernel as k
from lbc.backends.ipvs import netlink
from lbc.backends.ipvs.names import SYSCTLS
from lbc.backends.ipvs.netlink import (
    AddressStep,
    Dest,
    DestStep,
    Link,
    LinkStep,
    Live,
    RulesStep,
    ServiceStep,
    Step,
    SysctlStep,
)
from lbc.backends.ipvs.ops import AddService
from lbc.backends.ipvs.text import sections
from lbc.backends.nftables.kernel import parse as nft_parse
from lbc.errors import ApplyError
from lbc.ir.nodes import Proto
from tests.golden import GOLDEN

CASES = sorted(p.parent.name for p in GOLDEN.glob("*/ipvs.txt"))
HOSTNAMES = GOLDEN / "hostnames" / "cluster.toml"
VIP = "10.0.1.175"
CONNTRACK = "net.ipv4.vs.conntrack"


class Crash(BaseException):
    """The process dies here: no undo runs (not an `Exception`)."""


class FakeNetlink:
    """An in-memory namespace that reads like `Pyroute2Dataplane` and refuses like Linux."""

    def __init__(self) -> None:
        self.link: Link | None = None
        self.addresses: list[str] = []
        self.services: dict[tuple[Proto, str, int], tuple[AddService, dict[str, Dest]]] = {}
        self.rules: str | None = None
        # ip_vs is loaded: its parameters exist, at Linux's defaults.
        self.sysctls: dict[str, str | None] = {name: "0" for name, _ in SYSCTLS}
        self.performed: list[Step] = []
        self.fail_at: int | None = None  # the n-th step performed (1-based) fails
        self.crash_at: int | None = None  # ... or kills the process
        self.after_step: Callable[[FakeNetlink, Step], None] | None = None

    # -- reading ------------------------------------------------------------------------
    def read(self) -> Live:
        services = tuple((svc, tuple(dests.values())) for svc, dests in self.services.values())
        return Live(self.link, tuple(self.addresses), services, self.rules, dict(self.sysctls))

    def records(self) -> tuple[object, ...]:
        """Everything, order-free: what a rollback must restore exactly."""
        services = sorted(
            (repr(svc), sorted((repr(d), d.active) for d in dests.values()))
            for svc, dests in self.services.values()
        )
        return (self.link, sorted(self.addresses), services, self.rules, dict(self.sysctls))

    # -- writing ------------------------------------------------------------------------
    @contextmanager
    def writer(self) -> Iterator[Callable[[Step], None]]:
        yield self.perform

    def perform(self, step: Step) -> None:
        self.performed.append(step)
        if self.crash_at == len(self.performed):
            raise Crash(step.describe())
        if self.fail_at == len(self.performed):
            raise ApplyError("injected failure")
        self._apply(step)
        if self.after_step is not None:
            self.after_step(self, step)

    def _apply(self, step: Step) -> None:
        if isinstance(step, LinkStep):
            if step.action == "add":
                _refuse(self.link is not None, "(17, 'File exists')")
                self.link = Link("dummy", False)
                return
            _refuse(self.link is None, "(19, 'No such device')")
            if step.action == "del":
                self.link, self.addresses = None, []
            else:
                self.link = Link(self.link.kind if self.link else "", step.action == "up")
            if step.action == "down":  # keep_addr_on_down=0 (the default): IPv6 goes
                self.addresses = [a for a in self.addresses if ":" not in a]
        elif isinstance(step, AddressStep):
            _refuse(self.link is None, "(19, 'No such device')")
            if step.action == "add":
                _refuse(step.address in self.addresses, "(17, 'File exists')")
                self.addresses.append(step.address)
            else:
                _refuse(step.address not in self.addresses, "(99, 'Cannot assign')")
                self.addresses.remove(step.address)
        elif isinstance(step, ServiceStep):
            key = (step.service.proto, step.service.address, step.service.port)
            if step.action == "add":
                _refuse(key in self.services, "(17, 'File exists')")
                self.services[key] = (step.service, {})
                return
            _refuse(key not in self.services, "(3, 'No such process')")
            if step.action == "del":
                del self.services[key]
            else:
                self.services[key] = (step.service, self.services[key][1])
        elif isinstance(step, DestStep):
            key = (step.service.proto, step.service.address, step.service.port)
            _refuse(key not in self.services, "(3, 'No such process')")
            dests, where = self.services[key][1], f"{step.dest.address}:{step.dest.port}"
            # Linux takes thresholds up to 2**31-1 only, and a lower one up to the upper.
            _refuse(step.dest.upper > 0x7FFFFFFF, "(22, 'Invalid argument')")
            _refuse(step.dest.lower > step.dest.upper, "(34, 'Numerical result out of range')")
            if step.action == "add":
                _refuse(where in dests, "(17, 'File exists')")
                dests[where] = dataclasses.replace(step.dest, active=0, inactive=0)
            elif step.action == "set":
                _refuse(where not in dests, "(2, 'No such file or directory')")
                old = dests[where]
                dests[where] = dataclasses.replace(
                    step.dest, active=old.active, inactive=old.inactive
                )
            else:
                _refuse(where not in dests, "(2, 'No such file or directory')")
                del dests[where]
        elif isinstance(step, SysctlStep):
            _refuse(step.key not in self.sysctls, "(2, 'No such file or directory')")
            self.sysctls[step.key] = step.value
        elif isinstance(step, RulesStep) and step.verb == "changing":
            self.rules = changed_rules(self.rules or "", step.script)
        elif isinstance(step, RulesStep):
            lines = step.script.splitlines()
            assert lines[:2] == ["add table inet lbc-ipvs", "delete table inet lbc-ipvs"]
            whole = "\n".join(lines[2:]) + "\n"
            self.rules = changed_rules(whole, "") if step.verb == "replacing" else None

    # -- helpers for tests ----------------------------------------------------------------
    def dest(self, address: str, port: int) -> Dest:
        """The real server `address:port` of the service at VIP:80."""
        return self.services[(Proto.TCP, VIP, 80)][1][f"{address}:{port}"]

    def set_active(
        self,
        address: str,
        port: int,
        active: int,
        inactive: int = 0,
        service: tuple[Proto, str, int] = (Proto.TCP, VIP, 80),
    ) -> None:
        """Set a real server's connection counts (ActiveConn, InActConn)."""
        dests = self.services[service][1]
        where = f"{address}:{port}"
        dests[where] = dataclasses.replace(dests[where], active=active, inactive=inactive)


_COMMAND = re.compile(
    r"^(add|delete|flush) (set|map|chain|element|rule|table) inet lbc-ipvs ?(\S*) ?(.*)$"
)


def changed_rules(table: str, script: str) -> str:
    """The helper table's listing after an incremental nft script, as nft would run it."""
    objects = dict(nft_parse(table))
    for line in script.splitlines():
        m = _COMMAND.match(line)
        assert m is not None, f"an nft command this fake does not know: {line}"
        verb, kind, name, rest = m.groups()
        inner = rest.strip().removeprefix("{").removesuffix("}").strip()
        if kind == "table":
            continue
        if kind in ("set", "map") and verb == "add":
            objects[f"{kind} {name}"] = tuple(p.strip() for p in inner.split(";") if p.strip())
        elif kind == "chain" and verb == "add":
            objects[f"chain {name}"] = (inner,) if inner else ()
        elif kind == "chain" and verb == "flush":
            objects[f"chain {name}"] = tuple(
                r for r in objects[f"chain {name}"] if r.startswith("type ")
            )
        elif kind == "rule":
            objects[f"chain {name}"] = (*objects[f"chain {name}"], rest)
        elif kind == "element":
            key = next(k for k in objects if k.split()[1] == name and not k.startswith("chain"))
            items = {f"element {e.strip()}" for e in inner.split(",")}
            declaration = [x for x in objects[key] if not x.startswith("element ")]
            elements = {x for x in objects[key] if x.startswith("element ")}
            elements = elements | items if verb == "add" else elements - items
            objects[key] = (*declaration, *sorted(elements))
        else:  # delete chain, set or map
            objects.pop(f"{kind} {name}")
    # One canonical listing (objects by name), however the table was made.
    step = k.rules_step({f"{k.RULES}{key}": objects[key] for key in sorted(objects)})
    return "\n".join(step.script.splitlines()[2:]) + "\n"


def _refuse(condition: bool, error: str) -> None:
    if condition:
        raise ApplyError(error)


class Clock:
    """A settable CLOCK_BOOTTIME."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def hostnames(*endpoints: tuple[str, int], vip: str = VIP, extra: str = "") -> lbc.Cluster:
    """The seed's service with these (address, weight) endpoints; `extra` TOML appended."""
    eps = ", ".join(f'{{ ip = "{a}", weight = {w} }}' for a, w in endpoints)
    return lbc.loads(
        '[node]\nname = "node-1"\naddresses = ["192.168.49.2"]\npod_cidrs = ["10.244.0.0/16"]\n'
        f'[[services]]\nname = "hostnames"\ncluster_ips = ["{vip}"]\n'
        'ports = [{ name = "default", port = 80, target_port = 9376 }]\n'
        f"endpoints = [{eps}]\n{extra}"
    )


THREE = (("10.244.1.7", 1), ("10.244.2.3", 1), ("10.244.3.6", 1))
NODE_PORT = """
[[services]]
name = "web"
type = "NodePort"
cluster_ips = ["10.0.1.180"]
ports = [{ name = "http", port = 80, target_port = 8080, node_port = 30080 }]
endpoints = [{ ip = "10.244.1.7" }]
"""


class Setup:
    """A fake namespace, an adapter on it, and apply/verify/delete through the engine."""

    def __init__(self, tmp: Path, drain_timeout: float = k.DRAIN_TIMEOUT) -> None:
        self.net = FakeNetlink()
        self.clock = Clock()
        self.lock = tmp / "lock"
        self.drain_timeout = drain_timeout

    def kernel(self) -> k.IpvsKernel:
        """A fresh adapter, as each `lbc` command makes one."""
        return k.IpvsKernel(dataplane=self.net, drain_timeout=self.drain_timeout, clock=self.clock)

    def apply(self, source: lbc.Cluster, full: bool = False) -> lbc.ApplyResult:
        return lbc.apply(source, "ipvs", kernel=self.kernel(), lock_path=self.lock, full=full)

    def verify(self, source: lbc.Cluster) -> lbc.Plan:
        return lbc.verify(source, "ipvs", kernel=self.kernel())

    def delete(self) -> lbc.ApplyResult:
        return lbc.delete("ipvs", kernel=self.kernel(), lock_path=self.lock)

    def steps_of(self, action: Callable[[], object]) -> list[str]:
        """The command-line equivalents of the steps `action` performs."""
        start = len(self.net.performed)
        action()
        return [s.describe() for s in self.net.performed[start:]]


@pytest.fixture
def setup(tmp_path: Path) -> Setup:
    return Setup(tmp_path)


def artifact_of(source: lbc.Cluster | Path) -> lbc.Artifact:
    cluster = lbc.load(source) if isinstance(source, Path) else source
    return lbc.compile(cluster, "ipvs")


# --- the canonical state ------------------------------------------------------------------
@pytest.mark.parametrize("case", CASES)
def test_desired_state_is_the_golden_text(case: str) -> None:
    desired = k.desired_state(artifact_of(GOLDEN / case / "cluster.toml").data)
    state = desired.objects
    golden = sections((GOLDEN / case / "ipvs.txt").read_text())
    ipvs = [line for key in sorted(state) if key.startswith("service ") for line in state[key]]
    assert sorted(ipvs) == sorted(golden["ipvs"].splitlines())
    assert list(state.get("addresses lbc-ipvs0", ())) == golden["addresses"].splitlines()
    assert state["link lbc-ipvs0"] == ("lbc-ipvs0 dummy down",)
    assert not [key for key in state if key.startswith("sysctl ")], "sysctls are shared"
    sysctls = [lines[0] for lines in desired.shared.values()]
    assert sysctls == golden["sysctl"].splitlines()
    assert "nft table inet lbc-ipvs" in state
    for key, lines in state.items():
        if key.startswith("service "):
            service, dests = k.parse_service(lines)
            assert k.service_lines(service, dests.values()) == lines, "lines must round-trip"


def test_lines_of_what_another_tool_set_round_trip() -> None:
    service = AddService(Proto.SCTP, "fd00::1", 80, "sh", 30)
    dests = [
        Dest("fd00::9", 8080, 5, fwd_method=3, upper=100, lower=10),
        Dest("fd00::8", 8080, 0, fwd_method=2),
        Dest("fd00::7", 8080, 1, fwd_method=1),
    ]
    lines = k.service_lines(service, dests)
    assert lines == (
        "-A --sctp-service [fd00::1]:80 -s sh -p 30",
        "-a --sctp-service [fd00::1]:80 -r [fd00::7]:8080 --fwd-method=1 -w 1",
        "-a --sctp-service [fd00::1]:80 -r [fd00::8]:8080 -i -w 0",
        "-a --sctp-service [fd00::1]:80 -r [fd00::9]:8080 -g -w 5 -x 100 -y 10",
    )
    parsed, by_address = k.parse_service(lines)
    assert parsed == service and sorted(by_address.values(), key=repr) == sorted(dests, key=repr)


def test_rendered_rules_read_as_nft_lists_them() -> None:
    text = "\n".join(
        [
            "\tchain x {",
            "\t\tmeta mark & 0x4000 == 0 return",
            "\t\tmeta mark set meta mark ^ 0x4000",
            "\t\tip daddr @vips-v4 reject",
            "\t\tip6 daddr @vips-v6 reject",
            "\t}",
        ]
    )
    assert k.listed(text).splitlines()[1:5] == [
        "\t\tmeta mark & 0x00004000 == 0x00000000 return",
        "\t\tmeta mark set meta mark ^ 0x00004000",
        "\t\tip daddr @vips-v4 reject with icmp port-unreachable",
        "\t\tip6 daddr @vips-v6 reject with icmpv6 port-unreachable",
    ]


# --- apply: order and minimality ----------------------------------------------------------
def test_first_apply_builds_in_order_and_reads_back_in_sync(setup: Setup) -> None:
    steps = setup.steps_of(lambda: setup.apply(lbc.load(HOSTNAMES)))
    assert steps == [
        "ip link add lbc-ipvs0 type dummy",
        "ip addr add 10.0.1.175/32 dev lbc-ipvs0",
        "sysctl -w net.ipv4.vs.conntrack=1",
        "sysctl -w net.ipv4.vs.expire_nodest_conn=1",
        "sysctl -w net.ipv4.vs.expire_quiescent_template=1",
        "nft -f FILE (replacing table inet lbc-ipvs in one transaction)",
        "ipvsadm -A -t 10.0.1.175:80 -s rr",
        "ipvsadm -a -t 10.0.1.175:80 -r 10.244.1.7:9376 -m -w 1",
        "ipvsadm -a -t 10.0.1.175:80 -r 10.244.2.3:9376 -m -w 1",
        "ipvsadm -a -t 10.0.1.175:80 -r 10.244.3.6:9376 -m -w 1",
    ]
    assert setup.verify(lbc.load(HOSTNAMES)).in_sync
    # The helper table written is what the kernel would list (reloading it is a no-op).
    assert k.rules_objects(setup.net.rules or "") == {
        key: lines
        for key, lines in k.desired_state(artifact_of(HOSTNAMES).data).objects.items()
        if key.startswith("nft ")
    }


def test_reapply_writes_nothing(setup: Setup) -> None:
    setup.apply(lbc.load(HOSTNAMES))
    before = setup.net.records()
    again = setup.steps_of(lambda: setup.apply(lbc.load(HOSTNAMES)))
    assert again == [] and setup.net.records() == before


def test_one_endpoint_replaced_is_one_add_one_delete_and_the_helper_sets(setup: Setup) -> None:
    setup.apply(hostnames(*THREE))
    moved = hostnames(("10.244.1.7", 1), ("10.244.2.3", 1), ("10.244.4.8", 1))
    steps = setup.steps_of(lambda: setup.apply(moved))
    assert steps == [
        "nft -f FILE (changing table inet lbc-ipvs in one transaction)",  # hairpin set
        "ipvsadm -a -t 10.0.1.175:80 -r 10.244.4.8:9376 -m -w 1",
        "ipvsadm -d -t 10.0.1.175:80 -r 10.244.3.6:9376",
    ]
    assert setup.verify(moved).in_sync


def test_a_weight_change_edits_in_place(setup: Setup) -> None:
    setup.apply(hostnames(*THREE))
    heavier = hostnames(("10.244.1.7", 1), ("10.244.2.3", 1), ("10.244.3.6", 3))
    steps = setup.steps_of(lambda: setup.apply(heavier))
    assert steps == [
        "ipvsadm -E -t 10.0.1.175:80 -s wrr",
        "ipvsadm -e -t 10.0.1.175:80 -r 10.244.3.6:9376 -m -w 3",
    ]


def test_a_new_vip_is_bound_before_its_service_and_an_old_one_released_after(
    setup: Setup,
) -> None:
    setup.apply(hostnames(*THREE))
    steps = setup.steps_of(lambda: setup.apply(hostnames(*THREE, vip="10.0.1.176")))
    assert steps[0] == "ip addr add 10.0.1.176/32 dev lbc-ipvs0"
    assert steps[1] == "ipvsadm -D -t 10.0.1.175:80"
    assert steps[2].startswith("nft -f FILE (changing")
    assert steps[3] == "ipvsadm -A -t 10.0.1.176:80 -s rr"
    assert steps[-1] == "ip addr del 10.0.1.175/32 dev lbc-ipvs0"


def test_delete_removes_services_before_the_table_that_records_them(setup: Setup) -> None:
    setup.apply(hostnames(*THREE, extra=NODE_PORT))
    steps = setup.steps_of(setup.delete)
    assert steps == [
        "ipvsadm -D -t 10.0.1.175:80",
        "ipvsadm -D -t 10.0.1.180:80",
        "ipvsadm -D -t 192.168.49.2:30080",
        "nft -f FILE (deleting table inet lbc-ipvs in one transaction)",
        "ip addr del 10.0.1.175/32 dev lbc-ipvs0",
        "ip addr del 10.0.1.180/32 dev lbc-ipvs0",
        "ip link del lbc-ipvs0",
    ]
    assert setup.net.link is None and setup.net.addresses == []
    assert setup.net.services == {} and setup.net.rules is None
    assert setup.net.sysctls[CONNTRACK] == "1", "a shared sysctl is left as it is"


def test_full_resync_rewrites_every_object_and_changes_nothing(setup: Setup) -> None:
    setup.apply(lbc.load(HOSTNAMES))
    before = setup.net.records()
    steps = setup.steps_of(lambda: setup.apply(lbc.load(HOSTNAMES), full=True))
    assert steps == [
        "sysctl -w net.ipv4.vs.conntrack=1",
        "sysctl -w net.ipv4.vs.expire_nodest_conn=1",
        "sysctl -w net.ipv4.vs.expire_quiescent_template=1",
        "nft -f FILE (replacing table inet lbc-ipvs in one transaction)",
        "ipvsadm -E -t 10.0.1.175:80 -s rr",
        "ipvsadm -e -t 10.0.1.175:80 -r 10.244.1.7:9376 -m -w 1",
        "ipvsadm -e -t 10.0.1.175:80 -r 10.244.2.3:9376 -m -w 1",
        "ipvsadm -e -t 10.0.1.175:80 -r 10.244.3.6:9376 -m -w 1",
    ]
    assert setup.net.records() == before


def test_the_interface_is_set_down_and_a_foreign_one_refused(setup: Setup) -> None:
    setup.apply(lbc.load(HOSTNAMES))
    setup.net.link = Link("dummy", True)
    assert not setup.verify(lbc.load(HOSTNAMES)).in_sync
    assert setup.steps_of(lambda: setup.apply(lbc.load(HOSTNAMES))) == [
        "ip link set lbc-ipvs0 down"
    ]
    setup.net.link = Link("veth", False)
    before = setup.net.records()
    with pytest.raises(ApplyError, match="is a 'veth', not lbc's dummy"):
        setup.apply(lbc.load(HOSTNAMES))
    assert setup.net.records() == before


# --- atomicity: undo ----------------------------------------------------------------------
BIGGER = hostnames(("10.244.4.8", 2), ("10.244.2.3", 1), extra=NODE_PORT)


def foreign(net: FakeNetlink) -> None:
    """Another tool's services: a VIP of its own, and a port on the node's address."""
    for address, port in (("10.9.9.9", 80), ("192.168.49.2", 8443)):
        service = AddService(Proto.TCP, address, port, "rr", None)
        dest = Dest("10.244.1.7", 9376, 1)
        net.services[(Proto.TCP, address, port)] = (service, {"10.244.1.7:9376": dest})


# Pairs of configs (None: nothing, or `lbc delete`): adds, changes, removals, deletes.
PAIRS = [
    (None, hostnames(*THREE, extra=NODE_PORT)),
    (hostnames(*THREE, extra=NODE_PORT), BIGGER),
    (BIGGER, hostnames(*THREE, vip="10.0.1.176")),
    (BIGGER, None),
]


def act(setup: Setup, target: lbc.Cluster | None) -> object:
    return setup.apply(target) if target is not None else setup.delete()


def prepared(tmp_path: Path, first: lbc.Cluster | None) -> Setup:
    setup = Setup(tmp_path)
    foreign(setup.net)
    if first is not None:
        setup.apply(first)
    return setup


@pytest.mark.parametrize(("first", "second"), PAIRS)
def test_a_failure_at_any_step_leaves_the_kernel_as_it_was(
    first: lbc.Cluster | None, second: lbc.Cluster | None, tmp_path: Path
) -> None:
    probe = prepared(tmp_path, first)
    total = len(probe.steps_of(lambda: act(probe, second)))
    assert total >= 5
    for n in range(1, total + 1):
        setup = prepared(tmp_path, first)
        before, done = setup.net.records(), len(setup.net.performed)
        setup.net.fail_at = done + n
        with pytest.raises(ApplyError) as failure:
            act(setup, second)
        failed = setup.net.performed[done + n - 1]
        assert f"`{failed.describe()}` failed: injected failure" in str(failure.value)
        assert f"the {n - 1} step(s) before it were undone" in str(failure.value)
        assert setup.net.records() == before, f"failing step {n} of {total} left changes"


def test_undoing_a_service_removal_brings_back_every_real_server(setup: Setup) -> None:
    setup.apply(hostnames(*THREE))
    setup.net.set_active("10.244.3.6", 9376, 1)
    setup.apply(hostnames(("10.244.1.7", 1), ("10.244.2.3", 1)))  # 10.244.3.6 drains
    kernel = setup.kernel()
    planned = kernel.steps(kernel.snapshot(), k.State({}))
    (removal,) = [u for u in planned.steps if isinstance(u.step, ServiceStep)]
    assert [s.describe() for s in removal.undo] == [
        "ipvsadm -A -t 10.0.1.175:80 -s rr",
        "ipvsadm -a -t 10.0.1.175:80 -r 10.244.1.7:9376 -m -w 1",
        "ipvsadm -a -t 10.0.1.175:80 -r 10.244.2.3:9376 -m -w 1",
        f"ipvsadm -a -t 10.0.1.175:80 -r 10.244.3.6:9376 -m -w 0 -x {k.DRAIN_UPPER} -y 1000",
    ]


def test_an_undo_that_fails_is_reported_with_the_failure(setup: Setup) -> None:
    setup.apply(lbc.load(HOSTNAMES))
    done = len(setup.net.performed)
    setup.net.fail_at = done + 3

    original = setup.net.perform

    def perform(step: Step) -> None:
        if len(setup.net.performed) > done + 2:  # every undo step fails as well
            setup.net.performed.append(step)
            raise ApplyError("undo refused")
        original(step)

    setup.net.perform = perform  # type: ignore[method-assign]
    with pytest.raises(ApplyError, match=r"undoing the 2 step\(s\) before it failed too"):
        setup.apply(BIGGER)


# --- ownership ----------------------------------------------------------------------------
def test_services_of_other_tools_are_never_read_or_touched(setup: Setup) -> None:
    foreign(setup.net)
    theirs = {key: setup.net.services[key] for key in list(setup.net.services)}
    for action in (
        lambda: setup.apply(hostnames(*THREE, extra=NODE_PORT)),
        lambda: setup.apply(hostnames(*THREE, extra=NODE_PORT)),
        lambda: setup.apply(BIGGER),
        setup.delete,
    ):
        steps = setup.steps_of(action)
        assert not any("10.9.9.9" in s or ":8443" in s for s in steps)
        assert {key: setup.net.services[key] for key in theirs} == theirs
        state = setup.kernel().snapshot().objects
        assert not any("10.9.9.9" in key or ":8443" in key for key in state)
    assert set(setup.net.services) == set(theirs)


def test_node_ports_are_lbcs_through_the_helper_table(setup: Setup) -> None:
    setup.apply(hostnames(*THREE, extra=NODE_PORT))
    state = setup.kernel().snapshot().objects
    assert "service -t 192.168.49.2:30080" in state
    setup.net.rules = None  # without the record, a service on the node's address is not lbc's
    assert "service -t 192.168.49.2:30080" not in setup.kernel().snapshot().objects
    assert "service -t 10.0.1.180:80" in setup.kernel().snapshot().objects  # bound address


def test_a_foreign_service_in_the_way_is_an_error_not_a_takeover(setup: Setup) -> None:
    service = AddService(Proto.TCP, "192.168.49.2", 30080, "wlc", None)
    setup.net.services[(Proto.TCP, "192.168.49.2", 30080)] = (service, {})
    before = setup.net.records()
    with pytest.raises(ApplyError, match=r"ipvsadm -A -t 192.168.49.2:30080 -s rr` failed"):
        setup.apply(hostnames(*THREE, extra=NODE_PORT))
    assert setup.net.records() == before


# --- crashes ------------------------------------------------------------------------------
@pytest.mark.parametrize(("first", "second"), PAIRS)
def test_a_crash_between_any_two_steps_is_converged_by_the_next_apply(
    first: lbc.Cluster | None, second: lbc.Cluster | None, tmp_path: Path
) -> None:
    probe = prepared(tmp_path, first)
    total = len(probe.steps_of(lambda: act(probe, second)))
    for n in range(1, total + 1):
        setup = prepared(tmp_path, first)
        setup.net.crash_at = len(setup.net.performed) + n
        with pytest.raises(Crash):
            act(setup, second)
        setup.net.crash_at = None
        # Every service left behind is another tool's or recognisably lbc's.
        owned = {key for key in setup.kernel().snapshot().objects if key.startswith("service ")}
        present = {f"service -t {a}:{p}" for _, a, p in setup.net.services}
        assert present - owned == {"service -t 10.9.9.9:80", "service -t 192.168.49.2:8443"}
        act(setup, second)
        if second is not None:
            assert setup.verify(second).in_sync, f"crash at step {n} of {total}"
        else:
            assert setup.kernel().snapshot().objects == {}, f"crash at step {n} of {total}"
        assert set(setup.net.services) >= {
            (Proto.TCP, "10.9.9.9", 80),
            (Proto.TCP, "192.168.49.2", 8443),
        }


# --- graceful termination -----------------------------------------------------------------
TWO = hostnames(("10.244.1.7", 1), ("10.244.2.3", 1))
DRAIN = f"-x {k.DRAIN_UPPER} -y 1000"


def test_a_removed_server_with_connections_drains_at_weight_0(setup: Setup) -> None:
    setup.apply(hostnames(*THREE))
    setup.net.set_active("10.244.3.6", 9376, 2)
    steps = setup.steps_of(lambda: setup.apply(TWO))
    assert steps == [
        "nft -f FILE (changing table inet lbc-ipvs in one transaction)",
        f"ipvsadm -e -t 10.0.1.175:80 -r 10.244.3.6:9376 -m -w 0 {DRAIN}",
    ]
    assert setup.verify(TWO).in_sync, "a draining server is not drift"
    assert setup.steps_of(lambda: setup.apply(TWO)) == [], "nor work for the next apply"
    setup.clock.now += 60
    assert setup.verify(TWO).in_sync

    setup.net.set_active("10.244.3.6", 9376, 0)  # the last connection closed
    drift = setup.verify(TWO)
    assert [c.diff() for c in drift.changes] == [
        [
            "@@ -3,2 +3 @@",
            " -a -t 10.0.1.175:80 -r 10.244.2.3:9376 -m -w 1",
            f"--a -t 10.0.1.175:80 -r 10.244.3.6:9376 -m -w 0 {DRAIN}",
        ]
    ]
    steps = setup.steps_of(lambda: setup.apply(TWO))
    assert steps == ["ipvsadm -d -t 10.0.1.175:80 -r 10.244.3.6:9376"]
    assert setup.verify(TWO).in_sync


def test_a_drain_ends_at_its_timeout_even_with_connections(tmp_path: Path) -> None:
    setup = Setup(tmp_path, drain_timeout=30)
    setup.apply(hostnames(*THREE))
    setup.net.set_active("10.244.3.6", 9376, 1)
    setup.apply(TWO)
    setup.clock.now += 29
    assert setup.verify(TWO).in_sync
    setup.clock.now += 1
    assert not setup.verify(TWO).in_sync
    steps = setup.steps_of(lambda: setup.apply(TWO))
    assert steps == ["ipvsadm -d -t 10.0.1.175:80 -r 10.244.3.6:9376"]


def test_a_zero_drain_timeout_deletes_at_once(tmp_path: Path) -> None:
    setup = Setup(tmp_path, drain_timeout=0)
    setup.apply(hostnames(*THREE))
    setup.net.set_active("10.244.3.6", 9376, 1)
    steps = setup.steps_of(lambda: setup.apply(TWO))
    assert steps[-1] == "ipvsadm -d -t 10.0.1.175:80 -r 10.244.3.6:9376"


def test_servers_without_active_connections_go_at_once(setup: Setup) -> None:
    setup.apply(hostnames(*THREE))
    setup.net.set_active("10.244.3.6", 9376, 0)
    steps = setup.steps_of(lambda: setup.apply(TWO))
    assert steps[-1] == "ipvsadm -d -t 10.0.1.175:80 -r 10.244.3.6:9376"


def test_a_draining_server_wanted_again_gets_its_weight_back(setup: Setup) -> None:
    setup.apply(hostnames(*THREE))
    setup.net.set_active("10.244.3.6", 9376, 1)
    setup.apply(TWO)
    back = hostnames(("10.244.1.7", 1), ("10.244.2.3", 1), ("10.244.3.6", 2))
    steps = setup.steps_of(lambda: setup.apply(back))
    assert steps == [
        "nft -f FILE (changing table inet lbc-ipvs in one transaction)",
        "ipvsadm -E -t 10.0.1.175:80 -s wrr",
        "ipvsadm -e -t 10.0.1.175:80 -r 10.244.3.6:9376 -m -w 2",  # it exists: set, not add
    ]
    assert setup.net.dest("10.244.3.6", 9376) == Dest("10.244.3.6", 9376, 2)
    assert setup.verify(back).in_sync


def test_a_weight_0_server_left_behind_is_restored_or_removed(setup: Setup) -> None:
    setup.apply(hostnames(*THREE))
    # As a crash (or ipvsadm -e ... -w 0) leaves them: weight 0, without lbc's mark.
    for address in ("10.244.2.3", "10.244.3.6"):
        record = setup.net.dest(address, 9376)
        setup.net.services[(Proto.TCP, VIP, 80)][1][f"{address}:9376"] = dataclasses.replace(
            record, weight=0
        )
    setup.net.set_active("10.244.3.6", 9376, 1)
    assert not setup.verify(TWO).in_sync
    steps = setup.steps_of(lambda: setup.apply(TWO))
    assert steps[-2:] == [
        "ipvsadm -e -t 10.0.1.175:80 -r 10.244.2.3:9376 -m -w 1",  # wanted: restored
        f"ipvsadm -e -t 10.0.1.175:80 -r 10.244.3.6:9376 -m -w 0 {DRAIN}",  # not: drains
    ]
    assert setup.verify(TWO).in_sync


def test_the_read_back_tolerates_a_drain_that_ended_during_the_commit(setup: Setup) -> None:
    """The last connection closing between commit and read-back is no failed apply."""
    setup.apply(hostnames(*THREE))
    setup.net.set_active("10.244.3.6", 9376, 1)

    def close(net: FakeNetlink, step: Step) -> None:
        if isinstance(step, DestStep) and step.dest.weight == 0:
            net.set_active("10.244.3.6", 9376, 0)

    setup.net.after_step = close
    result = setup.apply(TWO)
    assert result.applied
    assert setup.net.dest("10.244.3.6", 9376).weight == 0
    setup.net.after_step = None
    assert not setup.verify(TWO).in_sync, "a later verify shows it drained"
    assert setup.steps_of(lambda: setup.apply(TWO)) == [
        "ipvsadm -d -t 10.0.1.175:80 -r 10.244.3.6:9376"
    ]


# --- what reaches pyroute2 ----------------------------------------------------------------
def test_changes_are_sent_as_set_never_as_update() -> None:
    from tests.test_ipvs_pyroute2 import wire

    service = AddService(Proto.TCP, VIP, 80, "wrr", None)
    dest = Dest("10.244.1.7", 9376, 0, upper=k.DRAIN_UPPER, lower=1234)
    sent = wire(netlink.step_request(ServiceStep("set", service)))
    assert sent["cmd"] == 2  # IPVS_CMD_SET_SERVICE; "update" would be 3, a delete
    sent = wire(netlink.step_request(DestStep("set", service, dest)))
    assert sent["cmd"] == 6  # IPVS_CMD_SET_DEST
    attrs = dict(sent.get_attr("IPVS_CMD_ATTR_DEST")["attrs"])
    assert attrs["IPVS_DEST_ATTR_WEIGHT"] == 0
    assert attrs["IPVS_DEST_ATTR_FWD_METHOD"] == 0  # NAT, not pyroute2's default 3
    assert attrs["IPVS_DEST_ATTR_U_THRESH"] == k.DRAIN_UPPER
    assert attrs["IPVS_DEST_ATTR_L_THRESH"] == 1234
    assert wire(netlink.step_request(DestStep("del", service, dest)))["cmd"] == 7


def test_address_and_link_requests() -> None:
    add6 = netlink.step_request(AddressStep("add", "lbc-ipvs0", "fd00::1/128"))
    assert add6.command == "add" and add6.kwargs["prefixlen"] == 128
    assert add6.kwargs["flags"] == netlink.IFA_F_NODAD
    del4 = netlink.step_request(AddressStep("del", "lbc-ipvs0", "10.0.1.175/32"))
    assert (del4.method, del4.command, del4.kwargs["address"]) == ("addr", "del", "10.0.1.175")
    assert netlink.step_request(LinkStep("add", "lbc-ipvs0")).kwargs["kind"] == "dummy"
    assert netlink.step_request(LinkStep("down", "lbc-ipvs0")).kwargs["state"] == "down"


def one_more_endpoint(cluster: lbc.Cluster) -> lbc.Cluster:
    """The cluster with one more ready endpoint on its first service, on this node (so
    that the helper table gains its hairpin element)."""
    first = cluster.services[0]
    extra = first.endpoints[0].model_copy(
        update={"ip": first.endpoints[0].ip + 250, "node": cluster.node.name}
    )
    changed = first.model_copy(update={"endpoints": [*first.endpoints, extra]})
    return cluster.model_copy(update={"services": [changed, *cluster.services[1:]]})


def test_a_one_endpoint_change_sends_as_many_operations_at_any_size(tmp_path: Path) -> None:
    """IPVS's cost of a change is in operations sent, and a change to the helper table
    is its elements: the same handful of operations for 20 services or 2,000."""
    for size in (20, 2000):
        cluster = lbc.loads(generate(size, 10, seed=3)[0])
        setup = Setup(tmp_path / str(size))
        setup.apply(cluster)
        bigger = one_more_endpoint(cluster)
        sent = setup.steps_of(partial(setup.apply, bigger))
        ports = len(bigger.services[0].ports)
        assert sent[0] == "nft -f FILE (changing table inet lbc-ipvs in one transaction)"
        assert len(sent) == 1 + ports, sent  # the hairpin elements, a real server per port
        assert all(step.startswith("ipvsadm -a ") for step in sent[1:]), sent
        (script,) = [s.script for s in setup.net.performed if isinstance(s, RulesStep)][-1:]
        assert "delete table" not in script and len(script.splitlines()) <= 3, script


# --- reviewed findings ----------------------------------------------------------------------
UDP_SCTP = GOLDEN / "udp-sctp" / "cluster.toml"
_NAMED = re.compile(r" \. (tcp|udp|sctp) \. ")
_NUMBER = {"tcp": "6", "udp": "17", "sctp": "132"}


def numeric(listing: str) -> str:
    """A listing as nft prints it without /etc/protocols: protocol numbers, not names."""
    return _NAMED.sub(lambda m: f" . {_NUMBER[m.group(1)]} . ", listing)


def test_a_listing_with_protocol_numbers_reads_as_one_with_names() -> None:
    """nft without /etc/protocols (no netbase) lists 6, 17 and 132 (as on Debian 12)."""
    listing = "\n".join(
        [
            "table inet lbc-ipvs {",
            "\tset services-v4 {",
            "\t\ttype ipv4_addr . inet_proto . inet_service",
            "\t\telements = { 10.0.1.187 . 6 . 53,",
            "\t\t\t     10.0.1.187 . 17 . 53,",
            "\t\t\t     10.0.1.187 . 132 . 17 }",
            "\t}",
            "\tchain c {",
            "\t\tmeta l4proto 6 return",
            "\t}",
            "}",
        ]
    )
    objects = k.rules_objects(listing)
    assert objects["nft set services-v4"] == (
        "type ipv4_addr . inet_proto . inet_service",
        "element 10.0.1.187 . sctp . 17",  # port 17 stays a number
        "element 10.0.1.187 . tcp . 53",
        "element 10.0.1.187 . udp . 53",
    )
    assert objects["nft chain c"] == ("meta l4proto tcp return",)
    assert k.recorded_services(objects) == {
        ("10.0.1.187", Proto.TCP, 53),
        ("10.0.1.187", Proto.UDP, 53),
        ("10.0.1.187", Proto.SCTP, 17),
    }


@pytest.mark.parametrize("source", [UDP_SCTP, HOSTNAMES])
def test_an_apply_reads_back_a_numeric_listing_in_sync(source: Path, setup: Setup) -> None:
    cluster = lbc.load(source)
    setup.apply(cluster)
    assert setup.net.rules is not None
    setup.net.rules = numeric(setup.net.rules)
    assert setup.net.rules != numeric("") and " . 6 . " in setup.net.rules
    assert setup.verify(cluster).in_sync
    assert setup.steps_of(lambda: setup.apply(cluster)) == []


def test_a_node_port_is_owned_through_a_numeric_listing(setup: Setup) -> None:
    cluster = hostnames(*THREE, extra=NODE_PORT)
    setup.apply(cluster)
    setup.net.rules = numeric(setup.net.rules or "")
    assert "service -t 192.168.49.2:30080" in setup.kernel().snapshot().objects
    assert setup.verify(cluster).in_sync


def test_a_prefix_shaped_mark_mask_reads_as_nft_lists_it() -> None:
    """nft lists `& MASK == VALUE` as `VALUE/LEN` when MASK is leading ones (bit 31: /1)."""
    text = "\n".join(
        [
            "meta mark & 0x80000000 == 0 return",
            "meta mark & 0x80000000 != 0 return",
            "meta mark & 0xffff0000 == 0x12340000 return",
            "meta mark & 0xffffffff == 0x5 return",
            "meta mark & 0x4000 == 0 return",
            "meta mark & 0x40000000 == 0 return",
            "meta mark set meta mark ^ 0x80000000",
        ]
    )
    assert k.listed(text).splitlines() == [  # each as nft 1.0.6 lists it
        "meta mark 0x00000000/1 return",
        "meta mark != 0x00000000/1 return",
        "meta mark 0x12340000/16 return",
        "meta mark 0x00000005 return",
        "meta mark & 0x00004000 == 0x00000000 return",
        "meta mark & 0x40000000 == 0x00000000 return",
        "meta mark set meta mark ^ 0x80000000",
    ]


def with_mark(cluster: lbc.Cluster, mark: int) -> lbc.Cluster:
    node = cluster.node.model_copy(update={"masquerade_mark": mark})
    return cluster.model_copy(update={"node": node})


def test_a_bit_31_masquerade_mark_is_desired_as_nft_lists_it() -> None:
    cluster = with_mark(hostnames(*THREE), 0x80000000)
    state = k.desired_state(lbc.compile(cluster, "ipvs").data).objects
    post = state["nft chain nat-postrouting"]
    assert "meta mark 0x00000000/1 return" in post
    assert "meta mark set meta mark ^ 0x80000000" in post


def test_a_drain_of_an_earlier_apply_ending_during_a_commit_is_no_failure(setup: Setup) -> None:
    setup.apply(hostnames(*THREE))
    setup.net.set_active("10.244.3.6", 9376, 1)
    setup.apply(TWO)  # 10.244.3.6 drains
    assert setup.net.dest("10.244.3.6", 9376).weight == 0

    def close(net: FakeNetlink, step: Step) -> None:
        net.set_active("10.244.3.6", 9376, 0)  # its last connection closes mid-commit

    setup.net.after_step = close
    heavier = hostnames(("10.244.1.7", 1), ("10.244.2.3", 2))
    result = setup.apply(heavier)
    assert result.applied
    assert setup.net.dest("10.244.2.3", 9376).weight == 2, "not rolled back"
    setup.net.after_step = None
    assert setup.steps_of(lambda: setup.apply(heavier)) == [
        "ipvsadm -d -t 10.0.1.175:80 -r 10.244.3.6:9376"
    ]


def test_a_tcp_server_with_only_inactive_connections_drains(setup: Setup) -> None:
    """kube-proxy waits for ActiveConn + InActConn == 0 before deleting a TCP server."""
    setup.apply(hostnames(*THREE))
    setup.net.set_active("10.244.3.6", 9376, 0, inactive=2)
    steps = setup.steps_of(lambda: setup.apply(TWO))
    assert steps[-1] == f"ipvsadm -e -t 10.0.1.175:80 -r 10.244.3.6:9376 -m -w 0 {DRAIN}"
    assert setup.verify(TWO).in_sync, "still draining: not drift"
    setup.net.set_active("10.244.3.6", 9376, 0, inactive=0)
    assert setup.steps_of(lambda: setup.apply(TWO)) == [
        "ipvsadm -d -t 10.0.1.175:80 -r 10.244.3.6:9376"
    ]


def test_udp_and_sctp_servers_are_deleted_at_once_with_connections(setup: Setup) -> None:
    """kube-proxy deletes UDP and SCTP real servers without graceful termination."""
    setup.apply(lbc.load(UDP_SCTP))
    for proto, port in ((Proto.UDP, 53), (Proto.SCTP, 2905), (Proto.TCP, 53)):
        target = 2905 if proto is Proto.SCTP else 5353
        setup.net.set_active("10.244.2.3", target, 3, 1, service=(proto, "10.0.1.187", port))
    fewer = lbc.loads(UDP_SCTP.read_text().replace(', { ip = "10.244.2.3" }', ""))
    steps = setup.steps_of(lambda: setup.apply(fewer))
    assert "ipvsadm -d -u 10.0.1.187:53 -r 10.244.2.3:5353" in steps
    assert "ipvsadm -d --sctp-service 10.0.1.187:2905 -r 10.244.2.3:2905" in steps
    assert f"ipvsadm -e -t 10.0.1.187:53 -r 10.244.2.3:5353 -m -w 0 {DRAIN}" in steps
    assert setup.verify(fewer).in_sync


def test_a_foreign_service_on_an_address_to_bind_is_refused_with_nothing_changed(
    setup: Setup,
) -> None:
    """Bound to lbc-ipvs0, another tool's VIP:8080 would read as lbc's: a rollback (or
    the next apply) would delete it."""
    theirs = AddService(Proto.TCP, VIP, 8080, "wlc", None)
    dest = Dest("10.244.9.9", 8080, 1)
    setup.net.services[(Proto.TCP, VIP, 8080)] = (theirs, {"10.244.9.9:8080": dest})
    before = setup.net.records()
    with pytest.raises(ApplyError, match=rf"another tool's IPVS service\(s\) -t {VIP}:8080"):
        setup.apply(hostnames(*THREE))
    assert setup.net.records() == before
    assert setup.net.performed == []


def test_a_non_dummy_lbc_ipvs0_is_foreign_to_delete_too(setup: Setup) -> None:
    setup.apply(hostnames(*THREE, extra=NODE_PORT))
    setup.net.link = Link("veth", True)  # someone else's, with lbc's old addresses
    state = setup.kernel().snapshot().objects
    assert "addresses lbc-ipvs0" not in state, "its addresses are not lbc's"
    assert state["link lbc-ipvs0"] == ("lbc-ipvs0 veth up",)
    before = setup.net.records()
    with pytest.raises(ApplyError, match="is a 'veth', not lbc's dummy interface; nothing"):
        setup.delete()
    assert setup.net.records() == before
    assert setup.net.link == Link("veth", True) and setup.net.addresses


# --- an interface found up, IPv6 addresses, service flags, shared sysctls ------------------
DUAL = GOLDEN / "dual-stack" / "cluster.toml"
V6 = "fd00:10::1:178/128"


def test_an_up_interface_gets_its_ipv6_vips_bound_again_after_setting_it_down(
    setup: Setup,
) -> None:
    # Setting the link down drops its IPv6 addresses (keep_addr_on_down=0); the fake
    # does as Linux does, so the read-back would miss them and the apply roll back.
    setup.apply(lbc.load(DUAL))
    setup.net.link = Link("dummy", True)
    setup.net.addresses.append("fd00:10::9/128")  # bound, not wanted
    kernel = setup.kernel()
    planned = kernel.steps(kernel.snapshot(), kernel.desired(artifact_of(DUAL)))
    assert [(u.step.describe(), [s.describe() for s in u.undo]) for u in planned.steps] == [
        (
            "ip -6 addr del fd00:10::9/128 dev lbc-ipvs0",
            ["ip -6 addr add fd00:10::9/128 dev lbc-ipvs0 nodad"],
        ),
        (f"ip -6 addr del {V6} dev lbc-ipvs0", [f"ip -6 addr add {V6} dev lbc-ipvs0 nodad"]),
        ("ip link set lbc-ipvs0 down", ["ip link set lbc-ipvs0 up"]),
        (f"ip -6 addr add {V6} dev lbc-ipvs0 nodad", [f"ip -6 addr del {V6} dev lbc-ipvs0"]),
    ]
    setup.apply(lbc.load(DUAL))
    assert setup.verify(lbc.load(DUAL)).in_sync
    assert setup.net.link == Link("dummy", False)
    assert sorted(setup.net.addresses) == ["10.0.1.178/32", V6]


def test_a_failure_after_setting_an_up_interface_down_restores_it_up_with_its_addresses(
    tmp_path: Path,
) -> None:
    def up(setup: Setup) -> Setup:
        setup.apply(lbc.load(DUAL))
        setup.net.link = Link("dummy", True)
        return setup

    probe = up(Setup(tmp_path))
    total = len(probe.steps_of(lambda: probe.apply(lbc.load(DUAL))))
    assert total == 3
    for n in range(1, total + 1):
        setup = up(Setup(tmp_path))
        before, done = setup.net.records(), len(setup.net.performed)
        setup.net.fail_at = done + n
        with pytest.raises(ApplyError, match="were undone"):
            setup.apply(lbc.load(DUAL))
        assert setup.net.records() == before, f"failing step {n} left changes"


def test_service_flags_and_netmask_set_by_another_tool_are_drift_and_repaired(
    setup: Setup,
) -> None:
    setup.apply(hostnames(*THREE))
    service, dests = setup.net.services[(Proto.TCP, VIP, 80)]
    for changed in (
        dataclasses.replace(service, flags=0x4),  # ipvsadm -E ... -o
        dataclasses.replace(service, persistence=30, netmask=24),  # -p 30 -M 255.255.255.0
        dataclasses.replace(service, scheduler="sh", flags=0x8 | 0x10),  # -b sh-fallback,..
    ):
        setup.net.services[(Proto.TCP, VIP, 80)] = (changed, dests)
        drift = setup.verify(hostnames(*THREE))
        assert [c.key for c in drift.changes] == ["service -t 10.0.1.175:80"]
        assert drift.changes[0].before[0] == changed.line()
        assert setup.steps_of(lambda: setup.apply(hostnames(*THREE))) == [
            "ipvsadm -E -t 10.0.1.175:80 -s rr"
        ]
        assert setup.net.services[(Proto.TCP, VIP, 80)][0] == service
        assert setup.verify(hostnames(*THREE)).in_sync


def test_service_lines_with_flags_and_netmask_round_trip() -> None:
    for service, line in (
        (AddService(Proto.TCP, VIP, 80, "rr", None, 0x4), f"-A -t {VIP}:80 -s rr -o"),
        (
            AddService(Proto.TCP, VIP, 80, "rr", 30, 0, 24),
            f"-A -t {VIP}:80 -s rr -p 30 -M 255.255.255.0",
        ),
        (
            AddService(Proto.UDP, "fd00::1", 53, "sh", 30, 0x4 | 0x8 | 0x10, 64),
            "-A -u [fd00::1]:53 -s sh -p 30 -M 64 -o -b sh-fallback,sh-port",
        ),
        (AddService(Proto.TCP, VIP, 80, "mh", None, 0x10), f"-A -t {VIP}:80 -s mh -b mh-port"),
        (AddService(Proto.TCP, VIP, 80, "wlc", None, 0x20), f"-A -t {VIP}:80 -s wlc -b flag-3"),
    ):
        assert service.line() == line
        assert k.parse_service((line,))[0] == service
    plain = AddService(Proto.TCP, VIP, 80, "rr", None)
    assert "flags" not in plain.to_json() and "netmask" not in plain.to_json()


def remove_a_destination_once(net: FakeNetlink, step: Step) -> None:
    """Another writer, once: as the commit adds 10.244.3.6, 10.244.1.7 is removed from
    the hostnames service, so the read-back differs and the engine rolls back."""
    if isinstance(step, DestStep) and step.dest.address == "10.244.3.6":
        net.after_step = None
        del net.services[(Proto.TCP, VIP, 80)][1]["10.244.1.7:9376"]


def test_a_rollback_after_a_read_back_mismatch_restores_the_sysctls(setup: Setup) -> None:
    names = ("net.ipv4.vs.expire_nodest_conn", "net.ipv4.vs.expire_quiescent_template")
    setup.net.sysctls.update(dict.fromkeys(names, "0"))
    before = setup.net.records()

    setup.net.after_step = remove_a_destination_once
    with pytest.raises(ApplyError, match="rolled back to the previous state"):
        setup.apply(hostnames(*THREE))
    assert setup.net.sysctls == {CONNTRACK: "0", **dict.fromkeys(names, "0")}
    assert setup.net.records() == before


def test_a_rollback_leaves_a_parameter_that_did_not_exist_before_the_commit(
    setup: Setup,
) -> None:
    """ip_vs loaded during the commit (its parameters appear after the snapshot): the
    rollback has no value to put back for them, and writes none (an empty write would
    fail the rollback); the services are rolled back all the same."""
    name = "net.ipv4.vs.expire_quiescent_template"
    del setup.net.sysctls[name]

    def load_then_sabotage(net: FakeNetlink, step: Step) -> None:
        net.sysctls.setdefault(name, "0")  # the module, loaded by the first write
        remove_a_destination_once(net, step)

    setup.net.after_step = load_then_sabotage
    with pytest.raises(ApplyError, match="rolled back to the previous state"):
        setup.apply(hostnames(*THREE))
    assert setup.net.sysctls[name] == "1"  # as the commit set it: it had no value before
    assert not setup.net.services


def test_a_rollback_restores_sysctls_that_had_drifted_before_the_commit(setup: Setup) -> None:
    setup.apply(hostnames(*THREE))
    setup.net.sysctls[CONNTRACK] = "0"  # drift, which the next apply repairs
    before = setup.net.records()

    def sabotage(net: FakeNetlink, step: Step) -> None:
        if isinstance(step, DestStep):
            net.after_step = None
            net.sysctls["net.ipv4.vs.expire_nodest_conn"] = "0"

    setup.net.after_step = sabotage
    with pytest.raises(ApplyError, match="rolled back to the previous state"):
        setup.apply(hostnames(*THREE[:2]))
    assert setup.net.records() == before
    assert setup.net.sysctls[CONNTRACK] == "0"


def test_delete_plans_no_sysctl_change_and_verify_still_shows_sysctl_drift(
    setup: Setup,
) -> None:
    setup.apply(hostnames(*THREE))
    dry = lbc.delete("ipvs", kernel=setup.kernel(), lock_path=setup.lock, dry_run=True)
    keys = [c.key for c in dry.plan.changes]
    assert "service -t 10.0.1.175:80" in keys
    assert not [key for key in keys if key.startswith("sysctl ")], keys
    setup.net.sysctls[CONNTRACK] = "0"
    drift = setup.verify(hostnames(*THREE))
    assert [(c.key, c.after) for c in drift.changes] == [
        (f"sysctl {CONNTRACK}", (f"{CONNTRACK}=1",))
    ]
    assert setup.steps_of(lambda: setup.apply(hostnames(*THREE))) == [f"sysctl -w {CONNTRACK}=1"]
    assert setup.steps_of(setup.delete)[-1] == "ip link del lbc-ipvs0"
    assert setup.net.sysctls[CONNTRACK] == "1"


def test_no_parameter_is_written_where_the_kernel_has_none_and_none_is_wanted(
    setup: Setup,
) -> None:
    """A state read before ip_vs was loaded names its parameters empty: planning back to
    it (a rollback) writes none of them."""
    setup.net.sysctls.clear()
    kernel = setup.kernel()
    state = kernel.snapshot()
    assert state.shared and not kernel.steps(state, state).steps


def test_a_change_to_a_service_leaves_its_draining_server_alone(setup: Setup) -> None:
    setup.apply(hostnames(*THREE))
    setup.net.set_active("10.244.3.6", 9376, 2)
    setup.apply(TWO)
    draining = setup.net.dest("10.244.3.6", 9376)
    setup.clock.now += 10
    steps = setup.steps_of(lambda: setup.apply(hostnames(("10.244.1.7", 2), ("10.244.2.3", 1))))
    assert steps and not [s for s in steps if "10.244.3.6" in s], steps
    assert setup.net.dest("10.244.3.6", 9376) == draining


def test_a_failure_after_a_drain_gives_the_server_its_weight_back(tmp_path: Path) -> None:
    def started() -> Setup:
        setup = Setup(tmp_path)
        setup.apply(hostnames(*THREE, extra=NODE_PORT))
        setup.net.set_active("10.244.3.6", 9376, 2)
        return setup

    probe = started()
    steps = probe.steps_of(lambda: probe.apply(TWO))
    drain = next(i for i, s in enumerate(steps) if "10.244.3.6" in s and "-w 0" in s)
    assert drain < len(steps) - 1, steps
    for n in range(drain + 2, len(steps) + 1):
        setup = started()
        before, done = setup.net.records(), len(setup.net.performed)
        setup.net.fail_at = done + n
        with pytest.raises(ApplyError, match="injected failure"):
            setup.apply(TWO)
        assert setup.net.records() == before
        assert setup.net.dest("10.244.3.6", 9376).weight == 1
