"""The iptables kernel adapter: read lbc's chains with iptables-save, write with one restore.

Equivalent to `iptables-save -t nat` / `iptables-save -t filter` for the snapshot and
`iptables-restore --noflush` (one document per family holding every changed chain)
for the commit. Jumps from the built-in chains are deleted and inserted one by one
(`-D PREROUTING ...`, `-I PREROUTING ...` lines of that restore), never appended, so
re-applies cannot duplicate them. Only chains named `LBC-...` and rules jumping to
them are ever read or written.
"""

from __future__ import annotations

import hashlib
import shlex
import subprocess
from collections import Counter
from collections.abc import Callable, Sequence

from lbc.apply.netns import inside
from lbc.apply.state import Plan, State, plan_between
from lbc.backends.base import Artifact
from lbc.backends.iptables import names as n
from lbc.backends.iptables.render import Documents
from lbc.backends.nftables.generation import Following, Generations, Touches, in_chains
from lbc.errors import ApplyError

TABLES = ("filter", "nat")
# The built-in chains lbc's jumps are in (any change to them counts as lbc's), and the
# nf_tables families of iptables and ip6tables (NFPROTO_IPV4, NFPROTO_IPV6).
BUILTIN_CHAINS = ("PREROUTING", "INPUT", "FORWARD", "OUTPUT", "POSTROUTING")
# A commit writing more rules than this stops a session's following first (a few MiB of
# announcements at most, well within its queue).
FOLLOWED_RULES = 10_000
NF_FAMILIES = (2, 10)
# From this many chains written in one table, a restore starts with `-S` (see
# `_restore_documents`; measured with bench/iptables_restore.py).
LIST_FIRST_FROM = 2000
LOCALHOST_MATCH = "-d 127.0.0.1/32 "
# The chains jumped to from built-in chains: deleted only after those jumps.
HOOKED = frozenset({n.SERVICES, n.FORWARD, n.POSTROUTING, n.FIREWALL})
COMMANDS = {
    4: ("iptables", "iptables-save", "iptables-restore"),
    6: ("ip6tables", "ip6tables-save", "ip6tables-restore"),
}
Runner = Callable[[Sequence[str], str | None], str]


def run_command(argv: Sequence[str], stdin: str | None = None) -> str:
    """Run `argv` (no shell); return stdout or raise `ApplyError` with its stderr.

    Output that is not UTF-8 (another tool's rule with a Latin-1 comment, which
    iptables-save prints as it is) is read with replacement characters: lbc reads only
    its own rules, whose text is ASCII."""
    try:
        done = subprocess.run(
            list(argv),
            input=stdin,
            capture_output=True,
            text=True,
            errors="replace",
            check=False,
            timeout=300,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise ApplyError(f"cannot run {shlex.join(argv)}: {exc}") from exc
    if done.returncode != 0:
        raise ApplyError(f"{shlex.join(argv)} failed ({done.returncode}): {done.stderr.strip()}")
    return done.stdout


def _scatter(state_key: str) -> bytes:
    return hashlib.sha1(state_key.encode()).digest()


def key(family: int, table: str, chain: str) -> str:
    """The state key of one chain: `ipv4 nat LBC-SERVICES`."""
    return f"ipv{family} {table} {chain}"


def hooks_key(family: int, table: str, chain: str) -> str:
    """The state key of lbc's jumps in one built-in chain: `ipv4 nat PREROUTING jumps`."""
    return f"ipv{family} {table} {chain} jumps"


def parse(family: int, document: str) -> dict[str, tuple[str, ...]]:
    """lbc's objects in an iptables-save/restore document, as state objects."""
    objects: dict[str, list[str]] = {}
    table = ""
    declared = ":" + n.PREFIX
    jump = f" -j {n.PREFIX}"
    # A chain's rules come one after another: keep the list of the last chain seen.
    last, rules = "", []
    for line in document.splitlines():
        if line.startswith("-A "):
            end = line.find(" ", 3)
            chain = line[3:end] if end > 0 else line[3:]
            if chain == last:
                rules.append(line)
            elif chain.startswith(n.PREFIX):
                last, rules = chain, objects.setdefault(key(family, table, chain), [])
                rules.append(line)
            elif jump in line:
                objects.setdefault(hooks_key(family, table, chain), []).append(line)
        elif line.startswith(declared):
            objects.setdefault(key(family, table, line[1:].split()[0]), [])
        elif line.startswith("*"):
            table, last = line[1:].strip(), ""
    # Jumps are inserted one at a time, so their order in a built-in chain is not ours
    # to keep; compare them as a sorted multiset.
    return {k: tuple(sorted(v)) if k.endswith(" jumps") else tuple(v) for k, v in objects.items()}


def creation_order(written: dict[str, tuple[str, ...]], key_head: str) -> list[str]:
    """The keys of the chains one restore writes in one table, in the order to declare
    them, each declaration followed by the chain's rules: every chain after the written
    chains it jumps to (children first, as a rule may only jump to a declared chain),
    the chains no written chain jumps to taken in hash order.

    iptables-nft (1.8.9) finds a chain by name in a hash table of 512 buckets, a list
    each, newest chain first, and does so for every declaration (a miss: the whole
    bucket), every rule (the chain it joins) and every jump (the target). Declaring
    all chains first leaves each one, when its rules come, behind half its bucket's
    later chains: at 10,000 services x 10 endpoints (138k chains) those walks cost
    3.4 s of a 17 s restore. Declared just before their rules and their parent's jumps,
    chains are found near the head. Names are hashes, so this order is not name order
    either (which would make iptables-save's sort quadratic).
    """
    children: dict[str, list[str]] = {}
    jumped_to: set[str] = set()
    jump = f" -j {n.PREFIX}"
    for k, rules in written.items():
        targets = []
        for rule in rules:
            at = rule.find(jump)
            if at >= 0:
                start = at + 4
                end = rule.find(" ", start)
                target = key_head + (rule[start:end] if end > 0 else rule[start:])
                if target in written and target != k:
                    targets.append(target)
        if targets:
            children[k] = targets
            jumped_to.update(targets)
    order: list[str] = []
    done: set[str] = set()
    for root in sorted(written.keys() - jumped_to, key=_scatter):
        stack = [(root, iter(children.get(root, ())))]
        done.add(root)
        while stack:
            chain, pending = stack[-1]
            for child in pending:
                if child not in done:
                    done.add(child)
                    stack.append((child, iter(children.get(child, ()))))
                    break
            else:
                stack.pop()
                order.append(chain)
    # A cycle (never rendered; the kernel refuses one) leaves chains unvisited.
    order += sorted(written.keys() - done, key=_scatter)
    return order


class IptablesKernel(Following):
    """Snapshot and commit lbc's iptables chains in the host or a named network namespace."""

    def __init__(self, netns: str | None = None, runner: Runner = run_command) -> None:
        self.netns = netns
        self.prefix = ["ip", "netns", "exec", netns] if netns is not None else []
        self.runner = runner
        self._entered = netns is None  # the namespace was entered once (or is ours)
        self._generations = Generations(netns)
        self._nf_tables: bool | None = None  # iptables-nft (not legacy)?
        self.transactions = 0  # sent by the last commit

    def _run(self, argv: Sequence[str], stdin: str | None = None) -> str:
        if not self._entered and self.runner is run_command:
            # One error for a namespace that is not there, whichever backend: entering
            # it raises `NamespaceError` (`ip netns exec` would only fail its command).
            with inside(self.netns):
                pass
            self._entered = True
        return self.runner([*self.prefix, *argv], stdin)

    def _write(self, argv: Sequence[str], stdin: str | None = None) -> str:
        """Run a command that changes the ruleset: one nf_tables transaction. (Every
        chain a plan touches differs from the live one, so each restored table holds a
        real change and the kernel counts it.)"""
        out = self._run(argv, stdin)
        self.transactions += 1
        return out

    def generation(self) -> int | None:
        """The ruleset generation, when iptables is iptables-nft (whose every restore
        and `-I`/`-D` is one nf_tables transaction); None for iptables-legacy or a
        stand-in runner."""
        if self.runner is not run_command:
            return None
        if self._nf_tables is None:
            self._nf_tables = "nf_tables" in self._run(["iptables", "-V"])
        if not self._nf_tables:
            return None
        if self._generations.replaced():
            # The named namespace was deleted and made again (or is gone): the reader
            # opened in the old one would go on reading its unchanging generation, and
            # no generation vouches for a state known from it.
            self._entered = False
            return None
        return self._generations.read()

    def _followed(self) -> Touches | None:
        """lbc's chains, for `follow`: a rule of another tool's chain in the same table
        is not lbc's; one in a built-in chain, where lbc's jumps are, counts as lbc's.
        Nothing with iptables-legacy, which has no generations."""
        if self.generation() is None:
            return None
        return in_chains(NF_FAMILIES, TABLES, n.PREFIX, BUILTIN_CHAINS)

    def identity(self) -> str | None:
        """The network namespace's cookie, when generations apply (see `generation`)."""
        return self._generations.identity() if self.generation() is not None else None

    def snapshot(self) -> State:
        """Equivalent to `iptables-save -t filter; iptables-save -t nat` (and ip6tables)."""
        objects: dict[str, tuple[str, ...]] = {}
        for family, (_, save, _) in COMMANDS.items():
            for table in TABLES:
                objects.update(parse(family, self._run([save, "-t", table])))
        return State(objects)

    def desired(self, artifact: Artifact) -> State:
        """The chains and jumps the artifact's restore documents hold."""
        if isinstance(artifact.data, Documents):
            return State(dict(artifact.data.objects))  # made with the documents
        objects: dict[str, tuple[str, ...]] = {}
        for family, document in artifact.data.items():
            objects.update(parse(family, document))
        return State(objects)

    def commit(self, live: State, desired: State, plan: Plan) -> None:
        """Write the plan in one restore per family; undo on a late failure.

        A restore is atomic per table, not across the tables of one document: when a
        table or a later step fails after something was written, the previous state is
        written back before the error is raised.
        """
        self.transactions = 0
        touched = {c.key for c in plan.changes}
        if plan.full:
            touched |= {k for k in desired.objects if not k.endswith(" jumps")}
        written = desired.objects.values() if plan.full else (c.after for c in plan.changes)
        moved = sum(len(c.before) + len(c.after) for c in plan.changes)
        if plan.full or moved > FOLLOWED_RULES:
            # The kernel announces every rule written and removed: more than a
            # follower's queue may hold. Stop following; a session follows afresh after.
            self._generations.unfollow()
        if any(LOCALHOST_MATCH in rule for rules in written for rule in rules):
            # Node ports on 127.0.0.1: the kernel must route DNATed loopback traffic out
            # (kube-proxy sets the same). A shared setting: lbc turns it on, never off,
            # when it writes such a rule.
            self._run(["sysctl", "-qw", "net.ipv4.conf.all.route_localnet=1"])
        try:
            self._restore(live, desired, touched)
            if plan.full:
                # Re-declaring an existing empty chain changes nothing, so a full
                # rewrite can send transactions the kernel does not count: make the
                # engine read back rather than trust the generation.
                self.transactions = -1
        except ApplyError as exc:
            now = self.snapshot()
            if now == live:
                raise  # the step that failed was the first write: nothing changed
            try:
                self._restore(
                    now, live, {c.key for c in plan_between("iptables", now, live).changes}
                )
            except ApplyError as undo:
                raise ApplyError(f"{exc}; undoing it failed too: {undo}") from exc
            raise ApplyError(f"{exc} (the previous rules were restored)") from exc

    def _restore(self, live: State, desired: State, touched: set[str]) -> None:
        for family, (_, _, restore) in COMMANDS.items():
            for document in self._restore_documents(family, live, desired, touched):
                self._write([restore, "-w", "--noflush"], document)
                # iptables-nft commits each table of a restore on its own.
                self.transactions += document.count("\nCOMMIT") - 1

    def _restore_documents(
        self, family: int, live: State, desired: State, touched: set[str]
    ) -> list[str]:
        """Per table: the changed chains written whole (under --noflush, declaring a
        chain empties it) and stale chains emptied and deleted; then the jumps from
        built-in chains deleted and inserted one by one (`-D`, `-I`: exact, so a
        re-apply cannot duplicate them) and the stale chains they jumped to deleted.
        One document, one transaction per table; two when the first starts with `-S`,
        after which iptables-nft cannot insert into a built-in chain that the kernel
        does not have yet (it lists it, but does not create it)."""
        first: list[str] = []
        late: list[str] = []
        # The touched keys of each table of the family (`ipv4 nat ...`), in one pass.
        by_table: dict[str, list[str]] = {}
        family_head = f"ipv{family} "
        for k in touched:
            if k.startswith(family_head):
                by_table.setdefault(k.split(" ", 2)[1], []).append(k)
        for table in TABLES:
            head = f"ipv{family} {table} {n.PREFIX}"
            keys = by_table.get(table, [])
            mine = [k for k in keys if k.startswith(head)]
            removed = sorted((k for k in mine if k not in desired.objects), key=_scatter)
            hooked = [k for k in removed if k.split()[2] in HOOKED]
            lines = [f":{k.split()[2]} - [0:0]" for k in removed]
            written = {k: desired.objects[k] for k in mine if k in desired.objects}
            for k in creation_order(written, head[: -len(n.PREFIX)]):
                lines.append(f":{k.split()[2]} - [0:0]")
                lines += written[k]
            lines += [f"-X {k.split()[2]}" for k in removed if k not in hooked]
            jumps = self._jump_changes(live, desired, [k for k in keys if k.endswith(" jumps")])
            jumps += [f"-X {k.split()[2]}" for k in hooked]
            # A chainless command first makes iptables-nft's --noflush restore skip its
            # per-line walk of a sorted list of the chains it needs (quadratic in
            # chains); `-S` is the only such command that changes nothing. It prints
            # the table, so it pays off only for large writes.
            if len(mine) >= LIST_FIRST_FROM:
                first += [f"*{table}", "-S", *lines, "COMMIT"]
                if jumps:
                    late += [f"*{table}", *jumps, "COMMIT"]
            elif lines or jumps:
                first += [f"*{table}", *lines, *jumps, "COMMIT"]
        return ["\n".join(doc) + "\n" for doc in (first, late) if doc]

    @staticmethod
    def _jump_changes(live: State, desired: State, jump_keys: list[str]) -> list[str]:
        """The `-D` lines of lbc's jumps that must go from the built-in chains of one
        table (`jump_keys`, the table's touched `... jumps` keys), then the `-I` lines of
        the ones to add."""
        deleted, inserted = [], []
        for k in sorted(jump_keys):
            have = Counter(live.objects.get(k, ()))
            want = Counter(desired.objects.get(k, ()))
            deleted += [f"-D {rule[3:]}" for rule in sorted((have - want).elements())]
            inserted += [f"-I {rule[3:]}" for rule in sorted((want - have).elements())]
        return deleted + inserted
