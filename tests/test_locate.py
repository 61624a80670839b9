"""The locator maps every key path of a TOML document to the line it is written on.

The expectation is independent of the locator: in each document below, every leaf
value states its own line (an integer equal to it, or a string starting `@<line>`),
tomli supplies the paths, and the test checks that the locator agrees on all of them.
"""

from __future__ import annotations

import doctest
from collections.abc import Iterator
from pathlib import Path

import pytest
import tomli

from lbc.compiler import locate
from lbc.compiler.locate import (
    Defined,
    definitions,
    format_path,
    key_lines,
    line_of,
    long_integer,
    toml_key,
)

ROOT = Path(__file__).resolve().parent.parent

DOCUMENTS = {
    "tables-and-array-tables": """\
# line 1 is a comment
[node]
name = "@3"
addresses = ["@4", "@4"]

[[services]]
name = "@7"
ports = [{ name = "@8", port = 8 }]
[[services.endpoints]]
ip = "@10"
[[services.endpoints]]
ip = "@12"
weight = 13
[[services]]
name = "@15"
""",
    "inline-tables-spanning-lines": """\
[[services]]
ports = [  # [[services.ports]] is not a header here
  { name = "@3", port = 3 },  # ports[0] ]
  { name = "@4",
    # }, { name = "fake" }
    port = 6 } ,
  [ "@7" ], [
    8,
  ]
]
cluster_ips = [
  "@12", # "]"
  "@13",
]
""",
    "multi-line-strings": '''\
a = """@1 with "quotes", ""two"" and an escaped delimiter \\"""
[not.a.header]
b = "not a key" """
c = \'\'\'@4 literal with 'quotes' and ""\" and [brackets]
# not a comment
\'\'\'
d = """@7 ends with two extra quotes"""""
e = \'\'\'@8 ends with one extra quote\'\'\'\'
f = "@9 basic with an escaped quote \\" [x] # y"
g = \'@10 literal with a backslash \\\'
h = """
@11 (the line of its key) after a trimmed newline"""
i = """@13 line ending backslash \\
  continues"""
j = 15
''',
    "quoted-keys": """\
"a.b" = 1
'quoted key' = 2
"esc\\"aped" = 3
"\\u0041" = 4
[ "table with space" . 'inner' ]
"" = 6
[[ "array table" ]]
key = 8
""",
    "dotted-keys": """\
a.b.c = 1
a . "d" . e = 2
[t]
x.y = 4
inline = { p.q = 5, r = { s = 5 } }
[t.sub]
z = 7
""",
    "nested-array-tables": """\
[[fruits]]
name = "@2"
[fruits.physical]       # a sub-table of fruits[0]
color = "@4"
[[fruits.varieties]]
name = "@6"
[[fruits.varieties]]
name = "@8"

[[fruits]]
name = "@11"
[[fruits.varieties]]
name = "@13"
[fruits.varieties.detail]
size = 15
""",
    "bare-keys-with-hyphens": """\
for-zones = 1
[a-b]
c-d = 3
"e-f".g-h = 4
[[x-y]]
z = 6
""",
    "comments-after-bare-values": """\
a = 1  # a comment, with ] and }
b = 2#,]
t = { c = 3 }  # ,
d = [ 4 ] # ]
e = 5
""",
}

# Booleans, floats and date-times cannot state their line, so they get a test of their own.
EVERY_KIND = """\
t = true
f = 3.5e2
d = 1979-05-27 07:32:00Z
n = [ 4, -5, 0x6, 1_000, inf ]  # numbers end at , ] } and #
last = 6
"""

# Lines of non-leaf paths (tables, arrays, array elements), which carry no marker.
CONTAINERS = {
    "tables-and-array-tables": {
        ("node",): 2,
        ("services",): 6,
        ("services", 0): 6,
        ("services", 0, "ports", 0): 8,
        ("services", 0, "endpoints"): 9,
        ("services", 0, "endpoints", 1): 11,
        ("services", 1): 14,
    },
    "inline-tables-spanning-lines": {
        ("services", 0, "ports"): 2,
        ("services", 0, "ports", 1): 4,
        ("services", 0, "ports", 2): 7,
        ("services", 0, "ports", 3): 7,
    },
    "quoted-keys": {("table with space", "inner"): 5, ("array table", 0): 7},
    "dotted-keys": {("a",): 1, ("a", "b"): 1, ("a", "d"): 2, ("t", "x"): 4, ("t", "sub"): 6},
    "nested-array-tables": {
        ("fruits", 0, "physical"): 3,
        ("fruits", 0, "varieties", 1): 7,
        ("fruits", 1): 10,
        ("fruits", 1, "varieties", 0): 12,
        ("fruits", 1, "varieties", 0, "detail"): 14,
    },
}


def leaves(
    node: object, path: tuple[str | int, ...] = ()
) -> Iterator[tuple[tuple[str | int, ...], object]]:
    """Every scalar in a parsed document, with its key path."""
    if isinstance(node, dict):
        for key, value in node.items():
            yield from leaves(value, (*path, key))
    elif isinstance(node, list):
        for index, value in enumerate(node):
            yield from leaves(value, (*path, index))
    else:
        yield path, node


def marked_line(value: object) -> int | None:
    """The line a leaf says it is on, or None for a leaf without a marker."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str) and value.startswith("@"):
        return int(value[1:].split()[0])
    return None


def check_document(text: str, containers: dict[tuple[str | int, ...], int]) -> None:
    lines = key_lines(text)
    seen = 0
    for path, value in leaves(tomli.loads(text)):
        expected = marked_line(value)
        assert expected is not None, f"{format_path(path)} states no line"
        assert lines.get(path) == expected, f"{format_path(path)}: {lines.get(path)} != {expected}"
        seen += 1
    assert seen, "the document has no leaves"
    for path, expected in containers.items():
        assert lines.get(path) == expected, f"{format_path(path)}: {lines.get(path)} != {expected}"


@pytest.mark.parametrize("name", sorted(DOCUMENTS))
def test_every_leaf_is_on_the_line_it_states(name: str) -> None:
    check_document(DOCUMENTS[name], CONTAINERS.get(name, {}))


@pytest.mark.parametrize("name", sorted(DOCUMENTS))
def test_crlf_line_endings_give_the_same_lines(name: str) -> None:
    check_document(DOCUMENTS[name].replace("\n", "\r\n"), CONTAINERS.get(name, {}))


def test_values_of_every_kind_do_not_shift_later_lines() -> None:
    lines = key_lines(EVERY_KIND)
    assert [lines[(k,)] for k in ("t", "f", "d", "n", "last")] == [1, 2, 3, 4, 5]
    assert [lines[("n", i)] for i in range(5)] == [4] * 5


def test_toml_1_1_inline_tables_with_newlines_and_trailing_commas() -> None:
    text = 'svc = {\n  name = "@2",  # a comment\n  port = 3,\n}\nafter = 5\n'
    try:
        tomli.loads(text)
    except tomli.TOMLDecodeError:
        pytest.skip("this tomli reads TOML 1.0 only")
    check_document(text, {("svc",): 1})


def test_quoted_keys_are_decoded() -> None:
    lines = key_lines(DOCUMENTS["quoted-keys"])
    assert lines[('esc"aped',)] == 3
    assert lines[("A",)] == 4
    assert lines[("table with space", "inner", "")] == 6


def _valid_toml(path: Path) -> bool:
    try:
        tomli.loads(path.read_text(encoding="utf-8"))
    except ValueError:
        # Some bad-input files are broken on purpose: not UTF-8, not TOML, or holding
        # an integer too long for Python to convert (each a ValueError).
        return False
    return True


@pytest.mark.parametrize(
    "path",
    sorted(
        p
        for p in [
            *ROOT.glob("golden/*/cluster.toml"),
            *ROOT.glob("examples/*.toml"),
            *ROOT.glob("tests/bad/*.toml"),
        ]
        if _valid_toml(p)
    ),
    ids=lambda p: str(p.relative_to(ROOT)),
)
def test_real_files_every_leaf_lands_on_a_line_that_shows_it(path: Path) -> None:
    """In every config file lbc ships, a leaf's line holds its key (or its value)."""
    text = path.read_text(encoding="utf-8")
    data = tomli.loads(text)
    lines = key_lines(text)
    source = text.splitlines()
    for leaf, value in leaves(data):
        line = lines.get(leaf)
        assert line is not None, f"{format_path(leaf)} not located"
        shown = source[line - 1]
        last = leaf[-1]
        if isinstance(last, str):
            assert last in shown, f"{format_path(leaf)} -> line {line}: {shown!r}"
        else:
            assert str(value) in shown, f"{format_path(leaf)} -> line {line}: {shown!r}"


def test_every_prefix_of_a_document_terminates_without_raising() -> None:
    """Text cut anywhere (never valid input, but a bug must not hang or crash)."""
    for text in [*DOCUMENTS.values(), EVERY_KIND]:
        for end in range(len(text) + 1):
            assert isinstance(key_lines(text[:end]), dict)


def test_empty_document() -> None:
    assert key_lines("") == {}
    assert key_lines("# only a comment\n\n") == {}


def test_line_of_falls_back_to_the_nearest_ancestor() -> None:
    lines = key_lines('[node]\nname = "n"\n[[services]]\nname = "a"\n')
    assert line_of(lines, ("services", 0, "ports", 3, "port")) == 3
    assert line_of(lines, ("node", "name")) == 2
    assert line_of(lines, ("nowhere",)) is None


def test_format_path() -> None:
    assert format_path(("services", 2, "ports", 0, "port")) == "services[2].ports[0].port"
    assert format_path(("node",)) == "node"
    assert format_path(()) == ""
    # Keys that are not bare TOML keys are quoted so the path reads unambiguously.
    assert format_path(("services", 0, "a b")) == "services[0].'a b'"
    assert format_path(("x.y",)) == "'x.y'"
    assert format_path(("node", "")) == "node.''"
    assert format_path(("for-zones",)) == "for-zones"


def test_module_example() -> None:
    assert doctest.testmod(locate).failed == 0


# --- what tomli's messages need: how a key was first written, long integers ------------


def test_definitions_say_how_each_part_of_a_key_was_written() -> None:
    text = """\
[node]
name = "n"
addresses = ["a"]
extra = { a = 1 }
x.y.z = 1
[[services]]
ports = [{ port = 1 }]
[services.sub]
"""
    assert definitions(text, ("node", "addresses")) == [
        Defined(("node",), "table", 1),
        Defined(("node", "addresses"), "array", 3),
    ]
    assert definitions(text, ("node", "extra", "b")) == [
        Defined(("node",), "table", 1),
        Defined(("node", "extra"), "inline table", 4),
        Defined(("node", "extra", "b"), "", None),
    ]
    assert [d.kind for d in definitions(text, ("node", "x", "y", "z"))] == [
        "table",
        "dotted",
        "dotted",
        "value",
    ]
    # tomli names keys without array indices: `ports` of the latest [[services]].
    assert definitions(text, ("services", "ports")) == [
        Defined(("services",), "array of tables", 6),
        Defined(("services", "ports"), "array", 7),
    ]
    # A header's own table is declared; the tables it passes through are only implied.
    assert definitions("[a.b]\n", ("a", "b")) == [
        Defined(("a",), "", 1),
        Defined(("a", "b"), "table", 1),
    ]


def test_definitions_follow_the_latest_element_of_an_array_of_tables() -> None:
    text = '[[s]]\nports = [1]\n[[s]]\nname = "b"\n'
    assert definitions(text, ("s", "ports"))[-1] == Defined(("s", "ports"), "", None)
    assert definitions(text, ("s", "name"))[-1] == Defined(("s", "name"), "value", 4)


def test_long_integer_finds_the_first_decimal_integer_over_the_limit() -> None:
    digits = "9" * 30
    text = f"""\
a = "{digits}"  # a string of digits is no integer
# {digits} nor is a comment
b = 0x{"f" * 30}
c = [1, 2, {digits[:10]}]
[[t]]
[[t]]
n = {{ m = -{"1_" * 14}1, k = {digits} }}
d = {digits}
"""
    assert long_integer(text, 9) == (("c", 2), 4, 10)
    assert long_integer(text, 14) == (("t", 1, "n", "m"), 7, 15)  # digits, not "_" or "-"
    assert long_integer(text, 15) == (("t", 1, "n", "k"), 7, 30)
    assert long_integer(text, 30) is None


def test_toml_key_writes_keys_as_toml_does() -> None:
    assert toml_key(("services", "ports")) == "services.ports"
    assert toml_key(("a.b", "c")) == '"a.b".c'
    assert toml_key(("", 'q"uote')) == '"".' + '"q\\"uote"'
