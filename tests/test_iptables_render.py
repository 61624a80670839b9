"""The iptables renderer without a kernel: probability math, chain names, jumps, escaping."""

from __future__ import annotations

import ipaddress
import json
import random
import re
import shlex
from collections import Counter
from dataclasses import dataclass, field

import pytest

import lbc
from lbc.backends.iptables import names as n
from lbc.backends.iptables.dispatch import SPLIT_ABOVE
from lbc.backends.iptables.render import (
    LARGE_CLUSTER_ENDPOINTS,
    STATISTIC_STEPS,
    FamilyRenderer,
    comment,
)
from lbc.ir import Program
from tests.configs import ANY_SOURCE_AND_DOTTED_TAILS, worst_case_config
from tests.golden import CASES, GOLDEN

BUILTIN_CHAINS = {
    "filter": {"INPUT", "FORWARD", "OUTPUT"},
    "nat": {"PREROUTING", "INPUT", "OUTPUT", "POSTROUTING"},
}
# Targets each table accepts; DNAT in filter or REJECT in nat would fail to load.
BUILTIN_TARGETS = {
    "filter": {"ACCEPT", "DROP", "RETURN", "REJECT", "MARK"},
    "nat": {"ACCEPT", "RETURN", "DNAT", "SNAT", "MASQUERADE", "MARK"},
}
MAX_COMMENT = 255  # the comment match keeps 256 bytes including the terminating NUL
HEADER = re.compile(r"^# ipv([46]): (\S+)\n", re.MULTILINE)
RESTORE = {4: "iptables-restore", 6: "ip6tables-restore"}
NODE = '[node]\nname = "node-1"\naddresses = ["192.168.49.2"]\npod_cidrs = ["10.244.0.0/16"]\n'


# --- helpers shared with the kernel and diff tests ------------------------------------
@dataclass
class Table:
    """One table of a restore (or save) document: declared chains and rules in order."""

    name: str
    declared: list[str] = field(default_factory=list)
    rules: list[tuple[str, str]] = field(default_factory=list)  # (chain, rest of the rule)

    def chain(self, name: str) -> list[str]:
        """The rules of chain `name`, in order."""
        return [rule for chain, rule in self.rules if chain == name]

    def by_chain(self) -> dict[str, list[str]]:
        """Every chain's rules in one pass: declared chains first, in order, then built-ins."""
        out: dict[str, list[str]] = {name: [] for name in self.declared}
        for chain, rule in self.rules:
            out.setdefault(chain, []).append(rule)
        return out


def parse_restore(doc: str) -> dict[str, Table]:
    """Parse iptables-restore / iptables-save text into tables; fail on any other line."""
    tables: dict[str, Table] = {}
    current: Table | None = None
    for line in doc.splitlines():
        if not line or line.startswith("#"):
            continue
        if line.startswith("*"):
            assert current is None, f"table {line} opened inside *{current and current.name}"
            assert line[1:] not in tables, f"table {line} appears twice"
            current = tables[line[1:]] = Table(line[1:])
        elif line == "COMMIT":
            assert current is not None, "COMMIT outside a table"
            current = None
        elif current is not None and line.startswith(":"):
            current.declared.append(line[1:].split()[0])
        elif current is not None and line.startswith("-A "):
            chain, _, rest = line[3:].partition(" ")
            current.rules.append((chain, rest))
        else:
            raise AssertionError(f"unexpected line: {line!r}")
    assert current is None, f"table *{current and current.name} is not committed"
    return tables


def sections(text: str) -> dict[int, str]:
    """The per-family restore documents of an iptables artifact, split on `# ipvN:` headers."""
    parts = HEADER.split(text)
    out: dict[int, str] = {}
    for family, command, doc in zip(parts[1::3], parts[2::3], parts[3::3], strict=True):
        assert command == RESTORE[int(family)], f"ipv{family} section names {command}"
        out[int(family)] = doc
    return out


def target(rule: str) -> str | None:
    """The `-j` target of a rule, if it has one."""
    words = shlex.split(rule)
    return words[words.index("-j") + 1] if "-j" in words else None


def dnat_destination(table: Table, chain: str) -> str:
    """Where an endpoint chain DNATs to."""
    found = [
        m.group(1)
        for rule in table.chain(chain)
        if (m := re.search(r"--to-destination (\S+)", rule)) is not None
    ]
    assert len(found) == 1, f"{chain} has {len(found)} DNAT rules"
    return found[0]


def shares(doc: str) -> dict[str, float]:
    """Each endpoint's share of new connections, multiplied out from the pool chain's rules."""
    nat = parse_restore(doc)["nat"]
    pools = [c for c in nat.declared if c.startswith(n.SVC)]
    assert len(pools) == 1, f"expected one pool chain, found {pools}"
    out: dict[str, float] = {}
    remaining = 1.0
    for rule in nat.chain(pools[0]):
        jump = target(rule)
        if jump is None or not jump.startswith(n.SEP):
            continue  # the masquerade-mark rule falls through
        m = re.search(r"--probability (\S+)", rule)
        p = float(m.group(1)) if m else 1.0
        destination = dnat_destination(nat, jump)
        out[destination] = out.get(destination, 0.0) + remaining * p
        remaining *= 1.0 - p
    assert remaining == 0.0, "the last endpoint rule must match unconditionally"
    return out


def weighted_config(weights: list[int], vip: str = "10.0.1.176") -> str:
    """cluster.toml for one service whose endpoints have `weights`, in address order."""
    endpoints = ",\n".join(
        f'  {{ ip = "10.244.{i // 200}.{i % 200 + 10}", weight = {w} }}'
        for i, w in enumerate(weights)
    )
    return (
        NODE + f'[[services]]\nname = "weighted"\ncluster_ips = ["{vip}"]\n'
        f'ports = [{{ name = "http", port = 80, target_port = 9376 }}]\n'
        f"endpoints = [\n{endpoints},\n]\n"
    )


def tree_config(services: int = 400, seed: int = 20240611) -> str:
    """Frontends of every kind in both families, enough to build every dispatch tree.

    Random cluster IPs in 10.96.0.0/12 and fd00:10::/112; node ports (the node-port
    tree); load-balancer IPs with source ranges and external IPs; services without
    endpoints (the filter table's tree); and one address with 45 ports, which the tree
    splits by protocol and port range.
    """
    rng = random.Random(seed)
    v4 = rng.sample(range(1, 1 << 20), services)
    v6 = rng.sample(range(1, 1 << 16), services)
    node_ports = iter(range(30000, 32768))
    out = [
        '[node]\nname = "node-1"\naddresses = ["192.168.49.2", "fd00:49::2"]\n'
        'pod_cidrs = ["10.244.0.0/16", "fd00:244::/64"]\n'
    ]
    for i in range(services):
        families = (4, 6) if i % 5 == 0 else (6,) if i % 5 == 1 else (4,)
        cluster = {
            4: str(ipaddress.IPv4Address((10 << 24 | 96 << 16) + v4[i])),
            6: f"fd00:10::{v6[i]:x}",
        }
        kind = {0: "NodePort", 1: "LoadBalancer"}.get(i % 6, "ClusterIP")
        ports = [("http", "TCP", 80)]
        if i % 3 == 0:
            ports.append(("dns", "UDP", 53))
        if i % 11 == 0:
            ports.append(("sig", "SCTP", 9000))
        port_text = ", ".join(
            f'{{ name = "{name}", protocol = "{proto}", port = {port}, target_port = 9376'
            + (f", node_port = {next(node_ports)}" if kind != "ClusterIP" else "")
            + " }"
            for name, proto, port in ports
        )
        lines = [
            "[[services]]",
            f'name = "svc-{i:04d}"',
            f'type = "{kind}"',
            f"cluster_ips = {json.dumps([cluster[f] for f in families])}",
            f"ports = [{port_text}]",
        ]
        if kind == "LoadBalancer":
            ingress = {4: f"198.18.{i >> 8}.{i & 255}", 6: f"fd00:198::{i:x}"}
            ranges = {4: "203.0.113.0/24", 6: "fd00:203::/64"}
            lines.append(f"load_balancer_ips = {json.dumps([ingress[f] for f in families])}")
            lines.append(
                f"load_balancer_source_ranges = {json.dumps([ranges[f] for f in families])}"
            )
        elif i % 6 == 2:
            external = {4: f"198.51.{i >> 8}.{i & 255}", 6: f"fd00:198:51::{i:x}"}
            lines.append(f"external_ips = {json.dumps([external[f] for f in families])}")
        if i % 7 != 3:
            pods = {4: f"10.244.{i >> 8}.{i & 255}", 6: f"fd00:244::{i:x}"}
            lines.append(
                "endpoints = [" + ", ".join(f'{{ ip = "{pods[f]}" }}' for f in families) + "]"
            )
        out.append("\n".join(lines) + "\n")
    wide = [(f"t{p}", "TCP", p) for p in range(8000, 8040)]
    wide += [(f"u{p}", "UDP", p) for p in range(8000, 8005)]
    wide_ports = ", ".join(
        f'{{ name = "{name}", protocol = "{proto}", port = {port} }}' for name, proto, port in wide
    )
    out.append(
        f'[[services]]\nname = "wide"\ncluster_ips = ["10.112.0.1", "fd00:10::1:0:1"]\n'
        f"ports = [{wide_ports}]\n"
        'endpoints = [{ ip = "10.244.200.1" }, { ip = "fd00:244::1:1" }]\n'
    )
    return "\n".join(out)


def large_config(services: int, endpoints: int, extra: int = 0) -> str:
    """`services` services of `endpoints` endpoints each (one more on the first, with
    `extra`), every fourth with ClientIP affinity: `services * endpoints + extra`
    endpoint chains."""
    out = ['[node]\nname = "node-1"\naddresses = ["192.168.49.2"]\npod_cidrs = ["10.244.0.0/16"]\n']
    for i in range(services):
        count = endpoints + (extra if i == 0 else 0)
        eps = ", ".join(f'{{ ip = "10.244.{i >> 6}.{(i & 63) * 4 + k}" }}' for k in range(count))
        out.append(
            f'[[services]]\nname = "svc-{i:04d}"\ncluster_ips = ["10.96.{i >> 8}.{i & 255}"]\n'
            'ports = [{ name = "http", port = 80, target_port = 9376 }]\n'
            + ('session_affinity = "ClientIP"\n' if i % 4 == 0 else "")
            + f"endpoints = [{eps}]\n"
        )
    return "\n".join(out)


def iptables_text(config: str) -> str:
    """The iptables artifact text of a cluster.toml text."""
    return lbc.compile(lbc.loads(config), backend="iptables").text()


def all_outputs() -> dict[str, str]:
    """Every iptables output these tests know: golden cases and the generated configs."""
    out = {
        case: (GOLDEN / case / "iptables.rules").read_text(encoding="utf-8")
        for case in CASES
        if (GOLDEN / case / "iptables.rules").is_file()
    }
    out["worst-case"] = iptables_text(worst_case_config())
    out["weights-1-2-3"] = iptables_text(weighted_config([1, 2, 3]))
    out["dispatch-tree"] = iptables_text(tree_config())
    out["large-cluster"] = iptables_text(large_config(250, 4, extra=1))
    return out


OUTPUTS = all_outputs()


# --- probabilities ------------------------------------------------------------------------
def weight_vectors() -> list[tuple[str, list[int]]]:
    """Equal pools of 2..50 and 1000, 1:2:3, 1:1000, and seven seeded random vectors."""
    vectors = [(f"equal-{k}", [1] * k) for k in (*range(2, 51), 1000)]
    vectors += [("1:2:3", [1, 2, 3]), ("1:1000", [1, 1000]), ("3:0:5", [3, 0, 5])]
    rng = random.Random(20240601)
    for i in range(7):
        weights = [rng.randint(1, 65535) for _ in range(rng.randint(2, 40))]
        if i % 2:
            weights[rng.randrange(len(weights))] = 0  # weight 0 takes no new connections
        vectors.append((f"random-{i}", weights))
    return vectors


@pytest.mark.parametrize(
    ("label", "weights"), [pytest.param(*v, id=v[0]) for v in weight_vectors()]
)
def test_probabilities_multiply_out_to_the_weights(label: str, weights: list[int]) -> None:
    artifact = lbc.compile(lbc.loads(weighted_config(weights)), backend="iptables")
    got = shares(artifact.data[4])
    total = sum(weights)
    for i, w in enumerate(weights):
        address = f"10.244.{i // 200}.{i % 200 + 10}:9376"
        if w == 0:
            assert address not in got, f"{label}: weight-0 endpoint {address} gets traffic"
        else:
            assert abs(got[address] - w / total) < 1e-9, (label, address, got[address])
    assert len(got) == sum(1 for w in weights if w)


def test_probabilities_are_printed_as_the_kernel_keeps_them() -> None:
    """Steps of 2**-31 with 11 decimals, as iptables-save prints them back."""
    doc = lbc.compile(lbc.loads(weighted_config([1, 2, 3, 7, 11])), backend="iptables").data[4]
    printed = re.findall(r"--probability (\S+)", doc)
    assert printed[0] == "0.04166666651"  # 1/24 rounded to the kernel's 2**-31 steps
    for p in printed:
        assert len(p.split(".")[1]) == 11
        steps = float(p) * STATISTIC_STEPS
        assert abs(steps - round(steps)) < 0.02, p
        assert f"{round(steps) / STATISTIC_STEPS:.11f}" == p


def test_a_single_endpoint_needs_no_probability() -> None:
    doc = lbc.compile(lbc.loads(weighted_config([5])), backend="iptables").data[4]
    assert "--probability" not in doc
    assert shares(doc) == {"10.244.0.10:9376": 1.0}


# --- structure --------------------------------------------------------------------------
@pytest.mark.parametrize("case", sorted(OUTPUTS))
def test_chain_names_are_short_and_prefixed(case: str) -> None:
    for family, doc in sections(OUTPUTS[case]).items():
        for table in parse_restore(doc).values():
            for chain in table.declared:
                assert chain.startswith(n.PREFIX), (case, family, table.name, chain)
                assert len(chain) <= n.MAX_CHAIN, (case, family, chain, len(chain))
                assert re.fullmatch(r"[A-Z0-9-]+", chain), chain


@pytest.mark.parametrize("case", sorted(OUTPUTS))
def test_every_jump_has_a_target_and_no_chain_is_declared_twice(case: str) -> None:
    for family, doc in sections(OUTPUTS[case]).items():
        tables = parse_restore(doc)
        assert set(tables) == {"filter", "nat"}
        for table in tables.values():
            declared = Counter(table.declared)
            twice = [c for c, k in declared.items() if k > 1]
            assert not twice, f"{case} ipv{family} {table.name}: declared twice: {twice}"
            known = set(declared) | BUILTIN_TARGETS[table.name]
            for chain, rule in table.rules:
                assert chain in declared or chain in BUILTIN_CHAINS[table.name], (case, chain)
                jump = target(rule)
                assert jump is not None, f"{case}: rule without a target: -A {chain} {rule}"
                assert jump in known, f"{case} ipv{family} {table.name}: -A {chain} {rule}"
            # Per-service chains exist only when something jumps to them (the fixed
            # chains such as LBC-NODEPORTS are always there, as in kube-proxy).
            jumped = {target(rule) for _, rule in table.rules}
            per_service = (n.SVC, n.SVL, n.SEP, n.EXT, n.FW, n.DSP)
            unused = [c for c in declared if c.startswith(per_service) and c not in jumped]
            assert not unused, f"{case} ipv{family} {table.name}: unreachable chains {unused}"


@pytest.mark.parametrize("case", sorted(OUTPUTS))
def test_families_do_not_mix(case: str) -> None:
    for family, doc in sections(OUTPUTS[case]).items():
        host = "/32" if family == 4 else "/128"
        for line in doc.splitlines():
            for dest in re.findall(r"-d (\S+)", line):
                # Only a dispatch chain's branch rule and the localnet firewall
                # (127.0.0.0/8) match a whole prefix.
                if f"-j {n.DSP}" not in line and not line.startswith(f"-A {n.FIREWALL} "):
                    assert dest.endswith(host), (case, family, line)
                assert ipaddress.ip_network(dest).version == family, (case, dest)
        for source in re.findall(r"-s (\S+)", doc):
            assert ipaddress.ip_network(source).version == family, (case, source)
        for dest in re.findall(r"--to-destination (\S+)", doc):
            address = dest.rsplit(":", 1)[0].strip("[]")
            assert ipaddress.ip_address(address).version == family, (case, dest)
            assert (dest.startswith("[")) == (family == 6), (case, dest)
        reject = "icmp-port-unreachable" if family == 4 else "icmp6-port-unreachable"
        assert set(re.findall(r"--reject-with (\S+)", doc)) <= {reject}, (case, family)


def test_ipv6_uses_host_prefixes_and_icmp6_rejects() -> None:
    text = OUTPUTS["worst-case"]
    v6 = sections(text)[6]
    assert "-d fd00:10::1:190/128 " in v6
    assert "-s fd00:244::2:3/128 " in v6
    assert "--to-destination [fd00:244:ffff:ffff:ffff:ffff:ffff:ffff]:65535" in v6
    assert "-j REJECT --reject-with icmp6-port-unreachable" in v6
    assert "-d fd00:10::1:191/128 " in v6
    v4 = sections(text)[4]
    assert "-j REJECT --reject-with icmp-port-unreachable" in v4
    assert "-d 10.0.1.190/32 " in v4


# --- comments ---------------------------------------------------------------------------
def test_comment_escapes_quotes_and_backslashes() -> None:
    assert comment('say "hi" \\o/') == '-m comment --comment "say \\"hi\\" \\\\o/"'
    tricky = 'x" -j ACCEPT -m comment --comment "y\\'
    assert shlex.split(comment(tricky)) == ["-m", "comment", "--comment", tricky]


def comments(text: str) -> list[str]:
    """The text of every `--comment` in an artifact, unescaped as iptables-restore reads it."""
    out = []
    for doc in sections(text).values():
        for line in doc.splitlines():
            words = shlex.split(line)
            out += [words[i + 1] for i, w in enumerate(words) if w == "--comment"]
    return out


@pytest.mark.parametrize("case", sorted(OUTPUTS))
def test_every_comment_is_one_word_within_the_kernel_limit(case: str) -> None:
    found = comments(OUTPUTS[case])
    assert len(found) == OUTPUTS[case].count("--comment")
    for text in found:
        assert len(text.encode()) <= MAX_COMMENT, (case, len(text), text)


def test_worst_case_comments_come_close_to_the_limit() -> None:
    """The worst case really exercises long comments, so the limit test above means something."""
    assert 200 < max(len(c) for c in comments(OUTPUTS["worst-case"])) <= MAX_COMMENT


# --- large clusters ---------------------------------------------------------------------
def endpoint_rules(doc: str) -> list[str]:
    """The rules that concern one endpoint: its chain's, and its pool's rule for it."""
    return [
        line
        for line in doc.splitlines()
        if line.startswith(f"-A {n.SEP}")
        or (line.startswith(("-A LBC-SVC-", "-A LBC-SVL-")) and f"-j {n.SEP}" in line)
    ]


def without_comments(line: str) -> str:
    return re.sub(r' -m comment --comment "[^"]*"', "", line)


def test_large_clusters_drop_the_endpoint_comments_as_kube_proxy_does() -> None:
    """Up to LARGE_CLUSTER_ENDPOINTS endpoint chains every endpoint rule names its
    service; one more, and none does (kube-proxy's large cluster mode, same threshold),
    while the rest keeps its comments and the rules are otherwise the same."""
    assert LARGE_CLUSTER_ENDPOINTS == 1000
    small = iptables_text(large_config(250, 4))
    large = iptables_text(large_config(250, 4, extra=1))
    small_rules, large_rules = endpoint_rules(small), endpoint_rules(large)
    assert small.count(f":{n.SEP}") == 1000 and large.count(f":{n.SEP}") == 1001
    assert len(small_rules) > 3000 and all("--comment" in r for r in small_rules)
    assert not any("--comment" in r for r in large_rules)
    assert any("-m recent" in r for r in large_rules), "affinity rules are covered"
    # Apart from the comments, only svc-0000's endpoint rules differ (its extra endpoint).
    (dispatch,) = [
        r
        for r in large.splitlines()
        if '"default/svc-0000:http cluster IP"' in r and not r.startswith("-A LBC-SVC-")
    ]
    pool = dispatch.split()[-1]
    first = {pool} | {r.split()[-1] for r in large_rules if r.startswith(f"-A {pool} ")}
    assert len(first) == 6, "svc-0000's pool and its five endpoints"

    def rest(rules: list[str]) -> list[str]:
        return [r for r in rules if r.split()[1] not in first]

    assert [without_comments(r) for r in rest(small_rules)] == rest(large_rules)
    # Per endpoint of the other 249 services: its pool rule and its chain's two, and an
    # affinity rule in the pools of the 62 with affinity (svc-0004, svc-0008, ...).
    assert len(rest(large_rules)) == 249 * 4 * 3 + 62 * 4
    # Every other rule is the same, comments included.
    others = []
    for doc in (small, large):
        mine = set(endpoint_rules(doc))
        others.append([r for r in doc.splitlines() if r.startswith("-A") and r not in mine])
    assert others[0] == others[1]
    assert sum("--comment" in r for r in others[1]) > 250


def chain_of(line: str) -> str | None:
    """The chain a declaration (`:X - [0:0]`) or rule (`-A X ...`) is about."""
    if line.startswith(":"):
        return line[1:].split()[0]
    return line.split()[1] if line.startswith("-A ") else None


def inline_lone_endpoints(doc: str) -> str:
    """`doc` with each pool of one endpoint and no affinity holding its endpoint chain's
    rules in place of its jump there, and the endpoint chains no rule jumps to any more
    removed: the large-cluster form, written as a substitution of text."""
    lines = doc.splitlines()
    rules: dict[str, list[str]] = {}
    for line in lines:
        if line.startswith("-A "):
            rules.setdefault(line.split()[1], []).append(line)
    replace: dict[str, list[str]] = {}
    for chain, chain_rules in rules.items():
        jumps = [r for r in chain_rules if f"-j {n.SEP}" in r]
        if chain.startswith((n.SVC, n.SVL)) and len(jumps) == 1 and "-m recent" not in jumps[0]:
            endpoint = rules[jumps[0].split()[-1]]
            replace[jumps[0]] = [f"-A {chain} {r.split(' ', 2)[2]}" for r in endpoint]
    out = [new for line in lines for new in replace.get(line, [line])]
    used = {line.split()[-1] for line in out if f"-j {n.SEP}" in line}
    kept = []
    for line in out:
        chain = chain_of(line)
        if chain is None or not chain.startswith(n.SEP) or chain in used:
            kept.append(line)
    return "\n".join([*kept, ""])


def large_form(program: Program, family: int) -> str:
    return FamilyRenderer(program, family, SPLIT_ABOVE, large=True).render()


@pytest.mark.parametrize("case", [c for c in CASES if (GOLDEN / c / "iptables.rules").is_file()])
def test_large_clusters_put_a_lone_endpoint_in_its_pool_chain(case: str) -> None:
    """In the large-cluster form, a pool of one endpoint without affinity holds its
    endpoint's hairpin mark and DNAT itself: the small form without comments, each such
    jump replaced by the rules it jumped to, and nothing else changed."""
    program = lbc.lower(lbc.load(GOLDEN / case / "cluster.toml"))
    for family in program.families():
        small = FamilyRenderer(program, family, SPLIT_ABOVE, large=False).render()
        large = large_form(program, family)
        commented = set(endpoint_rules(small))  # the rules the large form strips
        expected = inline_lone_endpoints(
            "\n".join(without_comments(r) if r in commented else r for r in small.splitlines())
        )
        assert large == expected


def test_a_large_cluster_keeps_endpoint_chains_where_a_pool_chooses() -> None:
    """Pools of several endpoints, and pools with affinity (which marks the chosen
    endpoint's chain), keep their endpoint chains; pools of one endpoint lose them."""
    config = [NODE]
    for i, (count, affinity) in enumerate([(1, False), (1, True), (3, False), (3, True)] * 2):
        eps = ", ".join(f'{{ ip = "10.244.{i}.{k + 1}" }}' for k in range(count))
        config.append(
            f'[[services]]\nname = "svc-{i}"\ncluster_ips = ["10.96.0.{i + 1}"]\n'
            'ports = [{ name = "http", port = 80, target_port = 9376 }]\n'
            + ('session_affinity = "ClientIP"\n' if affinity else "")
            + f"endpoints = [{eps}]\n"
        )
    program = lbc.lower(lbc.loads("\n".join(config)))
    doc = large_form(program, 4)
    nat = doc[doc.index("*nat") :]
    pools = [c for c in map(chain_of, nat.splitlines()) if c and c.startswith(n.SVC)]
    by_pool = {p: [r for r in nat.splitlines() if r.startswith(f"-A {p} ")] for p in set(pools)}
    lone = [p for p, rules in by_pool.items() if not any(f"-j {n.SEP}" in r for r in rules)]
    assert len(by_pool) == 8 and len(lone) == 2  # svc-0 and svc-4
    for pool in lone:
        assert [r.split(" -j ")[1].split()[0] for r in by_pool[pool]] == [
            n.MARK_MASQ,  # from outside the pod network
            n.MARK_MASQ,  # the hairpin: from the endpoint itself
            "DNAT",
        ]
    assert nat.count(f":{n.SEP}") == 2 * (1 + 3 + 3)


def test_rules_are_written_as_iptables_save_prints_them_back() -> None:
    """A source range of every address has no `-s` (iptables drops `-s 0.0.0.0/0`), and
    an IPv6 address whose first 96 bits are zero has glibc's dotted tail (`::10.0.0.1`),
    as iptables-save prints them: otherwise plan and verify never find the rules in sync."""
    text = lbc.compile(lbc.loads(ANY_SOURCE_AND_DOTTED_TAILS), "iptables").text()
    assert "-s 0.0.0.0/0" not in text and "-s ::/0" not in text
    assert "::a00:1" not in text and "::c000:2" not in text
    for rule in (
        "-s ::10.0.0.1/128 ",
        "--to-destination [::10.0.0.1]:80",
        "-d ::192.0.2.1/128 -p tcp ",
        "-s ::192.0.2.0/120 ",
    ):
        assert rule in text, rule
