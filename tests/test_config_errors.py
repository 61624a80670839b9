"""Bad input: the corpus in tests/bad/ and the library's `ConfigError` contract.

Each `tests/bad/<name>.toml` states, in its leading comment lines, every problem
lbc must report for it, in order:

    # expect: <line>: <key path>: <message fragment>

`-` stands for "no line" or "no key path". The test fails on a missing problem, an
unexpected extra one, a wrong line or path, or a message without the fragment.
"""

from __future__ import annotations

import ipaddress
import json
import random
import re
import sys
from collections.abc import Iterator
from pathlib import Path

import pydantic
import pytest

import lbc
from lbc.compiler.model import DNS_LABEL, Node, number

BAD = Path(__file__).parent / "bad"
CORPUS = sorted(BAD.glob("*.toml"))
EXPECT = re.compile(r"^# expect: (?P<line>-|\d+): (?P<path>\S+): (?P<fragment>.+)$")

Expected = tuple[int | None, str, str]

VALID = """\
[node]
name = "n"
[[services]]
name = "web"
cluster_ips = ["10.0.0.1"]
ports = [{ name = "http", port = 80, protocol = "udp" }]
"""


def expectations(path: Path) -> list[Expected]:
    """The `# expect:` lines at the top of a corpus file."""
    out: list[Expected] = []
    for raw in (
        path.read_bytes().decode("utf-8", errors="replace").removeprefix("\ufeff").splitlines()
    ):
        if not raw.startswith("#"):
            break
        m = EXPECT.match(raw)
        if m:
            line = None if m["line"] == "-" else int(m["line"])
            out.append((line, "" if m["path"] == "-" else m["path"], m["fragment"]))
    return out


def problems_of(source: str | Path) -> tuple[lbc.Problem, ...]:
    with pytest.raises(lbc.ConfigError) as info:
        lbc.load(source)
    return info.value.problems


def test_corpus_is_large_enough() -> None:
    assert len(CORPUS) >= 30
    for path in CORPUS:
        assert expectations(path), f"{path.name} states no `# expect:` line"


@pytest.mark.parametrize("path", CORPUS, ids=[p.stem for p in CORPUS])
def test_bad_file_reports_exactly_what_it_states(path: Path) -> None:
    expected = expectations(path)
    got = problems_of(path)
    shown = "\n".join(str(p) for p in got)
    assert len(got) == len(expected), f"expected {len(expected)} problems, got:\n{shown}"
    for problem, (line, key, fragment) in zip(got, expected, strict=True):
        assert problem.file == str(path)
        assert (problem.line, problem.path) == (line, key), f"got:\n{shown}"
        assert fragment in problem.message, f"{fragment!r} not in {problem.message!r}"


def test_problems_come_in_line_order() -> None:
    for path in CORPUS:
        lines = [p.line or 0 for p in problems_of(path)]
        assert lines == sorted(lines), path.name


def test_many_problems_are_reported_in_one_run() -> None:
    got = problems_of(BAD / "many-problems.toml")
    assert len(got) >= 5
    # Schema errors and semantic conflicts come together, not one kind per run.
    assert any("unknown key" in p.message for p in got)
    assert any("already used by" in p.message for p in got)


def test_config_error_is_an_lbc_error_with_problem_tuples() -> None:
    with pytest.raises(lbc.LbcError) as info:
        lbc.loads('[node]\nname = "n"\nnmae = "x"\n', filename="inline.toml")
    err = info.value
    assert isinstance(err, lbc.ConfigError)
    assert isinstance(err.problems, tuple)
    assert err.problems == (
        lbc.Problem("inline.toml", "node.nmae", 3, "unknown key 'nmae'; did you mean 'name'?"),
    )
    assert str(err) == (
        "1 problem in config:\n  inline.toml:3: node.nmae: unknown key 'nmae'; did you mean 'name'?"
    )


def test_loads_names_the_string_when_no_filename_is_given() -> None:
    with pytest.raises(lbc.ConfigError) as info:
        lbc.loads("[node]\n")
    assert info.value.problems == (
        lbc.Problem("<string>", "node.name", 1, "missing required key 'name'"),
    )


def test_an_unknown_key_in_the_wrong_case_gets_a_suggestion() -> None:
    text = VALID + 'endpoints = [{ IP = "10.0.0.9" }]\n'
    assert problems_of(text) == (
        lbc.Problem(
            "<string>", "services[0].endpoints[0].IP", 7, "unknown key 'IP'; did you mean 'ip'?"
        ),
    )


def test_a_service_with_a_bad_namespace_is_not_compared_as_one_in_default() -> None:
    # Its namespace is unknown: it is no duplicate of default/web.
    text = (
        VALID
        + """\
[[services]]
namespace = "Other_NS"
name = "web"
cluster_ips = ["10.0.0.2"]
ports = [{ name = "http", port = 80 }]
"""
    )
    (problem,) = problems_of(text)
    assert (problem.line, problem.path) == (8, "services[1].namespace")
    assert problem.message.startswith("namespace 'Other_NS' is not a DNS label")


def test_unknown_key_without_a_close_match_gets_no_suggestion() -> None:
    with pytest.raises(lbc.ConfigError) as info:
        lbc.loads('[node]\nname = "n"\ncolour = "blue"\n')
    (problem,) = info.value.problems
    assert problem.message == "unknown key 'colour'"


def test_missing_file_is_a_config_error_without_a_line(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere.toml"
    (problem,) = problems_of(missing)
    assert problem == lbc.Problem(
        str(missing), "", None, "cannot read file: No such file or directory"
    )


def test_a_directory_is_a_config_error(tmp_path: Path) -> None:
    (problem,) = problems_of(tmp_path)
    assert problem.file == str(tmp_path)
    assert problem.message.startswith("cannot read file:")


def test_a_path_given_as_a_one_line_string_is_read() -> None:
    (problem,) = problems_of(str(BAD / "port-zero.toml"))
    assert (problem.file, problem.path) == (
        str(BAD / "port-zero.toml"),
        "services[0].ports[0].port",
    )


def test_a_string_of_several_lines_is_text_even_without_an_equals_sign() -> None:
    assert problems_of("[node]\n") == (
        lbc.Problem("<string>", "node.name", 1, "missing required key 'name'"),
    )


def test_an_existing_file_whose_name_holds_an_equals_sign_is_read(tmp_path: Path) -> None:
    path = tmp_path / "a=b.toml"
    path.write_text(VALID, encoding="utf-8")
    assert lbc.load(str(path)) == lbc.loads(VALID)


def test_a_path_with_a_nul_character_is_named_visibly() -> None:
    assert problems_of("a\0b") == (
        lbc.Problem("'a\\x00b'", "", None, "not a path: embedded null byte"),
    )


def test_a_valid_file_still_loads() -> None:
    cluster = lbc.loads(VALID)
    assert cluster.services[0].ports[0].protocol == "UDP"


def test_one_name_in_two_namespaces_is_two_services() -> None:
    cluster = lbc.loads(
        VALID
        + """
[[services]]
namespace = "other"
name = "web"
cluster_ips = ["10.0.0.2"]
ports = [{ name = "http", port = 80 }]
"""
    )
    assert [(s.namespace, s.name) for s in cluster.services] == [
        ("default", "web"),
        ("other", "web"),
    ]


def test_external_traffic_policy_local_applies_to_a_cluster_ip_services_external_ips() -> None:
    cluster = lbc.loads(
        VALID.replace(
            'cluster_ips = ["10.0.0.1"]\n',
            'cluster_ips = ["10.0.0.1"]\nexternal_ips = ["203.0.113.1"]\n'
            'external_traffic_policy = "Local"\n',
        )
    )
    (external,) = [f for f in lbc.lower(cluster).frontends if f.address == "203.0.113.1"]
    assert external.masquerade is lbc.ir.Masquerade.NEVER


def test_a_pod_cidr_that_only_holds_a_special_range_is_allowed() -> None:
    # Refused only when all of it is special: 96.0.0.0/3 holds 127/8, fe00::/7 holds
    # fe80::/10 and ff00::/8, and pods may still have their other addresses.
    cluster = lbc.loads(
        VALID.replace('name = "n"\n', 'name = "n"\npod_cidrs = ["96.0.0.0/3", "fe00::/7"]\n')
    )
    assert [str(c) for c in cluster.node.pod_cidrs] == ["96.0.0.0/3", "fe00::/7"]


def test_one_port_number_in_two_protocols_is_no_conflict() -> None:
    # A service port and a node port are each keyed by protocol and number.
    cluster = lbc.loads(
        """
[node]
name = "n"
addresses = ["192.168.49.2"]
[[services]]
name = "dns"
type = "NodePort"
cluster_ips = ["10.0.0.1"]
ports = [
  { name = "udp", port = 53, protocol = "UDP", node_port = 30053 },
  { name = "tcp", port = 53, protocol = "TCP", node_port = 30054 },
]
[[services]]
name = "other"
type = "NodePort"
cluster_ips = ["10.0.0.2"]
ports = [{ name = "tcp", port = 80, node_port = 30053 }]
"""
    )
    node_ports = {
        (f.proto, f.port, f.service) for f in lbc.lower(cluster).frontends if f.port > 30000
    }
    assert node_ports == {
        ("udp", 30053, "default/dns:udp"),
        ("tcp", 30054, "default/dns:tcp"),
        ("tcp", 30053, "default/other:tcp"),
    }


@pytest.mark.parametrize("name", ["Web", "a b", 'a"b', "a'b", "a\\b", "-a", "a-", "a.b", "ä", ""])
def test_names_that_could_break_a_rule_comment_are_refused(name: str) -> None:
    assert not re.match(DNS_LABEL, name)
    quoted = json.dumps(name, ensure_ascii=False)  # a JSON string is a TOML basic string
    text = VALID.replace('name = "web"', f"name = {quoted}").replace(
        'name = "http"', f"name = {quoted}"
    )
    with pytest.raises(lbc.ConfigError) as info:
        lbc.loads(text)
    paths = [p.path for p in info.value.problems]
    assert paths == ["services[0].name", "services[0].ports[0].name"][: 1 if not name else 2]


GOLDEN = sorted((Path(__file__).parent.parent / "golden").glob("*/cluster.toml"))
ODD_VALUES = [
    '"x"',
    "0",
    "-1",
    "70000",
    "true",
    "1.5",
    "[]",
    "{}",
    '"10.0.0.0/8"',
    '""',
    "1979-05-27",
    "{ a = 1 }",
    '"' + "a" * 300 + '"',
    '["x"]',
    "[{}]",
    "nan",
]
EDITS = ['"', "[", "]", "{", "}", "=", ",", ".", "\n", "#", '"""', "[[services]]", "\\"]


def mutations(count: int) -> Iterator[str]:
    """Golden files with a value replaced or a character inserted or removed (seeded)."""
    rng = random.Random(20240611)
    texts = [p.read_text(encoding="utf-8") for p in GOLDEN]
    for _ in range(count):
        lines = rng.choice(texts).splitlines()
        k = rng.randrange(len(lines))
        if "=" in lines[k] and rng.random() < 0.6:
            lines[k] = lines[k].split("=")[0] + "= " + rng.choice(ODD_VALUES)
        else:
            i = rng.randrange(len(lines[k]) + 1)
            lines[k] = lines[k][:i] + rng.choice(EDITS) + lines[k][i + rng.randint(0, 2) :]
        yield "\n".join(lines) + "\n"


def test_any_edit_of_a_good_file_gives_config_error_or_cluster() -> None:
    """No input makes lbc raise anything but ConfigError, or echo pydantic's own wording."""
    for text in mutations(400):
        try:
            lbc.loads(text)
        except lbc.ConfigError as exc:
            n_lines = text.count("\n") + 1
            for p in exc.problems:
                assert p.line is None or 1 <= p.line <= n_lines, p
                assert "Input should" not in p.message and "Value error" not in p.message, p
                assert len(p.message) < 200, p


# --- values and documents the corpus cannot hold in one file each ----------------------


@pytest.mark.parametrize(
    ("value", "shown"),
    [
        (65536, "65536"),
        (10**20 - 1, "99999999999999999999"),
        (10**20, "1000000000000000...(21 digits)"),
        (-(10**5000), "-1000000000000000...(5001 digits)"),
        (2**16000 - 1, "3019469337239227...(4817 digits)"),
    ],
    ids=["short", "20-digits", "21-digits", "negative-5001-digits", "16000-bits"],  # no str()
)
def test_long_numbers_are_cut_short(value: int, shown: str) -> None:
    assert number(value) == shown
    assert len(number(value, hexadecimal=True)) < 40


def test_a_negative_integer_too_long_for_python_is_a_config_error() -> None:
    text = '[node]\nname = "n"\nmasquerade_mark = -' + "4" * 4500 + "\n"
    with pytest.raises(lbc.ConfigError) as info:
        lbc.loads(text)
    assert info.value.problems == (
        lbc.Problem(
            "<string>",
            "node.masquerade_mark",
            3,
            "integer too large (4500 digits; a TOML integer fits in 64 bits)",
        ),
    )


def test_an_integer_one_digit_over_pythons_limit_is_located() -> None:
    digits = sys.get_int_max_str_digits() + 1
    text = '[node]\nname = "n"\nmasquerade_mark = ' + "4" * digits + "\n"
    assert problems_of(text) == (
        lbc.Problem(
            "<string>",
            "node.masquerade_mark",
            3,
            f"integer too large ({digits} digits; a TOML integer fits in 64 bits)",
        ),
    )


@pytest.mark.parametrize("source", ["\ufeff" + VALID, ("\ufeff" + VALID).encode("utf-8")])
def test_a_byte_order_mark_is_skipped_in_text_and_bytes(source: str | bytes) -> None:
    assert lbc.loads(source) == lbc.loads(VALID)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            'node = { name = "n" }\n[node]\n',
            "table [node] cannot be declared: node is an inline table (line 1)",
        ),
        ('[node]\nname = "n"\n\n[node]\n', "table [node] is declared twice (first on line 1)"),
        (
            'node.name = "n"\n[node]\n',
            "table [node] is declared twice (by dotted keys on line 1)",
        ),
        (
            '[[services]]\nname = "a"\n[services]\n',
            "[services] is an array of tables ([[services]], line 1); add an element with "
            "[[services]]",
        ),
        (
            '[node]\nname = "n"\nx = { a = 1 }\nx.b = 2\n',
            "node.x is an inline table (line 3): every key of an inline table is written "
            "inside its braces",
        ),
        (
            '[node.x]\n[node]\nname = "n"\nx.y = 1\n',
            "table [node.x] is declared by its header (line 1); dotted keys cannot add to it",
        ),
        (
            '"a.b" = { c = 1 }\n["a.b".c.d]\n',
            'table ["a.b".c.d] cannot be declared: "a.b" is an inline table (line 1), which '
            "cannot be extended",
        ),
    ],
)
def test_tables_that_cannot_be_declared_are_explained(text: str, message: str) -> None:
    (problem,) = problems_of(text)
    assert message in problem.message
    assert "(" + "'" not in problem.message  # no Python tuple such as ('node', 'x')


def test_a_zone_id_is_refused_in_addresses_given_as_objects() -> None:
    with pytest.raises(pydantic.ValidationError, match="zone id"):
        Node(name="n", addresses=[ipaddress.IPv6Address("fd00::1%eth0")])
    with pytest.raises(pydantic.ValidationError, match="zone id"):
        Node(name="n", pod_cidrs=[ipaddress.IPv6Network("fd00::%eth0/64")])


def test_validate_refuses_special_addresses_set_in_code() -> None:
    cluster = lbc.loads(VALID)
    svc = cluster.services[0]
    changed = cluster.model_copy(
        update={"services": [svc.model_copy(update={"cluster_ips": [ipaddress.ip_address("::1")]})]}
    )
    with pytest.raises(lbc.ConfigError) as info:
        lbc.validate(changed)
    assert [(p.path, p.message) for p in info.value.problems] == [
        (
            "services[0].cluster_ips[0]",
            "cluster IP ::1 is the loopback address, which Kubernetes does not allow",
        )
    ]
