"""The command line on bad input: exit 2, every problem on stderr, no traceback, no output file.

Also `lbc schema`: valid JSON Schema that accepts every config lbc ships.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import tomli
from click.testing import CliRunner

import lbc
from lbc.cli import main

ROOT = Path(__file__).resolve().parent.parent
BAD = sorted((ROOT / "tests" / "bad").glob("*.toml"))
GOOD = sorted([*ROOT.glob("golden/*/cluster.toml"), *ROOT.glob("examples/*.toml")])


def run(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(main, list(args))
    # A crash inside the command would be an exception other than SystemExit.
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    return result.exit_code, result.stdout, result.stderr


def expected_lines(path: Path) -> list[str]:
    """What the library reports for `path`, one `file:line: path: message` per problem."""
    with pytest.raises(lbc.ConfigError) as info:
        lbc.load(path)
    return [str(p) for p in info.value.problems]


@pytest.mark.parametrize("path", BAD, ids=[p.stem for p in BAD])
def test_compile_bad_file_exits_2_and_writes_nothing(path: Path, tmp_path: Path) -> None:
    out = tmp_path / "out.rules"
    code, stdout, stderr = run("compile", str(path), "-o", str(out))
    assert code == 2
    assert stdout == ""
    assert "Traceback" not in stderr
    for line in expected_lines(path):
        assert line in stderr
    assert list(tmp_path.iterdir()) == [], "compile wrote a file for bad input"


@pytest.mark.parametrize("path", BAD, ids=[p.stem for p in BAD])
def test_check_bad_file_lists_every_problem(path: Path) -> None:
    code, stdout, stderr = run("check", str(path))
    problems = expected_lines(path)
    assert code == 2
    assert stdout == ""
    n = len(problems)
    assert stderr.splitlines() == [
        f"lbc: {n} problem{'s' if n != 1 else ''} in config:",
        *(f"  {line}" for line in problems),
    ]


def test_missing_file(tmp_path: Path) -> None:
    missing = tmp_path / "absent.toml"
    out = tmp_path / "out.rules"
    code, _, stderr = run("compile", str(missing), "-o", str(out))
    assert code == 2
    assert f"{missing}: cannot read file: No such file or directory" in stderr
    assert not out.exists()


def test_unwritable_output_is_an_error_not_a_traceback(tmp_path: Path) -> None:
    out = tmp_path / "missing-dir" / "out.rules"
    code, stdout, stderr = run("compile", str(ROOT / "examples" / "hostnames.toml"), "-o", str(out))
    assert code == 2
    assert stdout == ""
    assert f"lbc: cannot write {out}: No such file or directory" in stderr


def test_good_file_still_compiles(tmp_path: Path) -> None:
    out = tmp_path / "out.rules"
    code, _, stderr = run("compile", str(ROOT / "examples" / "hostnames.toml"), "-o", str(out))
    assert (code, stderr) == (0, "")
    assert out.read_text(encoding="utf-8")
    code, stdout, _ = run("check", str(ROOT / "examples" / "hostnames.toml"))
    assert code == 0
    assert stdout.endswith("ok (1 service)\n")


def test_a_real_process_prints_no_traceback(tmp_path: Path) -> None:
    """Outside CliRunner too: the installed entry point, a fresh interpreter."""
    out = tmp_path / "out.rules"
    bad = ROOT / "tests" / "bad" / "many-problems.toml"
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            "from lbc.cli import main; main()",
            "compile",
            str(bad),
            "-o",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert "6 problems in config" in proc.stderr
    assert not out.exists()


# --- lbc schema ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def schema() -> dict[str, Any]:
    code, stdout, _ = run("schema")
    assert code == 0
    loaded = json.loads(stdout)
    assert isinstance(loaded, dict)
    return loaded


def test_schema_is_a_valid_json_schema(schema: dict[str, Any]) -> None:
    jsonschema.Draft202012Validator.check_schema(schema)


def test_schema_lists_every_top_level_key(schema: dict[str, Any]) -> None:
    assert set(schema["properties"]) == set(lbc.Cluster.model_fields) == {"node", "services"}
    assert schema["required"] == ["node"]
    assert schema["additionalProperties"] is False


@pytest.mark.parametrize("path", GOOD, ids=lambda p: str(p.relative_to(ROOT)))
def test_schema_accepts_every_shipped_config(schema: dict[str, Any], path: Path) -> None:
    data = tomli.loads(path.read_text(encoding="utf-8"))
    jsonschema.Draft202012Validator(schema).validate(data)


@pytest.mark.parametrize(
    "name",
    [
        "unknown-key-top",
        "unknown-key-port",
        "wrong-types",
        "port-too-big",
        "bad-protocol",
        "masquerade-mark-decimal-string",
    ],
)
def test_schema_rejects_what_the_schema_alone_can_see(schema: dict[str, Any], name: str) -> None:
    data = tomli.loads((ROOT / "tests" / "bad" / f"{name}.toml").read_text(encoding="utf-8"))
    assert list(jsonschema.Draft202012Validator(schema).iter_errors(data))
