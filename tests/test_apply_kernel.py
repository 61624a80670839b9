"""`lbc apply` on this machine's kernel, in network namespaces: the issue's proofs.

The seed demo through apply; live updates under load with zero failed requests;
atomicity (a transaction failing at its last step changes nothing); ownership (rules
of other tools survive apply, re-apply and delete untouched); re-apply is a no-op;
drift is detected and repaired.
"""

from __future__ import annotations

import re
import subprocess
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
from click.testing import CliRunner

import lbc
from bench.gen import generate
from lbc.apply import Plan, State
from lbc.backends.base import Artifact
from lbc.backends.iptables.kernel import LIST_FIRST_FROM, IptablesKernel, run_command
from lbc.backends.nftables import generation
from lbc.backends.nftables.kernel import NftablesKernel
from lbc.cli import main
from tests import netns

pytestmark = pytest.mark.netns

ROOT = Path(__file__).resolve().parent.parent
HOSTNAMES = ROOT / "examples" / "hostnames.toml"
VIP = "10.0.1.175"
# Five pods, so that updates can scale a service 3 -> 5 -> 2 endpoints.
PODS = {
    "hostnames-0uton": "10.244.3.6",
    "hostnames-yp2kp": "10.244.1.7",
    "hostnames-bvc05": "10.244.2.3",
    "hostnames-q8r4w": "10.244.4.8",
    "hostnames-z2m7k": "10.244.5.9",
}
TOOLS = ("iptables", "iptables-save", "iptables-restore", "ip6tables-save", "nft")
BACKENDS = ("iptables", "nftables")


@dataclass
class Counting:
    """Wraps a kernel adapter and counts commits (kernel writes)."""

    inner: IptablesKernel | NftablesKernel
    commits: int = 0

    def snapshot(self) -> State:
        return self.inner.snapshot()

    def desired(self, artifact: Artifact) -> State:
        return self.inner.desired(artifact)

    def commit(self, live: State, desired: State, plan: Plan) -> None:
        self.commits += 1
        self.inner.commit(live, desired, plan)


@pytest.fixture(scope="module")
def seed() -> Iterator[netns.Seed]:
    netns.require(*TOOLS)
    with netns.seed_topology(pods=PODS, pods6={}) as topology:
        yield topology


@pytest.fixture
def node(seed: netns.Seed, tmp_path: Path) -> Iterator[netns.Netns]:
    """The seed's node namespace, with lbc's objects removed again after each test."""
    yield seed.node
    for backend in BACKENDS:
        lbc.delete(backend, netns=seed.node.name, lock_path=tmp_path / "lock")
    assert "LBC-" not in seed.node.exec("iptables-save")
    assert "inet lbc" not in seed.node.exec("nft", "list", "tables")


def kernel_of(backend: str, ns: netns.Netns) -> IptablesKernel | NftablesKernel:
    return IptablesKernel(ns.name) if backend == "iptables" else NftablesKernel(ns.name)


def nft_ruleset(ns: netns.Netns) -> str:
    """`nft list ruleset` of the namespace: every table, iptables-nft's included."""
    return ns.exec("nft", "list", "ruleset")


def config(endpoints: Sequence[tuple[str, int]], extra: int = 0) -> lbc.Cluster:
    """hostnames with these (address, weight) endpoints, plus `extra` more services."""
    lines = [
        '[node]\nname = "node-1"\naddresses = ["192.168.49.2"]\npod_cidrs = ["10.244.0.0/16"]\n',
    ]
    for i in range(extra + 1):
        name, vip = ("hostnames", VIP) if i == 0 else (f"extra-{i}", f"10.0.3.{i}")
        eps = ", ".join(f'{{ ip = "{a}", weight = {w} }}' for a, w in endpoints)
        lines.append(
            f'[[services]]\nname = "{name}"\ncluster_ips = ["{vip}"]\n'
            f'ports = [{{ name = "default", port = 80, target_port = 9376 }}]\n'
            f"endpoints = [{eps}]\n"
        )
    return lbc.loads("\n".join(lines))


def foreign_rules(ns: netns.Netns) -> list[str]:
    """Everything in the namespace's iptables that is not lbc's (counters and comments cut)."""
    out = []
    for save in ("iptables-save", "ip6tables-save"):
        for line in ns.exec(save).splitlines():
            if line.startswith("#") or "LBC-" in line:
                continue
            out.append(re.sub(r"\[\d+:\d+\]", "[0:0]", line))
    return out


def all_rules(ns: netns.Netns) -> list[str]:
    """The whole iptables state of the namespace, without counters and comments."""
    return [
        re.sub(r"\[\d+:\d+\]", "[0:0]", line)
        for save in ("iptables-save", "ip6tables-save")
        for line in ns.exec(save).splitlines()
        if not line.startswith("#")
    ]


@pytest.mark.parametrize("backend", BACKENDS)
def test_seed_demo_through_apply(
    backend: str, seed: netns.Seed, node: netns.Netns, tmp_path: Path
) -> None:
    result = lbc.apply(lbc.load(HOSTNAMES), backend, netns=node.name, lock_path=tmp_path / "l")
    assert result.applied and result.plan.counts()["add"] > 0
    print(f"  {result.summary()}")
    assert lbc.verify(lbc.load(HOSTNAMES), backend, netns=node.name).in_sync
    replies = seed.client.request(VIP, 80, count=150).names
    print(f"  150 requests: {dict(replies)}")
    assert set(replies) == {"hostnames-0uton", "hostnames-yp2kp", "hostnames-bvc05"}
    assert sum(replies.values()) == 150


@pytest.mark.parametrize("backend", BACKENDS)
def test_reapply_is_a_no_op_without_kernel_writes(
    backend: str, node: netns.Netns, tmp_path: Path
) -> None:
    kernel = Counting(kernel_of(backend, node))
    lock = tmp_path / "lock"
    lbc.apply(lbc.load(HOSTNAMES), backend, kernel=kernel, lock_path=lock)
    assert kernel.commits == 1
    before = (all_rules(node), nft_ruleset(node))
    again = lbc.apply(lbc.load(HOSTNAMES), backend, kernel=kernel, lock_path=lock)
    assert again.plan.in_sync and not again.applied and kernel.commits == 1
    assert (all_rules(node), nft_ruleset(node)) == before
    jumps = [line for line in before[0] if line.startswith("-A PREROUTING")]
    assert len(jumps) == (backend == "iptables"), "re-applies must never duplicate jumps"


def test_iptables_rules_of_other_tools_survive_apply_reapply_and_delete(
    node: netns.Netns, tmp_path: Path
) -> None:
    node.exec("iptables", "-t", "nat", "-N", "OTHER-NAT")
    node.exec(
        "iptables", "-t", "nat", "-A", "OTHER-NAT", "-p", "tcp", "--dport", "8080", "-j", "RETURN"
    )
    node.exec("iptables", "-t", "nat", "-A", "PREROUTING", "-j", "OTHER-NAT")
    node.exec(
        "iptables", "-t", "filter", "-A", "INPUT", "-p", "tcp", "--dport", "22", "-j", "ACCEPT"
    )
    node.exec("ip6tables", "-t", "filter", "-A", "FORWARD", "-p", "udp", "-j", "ACCEPT")
    try:
        theirs = foreign_rules(node)
        assert any("OTHER-NAT" in line for line in theirs)
        lock = tmp_path / "lock"
        lbc.apply(lbc.load(HOSTNAMES), "iptables", netns=node.name, lock_path=lock)
        assert foreign_rules(node) == theirs
        lbc.apply(config([("10.244.1.7", 1)], extra=2), "iptables", netns=node.name, lock_path=lock)
        assert foreign_rules(node) == theirs
        lbc.delete("iptables", netns=node.name, lock_path=lock)
        assert foreign_rules(node) == theirs
        assert all_rules(node) == theirs, "delete left lbc objects behind"
    finally:
        node.exec("iptables", "-t", "nat", "-D", "PREROUTING", "-j", "OTHER-NAT")
        node.exec("iptables", "-t", "nat", "-F", "OTHER-NAT")
        node.exec("iptables", "-t", "nat", "-X", "OTHER-NAT")
        node.exec(
            "iptables", "-t", "filter", "-D", "INPUT", "-p", "tcp", "--dport", "22", "-j", "ACCEPT"
        )
        node.exec("ip6tables", "-t", "filter", "-D", "FORWARD", "-p", "udp", "-j", "ACCEPT")


def test_iptables_another_tools_rule_that_is_not_utf8_is_no_traceback(
    node: netns.Netns, tmp_path: Path
) -> None:
    """iptables-save prints a comment's bytes as they are: another tool's Latin-1
    comment must not stop lbc reading its own rules (a UnicodeDecodeError traceback)."""
    rule = ["INPUT", "-p", "tcp", "--dport", "2222", "-m", "comment"]
    latin1 = "caf\udce9"  # the bytes b"caf\xe9" on the command line (os.fsencode)
    node.exec("iptables", "-A", *rule, "--comment", latin1, "-j", "ACCEPT")
    try:
        lock = tmp_path / "lock"
        assert lbc.apply(lbc.load(HOSTNAMES), "iptables", netns=node.name, lock_path=lock).applied
        assert lbc.verify(lbc.load(HOSTNAMES), "iptables", netns=node.name).in_sync
        verify = CliRunner().invoke(main, ["verify", str(HOSTNAMES), "--netns", node.name])
        assert verify.exit_code == 0, verify.output
        assert lbc.delete("iptables", netns=node.name, lock_path=lock).applied
        saved = subprocess.run(
            ["ip", "netns", "exec", node.name, "iptables-save"], capture_output=True, check=True
        ).stdout
        assert b'--comment "caf\xe9" -j ACCEPT' in saved, "the other tool's rule is intact"
    finally:
        node.exec("iptables", "-D", *rule, "--comment", latin1, "-j", "ACCEPT")


def _failing_last(command: str) -> Callable[[Sequence[str], str | None], str]:
    """A runner whose first `command` restore gets one invalid rule appended before its
    last COMMIT: the document's earlier tables commit, its last one fails."""
    failed = []

    def run(argv: Sequence[str], stdin: str | None = None) -> str:
        if stdin and command in argv and not failed:
            failed.append(argv)
            head, _, _ = stdin.rstrip("\n").rpartition("COMMIT")
            stdin = head + "-A LBC-SERVICES -j LBC-DOES-NOT-EXIST\nCOMMIT\n"
        return run_command(argv, stdin)

    return run


def test_iptables_transaction_failing_at_its_last_step_changes_nothing(
    node: netns.Netns, tmp_path: Path
) -> None:
    lock = tmp_path / "lock"
    lbc.apply(lbc.load(HOSTNAMES), "iptables", netns=node.name, lock_path=lock)
    before = all_rules(node)
    broken = IptablesKernel(node.name, runner=_failing_last("iptables-restore"))
    with pytest.raises(lbc.ApplyError, match="LBC-DOES-NOT-EXIST"):
        lbc.apply(
            config([("10.244.4.8", 2), ("10.244.5.9", 1)], extra=3),
            "iptables",
            kernel=broken,
            lock_path=lock,
        )
    assert all_rules(node) == before


def test_iptables_late_failure_is_rolled_back(node: netns.Netns, tmp_path: Path) -> None:
    """The restore's first table commits but its second fails (iptables-nft commits
    each table on its own): the old rules are written back."""
    lock = tmp_path / "lock"
    empty_first = IptablesKernel(node.name)
    # No endpoints yet: a REJECT in the filter table, which hostnames' endpoints remove.
    lbc.apply(config([]), "iptables", kernel=empty_first, lock_path=lock)
    node.exec(
        "iptables",
        "-t",
        "nat",
        "-D",
        "PREROUTING",
        "-m",
        "comment",
        "--comment",
        "lbc service portals",
        "-j",
        "LBC-SERVICES",
    )
    before = all_rules(node)

    failed = []

    def run(argv: Sequence[str], stdin: str | None = None) -> str:
        if "iptables-restore" in argv and stdin and not failed:
            first_table = stdin[: stdin.index("COMMIT\n") + len("COMMIT\n")]
            assert "\nCOMMIT\n*" in stdin, "a document of two tables"
            run_command(argv, first_table)
            failed.append(stdin)
            raise lbc.ApplyError("injected: the second table's transaction failed")
        return run_command(argv, stdin)

    with pytest.raises(lbc.ApplyError, match="previous rules were restored"):
        lbc.apply(
            lbc.load(HOSTNAMES), "iptables", kernel=IptablesKernel(node.name, run), lock_path=lock
        )
    assert failed and all_rules(node) == before


def test_iptables_large_first_apply_into_an_empty_namespace_inserts_its_jumps(
    tmp_path: Path,
) -> None:
    """From LIST_FIRST_FROM chains a table's restore starts with `-S`, after which
    iptables-nft cannot insert into a built-in chain the kernel does not have yet: the
    jumps of a large first apply into an empty namespace must still land."""
    netns.require(*TOOLS)
    cluster = lbc.loads(generate(800, 2, seed=4)[0])
    with netns.Lab() as lab:
        ns = lab.namespace("node")
        result = lbc.apply(cluster, "iptables", netns=ns.name, lock_path=tmp_path / "lock")
        assert result.applied
        nat = ns.exec("iptables-save", "-t", "nat")
        assert nat.count("\n:LBC-") >= LIST_FIRST_FROM
        for hook in ("PREROUTING", "OUTPUT"):
            assert re.search(rf"^-A {hook} .*-j LBC-SERVICES$", nat, re.M), hook
        assert re.search(r"^-A POSTROUTING .*-j LBC-POSTROUTING$", nat, re.M)
        assert lbc.verify(cluster, "iptables", netns=ns.name).in_sync


def test_iptables_drift_is_shown_and_repaired(node: netns.Netns, tmp_path: Path) -> None:
    lock = tmp_path / "lock"
    lbc.apply(lbc.load(HOSTNAMES), "iptables", netns=node.name, lock_path=lock)
    svc = next(c for c in re.findall(r":(LBC-SVC-\w+)", node.exec("iptables-save", "-t", "nat")))
    node.exec("iptables", "-t", "nat", "-F", svc)
    result = CliRunner().invoke(main, ["verify", str(HOSTNAMES), "--netns", node.name])
    assert result.exit_code == 1, result.output
    assert f"~ change ipv4 nat {svc}" in result.output
    assert "drift detected" in result.output
    fixed = lbc.apply(lbc.load(HOSTNAMES), "iptables", netns=node.name, lock_path=lock)
    assert fixed.plan.counts() == {"add": 0, "change": 1, "remove": 0}
    assert lbc.verify(lbc.load(HOSTNAMES), "iptables", netns=node.name).in_sync


def test_iptables_plan_command_exit_codes(node: netns.Netns, tmp_path: Path) -> None:
    pending = CliRunner().invoke(main, ["plan", str(HOSTNAMES), "--netns", node.name])
    assert pending.exit_code == 1 and "+ add ipv4 nat LBC-SERVICES" in pending.output
    as_json = CliRunner().invoke(main, ["plan", str(HOSTNAMES), "--netns", node.name, "-f", "json"])
    assert '"in_sync": false' in as_json.output
    lbc.apply(lbc.load(HOSTNAMES), "iptables", netns=node.name, lock_path=tmp_path / "lock")
    synced = CliRunner().invoke(main, ["plan", str(HOSTNAMES), "--netns", node.name])
    assert synced.exit_code == 0 and "in sync" in synced.output


@pytest.mark.parametrize("backend", BACKENDS)
def test_live_updates_under_load_fail_no_request(
    backend: str, seed: netns.Seed, node: netns.Netns, tmp_path: Path
) -> None:
    """20 successive configs while a client connects back to back: zero failures."""
    lock = tmp_path / "lock"
    pods = list(PODS.values())
    sizes = [3, 5, 2, 4, 1, 5, 3, 2, 5, 1, 4, 3, 5, 2, 1, 3, 4, 5, 2, 3]
    configs = [
        config(
            [(a, 1 + (i + j) % 3) for j, a in enumerate(pods[i % 5 :] + pods[: i % 5])][:size],
            extra=i % 4,
        )
        for i, size in enumerate(sizes)
    ]
    lbc.apply(configs[0], backend, netns=node.name, lock_path=lock)
    load = seed.lab.load(seed.client, VIP, 80, seconds=60)
    applied = 0
    for cfg in configs[1:]:
        applied += lbc.apply(cfg, backend, netns=node.name, lock_path=lock).applied
        seed.client.request(VIP, 80, count=5)  # let some load pass between updates
    results = load.stop()
    total = sum(results.names.values()) + sum(results.errors.values())
    print(
        f"  {backend}: {applied} applies, {total} requests: {dict(results.names)}, "
        f"errors {dict(results.errors)}"
    )
    assert applied == 19
    assert total > 100
    assert results.errors == Counter()
    assert set(results.names) == set(PODS)


# --- nftables ---------------------------------------------------------------------------
FOREIGN_NFT = """table ip other {
	chain prerouting {
		type nat hook prerouting priority dstnat - 5; policy accept;
		tcp dport 8080 counter return
	}
}
table inet filterish {
	set blocked {
		type ipv4_addr
		elements = { 198.18.0.99 }
	}
	chain input {
		type filter hook input priority filter; policy accept;
		ip saddr @blocked drop
	}
}
"""


def foreign_tables(ns: netns.Netns) -> str:
    """`nft list ruleset` without table inet lbc (counters zeroed)."""
    out, skip = [], False
    for line in nft_ruleset(ns).splitlines():
        if line.startswith("table inet lbc "):
            skip = True
        elif skip and line == "}":
            skip = False
            continue
        if not skip:
            out.append(re.sub(r"counter packets \d+ bytes \d+", "counter", line))
    return "\n".join(out)


class Recording:
    """A libnftables runner that keeps every script it sends; `fail` appends a bad command."""

    def __init__(self, ns: netns.Netns, fail: bool = False) -> None:
        self.kernel = NftablesKernel(ns.name)
        self.inner = self.kernel.runner
        self.kernel.runner = self.run
        self.scripts: list[str] = []
        self.fail = fail

    def run(self, script: str) -> str:
        if self.fail and not script.startswith("list"):
            script += "add rule inet lbc services goto chain-that-does-not-exist\n"
        if not script.startswith("list"):
            self.scripts.append(script)
        return self.inner(script)


def test_nftables_tables_of_other_tools_survive_apply_reapply_and_delete(
    node: netns.Netns, tmp_path: Path
) -> None:
    node.exec("nft", "-f", "-", input=FOREIGN_NFT)
    try:
        theirs = foreign_tables(node)
        assert "table inet filterish" in theirs
        lock = tmp_path / "lock"
        lbc.apply(lbc.load(HOSTNAMES), "nftables", netns=node.name, lock_path=lock)
        assert "table inet lbc" in nft_ruleset(node)
        assert foreign_tables(node) == theirs
        lbc.apply(config([("10.244.1.7", 1)], extra=2), "nftables", netns=node.name, lock_path=lock)
        assert foreign_tables(node) == theirs
        lbc.delete("nftables", netns=node.name, lock_path=lock)
        assert foreign_tables(node) == theirs
        assert "table inet lbc" not in nft_ruleset(node)
    finally:
        node.exec("nft", "delete", "table", "ip", "other")
        node.exec("nft", "delete", "table", "inet", "filterish")


def test_nftables_transaction_failing_at_its_last_step_changes_nothing(
    node: netns.Netns, tmp_path: Path
) -> None:
    lock = tmp_path / "lock"
    lbc.apply(lbc.load(HOSTNAMES), "nftables", netns=node.name, lock_path=lock)
    before = nft_ruleset(node)
    broken = Recording(node, fail=True)
    with pytest.raises(lbc.ApplyError, match=r"chain-that-does-not-exist|No such file"):
        lbc.apply(
            config([("10.244.4.8", 2), ("10.244.5.9", 1)], extra=3),
            "nftables",
            kernel=broken.kernel,
            lock_path=lock,
        )
    assert broken.scripts, "nothing was sent"
    assert nft_ruleset(node) == before


def test_nftables_sends_only_what_changed(node: netns.Netns, tmp_path: Path) -> None:
    lock = tmp_path / "lock"
    many = [("10.244.1.7", 1), ("10.244.2.3", 1)]
    recorder = Recording(node)
    lbc.apply(config(many, extra=30), "nftables", kernel=recorder.kernel, lock_path=lock)
    assert "delete table inet lbc" in recorder.scripts[-1], "the first apply loads the table"
    grown = config([*many, ("10.244.3.6", 1)], extra=30)
    result = lbc.apply(grown, "nftables", kernel=recorder.kernel, lock_path=lock)
    script = recorder.scripts[-1]
    print(
        f"  one endpoint more on 31 services: {result.plan.summary()}, "
        f"{len(script.splitlines())} commands"
    )
    assert "delete table" not in script
    assert len(script.splitlines()) < 31 * 12, "only the changed chains are rewritten"
    assert lbc.verify(grown, "nftables", netns=node.name).in_sync
    shrunk = config(many, extra=1)
    lbc.apply(shrunk, "nftables", kernel=recorder.kernel, lock_path=lock)
    assert "delete chain" in recorder.scripts[-1]
    assert lbc.verify(shrunk, "nftables", netns=node.name).in_sync


def test_nftables_drift_is_shown_and_repaired(node: netns.Netns, tmp_path: Path) -> None:
    lock = tmp_path / "lock"
    lbc.apply(lbc.load(HOSTNAMES), "nftables", netns=node.name, lock_path=lock)
    node.exec(
        "nft", "delete", "element", "inet", "lbc", "service-ips4", "{ 10.0.1.175 . tcp . 80 }"
    )
    result = CliRunner().invoke(
        main, ["verify", str(HOSTNAMES), "--netns", node.name, "-b", "nftables"]
    )
    assert result.exit_code == 1, result.output
    assert "~ change map service-ips4" in result.output
    fixed = lbc.apply(lbc.load(HOSTNAMES), "nftables", netns=node.name, lock_path=lock)
    assert fixed.plan.counts() == {"add": 0, "change": 1, "remove": 0}
    assert lbc.verify(lbc.load(HOSTNAMES), "nftables", netns=node.name).in_sync


def test_nftables_objects_another_writer_added_to_lbcs_table_are_drift(
    node: netns.Netns, tmp_path: Path
) -> None:
    """A counter, a quota and a conntrack helper someone added inside `inet lbc`: lbc
    makes no such objects, so `verify` names each one and `apply` removes them, in a
    session as in a one-shot apply (the table is lbc's; other tables are not)."""
    lock = tmp_path / "lock"
    session = lbc.Session("nftables", netns=node.name, lock_path=lock)
    session.apply(lbc.load(HOSTNAMES))
    node.exec("nft", "add", "table", "inet", "someone-else")
    node.exec("nft", "add", "counter", "inet", "someone-else", "kept")
    script = (
        "add counter inet lbc seen\n"
        "add quota inet lbc budget { 25 mbytes }\n"
        'add ct helper inet lbc ftp-21 { type "ftp" protocol tcp; }\n'
    )
    node.exec("nft", "-f", "/dev/stdin", input=script)
    result = CliRunner().invoke(
        main, ["verify", str(HOSTNAMES), "--netns", node.name, "-b", "nftables"]
    )
    assert result.exit_code == 1, result.output
    for key in ("counter seen", "quota budget", "ct helper ftp-21"):
        assert f"- remove {key}" in result.output
    fixed = session.apply(lbc.load(HOSTNAMES))
    assert fixed.plan.counts() == {"add": 0, "change": 0, "remove": 3}
    listed = node.exec("nft", "list", "table", "inet", "lbc")
    assert not re.search(r"counter seen|quota budget|ct helper", listed), listed
    assert lbc.verify(lbc.load(HOSTNAMES), "nftables", netns=node.name).in_sync
    assert "counter kept" in node.exec("nft", "list", "table", "inet", "someone-else")
    # A one-shot apply removes them the same way.
    node.exec("nft", "add", "counter", "inet", "lbc", "again")
    again = lbc.apply(lbc.load(HOSTNAMES), "nftables", netns=node.name, lock_path=lock)
    assert [(c.key, c.action.value) for c in again.plan.changes] == [("counter again", "remove")]
    assert "counter again" not in node.exec("nft", "list", "table", "inet", "lbc")
    node.exec("nft", "delete", "table", "inet", "someone-else")


def test_full_resync_rewrites_everything(node: netns.Netns, tmp_path: Path) -> None:
    lock = tmp_path / "lock"
    recorder = Recording(node)
    lbc.apply(lbc.load(HOSTNAMES), "nftables", kernel=recorder.kernel, lock_path=lock)
    lbc.apply(config([("10.244.1.7", 1)]), "nftables", kernel=recorder.kernel, lock_path=lock)
    assert "delete table" not in recorder.scripts[-1]
    full = lbc.apply(
        config([("10.244.1.7", 1)]), "nftables", kernel=recorder.kernel, lock_path=lock, full=True
    )
    assert full.applied and "delete table inet lbc" in recorder.scripts[-1]
    assert lbc.verify(config([("10.244.1.7", 1)]), "nftables", netns=node.name).in_sync

    documents: list[str] = []

    def run(argv: Sequence[str], stdin: str | None = None) -> str:
        if stdin:
            documents.append(stdin)
        return run_command(argv, stdin)

    kernel = IptablesKernel(node.name, run)
    lbc.apply(lbc.load(HOSTNAMES), "iptables", kernel=kernel, lock_path=lock)
    documents.clear()
    lbc.apply(lbc.load(HOSTNAMES), "iptables", kernel=kernel, lock_path=lock, full=True)
    rewritten = {line for doc in documents for line in doc.splitlines() if line.startswith(":")}
    assert {":LBC-SERVICES - [0:0]", ":LBC-POSTROUTING - [0:0]"} <= rewritten
    assert lbc.verify(lbc.load(HOSTNAMES), "iptables", netns=node.name).in_sync


def test_apply_command_prints_its_phases(node: netns.Netns, tmp_path: Path) -> None:
    result = CliRunner().invoke(
        main,
        [
            "apply",
            str(HOSTNAMES),
            "--netns",
            node.name,
            "-b",
            "nftables",
            "--progress",
            "--lock-file",
            str(tmp_path / "lock"),
        ],
    )
    assert result.exit_code == 0, result.output
    phases = [line for line in result.stderr.splitlines() if line.startswith("lbc: ")]
    # nftables verifies by generation: nothing else wrote, so no read-back.
    assert [line.split()[2] for line in phases] == [
        "waiting",
        "reading",
        "committing:",
        "verified:",
    ]
    assert "nftables: applied:" in result.stdout


def test_localhost_node_ports_work_after_apply(
    seed: netns.Seed, node: netns.Netns, tmp_path: Path
) -> None:
    """`localhost_node_ports`: apply turns route_localnet on, and 127.0.0.1:NODEPORT
    from the node reaches the pods, masqueraded."""
    node.sysctl("net.ipv4.conf.all.route_localnet", 0)
    cluster = lbc.loads(
        '[node]\nname = "node-1"\naddresses = ["192.168.49.2"]\npod_cidrs = ["10.244.0.0/16"]\n'
        "localhost_node_ports = true\n"
        '[[services]]\nname = "hostnames"\ntype = "NodePort"\ncluster_ips = ["10.0.1.175"]\n'
        'ports = [{ name = "default", port = 80, target_port = 9376, node_port = 30090 }]\n'
        'endpoints = [{ ip = "10.244.1.7" }, { ip = "10.244.2.3" }]\n'
    )
    try:
        lbc.apply(cluster, "iptables", netns=node.name, lock_path=tmp_path / "lock")
        assert node.exec("sysctl", "-n", "net.ipv4.conf.all.route_localnet").strip() == "1"
        result = node.request("127.0.0.1", 30090, count=30, source="127.0.0.1")
        print(f"  127.0.0.1:30090 from the node: {dict(result.sources)}")
        assert not result.errors, result
        assert {name for name, _ in result.sources} == {"hostnames-yp2kp", "hostnames-bvc05"}
        assert all(not source.startswith("127.") for _, source in result.sources)
    finally:
        node.sysctl("net.ipv4.conf.all.route_localnet", 0)


# --- sessions (node agents) --------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
def test_session_changes_leave_the_whole_ruleset_in_the_kernel(
    seed: netns.Seed, node: netns.Netns, tmp_path: Path, backend: str
) -> None:
    """A session's incremental transactions, verified by generation only, leave exactly
    the rules a full read-back expects, and traffic follows each change."""
    session = lbc.Session(backend, netns=node.name, lock_path=tmp_path / "lock")
    pods = list(PODS.values())
    for i, size in enumerate([3, 5, 1, 4, 2]):
        endpoints = [(a, 1) for a in pods[i:] + pods[:i]][:size]
        cluster = config(endpoints, extra=6 - i)
        result = session.apply(cluster)
        assert result.applied and result.read == (i == 0), "only the first apply reads"
        assert lbc.verify(cluster, backend, netns=node.name).in_sync
        answered = set(seed.client.request(VIP, 80, count=60).names)
        by_address = {address: name for name, address in PODS.items()}
        assert answered == {by_address[a] for a, _ in endpoints}


@contextmanager
def another_tools_table(ns: netns.Netns) -> Iterator[None]:
    """Another tool's nft table (`ip another-tool`) for the block: each commit of it moves
    the generation without touching lbc's objects."""
    ns.exec("nft", "add", "table", "ip", "another-tool")
    try:
        yield
    finally:
        ns.exec("nft", "delete", "table", "ip", "another-tool")


def test_nftables_session_reads_again_after_another_writer(
    node: netns.Netns, tmp_path: Path
) -> None:
    session = lbc.Session("nftables", netns=node.name, lock_path=tmp_path / "lock")
    cluster = config([("10.244.1.7", 1), ("10.244.2.3", 1)], extra=3)
    session.apply(cluster)
    with another_tools_table(node):
        # A new generation, but the session saw the transaction leave lbc's table alone.
        untouched = session.apply(cluster)
        assert not untouched.read and untouched.plan.in_sync
        node.exec("nft", "flush", "chain", "inet", "lbc", "services")
        repaired = session.apply(cluster)
        assert repaired.read and [c.key for c in repaired.plan.changes] == ["chain services"]
        assert lbc.verify(cluster, "nftables", netns=node.name).in_sync
        assert "table ip another-tool" in node.exec("nft", "list", "tables")


class ThenAnotherWriter(NftablesKernel):
    """Commits, then runs `script` with nft as another writer would, before the engine
    reads the generation to verify the commit."""

    def __init__(self, ns: netns.Netns, script: str) -> None:
        super().__init__(ns.name)
        self.ns, self.script = ns, script

    def commit(self, live: State, desired: State, plan: Plan) -> None:
        super().commit(live, desired, plan)
        if self.script:
            self.ns.exec("nft", "-f", "-", input=self.script)


def test_nftables_session_skips_reads_for_other_writers_that_leave_lbc_alone(
    node: netns.Netns, tmp_path: Path
) -> None:
    """A session follows the namespace's commits: transactions of other tools, before
    an apply or between its commit and its check, cost no read of lbc's table; one
    that touches the table does, and is repaired."""
    kernel = ThenAnotherWriter(node, "")
    steps: list[str] = []
    session = lbc.Session(
        "nftables", kernel=kernel, lock_path=tmp_path / "lock", progress=steps.append
    )
    first = config([("10.244.1.7", 1)], extra=3)
    second = config([("10.244.1.7", 1), ("10.244.2.3", 1)], extra=3)
    try:
        session.apply(first)
        node.exec(
            "nft", "-f", "-", input="add table ip another-tool\nadd chain ip another-tool c\n"
        )
        kernel.script = "add rule ip another-tool c counter\n"  # after the next commit
        steps.clear()
        changed = session.apply(second)
        assert not changed.read, steps
        assert not any(s.startswith("reading") for s in steps), steps
        assert "verified: the other changes to the ruleset left lbc's alone" in steps
        assert lbc.verify(second, "nftables", netns=node.name).in_sync

        kernel.script = "add counter inet lbc someone-elses\n"  # touches lbc's table
        steps.clear()
        with pytest.raises(lbc.ApplyError, match="rolled back"):
            session.apply(first)
        assert "reading back to verify" in steps
        kernel.script = ""
        repaired = session.apply(first)
        assert repaired.read
        assert lbc.verify(first, "nftables", netns=node.name).in_sync
    finally:
        node.exec("nft", "delete", "table", "ip", "another-tool")


def test_iptables_session_skips_reads_for_other_writers_that_leave_lbc_alone(
    node: netns.Netns, tmp_path: Path
) -> None:
    """iptables-nft shares its tables with other tools: a session following the
    commits tells another tool's chain in the nat table (and another nft table) from
    lbc's chains and the built-in chains that hold lbc's jumps."""
    steps: list[str] = []
    session = lbc.Session(
        "iptables", netns=node.name, lock_path=tmp_path / "lock", progress=steps.append
    )
    first = config([("10.244.1.7", 1)], extra=3)
    second = config([("10.244.1.7", 1), ("10.244.2.3", 1)], extra=3)
    try:
        session.apply(first)
        node.exec("iptables", "-t", "nat", "-N", "ANOTHER-TOOL")
        node.exec("iptables", "-t", "nat", "-A", "ANOTHER-TOOL", "-j", "RETURN")
        node.exec("nft", "add", "table", "ip", "another-tool")
        steps.clear()
        changed = session.apply(second)
        assert not changed.read, steps
        assert not any(s.startswith("reading") for s in steps), steps
        assert lbc.verify(second, "iptables", netns=node.name).in_sync

        # A rule in a built-in chain, where lbc's jumps are: read, and nothing to do.
        node.exec("iptables", "-t", "nat", "-A", "PREROUTING", "-m", "comment", "--comment", "x")
        touched = session.apply(second)
        assert touched.read and touched.plan.in_sync
        node.exec("iptables", "-t", "nat", "-F", "LBC-SERVICES")
        repaired = session.apply(first)
        assert repaired.read
        assert lbc.verify(first, "iptables", netns=node.name).in_sync
    finally:
        node.exec("iptables", "-t", "nat", "-F", "ANOTHER-TOOL")
        node.exec("iptables", "-t", "nat", "-X", "ANOTHER-TOOL")
        comment = ["-m", "comment", "--comment", "x"]
        node.exec("iptables", "-t", "nat", "-D", "PREROUTING", *comment, check=False)
        node.exec("nft", "delete", "table", "ip", "another-tool")


def test_nftables_session_reads_when_commit_announcements_were_dropped(
    node: netns.Netns, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A queue too small for another writer's transaction: the kernel drops
    announcements, and the session can vouch for nothing, so it reads; it follows
    again from then on."""
    monkeypatch.setattr(generation, "MONITOR_BUFFER", 4096)
    session = lbc.Session("nftables", netns=node.name, lock_path=tmp_path / "lock")
    cluster = config([("10.244.1.7", 1)], extra=3)
    session.apply(cluster)
    elements = ", ".join(f"10.1.{i // 250}.{i % 250}" for i in range(2000))
    script = (
        "add table ip another-tool\n"
        f"add set ip another-tool s {{ type ipv4_addr; elements = {{ {elements} }}; }}\n"
    )
    try:
        node.exec("nft", "-f", "-", input=script)
        flooded = session.apply(cluster)
        assert flooded.read and flooded.plan.in_sync
        node.exec("nft", "add", "chain", "ip", "another-tool", "c")
        calm = session.apply(cluster)
        assert not calm.read and calm.plan.in_sync
    finally:
        node.exec("nft", "delete", "table", "ip", "another-tool")


def test_nftables_session_that_listens_between_applies_keeps_up_with_a_burst(
    node: netns.Netns, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`Session.listen` (which `lbc watch` calls at every look at its file) reads the
    announcements as they come, so a burst of another writer's commits that a small
    queue could not hold until the next apply costs that apply no read."""
    monkeypatch.setattr(generation, "MONITOR_BUFFER", 16384)
    session = lbc.Session("nftables", netns=node.name, lock_path=tmp_path / "lock")
    cluster = config([("10.244.1.7", 1)], extra=3)
    session.apply(cluster)
    with another_tools_table(node):
        for i in range(40):
            node.exec("nft", "add", "chain", "ip", "another-tool", f"heard-{i}")
            session.listen()
        heard = session.apply(cluster)
        assert not heard.read and heard.plan.in_sync
        for i in range(40):  # the same burst, not listened to before the apply
            node.exec("nft", "add", "chain", "ip", "another-tool", f"unheard-{i}")
        unheard = session.apply(cluster)
        assert unheard.read and unheard.plan.in_sync


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_sessions_own_large_change_costs_the_next_apply_no_read(
    backend: str, node: netns.Netns, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A large change of the session's own (hundreds of services: more announcements
    than a small queue holds) does not leave it unable to vouch for the next commits:
    another tool's commit after it still costs no read."""
    monkeypatch.setattr(generation, "MONITOR_BUFFER", 16384)
    session = lbc.Session(backend, netns=node.name, lock_path=tmp_path / "lock")
    session.apply(config([("10.244.1.7", 1)], extra=3))
    large = config([("10.244.1.7", 1), ("10.244.2.3", 1)], extra=250)
    session.apply(large)
    with another_tools_table(node):
        after = session.apply(large)
        assert not after.read and after.plan.in_sync


def test_one_shot_applies_remember_the_ruleset_between_runs(
    node: netns.Netns, tmp_path: Path
) -> None:
    """`lbc apply` leaves a record beside its lock file; the next run plans from it
    while the namespace's ruleset generation is unchanged, and reads the kernel when
    anything else wrote."""
    lock = tmp_path / "lock"
    small = config([("10.244.1.7", 1)], extra=2)
    big = config([("10.244.1.7", 1), ("10.244.2.3", 2)], extra=3)
    first = lbc.apply(small, "nftables", netns=node.name, lock_path=lock)
    assert first.read
    (record,) = tmp_path.glob("lock.nftables.netns-*.json")
    second = lbc.apply(big, "nftables", netns=node.name, lock_path=lock)
    assert second.applied and not second.read, "planned from the record"
    assert lbc.verify(big, "nftables", netns=node.name).in_sync
    with another_tools_table(node):
        third = lbc.apply(small, "nftables", netns=node.name, lock_path=lock)
        assert third.read, "another writer: the record no longer holds"
        assert lbc.verify(small, "nftables", netns=node.name).in_sync
    record.write_text('{"generation": "garbled"')
    fourth = lbc.apply(big, "nftables", netns=node.name, lock_path=lock)
    assert fourth.read and lbc.verify(big, "nftables", netns=node.name).in_sync


class CountingIptables(IptablesKernel):
    """The iptables adapter, counting its reads of the whole state."""

    snapshots = 0

    def snapshot(self) -> State:
        self.snapshots += 1
        return super().snapshot()


def test_iptables_nft_commits_are_verified_by_generation_and_remembered(
    node: netns.Netns, tmp_path: Path
) -> None:
    """iptables-nft writes nf_tables transactions: one per restored table.
    When the generation moved by exactly that many, nothing is read back, and the next
    run plans from the record; another tool's write makes it read again."""
    lock = tmp_path / "lock"
    kernel = CountingIptables(node.name)
    if kernel.generation() is None:
        pytest.skip("iptables here is iptables-legacy: no nf_tables generations")
    small = config([("10.244.1.7", 1)], extra=1)
    big = config([("10.244.1.7", 1), ("10.244.2.3", 1)], extra=2)
    first = lbc.apply(small, "iptables", kernel=kernel, lock_path=lock)
    assert first.applied and kernel.snapshots == 1, "no read-back after the commit"
    assert kernel.transactions >= 2  # the filter and nat tables of one restore, jumps in them
    second = lbc.apply(big, "iptables", kernel=kernel, lock_path=lock)
    assert second.applied and not second.read and kernel.snapshots == 1
    assert lbc.verify(big, "iptables", netns=node.name).in_sync
    node.exec("iptables", "-t", "nat", "-N", "OTHER-TOOL")
    try:
        third = lbc.apply(small, "iptables", kernel=kernel, lock_path=lock)
        assert third.read and kernel.snapshots >= 2
        assert lbc.verify(small, "iptables", netns=node.name).in_sync
    finally:
        node.exec("iptables", "-t", "nat", "-X", "OTHER-TOOL")


@pytest.mark.parametrize("command", ["apply", "plan", "verify", "delete"])
@pytest.mark.parametrize("backend", [*BACKENDS, "ipvs"])
def test_a_namespace_that_does_not_exist_is_an_error_and_is_not_created(
    seed: netns.Seed, tmp_path: Path, backend: str, command: str
) -> None:
    """Never "drift" or "in sync" for a namespace that is not there, never a traceback."""
    missing = f"{seed.node.name}-absent"
    args = [command] if command == "delete" else [command, str(HOSTNAMES)]
    if command in ("apply", "delete"):
        args += ["--lock-file", str(tmp_path / "lock")]
    result = CliRunner().invoke(main, [*args, "--netns", missing, "-b", backend])
    assert result.exit_code == 4, result.output  # the kernel exit code, not 0 or 1 (drift)
    assert "Traceback" not in result.output
    assert f"cannot enter network namespace {missing!r}" in result.stderr, result.stderr
    assert missing not in run_command(["ip", "netns", "list"]), "lbc created the namespace"


@pytest.mark.parametrize("backend", [*BACKENDS, "ipvs"])
def test_an_empty_namespace_name_is_refused_not_taken_for_the_host(backend: str) -> None:
    result = CliRunner().invoke(main, ["plan", str(HOSTNAMES), "--netns", "", "-b", backend])
    assert result.exit_code == 4, result.output
    assert "cannot enter network namespace '': not a namespace name" in result.stderr


def test_nftables_without_cap_net_admin_says_so_in_one_line(seed: netns.Seed) -> None:
    """libnftables would print to standard error itself and report a refused transaction."""
    import shutil
    import subprocess
    import sys

    if shutil.which("setpriv") is None:
        pytest.skip("needs setpriv (util-linux) to drop capabilities")
    command = [
        "setpriv",
        "--bounding-set",
        "-all",
        sys.executable,
        "-c",
        "from lbc.cli import main; main()",
        "plan",
        str(HOSTNAMES),
        "-b",
        "nftables",
        "--netns",
        seed.node.name,
    ]
    done = subprocess.run(command, capture_output=True, text=True, check=False, timeout=60)
    assert done.returncode == 4, done.stderr
    assert done.stderr == (
        "lbc: nftables: reading or changing table inet lbc needs CAP_NET_ADMIN (run lbc as "
        "root); nothing was read or changed\n"
    )
