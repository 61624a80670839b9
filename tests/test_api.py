"""The library API: typed, silent, exceptions instead of exits."""

from __future__ import annotations

from pathlib import Path

import pytest

import lbc

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "hostnames.toml"


def test_load_accepts_a_path_a_path_string_and_text() -> None:
    from_path = lbc.load(EXAMPLE)
    from_str = lbc.load(str(EXAMPLE))
    from_text = lbc.load(EXAMPLE.read_text())
    assert from_path == from_str == from_text
    assert [s.name for s in from_path.services] == ["hostnames"]


def test_compile_returns_an_artifact_with_text(capsys: pytest.CaptureFixture[str]) -> None:
    artifact = lbc.compile(lbc.load(EXAMPLE), backend="iptables")
    assert isinstance(artifact, lbc.Artifact)
    assert artifact.backend == "iptables"
    assert "-j LBC-SERVICES" in artifact.text()
    assert capsys.readouterr() == ("", ""), "the library must not print"


def test_compile_accepts_a_lowered_program_and_a_backend_instance() -> None:
    program = lbc.lower(lbc.load(EXAMPLE))
    assert isinstance(program, lbc.Program)
    backend = lbc.backends()["ir"]
    assert (
        lbc.compile(program, backend=backend).text()
        == lbc.compile(lbc.load(EXAMPLE), backend="ir").text()
    )


def test_errors_are_exceptions_from_lbc_errors() -> None:
    with pytest.raises(lbc.ConfigError) as exc:
        lbc.loads("[node]\nname = 'n'\n[[services]]\nname = 'x'\n", filename="inline.toml")
    assert all(isinstance(p, lbc.Problem) for p in exc.value.problems)
    assert {p.path for p in exc.value.problems} == {"services[0].cluster_ips", "services[0].ports"}
    assert all(p.file == "inline.toml" and p.line == 3 for p in exc.value.problems)
    assert issubclass(lbc.ConfigError, lbc.LbcError)
    with pytest.raises(lbc.PluginError):
        lbc.compile(lbc.load(EXAMPLE), backend="nope")
    with pytest.raises(lbc.UnsupportedError):
        lbc.compile(lbc.load(ROOT / "golden" / "scheduler-rr" / "cluster.toml"), "iptables")


def test_unknown_output_format_is_an_error_not_a_keyerror() -> None:
    artifact = lbc.compile(lbc.load(EXAMPLE), backend="ir")
    with pytest.raises(lbc.UnsupportedError, match="'yaml' is not one of"):
        artifact.text("yaml")


def test_public_names_are_exported_and_typed() -> None:
    for name in lbc.__all__:
        assert hasattr(lbc, name), name
    assert (Path(lbc.__file__).parent / "py.typed").exists()
