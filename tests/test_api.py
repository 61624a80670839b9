"""The library API: typed, silent, exceptions instead of exits."""

from __future__ import annotations

import copy
import pickle
import warnings
from pathlib import Path
from typing import Any

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
    with pytest.raises(lbc.UsageError, match="format 'yaml' is not one of"):
        artifact.text("yaml")


def test_public_names_are_exported_and_typed() -> None:
    for name in lbc.__all__:
        assert hasattr(lbc, name), name
    assert (Path(lbc.__file__).parent / "py.typed").exists()


def test_load_tells_text_from_a_path() -> None:
    assert lbc.load('node = {name = "n"}').node.name == "n"  # one line of TOML
    assert lbc.load(EXAMPLE.read_bytes()) == lbc.load(EXAMPLE)
    assert lbc.loads(EXAMPLE.read_bytes()) == lbc.load(EXAMPLE)
    with pytest.raises(lbc.ConfigError, match="cannot read file"):
        lbc.load(str(EXAMPLE) + ".missing")
    with pytest.raises(lbc.ConfigError, match="missing required key 'node'"):
        lbc.load("")
    with pytest.raises(lbc.ConfigError, match="not a path: embedded null byte"):
        lbc.load("a\0b")


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: lbc.load(None), "load\\(\\) takes a path or TOML text, not NoneType"),
        (lambda: lbc.loads(3), "loads\\(\\) takes TOML text"),
        (lambda: lbc.compile(None), "compile\\(\\) takes a Cluster or a Program, not NoneType"),
        (lambda: lbc.compile(lbc.load(EXAMPLE), None), "a backend is a name or a Backend"),
        (lambda: lbc.lower("cluster.toml"), "lower\\(\\) takes a Cluster, not str"),
        (lambda: lbc.validate({}), "validate\\(\\) takes a Cluster, not dict"),
        (lambda: lbc.Session(3), "a backend is a name or a Backend, not int"),
        (lambda: lbc.diff("a", "b"), "diff\\(\\) takes a Cluster or a Program, not str"),
        (lambda: lbc.trace(None, "", "", 1), "trace\\(\\) takes a Program or a Cluster"),
        (lambda: lbc.notes("cluster.toml"), "notes\\(\\) takes a Cluster, not str"),
        (lambda: lbc.compile(lbc.load(EXAMPLE)).text(["text"]), "format \\['text'\\] is not"),
    ],
    ids=[
        "load",
        "loads",
        "compile",
        "compile-backend",
        "lower",
        "validate",
        "session",
        "diff",
        "trace",
        "notes",
        "artifact-format",
    ],
)
def test_an_argument_of_the_wrong_kind_is_a_usage_error(call: Any, message: str) -> None:
    with pytest.raises(lbc.UsageError, match=message) as exc:
        call()
    assert isinstance(exc.value, lbc.LbcError) and isinstance(exc.value, TypeError)
    assert isinstance(exc.value, ValueError)


def test_deep_nesting_is_a_config_error_not_a_recursion_error() -> None:
    with pytest.raises(lbc.ConfigError, match="nested too deeply"):
        lbc.loads("a = " + "[" * 500 + "]" * 500)
    # Deeper than Python's recursion limit, which tomli accepts: an unknown key,
    # reported without walking what lies below it.
    deep = '[node]\nname = "n"\n' + ".".join(["k"] * 700) + " = 1\n"
    with pytest.raises(lbc.ConfigError) as exc:
        lbc.loads(deep, filename="deep.toml")
    assert [str(p) for p in exc.value.problems] == ["deep.toml:3: node.k: unknown key 'k'"]


def test_validate_checks_a_cluster_changed_in_code() -> None:
    cluster = lbc.load(EXAMPLE)
    assert lbc.validate(cluster) == cluster
    svc = cluster.services[0]
    port = svc.ports[0].model_copy(update={"port": 70000})
    other = svc.model_copy(update={"name": "other", "ports": [port]})
    changed = cluster.model_copy(update={"services": [other, svc, svc]})
    with pytest.raises(lbc.ConfigError) as exc:
        lbc.validate(changed)
    assert [str(p) for p in exc.value.problems] == [
        "<cluster>: services[0].ports[0].port: port 70000 is out of range 1-65535",
        "<cluster>: services[2].name: duplicate service default/hostnames (also services[1])",
    ]


def test_validate_reports_any_value_put_in_by_model_copy_silently() -> None:
    # A value pydantic cannot write as JSON is a problem at its key, not a
    # PydanticSerializationError; values of the wrong type raise no pydantic warnings.
    cluster = lbc.load(EXAMPLE)
    svc = cluster.services[0]
    port = svc.ports[0].model_copy(update={"port": "80"})
    odd = svc.model_copy(update={"cluster_ips": [object()], "ports": [port]})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(lbc.ConfigError) as exc:
            lbc.validate(cluster.model_copy(update={"services": [odd]}))
    assert [str(p) for p in exc.value.problems] == [
        "<cluster>: services[0].cluster_ips[0]: expected an IP address string, got object",
        "<cluster>: services[0].ports[0].port: expected an integer, got the string '80'",
    ]


def test_validate_reports_a_key_misspelt_in_model_copy() -> None:
    # pydantic keeps an unknown key of `model_copy(update=...)` in the model and never
    # dumps it: the change it meant is lost, so it is an unknown key as in a file.
    cluster = lbc.load(EXAMPLE)
    svc = cluster.services[0]
    endpoint = svc.endpoints[0].model_copy(update={"wieght": 0})
    typo = svc.model_copy(update={"clusterIPs": ["10.0.0.9"], "endpoints": [endpoint]})
    with pytest.raises(lbc.ConfigError) as exc:
        lbc.validate(cluster.model_copy(update={"services": [typo]}))
    assert [str(p) for p in exc.value.problems] == [
        "<cluster>: services[0].endpoints[0].wieght: unknown key 'wieght'; did you mean 'weight'?",
        "<cluster>: services[0].clusterIPs: unknown key 'clusterIPs'; did you mean 'cluster_ips'?",
    ]


def test_lowering_refuses_two_services_on_one_address_and_port() -> None:
    cluster = lbc.load(EXAMPLE)
    svc = cluster.services[0]
    twin = cluster.model_copy(update={"services": [svc, svc.model_copy(update={"name": "twin"})]})
    with pytest.raises(lbc.ConfigError, match=r"10\.0\.1\.175:80/tcp is claimed by both"):
        lbc.compile(twin, "nftables")


def test_errors_survive_pickling_for_process_pools() -> None:
    with pytest.raises(lbc.UnsupportedError) as unsupported:
        lbc.compile(lbc.load(ROOT / "golden" / "scheduler-rr" / "cluster.toml"), "iptables")
    with pytest.raises(lbc.ConfigError) as config:
        lbc.loads("[node]\nname = 'n'\nx = 1\ny = 2\n", filename="f.toml")
    assert len(config.value.problems) == 2
    for exc in (unsupported.value, config.value):
        again = pickle.loads(pickle.dumps(exc))
        assert type(again) is type(exc) and str(again) == str(exc)
        assert copy.copy(exc).args == exc.args == (str(exc),)
    assert pickle.loads(pickle.dumps(unsupported.value)).items == unsupported.value.items
    assert pickle.loads(pickle.dumps(config.value)).problems == config.value.problems


TWO_SCHEDULERS = """\
[node]
name = "n"
[[services]]
name = "a"
scheduler = "rr"
cluster_ips = ["10.0.0.1"]
ports = [{ name = "http", port = 80 }]
[[services]]
name = "b"
scheduler = "lc"
cluster_ips = ["10.0.0.2"]
ports = [{ name = "dns", port = 53, protocol = "UDP" }]
"""


def test_unsupported_error_names_the_backend_and_every_thing_it_cannot_express() -> None:
    with pytest.raises(lbc.UnsupportedError) as exc:
        lbc.compile(lbc.loads(TWO_SCHEDULERS), "iptables")
    assert exc.value.backend == "iptables"
    assert str(exc.value) == (
        "backend 'iptables' cannot express 2 thing(s):\n"
        "  default/a:http/tcp ipv4: rr: scheduler rr\n"
        "  default/b:dns/udp ipv4: lc: scheduler lc"
    )


def test_every_error_lbc_raises_is_an_lbc_error() -> None:
    raised = [
        lbc.ConfigError,
        lbc.UnsupportedError,
        lbc.UsageError,
        lbc.PluginError,
        lbc.ApplyError,
    ]
    assert all(issubclass(cls, lbc.LbcError) for cls in raised)


def test_a_problem_is_an_immutable_hashable_value() -> None:
    problem = lbc.Problem("f.toml", "node.name", 2, "missing required key 'name'")
    assert {problem, lbc.Problem("f.toml", "node.name", 2, "missing required key 'name'")} == {
        problem
    }
    with pytest.raises(AttributeError):
        problem.line = 3  # type: ignore[misc]


def test_diff_labels_the_old_and_the_new_side() -> None:
    old = lbc.load(EXAMPLE)
    new = lbc.load(ROOT / "golden" / "weighted" / "cluster.toml")
    text = lbc.diff(old, new, "ir", old_name="before.toml", new_name="after.toml")
    assert text.startswith("--- before.toml\n+++ after.toml\n")
