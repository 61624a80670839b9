"""The IPVS backend's rendering: operations, text, JSON and what it refuses (no kernel)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import textwrap

import pytest

import lbc
from lbc.backends.base import Feature
from lbc.backends.ipvs import IpvsBackend, names
from lbc.backends.ipvs.ops import (
    AddAddress,
    AddDestination,
    AddService,
    EnsureDummy,
    LoadRules,
    SetSysctl,
)
from lbc.backends.ipvs.text import canonical_save, sections
from lbc.ir.nodes import Proto
from tests.golden import GOLDEN, ROOT

BACKEND = IpvsBackend()
NODE = """
[node]
name = "node-1"
addresses = ["192.168.49.2"]
pod_cidrs = ["10.244.0.0/16"]
"""


def program(services: str, node: str = NODE) -> lbc.Program:
    return lbc.lower(lbc.loads(textwrap.dedent(node) + textwrap.dedent(services)))


def service(scheduler: str | None = None, weights: tuple[int, ...] = (1, 1), **extra: str) -> str:
    """One service with a cluster IP and endpoints of the given weights."""
    lines = ["[[services]]", 'name = "s"', 'cluster_ips = ["10.0.1.190"]']
    if scheduler:
        lines.append(f'scheduler = "{scheduler}"')
    lines += [f"{key} = {value}" for key, value in extra.items()]
    lines.append('ports = [{ name = "http", port = 80, target_port = 8080 }]')
    eps = ", ".join(f'{{ ip = "10.244.{i + 1}.7", weight = {w} }}' for i, w in enumerate(weights))
    lines.append(f"endpoints = [{eps}]")
    return "\n".join(lines) + "\n"


def compiled(text: str) -> lbc.Artifact:
    return BACKEND.compile(program(text))


def rules_of(case: str) -> str:
    """The helper-rules section of a golden case's output."""
    return sections(lbc.compile(lbc.load(GOLDEN / case / "cluster.toml"), "ipvs").text())["rules"]


def ipvs_lines(artifact: lbc.Artifact) -> list[str]:
    return sections(artifact.text())["ipvs"].splitlines()


def test_registered_as_a_builtin_plugin() -> None:
    backend = lbc.backends()["ipvs"]
    assert isinstance(backend, IpvsBackend)
    assert backend.extension == "txt"


def test_hostnames_is_the_exact_operation_list() -> None:
    ops = lbc.compile(lbc.load(GOLDEN / "hostnames" / "cluster.toml"), backend="ipvs").data
    tcp = Proto.TCP
    assert ops[:-1] == (
        EnsureDummy("lbc-ipvs0"),
        AddAddress("lbc-ipvs0", "10.0.1.175"),
        AddService(tcp, "10.0.1.175", 80, "rr", None),
        AddDestination(tcp, "10.0.1.175", 80, "10.244.1.7", 9376, 1),
        AddDestination(tcp, "10.0.1.175", 80, "10.244.2.3", 9376, 1),
        AddDestination(tcp, "10.0.1.175", 80, "10.244.3.6", 9376, 1),
        SetSysctl("net.ipv4.vs.conntrack", "1"),
        SetSysctl("net.ipv4.vs.expire_nodest_conn", "1"),
        SetSysctl("net.ipv4.vs.expire_quiescent_template", "1"),
    )
    assert isinstance(ops[-1], LoadRules)
    assert ops[-1].table == "lbc-ipvs"


def test_every_operation_says_its_command_line_equivalent() -> None:
    tcp = Proto.TCP
    assert (
        AddDestination(tcp, "10.0.1.175", 80, "10.244.1.7", 9376, 1).describe()
        == "Equivalent to `ipvsadm -a -t 10.0.1.175:80 -r 10.244.1.7:9376 -m -w 1`"
    )
    assert (
        AddService(tcp, "10.0.1.179", 80, "wrr", 600).describe()
        == "Equivalent to `ipvsadm -A -t 10.0.1.179:80 -s wrr -p 600`"
    )
    assert (
        AddService(Proto.SCTP, "fd00::1", 2905, "sh", None).describe()
        == "Equivalent to `ipvsadm -A --sctp-service [fd00::1]:2905 -s sh`"
    )
    assert (
        AddAddress("lbc-ipvs0", "10.0.1.175").describe()
        == "Equivalent to `ip addr add 10.0.1.175/32 dev lbc-ipvs0`"
    )
    assert (
        AddAddress("lbc-ipvs0", "fd00:10::1").describe()
        == "Equivalent to `ip -6 addr add fd00:10::1/128 dev lbc-ipvs0 nodad`"
    )
    assert "ip link add lbc-ipvs0 type dummy" in EnsureDummy("lbc-ipvs0").describe()
    assert "ip link set lbc-ipvs0 down" in EnsureDummy("lbc-ipvs0").describe()
    assert (
        SetSysctl("net.ipv4.vs.conntrack", "1").describe()
        == "Equivalent to `sysctl -w net.ipv4.vs.conntrack=1`"
    )
    assert "nft -f" in LoadRules("inet", "lbc-ipvs", "table inet lbc-ipvs {\n}\n").describe()


def test_every_operation_has_a_docstring() -> None:
    for cls in (EnsureDummy, AddAddress, AddService, AddDestination, SetSysctl, LoadRules):
        assert cls.__doc__ and "\n" not in cls.__doc__.strip(), cls


def test_json_format_is_the_operation_list_in_order() -> None:
    artifact = lbc.compile(lbc.load(GOLDEN / "affinity" / "cluster.toml"), backend="ipvs")
    listed = json.loads(artifact.text("json"))
    assert [item["op"] for item in listed] == [op.op for op in artifact.data]
    assert [item["command"] for item in listed] == [op.describe() for op in artifact.data]
    service_op = listed[2]
    assert service_op == {
        "op": "add-service",
        "proto": "tcp",
        "address": "10.0.1.179",
        "port": 80,
        "scheduler": "rr",
        "persistence": 600,
        "command": "Equivalent to `ipvsadm -A -t 10.0.1.179:80 -s rr -p 600`",
    }
    assert listed[-1]["text"] == sections(artifact.text())["rules"]


def test_text_sections_are_the_operations() -> None:
    artifact = lbc.compile(lbc.load(GOLDEN / "udp-sctp" / "cluster.toml"), backend="ipvs")
    parts = sections(artifact.text())
    assert list(parts) == ["link", "addresses", "sysctl", "ipvs", "rules"]
    assert parts["link"] == "lbc-ipvs0 dummy down\n"
    assert parts["addresses"] == "10.0.1.187/32\n"
    ipvs = [op.line() for op in artifact.data if isinstance(op, AddService | AddDestination)]
    assert parts["ipvs"].splitlines() == ipvs
    # ipvsadm's order: protocol number first (tcp 6, udp 17, sctp 132), then address.
    heads = [line.split()[1] for line in ipvs if line.startswith("-A")]
    assert heads == ["-t", "-u", "--sctp-service"]


@pytest.mark.parametrize(
    ("scheduler", "weights", "expected"),
    [
        (None, (1, 1), "rr"),
        (None, (1, 3), "wrr"),
        ("rr", (1, 1), "rr"),
        ("wrr", (1, 1), "wrr"),
        ("wrr", (1, 3), "wrr"),
        ("lc", (1, 1), "lc"),
        ("wlc", (2, 5), "wlc"),
        ("sh", (1, 2), "sh"),
        ("mh", (1, 2), "mh"),
        ("random", (1, 1), lbc.UnsupportedError),
        ("rr", (1, 3), lbc.UnsupportedError),
        ("lc", (1, 3), lbc.UnsupportedError),
    ],
)
def test_scheduler_table(scheduler: str | None, weights: tuple[int, ...], expected: object) -> None:
    text = service(scheduler, weights)
    if expected is lbc.UnsupportedError:
        with pytest.raises(lbc.UnsupportedError) as info:
            compiled(text)
        assert info.value.backend == "ipvs"
        reason = " ".join(item.reason for item in info.value.items)
        assert ("ignores endpoint weights" in reason) or (scheduler == "random")
        return
    lines = ipvs_lines(compiled(text))
    assert lines[0] == f"-A -t 10.0.1.190:80 -s {expected}"
    assert [line.rsplit(" ", 1)[1] for line in lines[1:]] == [str(w) for w in weights]


def test_zero_weight_endpoints_get_no_real_server() -> None:
    lines = ipvs_lines(compiled(service(None, (0, 2))))
    assert lines == [
        "-A -t 10.0.1.190:80 -s rr",
        "-a -t 10.0.1.190:80 -r 10.244.2.7:8080 -m -w 2",
    ]


def test_client_ip_affinity_is_persistence() -> None:
    text = service(None, (1, 1), session_affinity='"ClientIP"', session_affinity_timeout="30")
    assert ipvs_lines(compiled(text))[0] == "-A -t 10.0.1.190:80 -s rr -p 30"


def test_every_refusal_is_reported_at_once() -> None:
    text = service("random") + textwrap.dedent(
        """
        [[services]]
        name = "edge"
        type = "NodePort"
        external_traffic_policy = "Local"
        cluster_ips = ["10.0.1.191"]
        ports = [{ name = "http", port = 80, target_port = 8080, node_port = 30091 }]
        endpoints = [{ ip = "10.244.1.9", node = "node-1" }]
        """
    )
    with pytest.raises(lbc.UnsupportedError) as info:
        compiled(text)
    features = [item.feature for item in info.value.items]
    assert features == ["random", "external-traffic-policy-local"]
    assert "192.168.49.2:30091" in info.value.items[1].reason


def test_node_ports_are_services_on_node_addresses_not_bound_to_the_dummy() -> None:
    artifact = lbc.compile(lbc.load(GOLDEN / "node-port" / "cluster.toml"), backend="ipvs")
    parts = sections(artifact.text())
    assert parts["addresses"] == "10.0.1.180/32\n"
    assert "-A -t 192.168.49.2:30080 -s rr" in parts["ipvs"].splitlines()
    rules = parts["rules"]
    assert _elements(rules, "vips-v4") == ["10.0.1.180"]
    assert "192.168.49.2 . tcp . 30080" in _elements(rules, "services-v4")
    assert _elements(rules, "masquerade-always-v4") == ["192.168.49.2 . tcp . 30080"]
    assert _elements(rules, "masquerade-off-cluster-v4") == ["10.0.1.180 . tcp . 80"]


def test_ipv6_addresses_and_sets() -> None:
    artifact = lbc.compile(lbc.load(GOLDEN / "dual-stack" / "cluster.toml"), backend="ipvs")
    parts = sections(artifact.text())
    assert parts["addresses"] == "10.0.1.178/32\nfd00:10::1:178/128\n"
    assert "-A -t [fd00:10::1:178]:80 -s rr" in parts["ipvs"]
    assert _elements(parts["rules"], "services-v6") == ["fd00:10::1:178 . tcp . 80"]
    assert "ip6 saddr != fd00:244::/64 ip6 daddr" in parts["rules"]


def test_empty_pools_reject_or_drop_before_ipvs() -> None:
    rules = rules_of("internal-traffic-local")
    assert _elements(rules, "no-endpoints-drop-v4") == ["10.0.1.183 . udp . 53"]
    assert _elements(rules, "no-endpoints-reject-v4") == []
    rules = rules_of("no-endpoints")
    assert _elements(rules, "no-endpoints-reject-v4") == ["10.0.1.177 . tcp . 80"]
    assert "@no-endpoints-reject-v4 reject" in rules


def test_load_balancer_source_ranges() -> None:
    rules = rules_of("load-balancer")
    assert _elements(rules, "firewalled-v4") == ["198.51.100.10 . tcp . 443"]
    assert _elements(rules, "source-ranges-v4") == ["198.51.100.10 . tcp . 443 . 203.0.113.0/24"]


def test_source_ranges_are_merged_and_single_addresses_written_as_nft_lists_them() -> None:
    # An interval set refuses overlapping elements, and nft lists a /32 as an address.
    text = """
    [[services]]
    name = "s"
    type = "LoadBalancer"
    cluster_ips = ["10.0.1.190"]
    load_balancer_ips = ["198.51.100.10"]
    load_balancer_source_ranges = ["203.0.113.0/24", "203.0.113.128/25", "198.18.0.7/32"]
    ports = [{ name = "https", port = 443, node_port = 30443 }]
    endpoints = [{ ip = "10.244.1.7" }]
    """
    rules = sections(compiled(text).text())["rules"]
    assert _elements(rules, "source-ranges-v4") == [
        "198.51.100.10 . tcp . 443 . 198.18.0.7",
        "198.51.100.10 . tcp . 443 . 203.0.113.0/24",
    ]


def test_masquerade_all_marks_cluster_ips_from_pods_too() -> None:
    rules = rules_of("masquerade-all")
    assert _elements(rules, "masquerade-always-v4") == ["10.0.1.186 . tcp . 80"]
    assert _elements(rules, "masquerade-off-cluster-v4") == []
    assert "meta mark set meta mark | 0x8000" in rules


def test_without_a_pod_cidr_nothing_is_masqueraded_off_cluster() -> None:
    node = NODE.replace('pod_cidrs = ["10.244.0.0/16"]', "pod_cidrs = []")
    rules = sections(BACKEND.compile(program(service(), node)).text())["rules"]
    assert "@masquerade-off-cluster-v4 meta mark set" not in rules
    assert "@masquerade-always-v4 meta mark set" in rules
    assert _elements(rules, "masquerade-off-cluster-v4") == []


def test_hairpin_lists_this_nodes_endpoints_reaching_themselves() -> None:
    """hostnames: 10.244.1.7 runs on node-1 (this node); the others on node-2 and node-3,
    whose own connections go through their own nodes' rules."""
    rules = rules_of("hostnames")
    assert _elements(rules, "hairpin-v4") == ["10.244.1.7 . tcp . 9376 . 10.244.1.7"]


def test_interface_name_fits_the_kernel_limit() -> None:
    assert len(names.LINK.encode()) <= 15


def test_canonical_save_orders_like_lbc() -> None:
    # What ipvsadm printed in a VM: 192.168.x before 10.x (its wrapping compare).
    kernel = (
        "-A -t 192.168.49.2:30080 -s rr\n"
        "-A -t 10.0.1.175:80 -s rr\n"
        "-a -t 10.0.1.175:80 -r 10.244.3.6:9376 -m -w 1\n"
        "-a -t 10.0.1.175:80 -r 10.244.1.7:9376 -m -w 1\n"
        "-A -u 10.0.1.175:53 -s rr\n"
        "-A -t [fd00::1]:80 -s rr\n"
    )
    assert canonical_save(kernel) == (
        "-A -t 10.0.1.175:80 -s rr\n"
        "-a -t 10.0.1.175:80 -r 10.244.1.7:9376 -m -w 1\n"
        "-a -t 10.0.1.175:80 -r 10.244.3.6:9376 -m -w 1\n"
        "-A -t 192.168.49.2:30080 -s rr\n"
        "-A -u 10.0.1.175:53 -s rr\n"
        "-A -t [fd00::1]:80 -s rr\n"
    )
    with pytest.raises(ValueError, match="not an ipvsadm"):
        canonical_save("TCP 10.0.1.175:80 rr\n")


def test_every_golden_ipvs_section_is_canonical() -> None:
    for path in sorted(GOLDEN.glob("*/ipvs.txt")):
        ipvs = sections(path.read_text())["ipvs"]
        assert canonical_save(ipvs) == ipvs, path


def test_render_never_imports_pyroute2_or_nftables() -> None:
    code = textwrap.dedent(
        f"""
        import sys
        sys.modules["pyroute2"] = None
        sys.modules["nftables"] = None
        import lbc
        cluster = lbc.load({str(GOLDEN / "hostnames" / "cluster.toml")!r})
        lbc.compile(cluster, backend="ipvs")
        """
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


def _elements(rules: str, name: str) -> list[str]:
    """The elements of set `name` in an nft table text."""
    lines = rules.splitlines()
    start = lines.index(f"\tset {name} {{")
    out: list[str] = []
    inside = False
    for line in lines[start + 1 :]:
        if line == "\t}":
            break
        if line.strip() == "elements = {":
            inside = True
        elif line.strip() == "}":
            inside = False
        elif inside:
            out.append(line.strip().rstrip(","))
    return out


def test_filters_run_before_ipvs_on_input_and_on_the_nodes_own_output() -> None:
    """IPVS hooks local-in at priority 99 and local-out at -99; the filters come first."""
    rules = rules_of("hostnames")
    hooks = {
        m.group(1): int(m.group(2).replace("filter", "0"))
        for m in re.finditer(r"type filter hook (\w+) priority (-?\w+);", rules)
    }
    assert hooks == {"input": 0, "output": -110}
    assert all(priority < -99 or hook == "input" for hook, priority in hooks.items())
    assert rules.count("ct state new jump service-filter") == 2


def test_the_helper_table_marks_hairpin_only_for_backends_that_can_pass_this_node() -> None:
    from tests.test_nftables_render import PLACED

    web_only = PLACED[: PLACED.index('[[services]]\nname = "edge"')]
    text = lbc.compile(lbc.loads(web_only), "ipvs").text()
    hairpin = text[text.index("set hairpin-v4") :]
    hairpin = hairpin[: hairpin.index("}\n")]
    assert "10.244.1.5 . tcp . 8080 . 10.244.1.5" in hairpin  # this node's
    assert "10.244.3.5 . tcp . 8080 . 10.244.3.5" in hairpin  # no node given
    assert "10.244.2.5" not in hairpin  # another node's: through its own node's rules


def test_ipvs_does_not_claim_external_traffic_policy_local() -> None:
    backends = lbc.backends()
    assert Feature.LOCAL_POLICY in backends["ipvs"].features  # internal traffic policy Local
    assert Feature.EXTERNAL_LOCAL_POLICY not in backends["ipvs"].features
    assert Feature.EXTERNAL_LOCAL_POLICY in backends["nftables"].features
    assert Feature.EXTERNAL_LOCAL_POLICY in backends["iptables"].features
