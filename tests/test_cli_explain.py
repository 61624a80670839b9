"""`lbc explain` on its options: what `--from` and `--to` accept, and how it says no."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from lbc.cli import main

ROOT = Path(__file__).resolve().parent.parent
DUAL = str(ROOT / "golden" / "dual-stack" / "cluster.toml")


def explain(source: str, dest: str, case: str = DUAL) -> tuple[int, str, str]:
    result = CliRunner().invoke(main, ["explain", case, "--from", source, "--to", dest])
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    return result.exit_code, result.stdout, result.stderr


def test_a_bracketed_ipv6_destination_is_traced() -> None:
    code, stdout, stderr = explain("fd00:244::9:9", "[fd00:10::1:178]:80")
    assert (code, stderr) == (0, "")
    assert "packet fd00:244::9:9 -> [fd00:10::1:178]:80/tcp" in stdout
    assert "-> [fd00:244::1:7]:8080" in stdout
    assert stdout.endswith("verdict: forward\n")


@pytest.mark.parametrize(
    ("source", "dest"),
    [("10.244.9.9", "[fd00:10::1:178]:80"), ("fd00:244::9:9", "10.0.1.178:80")],
)
def test_source_and_destination_of_different_families_are_refused(source: str, dest: str) -> None:
    code, stdout, stderr = explain(source, dest)
    assert (code, stdout) == (2, "")
    assert "source and destination are different IP families" in stderr
    assert "verdict" not in stderr


def test_an_ipv6_destination_needs_brackets() -> None:
    # Without brackets `fd00:10::1:178:80` is one IPv6 address; the port is a guess.
    code, stdout, stderr = explain("fd00:244::9:9", "fd00:10::1:178:80")
    assert (code, stdout) == (2, "")
    assert (
        "Invalid value for '--to': write an IPv6 address in brackets, then its port: "
        "[fd00:10::1:178]:80"
    ) in stderr


@pytest.mark.parametrize("port", ["٨٠", "８０", "²"])  # Arabic-Indic, full-width, superscript
def test_a_port_is_ascii_digits(port: str) -> None:
    code, stdout, stderr = explain("10.244.9.9", f"10.0.1.178:{port}")
    assert (code, stdout) == (2, "")
    assert f"Invalid value for '--to': '10.0.1.178:{port}' is not ADDRESS:PORT" in stderr


@pytest.mark.parametrize(
    ("option", "args", "message"),
    [
        ("--to", ("10.244.9.9", "10.0.1.178"), "'10.0.1.178' is not ADDRESS:PORT"),
        ("--to", ("10.244.9.9", "10.0.1.999:80"), "'10.0.1.999' is not an IPv4 or IPv6"),
        ("--to", ("10.244.9.9", "10.0.1.178:0"), "port 0 of '10.0.1.178:0' is out of range"),
        ("--to", ("10.244.9.9", "10.0.1.178:" + "9" * 5000), "is out of range 1-65535"),
        ("--to", ("10.244.9.9", "[10.0.1.178]:80"), "brackets are for IPv6 addresses"),
        ("--from", ("nope", "10.0.1.178:80"), "'nope' is not an IPv4 or IPv6 address"),
        ("--from", ("fe80::1%eth0", "[fd00:10::1:178]:80"), "an IPv6 zone id is not allowed"),
    ],
)
def test_errors_name_the_option(option: str, args: tuple[str, str], message: str) -> None:
    code, stdout, stderr = explain(*args)
    assert (code, stdout) == (2, "")
    assert f"Invalid value for '{option}': " in stderr
    assert message in stderr
    assert "Traceback" not in stderr
